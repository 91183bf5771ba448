"""PWLQ: piecewise linear post-training weight quantization.

Paper: Fang et al., "Post-Training Piecewise Linear Quantization for Deep
Neural Networks", ECCV 2020 (methods.md sec. 5). Tags as in methods.md:
[paper] from the paper or its official code, [derived] follows from the math,
[design] our own choice.

Per output channel (the last axis of a kernel, as in Flax's ``(in, out)`` and
``(kh, kw, cin, cout)``), with m = max|w| and a breakpoint p in (0, m):

* centre [-p, p]: symmetric b-bit uniform. [design] We use the ``aqt`` grid
  of ``quantizers.py``: p maps to 2^(b-1) - 1/2 and the codes are clipped to
  +-(2^(b-1) - 1), i.e. step 2p/(2^b - 1), the step the paper's error model
  assumes (C(b) below), with levels symmetric about 0 and inside [-p, p].
* tails [p, m] and [-m, -p]: (b-1)-bit affine uniform with offset p, levels
  p + k (m-p)/(2^(b-1)-1), k = 0..2^(b-1)-1 (the ``unsigned`` grid applied to
  |w| - p, then the sign restored). [paper]
* one extra bit per weight stores the region; products stay b-bit. [paper]

Error model [paper], with C(b) = 1/(12 (2^b - 1)^2) and the approximation
4 C(b) ~ C(b-1):  E(p) = C(b-1) ((m-p)^2 + m (2p - m)(2F(p) - 1)), convex on
(0, m/2) for a symmetric decreasing density; dE/dp = 0 gives the optimality
condition  2 m F(p*) = 2m - p* + m (m - 2p*) f(p*).

Breakpoint finders (all return one p per output channel):

* ``breakpoint_gaussian`` / ``breakpoint_laplacian``: the paper's one-shot
  fits, in units of the channel std (methods.md: the paper prints "p*/m",
  its code applies the fit to m/std and returns p/std). [paper]
* ``breakpoint_bisection``: the root of dE/dp for a Gaussian or Laplacian
  prior with the channel's std. [paper]
* ``breakpoint_grid``: coarse-to-fine search on p/m (steps 0.1, 0.01, 0.001)
  minimising the actual per-channel quantization MSE, over the official
  code's range: the first stage tries {0.1, .., 0.9} [paper]. The later
  candidate sets are [design]: the previous best +- 1..9 steps, kept inside
  (0, 1). (The error model's optimum lies in (0, m/2), but a channel with
  few weights often quantizes best with p above m/2: a search stopped at m/2
  cost 1.12-1.5x the official MSE on such layers, methods.md sec. 5.)

The one-shot fits and the bisection stay in (0, m/2), where the error model
is convex; a breakpoint given by the caller may be anywhere in (0, m).

Rounding is ``jnp.round`` (half to even) throughout, as in ``quantizers.py``.
Breakpoints given by the caller must be concrete arrays (they are checked
with numpy before any work), so these functions are meant for eager,
offline use; the resulting dequantized weights go into the model.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy import stats

from aqt_ext.core.quantizers import fake_quant, qparams_from_range

ArrayLike = jax.typing.ArrayLike
Density = Callable[[jax.Array], jax.Array]

METHODS = ("grid", "gaussian", "laplacian", "bisection")
PRIORS = ("gaussian", "laplacian")

_GRID_STEPS = (0.1, 0.01, 0.001)
_GRID_HALF_WIDTH = 9


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

def _check_bits(bits: int) -> None:
  if not isinstance(bits, int) or bits < 2:
    raise ValueError(
        f"bits={bits!r}: PWLQ needs an int >= 2 (the tails use bits - 1)")


def _check_kernel(w: jax.Array) -> None:
  if w.ndim < 2:
    raise ValueError(
        f"w.ndim={w.ndim}: PWLQ quantizes kernels per output channel (last "
        "axis) and needs ndim >= 2")


def _check_breakpoint(p: ArrayLike, m: jax.Array) -> None:
  """Every nonzero channel needs 0 < p < m; zero channels ignore p."""
  p, m = np.broadcast_arrays(np.asarray(p), np.asarray(m))
  bad = (m > 0) & ~((p > 0) & (p < m))
  if bad.any():
    c = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"breakpoint={float(p.flat[c])!r} for channel {c} is outside the "
        f"allowed open interval (0, m) = (0, {float(m.flat[c])!r}), "
        "m = max|w| of the channel")


# ---------------------------------------------------------------------------
# Per-channel statistics and the quantizer itself.
# ---------------------------------------------------------------------------

def _channel_axes(w: jax.Array) -> tuple[int, ...]:
  return tuple(range(w.ndim - 1))


def channel_stats(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(m, std) per output channel: m = max|w|, std with ddof = 0."""
  axes = _channel_axes(w)
  return jnp.max(jnp.abs(w), axis=axes), jnp.std(w, axis=axes)


def _piecewise(w: jax.Array, p: jax.Array, m: jax.Array, bits: int
               ) -> jax.Array:
  """PWLQ fake quant with per-channel p, m of shape (C,); no checks."""
  centre = fake_quant(w, qparams_from_range({"amax": p}, "aqt", bits))
  tail_qp = qparams_from_range({"max": m - p}, "unsigned", bits - 1)
  tail = jnp.sign(w) * (p + fake_quant(jnp.abs(w) - p, tail_qp))
  return jnp.where(jnp.abs(w) <= p, centre, tail)


def pwlq_fake_quant(w: ArrayLike, breakpoint: ArrayLike, bits: int
                    ) -> jax.Array:
  """Dequantized PWLQ weights for given per-channel breakpoints (shape (C,)).

  Zero channels stay zero whatever their breakpoint.
  """
  _check_bits(bits)
  w = jnp.asarray(w)
  _check_kernel(w)
  m, _ = channel_stats(w)
  _check_breakpoint(breakpoint, m)
  return _piecewise(w, jnp.asarray(breakpoint, w.dtype), m, bits)


# ---------------------------------------------------------------------------
# Error model.
# ---------------------------------------------------------------------------

def quant_error_constant(bits: int) -> float:
  """C(b) = 1/(12 (2^b - 1)^2): MSE of a b-bit grid per unit range^2."""
  return 1.0 / (12.0 * (2.0 ** bits - 1.0) ** 2)


def pwlq_error_model(p: ArrayLike, m: ArrayLike, bits: int, cdf: Density
                     ) -> jax.Array:
  """E(p) = C(b-1) ((m-p)^2 + m (2p - m)(2F(p) - 1)). [paper]

  ``cdf`` is the CDF F of the (symmetric) weight density; works on numpy or
  jnp values alike.
  """
  return quant_error_constant(bits - 1) * (
      (m - p) ** 2 + m * (2 * p - m) * (2 * cdf(p) - 1))


def pwlq_error_grad(p: ArrayLike, m: ArrayLike, bits: int, cdf: Density,
                    pdf: Density) -> jax.Array:
  """dE/dp = 2 C(b-1) (m (2F(p) - 1) - (m - p) + m (2p - m) f(p)). [derived]

  Zero exactly at the optimality condition 2mF = 2m - p + m(m - 2p)f.
  """
  return 2 * quant_error_constant(bits - 1) * (
      m * (2 * cdf(p) - 1) - (m - p) + m * (2 * p - m) * pdf(p))


def optimal_breakpoint(m: ArrayLike, cdf: Density, pdf: Density,
                       iters: int = 60) -> jax.Array:
  """Root of dE/dp on (0, m/2) by bisection, elementwise over m.

  dE/dp < 0 at p = 0+ for any density; if it stays negative up to m/2 (only
  for near-two-valued channels, m/std below ~1.35 under a Gaussian) the
  result is the float just below m/2. ``cdf`` and ``pdf`` must be hashable
  (they are static under jit).
  """
  m = jnp.asarray(m, jnp.float32)
  return _inside(m, _bisect(m, cdf, pdf, iters))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _bisect(m: jax.Array, cdf: Density, pdf: Density, iters: int
            ) -> jax.Array:
  def halve(_, bracket):
    lo, hi = bracket
    mid = (lo + hi) / 2
    # The bit width only scales E, so the root does not depend on it.
    rising = pwlq_error_grad(mid, m, 2, cdf, pdf) > 0
    return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

  lo, hi = lax.fori_loop(0, iters, halve, (jnp.zeros_like(m), m / 2))
  return (lo + hi) / 2


def _inside(m: jax.Array, p: jax.Array, top: float = 0.5) -> jax.Array:
  """p kept strictly below top * m (float32 rounding) and 0 on zero
  channels."""
  p = jnp.minimum(p, jnp.nextafter(top * m, jnp.zeros_like(m)))
  return jnp.where(m > 0, p, 0.0)


# ---------------------------------------------------------------------------
# Breakpoint finders.
# ---------------------------------------------------------------------------

def _standardise(m: jax.Array, std: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(m/std, std), a zero std replaced by m (by 1 on a zero channel).

  A constant channel (std 0, m > 0) then gets m/std = 1, as a +-m channel
  does; any breakpoint is exact for it, since all its weights sit at m.
  """
  std = jnp.where(std > 0, std, jnp.where(m > 0, m, 1.0))
  return m / std, std


def breakpoint_gaussian(m: ArrayLike, std: ArrayLike) -> jax.Array:
  """One-shot fit for a Gaussian: p/std = ln(0.86143114 m/std + 0.607901)."""
  m = jnp.asarray(m, jnp.float32)
  m_n, std = _standardise(m, jnp.asarray(std, jnp.float32))
  return _inside(m, std * jnp.log(0.86143114 * m_n + 0.607901))


def breakpoint_laplacian(m: ArrayLike, std: ArrayLike) -> jax.Array:
  """One-shot fit for a Laplacian: p/std = 0.80304483 sqrt(m/std) - 0.31668."""
  m = jnp.asarray(m, jnp.float32)
  m_n, std = _standardise(m, jnp.asarray(std, jnp.float32))
  return _inside(m, std * (0.80304483 * jnp.sqrt(m_n) - 0.31668))


_LAPLACE_SCALE = 1.0 / np.sqrt(2.0)  # Laplace scale b with unit variance


def _laplace_cdf(x: jax.Array) -> jax.Array:
  return stats.laplace.cdf(x, scale=_LAPLACE_SCALE)


def _laplace_pdf(x: jax.Array) -> jax.Array:
  return stats.laplace.pdf(x, scale=_LAPLACE_SCALE)


def prior_density(prior: str) -> tuple[Density, Density]:
  """(cdf, pdf) of the zero-mean unit-variance prior."""
  if prior == "gaussian":
    return stats.norm.cdf, stats.norm.pdf
  if prior == "laplacian":
    return _laplace_cdf, _laplace_pdf
  raise ValueError(f"prior={prior!r}: allowed values are {PRIORS}")


def breakpoint_bisection(m: ArrayLike, std: ArrayLike,
                         prior: str = "gaussian") -> jax.Array:
  """Exact optimum of the error model for a prior with the channel's std."""
  cdf, pdf = prior_density(prior)
  m = jnp.asarray(m, jnp.float32)
  m_n, std = _standardise(m, jnp.asarray(std, jnp.float32))
  return _inside(m, std * optimal_breakpoint(m_n, cdf, pdf))


def _channel_mse(w: jax.Array, w_hat: jax.Array) -> jax.Array:
  return jnp.mean((w - w_hat) ** 2, axis=_channel_axes(w))


def breakpoint_grid(w: ArrayLike, bits: int, max_ratio: float = 1.0
                    ) -> jax.Array:
  """Coarse-to-fine search of p/m in (0, max_ratio) per channel minimising
  the actual MSE (``max_ratio=0.5``: the search this module ran before it
  covered the official range)."""
  _check_bits(bits)
  if not 0.1 < max_ratio <= 1.0:
    raise ValueError(f"max_ratio={max_ratio!r}: allowed values are in "
                     "(0.1, 1]")
  w = jnp.asarray(w)
  _check_kernel(w)
  m, _ = channel_stats(w)
  return _inside(m, _grid_search(w, bits, float(max_ratio)) * m,
                 top=max_ratio)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _grid_search(w: jax.Array, bits: int, max_ratio: float) -> jax.Array:
  """Best p/m per channel, to the last grid step."""
  m, _ = channel_stats(w)
  offsets = jnp.arange(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH + 1)[:, None]

  def mse(r: jax.Array) -> jax.Array:
    err = _channel_mse(w, _piecewise(w, r * m, m, bits))
    return jnp.where((r > 0) & (r < max_ratio), err, jnp.inf)

  def refine(ratio: jax.Array, step: jax.Array) -> tuple[jax.Array, None]:
    candidates = ratio + offsets * step  # (candidates, C)
    errs = lax.map(mse, candidates)
    best = jnp.argmin(errs, axis=0)[None]
    return jnp.take_along_axis(candidates, best, 0)[0], None

  ratio, _ = lax.scan(refine, jnp.zeros_like(m), jnp.array(_GRID_STEPS))
  return ratio


# ---------------------------------------------------------------------------
# Bias correction and the one-call entry point.
# ---------------------------------------------------------------------------

def bias_correct(w: jax.Array, w_hat: jax.Array) -> jax.Array:
  """Per-channel mean and std of w_hat matched to those of w.

  [design] The paper (after Banner et al. 2019) writes
  q <- (q + mean(w) - mean(q)) * std(w)/std(q), which also scales the
  corrected mean by std(w)/std(q). We scale about the mean,
  q <- (q - mean(q)) * std(w)/std(q) + mean(w), so that both moments match
  exactly; the two differ by mean(w) (std(w)/std(q) - 1), negligible for
  near-zero-mean kernels. A zero std(q) leaves the spread unchanged.
  """
  axes = _channel_axes(w)
  mean_w, mean_q = jnp.mean(w, axis=axes), jnp.mean(w_hat, axis=axes)
  std_w, std_q = jnp.std(w, axis=axes), jnp.std(w_hat, axis=axes)
  ratio = jnp.where(std_q > 0, std_w / jnp.where(std_q > 0, std_q, 1.0), 1.0)
  return (w_hat - mean_q) * ratio + mean_w


def pwlq_quantize(w: ArrayLike, bits: int, method: str = "grid",
                  bias_correction: bool = False, prior: str = "gaussian"
                  ) -> jax.Array:
  """PWLQ-quantized (dequantized, same shape) kernel, per output channel.

  method: ``grid`` (MSE search), ``gaussian`` / ``laplacian`` (one-shot fits)
  or ``bisection`` (root of dE/dp under ``prior``, ``gaussian`` or
  ``laplacian``; ignored by the other methods).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: allowed values are {METHODS}")
  if prior not in PRIORS:
    raise ValueError(f"prior={prior!r}: allowed values are {PRIORS}")
  _check_bits(bits)
  w = jnp.asarray(w)
  _check_kernel(w)
  m, std = channel_stats(w)
  if method == "grid":
    p = breakpoint_grid(w, bits)
  elif method == "gaussian":
    p = breakpoint_gaussian(m, std)
  elif method == "laplacian":
    p = breakpoint_laplacian(m, std)
  else:
    p = breakpoint_bisection(m, std, prior)
  w_hat = pwlq_fake_quant(w, p, bits)
  return bias_correct(w, w_hat) if bias_correction else w_hat
