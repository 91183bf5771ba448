"""Direct Quantization (DQ): learnable weight levels, channel-weighted inputs.

Seed paper: "Direct Quantization for Training Highly Accurate Low Bit-width
Deep Neural Networks". Only its abstract could be read; everything below is
our design ([design]), written down in ../shared/design/methods.md sec. 4.

(a) Weights (`quant_weight`). Each group (the whole kernel, or one output
channel) owns a trainable vector of L = 2^bits levels, the parameter
``{name}_dq_levels`` of shape ``group_shape + (L,)``: ``(L,)`` per tensor,
``(out_features, L)`` per output channel. The forward is w_q = v[a], a = the
index of the nearest level to the latent (float) weight.

* Gradient rules [design]:
  - levels, exact: dL/dv_j = sum of dL/dw_q over the weights assigned to j
    (a segment sum, see `quantize_levels`);
  - latent weights, plain straight-through: dL/dw = dL/dw_q, unchanged and
    unmasked (also beyond the outer levels), so a large enough step moves a
    weight into the cell of another level.
* Sorted and distinct by construction [design]: the stored parameter may
  leave order under SGD; the forward uses `sorted_levels(v)`, which sorts v
  and enforces a minimum gap between neighbours (straight-through). While the
  stored levels are sorted and further apart than that gap (always at init)
  it is the identity, and in any case each stored level receives exactly the
  segment sum of the sorted position it lands in.
* Ties: a weight exactly on the midpoint of two levels goes to the lower one.
* Levels are a lookup table: integer export stores b-bit indices plus the
  table (`export_indices`); `is_uniform` tells whether the table is a uniform
  grid that a plain int-b kernel could use instead.

(b) Inputs (`quant_input`). A uniform quantizer with a clip alpha: unsigned
grid [0, alpha] (post-ReLU, ``grid='unsigned'``) or signed (``grid='full'``,
absmax alpha mapped to 2^(b-1) - 0.5 as in `aqt_ext.quantizers`). alpha is
fitted to the per-channel normalised error (channel = last axis)

    E(alpha) = (1/C) sum_c ||x_c - Q(x_c; alpha)||^2 / (||x_c||^2 + eps)

rather than the pooled MSE, which the few high-variance channels dominate.

* ``calibration='dynamic'``: alpha is the parameter ``{name}_dq_alpha``,
  initialised by `fit_clip` on the init batch (``pact_init`` if that batch is
  all zero). The forward uses PACT gradients (d/d alpha = qmax/bound where x
  is clipped, STE inside). ``dq_err_weight * E(alpha)`` is sown into the
  ``quant_losses`` collection as ``{name}_dq_err`` (x stop-gradiented, so it
  trains alpha only; the training loop adds it to the loss). Inside E the
  step alpha/bound gets the LSQ gradient (round(x/s) - x/s inside, the grid
  end where clipped), so E pulls alpha both ways [design]. [design] This E
  is estimated on every `AUX_STRIDE`-th example of the batch (axis 0),
  reusing the forward's quantized values: it halves the cost, and on
  XLA:CPU the slice keeps E's sums from sharing (and so materialising) the
  forward quantizer's full-size broadcasts.
* ``calibration='static'``: no parameter and no auxiliary loss; each batch's
  `fit_clip` is tracked by EMA in ``quant_stats`` (updated while that
  collection is mutable and the module is not initialising, frozen
  otherwise; the batch clip is used until the first update).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext import quantizers as qz
from aqt_ext.config import TensorQuant
from aqt_ext.layers import STATS, QuantInitWarning, in_lifted_loop, layer_name

LOSSES = "quant_losses"
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
WEIGHT_GRIDS = ("full",)
INPUT_GRIDS = ("unsigned", "full")
INPUT_GRANULARITIES = ("per_tensor",)
LLOYD_ITERS = 100  # [design] fixed; near-converged up to 4 bits (N(0,1))
MIN_GAP = 1e-3  # [design] minimum level gap (see `sorted_levels`)
NUM_CLIP_CANDIDATES = 32  # [design] clip candidates k/32 * batch max
CHANNEL_EPS = 1e-8  # [design] absolute eps of E's channel energy
AUX_STRIDE = 2  # [design] the auxiliary E uses every 2nd example of a batch
_CLIP_STATIC = ("bits", "grid", "num_candidates", "rounding")


def _check(field: str, value: str, allowed: tuple[str, ...]):
  """Raises a ValueError naming TensorQuant.`field` and its allowed values."""
  if value not in allowed:
    raise ValueError(
        f"TensorQuant.{field}={value!r} is not allowed with method='dq' "
        f"here; allowed values: {', '.join(repr(a) for a in allowed)}")


# ---------------------------------------------------------------------------
# (a) Learnable levels: pure functions.
# Layout: `levels` has shape group_shape + (L,) and group_shape equals the
# trailing axes of `w` (() per tensor, (out,) per output channel).
# ---------------------------------------------------------------------------

def _as_groups(w: jax.Array, levels: jax.Array) -> tuple[jax.Array,
                                                         jax.Array]:
  """w as (N, G) and levels as (G, L); G = number of groups."""
  gshape = levels.shape[:-1]
  if w.shape[w.ndim - len(gshape):] != gshape:
    raise ValueError(f"levels of shape {levels.shape} need w's trailing axes "
                     f"to be {gshape}, got w of shape {w.shape}")
  g = math.prod(gshape)
  return w.reshape(-1, g), levels.reshape(g, levels.shape[-1])


def _assign2d(w2: jax.Array, lv2: jax.Array) -> jax.Array:
  """Nearest-level index of each w2[n, g] in sorted lv2[g]; int32 (N, G).

  Branchless binary search over the L - 1 midpoints (padded with +inf to L,
  a power of two): log2(L) gathers per weight; the index is the number of
  midpoints strictly below w, so a midpoint tie goes to the lower level.
  """
  num = lv2.shape[-1]
  mids = 0.5 * (lv2[:, 1:] + lv2[:, :-1])
  table = jnp.concatenate([mids, jnp.full_like(mids[:, :1], jnp.inf)],
                          axis=1).T  # (L, G)
  w2 = w2.astype(table.dtype)
  pos = jnp.zeros(w2.shape, jnp.int32)
  step = num // 2
  while step:
    probe = jnp.take_along_axis(table, pos + (step - 1), axis=0)
    pos = jnp.where(probe < w2, pos + step, pos)
    step //= 2
  return pos


@jax.jit
def assign(w: jax.Array, levels: jax.Array) -> jax.Array:
  """Index (int32, w's shape) of the nearest of the sorted `levels`.

  `levels` has shape group_shape + (L,), group_shape = w's trailing axes.
  """
  w2, lv2 = _as_groups(w, levels)
  return _assign2d(w2, lv2).reshape(w.shape)


@jax.jit
def quantize_levels(w: jax.Array, levels: jax.Array) -> jax.Array:
  """w_q = levels[assign(w, levels)], in w's dtype; `levels` sorted.

  Gradients [design]: d/d levels[..., j] = segment sum of the cotangent over
  the weights assigned to j (exact); d/dw = the cotangent (plain STE).
  """
  return _quantize_levels(w, levels)


@jax.custom_vjp
def _quantize_levels(w, levels):
  return _quantize_fwd(w, levels)[0]


def _quantize_fwd(w, levels):
  w2, lv2 = _as_groups(w, levels)
  idx = _assign2d(w2, lv2)
  wq = jnp.take_along_axis(lv2.T, idx, axis=0)
  return wq.reshape(w.shape).astype(w.dtype), (idx, levels)


def _quantize_bwd(res, ct):
  idx, levels = res
  num = levels.shape[-1]
  groups = idx.shape[1]
  seg = idx + num * lax.broadcasted_iota(jnp.int32, idx.shape, 1)
  dlv = jax.ops.segment_sum(ct.reshape(idx.shape).astype(levels.dtype).ravel(),
                            seg.ravel(), num_segments=groups * num)
  return ct, dlv.reshape(levels.shape)


_quantize_levels.defvjp(_quantize_fwd, _quantize_bwd)


@functools.partial(jax.jit, static_argnames="min_gap")
def sorted_levels(v: jax.Array, min_gap: float = MIN_GAP) -> jax.Array:
  """The levels the forward uses: sort(v) with a minimum neighbour gap.

  [design] gap = min_gap * max(span, max|v|, 1e-12) / (L - 1): a small
  fraction of the mean level gap, and still many float ulps when levels
  nearly or exactly coincide. With s = sort(v) and c = cummax(s_j - j gap):
  u_j = s_j where s_j - j gap is its own running max (s_j is at least a gap
  above u_{j-1}), else c_j + j gap = u_{j-1} + gap. So while neighbours are
  a gap apart (always at init) u is exactly s. The gap is straight-through:
  d u_j / d s_j = 1, so each stored level gets the gradient of its own
  position (the sort's permutation of the incoming gradient), also a level
  the gap pushed up.
  """
  s = jnp.sort(v, axis=-1)
  num = v.shape[-1]
  ref = jnp.maximum(s[..., -1:] - s[..., :1],
                    jnp.max(jnp.abs(s), -1, keepdims=True))
  gap = lax.stop_gradient(min_gap * jnp.maximum(ref, 1e-12) / (num - 1))
  ramp = jnp.arange(num, dtype=v.dtype) * gap
  shifted = lax.stop_gradient(s) - ramp
  run_max = lax.cummax(shifted, axis=v.ndim - 1)
  return jnp.where(shifted >= run_max, s, qz.ste(s, run_max + ramp))


def _lloyd(w2: jax.Array, lv2: jax.Array, iters: int) -> jax.Array:
  """`iters` Lloyd (1-D k-means) steps; an empty cell keeps its level."""
  groups, num = lv2.shape
  gid = num * lax.broadcasted_iota(jnp.int32, w2.shape, 1)
  seg_sum = lambda d, i: jax.ops.segment_sum(  # noqa: E731
      d.ravel(), i.ravel(), num_segments=groups * num).reshape(groups, num)

  def step(_, lv):
    seg = _assign2d(w2, lv) + gid
    total = seg_sum(w2, seg)
    count = seg_sum(jnp.ones_like(w2), seg)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), lv)

  return lax.fori_loop(0, iters, step, lv2)


@functools.partial(jax.jit,
                   static_argnames=("bits", "axes", "method"))
def init_levels(w: jax.Array, bits: int, axes: tuple[int, ...],
                method: str = "kmeans") -> jax.Array:
  """Initial levels from float weights, one vector per group.

  Args:
    w: float weights.
    bits: L = 2^bits levels.
    axes: the axes reduced into one group; the other axes index groups.
    method: ``kmeans``: Lloyd-Max, `LLOYD_ITERS` Lloyd steps from the
      (j + 1/2) / L quantiles (order statistics of rank floor((j + 1/2) N /
      L); deterministic); ``uniform``: LSQ step
      s = 2 mean|w| / sqrt(Qp), levels s * (-2^(b-1) .. 2^(b-1) - 1).

  Returns:
    float32 levels of shape (shape of the kept axes) + (L,), passed through
    `sorted_levels` (so sorted and distinct, also for constant groups).
  """
  if method not in ("kmeans", "uniform"):
    raise ValueError(f"TensorQuant.dq_init={method!r} is not allowed; "
                     "allowed values: 'kmeans', 'uniform'")
  axes = tuple(sorted(a % w.ndim for a in axes))
  kept = tuple(a for a in range(w.ndim) if a not in axes)
  gshape = tuple(w.shape[a] for a in kept)
  num = 2 ** bits
  w2 = jnp.transpose(w, axes + kept).reshape(-1, math.prod(gshape))
  w2 = w2.astype(jnp.float32)
  if method == "uniform":
    half = 2 ** (bits - 1)
    step = qz.lsq_init_step(w2, "full", bits, (0,))  # (1, G)
    lv2 = step.T * jnp.arange(-half, half, dtype=jnp.float32)
  else:
    n = w2.shape[0]
    ranks = [int((j + 0.5) * n / num) for j in range(num)]
    start = jnp.sort(w2, axis=0)[jnp.array(ranks)].T  # (G, L) quantiles
    lv2 = _lloyd(w2, start, LLOYD_ITERS)
  return sorted_levels(lv2).reshape(gshape + (num,))


def export_indices(w: jax.Array, levels: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(uint8 b-bit indices in w's shape, the lookup table sorted_levels(v)).

  `levels` is the stored parameter; w ~ table[indices] per group.
  """
  table = sorted_levels(levels)
  return assign(w, table).astype(jnp.uint8), table


def is_uniform(levels: jax.Array, rtol: float = 1e-3) -> bool:
  """Whether every group's table is equally spaced within rtol (host-side).

  Such a table is a uniform int-b grid (scale = the gap, zero point from the
  first level), so the layer could export as plain integers instead.
  """
  diff = jnp.diff(sorted_levels(levels), axis=-1)
  mean = jnp.mean(diff, axis=-1, keepdims=True)
  return bool(jnp.all(jnp.abs(diff - mean) <= rtol * mean))


# ---------------------------------------------------------------------------
# (b) Channel-error-weighted clip: pure functions.
# ---------------------------------------------------------------------------

def _clip_qparams(alpha: jax.Array, bits: int, grid: str) -> qz.QParams:
  qmin, qmax = qz.grid_range(grid, bits)
  return qz.QParams(alpha / qz.grid_bound(grid, bits), None, qmin, qmax)


def _guard_alpha(alpha: jax.Array) -> jax.Array:
  """alpha floored at 1e-8, so a non-positive clip never divides by zero."""
  return jnp.maximum(alpha, 1e-8)


@functools.partial(jax.jit,
                   static_argnames=("bits", "grid", "rounding"))
def clip_quant(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
               rounding: str = "half_even") -> jax.Array:
  """Uniform fake quant clipped at alpha with PACT gradients.

  ``unsigned``: [0, alpha], scale alpha / (2^b - 1) (exactly PACT).
  ``full``: scale alpha / (2^(b-1) - 0.5), grid [-2^(b-1), 2^(b-1) - 1],
  so the clip range is [lo, hi] = [qmin, qmax] * scale.
  Gradients: x gets 1 strictly inside (lo, hi), else 0 (STE with the
  clipping mask); alpha gets qmax/bound where x >= hi and qmin/bound where
  x <= lo (PACT; only the first for ``unsigned``), 0 while alpha <= 1e-8.
  """
  return _clip_quant(x, jnp.asarray(alpha), bits, grid, rounding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _clip_quant(x, alpha, bits, grid, rounding):
  return _clip_quant_fwd(x, alpha, bits, grid, rounding)[0]


def _clip_quant_fwd(x, alpha, bits, grid, rounding):
  qp = _clip_qparams(_guard_alpha(alpha).astype(x.dtype), bits, grid)
  return qz.fake_quant(x, qp, rounding), (x, alpha)


def _clip_quant_bwd(bits, grid, rounding, res, ct):
  del rounding
  x, alpha = res
  qp = _clip_qparams(_guard_alpha(alpha).astype(x.dtype), bits, grid)
  lo, hi = qp.qmin * qp.scale, qp.qmax * qp.scale
  bound = qz.grid_bound(grid, bits)
  dx = jnp.where((x > lo) & (x < hi), ct, jnp.zeros_like(ct))
  da = qp.qmax / bound * jnp.sum(jnp.where(x >= hi, ct, 0.0),
                                 dtype=jnp.float32)
  if qp.qmin:
    da += qp.qmin / bound * jnp.sum(jnp.where(x <= lo, ct, 0.0),
                                    dtype=jnp.float32)
  da = jnp.where(alpha > 1e-8, da, 0.0).astype(alpha.dtype)
  return dx, da


_clip_quant.defvjp(_clip_quant_fwd, _clip_quant_bwd)


def _fake_quant(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                rounding: str) -> jax.Array:
  """Q(x; alpha), the values of `clip_quant`, without its gradients."""
  qp = _clip_qparams(_guard_alpha(lax.stop_gradient(alpha)), bits, grid)
  return qz.fake_quant(lax.stop_gradient(x), qp, rounding)


def _error_terms(x: jax.Array, q: jax.Array, alpha: jax.Array, bits: int,
                 grid: str, eps: float) -> tuple[jax.Array, jax.Array]:
  """(E(alpha), dE/d alpha) from x and q = Q(x; alpha); no autodiff.

  [design] dE/d alpha uses LSQ's straight-through step gradient: with
  s = alpha / bound and the clip range [lo, hi] = [qmin, qmax] * s,
  dQ/ds = round(x/s) - x/s = -(x - q)/s inside and hi/s (lo/s) where x is
  clipped above (below). With xc = clip(x, lo, hi), which equals q where x
  is clipped, s (x - q) dQ/ds = hi max(x - hi, 0) + lo min(x - lo, 0)
  - (xc - q)^2 for every element. So E needs three per-channel sums of
  plain elementwise terms, which XLA:CPU reduces several times faster than
  sums fused with the rounding or more than three sibling sums.
  """
  x = lax.stop_gradient(x).astype(jnp.float32)
  q = lax.stop_gradient(q).astype(jnp.float32)
  qp = _clip_qparams(_guard_alpha(lax.stop_gradient(alpha)), bits, grid)
  lo, hi = qp.qmin * qp.scale, qp.qmax * qp.scale
  red = tuple(range(x.ndim - 1))
  err = jnp.sum(jnp.square(x - q), axis=red)
  inv_energy = 1.0 / (jnp.sum(jnp.square(x), axis=red) + eps)
  s_e_dq = jnp.sum(hi * jnp.maximum(x - hi, 0.0) + lo * jnp.minimum(x - lo, 0.0)
                   - jnp.square(jnp.clip(x, lo, hi) - q), axis=red)
  value = jnp.mean(err * inv_energy)
  slope = jnp.mean(-2.0 * s_e_dq * inv_energy) / (qp.scale
                                                  * qz.grid_bound(grid, bits))
  return value, slope


def _with_slope(value: jax.Array, slope: jax.Array, alpha: jax.Array
                ) -> jax.Array:
  """Value `value`, gradient `slope` w.r.t. alpha."""
  return value + (alpha - lax.stop_gradient(alpha)) * lax.stop_gradient(slope)


@functools.partial(jax.jit,
                   static_argnames=("bits", "grid", "rounding", "eps"))
def channel_error(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                  rounding: str = "half_even", eps: float = CHANNEL_EPS
                  ) -> jax.Array:
  """E(alpha) = mean_c ||x_c - Q(x_c)||^2 / (||x_c||^2 + eps), c = last axis.

  x is stop-gradiented: E trains alpha only, with LSQ's step gradient (not
  PACT's), so it weighs rounding error against clipping error (see
  `_error_terms`).
  """
  q = _fake_quant(x, alpha, bits, grid, rounding)
  return _with_slope(*_error_terms(x, q, alpha, bits, grid, eps), alpha)


def pooled_error(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                 rounding: str = "half_even") -> jax.Array:
  """Pooled MSE mean((x - Q(x))^2), the objective DQ replaces (no grad)."""
  q = _fake_quant(x, alpha, bits, grid, rounding)
  return jnp.mean(jnp.square(lax.stop_gradient(x) - q))


def clip_candidates(x: jax.Array, grid: str, num_candidates: int
                    ) -> jax.Array:
  """alpha_k = k / K * batch max (max|x| for ``full``), k = 1..K.

  An all-zero (or all-negative unsigned) batch uses max = 1 (AQT's
  zero-group guard).
  """
  top = jnp.max(jnp.abs(x)) if grid == "full" else jnp.max(x)
  top = jnp.where(top > 0, top, 1.0).astype(jnp.float32)
  return top * jnp.arange(1, num_candidates + 1,
                          dtype=jnp.float32) / num_candidates


def _search_clip(x: jax.Array, grid: str, num_candidates: int,
                 objective: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The candidate clip with the lowest objective (first one on ties)."""
  _check("grid", grid, INPUT_GRIDS)
  x = lax.stop_gradient(x)
  cands = clip_candidates(x, grid, num_candidates)
  return cands[jnp.argmin(lax.map(objective, cands))]


@functools.partial(jax.jit, static_argnames=_CLIP_STATIC)
def fit_clip(x: jax.Array, bits: int, grid: str,
             num_candidates: int = NUM_CLIP_CANDIDATES,
             rounding: str = "half_even") -> jax.Array:
  """Grid search of alpha minimising `channel_error` (no gradient)."""
  return _search_clip(x, grid, num_candidates, lambda a: _error_terms(
      x, _fake_quant(x, a, bits, grid, rounding), a, bits, grid,
      CHANNEL_EPS)[0])


@functools.partial(jax.jit, static_argnames=_CLIP_STATIC)
def pooled_mse_clip(x: jax.Array, bits: int, grid: str,
                    num_candidates: int = NUM_CLIP_CANDIDATES,
                    rounding: str = "half_even") -> jax.Array:
  """Grid search of alpha minimising `pooled_error`: the baseline."""
  return _search_clip(x, grid, num_candidates, lambda a: pooled_error(
      x, a, bits, grid, rounding))


# ---------------------------------------------------------------------------
# Flax entry points (called from `aqt_ext.layers.quant_operand`).
# ---------------------------------------------------------------------------

def quant_weight(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant,
                 axes: qz.OperandAxes) -> jax.Array:
  """DQ fake-quantized kernel; creates the param ``{name}_dq_levels``."""
  _check("granularity", tq.granularity, WEIGHT_GRANULARITIES)
  _check("grid", tq.grid, WEIGHT_GRIDS)
  red = qz.reduce_axes(x.ndim, axes, tq.granularity)
  # Group axes last (the identity for QuantDense / QuantConv kernels).
  perm = red + tuple(a for a in range(x.ndim) if a not in red)
  levels = mdl.param(f"{name}_dq_levels", lambda _: init_levels(
      lax.stop_gradient(x), tq.bits, red, tq.dq_init))
  wq = quantize_levels(jnp.transpose(x, perm), sorted_levels(levels))
  return jnp.transpose(wq, tuple(perm.index(a) for a in range(x.ndim)))


def init_alpha(x: jax.Array, tq: TensorQuant) -> jax.Array:
  """`fit_clip` on the init batch; ``tq.pact_init`` if it is all zero."""
  x = lax.stop_gradient(x)
  alpha = fit_clip(x, tq.bits, tq.grid, rounding=tq.rounding)
  return jnp.where(jnp.any(x != 0), alpha, tq.pact_init).astype(jnp.float32)


def _static_clip(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant
                 ) -> jax.Array:
  """EMA of per-batch `fit_clip` in `quant_stats` (see module docstring)."""
  count = mdl.variable(STATS, f"{name}_count", lambda: jnp.zeros((), jnp.int32))
  ema = mdl.variable(STATS, f"{name}_dq_clip",
                     lambda: jnp.zeros((), jnp.float32))
  def batch():
    return fit_clip(x, tq.bits, tq.grid, rounding=tq.rounding)

  if mdl.is_initializing():
    return batch()
  if mdl.is_mutable_collection(STATS):
    new = batch()
    d = tq.ema_decay
    ema.value = jnp.where(count.value == 0, new,
                          d * ema.value + (1 - d) * new)
    count.value = count.value + 1
    return ema.value
  return lax.cond(count.value > 0, lambda: ema.value, batch)


def _input_alpha(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant
                 ) -> jax.Array:
  """The clip of the input: the EMA (static) or the parameter (dynamic),
  the latter read through `quantizers.positive` (a learned clip that an
  update carried below zero still clips at its magnitude)."""
  if tq.calibration == "static":
    return _static_clip(mdl, name, x, tq)
  return qz.positive(mdl.param(f"{name}_dq_alpha",
                               lambda _: _alpha_init(mdl, name, x, tq)))


def _alpha_init(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant
                ) -> jax.Array:
  """`init_alpha` of the init batch; inside a flax loop body (which cannot
  create a parameter from its data) ``tq.pact_init``, with a warning."""
  if not in_lifted_loop(mdl):
    return init_alpha(x, tq)
  warnings.warn(
      f"aqt_ext: layer {layer_name(mdl)}: its {name} DQ clip cannot be fitted "
      "to data inside a scan body (nn.scan / nn.RNN create their broadcast "
      f"parameters without the scanned values); it starts at pact_init = "
      f"{tq.pact_init:g}", QuantInitWarning, stacklevel=2)
  return jnp.asarray(tq.pact_init, jnp.float32)


def input_qparams(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant
                  ) -> qz.QParams:
  """The uniform grid of a DQ input (scale from its clip), for integer
  execution: ``qz.to_int(x, input_qparams(...), tq.rounding)`` holds the
  integers whose dequantized values `quant_input` returns."""
  _check("grid", tq.grid, INPUT_GRIDS)
  _check("granularity", tq.granularity, INPUT_GRANULARITIES)
  alpha = lax.stop_gradient(_input_alpha(mdl, name, x, tq))
  return _clip_qparams(_guard_alpha(alpha).astype(x.dtype), tq.bits, tq.grid)


def lut_kernel(ints: jax.Array, table: jax.Array, bits: int) -> jax.Array:
  """The kernel from exported indices: ``table[ints + 2^(b-1)]`` per group
  (`table` of shape ``(L,)`` or ``(out_features, L)``, out features last in
  the kernel)."""
  idx = ints.astype(jnp.int32) + 2 ** (bits - 1)
  if table.ndim == 1:
    return table[idx]
  return table[jnp.arange(idx.shape[-1]), idx]


def quant_input(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant,
                axes: qz.OperandAxes) -> jax.Array:
  """DQ fake-quantized layer input (see module docstring, part (b)).

  `axes` is unused: the clip is per tensor and E's channel is the last axis.
  """
  del axes
  _check("grid", tq.grid, INPUT_GRIDS)
  _check("granularity", tq.granularity, INPUT_GRANULARITIES)
  alpha = _input_alpha(mdl, name, x, tq)
  y = clip_quant(x, alpha, tq.bits, tq.grid, tq.rounding)
  if tq.calibration == "static":
    return y
  if (tq.dq_err_weight > 0 and mdl.is_mutable_collection(LOSSES)
      and not mdl.is_initializing()):
    err = _with_slope(*_error_terms(x[::AUX_STRIDE], y[::AUX_STRIDE], alpha,
                                    tq.bits, tq.grid, CHANNEL_EPS), alpha)
    mdl.sow(LOSSES, f"{name}_dq_err", tq.dq_err_weight * err)
  return y
