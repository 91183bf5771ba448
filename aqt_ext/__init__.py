"""aqt_ext: quantization-aware training for JAX/Flax.

The configs (`TensorQuant`, `LayerQuant`, `ModelQuant`, `parse_spec`) and
the numerics (`aqt_ext.core`) import jax and numpy only. Everything that
needs a framework is imported on first use (PEP 562): the linen layers
(`QuantDense`, `QuantConv`, `QuantEinsum`, `quantize_model`, also under
`aqt_ext.linen`), the NNX layers (`aqt_ext.nnx`), and the submodules
(``aqt_ext.serve``, ``aqt_ext.train``, ...), so ``import aqt_ext.core``
never loads flax.
"""

import importlib

from aqt_ext.config import (GradQuant, LayerQuant, ModelQuant, TensorQuant,
                            layer_preset, parse_spec)

# Submodules imported on first attribute access.
SUBMODULES = ("config", "core", "cost", "data", "linen", "models", "nnx",
              "pareto", "ptq", "serve", "sweep", "train")
# Names of the linen API, imported from aqt_ext.linen on first access.
LINEN_NAMES = ("QuantAct", "QuantConv", "QuantDense", "QuantEinsum",
               "quantize_model")

__all__ = ["GradQuant", "LayerQuant", "ModelQuant", "TensorQuant",
           "layer_preset",
           "parse_spec", *LINEN_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in LINEN_NAMES:
    return getattr(importlib.import_module(f"{__name__}.linen"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(SUBMODULES) | set(LINEN_NAMES))
