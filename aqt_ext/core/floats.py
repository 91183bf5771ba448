"""Methods that keep an operand in floating point: ``float`` (untouched) and
``bf16`` (rounded to bfloat16 precision, identity gradient)."""

from __future__ import annotations

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import Operand
from aqt_ext.core.registry import Method


def _float(ctx: QuantContext, op: Operand) -> Quantized:
  del ctx
  return Quantized(op.x)


def _bf16(ctx: QuantContext, op: Operand) -> Quantized:
  del ctx
  return Quantized(qz.bf16_round(op.x))


FLOAT = Method("float", _float, integer=False)
BF16 = Method("bf16", _bf16, integer=False, fixed_bits=16)
