"""Compute and memory cost of a Flax model, traced from the model itself.

`model_cost` runs ``model.init`` under `jax.eval_shape` (no compute) with a
batch of one and intercepts every call of a `QuantConv`, `QuantDense`,
`nn.Conv`, `nn.Dense` or `nn.DenseGeneral` (subclasses included), recording
its path, shapes, feature groups and resolved bit widths. Plain `nn.Conv` /
`nn.Dense` / `nn.DenseGeneral` count as 16 bits on both sides (bf16), like an
unquantized side of a quantized layer; a `quantize_model` wrapper's layers
count with the bits of their rule. A counted layer whose call runs another
counted layer at the same path (`quantize_model` runs a matched ``nn.Dense``
as a `QuantDense` in its scope) counts once, as that inner layer, which is
the contraction that runs.

Per layer (AQT's cost model, design §8):

* MACs, without batch: every output element costs the product of the kernel
  shape but its last (output-feature) axis, i.e. ``out_h*out_w*kh*kw*cin*cout
  / groups`` for a conv and ``cin*cout`` for a dense layer, times any extra
  non-batch leading dims of the dense input; for ``nn.DenseGeneral``, the
  product of the kernel's contracting axes.
* BOPs = MACs * weight_bits * input_bits * bops_multiplier. The multiplier
  (1 by default) is a hook for expansions that run several products per layer
  (REx order K costs K times); it does not scale memory.
* Weights: kernel entries; memory = weights * weight_bits. Biases, BatchNorm,
  pooling and additions cost nothing.

A module called more than once counts its MACs at every call and its weights
once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aqt_ext.linen.layers import QuantConv, QuantDense
from aqt_ext.linen.rules import QuantDotGeneral

UNQUANTIZED_BITS = 16
_COUNTED = (QuantConv, QuantDense, nn.Conv, nn.Dense, nn.DenseGeneral)
_CONVS = (QuantConv, nn.Conv)


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One call of a conv or dense layer.

  Attributes:
    path: module path, ``'/'``-joined (as `ModelQuant` rules see it).
    kind: ``conv`` or ``dense``.
    input_shape, kernel_shape, output_shape: as traced, with a batch of one.
    feature_group_count: conv feature groups (1 for dense).
    weight_bits, input_bits: resolved widths; 16 for an unquantized side.
    bops_multiplier: factor on the BOPs (see the module docstring).
    contracting: the kernel axes each output element sums over; None for
      all but the last.
  """

  path: str
  kind: str
  input_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  feature_group_count: int
  weight_bits: int
  input_bits: int
  bops_multiplier: float = 1.0
  contracting: tuple[int, ...] | None = None

  @property
  def macs(self) -> int:
    summed = (self.kernel_shape[:-1] if self.contracting is None else
              [self.kernel_shape[a] for a in self.contracting])
    return math.prod(self.output_shape) * math.prod(summed)

  @property
  def bops(self) -> float:
    return (self.macs * self.weight_bits * self.input_bits
            * self.bops_multiplier)

  @property
  def weights(self) -> int:
    return math.prod(self.kernel_shape)

  @property
  def memory_bits(self) -> int:
    """Weight memory in bits."""
    return self.weights * self.weight_bits


@dataclasses.dataclass(frozen=True)
class ModelCost:
  """Per-layer costs and their totals.

  Totals: `macs`, `bops`, `weights` (kernel entries) and `weight_bits`
  (weight memory in bits, i.e. the sum of weights * per-layer weight bits).
  """

  layers: tuple[LayerCost, ...]

  @property
  def macs(self) -> int:
    return sum(l.macs for l in self.layers)

  @property
  def bops(self) -> float:
    return sum(l.bops for l in self.layers)

  @property
  def weights(self) -> int:
    return sum(l.weights for l in self._unique_layers())

  @property
  def weight_bits(self) -> int:
    return sum(l.memory_bits for l in self._unique_layers())

  def _unique_layers(self) -> list[LayerCost]:
    """One call per module (a reused module stores its weights once)."""
    return list({l.path: l for l in self.layers}.values())

  def as_dict(self) -> dict[str, float]:
    return {"macs": self.macs, "bops": self.bops,
            "weight_bits": self.weight_bits, "weights": self.weights}


def _check_multipliers(multipliers: Mapping[str, float]):
  for pattern, m in multipliers.items():
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"multipliers key {pattern!r} is not a valid regular "
                       f"expression: {e}") from None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0:
      raise ValueError(f"multipliers[{pattern!r}]={m!r} is out of range; "
                       "allowed: a number in [0, inf)")


def _multiplier(path: str, multipliers: Mapping[str, float]) -> float:
  """The value of the first regex that ``re.search``-es `path`, else 1."""
  for pattern, m in multipliers.items():
    if re.search(pattern, path):
      return float(m)
  return 1.0


def _bits(module: nn.Module) -> tuple[int, int]:
  if isinstance(module, (QuantConv, QuantDense)):
    lq = module.layer_quant()
    return lq.weight_bits, lq.input_bits
  dot_general = getattr(module, "dot_general", None)
  if isinstance(dot_general, QuantDotGeneral):  # quantize_model's DenseGeneral
    return dot_general.quant.weight_bits, dot_general.quant.input_bits
  return UNQUANTIZED_BITS, UNQUANTIZED_BITS


def _contracting(module: nn.Module) -> tuple[int, ...] | None:
  """Contracting kernel axes of an ``nn.DenseGeneral`` (its kernel is
  batch dims, contracting dims, features); None for the other layers."""
  if not isinstance(module, nn.DenseGeneral):
    return None
  n_batch = len(_as_tuple(module.batch_dims))
  return tuple(range(n_batch, n_batch + len(_as_tuple(module.axis))))


def _as_tuple(v) -> tuple:
  return tuple(v) if isinstance(v, Sequence) else (v,)


def _recorder(records: list[LayerCost], multipliers: Mapping[str, float]
              ) -> Callable:
  """A method interceptor that appends a LayerCost per counted layer call."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _COUNTED):
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.scope.path)
    start = len(records)
    out = next_fun(*args, **kwargs)
    if any(r.path == path for r in records[start:]):
      return out  # a wrapper of the layer just counted, in the same scope
    kernel = nn.unbox(module.get_variable("params", "kernel"))
    conv = isinstance(module, _CONVS)
    weight_bits, input_bits = _bits(module)
    records.append(LayerCost(
        path=path, kind="conv" if conv else "dense",
        input_shape=tuple(jnp.shape(args[0] if args else kwargs["inputs"])),
        kernel_shape=tuple(jnp.shape(kernel)),
        output_shape=tuple(jnp.shape(out)),
        feature_group_count=module.feature_group_count if conv else 1,
        weight_bits=weight_bits, input_bits=input_bits,
        bops_multiplier=_multiplier(path, multipliers),
        contracting=_contracting(module)))
    return out

  return intercept


def model_cost(model: nn.Module, input_shape: Sequence[int], *,
               multipliers: Mapping[str, float] | None = None,
               input_dtype: Any = jnp.float32, **call_kwargs) -> ModelCost:
  """Cost of `model` on one input of shape `input_shape` (no batch axis).

  Args:
    model: an unbound Flax module.
    input_shape: shape of one example, e.g. ``(224, 224, 3)``.
    multipliers: ``{path regex: BOPs multiplier}``; the first regex that
      ``re.search``-es a layer's path sets its `bops_multiplier`, else 1.
    input_dtype: dtype of the traced input.
    **call_kwargs: passed to ``model.init`` (e.g. ``train=False``).
  """
  if (not isinstance(input_shape, Sequence) or not input_shape or
      not all(isinstance(d, int) and d > 0 for d in input_shape)):
    raise ValueError(f"input_shape={input_shape!r} is not allowed; allowed: "
                     "a non-empty sequence of positive ints")
  multipliers = dict(multipliers or {})
  _check_multipliers(multipliers)
  records: list[LayerCost] = []
  x = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
  init = functools.partial(model.init, **call_kwargs)
  with nn.intercept_methods(_recorder(records, multipliers)):
    jax.eval_shape(init, jax.random.key(0), x)
  return ModelCost(tuple(records))


def format_table(cost: ModelCost) -> str:
  """A readable per-layer table with a total row."""
  header = ("layer", "kind", "input", "kernel", "output", "groups", "W/A",
            "MACs", "BOPs", "weights", "mem bits")

  def shape(s):
    return "x".join(map(str, s))

  rows = [(l.path, l.kind, shape(l.input_shape), shape(l.kernel_shape),
           shape(l.output_shape), str(l.feature_group_count),
           f"{l.weight_bits}/{l.input_bits}"
           + (f" x{l.bops_multiplier:g}" if l.bops_multiplier != 1 else ""),
           f"{l.macs:,}", f"{l.bops:,.0f}", f"{l.weights:,}",
           f"{l.memory_bits:,}") for l in cost.layers]
  rows.append(("total", "", "", "", "", "", "", f"{cost.macs:,}",
               f"{cost.bops:,.0f}", f"{cost.weights:,}",
               f"{cost.weight_bits:,}"))
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  numeric = range(5, len(header))

  def fmt(row):
    return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()

  rule = "-" * len(fmt(header))
  return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule,
                    fmt(rows[-1])])
