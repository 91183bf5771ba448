"""``lsq``: Learned Step Size Quantization (Esser et al. 2019).

The step ``{name}_lsq_step`` is a parameter, initialised from the data as
``2 mean|x| / sqrt(Qp)`` and used through `quantizers.positive`; its
gradient is scaled by 1/sqrt(n Qp), n = the elements per step for a kernel,
the features per example for an input (the paper's "number of features").
A loop body that cannot create a parameter from its data (linen
``nn.scan``) starts an input step at the formula for an input of ones, with
a `QuantInitWarning`; ``calibrate_lsq_steps`` (`aqt_ext.linen`) then sets
it from data, reading the records `record_inputs` collects.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import (PARAMS, QuantContext, QuantInitWarning,
                                  host_call, layer_name)
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand, check_sign, finish, num_per_scale
from aqt_ext.core.registry import Method

STEP = "lsq_step"

# Records of the calibrations in progress (innermost last): parameter path
# (a tuple of names) -> (grid, bits, [mean |input| of each call]).
RECORDS: list[dict] = []


def _record(record: dict, key: tuple[str, ...], grid: str, bits: int,
            mean: Any) -> None:
  record.setdefault(key, (grid, bits, []))[2].append(np.asarray(mean))


def _initial_step(ctx: QuantContext, op: Operand):
  tq = op.tq
  if op.is_weight or not ctx.in_loop:
    return qz.lsq_init_step(op.view, tq.grid, tq.bits, op.reduced)
  start = 2.0 / float(qz.lsq_range(tq.grid, tq.bits)[1]) ** 0.5
  if not ctx.has(PARAMS, f"{op.name}_{STEP}"):
    warnings.warn(
        f"aqt_ext: layer {layer_name(ctx)}: its {op.name} LSQ step cannot "
        "be initialised from data inside a loop body (nn.scan / nn.RNN / "
        "nn.while_loop create their parameters without the loop's data); "
        f"it starts at {start:.3g}, LSQ's initialisation for an {op.name} of "
        "ones. Set it from data with aqt_ext.linen.calibrate_lsq_steps("
        "model, variables, *example_args)", QuantInitWarning, stacklevel=2)
  return qz.lsq_init_step(jnp.ones(op.view.shape, op.view.dtype), tq.grid,
                          tq.bits, op.reduced)


def _quantize(ctx: QuantContext, op: Operand) -> Quantized:
  tq = op.tq
  if not op.is_weight and qz.lsq_range(tq.grid, tq.bits)[0] <= 0:
    op = check_sign(ctx, op, f"lsq, grid={tq.grid!r}", STEP)
  step = ctx.get(PARAMS, f"{op.name}_{STEP}",
                 lambda: _initial_step(ctx, op))
  view = op.view
  if not op.is_weight and RECORDS:  # inside a calibration
    mean = jnp.mean(jnp.abs(lax.stop_gradient(view)), axis=op.reduced,
                    keepdims=True)
    key = tuple(ctx.path.split("/") if ctx.path else ()) + (
        f"{op.name}_{STEP}",)
    view = host_call(ctx, functools.partial(_record, RECORDS[-1], key,
                                            tq.grid, tq.bits), view, mean)
    op = op.with_x(view.reshape(op.x.shape))
  n = (view.size // step.size if op.is_weight
       else num_per_scale(view.shape, op.view_axes.contracting))
  qp = qz.lsq_qparams(step, tq.grid, tq.bits)
  fake = lambda v: qz.lsq_quant(v, step, tq.grid, tq.bits, n,  # noqa: E731
                                tq.rounding)
  return finish(op, qp, fake, tq.rounding)


LSQ = Method("lsq", _quantize, weight_params=(STEP,), input_params=(STEP,),
             int_execution=True, grids=("full", "restricted", "unsigned"))
