"""aqt_ext on flax.linen: quantized layers and `quantize_model` by rules."""

from aqt_ext.linen.layers import (LinenContext, QuantAct, QuantConv,
                                  QuantDense, QuantEinsum,
                                  calibrate_lsq_steps)
from aqt_ext.linen.rules import QuantizedModel, RulesReport, quantize_model

__all__ = ["LinenContext", "QuantAct", "QuantConv", "QuantDense", "QuantEinsum",
           "QuantizedModel", "RulesReport", "calibrate_lsq_steps",
           "quantize_model"]
