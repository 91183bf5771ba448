"""aqt_ext: quantization-aware training for JAX/Flax.

The core (configs, quantizers, layers) imports without TensorFlow.
"""

from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant, layer_preset,
                            parse_spec)
from aqt_ext.layers import QuantConv, QuantDense
from aqt_ext.rules import quantize_model

__all__ = [
    "LayerQuant", "ModelQuant", "TensorQuant", "QuantConv", "QuantDense",
    "layer_preset", "parse_spec", "quantize_model",
]
__version__ = "0.1.0"
