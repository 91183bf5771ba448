"""The integer contraction: int8/int16 operands, int32 accumulation, then
the input scale, then the weight scale (AQT's order).

One path for every layer: dense and ``DenseGeneral`` are `int_dot_general`
with their dimension numbers, ``Einsum`` is `int_dot_general` after
`einsum_dims`, a convolution is `int_conv`. Both frameworks' layers, the
rules and serving call these and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

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


def _common_ints(x_q: Quantized, w_q: Quantized):
  xi, wi = x_q.ints, w_q.ints
  if xi.dtype != wi.dtype:
    xi, wi = xi.astype(jnp.int16), wi.astype(jnp.int16)
  return xi, wi


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
  xi, wi = _common_ints(x_q, w_q)
  acc = lax.dot_general(xi, wi, dimension_numbers,
                        preferred_element_type=jnp.int32)
  n_lhs_free = xi.ndim - len(lc) - len(lb)
  n_rhs_free = wi.ndim - len(rc) - len(rb)
  sx = scale_to_output(x_q.qp.scale, lc, lb, n_rhs_free, lhs=True)
  sw = scale_to_output(w_q.qp.scale, rc, rb, n_lhs_free, lhs=False)
  return acc.astype(out_dtype) * sx.astype(out_dtype) * sw.astype(out_dtype)


def _grouped_dense(x_q: Quantized, w_q: Quantized, out_dtype) -> jax.Array:
  """Dense with grouped scales: one int dot per group (batch dim G)."""
  xi, wi = _common_ints(x_q, w_q)
  sx, sw = x_q.qp.scale, w_q.qp.scale
  g = (x_q.ints.shape[-1] if x_q.grouped else w_q.ints.shape[1])
  if not x_q.grouped:
    xi = xi.reshape(xi.shape[:-1] + (xi.shape[-1] // g, g))
    sx = jnp.expand_dims(sx, -1) if sx.ndim == xi.ndim - 1 else sx
  if not w_q.grouped:
    wi = wi.reshape((wi.shape[0] // g, g) + wi.shape[1:])
    sw = sw.reshape((1, 1) + sw.shape[-1:])
  acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (1,)), ((xi.ndim - 2,),
                                                           (0,))),
                        preferred_element_type=jnp.int32)  # (G, B..., O)
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
  xi, wi = _common_ints(x_q, w_q)
  acc = lax.conv_general_dilated(xi, wi, preferred_element_type=jnp.int32,
                                 **conv)
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
