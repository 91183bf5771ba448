"""``fp8``: an operand rounded to float8 (e4m3 or e5m2) after scaling.

The scale maps the calibrated absmax onto the format's largest finite value
(448 for ``float8_e4m3fn``, 57344 for ``float8_e5m2``); the scaled values
are clipped to that range (saturating: no inf or NaN from overflow), cast to
the fp8 dtype (round to nearest even) and back, and rescaled. Gradient:
straight through where the scaled value is inside the range, zero where it
saturated.

Calibration ``dynamic`` takes the absmax of the current tensor (per tensor,
per channel, per input channel); ``delayed`` the largest of the last
``amax_history`` steps' absmaxes (fp8 training recipes' delayed scaling;
per tensor), kept in `STATS` as ``{name}_amax_history`` with
``{name}_count``: updated while that collection is mutable, frozen
otherwise; the first update (and any call before it) scales by the
current absmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import STATS, QuantContext, updating
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand, materialize
from aqt_ext.core.registry import Method

# Format name -> (dtype, largest finite value).
FORMATS = {"e4m3": (jnp.float8_e4m3fn, 448.0), "e5m2": (jnp.float8_e5m2,
                                                       57344.0)}


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def fake_quant(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
  """``x`` through the fp8 format `fmt` at `scale` (module docstring)."""
  dtype, fmax = FORMATS[fmt]
  t = x * qz.safe_reciprocal(scale).astype(x.dtype)
  q = jnp.clip(t, -fmax, fmax).astype(dtype).astype(x.dtype)
  return q * scale.astype(x.dtype)


@fake_quant.defjvp
def _fake_quant_jvp(fmt, primals, tangents):
  x, scale = primals
  dx, _ = tangents  # the scale is calibrated (no gradient)
  fmax = FORMATS[fmt][1]
  inside = jnp.abs(x * qz.safe_reciprocal(scale).astype(x.dtype)) <= fmax
  return fake_quant(x, scale, fmt), jnp.where(inside, dx, jnp.zeros_like(dx))


def scale_of(amax: jax.Array, fmt: str) -> jax.Array:
  """The scale mapping `amax` to the format's largest value (1 for 0)."""
  amax = jnp.where(amax > 0, amax, jnp.ones_like(amax))
  return lax.stop_gradient(amax / FORMATS[fmt][1])


def _delayed_amax(ctx: QuantContext, name: str, current: jax.Array,
                  history: int) -> jax.Array:
  """The absmax delayed scaling uses, updating the history (docstring)."""
  hist = ctx.get(STATS, f"{name}_amax_history",
                 lambda: jnp.zeros((history,), jnp.float32))
  count = ctx.get(STATS, f"{name}_count", lambda: jnp.zeros((), jnp.int32))
  current = lax.stop_gradient(current).reshape(()).astype(jnp.float32)
  past = jnp.where(count > 0, jnp.max(hist), current)
  if updating(ctx):
    ctx.set(STATS, f"{name}_amax_history",
            jnp.roll(hist, 1).at[0].set(current))
    ctx.set(STATS, f"{name}_count", count + 1)
  return past


def _quantize(ctx: QuantContext, op: Operand) -> Quantized:
  tq = op.tq
  amax = qz.observe_range(op.view, "full", op.reduced)["amax"]
  if tq.calibration == "delayed":
    amax = _delayed_amax(ctx, op.name, amax, tq.amax_history).astype(
        op.x.dtype)
  y = materialize(fake_quant(op.view, scale_of(amax, tq.fp8_format),
                             tq.fp8_format))
  return Quantized(y)


FP8 = Method("fp8", _quantize, integer=False, delayed=True, fixed_bits=8,
             granularities=("per_tensor", "per_channel", "per_in_channel"))
