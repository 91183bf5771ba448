"""Direct Quantization inputs: the channel-error-weighted clip (framework-free).

A uniform quantizer with a clip alpha: unsigned grid [0, alpha] (post-ReLU,
``grid='unsigned'``) or signed (``grid='full'``, absmax alpha mapped to
2^(b-1) - 0.5). The paper's abstract (Direct Quantization, arXiv
2012.13762; only the abstract could be read) asks for a clip whose error is
small "in the majority of channels" instead of one driven by a few
high-variance channels. [design] alpha is fitted to the per-channel error,
each channel's relative to its energy floored at the median channel's
(channel = last axis):

    E(alpha) = (1/C) sum_c ||x_c - Q(x_c; alpha)||^2 / (max(e_c, median_c' e_c') + eps),
    e_c = ||x_c||^2.

Why the floor: the pooled MSE (no normaliser) lets a few wide channels
pull the clip up, and the plain normalised mean (normaliser e_c) lets a few
near-silent channels pull it down (their tiny absolute errors divided by
tiny energies: 40 channels of std 1 plus 24 of std 0.05 at 4 bits took the
clip from 2.96 to 1.27 and made the median channel's error 20x worse). With
the floor, a channel louder than the median one counts relative to its own
energy (its large absolute error is discounted), and a quieter one counts
by its absolute error on the median channel's scale (as in the pooled
MSE), so neither minority can outweigh the channels around the median.
`fit_clip` grid-searches E, `channel_error` is its differentiable form
(LSQ's step gradient, `error_terms`), and `clip_quant` is the forward with
PACT gradients.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext.core import quantizers as qz

INPUT_GRIDS = ("unsigned", "full")
NUM_CLIP_CANDIDATES = 32  # [design] clip candidates k/32 * batch max
CHANNEL_EPS = 1e-8  # [design] absolute eps of E's channel energy
_CLIP_STATIC = ("bits", "grid", "num_candidates", "rounding")


def clip_qparams(alpha: jax.Array, bits: int, grid: str) -> qz.QParams:
  qmin, qmax = qz.grid_range(grid, bits)
  return qz.QParams(alpha / qz.grid_bound(grid, bits), None, qmin, qmax)


def guard_alpha(alpha: jax.Array) -> jax.Array:
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
  qp = clip_qparams(guard_alpha(alpha).astype(x.dtype), bits, grid)
  return qz.fake_quant(x, qp, rounding), (x, alpha)


def _clip_quant_bwd(bits, grid, rounding, res, ct):
  del rounding
  x, alpha = res
  qp = clip_qparams(guard_alpha(alpha).astype(x.dtype), bits, grid)
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


def values_of(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                rounding: str) -> jax.Array:
  """Q(x; alpha), the values of `clip_quant`, without its gradients."""
  qp = clip_qparams(guard_alpha(lax.stop_gradient(alpha)), bits, grid)
  return qz.fake_quant(lax.stop_gradient(x), qp, rounding)


def error_terms(x: jax.Array, q: jax.Array, alpha: jax.Array, bits: int,
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
  qp = clip_qparams(guard_alpha(lax.stop_gradient(alpha)), bits, grid)
  lo, hi = qp.qmin * qp.scale, qp.qmax * qp.scale
  red = tuple(range(x.ndim - 1))
  err = jnp.sum(jnp.square(x - q), axis=red)
  inv_energy = 1.0 / (floored_energy(jnp.sum(jnp.square(x), axis=red)) + eps)
  s_e_dq = jnp.sum(hi * jnp.maximum(x - hi, 0.0) + lo * jnp.minimum(x - lo, 0.0)
                   - jnp.square(jnp.clip(x, lo, hi) - q), axis=red)
  value = jnp.mean(err * inv_energy)
  slope = jnp.mean(-2.0 * s_e_dq * inv_energy) / (qp.scale
                                                  * qz.grid_bound(grid, bits))
  return value, slope


def floored_energy(energy: jax.Array) -> jax.Array:
  """Each channel's energy, floored at the median channel's (module doc)."""
  return jnp.maximum(energy, jnp.median(energy))


def with_slope(value: jax.Array, slope: jax.Array, alpha: jax.Array
                ) -> jax.Array:
  """Value `value`, gradient `slope` w.r.t. alpha."""
  return value + (alpha - lax.stop_gradient(alpha)) * lax.stop_gradient(slope)


@functools.partial(jax.jit,
                   static_argnames=("bits", "grid", "rounding", "eps"))
def channel_error(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                  rounding: str = "half_even", eps: float = CHANNEL_EPS
                  ) -> jax.Array:
  """E(alpha) = mean_c ||x_c - Q(x_c)||^2 / (max(e_c, median e) + eps),
  e_c = ||x_c||^2, c = last axis (module doc).

  x is stop-gradiented: E trains alpha only, with LSQ's step gradient (not
  PACT's), so it weighs rounding error against clipping error (see
  `error_terms`).
  """
  q = values_of(x, alpha, bits, grid, rounding)
  return with_slope(*error_terms(x, q, alpha, bits, grid, eps), alpha)


def pooled_error(x: jax.Array, alpha: jax.Array, bits: int, grid: str,
                 rounding: str = "half_even") -> jax.Array:
  """Pooled MSE mean((x - Q(x))^2), the objective DQ replaces (no grad)."""
  q = values_of(x, alpha, bits, grid, rounding)
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
  if grid not in INPUT_GRIDS:
    raise ValueError(f"TensorQuant.grid={grid!r} is not allowed with "
                     f"method='dq'; allowed values: "
                     f"{', '.join(map(repr, INPUT_GRIDS))}")
  x = lax.stop_gradient(x)
  cands = clip_candidates(x, grid, num_candidates)
  return cands[jnp.argmin(lax.map(objective, cands))]


@functools.partial(jax.jit, static_argnames=_CLIP_STATIC)
def fit_clip(x: jax.Array, bits: int, grid: str,
             num_candidates: int = NUM_CLIP_CANDIDATES,
             rounding: str = "half_even") -> jax.Array:
  """Grid search of alpha minimising `channel_error` (no gradient)."""
  return _search_clip(x, grid, num_candidates, lambda a: error_terms(
      x, values_of(x, a, bits, grid, rounding), a, bits, grid,
      CHANNEL_EPS)[0])


@functools.partial(jax.jit, static_argnames=_CLIP_STATIC)
def pooled_mse_clip(x: jax.Array, bits: int, grid: str,
                    num_candidates: int = NUM_CLIP_CANDIDATES,
                    rounding: str = "half_even") -> jax.Array:
  """Grid search of alpha minimising `pooled_error`: the baseline."""
  return _search_clip(x, grid, num_candidates, lambda a: pooled_error(
      x, a, bits, grid, rounding))
