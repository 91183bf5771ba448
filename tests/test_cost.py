"""Tests for aqt_ext.cost: AQT's reference numbers and hand-computed costs."""

import flax.linen as nn
import pytest

from aqt_ext.config import ModelQuant, layer_preset, parse_spec
from aqt_ext.cost import LayerCost, ModelCost, format_table, model_cost
from aqt_ext.linen.layers import QuantConv, QuantDense
from aqt_ext.models import FIRST_LAYER, LAST_LAYER, create_model
from aqt_ext.linen.rules import quantize_model

# AQT's pinned values for ResNet-50 v1.5, 224x224, 1000 classes (design §8).
R50_MACS = 4_089_184_256
R50_WEIGHTS = 25_502_912
R50_BF16_BOPS = 1_046_831_169_536


def _resnet50_cost(quant: ModelQuant) -> ModelCost:
  model = create_model("resnet50", num_classes=1000, quant=quant)
  return model_cost(model, (224, 224, 3), train=False)


@pytest.mark.parametrize("quant,bits", [
    (ModelQuant(), 16),
    (parse_spec("bf16"), 16),
    (parse_spec("w8a8"), 8),
    (parse_spec("w4a4"), 4),
])
def test_resnet50_reference_numbers(quant, bits):
  cost = _resnet50_cost(quant)
  assert cost.as_dict() == {
      "macs": R50_MACS,
      "bops": R50_BF16_BOPS * (bits / 16) ** 2,  # 1, 1, 0.25, 0.0625
      "weight_bits": R50_WEIGHTS * bits,
      "weights": R50_WEIGHTS,
  }
  assert len(cost.layers) == 54  # 49 main convs + 4 projections + head
  assert R50_MACS * 16 * 16 == R50_BF16_BOPS


def test_first_and_last_at_8_bits_changes_only_those_layers():
  base = _resnet50_cost(parse_spec("w4a4"))
  fl8 = _resnet50_cost(parse_spec("w4a4_fl8", first=FIRST_LAYER,
                                  last=LAST_LAYER))
  assert [l.path for l in base.layers] == [l.path for l in fl8.layers]
  changed = {a.path: b.bops / a.bops
             for a, b in zip(base.layers, fl8.layers) if a.bops != b.bops}
  assert changed == {"conv_init": 4.0, "head": 4.0}
  stem, head = fl8.layers[0], fl8.layers[-1]
  assert fl8.bops - base.bops == (stem.macs + head.macs) * (64 - 16)
  assert stem.macs == 112 * 112 * 7 * 7 * 3 * 64
  assert head.macs == 2048 * 1000


W8A4 = layer_preset("uniform", 8, 4)
W8A8 = layer_preset("uniform", 8, 8)


class Tiny(nn.Module):
  """Strided conv, grouped conv, plain conv, dense on a 3-D input, head."""

  @nn.compact
  def __call__(self, x):
    x = QuantConv(8, (3, 3), strides=2, quant=W8A4, name="conv_s2")(x)
    x = QuantConv(8, (3, 3), padding="VALID", feature_group_count=4,
                  quant=ModelQuant(rules=((r"grouped$", W8A8),)),
                  name="grouped")(x)
    x = nn.Conv(6, (2, 2), strides=(1, 2), padding="VALID", name="plain")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, 2, 6)
    x = nn.Dense(5, name="dense3d")(x)
    x = x.reshape(x.shape[0], -1)  # (B, 10)
    return QuantDense(3, quant=W8A8, name="head")(x)


# Hand-computed: (path, MACs, weights, weight bits, input bits).
TINY = [
    ("conv_s2", 5 * 5 * 3 * 3 * 4 * 8, 3 * 3 * 4 * 8, 8, 4),  # 9x9 -> 5x5
    ("grouped", 3 * 3 * 3 * 3 * 8 * 8 // 4, 3 * 3 * 2 * 8, 8, 8),  # 5 -> 3
    ("plain", 2 * 1 * 2 * 2 * 8 * 6, 2 * 2 * 8 * 6, 16, 16),  # 3x3 -> 2x1
    ("dense3d", 2 * 6 * 5, 6 * 5, 16, 16),  # 2 rows of 6 -> 5
    ("head", 10 * 3, 10 * 3, 8, 8),
]


def test_tiny_model_by_hand():
  cost = model_cost(Tiny(), (9, 9, 4))
  got = [(l.path, l.macs, l.weights, l.weight_bits, l.input_bits)
         for l in cost.layers]
  assert got == TINY
  assert [l.kind for l in cost.layers] == ["conv"] * 3 + ["dense"] * 2
  assert [l.feature_group_count for l in cost.layers] == [1, 4, 1, 1, 1]
  assert cost.layers[1].input_shape == (1, 5, 5, 8)
  assert cost.layers[1].kernel_shape == (3, 3, 2, 8)
  assert cost.layers[1].output_shape == (1, 3, 3, 8)
  assert cost.macs == 7200 + 1296 + 384 + 60 + 30
  assert cost.bops == (7200 * 32 + 1296 * 64 + 384 * 256 + 60 * 256
                       + 30 * 64)
  assert cost.weights == 288 + 144 + 192 + 30 + 30
  assert cost.weight_bits == 288 * 8 + 144 * 8 + (192 + 30) * 16 + 30 * 8


def test_bops_multipliers():
  base = model_cost(Tiny(), (9, 9, 4))
  cost = model_cost(Tiny(), (9, 9, 4),
                    multipliers={r"^grouped$": 2, r"^(grouped|head)$": 0.5})
  assert [l.bops_multiplier for l in cost.layers] == [1, 2, 1, 1, 0.5]
  assert cost.bops == base.bops + 1296 * 64 - 30 * 64 / 2
  assert cost.weight_bits == base.weight_bits  # memory is not scaled


def test_shared_module_counts_macs_per_call_and_weights_once():

  class Shared(nn.Module):

    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(4, name="shared")
      return dense(dense(x))

  cost = model_cost(Shared(), (4,))
  assert [l.path for l in cost.layers] == ["shared", "shared"]
  assert (cost.macs, cost.weights, cost.weight_bits) == (32, 16, 256)


@pytest.mark.parametrize("kw,msg", [
    ({"multipliers": {"head": -1.0}}, r"multipliers\['head'\]=-1.0"),
    ({"multipliers": {"(": 2.0}}, "multipliers key '\\('"),
])
def test_bad_multipliers(kw, msg):
  with pytest.raises(ValueError, match=msg):
    model_cost(Tiny(), (9, 9, 4), **kw)


@pytest.mark.parametrize("shape", [(), (9, 0, 4), (9.0, 9, 4)])
def test_bad_input_shape(shape):
  with pytest.raises(ValueError, match="input_shape"):
    model_cost(Tiny(), shape)


def test_format_table():
  cost = model_cost(Tiny(), (9, 9, 4), multipliers={"head": 2.0})
  table = format_table(cost)
  lines = table.splitlines()
  assert len(lines) == 1 + 1 + 5 + 1 + 1  # header, rule, layers, rule, total
  assert lines[2].split()[:6] == ["conv_s2", "conv", "1x9x9x4", "3x3x4x8",
                                  "1x5x5x8", "1"]
  assert "8/8 x2" in lines[6]
  assert lines[-1].split() == ["total", f"{cost.macs:,}", f"{cost.bops:,.0f}",
                               f"{cost.weights:,}", f"{cost.weight_bits:,}"]


def test_layer_cost_fields():
  layer = LayerCost(path="a", kind="dense", input_shape=(1, 3),
                    kernel_shape=(3, 2), output_shape=(1, 2),
                    feature_group_count=1, weight_bits=4, input_bits=8)
  assert (layer.macs, layer.bops, layer.weights, layer.memory_bits) == (
      6, 192, 6, 24)


W4A4_SIGNED = layer_preset("uniform", 4, 4, signed_input=True)


class MLP(nn.Module):
  """16 -> 8 -> 4, with nn.Dense or (given `quant`) QuantDense layers."""

  quant: object = None

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate((8, 4)):
      if i:
        x = nn.relu(x)
      x = (nn.Dense(features, name=f"Dense_{i}") if self.quant is None else
           QuantDense(features, quant=self.quant, name=f"Dense_{i}"))(x)
    return x


def test_a_quantize_model_wrapper_counts_each_layer_once_at_its_bits():
  """The wrapper runs each matched nn.Dense as a QuantDense in its scope;
  only that contraction counts, as if the model were written with
  QuantDense."""
  wrapped = model_cost(quantize_model(MLP(), [(".*", W4A4_SIGNED)]), (16,))
  direct = model_cost(MLP(quant=W4A4_SIGNED), (16,))
  float_cost = model_cost(MLP(), (16,))
  assert wrapped.layers == direct.layers
  assert [(l.path, l.weight_bits, l.input_bits) for l in wrapped.layers] == [
      ("Dense_0", 4, 4), ("Dense_1", 4, 4)]
  macs = 16 * 8 + 8 * 4
  assert wrapped.macs == float_cost.macs == macs
  assert wrapped.bops == macs * 4 * 4 < float_cost.bops == macs * 16 * 16
  assert wrapped.weight_bits == macs * 4


class Attention(nn.Module):
  """DenseGeneral projections, as in attention: (5, 8) -> (5, 2, 4) -> 8."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 4), name="query")(x)
    return nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)


def test_dense_general_counts_its_contracting_axes():
  float_cost = model_cost(Attention(), (5, 8))
  wrapped = model_cost(quantize_model(Attention(), [(".*", W4A4_SIGNED)]),
                       (5, 8))
  for cost, bits in ((float_cost, 16), (wrapped, 4)):
    assert [(l.path, l.kernel_shape, l.output_shape, l.macs, l.weight_bits,
             l.input_bits) for l in cost.layers] == [
                 ("query", (8, 2, 4), (1, 5, 2, 4), 5 * 8 * 8, bits, bits),
                 ("out", (2, 4, 8), (1, 5, 8), 5 * 8 * 8, bits, bits)]
    assert cost.bops == 2 * 320 * bits * bits
    assert cost.weights == 2 * 64
