"""The ResNets of `aqt_ext.models.resnet` on flax.nnx, built from float layers.

`CifarResNet` (ResNet-(6n+2)) and `ResNet` (ImageNet v1.5) are the linen
models' twins: plain ``nnx.Conv`` (no bias, He fan-out init), ``nnx.BatchNorm``
(momentum 0.9, epsilon 1e-5) and an ``nnx.Linear`` head, with attribute names
that are the linen module paths (``conv_init``, ``bn_init``,
``stage{i}_block{j}/conv1|bn1|conv2|bn2[|conv3|bn3][|proj_conv|proj_bn]``,
``head``; the activation quantizers ``stem_quant``, ``branch_quant``,
``shortcut_quant``, `aqt_ext.nnx.QuantAct`, float until a rule names
them). So their state has the linen variables' paths and shapes
(``nnx.Param`` = ``params``, ``nnx.BatchStat`` = ``batch_stats``), the same
`ModelQuant` rules (`aqt_ext.models.FIRST_LAYER` / `LAST_LAYER`) match the
same layers, and `aqt_ext.nnx.quantize_model` quantizes them in place
(`aqt_ext.models.create_model` with ``framework='nnx'`` does). On the same
variables both compute the same logits. Parameter values at creation come
from ``rngs`` and differ from a linen ``init`` with the same seed.

A block's projection shortcut is created where its stride or channel count
changes the shape (the linen block decides from the shapes it sees; for these
architectures that is the same set of blocks). Training mode (batch
statistics, updated static quantizer ranges) is the default; ``model.eval()``
switches to running averages and frozen ranges, ``model.train()`` back.
Logits are float32 whatever the compute `dtype`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from aqt_ext.models.resnet import (CIFAR_DEPTHS, IMAGENET_STAGES, channels,
                                   check_head_fields,
                                   conv_kernel_init)
from aqt_ext.nnx.layers import QuantAct

# As the linen models' defaults.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _check(cls: str, num_classes: Any, width: Any, in_features: Any) -> None:
  check_head_fields(cls, num_classes, width)
  if not isinstance(in_features, int) or in_features < 1:
    raise ValueError(f"{cls}.in_features={in_features!r} is not allowed; "
                     "allowed: an int >= 1 (the image channels)")


class _Layers:
  """The conv and norm constructors shared by all layers of one model."""

  def __init__(self, dtype, bn_momentum, bn_epsilon, rngs: nnx.Rngs):
    self.conv = functools.partial(nnx.Conv, use_bias=False, dtype=dtype,
                                  kernel_init=conv_kernel_init, rngs=rngs)
    self.norm = functools.partial(nnx.BatchNorm, momentum=bn_momentum,
                                  epsilon=bn_epsilon, dtype=dtype, rngs=rngs)


def _last_scale_init(zero: bool) -> Callable:
  return nn.initializers.zeros_init() if zero else nn.initializers.ones_init()


class BasicBlock(nnx.Module):
  """Two 3x3 convs; the first carries the stride."""

  expansion = 1

  def __init__(self, in_features: int, filters: int, strides: int,
               layers: _Layers, zero_init_residual: bool = True):
    self.conv1 = layers.conv(in_features, filters, (3, 3), strides)
    self.bn1 = layers.norm(filters)
    self.conv2 = layers.conv(filters, filters, (3, 3))
    self.bn2 = layers.norm(filters,
                           scale_init=_last_scale_init(zero_init_residual))
    self.branch_quant = QuantAct()
    _add_shortcut(self, in_features, filters, strides, layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.branch_quant(self.bn2(self.conv2(y)))
    return nnx.relu(y + _shortcut(self, x))


class BottleneckBlock(nnx.Module):
  """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand to 4x filters."""

  expansion = 4

  def __init__(self, in_features: int, filters: int, strides: int,
               layers: _Layers, zero_init_residual: bool = True):
    self.conv1 = layers.conv(in_features, filters, (1, 1))
    self.bn1 = layers.norm(filters)
    self.conv2 = layers.conv(filters, filters, (3, 3), strides)
    self.bn2 = layers.norm(filters)
    self.conv3 = layers.conv(filters, 4 * filters, (1, 1))
    self.bn3 = layers.norm(4 * filters,
                           scale_init=_last_scale_init(zero_init_residual))
    self.branch_quant = QuantAct()
    _add_shortcut(self, in_features, 4 * filters, strides, layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.branch_quant(self.bn3(self.conv3(y)))
    return nnx.relu(y + _shortcut(self, x))


BLOCKS: dict[str, type[nnx.Module]] = {
    "basic": BasicBlock, "bottleneck": BottleneckBlock}


def _add_shortcut(block: nnx.Module, in_features: int, out_features: int,
                  strides: int, layers: _Layers) -> None:
  """A 1x1 strided conv + BN where the block changes the shape, else none."""
  if strides != 1 or in_features != out_features:
    block.proj_conv = layers.conv(in_features, out_features, (1, 1), strides)
    block.proj_bn = layers.norm(out_features)
    block.shortcut_quant = QuantAct()
  else:
    block.proj_conv = block.proj_bn = block.shortcut_quant = None


def _shortcut(block: nnx.Module, x: jax.Array) -> jax.Array:
  if block.proj_conv is None:
    return x
  return block.shortcut_quant(block.proj_bn(block.proj_conv(x)))


class _ResNetBase(nnx.Module):
  """Stem (set by the subclass), stages ``stage{i}_block{j}``, dense head."""

  def _build_stages(self, in_features: int, stage_sizes: Sequence[int],
                    base_filters: int, block_cls: type[nnx.Module],
                    width: float, layers: _Layers, zero_init_residual: bool
                    ) -> int:
    """Stage i has ``base_filters * 2**i * width`` filters; the first block
    of every stage but the first has stride 2. Returns the output
    channels."""
    names = []
    for i, num_blocks in enumerate(stage_sizes):
      filters = channels(base_filters * 2**i, width)
      for j in range(num_blocks):
        name = f"stage{i}_block{j}"
        setattr(self, name, block_cls(
            in_features, filters, 2 if i > 0 and j == 0 else 1, layers,
            zero_init_residual))
        in_features = filters * block_cls.expansion
        names.append(name)
    self.block_names = tuple(names)
    return in_features

  def _stages_and_head(self, x: jax.Array) -> jax.Array:
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x).astype(jnp.float32)


class ResNet(_ResNetBase):
  """ImageNet ResNet v1.5, the twin of `aqt_ext.models.resnet.ResNet`.

  Args:
    stage_sizes: blocks per stage.
    block: ``basic`` or ``bottleneck``.
    num_classes: classifier outputs.
    width: filter multiplier.
    dtype: compute dtype (parameters are float32).
    in_features: input channels.
    bn_momentum, bn_epsilon: BatchNorm settings.
    zero_init_residual: zero-init the last BN scale of each block.
    rngs: parameter initialisation.
  """

  def __init__(self, stage_sizes: Sequence[int], block: str, num_classes: int,
               width: float = 1.0, dtype: Any = jnp.float32,
               in_features: int = 3, bn_momentum: float = BN_MOMENTUM,
               bn_epsilon: float = BN_EPSILON,
               zero_init_residual: bool = True, *, rngs: nnx.Rngs):
    _check("ResNet", num_classes, width, in_features)
    if block not in BLOCKS:
      raise ValueError(f"ResNet.block={block!r} is not allowed; allowed "
                       f"values: {', '.join(map(repr, BLOCKS))}")
    layers = _Layers(dtype, bn_momentum, bn_epsilon, rngs)
    stem = channels(64, width)
    self.conv_init = layers.conv(in_features, stem, (7, 7), (2, 2),
                                 padding=((3, 3), (3, 3)))
    self.bn_init = layers.norm(stem)
    self.stem_quant = QuantAct()
    out = self._build_stages(stem, stage_sizes, 64, BLOCKS[block], width,
                             layers, zero_init_residual)
    self.head = nnx.Linear(out, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_quant(nnx.relu(self.bn_init(self.conv_init(x))))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    return self._stages_and_head(x)


class CifarResNet(_ResNetBase):
  """CIFAR ResNet-(6n+2), the twin of `aqt_ext.models.resnet.CifarResNet`.

  Args:
    depth: 6n+2 for n >= 1 basic blocks per stage.
    num_classes, width, dtype, in_features, bn_momentum, bn_epsilon,
    zero_init_residual, rngs: as in `ResNet`.
  """

  def __init__(self, depth: int, num_classes: int, width: float = 1.0,
               dtype: Any = jnp.float32, in_features: int = 3,
               bn_momentum: float = BN_MOMENTUM,
               bn_epsilon: float = BN_EPSILON,
               zero_init_residual: bool = True, *, rngs: nnx.Rngs):
    _check("CifarResNet", num_classes, width, in_features)
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
      raise ValueError(f"CifarResNet.depth={depth!r} is not allowed; "
                       "allowed: 6n+2 for n >= 1 (8, 14, 20, 32, 56, 110, ...)")
    layers = _Layers(dtype, bn_momentum, bn_epsilon, rngs)
    stem = channels(16, width)
    self.conv_init = layers.conv(in_features, stem, (3, 3))
    self.bn_init = layers.norm(stem)
    self.stem_quant = QuantAct()
    out = self._build_stages(stem, ((depth - 2) // 6,) * 3, 16, BasicBlock,
                             width, layers, zero_init_residual)
    self.head = nnx.Linear(out, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_quant(nnx.relu(self.bn_init(self.conv_init(x))))
    return self._stages_and_head(x)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    **{f"resnet{d}": functools.partial(ResNet, stage_sizes=stages, block=block)
       for d, (stages, block) in sorted(IMAGENET_STAGES.items())},
    **{f"cifar_resnet{d}": functools.partial(CifarResNet, depth=d)
       for d in CIFAR_DEPTHS},
}

__all__ = ["BasicBlock", "BottleneckBlock", "CifarResNet", "MODELS", "ResNet"]
