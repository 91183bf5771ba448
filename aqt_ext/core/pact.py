"""``pact``: PACT (Choi et al. 2018), a learned clip of layer inputs.

y = clip(x, 0, alpha) quantized uniformly on [0, alpha]; the clip
``input_pact_alpha`` is a parameter starting at ``TensorQuant.pact_init``,
used through `quantizers.positive`, under weight decay (the paper's L2 on
alpha).
"""

from __future__ import annotations

import jax.numpy as jnp

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import PARAMS, QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand, check_sign, finish
from aqt_ext.core.registry import Method

ALPHA = "pact_alpha"


def _quantize(ctx: QuantContext, op: Operand) -> Quantized:
  tq = op.tq
  op = check_sign(ctx, op, "pact, PACT's [0, alpha]", ALPHA)
  alpha = ctx.get(PARAMS, f"{op.name}_{ALPHA}",
                  lambda: jnp.full((), tq.pact_init, jnp.float32))
  qp = qz.pact_qparams(alpha, tq.bits)
  return finish(op, qp, lambda v: qz.pact_quant(v, alpha, tq.bits,
                                                tq.rounding), tq.rounding)


PACT = Method("pact", _quantize, input_params=(ALPHA,),
              decayed_params=(ALPHA,), weights=False, int_execution=True,
              grids=("unsigned",), granularities=("per_tensor",))
