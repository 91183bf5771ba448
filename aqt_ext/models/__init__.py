"""Model registry.

``create_model('resnet50', num_classes=1000, quant=parse_spec(
'w4a4_fl8', first=FIRST_LAYER, last=LAST_LAYER))`` builds a quantized model;
`FIRST_LAYER` / `LAST_LAYER` are the regexes naming the stem conv and the
classifier of every model here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from aqt_ext.config import ModelQuant
from aqt_ext.models.resnet import (CIFAR_DEPTHS, IMAGENET_STAGES, CifarResNet,
                                   ResNet)

FIRST_LAYER = r"(^|/)conv_init$"
LAST_LAYER = r"(^|/)head$"

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": functools.partial(ResNet, stage_sizes=stages, block=block)
       for d, (stages, block) in sorted(IMAGENET_STAGES.items())},
    **{f"cifar_resnet{d}": functools.partial(CifarResNet, depth=d)
       for d in CIFAR_DEPTHS},
}


def create_model(name: str, *, num_classes: int, width: float = 1.0,
                 quant: ModelQuant = ModelQuant(), dtype: Any = jnp.float32
                 ) -> nn.Module:
  """The registered model `name` (a key of `MODELS`)."""
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not allowed; allowed values: "
                     f"{', '.join(map(repr, MODELS))}")
  return MODELS[name](num_classes=num_classes, width=width, quant=quant,
                      dtype=dtype)


__all__ = ["FIRST_LAYER", "LAST_LAYER", "MODELS", "CifarResNet", "ResNet",
           "create_model"]
