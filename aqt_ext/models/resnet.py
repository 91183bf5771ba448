"""Quantizable ResNets: ResNet v1.5 for ImageNet and CIFAR ResNet-(6n+2).

Written in the spirit of ``flax/examples/imagenet/models.py``. Every conv is a
`QuantConv` (no bias, followed by `nn.BatchNorm`) and the classifier a
`QuantDense`; all get the model's one `quant` (a `ModelQuant`) and resolve
their own `LayerQuant` from their module path, so per-layer rules are plain
regexes on stable names:

* stem: ``conv_init`` / ``bn_init``; classifier: ``head``;
* blocks: ``stage{i}_block{j}`` (both indices 0-based), holding ``conv1``,
  ``bn1``, ``conv2``, ``bn2`` (bottleneck: also ``conv3``, ``bn3``) and, where
  the block changes the shape, the projection shortcut ``proj_conv`` /
  ``proj_bn``.

E.g. ``'stage1_block0/conv2'`` is the second conv of the first block of the
second stage. The activations that meet a residual add have activation
quantizers (`QuantAct`): ``stem_quant`` (the stem's ReLU output, the first
block's identity shortcut), and in each block ``branch_quant`` (its last
BN's output, before the add) and, with a projection, ``shortcut_quant``.
They are the identity unless a rule names them (the quant spec's ``_rR``,
`aqt_ext.models.RESIDUAL`).

ImageNet ResNet v1.5 (`ResNet`): 7x7/2 stem conv, 3x3/2 max pool, four stages
of basic (ResNet-18/34) or bottleneck (ResNet-26/50/101/152/200) blocks, the
first block of stages 1-3 with stride 2, on the 3x3 conv in a bottleneck
(v1.5; v1 strides the first 1x1 conv); global average pool; dense head.

CIFAR ResNet-(6n+2) (`CifarResNet`, He et al. 2016, Sec. 4.2): 3x3 stem conv
without pooling, three stages of n basic blocks with 16/32/64 filters, global
average pool, dense head. Where a block changes the shape it uses a projection
shortcut (1x1 conv + BN, the paper's option B), not the paper's CIFAR choice of
zero-padded identity (option A); that adds 2,752 parameters at width 1
(ResNet-20: 272,474 instead of about 269,722).

Channel counts are ``int(base * width)`` (the paper's filter multiplier).
Logits are returned in float32 whatever the compute `dtype`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aqt_ext.config import ModelQuant
from aqt_ext.core import initializers
from aqt_ext.linen.layers import QuantAct, QuantConv, QuantDense

ModuleDef = Callable[..., nn.Module]

# He normal, fan-out (as torchvision / TF official ResNets).
conv_kernel_init = initializers.variance_scaling(2.0, "fan_out", "normal")

# ImageNet ResNet depth -> (blocks per stage, block kind).
IMAGENET_STAGES: dict[int, tuple[tuple[int, ...], str]] = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    26: ((2, 2, 2, 2), "bottleneck"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
    200: ((3, 24, 36, 3), "bottleneck"),
}
CIFAR_DEPTHS = (8, 14, 20, 32, 56, 110)


def channels(base: int, width: float) -> int:
  """Channel count ``int(base * width)``; at least 1."""
  n = int(base * width)
  if n < 1:
    raise ValueError(f"width={width!r} gives {n} channels for a base of "
                     f"{base}; allowed: width >= {1 / base}")
  return n


def check_head_fields(cls: str, num_classes: Any, width: Any):
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"{cls}.num_classes={num_classes!r} is not allowed; "
                     "allowed: an int >= 1")
  if not isinstance(width, (int, float)) or not width > 0:
    raise ValueError(f"{cls}.width={width!r} is not allowed; allowed: a "
                     "number > 0")


class BasicBlock(nn.Module):
  """Two 3x3 convs; the first carries the stride."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True
  act: ModuleDef = QuantAct

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    y = self.norm(name="bn2", scale_init=_last_scale_init(
        self.zero_init_residual))(y)
    y = self.act(name="branch_quant")(y)
    return nn.relu(y + _shortcut(self, x, y.shape))


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand to 4x filters."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True
  act: ModuleDef = QuantAct

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(4 * self.filters, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=_last_scale_init(
        self.zero_init_residual))(y)
    y = self.act(name="branch_quant")(y)
    return nn.relu(y + _shortcut(self, x, y.shape))


BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock, "bottleneck": BottleneckBlock}


def _last_scale_init(zero: bool) -> Callable:
  return nn.initializers.zeros_init() if zero else nn.initializers.ones_init()


def _shortcut(block: nn.Module, x: jax.Array, shape: tuple[int, ...]
              ) -> jax.Array:
  """Identity, or a 1x1 strided conv + BN when the block changes the shape.

  Called from inside the block's compact `__call__`.
  """
  if x.shape == shape:
    return x
  x = block.conv(shape[-1], (1, 1), block.strides, name="proj_conv")(x)
  return block.act(name="shortcut_quant")(block.norm(name="proj_bn")(x))


def _layer_factories(mdl: nn.Module, train: bool
                     ) -> tuple[ModuleDef, ModuleDef, ModuleDef]:
  """The conv, norm and activation-quantizer constructors shared by all
  layers of `mdl`."""
  conv = functools.partial(QuantConv, use_bias=False, dtype=mdl.dtype,
                           kernel_init=conv_kernel_init, quant=mdl.quant)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=mdl.bn_momentum, epsilon=mdl.bn_epsilon,
                           dtype=mdl.dtype)
  return conv, norm, functools.partial(QuantAct, quant=mdl.quant)


def _stages(mdl: nn.Module, x: jax.Array, layers: tuple[ModuleDef, ...],
            stage_sizes: Sequence[int], base_filters: int,
            block_cls: type[nn.Module]) -> jax.Array:
  """Stage i has ``base_filters * 2**i * width`` filters; the first block of
  every stage but the first has stride 2."""
  conv, norm, act = layers
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      x = block_cls(channels(base_filters * 2**i, mdl.width), conv, norm,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=mdl.zero_init_residual, act=act,
                    name=f"stage{i}_block{j}")(x)
  return x


def _head(mdl: nn.Module, x: jax.Array) -> jax.Array:
  """Global average pool, then the dense classifier; float32 logits."""
  x = jnp.mean(x, axis=(1, 2))
  x = QuantDense(mdl.num_classes, dtype=mdl.dtype, quant=mdl.quant,
                 name="head")(x)
  return x.astype(jnp.float32)


class ResNet(nn.Module):
  """ImageNet ResNet v1.5 (see the module docstring).

  Attributes:
    stage_sizes: blocks per stage.
    block: ``basic`` or ``bottleneck``.
    num_classes: classifier outputs.
    width: filter multiplier.
    quant: quantization of every conv and of the head, resolved by path.
    dtype: compute dtype (parameters stay float32).
    bn_momentum, bn_epsilon: BatchNorm settings.
    zero_init_residual: zero-init the last BN scale of each block.
  """

  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  width: float = 1.0
  quant: ModelQuant = ModelQuant()
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_head_fields("ResNet", self.num_classes, self.width)
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet.block={self.block!r} is not allowed; allowed "
                       f"values: {', '.join(map(repr, BLOCKS))}")
    layers = _layer_factories(self, train)
    conv, norm, _ = layers
    x = conv(channels(64, self.width), (7, 7), (2, 2),
             padding=((3, 3), (3, 3)), name="conv_init")(x)
    x = layers[2](name="stem_quant")(nn.relu(norm(name="bn_init")(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = _stages(self, x, layers, self.stage_sizes, 64, BLOCKS[self.block])
    return _head(self, x)


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2) (see the module docstring).

  Attributes:
    depth: 6n+2 for n >= 1 basic blocks per stage.
    num_classes, width, quant, dtype, bn_momentum, bn_epsilon,
    zero_init_residual: as in `ResNet`.
  """

  depth: int
  num_classes: int
  width: float = 1.0
  quant: ModelQuant = ModelQuant()
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_head_fields("CifarResNet", self.num_classes, self.width)
    if (not isinstance(self.depth, int) or self.depth < 8
        or (self.depth - 2) % 6):
      raise ValueError(f"CifarResNet.depth={self.depth!r} is not allowed; "
                       "allowed: 6n+2 for n >= 1 (8, 14, 20, 32, 56, 110, ...)")
    layers = _layer_factories(self, train)
    conv, norm, _ = layers
    x = conv(channels(16, self.width), (3, 3), name="conv_init")(x)
    x = layers[2](name="stem_quant")(nn.relu(norm(name="bn_init")(x)))
    x = _stages(self, x, layers, ((self.depth - 2) // 6,) * 3, 16,
                BasicBlock)
    return _head(self, x)
