"""``dq``: Direct Quantization, learnable weight levels and
channel-error-weighted inputs.

Seed paper: "Direct Quantization for Training Highly Accurate Low Bit-width
Deep Neural Networks" (Hoang, Do, Nguyen, Cheung, IJCAI 2020; arXiv
2012.13762); only its abstract could be read, so the design is
ours ([design], ../shared/design/methods.md sec. 4). The math is framework
free in `aqt_ext.core.levels` (weights) and `aqt_ext.core.clip_search`
(inputs); this file is the method.

* Kernels: ``kernel_dq_levels`` of shape ``group_shape + (2^b,)`` (per
  tensor or per output channel), initialised by `levels.init_levels`, with
  the weights' update set by ``TensorQuant.dq_update``:

  - ``direct`` (the default; the paper's point: gradient descent updates
    the quantized weights, not latent float ones): the quantized weights
    are ``kernel_dq_position``, one position u = a + r per weight (level
    index a, residual r in level gaps), initialised from the float kernel
    (`levels.init_positions`: at init the forward equals the
    ``latent_ste`` one); the forward is ``quantize_positions(u, levels)``
    and the rule of the update is that function's gradient: the step goes
    into r in units of the level gap, a weight changes level only when r
    crosses a midpoint, and moving a level moves every weight at that
    level. The float ``kernel`` is only the initial value (no gradient
    reaches it; weight decay, which the training loop applies to every
    kernel, shrinks it, and nothing reads it). The positions train with
    the levels, at the quantizer learning rate (``quant_lr_multiplier``),
    without weight decay. [design]
  - ``latent_ste`` (the first implementation): latent float weights in
    ``kernel``, the forward ``quantize_levels(w, sorted_levels(levels))``,
    plain straight-through gradients to the latent weights; after a level
    moves, weights are reassigned to the nearest level by distance.
* Inputs, ``calibration='dynamic'``: the clip ``input_dq_alpha`` is a
  parameter initialised by `clip_search.fit_clip` on the first batch
  (``pact_init`` if that batch is all zero, or inside a loop body that
  cannot create a parameter from its data, with a warning), trained with
  PACT's gradient; ``dq_err_weight * E(alpha)`` is sown into `LOSSES` as
  ``input_dq_err`` (the training loop adds it to the loss) on every
  `AUX_STRIDE`-th example of the batch (it halves the cost; [design]).
* Inputs, ``calibration='static'``: an EMA of per-batch `fit_clip` in
  `STATS` (``input_dq_clip``), no parameter and no auxiliary loss.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from jax import lax

from aqt_ext.core import clip_search as cs
from aqt_ext.core import levels as lv
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import (LOSSES, PARAMS, QuantContext,
                                  QuantInitWarning, ema, layer_name, updating)
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand, materialize
from aqt_ext.core.registry import Method

LEVELS, POSITION, ALPHA = "dq_levels", "dq_position", "dq_alpha"
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
WEIGHT_GRIDS = ("full",)
INPUT_GRANULARITIES = ("per_tensor",)
AUX_STRIDE = 2  # [design] the auxiliary E uses every 2nd example of a batch


def _check(field: str, value: str, allowed: tuple[str, ...]):
  """Raises a ValueError naming TensorQuant.`field` and its allowed values."""
  if value not in allowed:
    raise ValueError(
        f"TensorQuant.{field}={value!r} is not allowed with method='dq' "
        f"here; allowed values: {', '.join(repr(a) for a in allowed)}")


def quant_weight(ctx: QuantContext, op: Operand) -> jnp.ndarray:
  """DQ fake-quantized kernel; creates ``{name}_dq_levels``."""
  tq, x = op.tq, op.x
  _check("granularity", tq.granularity, WEIGHT_GRANULARITIES)
  _check("grid", tq.grid, WEIGHT_GRIDS)
  red = qz.reduce_axes(x.ndim, op.axes, tq.granularity)
  # Group axes last (the identity for dense and conv kernels).
  perm = red + tuple(a for a in range(x.ndim) if a not in red)
  levels = ctx.get(PARAMS, f"{op.name}_{LEVELS}", lambda: lv.init_levels(
      lax.stop_gradient(x), tq.bits, red, tq.dq_init))
  table = lv.sorted_levels(levels)
  back = tuple(perm.index(a) for a in range(x.ndim))
  if tq.dq_update == "direct":
    u = ctx.get(PARAMS, f"{op.name}_{POSITION}", lambda: jnp.transpose(
        lv.init_positions(jnp.transpose(lax.stop_gradient(x), perm),
                          lax.stop_gradient(table)), back))
    wq = lv.quantize_positions(jnp.transpose(u, perm), table)
    return jnp.transpose(wq, back).astype(x.dtype)
  wq = lv.quantize_levels(jnp.transpose(x, perm), table)
  return jnp.transpose(wq, back)


def init_alpha(x: jnp.ndarray, tq) -> jnp.ndarray:
  """`fit_clip` on the init batch; ``tq.pact_init`` if it is all zero."""
  x = lax.stop_gradient(x)
  alpha = cs.fit_clip(x, tq.bits, tq.grid, rounding=tq.rounding)
  return jnp.where(jnp.any(x != 0), alpha, tq.pact_init).astype(jnp.float32)


def _alpha_init(ctx: QuantContext, op: Operand) -> jnp.ndarray:
  if not ctx.in_loop:
    return init_alpha(op.x, op.tq)
  warnings.warn(
      f"aqt_ext: layer {layer_name(ctx)}: its {op.name} DQ clip cannot be "
      "fitted to data inside a scan body (nn.scan / nn.RNN create their "
      "broadcast parameters without the scanned values); it starts at "
      f"pact_init = {op.tq.pact_init:g}", QuantInitWarning, stacklevel=2)
  return jnp.asarray(op.tq.pact_init, jnp.float32)


def input_alpha(ctx: QuantContext, op: Operand) -> jnp.ndarray:
  """The input's clip: the EMA (static) or the parameter (dynamic, read
  through `quantizers.positive`)."""
  tq = op.tq
  _check("grid", tq.grid, cs.INPUT_GRIDS)
  _check("granularity", tq.granularity, INPUT_GRANULARITIES)
  if tq.calibration == "static":
    return ema(ctx, op.name, lambda: {"dq_clip": cs.fit_clip(
        op.x, tq.bits, tq.grid, rounding=tq.rounding)}, tq.ema_decay
               )["dq_clip"]
  return qz.positive(ctx.get(PARAMS, f"{op.name}_{ALPHA}",
                             lambda: _alpha_init(ctx, op)))


def input_qparams(ctx: QuantContext, op: Operand) -> qz.QParams:
  """The uniform grid of a DQ input (scale from its clip), for integer
  execution."""
  alpha = lax.stop_gradient(input_alpha(ctx, op))
  return cs.clip_qparams(cs.guard_alpha(alpha).astype(op.x.dtype),
                         op.tq.bits, op.tq.grid)


def quant_input(ctx: QuantContext, op: Operand) -> jnp.ndarray:
  """DQ fake-quantized layer input; sows the auxiliary E (dynamic)."""
  tq, x = op.tq, op.x
  alpha = input_alpha(ctx, op)
  y = materialize(cs.clip_quant(x, alpha, tq.bits, tq.grid, tq.rounding))
  if (tq.calibration != "static" and tq.dq_err_weight > 0
      and updating(ctx, LOSSES)):
    err = cs.with_slope(*cs.error_terms(
        x[::AUX_STRIDE], y[::AUX_STRIDE], alpha, tq.bits, tq.grid,
        cs.CHANNEL_EPS), alpha)
    ctx.sow(LOSSES, f"{op.name}_dq_err", tq.dq_err_weight * err)
  return y


def _quantize(ctx: QuantContext, op: Operand) -> Quantized:
  if op.is_weight:
    if op.want_int:
      raise ValueError("TensorQuant.method='dq' weights run in integers only "
                       "when served (aqt_ext.serve), as a lookup table")
    return Quantized(quant_weight(ctx, op))
  if op.want_int:
    qp = input_qparams(ctx, op)
    return Quantized(None, qz.to_int(op.x, qp, op.tq.rounding), qp)
  return Quantized(quant_input(ctx, op))


DQ = Method("dq", _quantize, weight_params=(LEVELS, POSITION),
            input_params=(ALPHA,),
            static=True, weight_export="lut")
