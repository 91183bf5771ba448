"""Quantize an ordinary Flax (linen) model by regex rules on module paths.

``quantize_model(module, rules)`` wraps a model written with plain
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` / ``nn.Einsum`` (it need not know this
package) into a `QuantizedModel` that behaves like it, with every matched
layer quantized: fake quant with straight-through gradients for QAT, or
integer operands with int32 accumulation for inference
(``LayerQuant.execution='int'``).

Rules. A sequence of ``(regex, LayerQuant)`` or a `ModelQuant`. Each regex
is ``re.search``-ed against the module path relative to the wrapped model
(``'/'``-joined names, e.g. ``'Dense_0'``, ``'encoder/attn/query'``); the
first match wins; a layer no rule matches gets the ModelQuant's ``default``
(float for a plain sequence). An invalid regex is refused when the rules are
built. A layer whose LayerQuant is entirely float runs its own code,
untouched.

Parameters. The wrapper adds no level to the variable tree and every layer
keeps its own parameter names and shapes, so a float checkpoint loads as is.
Quantizers that learn add parameters next to ``kernel`` (``input_lsq_step``,
``kernel_lsq_step``, ``input_pact_alpha``, ...); static ranges go to the
``quant_stats`` collection (see `aqt_ext.linen.layers`). Create the missing ones
from a float checkpoint with ``model.apply(float_vars, x, mutable=True,
rngs={'params': key})`` (as `aqt_ext.train.initial_variables` does).

Mechanism. The wrapper shares its scope with the wrapped module
(``nn.share_scope``) and runs it under ``nn.intercept_methods``. A matched
layer's ``__call__`` is replaced, in that layer's own scope (so it reads and
creates that layer's variables):

* ``nn.Dense`` -> the equivalent `QuantDense` (same fields, the rule's
  LayerQuant), bound to the Dense's scope; ``nn.Einsum`` -> `QuantEinsum`
  likewise (explicit two-operand equations without ``...``);
* ``nn.Conv`` -> the equivalent `QuantConv`, likewise; paddings other than
  ``'SAME'``, ``'VALID'``, ints and ``(lo, hi)`` pairs are refused;
* ``nn.DenseGeneral`` -> a clone of the layer, bound to the same scope, whose
  ``dot_general`` is a `QuantDotGeneral`: the layer's own code creates and
  shapes its parameters, promotes dtypes and adds the bias; only the
  contraction is quantized. Kernel scales are per output feature (all
  non-contracting kernel axes) for ``per_channel``; ``per_group`` splits the
  last contracting axis; ``per_group`` does not run with integer execution.
  (Flax 0.12 marks ``DenseGeneral.dot_general`` as deprecated; should it go,
  this case needs its own parameter code.)

Not quantizable: ``nn.ConvTranspose``, ``nn.ConvLocal``, ``nn.Embed``, norms, and any custom
layer. A non-float rule matching such a module, when the module owns
variables, leaves it float and warns (one warning per rule and call,
listing the modules; a float rule for them first silences it). A non-float
rule matching a subclass of a supported layer that overrides ``__call__``,
or a supported layer with a setting the quantized computation cannot
mirror (``mask``, a custom ``dot_general`` / ``conv_general_dilated`` /
``promote_dtype``, circular padding), raises. Rules matching only
containers select nothing. The attention products inside
``nn.MultiHeadDotProductAttention`` (query x key, weights x value) stay
float; its ``query`` / ``key`` / ``value`` / ``out`` projections are
``DenseGeneral`` layers and are quantized.

Report. `QuantizedModel.report` traces the model once (abstractly) and lists
every supported layer with the rule that configured it, the unused rules
and the unquantizable matches. A call that quantizes nothing although the
rules ask for it warns and says why (no supported layer was called, e.g. an
NNX model run through ``nnx.bridge``; or no rule matches the layer paths,
which it lists); otherwise each rule that configures no layer (nor keeps an
unquantizable module float) warns, naming the paths it could have matched.

Paths inside lifted transforms (``nn.scan`` in ``nn.RNN``, ...) are the
variables' paths too: submodules of the wrapped model bound before the
wrapper shared its scope are re-scoped to their place in the tree.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from aqt_ext.config import LayerQuant, ModelQuant
from aqt_ext.rules_report import (LayerMatch, Rules, as_model_quant, Record, RulesReport, is_float,
                                  refuse_unmirrored, supported_base)
from aqt_ext.core import contract
from aqt_ext.linen.layers import (LinenContext, QuantConv, QuantDense,
                                  QuantEinsum)


# Supported layer types and the fields whose non-default values the quantized
# computation cannot mirror.
SUPPORTED: dict[type, tuple[str, ...]] = {
    nn.Dense: ("promote_dtype", "dot_general", "dot_general_cls"),
    nn.DenseGeneral: ("promote_dtype", "dot_general", "dot_general_cls"),
    nn.Conv: ("mask", "promote_dtype", "conv_general_dilated",
              "conv_general_dilated_cls"),
    nn.Einsum: ("promote_dtype", "preferred_element_type"),
}
SUPPORTED_NAMES = tuple("nn." + b.__name__ for b in SUPPORTED)


# ---------------------------------------------------------------------------
# The quantized contraction of DenseGeneral.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class QuantDotGeneral:
  """A ``dot_general`` that quantizes both operands by `quant`.

  Injected into a clone of an ``nn.DenseGeneral``; quantizer state is
  created on `module`, the layer being called (same scope as the clone).
  """

  module: nn.Module
  quant: LayerQuant

  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers,
               precision: Any = None, preferred_element_type: Any = None
               ) -> jax.Array:
    return contract.dot_general(LinenContext(self.module), self.quant, lhs,
                                rhs, dimension_numbers, precision,
                                preferred_element_type)


# ---------------------------------------------------------------------------
# Replacing one layer's call.
# ---------------------------------------------------------------------------

def layer_type(mdl: nn.Module) -> tuple[type | None, bool]:
  """(the supported type `mdl` is or None, whether it overrides
  ``__call__``)."""
  return supported_base(mdl, SUPPORTED)


def _check_fields(mdl: nn.Module, base: type, path: str) -> None:
  """Refuses settings that the quantized computation does not mirror."""
  defaults = {f.name: f.default for f in dataclasses.fields(type(mdl))}
  refuse_unmirrored(path, f"nn.{base.__name__}", {
      n: (getattr(mdl, n), defaults[n]) for n in SUPPORTED[base]},
                    mdl.padding if base is nn.Conv else None)


def _equivalent(mdl: nn.Module, cls: type, lq: LayerQuant) -> nn.Module:
  """A `cls` (QuantDense / QuantConv) with `mdl`'s fields, bound to its
  scope."""
  kw = {f.name: getattr(mdl, f.name) for f in dataclasses.fields(cls)
        if f.init and f.name not in ("quant", "parent", "name")}
  return cls(**kw, quant=lq, parent=mdl.scope)


def quantized_call(mdl: nn.Module, base: type, lq: LayerQuant, path: str,
                   *args, **kwargs):
  """Runs layer `mdl` (a `base`) quantized by `lq`, in its own scope."""
  _check_fields(mdl, base, path)
  if base is nn.Dense:
    return _equivalent(mdl, QuantDense, lq)(*args, **kwargs)
  if base is nn.Conv:
    return _equivalent(mdl, QuantConv, lq)(*args, **kwargs)
  if base is nn.Einsum:
    return _equivalent(mdl, QuantEinsum, lq)(*args, **kwargs)
  clone = mdl.clone(parent=mdl.scope, dot_general=QuantDotGeneral(mdl, lq))
  return clone(*args, **kwargs)


def _owns_variables(mdl: nn.Module) -> bool:
  """Whether `mdl` holds variables itself (not only in submodules)."""
  return any(not isinstance(v, Mapping) for col in mdl.variables.values()
             for v in col.values())


# ---------------------------------------------------------------------------
# The interceptor and its record.
# ---------------------------------------------------------------------------

class _Rewriter:
  """Method interceptor replacing matched layers' ``__call__``."""

  def __init__(self, quant: ModelQuant, prefix: tuple[str, ...]):
    self.quant = quant
    self.prefix = tuple(prefix)
    self.record = Record(SUPPORTED_NAMES)

  def _relative_path(self, mdl: nn.Module) -> str | None:
    path = tuple(str(p) for p in mdl.scope.path)
    if path[:len(self.prefix)] != self.prefix:
      return None
    return "/".join(path[len(self.prefix):])

  def __call__(self, next_fun, args, kwargs, context):
    mdl = context.module
    if type(mdl).__module__.startswith("flax.nnx"):
      self.record.nnx.add(type(mdl).__name__)
    if (context.method_name != "__call__"
        or isinstance(mdl, (QuantDense, QuantConv, QuantEinsum))
        or isinstance(getattr(mdl, "dot_general", None), QuantDotGeneral)):
      return next_fun(*args, **kwargs)
    path = self._relative_path(mdl)
    if path is None:
      return next_fun(*args, **kwargs)
    rule, lq = self.quant.match(path)
    base, custom = layer_type(mdl)
    asked = rule is not None and not is_float(lq)
    if base is None or custom:
      if custom and asked:
        raise TypeError(
            f"quantize_model: rule {rule} ({self.quant.rules[rule][0]!r}) "
            f"matches {path!r}, a {type(mdl).__name__} (subclass of "
            f"nn.{base.__name__}) with its own __call__, which cannot be "
            "quantized faithfully; narrow the regex or put a float rule for "
            "it first")
      out = next_fun(*args, **kwargs)
      if _owns_variables(mdl):
        self.record.others[path] = type(mdl).__name__
      if rule is not None and path in self.record.others:
        if asked:
          self.record.not_quantizable[path] = (type(mdl).__name__, rule)
        else:  # a float rule keeping an unquantizable module float
          self.record.other_matches.add(rule)
      return out
    pattern = None if rule is None else self.quant.rules[rule][0]
    self.record.layers[path] = LayerMatch(base.__name__, rule, pattern, lq)
    if is_float(lq):
      return next_fun(*args, **kwargs)
    return quantized_call(mdl, base, lq, path, *args, **kwargs)


# ---------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------

def _repath_children(mdl: nn.Module, old_scope) -> None:
  """Gives the submodules of `mdl` already bound under `old_scope` (its
  dataclass-field submodules, bound before ``nn.share_scope`` moved `mdl`)
  scopes whose path is their place in the variable tree.

  ``nn.share_scope`` re-parents them but keeps their old path, which lifted
  transforms (``nn.scan`` in ``nn.RNN``) use as the module path: the rules
  would see ``'module/cell/ii'`` for the variables at ``'cell/ii'``.
  """
  for child in mdl._state.children.values():  # pylint: disable=protected-access
    scope = getattr(child, "scope", None)
    if (not isinstance(child, nn.Module) or scope is None
        or scope.parent is not old_scope or not isinstance(scope.name, str)):
      continue
    if scope.path != mdl.scope.path + (scope.name,):
      object.__setattr__(child, "scope", mdl.scope.push(scope.name,
                                                        reuse=True))
      _repath_children(child, scope)


class QuantizedModel(nn.Module):
  """`module` with the layers its `quant` rules match quantized.

  Call it as the original (same arguments, same variable tree); see the
  module docstring.

  Attributes:
    module: the float model (any linen Module).
    quant: the rules, as a `ModelQuant`.
  """

  module: nn.Module
  quant: ModelQuant

  def setup(self):
    nn.share_scope(self, self.module)
    _repath_children(self.module, self.module.scope)

  def __call__(self, *args, **kwargs):
    rewriter = _Rewriter(self.quant, self.scope.path)
    with nn.intercept_methods(rewriter):
      out = self.module(*args, **kwargs)
    rewriter.record.warn(self.quant)
    return out

  def report(self, variables: Mapping[str, Any] | None, *args, **kwargs
             ) -> RulesReport:
    """Traces the model once (abstractly) and reports what the rules did.

    `variables` may be a float checkpoint or None (missing variables are
    created abstractly); `args` / `kwargs` are example call arguments.
    """
    rewriter = _Rewriter(self.quant, ())
    fn = functools.partial(self.module.apply, mutable=True,
                           rngs={"params": jax.random.PRNGKey(0)}, **kwargs)
    with nn.intercept_methods(rewriter):
      jax.eval_shape(fn, dict(variables or {}), *args)
    return rewriter.record.report(self.quant)

  def unused_rules(self, variables: Mapping[str, Any] | None, *args,
                   **kwargs) -> tuple[str, ...]:
    """The regexes that select no supported layer (see `report`)."""
    return self.report(variables, *args, **kwargs).unused


def quantize_model(module: nn.Module, rules: Rules) -> QuantizedModel:
  """Wraps `module` so that the layers `rules` match run quantized.

  Args:
    module: an unbound linen Module built from ``nn.Dense``,
      ``nn.DenseGeneral``, ``nn.Conv`` and anything else.
    rules: a sequence of ``(regex, LayerQuant)`` (first match wins, unmatched
      layers stay float) or a `ModelQuant` (its default applies to unmatched
      layers).

  Returns:
    A `QuantizedModel`: ``init`` / ``apply`` as the original's.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"quantize_model module must be a flax.linen Module, got "
                    f"{type(module).__name__}")
  return QuantizedModel(module=module, quant=as_model_quant(rules))


__all__ = ["QuantizedModel", "QuantDotGeneral", "RulesReport", "LayerMatch",
           "SUPPORTED", "as_model_quant", "is_float", "layer_type",
           "quantize_model"]
