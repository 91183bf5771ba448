"""aqt_ext on flax.nnx: quantized layers and `quantize_model` by rules."""

from aqt_ext.nnx.layers import (AQuantBorder, NnxContext, QuantAct,
                                QuantConv, QuantEinsum, QuantLinear,
                                QuantLinearGeneral, QuantLoss, QuantStat,
                                init, intercept, pop_losses, quant_acts,
                                quant_key, quant_layers, set_paths)
from aqt_ext.nnx.rules import quantize_model

__all__ = ["AQuantBorder", "NnxContext", "QuantAct", "QuantConv",
           "QuantEinsum",
           "QuantLinear", "QuantLinearGeneral", "QuantLoss", "QuantStat",
           "init", "intercept", "pop_losses", "quant_acts", "quant_key", "quant_layers",
           "quantize_model",
           "set_paths"]
