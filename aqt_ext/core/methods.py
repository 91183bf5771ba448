"""The registry of quantization methods (see `aqt_ext.core.registry`).

To add a method: write its file in `aqt_ext.core` (a `Method` record and its
``quantize(ctx, operand)``) and add it to `REGISTRY` below.
"""

from __future__ import annotations

from typing import Any

import jax

from aqt_ext.core import dq, floats, fp8, lsq, pact, uniform
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand
from aqt_ext.core.registry import Registry

REGISTRY = Registry([floats.FLOAT, floats.BF16, uniform.UNIFORM, lsq.LSQ,
                     pact.PACT, dq.DQ, fp8.FP8])


def quantize_activation(ctx: QuantContext, x: jax.Array, tq: Any,
                        want_int: bool = False) -> Quantized:
  """Quantizes an activation that no layer takes as its input (a
  ``QuantAct``; its state is named as a layer input's, ``input_*``) by a
  per-tensor `tq`: one scale, so its axes name nothing that matters."""
  ndim = jax.numpy.ndim(x)
  return quantize_operand(ctx, "input", x, tq,
                          qz.OperandAxes(tuple(range(ndim)), ndim - 1),
                          is_weight=False, want_int=want_int)


def quantize_operand(ctx: QuantContext, name: str, x: jax.Array, tq: Any,
                     axes: qz.OperandAxes, *, is_weight: bool,
                     want_int: bool = False, keep_ints: bool = False
                     ) -> Quantized:
  """Quantizes operand `x` (``'kernel'`` or ``'input'``) of the layer behind
  `ctx` by `tq` (a `TensorQuant`), creating the quantizer's state: the fake
  quantized value, or with `want_int` the integer operand and its scale
  (with `keep_ints` both, where the method has an integer grid)."""
  return REGISTRY.get(tq.method).quantize(
      ctx, Operand(name, x, tq, axes, is_weight, want_int, keep_ints))
