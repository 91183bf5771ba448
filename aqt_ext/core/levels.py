"""Direct Quantization weights: learnable levels (framework-free).

Each group (the whole kernel, or one output channel) owns a vector of
L = 2^bits levels, shape ``group_shape + (L,)``: ``(L,)`` per tensor,
``(out_features, L)`` per output channel, group axes last in the weight. The
forward is w_q = v[a], a = the index of the nearest level to the latent
weight. Everything here is our design ([design], methods.md sec. 4):

* levels get the exact gradient: dL/dv_j = the segment sum of dL/dw_q over
  the weights assigned to j (`quantize_levels`); latent weights get the
  plain straight-through dL/dw = dL/dw_q, unmasked, so a large enough step
  moves a weight into another level's cell;
* the forward uses `sorted_levels(v)`: sorted, with a minimum neighbour gap
  (straight-through), the identity while the stored levels are sorted and
  a gap apart (always at init);
* a weight exactly on a midpoint goes to the lower level;
* export stores b-bit indices plus the table (`export_indices`, `lut_kernel`);
  `is_uniform` tells whether a table is a uniform int-b grid.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext.core import quantizers as qz

LLOYD_ITERS = 100  # [design] fixed; near-converged up to 4 bits (N(0,1))
MIN_GAP = 1e-3  # [design] minimum level gap (see `sorted_levels`)


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


def _lookup(x, levels, index):
  """(levels[index(x2, lv2)] in x's shape, x2, the (N, G) indices), with
  (x2, lv2) the group view of `x` and `levels`."""
  x2, lv2 = _as_groups(x, levels)
  idx = index(x2, lv2)
  return jnp.take_along_axis(lv2.T, idx, axis=0).reshape(x.shape), x2, idx


def _quantize_fwd(w, levels):
  wq, _, idx = _lookup(w, levels, _assign2d)
  return wq.astype(w.dtype), (idx, levels)


def _quantize_bwd(res, ct):
  idx, levels = res
  num = levels.shape[-1]
  groups = idx.shape[1]
  seg = idx + num * lax.broadcasted_iota(jnp.int32, idx.shape, 1)
  dlv = jax.ops.segment_sum(ct.reshape(idx.shape).astype(levels.dtype).ravel(),
                            seg.ravel(), num_segments=groups * num)
  return ct, dlv.reshape(levels.shape)


_quantize_levels.defvjp(_quantize_fwd, _quantize_bwd)


# ---------------------------------------------------------------------------
# The direct update: quantized weights as level positions.
# ---------------------------------------------------------------------------

def _side_gaps(lv2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(gap below, gap above) each level of sorted (G, L) levels, as (L, G);
  an end level uses its one neighbour gap on both sides."""
  d = jnp.diff(lv2, axis=-1)
  below = jnp.concatenate([d[:, :1], d], axis=-1)
  above = jnp.concatenate([d, d[:, -1:]], axis=-1)
  return below.T, above.T


def position_index(u: jax.Array, num: int) -> jax.Array:
  """The level a position u = a + r stands for: the nearest integer, a tie
  (r = +1/2) to the lower level, clipped to [0, num - 1]; int32."""
  return jnp.clip(jnp.ceil(u - 0.5), 0, num - 1).astype(jnp.int32)


@jax.jit
def init_positions(w: jax.Array, levels: jax.Array) -> jax.Array:
  """Positions u = a + r of the weights `w` on the sorted `levels`: a = the
  nearest level (`assign`), r = the offset from it in units of the gap
  towards the weight, in [-1/2, 1/2]; float32, w's shape. So
  ``quantize_positions(init_positions(w, v), v) == quantize_levels(w, v)``.
  """
  w2, lv2 = _as_groups(w, levels)
  w2 = w2.astype(lv2.dtype)
  idx = _assign2d(w2, lv2)
  below, above = _side_gaps(lv2)
  v_a = jnp.take_along_axis(lv2.T, idx, axis=0)
  gap = jnp.where(w2 >= v_a, jnp.take_along_axis(above, idx, axis=0),
                  jnp.take_along_axis(below, idx, axis=0))
  r = jnp.clip((w2 - v_a) / jnp.maximum(gap, 1e-30), -0.5, 0.5)
  return (idx + r).astype(jnp.float32).reshape(w.shape)


@jax.jit
def quantize_positions(u: jax.Array, levels: jax.Array) -> jax.Array:
  """w_q = levels[position_index(u)] per group (`levels` sorted, group
  axes last in u, as in `quantize_levels`), in `levels`' dtype.

  Gradients, the direct update [design]: d/d levels[..., j] = the segment
  sum of the cotangent g over the weights at level j (exact, as in
  `quantize_levels`); d/du = g / gap, the gap to the neighbouring level in
  the direction the step -g moves the weight (the gap below for g > 0), so
  that a gradient step of size eta on u moves the weight's position by the
  weight-space step eta * g expressed in level gaps: the residual r takes
  the step, and the weight changes level only when r crosses a midpoint
  (then by one level unless the step spans more than a further gap). A
  position beyond the end levels (u < -1/2 or u > L - 1/2) gets no gradient
  that would push it further out (the clip mask of the direct path).
  """
  return _quantize_positions(u, levels)


@jax.custom_vjp
def _quantize_positions(u, levels):
  return _quantize_positions_fwd(u, levels)[0]


def _quantize_positions_fwd(u, levels):
  wq, u2, idx = _lookup(u, levels, lambda u2, lv2: position_index(
      u2, lv2.shape[-1]))
  return wq, (u2, idx, levels)


def _quantize_positions_bwd(res, ct):
  u2, idx, levels = res
  num = levels.shape[-1]
  _, dlv = _quantize_bwd((idx, levels), ct)
  g = ct.reshape(idx.shape).astype(jnp.float32)
  below, above = _side_gaps(levels.reshape(idx.shape[1], num))
  gap = jnp.where(g > 0, jnp.take_along_axis(below, idx, axis=0),
                  jnp.take_along_axis(above, idx, axis=0))
  du = g / jnp.maximum(gap, 1e-30).astype(jnp.float32)
  outward = ((u2 < -0.5) & (g > 0)) | ((u2 > num - 0.5) & (g < 0))
  du = jnp.where(outward, 0.0, du)
  return du.reshape(ct.shape).astype(u2.dtype), dlv


_quantize_positions.defvjp(_quantize_positions_fwd, _quantize_positions_bwd)


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


def export_indices(w: jax.Array, levels: jax.Array,
                   positions: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(uint8 b-bit indices in w's shape, the lookup table sorted_levels(v)).

  `levels` is the stored parameter; w ~ table[indices] per group. With
  `positions` (the direct update's), the indices are theirs
  (`position_index`) and `w` is not read.
  """
  table = sorted_levels(levels)
  if positions is not None:
    return position_index(positions, table.shape[-1]).astype(jnp.uint8), table
  return assign(w, table).astype(jnp.uint8), table


def is_uniform(levels: jax.Array, rtol: float = 1e-3) -> bool:
  """Whether every group's table is equally spaced within rtol (host-side).

  Such a table is a uniform int-b grid (scale = the gap, zero point from the
  first level), so the layer could export as plain integers instead.
  """
  diff = jnp.diff(sorted_levels(levels), axis=-1)
  mean = jnp.mean(diff, axis=-1, keepdims=True)
  return bool(jnp.all(jnp.abs(diff - mean) <= rtol * mean))


def lut_kernel(ints: jax.Array, table: jax.Array, bits: int) -> jax.Array:
  """The kernel from exported indices: ``table[ints + 2^(b-1)]`` per group
  (`table` of shape ``(L,)`` or ``(out_features, L)``, out features last in
  the kernel)."""
  idx = ints.astype(jnp.int32) + 2 ** (bits - 1)
  if table.ndim == 1:
    return table[idx]
  return table[jnp.arange(idx.shape[-1]), idx]
