"""aqt_ext: quantization-aware training for JAX/Flax.

The core (configs, quantizers, layers) imports without TensorFlow.
"""

from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant, layer_preset,
                            parse_spec)
from aqt_ext.layers import QuantConv, QuantDense

__all__ = [
    "LayerQuant", "ModelQuant", "TensorQuant", "QuantConv", "QuantDense",
    "layer_preset", "parse_spec",
]
__version__ = "0.1.0"
