"""Quantize an existing NNX model by regex rules on module paths.

``quantize_model(model, rules)`` replaces, in place, each ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Einsum`` of `model` that a
rule quantizes by its quantized twin (`aqt_ext.nnx.layers`), which holds the
very same ``kernel`` / ``bias`` Variables: the state keeps its paths, a float
checkpoint still loads, and an optimizer built on the float parameters keeps
them. The rules are those of linen's `aqt_ext.linen.quantize_model`: a
`ModelQuant` or a sequence of ``(regex, LayerQuant)``, each regex
``re.search``-ed against the module path (``'/'``-joined attribute names and
list indices, e.g. ``'layers/0'``, ``'encoder/attn/query'``), first match
wins, an unmatched layer gets the default (float for a plain sequence) and a
layer whose LayerQuant is entirely float stays the float layer.

A non-float rule matching a module that owns variables but cannot be
quantized (``nnx.Embed``, norms, custom layers) leaves it float and warns;
matching a subclass of a supported layer that overrides ``__call__``, or a
supported layer with a setting the quantized layer cannot mirror (a custom
``dot_general`` / ``conv_general_dilated`` / ``einsum_op`` /
``promote_dtype``, a ``mask``, ``'CIRCULAR'`` padding, ...), raises. Rules
that configure no layer warn, as in linen. The returned `RulesReport` lists
what each layer got.
"""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

from flax import nnx

from aqt_ext.config import LayerQuant, ModelQuant
from aqt_ext.nnx.layers import QUANT_LAYERS, QuantAct, QuantLayer, set_paths
from aqt_ext.rules_report import (LayerMatch, Rules, as_model_quant, Record, RulesReport, is_float,
                                  refuse_unmirrored, supported_base)


# Settings whose non-default values the quantized layer cannot mirror.
UNMIRRORED: dict[type, tuple[str, ...]] = {
    nnx.Linear: ("dot_general", "promote_dtype"),
    nnx.LinearGeneral: ("dot_general", "dot_general_cls", "promote_dtype"),
    nnx.Conv: ("conv_general_dilated", "promote_dtype", "mask",
               "preferred_element_type"),
    nnx.Einsum: ("einsum_op", "promote_dtype", "preferred_element_type"),
}
SUPPORTED_NAMES = tuple("nnx." + b.__name__ for b in QUANT_LAYERS)


def _check_mirrored(mdl: nnx.Module, base: type, path: str) -> None:
  defaults = {n: p.default for n, p in inspect.signature(
      base.__init__).parameters.items()}
  refuse_unmirrored(path, f"nnx.{base.__name__}", {
      n: (getattr(mdl, n, None), defaults.get(n)) for n in UNMIRRORED[base]},
                    mdl.padding if base is nnx.Conv else None)


def _owns_variables(mdl: nnx.Module) -> bool:
  return any(isinstance(v, nnx.Variable) for v in vars(mdl).values())


def _quantized_twin(mdl: nnx.Module, base: type, lq: LayerQuant
                    ) -> nnx.Module:
  """The quantized layer holding `mdl`'s own Variables and settings."""
  cls = QUANT_LAYERS[base]
  twin = cls.__new__(cls)
  # The same attributes (so the same Variables); NNX's own bookkeeping
  # copied, so that the twin's new attributes are its own.
  vars(twin).update({k: copy.copy(v) if k.startswith("_pytree__") else v
                     for k, v in vars(mdl).items()})
  twin._init_quant(lq)  # pylint: disable=protected-access
  return twin


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  key = path[-1]
  if isinstance(key, int) or isinstance(parent, (nnx.List, nnx.Dict, list,
                                                 dict)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def quantize_model(model: nnx.Module, rules: Rules) -> RulesReport:
  """Quantizes, in place, the layers of `model` that `rules` match.

  Args:
    model: an NNX Module built from ``nnx.Linear``, ``nnx.LinearGeneral``,
      ``nnx.Conv``, ``nnx.Einsum`` and anything else.
    rules: a sequence of ``(regex, LayerQuant)`` (first match wins, unmatched
      layers stay float) or a `ModelQuant` (its default applies to unmatched
      layers).

  Returns:
    A `RulesReport`: every supported layer with the rule that configured it,
    the unused rules and the unquantizable matches.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"aqt_ext.nnx.quantize_model model must be an nnx.Module, "
                    f"got {type(model).__name__}")
  quant = as_model_quant(rules)
  record = Record(SUPPORTED_NAMES, found="is a submodule of the model",
                  others_found="its submodules with variables")
  todo = []
  for key, mdl in list(nnx.iter_modules(model)):
    path = "/".join(str(k) for k in key)
    if not key:
      continue  # the model itself
    rule, lq = quant.match(path)
    asked = rule is not None and not is_float(lq)
    if isinstance(mdl, QuantAct):  # an activation quantizer: a rule names it
      if rule is not None:
        mdl.quant = quant.for_activation(path)
        record.layers[path] = LayerMatch("QuantAct", rule,
                                         quant.rules[rule][0],
                                         LayerQuant(input=mdl.quant))
      continue
    if isinstance(mdl, QuantLayer):
      record.layers[path] = LayerMatch(type(mdl).__name__, rule, None
                                       if rule is None else quant.rules[rule][0],
                                       mdl.layer_quant())
      continue
    base, custom = supported_base(mdl, QUANT_LAYERS)
    if base is None or custom:
      if custom and asked:
        raise TypeError(
            f"quantize_model: rule {rule} ({quant.rules[rule][0]!r}) matches "
            f"{path!r}, a {type(mdl).__name__} (subclass of "
            f"nnx.{base.__name__}) with its own __call__, which cannot be "
            "quantized faithfully; narrow the regex or put a float rule for "
            "it first")
      if _owns_variables(mdl):
        record.others[path] = type(mdl).__name__
        if rule is not None:
          if asked:
            record.not_quantizable[path] = (type(mdl).__name__, rule)
          else:
            record.other_matches.add(rule)
      continue
    pattern = None if rule is None else quant.rules[rule][0]
    record.layers[path] = LayerMatch(base.__name__, rule, pattern, lq)
    if not is_float(lq):
      _check_mirrored(mdl, base, path)
      todo.append((key, mdl, base, lq))
  for key, mdl, base, lq in todo:
    _replace(model, key, _quantized_twin(mdl, base, lq))
  set_paths(model)
  record.warn(quant)
  return record.report(quant)
