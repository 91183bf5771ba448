"""AQuant: adaptive rounding border for activations (methods.md sec. 7).

[paper] An activation rounds up when the fractional part of x/s reaches a
border B that depends on the activation, instead of 1/2; the border is coarse
grained (cheap) and fitted on calibration data against the output error.

[derived] One product w * x with a quantized weight w_hat: with t = x/s,
n = floor(t), f = t - n, rounding up (q = n + 1) instead of down gives the
smaller |w s t - w_hat s q| iff w t >= w_hat (n + 1/2), i.e.

    f >= 1/2 + (n + 1/2)(w_hat/w - 1)                    (``product_border``)

Shared by one input channel c over all its products: the q minimising
sum_o (w_oc x - w_hat_oc s q)^2 is kappa_c t, with

    kappa_c = sum_o w_oc w_hat_oc / sum_o w_hat_oc^2     (``channel_kappa``)

(o runs over every kernel entry that multiplies channel c: outputs and, for
a conv, the spatial taps). The quadratic is symmetric about kappa_c t, so
round up iff kappa_c t >= n + 1/2, i.e. f >= 1/2 + (n + 1/2)(1/kappa_c - 1).
Hence the border family B_c(n) = 1/2 + alpha_c (n + 1/2) + beta_c starts at
alpha_c = 1/kappa_c - 1, beta_c = 0 (``init_border``); w_hat = w gives
kappa = 1 and the border 1/2. [design] A channel with kappa_c <= 0 (all its
weights quantized to zero, or anti-correlated) starts at alpha_c = 0.

The border is clipped to [0, 1], so q = n + [f >= B] lies in {n, n + 1} and the
rounding is non-decreasing in x for any parameters. ``learn_border`` fits
(alpha_c, beta_c) on calibration data by minimising one layer's output error
against the float network's output of that layer, with a soft border
(sigmoid with annealed temperature); eval uses the hard border. The
pipeline (`aqt_ext.ptq.pipeline.learn_borders`) fits the layers in sequence,
as the paper's framework does: each layer's input comes from the network
whose earlier layers are already quantized with their fitted borders, so a
border also corrects the error that reaches its layer. [paper, framework;
the objective's details are ours: design]
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from aqt_ext.core import quantizers as qz

ArrayLike = jax.typing.ArrayLike
LayerFn = Callable[[jax.Array, jax.Array], jax.Array]


def product_border(w: ArrayLike, w_hat: ArrayLike, n: ArrayLike
                   ) -> jax.Array:
  """Border of one product: 1/2 + (n + 1/2)(w_hat/w - 1). [derived]"""
  return 0.5 + (n + 0.5) * (w_hat / w - 1.0)


def channel_kappa(w: jax.Array, w_hat: jax.Array, in_axis: int = -2
                  ) -> jax.Array:
  """kappa_c = sum w w_hat / sum w_hat^2 over all axes but ``in_axis``.

  ``in_axis`` is the kernel's input-channel axis (-2 for Flax ``(in, out)``
  and ``(kh, kw, cin, cout)`` kernels). A zero denominator gives 0.
  """
  axes = tuple(a for a in range(w.ndim) if a != in_axis % w.ndim)
  num = jnp.sum(w * w_hat, axis=axes)
  den = jnp.sum(w_hat * w_hat, axis=axes)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def init_border(w: ArrayLike, w_hat: ArrayLike, in_axis: int = -2
                ) -> tuple[jax.Array, jax.Array]:
  """(alpha, beta) per input channel: alpha = 1/kappa - 1, beta = 0."""
  kappa = channel_kappa(jnp.asarray(w), jnp.asarray(w_hat), in_axis)
  alpha = jnp.where(kappa > 0, 1.0 / jnp.where(kappa > 0, kappa, 1.0) - 1.0,
                    0.0)
  return alpha, jnp.zeros_like(alpha)


# The border and the rounding are quantizers of the core (`aqt_ext.core.uniform`
# runs them inside QuantConv / QuantDense with ``rounding='border'``).
border = qz.border
aquant_round = qz.border_round


def aquant_quant(x: jax.Array, scale: ArrayLike, alpha: jax.Array,
                 beta: jax.Array, qmin: float = -jnp.inf,
                 qmax: float = jnp.inf, soft: bool = False,
                 temperature: float = 0.1) -> jax.Array:
  """Fake-quantized activation s * clip(round_B(x/s), qmin, qmax)."""
  q = aquant_round(x / scale, alpha, beta, soft, temperature)
  return scale * jnp.clip(q, qmin, qmax)


def reconstruction_error(x: jax.Array, w: jax.Array, w_hat: jax.Array,
                         scale: ArrayLike, layer_fn: LayerFn,
                         alpha: jax.Array, beta: jax.Array,
                         qmin: float = -jnp.inf, qmax: float = jnp.inf,
                         target: jax.Array | None = None) -> jax.Array:
  """Mean squared error of layer_fn(x_hat, w_hat), x rounded with the hard
  border, against `target` (default layer_fn(x, w): the layer alone)."""
  x_hat = aquant_quant(x, scale, alpha, beta, qmin, qmax)
  if target is None:
    target = layer_fn(x, w)
  return jnp.mean((layer_fn(x_hat, w_hat) - target) ** 2)


def learn_border(x_calib: ArrayLike, w: ArrayLike, w_hat: ArrayLike,
                 scale: ArrayLike, layer_fn: LayerFn, steps: int = 500,
                 lr: float = 1e-2, *,
                 in_axis: int = -2, qmin: float = -jnp.inf,
                 qmax: float = jnp.inf,
                 temperature: tuple[float, float] = (0.3, 0.01),
                 target: ArrayLike | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """Per-input-channel (alpha, beta) fitted to one layer's output error.

  `x_calib` is the layer's input as the quantized network produces it (in
  the pipeline: with every earlier layer already quantized, its border
  fitted); `target` is the output to match, the float network's output of
  this layer (layer_fn(x_float, w)); None takes layer_fn(x_calib, w), the
  layer alone. Starts at ``init_border``; minimises the mean squared
  difference between layer_fn(x_hat, w_hat) and `target` with Adam, x_hat
  rounded with the soft border at a temperature annealed geometrically from
  temperature[0] to temperature[1] over ``steps`` (full batch). [design] The
  schedule, full-batch Adam, and returning the initial border when the
  learned one is not better under the hard border on ``x_calib``.
  The returned parameters are meant for the hard border.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps={steps!r}: allowed values are ints >= 1")
  if not (len(temperature) == 2 and min(temperature) > 0):
    raise ValueError(f"temperature={temperature!r}: allowed values are "
                     "(start, end) with both > 0")
  x_calib, w, w_hat = (jnp.asarray(a) for a in (x_calib, w, w_hat))
  target = layer_fn(x_calib, w) if target is None else jnp.asarray(target)
  init = init_border(w, w_hat, in_axis)
  opt = optax.adam(lr)

  def loss(params, temp):
    x_hat = aquant_quant(x_calib, scale, *params, qmin, qmax, soft=True,
                         temperature=temp)
    return jnp.mean((layer_fn(x_hat, w_hat) - target) ** 2)

  def step(carry, temp):
    params, state = carry
    grads = jax.grad(loss)(params, temp)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  temps = jnp.geomspace(temperature[0], temperature[1], steps)
  (learned, _), _ = jax.jit(lambda p: lax.scan(step, (p, opt.init(p)), temps)
                            )(init)
  hard = lambda p: reconstruction_error(  # noqa: E731
      x_calib, w, w_hat, scale, layer_fn, *p, qmin, qmax, target)
  return learned if hard(learned) < hard(init) else init
