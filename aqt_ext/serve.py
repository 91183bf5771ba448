"""Serving export: integer kernels on disk, integer-only inference.

`export` turns a QAT-trained model (built from `QuantDense` / `QuantConv`, or
a `aqt_ext.linen.quantize_model` wrapper) into a serving checkpoint; `load`
reads it back, checking it against the model, into a `ServedModel` whose
integer layers take the stored integer kernels straight into
``lax.dot_general`` / ``lax.conv_general_dilated`` with int32 accumulation
and apply the scales to the int32 output (``LayerQuant.execution='int'``
numerics); no float kernel of an integer layer exists at any point. Modules
the rules leave float run their own code on their stored float params.

Usage::

  serve.export(model, variables, x, DIR, call_kwargs={'train': False})
  served = serve.load(DIR, model, x, call_kwargs={'train': False})
  logits = served(x)

Several positional inputs: pass them as a tuple, ``export(model, v, (a, b),
DIR)`` and ``served(a, b)``. Array keyword arguments (``z_rng=key``) and the
keys of ``make_rng`` streams (``rngs={'noise': key}``) go to `export`,
`load` and each call as to ``model.apply``. Params boxed by
``nn.with_logical_partitioning`` are unboxed. Layers inside lifted
transforms (``nn.scan``, ``nn.RNN``, ``nn.vmap``, ``nn.remat``) are served:
while the model runs, a layer's serving arrays sit among its own params
(`PARAM_PREFIX`), so they are broadcast or sliced as its params are.

Layers. An integer layer is a QuantDense, QuantConv, QuantEinsum (also from
``nn.Einsum`` by rules) or quantized DenseGeneral whose LayerQuant quantizes both sides by 'uniform', 'lsq',
'pact' or DQ (`check_servable` names what else is refused, e.g. weight-only
quantization). A layer with an entirely float LayerQuant, and every module
`aqt_ext.linen.rules` cannot quantize (``nn.ConvTranspose``,
``nn.ConvLocal``, ``nn.Embed``, norms, custom layers), is a float layer: its
params are stored as they are.

Layout, version 3 (`LAYOUT_VERSION`; versions 1 and 2 still load: version 1
has no lookup-table layers, version 2 no float layers). A directory holding

* ``serving.json``: ``{"layout_version": 3, "format": FORMAT, "layers":
  {path: ...}, "float_layers": {path: ...}, "sizes": {...}}``, path = the
  module's variable path, ``'/'``-joined. Per integer layer (``layers``):
  ``module`` (``QuantDense`` | ``QuantConv`` | ``DenseGeneral``),
  ``kernel_shape`` (the float parameter's shape in one call of the layer),
  ``int_shape`` (the integer kernel's shape: ``kernel_shape``, or for
  ``per_group`` weights the feature axis split into (groups, group_size)),
  ``bits``, ``storage_bits``, ``weight`` (``int``: integer kernel and scale;
  ``lut``: DQ levels, below), ``input`` (``dynamic``: range of each batch at
  run time; ``stored``: a trained scale) and ``quant`` (the LayerQuant's
  fields). Per quantized activation (``activations``, a `QuantAct` whose
  TensorQuant is not float): ``input`` (``stored`` / ``dynamic``, as a
  layer's) and ``quant`` (the TensorQuant's fields); it runs as
  ``dequantize(to_int(x))`` with the ``input_scale`` (and
  ``input_zero_point``) stored under its path in ``serving``, or its own
  code where the scale is dynamic. Per float layer (``float_layers``, modules owning params that are
  not integer layers, BatchNorm and LayerNorm included): ``module`` (its type
  name, null where unknown) and ``params`` (the names of its params, stored
  as trained). Written last: a directory without it is incomplete.
* ``arrays/``: an orbax ``StandardCheckpointer`` tree, itself a flax
  variable dict:

  - ``params``: the trained params minus, in every integer layer,
    ``kernel`` and the quantizer parameters (``kernel_lsq_step``,
    ``input_lsq_step``, ``input_pact_alpha``, ``kernel_dq_levels``,
    ``input_dq_alpha``): biases, float layers' params and any other
    parameter as they are;
  - ``batch_stats``: as trained (if the model has any);
  - ``serving``: per integer layer, nested by module path:
    ``kernel``: the integer kernel. 5-8 bits: int8 of shape ``int_shape``.
    2-4 bits: uint8, flat: the ``int_shape`` values in row-major order,
    each as two's complement in ``storage_bits`` (2 for 2 bits, 4 for 3 and
    4 bits), ``8 // storage_bits`` to a byte, the first value in the lowest
    bits, the last byte zero-padded (see `pack_ints`).
    A DQ layer (``weight: 'lut'``) stores in ``kernel`` its b-bit level
    indices minus 2^(b-1) (so signed, packed the same way) and in
    ``kernel_levels`` the level table, ``(L,)`` or ``(out_features, L)``,
    L = 2^b; it runs the float op on the integer input and the kernel of
    table values, times the input scale. A table that is a centred uniform
    grid (``table[k] = d (k - 2^(b-1))``, to 1e-3 of d) is stored as a
    plain integer layer instead: those integers, ``kernel_scale`` d.
    ``kernel_scale``: the weight scale (the LSQ step for LSQ weights) in
    the integer kernel's layout with size 1 on the contracting axes: per
    output channel, per group, or a single one.
    ``input_scale`` (and ``input_zero_point`` for the ``asymmetric`` grid):
    where the input scale is not dynamic, the trained one: the static
    range's scale, the LSQ step, the PACT step ``alpha / (2^b - 1)``, or
    a DQ input's clip over its grid bound.
    Scales are float32 (bfloat16 where the layer computes in bfloat16:
    the dtype integer execution uses).
    A layer whose params a lifted transform stacks (``nn.scan`` over layers
    with ``variable_axes={'params': 0}``) has every serving array stacked
    the same way: leading axes, then the per-call layout above (a packed
    kernel packed per call: ``lead + (packed size,)``).

  Static ranges (``quant_stats``) are folded into ``input_scale`` and not
  stored. An input becomes the integer operand ``q - z``, ``q = clip(
  round(x * (1/s)) + z, qmin, qmax)``, exactly as
  `aqt_ext.core.quantizers.to_int`; a layer's output is ``int32 accumulator *
  input_scale * kernel_scale`` (+ bias), as with ``execution='int'``.

Damaged files. A ``serving.json`` that is not valid JSON or lacks its
``layers``, and an ``arrays/`` tree orbax cannot read (e.g. truncated), raise
`ServingFormatError` (a ValueError) naming the file: export the model again.

Numerics. Each integer layer computes what the QAT model computes with
``execution='int'``: the same integers, exact int32 sums, the same float
scaling. Against the QAT model's fake-quant eval the outputs differ by float
rounding: the fake path sums dequantized products in float32, the served
path sums integers exactly and scales once; where a following layer
quantizes its input dynamically, a value on a rounding edge can land one
level apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant
from aqt_ext.core import int_ops
from aqt_ext.core import levels as lv
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import STATS
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.methods import REGISTRY
from aqt_ext.core.methods import quantize_activation, quantize_operand
from aqt_ext.linen.layers import (LinenContext, QuantAct, QuantConv,
                                  QuantDense, QuantEinsum, conv_geometry,
                                  resolve_quant)
from aqt_ext.linen.rules import QuantDotGeneral, is_float
from aqt_ext.train import silence_aborted_restore_echoes

LAYOUT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no lookup-table layers; 2: no float layers
FORMAT = "aqt_ext serving checkpoint"
METADATA_FILE = "serving.json"
ARRAYS_DIR = "arrays"
SERVE = "serving"  # the collection of integer kernels and scales
# While the model runs (export and serving), a layer's serving arrays live in
# its own ``params`` under this prefix, so that they follow the params through
# lifted transforms (nn.scan / nn.RNN / nn.vmap broadcast or slice them).
PARAM_PREFIX = SERVE + ":"
QUANTIZER_PARAMS = REGISTRY.learned_params()
QUANT_PARAM_RE = REGISTRY.learned_param_re()
UNIFORM_RTOL = 1e-3  # a DQ level table within this of a centred uniform grid
                     # is served as plain integers (see `_finish_dq_layers`)


class ServingFormatError(ValueError):
  """A serving checkpoint that cannot be read: damaged, truncated or not a
  serving checkpoint. The message names the file; export the model again."""


# ---------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------

def storage_bits(bits: int) -> int:
  """Bits one stored value occupies: 2 -> 2, 3 and 4 -> 4, 5..8 -> 8."""
  if not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"bits={bits!r} is not allowed; allowed: an int in "
                     "[2, 8]")
  return 2 if bits == 2 else 4 if bits <= 4 else 8


def packed_size(bits: int, shape) -> int:
  """Number of stored elements (bytes) of `shape` b-bit values."""
  n = math.prod(shape)
  return n if storage_bits(bits) == 8 else -(-n * storage_bits(bits) // 8)


def pack_ints(q: Any, bits: int) -> np.ndarray:
  """Signed b-bit integers -> storage (see the module docstring).

  5-8 bits: int8, same shape. 2-4 bits: uint8, flat, 8 // storage_bits
  values per byte. Raises if a value is outside [-2^(b-1), 2^(b-1) - 1].
  """
  q = np.asarray(q)
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  if q.size and (q.min() < lo or q.max() > hi):
    raise ValueError(f"pack_ints: values in [{q.min()}, {q.max()}] do not "
                     f"fit {bits} bits; allowed: [{lo}, {hi}]")
  sb = storage_bits(bits)
  if sb == 8:
    return q.astype(np.int8)
  per = 8 // sb
  flat = q.reshape(-1).astype(np.int32) & (2 ** sb - 1)
  flat = np.pad(flat, (0, -flat.size % per)).reshape(-1, per)
  return np.bitwise_or.reduce(flat << (np.arange(per) * sb), axis=1
                              ).astype(np.uint8)


def unpack_ints(packed: Any, bits: int, shape) -> jax.Array:
  """Storage -> int8 of `shape` (inverse of `pack_ints`; jit-safe)."""
  shape = tuple(shape)
  if packed.size != packed_size(bits, shape):
    raise ValueError(f"unpack_ints: {packed.size} stored elements do not hold "
                     f"{bits}-bit values of shape {shape} (expected "
                     f"{packed_size(bits, shape)})")
  sb = storage_bits(bits)
  if sb == 8:
    return jnp.asarray(packed, jnp.int8).reshape(shape)
  per = 8 // sb
  v = (jnp.asarray(packed, jnp.int32)[:, None] >> (jnp.arange(per) * sb)) & (
      2 ** sb - 1)
  v = jnp.where(v >= 2 ** (sb - 1), v - 2 ** sb, v)
  return v.reshape(-1)[:math.prod(shape)].reshape(shape).astype(jnp.int8)


# ---------------------------------------------------------------------------
# Layers: which are served, their configs and geometry.
# ---------------------------------------------------------------------------

class ServingView:
  """A quantized layer of another framework, seen as serving sees a linen
  layer: the attributes of its geometry (``dtype``, ``param_dtype``,
  ``use_bias``, ``features``; a conv's ``kernel_size``, ``strides``,
  ``padding``, ``input_dilation``, ``kernel_dilation``,
  ``feature_group_count``; a DenseGeneral's ``axis``, ``batch_dims``; an
  Einsum's ``shape``, ``einsum_str``), ``get_variable`` /
  ``has_variable`` / ``put_variable`` on ``'params'`` (its params and its
  serving arrays), and the methods below (`aqt_ext.nnx.serve` implements it
  for NNX)."""

  kind: str  # 'dense' | 'conv' | 'dense_general' | 'einsum'
  path: str

  def layer_quant(self) -> LayerQuant:
    raise NotImplementedError

  def quant_context(self):
    """The layer's `aqt_ext.core.context.QuantContext`."""
    raise NotImplementedError


def _context(mdl):
  return mdl.quant_context() if isinstance(mdl, ServingView) else (
      LinenContext(mdl))


def _quant_operand(mdl, name: str, x: jax.Array, tq: TensorQuant,
                   axes: qz.OperandAxes, *, is_weight: bool) -> Quantized:
  return quantize_operand(_context(mdl), name, x, tq, axes,
                          is_weight=is_weight, want_int=True)


def layer_kind(mdl: nn.Module) -> str | None:
  """``dense`` / ``conv`` / ``dense_general`` / ``einsum`` for a quantized
  layer."""
  if isinstance(mdl, ServingView):
    return mdl.kind
  if isinstance(mdl, QuantDense):
    return "dense"
  if isinstance(mdl, QuantConv):
    return "conv"
  if isinstance(mdl, QuantEinsum):
    return "einsum"
  if isinstance(mdl, nn.DenseGeneral) and isinstance(mdl.dot_general,
                                                     QuantDotGeneral):
    return "dense_general"
  return None


def _layer_quant(mdl: nn.Module, kind: str) -> LayerQuant:
  if isinstance(mdl, ServingView):
    return mdl.layer_quant()
  return mdl.dot_general.quant if kind == "dense_general" else resolve_quant(
      mdl)


def served_kind(mdl: nn.Module) -> str | None:
  """`layer_kind` of a layer served from integers: a quantized layer whose
  LayerQuant is not entirely float (such a layer runs its own float code and
  is stored as a float layer)."""
  kind = layer_kind(mdl)
  if kind is None or is_float(_layer_quant(mdl, kind)):
    return None
  return kind


def served_act(mdl: nn.Module) -> TensorQuant | None:
  """The TensorQuant of a quantized activation (`QuantAct`), else None."""
  if isinstance(mdl, QuantAct):
    tq = mdl.act_quant()
    return None if tq.method == "float" else tq
  return None


def act_qparams(mdl: nn.Module, tq: TensorQuant) -> qz.QParams | None:
  """A served `QuantAct`'s stored scale (and zero point), None where its
  scale is dynamic; refused where the checkpoint holds none."""
  if not _stored_input(tq):
    return None
  if _get(mdl, "input_scale") is None:
    raise ValueError(
        f"activation {_path(mdl)!r} is quantized in the model but the "
        "serving checkpoint holds no scale for it; load with the model and "
        "rules that were exported")
  qmin, qmax = qz.grid_range(tq.grid, tq.bits)
  return qz.QParams(_get(mdl, "input_scale"), _get(mdl, "input_zero_point"),
                    qmin, qmax)


def _path(mdl: nn.Module) -> str:
  """A module's path, ``'/'``-joined (``''`` for the top-level module)."""
  if isinstance(mdl, ServingView):
    return mdl.path
  return "/".join(str(p) for p in mdl.scope.path)


def join_path(*parts: str) -> str:
  """``'/'``-joins the non-empty parts (the top-level path is ``''``)."""
  return "/".join(p for p in parts if p)


def _put(mdl: nn.Module, name: str, value: jax.Array) -> None:
  """Stores a serving array of layer `mdl` (see `PARAM_PREFIX`)."""
  mdl.put_variable("params", PARAM_PREFIX + name, value)


def _get(mdl: nn.Module, name: str) -> jax.Array | None:
  """A serving array of layer `mdl`, None if it has none of that name."""
  if not mdl.has_variable("params", PARAM_PREFIX + name):
    return None
  return mdl.get_variable("params", PARAM_PREFIX + name)


def _stored_input(tq: TensorQuant) -> bool:
  """Whether the input scale is trained (stored) rather than dynamic."""
  return REGISTRY.get(tq.method).stored_input_scale(tq)


def _uniform_stand_in(tq: TensorQuant) -> TensorQuant:
  """The uniform TensorQuant whose integer checks a DQ side must pass."""
  m = REGISTRY.get(tq.method)
  if m.int_execution or not m.integer:
    return tq
  return TensorQuant("uniform", tq.bits, grid=tq.grid,
                     granularity=tq.granularity,
                     calibration="static" if tq.granularity == "per_tensor"
                     else "dynamic")


def check_servable(cfg: LayerQuant, kind: str, path: str) -> None:
  """Refuses a layer config that integer serving cannot run."""
  if (REGISTRY.get(cfg.weight.method).weight_export == "lut"
      and kind in ("dense_general", "einsum")):
    raise ValueError(f"layer {path!r}: {cfg.weight.method!r} weights (a "
                     "lookup table) are served in dense and conv layers; "
                     f"allowed weight methods in a {kind} layer: "
                     f"{', '.join(map(repr, REGISTRY.int_executable()))}")
  try:
    cfg.replace(weight=_uniform_stand_in(cfg.weight),
                input=_uniform_stand_in(cfg.input), execution="int")
  except ValueError as e:
    raise ValueError(f"layer {path!r} cannot be served with integer "
                     f"execution: {e}; or give the layer an entirely float "
                     "LayerQuant to serve it as a float layer") from None
  if kind != "dense":
    for name in ("weight", "input"):
      if getattr(cfg, name).granularity == "per_group":
        raise ValueError(
            f"layer {path!r}: LayerQuant.{name}.granularity='per_group' "
            f"cannot be served in a {kind} layer; allowed: 'per_tensor', "
            "'per_channel'")
  if cfg.input.rounding == "border":
    raise ValueError(
        f"layer {path!r}: LayerQuant.input.rounding='border' (AQuant) is not "
        f"in serving layout {LAYOUT_VERSION}; allowed: 'half_even', "
        "'half_away'")
  if _stored_input(cfg.input) and cfg.input.granularity != "per_tensor":
    raise ValueError(
        f"layer {path!r}: LayerQuant.input.granularity="
        f"{cfg.input.granularity!r} cannot be served with a trained input "
        f"scale (method={cfg.input.method!r}, calibration="
        f"{cfg.input.calibration!r}); allowed: 'per_tensor'")


def _as_tuple(v) -> tuple:
  """An int or a sequence as a tuple (flax's canonicalisation)."""
  return tuple(v) if isinstance(v, Iterable) else (v,)


def _dense_general_dims(mdl: nn.DenseGeneral, ndim: int):
  """DenseGeneral's (axis, batch_dims, dimension_numbers, features), as its
  own call normalises them."""
  axis = tuple(sorted(a % ndim for a in _as_tuple(mdl.axis)))
  batch = tuple(sorted(a % ndim for a in _as_tuple(mdl.batch_dims)))
  nb, na = len(batch), len(axis)
  dims = ((axis, tuple(range(nb, nb + na))), (batch, tuple(range(nb))))
  return axis, batch, dims, _as_tuple(mdl.features)


@dataclasses.dataclass(frozen=True)
class _Operands:
  """A layer's input (promoted, laid out for the op) and operand axes; for
  a conv also the input's batch shape and the lax arguments."""

  x: jax.Array
  kernel_shape: tuple[int, ...]
  x_axes: qz.OperandAxes
  w_axes: qz.OperandAxes
  batch_shape: tuple[int, ...] = ()
  conv: dict | None = None
  einsum: str | None = None


def _operands(mdl: nn.Module, kind: str, inputs: jax.Array,
              einsum_str: str | None = None) -> _Operands:
  """The layer's operands as its own call forms them (dtype promotion as
  ``promote_dtype``: the compute dtype, else that of input and params)."""
  dtype = mdl.dtype or jnp.result_type(inputs.dtype, mdl.param_dtype)
  if kind == "conv":
    x, batch_shape, kshape, conv = conv_geometry(mdl, inputs)
    nsp = len(kshape) - 2
    return _Operands(x.astype(dtype), kshape,
                     qz.OperandAxes(tuple(range(1, nsp + 2)), nsp + 1),
                     qz.OperandAxes(tuple(range(nsp + 1)), nsp),
                     batch_shape, conv)
  x = inputs.astype(dtype)
  if kind == "einsum":
    spec = nn.merge_param("einsum_str", mdl.einsum_str, einsum_str).replace(
        " ", "")
    kshape = tuple(mdl.shape)
    dims = int_ops.einsum_dims(spec, x.ndim, len(kshape)).dimension_numbers
    return _Operands(x, kshape, *int_ops.dot_general_axes(dims),
                     einsum=spec)
  if kind == "dense":
    n = x.ndim - 1
    return _Operands(x, (x.shape[-1], mdl.features), qz.OperandAxes((n,), n),
                     qz.OperandAxes((0,), 0))
  axis, batch, dims, features = _dense_general_dims(mdl, x.ndim)
  (lc, rc), _ = dims
  kshape = tuple(x.shape[a] for a in batch + axis) + features
  return _Operands(x, kshape, qz.OperandAxes(lc, lc[-1]),
                   qz.OperandAxes(rc, rc[-1]))


def _int_shape(shape: tuple[int, ...], tq: TensorQuant, feature: int
               ) -> tuple[int, ...]:
  """The integer kernel's shape: `shape`, feature axis split for groups."""
  if tq.granularity != "per_group":
    return shape
  g = tq.group_size
  return shape[:feature] + (shape[feature] // g, g) + shape[feature + 1:]


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------

class ExportRecorder:
  """Interceptor: quantizes each integer-served layer's kernel (and its
  input) as integer execution does, stores the integer kernel and the
  trained scales among the layer's params (`PARAM_PREFIX`), records the
  layer's metadata, and runs the layer with integer execution. Every other
  module runs its own code; its type is noted by path."""

  def __init__(self):
    self.layers: dict[str, dict] = {}  # path -> metadata
    self.acts: dict[str, dict] = {}  # path -> metadata, QuantAct
    self.modules: dict[str, str] = {}  # path -> type name, every module

  def __call__(self, next_fun, args, kwargs, context):
    mdl = context.module
    self.modules.setdefault(_path(mdl), type(mdl).__name__)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    tq = served_act(mdl)
    if tq is not None:
      return self.record_act(mdl, tq, next_fun, *args, **kwargs)
    kind = served_kind(mdl)
    if kind is None:
      return next_fun(*args, **kwargs)
    return self.record(mdl, kind, *args, **kwargs)

  def record_act(self, mdl, tq: TensorQuant, next_fun, x: jax.Array
                 ) -> jax.Array:
    """Records a quantized activation: its trained scale, where stored."""
    stored = _stored_input(tq)
    self.acts[_path(mdl)] = {"input": "stored" if stored else "dynamic",
                             "quant": dataclasses.asdict(tq)}
    if not stored:
      return next_fun(x)
    x_q = quantize_activation(_context(mdl), x, tq, want_int=True)
    _put(mdl, "input_scale", x_q.qp.scale)
    if x_q.qp.zero_point is not None:
      _put(mdl, "input_zero_point", x_q.qp.zero_point)
    return qz.dequantize(x_q.ints.astype(x.dtype),
                         dataclasses.replace(x_q.qp, zero_point=None))

  def record(self, mdl, kind: str, *args, **kwargs) -> jax.Array:
    """Records served layer `mdl` (a linen layer or a `ServingView`) and
    runs it with integer execution."""
    path = _path(mdl)
    cfg = _layer_quant(mdl, kind)
    check_servable(cfg, kind, path)
    ops = _operands(mdl, kind, *args, **kwargs)
    (kernel,) = promote_dtype(mdl.get_variable("params", "kernel"),
                              dtype=ops.x.dtype)
    x_q = _quant_operand(mdl, "input", ops.x, cfg.input, ops.x_axes,
                         is_weight=False)
    method = REGISTRY.get(cfg.weight.method)
    lut = method.weight_export == "lut"
    if lut:  # b-bit indices (stored minus 2^(b-1), signed) + level table
      levels, positions = (mdl.get_variable("params", n)
                           if mdl.has_variable("params", n) else None
                           for n in method.params("kernel"))
      idx, table = lv.export_indices(kernel, levels, positions)
      ints = idx.astype(jnp.int8) - jnp.int8(2 ** (cfg.weight.bits - 1))
      _put(mdl, "kernel", ints)
      _put(mdl, "kernel_levels", table)
      w_q = Quantized(lv.lut_kernel(ints, table, cfg.weight.bits))
    else:
      w_q = _quant_operand(mdl, "kernel", kernel, cfg.weight, ops.w_axes,
                           is_weight=True)
      _put(mdl, "kernel", w_q.ints)
      _put(mdl, "kernel_scale", w_q.qp.scale)
    stored = _stored_input(cfg.input)
    if stored:
      _put(mdl, "input_scale", x_q.qp.scale)
      if x_q.qp.zero_point is not None:
        _put(mdl, "input_zero_point", x_q.qp.zero_point)
    self.layers[path] = {
        "module": getattr(mdl, "type_name", type(mdl).__name__),
        "kernel_shape": list(kernel.shape),
        "int_shape": list(kernel.shape if lut else w_q.ints.shape),
        "weight": "lut" if lut else "int", "bits": cfg.weight.bits,
        "storage_bits": storage_bits(cfg.weight.bits),
        "input": "stored" if stored else "dynamic",
        "quant": dataclasses.asdict(cfg)}
    return _int_forward(mdl, kind, ops, x_q, w_q)


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """Where the serving checkpoint went and how big it is (bytes).

  Attributes:
    directory: the checkpoint directory.
    layers: number of integer layers.
    served_bytes: served weights: integer kernels, scales and the remaining
      params (float layers, BatchNorm, biases); batch_stats not counted.
    served_kernel_bytes: integer kernels and their scales.
    float_params_bytes: the float model's params (the trained params less
      the quantizer parameters).
    float_kernel_bytes: the float kernels of the integer layers.
    float_layers: number of modules whose params are stored as float (see
      ``float_layers`` in the module docstring).
  """

  directory: str
  layers: int
  served_bytes: int
  served_kernel_bytes: int
  float_params_bytes: int
  float_kernel_bytes: int
  float_layers: int = 0

  @property
  def ratio(self) -> float:
    return self.served_bytes / self.float_params_bytes

  @property
  def kernel_ratio(self) -> float:
    return self.served_kernel_bytes / self.float_kernel_bytes


def _nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _as_variables(state: Any) -> dict:
  """A variables dict from a dict or a `TrainState` (its ``variables()``),
  with metadata boxes (``nn.with_logical_partitioning``'s
  ``LogicallyPartitioned``, ``nn.Partitioned``) removed."""
  if isinstance(state, Mapping):
    return dict(nn.unbox(dict(state)))
  if callable(getattr(state, "variables", None)):
    return dict(nn.unbox(dict(state.variables())))
  raise TypeError("export state must be a variables dict or a TrainState, got "
                  f"{type(state).__name__}")


def flat_tree(tree: Mapping) -> dict[str, Any]:
  return {"/".join(k): v for k, v in
          flax.traverse_util.flatten_dict(dict(tree)).items()}


def unflat_tree(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in flat.items()})


def _check_calibrated(layers: Mapping[str, dict], variables: Mapping,
                      acts: Mapping[str, dict] | None = None) -> None:
  stats = flat_tree(variables.get(STATS, {}))
  inputs = {p: m["quant"]["input"] for p, m in layers.items()}
  inputs.update({p: m["quant"] for p, m in (acts or {}).items()})
  for path, tq in inputs.items():
    if tq["calibration"] == "static" and not np.all(
        np.asarray(stats.get(join_path(path, "input_count"), 0)) > 0):
      raise ValueError(
          f"layer {path!r}: the static input range was never calibrated "
          f"({STATS} input_count is 0); run the model with mutable="
          f"['{STATS}'] on calibration data before export")


def _lead_shape(ints: Any, meta: Mapping) -> tuple[int, ...]:
  """The leading axes a lifted transform stacked onto a layer's integer
  kernel (e.g. ``nn.scan`` over layers with ``variable_axes={'params': 0}``;
  ``()`` otherwise)."""
  shape, per = tuple(np.shape(ints)), tuple(meta["int_shape"])
  lead = shape[:len(shape) - len(per)]
  if shape[len(lead):] != per:
    raise ValueError(
        f"layer's integer kernel has shape {shape}, which does not end in its "
        f"per-call shape {per}: a lifted transform stacks its params on a "
        "non-leading axis; allowed: variable_axes {'params': 0}")
  return lead


def _finish_dq_layers(serve: dict, layers: Mapping[str, dict]) -> None:
  """A DQ layer whose level table is a centred uniform grid, ``table[k] =
  d (k - 2^(b-1))`` per group within `UNIFORM_RTOL` of d, becomes a plain
  integer layer (its stored indices minus 2^(b-1) are the integers, d the
  kernel scale); the others keep their table (``weight: 'lut'``)."""
  for path, meta in layers.items():
    if meta.get("weight") != "lut":
      continue
    table = np.asarray(serve[join_path(path, "kernel_levels")], np.float64)
    gaps = np.diff(table, axis=-1)
    d = np.mean(gaps, axis=-1, keepdims=True)
    centre = table[..., :1] + d * 2 ** (meta["bits"] - 1)
    if not (np.all(d > 0) and np.all(np.abs(gaps - d) <= UNIFORM_RTOL * d)
            and np.all(np.abs(centre) <= UNIFORM_RTOL * d)):
      continue
    del serve[join_path(path, "kernel_levels")]
    lead = _lead_shape(serve[join_path(path, "kernel")], meta)
    ndim = len(meta["int_shape"])
    serve[join_path(path, "kernel_scale")] = d.astype(np.float32).reshape(
        lead + (1,) * (ndim - 1) + (-1,))
    meta["weight"] = "int"


def _pack_kernel(ints: Any, meta: Mapping) -> np.ndarray:
  """`pack_ints` of one layer's integer kernel; a kernel stacked by a lifted
  transform is packed per layer, giving ``lead + (packed_size,)``."""
  ints = np.asarray(ints)
  lead = _lead_shape(ints, meta)
  if not lead or storage_bits(meta["bits"]) == 8:
    return pack_ints(ints, meta["bits"])
  rows = ints.reshape((-1, math.prod(meta["int_shape"])))
  return np.stack([pack_ints(r, meta["bits"]) for r in rows]).reshape(
      lead + (-1,))


def _take_serving(params: Mapping) -> dict[str, Any]:
  """The serving arrays (`PARAM_PREFIX` names) out of a params tree, flat
  (``'<layer path>/<name>'``)."""
  out = {}
  for k, v in flat_tree(params).items():
    parent, _, name = k.rpartition("/")
    if name.startswith(PARAM_PREFIX):
      out[join_path(parent, name[len(PARAM_PREFIX):])] = v
  return out


def _with_serving_params(tree: Mapping) -> dict:
  """A serving variable dict as the model runs it: every layer's serving
  arrays among its params (`PARAM_PREFIX`), no `SERVE` collection."""
  params = flat_tree(tree.get("params", {}))
  for k, v in flat_tree(tree.get(SERVE, {})).items():
    parent, _, name = k.rpartition("/")
    params[join_path(parent, PARAM_PREFIX + name)] = v
  out = {c: v for c, v in tree.items() if c not in ("params", SERVE)}
  out["params"] = unflat_tree(params)
  return out


def _float_layers(params: Iterable[str], layers: Mapping[str, dict],
                  modules: Mapping[str, str]) -> dict[str, dict]:
  """Modules whose params are stored as they are (not integer layers):
  path -> ``{'module': type name or None, 'params': [names]}``."""
  groups: dict[str, list[str]] = {}
  for k in params:
    parent, _, name = k.rpartition("/")
    if parent not in layers:
      groups.setdefault(parent, []).append(name)
  return {p: {"module": modules.get(p), "params": sorted(n)}
          for p, n in sorted(groups.items())}


def serving_tree(variables: Mapping, ints: Mapping, layers: Mapping[str, dict]
                 ) -> dict:
  """The serving variable dict from the trained variables and the recorded
  integer kernels and scales (packs the kernels). Params of modules that
  are not integer layers are kept as they are (float layers)."""
  drop = {join_path(p, n) for p in layers for n in ("kernel",) + QUANTIZER_PARAMS}
  params = {k: v for k, v in flat_tree(variables["params"]).items()
            if k not in drop}
  serve = flat_tree(ints)
  _finish_dq_layers(serve, layers)
  for path, meta in layers.items():
    serve[join_path(path, "kernel")] = _pack_kernel(serve[join_path(path, "kernel")],
                                                meta)
  tree = {"params": unflat_tree(params), SERVE: unflat_tree(serve)}
  if variables.get("batch_stats"):
    tree["batch_stats"] = variables["batch_stats"]
  return jax.tree.map(np.asarray, tree)


class _Traced:
  """Marks where an array stood among call arguments (see `split_arrays`)."""

  def __repr__(self):
    return "<array>"


_TRACED = _Traced()


def split_arrays(tree: Any, what: str) -> tuple[list, tuple]:
  """Call arguments -> (their arrays, a hashable rest).

  Array leaves (``jax.Array``, numpy arrays and scalars, PRNG keys) are
  traced; every other leaf (Python bools, ints, strings, ...) is static and
  must be hashable. `merge_arrays` inverts it.
  """
  leaves, treedef = jax.tree.flatten(tree)
  arrays, static = [], []
  for leaf in leaves:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      arrays.append(leaf)
      static.append(_TRACED)
      continue
    try:
      hash(leaf)
    except TypeError:
      raise TypeError(
          f"{what}: {leaf!r} ({type(leaf).__name__}) is neither an array nor "
          "hashable; allowed: arrays (traced) or hashable values (static)"
      ) from None
    static.append(leaf)
  return arrays, (treedef, tuple(static))


def merge_arrays(arrays: Sequence, static: tuple) -> Any:
  """Inverse of `split_arrays`."""
  treedef, leaves = static
  it = iter(arrays)
  return treedef.unflatten([next(it) if leaf is _TRACED else leaf
                            for leaf in leaves])


def example_args(example_input: Any) -> tuple:
  """A tuple is the positional arguments; anything else the only one."""
  return example_input if isinstance(example_input, tuple) else (
      example_input,)


def export(model: nn.Module, state: Any, example_input: Any, directory: str,
           *, call_kwargs: Mapping[str, Any] | None = None,
           rngs: Mapping[str, Any] | None = None) -> ExportResult:
  """Writes the serving checkpoint of a trained model to `directory`.

  Layers with an integer-executable LayerQuant are stored as integers;
  modules the rules leave float (an entirely float LayerQuant, or a module
  `aqt_ext.linen.rules` cannot quantize: ``nn.ConvTranspose``,
  ``nn.Embed``, norms, ...) keep their params as they are and run their own
  code when served.

  Args:
    model: the QAT model (QuantDense / QuantConv layers, or a
      `quantize_model` wrapper). A layer whose LayerQuant quantizes a side
      must be integer-executable (weight and input 'uniform', 'lsq', 'pact'
      or DQ; a static input range must have been calibrated).
    state: its trained variables, or a `aqt_ext.train.TrainState`; params
      boxed by ``nn.with_logical_partitioning`` are unboxed.
    example_input: an input batch, or a tuple of the positional arguments
      of the model's call (traces the model; wrap a single tuple-valued
      input as ``(inputs,)``).
    directory: a new directory (refused if it holds a checkpoint).
    call_kwargs: keyword arguments of the model's eval call, e.g.
      ``{'train': False}`` or ``{'z_rng': key}``.
    rngs: PRNG keys of the streams the model draws from with ``make_rng``
      (``model.apply``'s ``rngs``).

  Returns:
    An `ExportResult` with the sizes.
  """
  directory = new_export_directory(directory)
  variables, ints, recorder = record_export(model, state, example_input,
                                            call_kwargs=call_kwargs,
                                            rngs=rngs)
  return write_export(directory, variables, ints, recorder)


def record_export(model: nn.Module, state: Any, example_input: Any, *,
                  call_kwargs: Mapping[str, Any] | None = None,
                  rngs: Mapping[str, Any] | None = None
                  ) -> tuple[dict, dict, "ExportRecorder"]:
  """The in-memory part of `export` (arguments as there): the trained
  variables (unboxed), the recorded integer kernels and scales, and the
  recorder with the layers' metadata. `serving_tree` of the three is the
  serving variable dict `serving_apply` runs."""
  variables = _as_variables(state)
  dyn, static = split_arrays((example_args(example_input),
                              dict(call_kwargs or {})),
                             "export example arguments")
  recorder = ExportRecorder()

  def record(v, dyn, rngs):
    args, kw = merge_arrays(dyn, static)
    with nn.intercept_methods(recorder):
      _, extra = model.apply(v, *args, rngs=rngs, mutable=["params"], **kw)
    return _take_serving(extra["params"])

  ints = jax.device_get(jax.jit(record)(variables, dyn, rngs))
  return variables, ints, recorder


def new_export_directory(directory: str) -> str:
  """`directory` as an absolute path; refused if it holds a checkpoint."""
  directory = os.path.abspath(os.fspath(directory))
  for name in (METADATA_FILE, ARRAYS_DIR):
    if os.path.exists(os.path.join(directory, name)):
      raise FileExistsError(f"{os.path.join(directory, name)} exists; export "
                            "to a new directory")
  return directory


def write_export(directory: str, variables: Mapping, ints: Mapping,
                 recorder: "ExportRecorder") -> ExportResult:
  """Writes the serving checkpoint: the arrays (trained `variables` less
  the integer layers' float kernels and quantizer parameters, plus the
  recorded integer kernels and scales `ints`), then ``serving.json``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  layers = recorder.layers
  if not layers:
    raise ValueError("export: the model has no quantized layer to serve")
  _check_calibrated(layers, variables, recorder.acts)
  tree = serving_tree(variables, ints, layers)
  float_layers = _float_layers(flat_tree(tree["params"]), layers,
                               recorder.modules)

  params = {k: v for k, v in flat_tree(variables["params"]).items()
            if not QUANT_PARAM_RE.search(k)}
  result = ExportResult(
      directory=directory, layers=len(layers),
      served_bytes=_nbytes((tree["params"], tree[SERVE])),
      served_kernel_bytes=_nbytes(
          [v for k, v in flat_tree(tree[SERVE]).items()
           if k.rsplit("/", 1)[-1] in ("kernel", "kernel_scale")]),
      float_params_bytes=_nbytes(params),
      float_kernel_bytes=_nbytes([params[join_path(p, "kernel")]
                                  for p in layers]),
      float_layers=len(float_layers))
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, ARRAYS_DIR), tree)
  ckptr.wait_until_finished()
  metadata = {"layout_version": LAYOUT_VERSION, "format": FORMAT,
              "layers": layers, "activations": recorder.acts,
              "float_layers": float_layers,
              "sizes": {k: v for k, v in dataclasses.asdict(result).items()
                        if k.endswith("bytes")}}
  tmp = os.path.join(directory, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))
  return result


# ---------------------------------------------------------------------------
# Serving.
# ---------------------------------------------------------------------------

def _serve_kernel(mdl: nn.Module, tq: TensorQuant, ops: _Operands
                  ) -> Quantized:
  """The stored integer kernel (unpacked to int8) and its scale; for a DQ
  lookup-table layer, the kernel of table values."""
  shape = _int_shape(ops.kernel_shape, tq, ops.w_axes.feature)
  ints = unpack_ints(_get(mdl, "kernel"), tq.bits, shape)
  levels = _get(mdl, "kernel_levels")
  if levels is not None:
    return Quantized(lv.lut_kernel(ints, levels, tq.bits))
  qmin, qmax = qz.grid_range(tq.grid, tq.bits)
  qp = qz.QParams(_get(mdl, "kernel_scale"), None, qmin, qmax)
  return Quantized(None, ints, qp, tq.granularity == "per_group")


def _bias(mdl: nn.Module) -> jax.Array | None:
  return mdl.get_variable("params", "bias") if mdl.use_bias else None


def _lut_product(x_q: Quantized, w_q: Quantized, dtype, op) -> jax.Array:
  """A DQ lookup-table layer: `op` on the integer input (exact in float)
  and the kernel of table values (``w_q.fake``), times the input scale."""
  return op(x_q.ints.astype(dtype), w_q.fake.astype(dtype)) * (
      x_q.qp.scale.astype(dtype))


def _int_forward(mdl: nn.Module, kind: str, ops: _Operands, x_q: Quantized,
                 w_q: Quantized) -> jax.Array:
  """The layer's output from integer operands: the integer op, the scales,
  the bias, the layer's output layout."""
  dtype, bias = ops.x.dtype, _bias(mdl)
  if kind == "dense":
    y = (int_ops.int_dot_general(x_q, w_q, int_ops.dense_dims(ops.x.ndim),
                                 dtype) if w_q.ints is not None
         else _lut_product(x_q, w_q, dtype, lambda a, b: lax.dot_general(
             a, b, (((a.ndim - 1,), (0,)), ((), ())))))
    return y if bias is None else y + bias.astype(dtype).reshape(
        (1,) * (y.ndim - 1) + (-1,))
  if kind == "einsum":
    ed = int_ops.einsum_dims(ops.einsum, ops.x.ndim, len(ops.kernel_shape))
    y = jnp.transpose(int_ops.int_dot_general(x_q, w_q, ed.dimension_numbers,
                                              dtype), ed.perm)
    return y if bias is None else y + bias.astype(dtype).reshape(
        int_ops.einsum_bias_shape(ops.einsum, ops.kernel_shape)[1])
  if kind == "dense_general":
    axis, batch, dims, features = _dense_general_dims(mdl, ops.x.ndim)
    y = int_ops.int_dot_general(x_q, w_q, dims, dtype)
    if bias is None:
      return y
    expanded = tuple(ops.x.shape[a] if a in batch else 1
                     for a in range(ops.x.ndim) if a not in axis)
    return y + bias.astype(dtype).reshape(expanded + features)
  y = (int_ops.int_conv(x_q, w_q, ops.conv, dtype) if w_q.ints is not None
       else _lut_product(x_q, w_q, dtype, lambda a, b: lax.conv_general_dilated(
           a, b, **ops.conv)))
  if bias is not None:
    y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y.reshape(ops.batch_shape + y.shape[1:]) if ops.batch_shape != (
      y.shape[0],) else y


@dataclasses.dataclass(frozen=True)
class IntLayer:
  """One integer layer as it is served, read from the serving variables:
  the record an export target (`aqt_ext.export`) writes out.

  Attributes:
    path: the module path, ``'/'``-joined.
    kind: ``dense`` | ``conv`` | ``dense_general`` | ``einsum``.
    ops: the operands: ``ops.x`` the input as the op takes it, the kernel
      shape, the operand axes, a conv's ``lax.conv_general_dilated``
      arguments (``ops.conv``).
    input: the input's TensorQuant.
    input_qp: the stored input scale (and zero point) with the grid's
      integer range; None where the input is quantized per batch (dynamic).
    kernel: the integer kernel (``ints``, in the kernel's layout) and its
      scale (``qp``); for a DQ lookup-table layer ``fake`` holds the kernel
      of table values and ``ints`` is None.
    bias: the float bias, or None.
  """

  path: str
  kind: str
  ops: _Operands
  input: TensorQuant
  input_qp: qz.QParams | None
  kernel: Quantized
  bias: jax.Array | None


def int_layer(mdl: nn.Module, kind: str, inputs: jax.Array,
              *args) -> IntLayer:
  """The `IntLayer` record of served layer `mdl` called on `inputs`."""
  if _get(mdl, "kernel") is None:
    raise ValueError(
        f"layer {_path(mdl)!r} is quantized in the model but the serving "
        "checkpoint holds no integer kernel for it (a float layer, or not in "
        "the model that was exported); load with the model and rules that "
        "were exported")
  cfg = _layer_quant(mdl, kind)
  ops = _operands(mdl, kind, inputs, *args)
  qp = None
  if _stored_input(cfg.input):
    qmin, qmax = qz.grid_range(cfg.input.grid, cfg.input.bits)
    qp = qz.QParams(_get(mdl, "input_scale"), _get(mdl, "input_zero_point"),
                    qmin, qmax)
  return IntLayer(_path(mdl), kind, ops, cfg.input, qp,
                  _serve_kernel(mdl, cfg.weight, ops), _bias(mdl))


def serve_layer(mdl: nn.Module, kind: str, inputs: jax.Array,
                 *args) -> jax.Array:
  """One integer layer's forward from the serving variables: the input
  quantized by the stored scale (or per batch, as in training), the
  integer op, the scales, the bias."""
  rec = int_layer(mdl, kind, inputs, *args)
  x_q = (Quantized(None, qz.to_int(rec.ops.x, rec.input_qp,
                                   rec.input.rounding), rec.input_qp)
         if rec.input_qp is not None else
         _quant_operand(mdl, "input", rec.ops.x, rec.input, rec.ops.x_axes,
                        is_weight=False))
  return _int_forward(mdl, kind, rec.ops, x_q, rec.kernel)


def serve_act(mdl: nn.Module, tq: TensorQuant, x: jax.Array) -> jax.Array:
  """A quantized activation from its stored scale: the integers
  dequantized (its own code where the scale is dynamic)."""
  qp = act_qparams(mdl, tq)
  if qp is None:
    return None
  return qz.dequantize(qz.to_int(x, qp, tq.rounding).astype(x.dtype),
                       dataclasses.replace(qp, zero_point=None))


def _serve_interceptor(next_fun, args, kwargs, context):
  mdl = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  tq = served_act(mdl)
  if tq is not None:
    y = serve_act(mdl, tq, *args, **kwargs)
    return next_fun(*args, **kwargs) if y is None else y
  if isinstance(mdl, QuantAct) and _get(mdl, "input_scale") is not None:
    raise ValueError(
        f"activation {_path(mdl)!r} is float in the model but the serving "
        "checkpoint holds a scale for it; load with the model and rules that "
        "were exported")
  kind = served_kind(mdl)
  if kind is not None:
    return serve_layer(mdl, kind, *args, **kwargs)
  if layer_kind(mdl) is not None and _get(mdl, "kernel") is not None:
    raise ValueError(
        f"layer {_path(mdl)!r} is float in the model but the serving "
        "checkpoint holds it as an integer layer; load with the model and "
        "rules that were exported")
  return next_fun(*args, **kwargs)


def serving_apply(model: nn.Module, variables: Mapping, *args, **kwargs):
  """``model.apply`` on a serving variable dict (as stored: ``params``,
  `SERVE`, ``batch_stats``), every integer layer run from its stored
  integer kernel, every float layer by its own code (jit-able)."""
  with nn.intercept_methods(_serve_interceptor):
    return model.apply(_with_serving_params(variables), *args, **kwargs)


@dataclasses.dataclass
class ServedModel:
  """A loaded serving checkpoint: call it as the model's ``apply`` without
  the variables, ``served(x)``, ``served(a, b, train=False)``,
  ``served(x, z_rng=key, rngs={'noise': key})``.

  Array arguments (positional or keyword, also inside lists / dicts) are
  traced; any other argument (bools, ints, strings) is static, must be
  hashable and compiles one program per value. The compiled function is
  kept on the instance.

  Attributes:
    model: the model definition the checkpoint was checked against.
    variables: the serving variable dict (see the module docstring).
    metadata: the contents of ``serving.json``.
    call_kwargs: keyword arguments of every call, e.g. ``{'train': False}``
      (a call's own keyword arguments override them).
    rngs: PRNG keys for ``make_rng`` streams, used when a call passes none.
  """

  model: nn.Module
  variables: dict
  metadata: dict
  call_kwargs: dict = dataclasses.field(default_factory=dict)
  rngs: dict | None = None
  _jitted: Any = dataclasses.field(default=None, init=False, repr=False,
                                   compare=False)

  def _arguments(self, args, rngs, kwargs):
    dyn, static = split_arrays((args, {**self.call_kwargs, **kwargs}),
                                "ServedModel call arguments")
    return dyn, self.rngs if rngs is None else rngs, static

  def _fn(self, variables, dyn, rngs, static):
    args, kwargs = merge_arrays(dyn, static)
    return serving_apply(self.model, variables, *args, rngs=rngs, **kwargs)

  def __call__(self, *args, rngs: Mapping[str, Any] | None = None,
               **kwargs) -> Any:
    if self._jitted is None:
      self._jitted = jax.jit(self._fn, static_argnums=3)
    return self._jitted(self.variables, *self._arguments(args, rngs, kwargs))

  def eval_shape(self, *args, rngs: Mapping[str, Any] | None = None,
                 **kwargs) -> Any:
    """The output's shapes and dtypes of a call (traces, runs nothing)."""
    dyn, rngs, static = self._arguments(args, rngs, kwargs)
    return jax.eval_shape(functools.partial(self._fn, static=static),
                          self.variables, dyn, rngs)


def read_metadata(directory: str) -> dict:
  """``serving.json``, its layout version checked.

  Raises FileNotFoundError where it is missing (an incomplete export),
  `ServingFormatError` where it is not a serving checkpoint's metadata
  (e.g. truncated), ValueError on a layout version this code cannot read.
  """
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a (complete) serving "
                            "checkpoint")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ServingFormatError(
        f"{path} is not valid JSON ({e}): the serving checkpoint is damaged "
        "or truncated; export the model again") from e
  found = metadata.get("layout_version") if isinstance(metadata,
                                                       dict) else None
  if isinstance(metadata, dict) and found not in READABLE_VERSIONS:
    raise ValueError(f"serving checkpoint {directory} has layout_version="
                     f"{found!r}; this code reads layout_version in "
                     f"{READABLE_VERSIONS}")
  if not (isinstance(metadata, dict)
          and isinstance(metadata.get("layers"), dict)
          and isinstance(metadata.get("float_layers", {}), dict)):
    raise ServingFormatError(
        f"{path} lacks the 'layers' mapping of a serving checkpoint: the "
        "file is damaged or not a serving checkpoint; export the model "
        "again")
  return metadata


def read_arrays(directory: str) -> dict:
  """The ``arrays/`` tree; `ServingFormatError` (naming the directory) where
  orbax cannot read it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, ARRAYS_DIR)
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # pylint: disable=broad-except
    silence_aborted_restore_echoes()
    cause = (str(e).strip().splitlines() or [""])[0]
    cause = cause.split(" [tensorstore_spec", 1)[0][:600]
    raise ServingFormatError(
        f"{path}: the serving arrays cannot be read ({type(e).__name__}: "
        f"{cause}); the export is damaged or incomplete; export the model "
        "again") from e
  if not (isinstance(tree, Mapping) and isinstance(tree.get(SERVE), Mapping)
          and isinstance(tree.get("params", {}), Mapping)):
    raise ServingFormatError(
        f"{path} does not hold a serving variable dict (collections "
        f"{sorted(tree) if isinstance(tree, Mapping) else type(tree)}; "
        f"expected 'params' and {SERVE!r}); export the model again")
  return dict(tree)


def _init_rngs(rngs: Mapping[str, Any] | None) -> dict:
  """PRNG keys for an abstract ``model.init``: ``params`` and the streams
  of `rngs`."""
  return {name: jax.random.PRNGKey(0)
          for name in ("params", *sorted(rngs or {}))}


def check_shapes(tree: Mapping, metadata: Mapping, model: nn.Module,
                 example_input: Any, call_kwargs: Mapping[str, Any],
                 rngs: Mapping[str, Any] | None = None) -> None:
  """Checks the serving arrays against the shapes `model` expects.

  `example_input` as in `export` (an input or a tuple of positional
  arguments); `rngs` names the ``make_rng`` streams the model draws from.
  """
  dyn, static = split_arrays((example_args(example_input),
                               dict(call_kwargs)), "load example arguments")

  def init(rngs, dyn):
    args, kwargs = merge_arrays(dyn, static)
    return model.init(rngs, *args, **kwargs)

  expected = nn.unbox(jax.eval_shape(init, _init_rngs(rngs), dyn))
  layers = metadata["layers"]
  want = {f"params/{k}": v.shape for k, v in flat_tree(expected["params"]).items()}
  want.update({f"batch_stats/{k}": v.shape
               for k, v in flat_tree(expected.get("batch_stats", {})).items()})

  def mismatch(name, found, wanted):
    return ValueError(f"parameter {name!r}: the serving checkpoint has shape "
                      f"{tuple(found)}, the model expects {tuple(wanted)}")

  serving = flat_tree(tree[SERVE])
  for path, meta in layers.items():
    name = "params/" + join_path(path, "kernel")
    if name not in want:
      raise ValueError(f"parameter {name!r} of the serving checkpoint is not "
                       "in the model")
    per, wanted = tuple(meta["kernel_shape"]), tuple(want[name])
    lead = wanted[:len(wanted) - len(per)]  # stacked by a lifted transform
    if wanted[len(lead):] != per:
      raise mismatch(name, per, wanted)
    stored = np.shape(serving.get(join_path(path, "kernel")))
    if math.prod(stored) != math.prod(lead) * packed_size(
        meta["bits"], meta["int_shape"]):
      raise mismatch(f"{SERVE}/" + join_path(path, "kernel"), stored,
                     lead + (packed_size(meta["bits"], meta["int_shape"]),))
  skip = {"params/" + join_path(p, n) for p in layers for n in ("kernel",)
          + QUANTIZER_PARAMS}
  have = {f"{c}/{k}": np.shape(v) for c in ("params", "batch_stats")
          for k, v in flat_tree(tree.get(c, {})).items()}
  for name, shape in have.items():
    if name not in want:
      raise ValueError(f"parameter {name!r} of the serving checkpoint is not "
                       "in the model")
    if tuple(shape) != tuple(want[name]):
      raise mismatch(name, shape, want[name])
  missing = sorted(set(want) - set(have) - skip)
  if missing:
    raise ValueError(f"parameters {missing} of the model are missing from "
                     "the serving checkpoint")


def load(directory: str, model: nn.Module, example_input: Any, *,
         call_kwargs: Mapping[str, Any] | None = None,
         rngs: Mapping[str, Any] | None = None) -> ServedModel:
  """Reads a serving checkpoint, checks it against `model`, returns a
  `ServedModel`.

  `example_input`, `call_kwargs` and `rngs` as in `export`; `call_kwargs`
  and `rngs` become the served model's defaults. The model is traced once
  (abstractly) on them, so that a layer quantized in the model but float in
  the checkpoint, or the reverse, is refused here.

  Raises ValueError on another layout version (naming both) or on a shape
  that differs from the model's (naming the parameter and both shapes);
  `ServingFormatError` (a ValueError) on a damaged file, naming it.
  """
  directory = os.path.abspath(os.fspath(directory))
  metadata = read_metadata(directory)
  tree = read_arrays(directory)
  kwargs = dict(call_kwargs or {})
  check_shapes(tree, metadata, model, example_input, kwargs, rngs)
  served = ServedModel(model, jax.device_put(tree), metadata, kwargs,
                       None if rngs is None else dict(rngs))
  served.eval_shape(*example_args(example_input))
  return served


def int_execution(quant: ModelQuant) -> ModelQuant:
  """`quant` with ``execution='int'`` for every layer config whose operands
  are both integer-executable (the QAT model's integer-inference twin)."""
  def one(lq: LayerQuant) -> LayerQuant:
    ok = all(REGISTRY.get(t.method).int_execution
             for t in (lq.weight, lq.input))
    return lq.replace(execution="int") if ok else lq
  return quant.replace(default=one(quant.default),
                       rules=tuple((p, one(lq)) for p, lq in quant.rules))


__all__ = ["LAYOUT_VERSION", "FORMAT", "SERVE", "ExportResult", "IntLayer",
           "ServedModel",
           "ServingFormatError", "check_servable", "check_shapes", "export",
           "int_execution", "int_layer", "load", "pack_ints", "packed_size",
           "read_metadata", "record_export", "served_kind",
           "serving_apply", "serving_tree", "storage_bits", "unpack_ints"]
