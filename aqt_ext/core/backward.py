"""A quantized backward pass: the two gradient contractions of a layer on
quantized operands (AQT v2's ``dlhs`` / ``drhs``).

For ``y = x . w`` (a ``dot_general`` or a convolution) the backward pass is
two more contractions of the same size, ``dx = g . w`` and ``dw = x . g``.
`contract` computes ``y`` as the forward does, and, by a ``custom_vjp``,
each gradient contraction as configured by its `GradQuant` (duck-typed):

1. Its two operands: ``A = g`` and ``B`` = the forward operand it meets
   (``w`` for dx, ``x`` for dw). With ``use_fwd_quant`` and ``B`` on an
   integer grid in the forward, ``B`` is the forward's integers and their
   scale moves into ``A`` (``A = g * scale``; it varies only along the axes
   the gradient contraction sums over, so it cannot stay with ``B``).
2. Each is quantized with one scale per index of the axes the contraction
   does not sum over (``per_channel``, AQT's calibration over the
   contracting axes) or per tensor: ``int`` on AQT's grid (absmax to
   2^(b-1)-0.5, clipped to +-(2^(b-1)-1), as int8), or fp8 (absmax to the
   format's largest value, saturating). ``A`` may round stochastically.
3. The integers contract with int32 accumulation (fp8 with float32), then
   ``A``'s scale and ``B``'s multiply the result, in that order (AQT's).

The gradient then flows on through each operand's forward quantizer (its
straight-through estimator, LSQ step, ...), exactly as in a float backward
pass. An unquantized side (``format='float'``) is the exact vjp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lax import convolution as _conv_internal

from aqt_ext.core import fp8, int_ops
from aqt_ext.core import quantizers as qz
from aqt_ext.core.int_ops import Quantized

FP8 = fp8.FORMATS  # format name -> (dtype, largest finite value)


# ---------------------------------------------------------------------------
# Quantizing one operand of a gradient contraction.
# ---------------------------------------------------------------------------

def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform [0, 1) noise of stochastic rounding, drawn over the flattened
  shape: XLA:CPU compiles a threefry draw of a rank-4 shape slowly
  (`aqt_ext.core.initializers`)."""
  return jax.random.uniform(key, (int(np.prod(shape)),),
                            jnp.float32).reshape(shape)


def _stochastic_fp8(t: jax.Array, fmt: str, key: jax.Array) -> jax.Array:
  """`t` (float32, within the format's range) rounded stochastically to the
  fp8 grid: down or up with probabilities that make it unbiased."""
  finfo = jnp.finfo(FP8[fmt][0])
  mant = finfo.nmant
  min_exp = int(np.log2(float(finfo.smallest_normal)))
  _, e = jnp.frexp(t)  # |t| in [2^(e-1), 2^e)
  ulp = jnp.exp2((jnp.maximum(e - 1, min_exp) - mant).astype(t.dtype))
  u = _uniform(key, t.shape).astype(t.dtype)
  return jnp.sign(t) * jnp.floor(jnp.abs(t) / ulp + u) * ulp


def quantize_grad_operand(x: jax.Array, gq: Any, keep: Sequence[int],
                          key: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(values, scale) of `x` quantized by `gq`: int8 or fp8 values, and a
  keepdims scale per index of the axes `keep` (``per_channel``) or one
  (``per_tensor``). `key`: stochastic rounding."""
  if gq.granularity == "per_tensor":
    keep = ()
  reduce = tuple(a for a in range(x.ndim) if a not in keep)
  amax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
  if gq.format == "int":
    qp = qz.qparams_from_range({"amax": amax}, "aqt", gq.bits)
    if key is None:
      q = qz.to_int(x, qp)
    else:
      t = (x * qz.safe_reciprocal(qp.scale).astype(x.dtype)).astype(
          jnp.float32)
      t = jnp.floor(t + _uniform(key, t.shape))
      q = jnp.clip(t, qp.qmin, qp.qmax).astype(jnp.int8)
    return q, qp.scale
  dtype, fmax = FP8[gq.format]
  scale = fp8.scale_of(amax, gq.format)
  t = (x * qz.safe_reciprocal(scale).astype(x.dtype)).astype(jnp.float32)
  t = jnp.clip(t, -fmax, fmax)  # saturate: no inf / NaN from overflow
  if key is not None:
    t = jnp.clip(_stochastic_fp8(t, gq.format, key), -fmax, fmax)
  return t.astype(dtype), scale


def _accumulate(a: jax.Array, b: jax.Array,
                op: Callable[..., jax.Array], terms: int) -> jax.Array:
  """``op(a, b, preferred_element_type)`` of two quantized operands: int32
  accumulation of integers (`int_ops.accumulate`; `terms` bounds the
  products summed into one output); fp8 in float32 (fp8 operands upcast on
  CPU, where XLA has no fp8 contraction: the products are exact in
  float32)."""
  if jnp.issubdtype(a.dtype, jnp.integer):
    return int_ops.accumulate(a, b, op, terms)
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return op(a, b, jnp.float32)


# ---------------------------------------------------------------------------
# The contractions: forward, their two gradient contractions, the layouts.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DotGeneral:
  """``lax.dot_general(x, w, dimension_numbers)``; g has the output's
  layout (batch, x free, w free)."""

  dimension_numbers: int_ops.DimensionNumbers
  x_ndim: int
  w_ndim: int

  def _axes(self):
    (xc, wc), (xb, wb) = self.dimension_numbers
    xc, wc, xb, wb = map(tuple, (xc, wc, xb, wb))
    xf = tuple(a for a in range(self.x_ndim) if a not in xc + xb)
    wf = tuple(a for a in range(self.w_ndim) if a not in wc + wb)
    return xc, wc, xb, wb, xf, wf

  def g_axes(self):
    """Axes of g: (batch, x free, w free)."""
    _, _, xb, _, xf, wf = self._axes()
    nb, nxf = len(xb), len(xf)
    return (tuple(range(nb)), tuple(range(nb, nb + nxf)),
            tuple(range(nb + nxf, nb + nxf + len(wf))))

  def grad(self, wrt_x: bool):
    """(dimension numbers of ``dot_general(g, other)``, the axes of g and of
    the other operand that it does not sum over, and the permutation of
    its output into the layout of the operand differentiated)."""
    xc, wc, xb, wb, xf, wf = self._axes()
    gb, gxf, gwf = self.g_axes()
    if wrt_x:  # dx = g . w, summing over w's free axes
      dims = ((gwf, wf), (gb, wb))
      g_keep, o_keep = gb + gxf, wb + wc
      # output: (batch, x free, w contracting in increasing order)
      order = tuple(xb) + xf + tuple(np.take(xc, np.argsort(wc)))
    else:  # dw = g . x, summing over x's free axes
      dims = ((gxf, xf), (gb, xb))
      g_keep, o_keep = gb + gwf, xb + xc
      order = tuple(wb) + wf + tuple(np.take(wc, np.argsort(xc)))
    return dims, g_keep, o_keep, tuple(int(i) for i in np.argsort(order))

  def forward(self, x, w, precision=None, preferred_element_type=None):
    return lax.dot_general(x, w, self.dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)

  def fwd_scale_in_g(self, scale: jax.Array, of_x: bool) -> jax.Array:
    """A forward operand's keepdims scale laid out like g."""
    (xc, wc), (xb, wb) = self.dimension_numbers
    _, _, _, _, xf, wf = self._axes()
    if of_x:
      return int_ops.scale_to_output(scale, xc, xb, len(wf), lhs=True)
    return int_ops.scale_to_output(scale, wc, wb, len(xf), lhs=False)

  def grad_contract(self, wrt_x, a, sa, b, sb, dtype):
    dims, _, _, perm = self.grad(wrt_x)
    (gc, oc), (gb, ob) = dims
    acc = _accumulate(a, b, lambda p, q, t: lax.dot_general(
        p, q, dims, preferred_element_type=t),
        int(np.prod([a.shape[d] for d in gc])))
    n_g_free = a.ndim - len(gc) - len(gb)
    n_o_free = b.ndim - len(oc) - len(ob)
    sa = int_ops.scale_to_output(sa, gc, gb, n_o_free, lhs=True)
    sb = int_ops.scale_to_output(sb, oc, ob, n_g_free, lhs=False)
    out = acc.astype(dtype) * sa.astype(dtype) * sb.astype(dtype)
    return jnp.transpose(out, perm)

  def keep(self, wrt_x: bool):
    """The axes of g and of the other operand kept by a per-channel scale
    in the gradient contraction (those it does not sum over)."""
    _, g_keep, o_keep, _ = self.grad(wrt_x)
    return g_keep, o_keep


class _Aval:
  """What jax's convolution transpose rules read of an undefined operand."""

  def __init__(self, shape, dtype):
    self.aval = jax.core.ShapedArray(tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class Conv:
  """``lax.conv_general_dilated(x, w, **kwargs)``: channel-last input with
  one batch axis, kernel (*window, in/groups, out)."""

  kwargs: tuple  # conv_general_dilated's keyword arguments, as items
  x_shape: tuple[int, ...]
  w_shape: tuple[int, ...]

  @property
  def kw(self) -> dict:
    return dict(self.kwargs)

  def forward(self, x, w, precision=None, preferred_element_type=None):
    return lax.conv_general_dilated(
        x, w, precision=precision,
        preferred_element_type=preferred_element_type, **self.kw)

  def _transpose_params(self):
    kw = self.kw
    nsp = len(self.x_shape) - 2
    window = tuple((k - 1) * d + 1 for k, d in zip(
        self.w_shape[:nsp], kw["rhs_dilation"]))
    dilated_in = tuple((n - 1) * d + 1 for n, d in zip(
        self.x_shape[1:-1], kw["lhs_dilation"]))
    padding = kw["padding"]
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(dilated_in, window, kw["window_strides"],
                                    padding)
    return dict(window_strides=tuple(kw["window_strides"]),
                padding=tuple(tuple(p) for p in padding),
                lhs_dilation=tuple(kw["lhs_dilation"]),
                rhs_dilation=tuple(kw["rhs_dilation"]),
                dimension_numbers=kw["dimension_numbers"],
                feature_group_count=kw["feature_group_count"],
                batch_group_count=1, precision=None, out_sharding=None)

  def keep(self, wrt_x: bool):
    nsp = len(self.x_shape) - 2
    if wrt_x:  # dx sums over g's window and channels, w's window and out
      return (0,), (nsp,)
    return (nsp + 1,), (nsp + 1,)  # dw sums over batch and window

  def fwd_scale_in_g(self, scale: jax.Array, of_x: bool) -> jax.Array:
    # x: per tensor or per example (N, 1, ...); w: per tensor or per output
    # channel on its last axis; both broadcast against g (N, ..., out).
    return scale if of_x or scale.size == 1 else scale.reshape(-1)

  def grad_contract(self, wrt_x, a, sa, b, sb, dtype):
    params = self._transpose_params()
    groups = params["feature_group_count"]
    nsp = len(self.x_shape) - 2
    if wrt_x:
      # each input element meets at most the whole window of each output
      # channel of its group
      terms = int(np.prod(self.w_shape[:nsp])) * (self.w_shape[-1] // groups)
      acc = _accumulate(a, b, lambda g, w, t: (
          _conv_internal._conv_general_dilated_transpose_lhs(
              g, _Aval(self.x_shape, t), w, preferred_element_type=t,
              **params)), terms)
      # sa: per example (N, 1, ...); sb: per kernel input channel (in/G).
      sb = sb.reshape(-1)
      sb = jnp.tile(sb, groups) if sb.size > 1 else sb.reshape(())
    else:
      # each kernel element sums over batch x output positions
      terms = int(np.prod(a.shape[:-1]))
      acc = _accumulate(b, a, lambda x, g, t: (
          _conv_internal._conv_general_dilated_transpose_rhs(
              g, x, _Aval(self.w_shape, t), preferred_element_type=t,
              **params)), terms)
      # sa: per output channel; sb: per input channel c = group(o) * cg + c'.
      sa = sa.reshape(-1) if sa.size > 1 else sa.reshape(())
      if sb.size > 1:
        cg, out = self.w_shape[-2], self.w_shape[-1]
        sb = jnp.repeat(sb.reshape(groups, cg).T, out // groups, axis=1)
        sb = sb.reshape((1,) * nsp + (cg, out))
      else:
        sb = sb.reshape(())
    return acc.astype(dtype) * sa.astype(dtype) * sb.astype(dtype)


# ---------------------------------------------------------------------------
# The custom vjp.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
  """What the backward pass needs of one forward operand: its float value,
  and where the forward put it on an integer grid, its integers and keepdims
  scale."""

  value: jax.Array
  ints: jax.Array | None = None
  scale: jax.Array | None = None

  def quantized(self) -> Quantized:
    """The integer operand, as `aqt_ext.core.int_ops` contracts it."""
    return Quantized(None, self.ints, qz.QParams(self.scale, None, 0., 0.))


def side(value: jax.Array, q: Quantized) -> Side:
  """The `Side` of a forward operand `value` quantized as `q`."""
  if q.ints is not None:
    return Side(value, q.ints, q.qp.scale)
  return Side(value)


def _grad(op, wrt_x: bool, g: jax.Array, other: Side, gq: Any,
          key: jax.Array | None, dtype) -> jax.Array:
  """One quantized gradient contraction (module docstring, steps 1-3)."""
  a = g
  if gq.use_fwd_quant and other.ints is not None:
    a = g * op.fwd_scale_in_g(other.scale, of_x=not wrt_x).astype(g.dtype)
    b = other.ints.astype(g.dtype)
  else:
    b = other.value.astype(g.dtype)
  g_keep, o_keep = op.keep(wrt_x)
  qa, sa = quantize_grad_operand(a, gq, g_keep, key)
  qb, sb = quantize_grad_operand(b, gq, o_keep)
  return op.grad_contract(wrt_x, qa, sa, qb, sb, dtype)


def contract(op, grad_input: Any, grad_weight: Any, x_fake: jax.Array,
             w_fake: jax.Array, x_side: Side, w_side: Side,
             key: jax.Array | None, precision: Any = None,
             preferred_element_type: Any = None,
             int_forward: Callable[[Quantized, Quantized], jax.Array] | None
             = None, where: str = "") -> jax.Array:
  """``op.forward(x_fake, w_fake)`` (or with `int_forward` the integer
  contraction of the sides' integers) whose gradients wrt `x_fake` and
  `w_fake` are computed by `grad_input` and `grad_weight` (`GradQuant`s) on
  the operands `x_side`, `w_side` (module docstring). `key`: the PRNG key
  of stochastic rounding; without it the forward runs and a gradient is
  refused (`where` names the layer in the error)."""

  def fwd_op(a, b):
    return op.forward(a, b, precision, preferred_element_type)

  def primal(xf, wf, xs, ws):
    if int_forward is not None:
      return int_forward(xs.quantized(), ws.quantized()).astype(xf.dtype)
    return fwd_op(xf, wf)

  @jax.custom_vjp
  def f(xf, wf, xs, ws, k):
    del k
    return primal(xf, wf, xs, ws)

  def f_fwd(xf, wf, xs, ws, k):
    return primal(xf, wf, xs, ws), (xf, wf, xs, ws, k)

  def f_bwd(res, g):
    xf, wf, xs, ws, k = res
    if k is None and needs_key(grad_input, grad_weight):
      raise ValueError(
          f"layer {where!r}: GradQuant.rounding='stochastic' needs a PRNG key "
          "from the 'quant' stream to compute gradients: linen "
          "`model.apply(..., rngs={'quant': key})`, NNX a layer built with "
          "`rngs=nnx.Rngs(params=..., quant=...)`")
    kx, kw = (None, None) if k is None else jax.random.split(k)
    exact = None
    if not (grad_input.quantized and grad_weight.quantized):
      exact = jax.vjp(fwd_op, xf, wf)[1](g)
    dx = (_grad(op, True, g, ws, grad_input,
                kx if grad_input.rounding == "stochastic" else None, xf.dtype)
          if grad_input.quantized else exact[0])
    dw = (_grad(op, False, g, xs, grad_weight,
                kw if grad_weight.rounding == "stochastic" else None,
                wf.dtype)
          if grad_weight.quantized else exact[1])
    return (dx.astype(xf.dtype), dw.astype(wf.dtype), None, None, None)

  f.defvjp(f_fwd, f_bwd)
  return f(x_fake, w_fake, x_side, w_side, key)


jax.tree_util.register_dataclass(Side, data_fields=["value", "ints", "scale"],
                                 meta_fields=[])


def needs_key(grad_input: Any, grad_weight: Any) -> bool:
  """Whether either gradient contraction rounds stochastically."""
  return "stochastic" in (grad_input.rounding, grad_weight.rounding)

