"""``uniform``: int-b with the scale from the operand's range.

``calibration='dynamic'`` takes the range of the current tensor,
``'static'`` an EMA of batch ranges (`aqt_ext.core.context.ema`), frozen
when the statistics are not mutable. ``rounding='border'`` rounds with
AQuant's per-channel borders (``{name}_border_alpha`` / ``_beta`` in the
`AQUANT` collection, zero, i.e. border 1/2, until set), clipped to the grid
(a border of 0 rounds the grid's top value up).
"""

from __future__ import annotations

import jax.numpy as jnp

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import AQUANT, QuantContext, ema
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand, check_sign, finish
from aqt_ext.core.registry import Method


def border_rounding(ctx: QuantContext, name: str, channels: int,
                    qp: qz.QParams):
  """AQuant's rounding of an input with `channels` channels (last axis)."""
  alpha, beta = (ctx.get(AQUANT, f"{name}_border_{k}",
                         lambda: jnp.zeros((channels,), jnp.float32))
                 for k in ("alpha", "beta"))
  return lambda t: jnp.clip(qz.border_round(t, alpha, beta), qp.qmin,  # noqa: E731
                            qp.qmax)


def _quantize(ctx: QuantContext, op: Operand) -> Quantized:
  tq = op.tq
  if not op.is_weight and tq.grid == "unsigned":
    op = check_sign(ctx, op, f"uniform, grid={tq.grid!r}")
  rng_of = lambda: qz.observe_range(op.view, tq.grid, op.reduced)  # noqa: E731
  rng = (ema(ctx, op.name, rng_of, tq.ema_decay)
         if tq.calibration == "static" else rng_of())
  border = tq.rounding == "border"
  qp = qz.qparams_from_range(rng, tq.grid, tq.bits,
                             "half_even" if border else tq.rounding)
  rounding = (border_rounding(ctx, op.name, op.x.shape[-1], qp) if border
              else tq.rounding)
  return finish(op, qp, lambda v: qz.fake_quant(v, qp, rounding), rounding)


def _stored(tq) -> bool:
  return tq.calibration == "static"


UNIFORM = Method("uniform", _quantize, static=True, int_execution=True,
                 stored_input_scale=_stored)
