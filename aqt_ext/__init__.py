"""aqt_ext: quantization-aware training for JAX/Flax.

The core (configs, quantizers, layers, rules) imports without TensorFlow.
The other submodules (``aqt_ext.serve``, ``aqt_ext.cost``, ``aqt_ext.train``,
...) are attributes of the package, imported on first use, so
``import aqt_ext; aqt_ext.serve.export(...)`` works and ``import aqt_ext``
stays cheap.
"""

import importlib

from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant, layer_preset,
                            parse_spec)
from aqt_ext.layers import QuantConv, QuantDense
from aqt_ext.rules import quantize_model

# Submodules imported on first attribute access (PEP 562).
SUBMODULES = ("config", "cost", "data", "dq", "layers", "models", "pareto",
              "ptq", "quantizers", "rules", "serve", "sweep", "train")

__all__ = [
    "LayerQuant", "ModelQuant", "TensorQuant", "QuantConv", "QuantDense",
    "layer_preset", "parse_spec", "quantize_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(SUBMODULES))
