"""Model registry.

``create_model('resnet50', num_classes=1000, quant=parse_spec(
'w4a4_fl8', first=FIRST_LAYER, last=LAST_LAYER))`` builds a quantized linen
model; with ``framework='nnx'`` (and ``rngs=``, ``in_features=``) the NNX
twin of `aqt_ext.models.nnx_resnet`, quantized in place by
`aqt_ext.nnx.quantize_model` with the same `ModelQuant`. `FIRST_LAYER` /
`LAST_LAYER` are the regexes naming the stem conv and the classifier of every
model here, in both frameworks (the NNX attribute paths are the linen module
paths).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from aqt_ext import nnx as aqt_nnx
from aqt_ext.config import ModelQuant, parse_spec
from aqt_ext.models import nnx_resnet
from aqt_ext.models.resnet import (CIFAR_DEPTHS, IMAGENET_STAGES, CifarResNet,
                                   ResNet)

FIRST_LAYER = r"(^|/)conv_init$"
LAST_LAYER = r"(^|/)head$"
# The activation quantizers of what meets a residual add (`QuantAct`),
# regex -> grid: the pre-add outputs are signed, the stem's ReLU output not.
RESIDUAL = {r"(^|/)(branch|shortcut)_quant$": "full",
            r"(^|/)stem_quant$": "unsigned"}
FRAMEWORKS = ("linen", "nnx")

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": functools.partial(ResNet, stage_sizes=stages, block=block)
       for d, (stages, block) in sorted(IMAGENET_STAGES.items())},
    **{f"cifar_resnet{d}": functools.partial(CifarResNet, depth=d)
       for d in CIFAR_DEPTHS},
}
NNX_MODELS: dict[str, Callable[..., nnx.Module]] = nnx_resnet.MODELS
assert set(NNX_MODELS) == set(MODELS)


def quant_spec(spec: str) -> ModelQuant:
  """`aqt_ext.config.parse_spec` with the regexes of this zoo's first and
  last layers and residual activation quantizers."""
  return parse_spec(spec, first=FIRST_LAYER, last=LAST_LAYER,
                    residual=RESIDUAL)


def create_model(name: str, *, num_classes: int, width: float = 1.0,
                 quant: ModelQuant = ModelQuant(), dtype: Any = jnp.float32,
                 framework: str = "linen", rngs: nnx.Rngs | None = None,
                 in_features: int = 3) -> nn.Module | nnx.Module:
  """The registered model `name` (a key of `MODELS`).

  ``framework='linen'`` (default): an unbound linen module. ``'nnx'``: an NNX
  module with parameters from `rngs` for `in_features` input channels, its
  layers quantized in place by `quant` (`aqt_ext.nnx.quantize_model`); its
  quantizer variables are created by ``aqt_ext.nnx.init(model, batch)``.
  """
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not allowed; allowed values: "
                     f"{', '.join(map(repr, MODELS))}")
  if framework == "linen":
    return MODELS[name](num_classes=num_classes, width=width, quant=quant,
                        dtype=dtype)
  if framework != "nnx":
    raise ValueError(f"framework={framework!r} is not allowed; allowed "
                     f"values: {', '.join(map(repr, FRAMEWORKS))}")
  if rngs is None:
    raise ValueError("create_model(framework='nnx') needs rngs=nnx.Rngs(...) "
                     "(the parameters are created with the module)")
  model = NNX_MODELS[name](num_classes=num_classes, width=width, dtype=dtype,
                           in_features=in_features, rngs=rngs)
  aqt_nnx.quantize_model(model, quant)
  return model


__all__ = ["FIRST_LAYER", "FRAMEWORKS", "LAST_LAYER", "RESIDUAL", "MODELS", "NNX_MODELS",
           "CifarResNet", "ResNet", "create_model", "quant_spec"]
