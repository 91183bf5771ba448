"""Quantizers as small pure JAX functions (jit- and grad-safe).

Conventions (see ../shared/design/methods.md):

* Rounding is ``jnp.round`` (half to even) unless ``half_away`` is asked for.
* Straight-through estimator with the clipping mask: inside the grid the
  gradient to the input is 1 (the output gradient passed on unchanged),
  outside it is 0; at the boundary it is 1. The ``aqt`` grid passes the
  gradient of every value, as AQT's numerics do (``clip_gradient=False``:
  with absmax calibration nothing but the calibrated maximum, which maps to
  2^(b-1)-0.5, is clipped).
* Quantizing multiplies by the reciprocal of the scale, with an infinite
  reciprocal replaced by 1, exactly as AQT v2 does (so the ``aqt`` and
  ``restricted`` grids reproduce AQT's int values bit for bit).
* A zero tensor or zero group never yields NaN/Inf: a zero range is replaced
  by 1 before the scale is formed (AQT's zero-group guard).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax import lax

Axes = tuple[int, ...]


# ---------------------------------------------------------------------------
# Grids and rounding.
# ---------------------------------------------------------------------------

def grid_range(grid: str, bits: int) -> tuple[float, float]:
  """Integer range [qmin, qmax] of a grid."""
  half = 2.0 ** (bits - 1)
  if grid == "full":
    return -half, half - 1
  if grid in ("restricted", "aqt"):
    return -(half - 1), half - 1
  if grid in ("unsigned", "asymmetric"):
    return 0.0, 2.0 ** bits - 1
  raise ValueError(f"grid={grid!r}")


def grid_bound(grid: str, bits: int) -> float:
  """The grid value that the calibrated maximum maps to."""
  half = 2.0 ** (bits - 1)
  if grid in ("full", "aqt"):
    return half - 0.5
  if grid == "restricted":
    return half - 1
  return 2.0 ** bits - 1  # unsigned, asymmetric: max maps to the top level


# A rounding: 'half_even', 'half_away', or a function of the grid-unit values
# (e.g. an AQuant border rounding from `border_round`).
Rounding = Union[str, Callable[[jax.Array], jax.Array]]


def round_(x: jax.Array, rounding: Rounding = "half_even") -> jax.Array:
  if callable(rounding):
    return rounding(x)
  if rounding == "half_even":
    return jnp.round(x)
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def border(n: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """AQuant's border B(n) = clip(1/2 + alpha (n + 1/2) + beta, 0, 1)."""
  return jnp.clip(0.5 + alpha * (n + 0.5) + beta, 0.0, 1.0)


def border_round(t: jax.Array, alpha: jax.Array, beta: jax.Array,
                 soft: bool = False, temperature: float = 0.1) -> jax.Array:
  """Rounds t = x/s up when its fractional part reaches the border `border`
  (AQuant, methods.md sec. 7); alpha, beta broadcast on the last axis.

  Hard: floor(t) + (frac >= B), non-decreasing in t for any alpha, beta.
  Soft: floor(t) + sigmoid((frac - B) / T), differentiable in alpha and beta
  (and in t through frac).
  """
  n = jnp.floor(t)
  f = t - n
  b = border(n, alpha, beta)
  if soft:
    return n + jax.nn.sigmoid((f - b) / temperature)
  return n + (f >= b).astype(t.dtype)


def ste(x: jax.Array, fx: jax.Array) -> jax.Array:
  """Value fx, gradient of x."""
  return x + lax.stop_gradient(fx - x)


# Grid-unit slack of the clipping mask, so that a value on the grid's edge (the
# calibrated maximum of a `restricted` grid) is inside whether x * (1/s) lands
# one ulp above or below the edge. Values in the slack still round to the edge.
_EDGE_SLACK = 1e-4


def clip_ste(t: jax.Array, lo, hi) -> jax.Array:
  """clip(t, lo, hi) with gradient 1 on [lo, hi] (inclusive) and 0 outside."""
  inside = (t >= lo - _EDGE_SLACK) & (t <= hi + _EDGE_SLACK)
  return jnp.where(inside, t, lax.stop_gradient(jnp.clip(t, lo, hi)))


def safe_reciprocal(s: jax.Array) -> jax.Array:
  inv = lax.reciprocal(s)
  return jnp.where(jnp.isinf(inv), jnp.ones_like(inv), inv)


# ---------------------------------------------------------------------------
# Axes: granularity -> reduction axes.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OperandAxes:
  """Role of an operand's axes in its contraction.

  contracting: axes summed over by the op (for a conv input: all but batch,
    since a window spans them).
  feature: the input-feature axis (one of `contracting`).
  """

  contracting: Axes
  feature: int


def reduce_axes(ndim: int, axes: OperandAxes, granularity: str) -> Axes:
  """Axes reduced to form one scale, for a tensor not split into groups."""
  if granularity == "per_tensor":
    return tuple(range(ndim))
  if granularity == "per_channel":
    return tuple(sorted(a % ndim for a in axes.contracting))
  if granularity == "per_in_channel":
    f = axes.feature % ndim
    return tuple(a for a in range(ndim) if a != f)
  raise ValueError(f"granularity={granularity!r} needs group handling")


def split_groups(x: jax.Array, axes: OperandAxes, group_size: int
                 ) -> tuple[jax.Array, OperandAxes]:
  """Splits the feature axis F into (F // g, g); returns the view and axes.

  In the view the in-group axis replaces the feature axis among the
  contracting axes and the group-index axis is a non-contracting axis, so
  ``per_channel`` reduction over the view gives per-group scales.
  """
  f = axes.feature % x.ndim
  size = x.shape[f]
  if size % group_size:
    raise ValueError(
        f"TensorQuant.group_size={group_size} must divide the feature axis "
        f"of size {size}")
  view = x.reshape(x.shape[:f] + (size // group_size, group_size)
                   + x.shape[f + 1:])
  shift = lambda a: a + 1 if a > f else a  # noqa: E731
  contracting = tuple(shift(a % x.ndim) for a in axes.contracting if
                      a % x.ndim != f) + (f + 1,)
  return view, OperandAxes(tuple(sorted(contracting)), f + 1)


# ---------------------------------------------------------------------------
# Calibration and quantization parameters.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QParams:
  """Scale (and zero point) of a quantized operand; q = clip(x/s + z)."""

  scale: jax.Array
  zero_point: jax.Array | None
  qmin: float
  qmax: float
  # Grid-unit interval where the straight-through estimator passes the
  # gradient; None: [qmin, qmax]. The ``aqt`` grid passes it everywhere, as
  # AQT's numerics do (``clip_gradient=False``).
  mask: tuple[float, float] | None = None

  @property
  def mask_range(self) -> tuple[float, float]:
    return (self.qmin, self.qmax) if self.mask is None else self.mask


jax.tree_util.register_dataclass(
    QParams, data_fields=["scale", "zero_point"],
    meta_fields=["qmin", "qmax", "mask"])


def observe_range(x: jax.Array, grid: str, axes: Axes) -> dict:
  """The statistic calibration needs: absmax, max, or (min, max), over the
  finite values of `x`.

  A NaN or an infinity (say in one example of a batch) is left out of the
  range, so it cannot turn the scale, and with it every value that shares
  the scale, into NaN; that value itself still quantizes to NaN (or, for an
  infinity, to the grid's end). A reduced slice with no finite value gives
  0, which the zero-range guard turns into a scale of 1.
  """
  finite = jnp.isfinite(x)

  def reduce(fn, v, fill):
    r = fn(jnp.where(finite, v, fill), axis=axes, keepdims=True)
    return jnp.where(jnp.isfinite(r), r, jnp.zeros_like(r))

  if grid in ("full", "restricted", "aqt"):
    return {"amax": reduce(jnp.max, jnp.abs(x), -jnp.inf)}
  if grid == "unsigned":
    return {"max": reduce(jnp.max, x, -jnp.inf)}
  return {"min": reduce(jnp.min, x, jnp.inf),
          "max": reduce(jnp.max, x, -jnp.inf)}


def _guard(r: jax.Array) -> jax.Array:
  return jnp.where(r <= 0.0, jnp.ones_like(r), r)


def qparams_from_range(rng: dict, grid: str, bits: int,
                       rounding: str = "half_even") -> QParams:
  """Scale (and zero point) mapping the observed range onto the grid."""
  qmin, qmax = grid_range(grid, bits)
  if grid == "asymmetric":
    lo = jnp.minimum(rng["min"], 0.0)
    hi = jnp.maximum(rng["max"], 0.0)
    scale = _guard(hi - lo) / qmax
    zp = jnp.clip(round_(-lo * safe_reciprocal(scale), rounding), qmin, qmax)
    return QParams(lax.stop_gradient(scale), lax.stop_gradient(zp), qmin, qmax)
  r = rng["amax"] if "amax" in rng else rng["max"]
  bound = grid_bound(grid, bits)
  scale = _guard(r) / bound
  mask = (-float("inf"), float("inf")) if grid == "aqt" else None
  return QParams(lax.stop_gradient(scale), None, qmin, qmax, mask)


def quantize(x: jax.Array, qp: QParams, rounding: str = "half_even"
             ) -> jax.Array:
  """Integer-valued (float dtype) grid values, with STE and clipping mask.

  Clip before rounding, as AQT does; the gradient w.r.t. x and the scale
  follows from autodiff of x * (1/s) through the clipping mask, which gives
  LSQ's step gradient when the scale is a parameter.
  """
  t = x * safe_reciprocal(qp.scale).astype(x.dtype)
  if qp.zero_point is not None:
    t = t + qp.zero_point.astype(x.dtype)
  if qp.mask is None:
    t = clip_ste(t, qp.qmin, qp.qmax)
  else:  # clipped to the grid, the gradient masked on the wider interval
    t = ste(clip_ste(t, *qp.mask), jnp.clip(t, qp.qmin, qp.qmax))
  return ste(t, round_(t, rounding))


def dequantize(q: jax.Array, qp: QParams) -> jax.Array:
  if qp.zero_point is not None:
    q = q - qp.zero_point.astype(q.dtype)
  return q * qp.scale.astype(q.dtype)


def fake_quant(x: jax.Array, qp: QParams, rounding: Rounding = "half_even"
               ) -> jax.Array:
  """dequantize(quantize(x, qp)): the same values and gradients.

  For a named rounding it runs as one `jax.custom_jvp` (`_fake_quant`):
  the forward is scale, clip, round, dequantize; the derivative applies the
  clipping mask and, where the scale (zero point) is differentiated, the
  step gradient of every element in one term, so XLA sees a few fused
  elementwise ops instead of the autodiff of the clip, the straight-through
  estimator and the guarded reciprocal. A callable rounding (AQuant
  borders) uses the plain composition.
  """
  if callable(rounding):
    return dequantize(quantize(x, qp, rounding), qp)
  if qp.zero_point is None:
    return _fake_quant_sym(x, qp.scale, qp.qmin, qp.qmax, rounding,
                           qp.mask_range)
  return _fake_quant_zp(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax,
                        rounding, qp.mask_range)


def _fq_parts(x, scale, zp, qmin, qmax, rounding):
  """(y, inv, t, q - zp) of the fake quant; the values of `quantize` and
  `dequantize` bit for bit.

  `quantize` clips through `clip_ste`, whose value is t inside the mask's
  slack and clip(t) outside; both round to the same integer, and
  tc + (round(tc) - tc) is that integer exactly (also its sign of zero) for
  tc = t and tc = clip(t) alike, so the plain clip is used here.
  """
  inv = safe_reciprocal(scale).astype(x.dtype)
  t = x * inv
  if zp is not None:
    t = t + zp.astype(x.dtype)
  tc = jnp.clip(t, qmin, qmax)
  q = tc + (round_(tc, rounding) - tc)
  if zp is not None:
    q = q - zp.astype(q.dtype)
  return q * scale.astype(q.dtype), inv, t, q


def _nonzero(tangent):
  """The tangent, or None for a symbolic zero."""
  return (None if isinstance(tangent, jax.custom_derivatives.SymbolicZero)
          else tangent)


def _fq_tangent(x, scale, zp, dx, ds, dzp, qmin, qmax, rounding, mask):
  """The fake quant and its tangent; a zero tangent is None.

  With the clipping mask m (the interval `mask`, inclusive, with slack),
    dy = m dx - (1 - m) s dzp + ds g,
    g = q - zp - m x inv = q - t (inside) or q - zp (outside)
  (g = q - zp where the reciprocal was guarded). The dx term is the
  straight-through estimator, exactly: its transpose passes the output
  gradient to the input unchanged inside the mask (not multiplied by
  s * (1/s), which is 1 only up to rounding), as AQT does; g is LSQ's step
  gradient -t + round(t) / -Qn / Qp as one elementwise term, so the step
  gradient is one sum.
  """
  y, inv, t, q = _fq_parts(x, scale, zp, qmin, qmax, rounding)
  inside = (t >= mask[0] - _EDGE_SLACK) & (t <= mask[1] + _EDGE_SLACK)
  s = scale.astype(x.dtype)
  dy = None
  if dx is not None:
    dy = jnp.where(inside, dx, jnp.zeros_like(dx))
  if dzp is not None:
    dzp = dzp.astype(x.dtype)
    dyz = jnp.where(inside, jnp.zeros_like(dzp), -dzp) * s
    dy = dyz if dy is None else dy + dyz
  if ds is not None:
    g = jnp.where(inside, q - (t if zp is None else t - zp.astype(t.dtype)),
                  q)
    g = jnp.where(jnp.isinf(lax.reciprocal(scale)), q, g)
    dys = g * ds.astype(x.dtype)
    dy = dys if dy is None else dy + dys
  if dy is None:
    dy = jnp.zeros_like(y)
  return y, jnp.broadcast_to(dy, y.shape).astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _fake_quant_sym(x, scale, qmin, qmax, rounding, mask):
  return _fq_parts(x, scale, None, qmin, qmax, rounding)[0]


@functools.partial(_fake_quant_sym.defjvp, symbolic_zeros=True)
def _fake_quant_sym_jvp(qmin, qmax, rounding, mask, primals, tangents):
  (x, scale), (dx, ds) = primals, tangents
  return _fq_tangent(x, scale, None, _nonzero(dx), _nonzero(ds), None, qmin,
                     qmax, rounding, mask)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _fake_quant_zp(x, scale, zp, qmin, qmax, rounding, mask):
  return _fq_parts(x, scale, zp, qmin, qmax, rounding)[0]


@functools.partial(_fake_quant_zp.defjvp, symbolic_zeros=True)
def _fake_quant_zp_jvp(qmin, qmax, rounding, mask, primals, tangents):
  (x, scale, zp), (dx, ds, dzp) = primals, tangents
  return _fq_tangent(x, scale, zp, _nonzero(dx), _nonzero(ds),
                     _nonzero(dzp), qmin, qmax, rounding, mask)


def int_dtype(qp: QParams):
  """Smallest signed integer type that holds q - zero_point."""
  lo = qp.qmin - (qp.qmax if qp.zero_point is not None else 0)
  hi = qp.qmax
  return jnp.int8 if (lo >= -128 and hi <= 127) else jnp.int16


def to_int(x: jax.Array, qp: QParams, rounding: str = "half_even"
           ) -> jax.Array:
  """Integer operand q - zero_point, as int8 (or int16 if it does not fit)."""
  q = lax.stop_gradient(quantize(x, qp, rounding))
  if qp.zero_point is not None:
    q = q - qp.zero_point.astype(q.dtype)
  return q.astype(int_dtype(qp))


def bf16_round(x: jax.Array) -> jax.Array:
  """Rounds to bfloat16 precision; gradient identity."""
  return ste(x, x.astype(jnp.bfloat16).astype(x.dtype))


# ---------------------------------------------------------------------------
# LSQ (Esser et al. 2019) and PACT (Choi et al. 2018).
# ---------------------------------------------------------------------------

# Smallest effective value of a learned step or clip (`positive`).
MIN_LEARNED_SCALE = 1e-8


def positive(v: jax.Array, eps: float = MIN_LEARNED_SCALE) -> jax.Array:
  """The value a quantizer uses for a learned step or clip `v`: max(|v|, eps).

  LSQ steps, PACT clips and DQ input clips are stored unconstrained (same
  names and shapes as ever, so checkpoints load) and a gradient step can
  carry one through zero, above all at 2 bits where the step gradient is
  large. A negative step used as is puts every input of an unsigned grid
  below 0, so the layer outputs zero and its gradients vanish: training
  then ends at chance accuracy without an error. Every quantizer therefore
  reads its learned step or clip through this map:

  * |v| rather than a clamp at eps: a stored -s quantizes exactly like s,
    so a step that overshot zero keeps a working layer instead of one that
    saturates every value on a grid of width eps until the optimizer walks
    it back. The loss is then even in v and the gradient is that of |v|:
    sign(v) times the gradient for the effective step, exact for v != 0.
  * The gradient of |v| is taken as +1 at v = 0 (Brevitas'
    ``abs_binary_sign_grad``, which it applies to learned scales), and the
    eps floor is straight-through (Brevitas' ``clamp_min_ste`` of learned
    scales), so a zero or tiny stored value still receives its gradient.

  A NaN stays NaN (the loop's finite-loss check reports it).
  """
  a = jnp.where(v >= 0, v, -v)  # |v|, derivative +1 at 0
  return a + lax.stop_gradient(jnp.maximum(a, eps) - a)


def lsq_range(grid: str, bits: int) -> tuple[float, float]:
  """(Qn, Qp): the grid is [-Qn, Qp]."""
  qmin, qmax = grid_range(grid, bits)
  return -qmin, qmax


def lsq_init_step(x: jax.Array, grid: str, bits: int, axes: Axes
                  ) -> jax.Array:
  """s = 2 mean|x| / sqrt(Qp), reduced over `axes` (keepdims)."""
  _, qp = lsq_range(grid, bits)
  mean = jnp.mean(jnp.abs(x), axis=axes, keepdims=True)
  return jnp.maximum(2.0 * mean / jnp.sqrt(qp), 1e-8)


def grad_scale(s: jax.Array, g: float) -> jax.Array:
  """Value s, gradient scaled by g."""
  return s * g + lax.stop_gradient(s - s * g)


def lsq_quant(x: jax.Array, step: jax.Array, grid: str, bits: int, n: int,
              rounding: str = "half_even") -> jax.Array:
  """LSQ fake quant; `n` is the number of elements sharing one step, which
  is used through `positive`."""
  qmin, qmax = grid_range(grid, bits)
  g = 1.0 / float(n * qmax) ** 0.5
  s = grad_scale(positive(step).astype(x.dtype), g)
  return fake_quant(x, QParams(s, None, qmin, qmax), rounding)


def pact_quant(x: jax.Array, alpha: jax.Array, bits: int,
               rounding: str = "half_even") -> jax.Array:
  """PACT: y = clip(x, 0, alpha), uniform on [0, alpha].

  d/d alpha = 1 where x >= alpha, else 0; STE inside (methods.md sec. 3).
  The stored `alpha` is used through `positive`.
  """
  alpha = positive(alpha).astype(x.dtype)
  y = jnp.where(x >= alpha, alpha, jnp.maximum(x, 0.0))
  qp = pact_qparams(lax.stop_gradient(alpha), bits)
  return ste(y, fake_quant(lax.stop_gradient(y), qp, rounding))


def pact_qparams(alpha: jax.Array, bits: int) -> QParams:
  """The grid of a PACT clip `alpha` (used through `positive`)."""
  return QParams(positive(jnp.asarray(alpha)) / (2.0 ** bits - 1), None, 0.0,
                 2.0 ** bits - 1)


def lsq_qparams(step: jax.Array, grid: str, bits: int) -> QParams:
  """The grid of an LSQ step (used through `positive`)."""
  qmin, qmax = grid_range(grid, bits)
  return QParams(positive(step), None, qmin, qmax)
