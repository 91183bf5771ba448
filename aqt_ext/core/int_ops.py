"""The integer contraction: int8/int16 operands, int32 accumulation, then
the input scale, then the weight scale (AQT's order).

One path for every layer: dense and ``DenseGeneral`` are `int_dot_general`
with their dimension numbers, ``Einsum`` is `int_dot_general` after
`einsum_dims`, a convolution is `int_conv`. Both frameworks' layers, the
rules and serving call these and nothing else.

Every integer contraction runs through `accumulate`. On CPU, where XLA's
int8 contractions are about 10x slower than float32 ones, it computes the
same int32 result exactly in float32: integers of magnitude <= 2^24 are
exact in float32, and so is every partial sum while the sum of |a_k b_k|
over one output's terms stays within 2^24, whatever order XLA adds them
in. Where the terms of one output could exceed that (a convolution's
kernel gradient sums over batch x height x width), an operand is split
into balanced base-16 digits (``v = 16 hi + lo``, ``|hi|, |lo| <= 8``) and
each pair of digit tensors contracts on its own, their int32 results
recombined; past what two digits per operand allow, the native int32
contraction runs. The choice is static (shapes and integer ranges only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext.core import quantizers as qz

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]],
                         tuple[Sequence[int], Sequence[int]]]


@dataclasses.dataclass
class Quantized:
  """A quantized operand: its fake-quant value, or (for integer execution)
  the integer tensor and its scale in `view` layout (feature axis split into
  (groups, group_size) for ``per_group``)."""

  fake: jax.Array | None
  ints: jax.Array | None = None
  qp: qz.QParams | None = None
  grouped: bool = False


def dense_dims(ndim: int) -> DimensionNumbers:
  """Dimension numbers of ``x @ kernel`` for an input of rank `ndim`."""
  return (((ndim - 1,), (0,)), ((), ()))


def _bounds(x_q: Quantized, w_q: Quantized) -> tuple[int, int]:
  return int_bound(x_q.ints, x_q.qp), int_bound(w_q.ints, w_q.qp)


_F32_EXACT = 2 ** 24  # integers up to this magnitude are exact in float32


def int_bound(ints: jax.Array, qp: qz.QParams | None = None) -> int:
  """The largest |value| `ints` can hold: its grid's range when known
  (`qp`; ``q - zero_point`` spans qmax - qmin), else its dtype's."""
  if qp is not None and (qp.qmin or qp.qmax):
    if qp.zero_point is not None:
      return int(qp.qmax - qp.qmin)
    return int(max(abs(qp.qmin), abs(qp.qmax)))
  info = jnp.iinfo(ints.dtype)
  return int(max(-info.min, info.max))


def _digits(v: jax.Array) -> list[tuple[jax.Array, int]]:
  """Balanced base-16 digits: ``v = 16 hi + lo``, ``lo`` in [-8, 7]."""
  v = v.astype(jnp.int32)
  lo = (v + 8) % 16 - 8
  return [((v - lo) >> 4, 16), (lo, 1)]


def _digit_bound(bound: int) -> int:
  return max(8, -(-(bound + 8) // 16))


def accumulate_plan(terms: int, a_bound: int, b_bound: int
                    ) -> tuple[int, int] | None:
  """How many digits of each operand make a float32 contraction of
  `terms` products per output exact: (1, 1), (2, 1), (1, 2) or (2, 2);
  None if even (2, 2) cannot (then the native int32 contraction runs)."""
  da, db = _digit_bound(a_bound), _digit_bound(b_bound)
  for na, nb in ((1, 1), (2, 1), (1, 2), (2, 2)):
    if terms * (a_bound if na == 1 else da) * (
        b_bound if nb == 1 else db) <= _F32_EXACT:
      return na, nb
  return None


def accumulate(a: jax.Array, b: jax.Array, op: Callable[..., jax.Array],
               terms: int, a_bound: int | None = None,
               b_bound: int | None = None) -> jax.Array:
  """``op(a, b, preferred_element_type)`` of two integer tensors with int32
  accumulation, exactly (module docstring): natively off CPU, in float32 on
  CPU. `terms`: an upper bound on the products summed into one output;
  `a_bound`, `b_bound`: on |a|, |b| (default: their dtypes')."""
  a_bound = int_bound(a) if a_bound is None else a_bound
  b_bound = int_bound(b) if b_bound is None else b_bound
  if a.dtype != b.dtype:
    a, b = a.astype(jnp.int16), b.astype(jnp.int16)
  plan = (accumulate_plan(terms, a_bound, b_bound)
          if jax.default_backend() == "cpu" else None)
  if plan is None:
    return op(a, b, jnp.int32)
  a_parts = [(a, 1)] if plan[0] == 1 else _digits(a)
  b_parts = [(b, 1)] if plan[1] == 1 else _digits(b)
  out = None
  for pa, wa in a_parts:
    for pb, wb in b_parts:
      t = op(pa.astype(jnp.float32), pb.astype(jnp.float32),
             jnp.float32).astype(jnp.int32)
      t = t if wa * wb == 1 else t * (wa * wb)
      out = t if out is None else out + t
  return out


def scale_to_output(scale: jax.Array, contracting: Sequence[int],
                    batch: Sequence[int], other_free: int, lhs: bool
                    ) -> jax.Array:
  """An operand's keepdims scale, laid out like the dot_general output.

  The output axes are (batch..., lhs free..., rhs free...); the scale's
  contracting axes have size 1 and are dropped, the other operand's free
  axes become size-1 axes.
  """
  if scale.size == 1:
    return scale.reshape(())
  free = [a for a in range(scale.ndim) if a not in contracting
          and a not in batch]
  t = jnp.transpose(scale, tuple(batch) + tuple(free) + tuple(contracting))
  b = tuple(scale.shape[a] for a in batch)
  f = tuple(scale.shape[a] for a in free)
  ones = (1,) * other_free
  return t.reshape(b + f + ones if lhs else b + ones + f)


def int_dot_general(x_q: Quantized, w_q: Quantized,
                    dimension_numbers: DimensionNumbers, out_dtype: Any
                    ) -> jax.Array:
  """Integer ``dot_general`` of two operands as `quantize_operand(...,
  want_int=True)` gives them; the output in `out_dtype`.

  Grouped operands (``per_group``) run only in the dense layout (input's
  last axis against the kernel's first): one integer product per group,
  rescaled, summed over groups.
  """
  if x_q.grouped or w_q.grouped:
    if tuple(map(tuple, dimension_numbers[0])) != ((x_q.ints.ndim - (
        1 if not x_q.grouped else 2),), (0,)) or dimension_numbers[1] != (
            (), ()):
      raise ValueError(
          "TensorQuant.granularity='per_group' runs with "
          "LayerQuant.execution='int' only in dense layers (QuantDense, "
          "QuantLinear); allowed here: 'per_tensor', 'per_channel'")
    return _grouped_dense(x_q, w_q, out_dtype)
  (lc, rc), (lb, rb) = dimension_numbers
  xi, wi = x_q.ints, w_q.ints
  acc = accumulate(xi, wi, lambda a, b, t: lax.dot_general(
      a, b, dimension_numbers, preferred_element_type=t),
      math.prod(xi.shape[a] for a in lc), *_bounds(x_q, w_q))
  n_lhs_free = xi.ndim - len(lc) - len(lb)
  n_rhs_free = wi.ndim - len(rc) - len(rb)
  sx = scale_to_output(x_q.qp.scale, lc, lb, n_rhs_free, lhs=True)
  sw = scale_to_output(w_q.qp.scale, rc, rb, n_lhs_free, lhs=False)
  return acc.astype(out_dtype) * sx.astype(out_dtype) * sw.astype(out_dtype)


def _grouped_dense(x_q: Quantized, w_q: Quantized, out_dtype) -> jax.Array:
  """Dense with grouped scales: one int dot per group (batch dim G)."""
  xi, wi = x_q.ints, w_q.ints
  sx, sw = x_q.qp.scale, w_q.qp.scale
  g = (x_q.ints.shape[-1] if x_q.grouped else w_q.ints.shape[1])
  if not x_q.grouped:
    xi = xi.reshape(xi.shape[:-1] + (xi.shape[-1] // g, g))
    sx = jnp.expand_dims(sx, -1) if sx.ndim == xi.ndim - 1 else sx
  if not w_q.grouped:
    wi = wi.reshape((wi.shape[0] // g, g) + wi.shape[1:])
    sw = sw.reshape((1, 1) + sw.shape[-1:])
  dims = (((xi.ndim - 1,), (1,)), ((xi.ndim - 2,), (0,)))
  acc = accumulate(xi, wi, lambda a, b, t: lax.dot_general(
      a, b, dims, preferred_element_type=t), g,
      *_bounds(x_q, w_q))  # (G, B..., O)
  nb = xi.ndim - 2
  sx_t = jnp.moveaxis(jnp.broadcast_to(sx, xi.shape[:-1] + (1,))
                      if sx.size > 1 else sx.reshape((1,) * xi.ndim),
                      -2, 0)  # (G|1, B..., 1)
  sw_t = sw.reshape((sw.shape[0],) + (1,) * nb + sw.shape[-1:])
  out = acc.astype(out_dtype) * sx_t.astype(out_dtype) * sw_t.astype(out_dtype)
  return out.sum(axis=0)


def int_conv(x_q: Quantized, w_q: Quantized, conv: dict, out_dtype: Any
             ) -> jax.Array:
  """Integer convolution; `conv` holds ``lax.conv_general_dilated``'s
  keyword arguments (NHWC input, HWIO kernel). Scales per tensor, per
  example (input) or per output channel (kernel)."""
  if x_q.grouped or w_q.grouped:
    raise ValueError("TensorQuant.granularity='per_group' cannot run with "
                     "LayerQuant.execution='int' in a convolution; allowed: "
                     "'per_tensor', 'per_channel'")
  xi, wi = x_q.ints, w_q.ints
  acc = accumulate(xi, wi, lambda a, b, t: lax.conv_general_dilated(
      a, b, preferred_element_type=t, **conv),
      math.prod(wi.shape[:-1]), *_bounds(x_q, w_q))
  sx, sw = x_q.qp.scale, w_q.qp.scale
  return (acc.astype(out_dtype) * sx.astype(out_dtype)
          * sw.reshape(sw.shape[-1:]).astype(out_dtype))


@dataclasses.dataclass(frozen=True)
class EinsumDims:
  """A two-operand einsum as a ``dot_general`` and a transpose.

  Attributes:
    dimension_numbers: of ``lax.dot_general(x, w, ...)``.
    perm: the transpose taking the dot_general output (batch, x free,
      w free) to the einsum's output order.
  """

  dimension_numbers: DimensionNumbers
  perm: tuple[int, ...]


def einsum_dims(spec: str, x_ndim: int, w_ndim: int) -> EinsumDims:
  """`EinsumDims` of ``jnp.einsum(spec, x, w)``.

  Letters in both operands and the output are batch axes, in both operands
  but not the output contracting axes; letters in one operand must appear
  in the output (an axis summed inside one operand is refused), and
  ellipses are refused.
  """
  spec = spec.replace(" ", "")
  if "..." in spec or "->" not in spec or spec.count(",") != 1:
    raise ValueError(f"einsum_str={spec!r} is not allowed; allowed: an "
                     "explicit two-operand einsum 'ab,bc->ac' without '...'")
  ins, out = spec.split("->")
  a, b = ins.split(",")
  if (len(a), len(b)) != (x_ndim, w_ndim) or len(set(a)) != len(a) or len(
      set(b)) != len(b) or len(set(out)) != len(out):
    raise ValueError(f"einsum_str={spec!r} does not fit an input of rank "
                     f"{x_ndim} and a kernel of rank {w_ndim} (or repeats a "
                     "letter within an operand)")
  for letter in set(a) ^ set(b):
    if letter not in out:
      raise ValueError(f"einsum_str={spec!r}: axis {letter!r} of one operand "
                       "is summed away; not supported")
  if set(out) - set(a) - set(b):
    raise ValueError(f"einsum_str={spec!r}: output axes not in the operands")
  batch = [c for c in a if c in b and c in out]
  contract = [c for c in a if c in b and c not in out]
  dims = ((tuple(a.index(c) for c in contract),
           tuple(b.index(c) for c in contract)),
          (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
  order = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
  return EinsumDims(dims, tuple(order.index(c) for c in out))


def einsum_bias_shape(spec: str, kernel_shape: Sequence[int]
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(bias shape, its broadcast shape in the output) of an einsum layer: the
  output axes that come from the kernel, as flax's Einsum has them."""
  spec = spec.replace(" ", "")
  ins, out = spec.split("->")
  rhs = {c: i for i, c in enumerate(ins.split(",")[1])}
  bias = tuple(kernel_shape[rhs[c]] for c in out if c in rhs)
  return bias, tuple(kernel_shape[rhs[c]] if c in rhs else 1 for c in out)


def dot_general_axes(dimension_numbers: DimensionNumbers
                     ) -> tuple[qz.OperandAxes, qz.OperandAxes]:
  """Operand axes of (input, kernel) of a ``dot_general``; the feature axis
  is the last contracting one."""
  (lc, rc), _ = dimension_numbers
  return (qz.OperandAxes(tuple(lc), lc[-1]), qz.OperandAxes(tuple(rc), rc[-1]))


def conv_axes(num_spatial: int) -> tuple[qz.OperandAxes, qz.OperandAxes]:
  """Operand axes of (input, kernel) of an NHWC x HWIO convolution: a
  window spans every input axis but the batch."""
  return (qz.OperandAxes(tuple(range(1, num_spatial + 2)), num_spatial + 1),
          qz.OperandAxes(tuple(range(num_spatial + 1)), num_spatial))


CONV_PADDINGS = ("SAME", "VALID")


def _canonical_padding(padding: Any, num_spatial: int, layer: str):
  """'SAME' / 'VALID', or one (lo, hi) pair per spatial axis."""
  if isinstance(padding, str):
    if padding not in CONV_PADDINGS:
      raise ValueError(f"{layer}.padding={padding!r} is not supported; "
                       "allowed: 'SAME', 'VALID', int or (lo, hi) pairs")
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * num_spatial
  pads = list(padding)
  if len(pads) != num_spatial:
    raise ValueError(f"{layer}.padding={padding!r} must have {num_spatial} "
                     "entries")
  return [(p, p) if isinstance(p, int) else tuple(p) for p in pads]


def conv_spec(num_spatial: int) -> tuple[str, str, str]:
  sp = "HWDXYZ"[:num_spatial] if num_spatial <= 3 else None
  if sp is None or num_spatial < 1:
    raise ValueError(f"convolutions support 1-3 spatial dims, got "
                     f"{num_spatial}")
  return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def conv_geometry(inputs: jax.Array, features: int, kernel_size: Any,
                  strides: Any = 1, padding: Any = "SAME",
                  input_dilation: Any = 1, kernel_dilation: Any = 1,
                  feature_group_count: int = 1, layer: str = "QuantConv"):
  """Validated geometry of a convolution layer's call (flax's conventions).

  Returns:
    (x, batch_shape, kernel_shape, conv_kwargs): the input with its leading
    batch dims flattened into one, those dims, the kernel shape, and the
    keyword arguments of ``lax.conv_general_dilated``.
  """
  ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  nsp = len(ks)

  def tup(v, name):
    if v is None:
      return (1,) * nsp
    if isinstance(v, int):
      return (v,) * nsp
    if len(v) != nsp:
      raise ValueError(f"{layer}.{name}={v!r} must have {nsp} entries")
    return tuple(v)

  pad = _canonical_padding(padding, nsp, layer)
  batch_shape = inputs.shape[:-(nsp + 1)]
  x = inputs.reshape((-1,) + inputs.shape[-(nsp + 1):])
  in_features = x.shape[-1]
  if in_features % feature_group_count:
    raise ValueError(
        f"{layer}.feature_group_count={feature_group_count} must divide the "
        f"input features ({in_features})")
  kernel_shape = ks + (in_features // feature_group_count, features)
  conv = dict(window_strides=tup(strides, "strides"), padding=pad,
              lhs_dilation=tup(input_dilation, "input_dilation"),
              rhs_dilation=tup(kernel_dilation, "kernel_dilation"),
              dimension_numbers=lax.conv_dimension_numbers(
                  x.shape, kernel_shape, conv_spec(nsp)),
              feature_group_count=feature_group_count)
  return x, batch_shape, kernel_shape, conv
