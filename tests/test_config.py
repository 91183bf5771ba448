"""aqt_ext.config: how ModelQuant rules pick a layer's config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import aqt_ext as A
from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant

W8 = A.layer_preset("uniform", 8, 8)
W4 = A.layer_preset("uniform", 4, 4)
LSQ = A.layer_preset("lsq", 4, 4)


def test_first_matching_rule_wins_over_later_overlapping_rules():
  default = LayerQuant(TensorQuant("uniform", 2, granularity="per_channel"))
  mq = ModelQuant(default=default, rules=(
      (r"block0/conv1$", W8),   # specific rule first
      (r"conv", W4),            # matches every conv, including block0/conv1
      (r"(^|/)conv1$", LSQ)))   # matches every conv1
  assert mq.for_path("block0/conv1") is W8      # rules 1, 2, 3 match
  assert mq.for_path("block1/conv1") is W4      # rules 2, 3 match
  assert mq.for_path(("block1", "conv1")) is W4  # a path as its names
  assert mq.for_path("head") is default         # no rule matches
  # The same rules in the other order: the general rule now shadows the rest.
  flipped = ModelQuant(default=default, rules=tuple(reversed(mq.rules)))
  assert flipped.for_path("block0/conv1") is LSQ
  assert flipped.for_path("block1/conv2") is W4


def test_layers_in_a_model_take_the_first_matching_rule():
  """Resolved by module path inside a model: the quantizer parameters the
  layer creates show which config it took."""

  class Net(nn.Module):
    quant: ModelQuant

    @nn.compact
    def __call__(self, x):
      x = A.QuantDense(4, name="conv_a", quant=self.quant)(x)
      x = A.QuantDense(4, name="conv_b", quant=self.quant)(nn.relu(x))
      return A.QuantDense(3, name="head", quant=self.quant)(nn.relu(x))

  mq = ModelQuant(rules=((r"conv_a$", LSQ), (r"conv", W4), (r"_b$", LSQ)))
  params = Net(mq).init(jax.random.PRNGKey(0), jnp.ones((2, 5)))["params"]
  assert set(params["conv_a"]) == {"kernel", "bias", "kernel_lsq_step",
                                   "input_lsq_step"}
  assert set(params["conv_b"]) == {"kernel", "bias"}  # W4, not the LSQ rule
  assert set(params["head"]) == {"kernel", "bias"}


def test_dq_weight_update_presets():
  """'dq' trains weights directly; 'dqste' / 'dqwste' keep the latent-STE
  variant (the DQ ablation's second weight update)."""
  from aqt_ext.config import parse_spec  # pylint: disable=g-import-not-at-top
  for spec, update, inp in [("dq:w2a2", "direct", "dq"),
                            ("dqw:w2a2", "direct", "uniform"),
                            ("dqste:w2a2", "latent_ste", "dq"),
                            ("dqwste:w3a3", "latent_ste", "uniform")]:
    lq = parse_spec(spec).default
    assert (lq.weight.method, lq.weight.dq_update, lq.input.method) == (
        "dq", update, inp), spec


def test_static_suffix_makes_uniform_input_ranges_static():
  q = A.parse_spec("w4a4_fl8_static", first="first$", last="last$")
  assert q.default.input.calibration == "static"
  assert [lq.input.calibration for _, lq in q.rules] == ["static", "static"]
  assert q.default.weight == A.parse_spec("w4a4_fl8").default.weight
  # LSQ inputs keep their learned step; the 8-bit first/last layers' become
  # static.
  lsq = A.parse_spec("lsq:w4a4_fl8_static", first="first$", last="last$")
  assert lsq.default == A.parse_spec("lsq:w4a4_fl8").default
  assert [lq.input.calibration for _, lq in lsq.rules] == ["static"] * 2
  with pytest.raises(ValueError, match="'_static' makes uniform per-tensor"):
    A.parse_spec("aqt:w4a4_static")
  with pytest.raises(ValueError, match="is not valid"):
    A.parse_spec("w4a4_static_fl8")


def test_residual_suffix_quantizes_the_named_activations_first():
  """``_rR``: one rule per `residual` regex, before the others (first match
  wins), an R-bit static per-tensor range on that regex's grid; the
  layers' configs are those of the spec without it."""
  res = {"branch$": "full", "stem$": "unsigned"}
  q = A.parse_spec("w4a4_fl8_static_r8", first="first$", last="last$",
                   residual=res)
  plain = A.parse_spec("w4a4_fl8_static", first="first$", last="last$")
  assert q.default == plain.default and q.rules[2:] == plain.rules
  assert [p for p, _ in q.rules[:2]] == ["branch$", "stem$"]
  for (_, lq), grid in zip(q.rules[:2], ("full", "unsigned")):
    assert lq.input == TensorQuant("uniform", 8, grid=grid,
                                   calibration="static")
    assert lq.weight == A.config.FLOAT
  # An activation quantizer takes its rule's input; the default never.
  assert q.for_activation("s/branch") == q.rules[0][1].input
  assert q.for_activation("s/conv1") == A.config.FLOAT
  assert A.parse_spec("w4a4_r6", residual=res).for_activation(
      "stem").bits == 6
  assert A.parse_spec("w4a4_r8").rules == ()  # no regexes given
  for bad in ("w4a4_r9", "w4a4_r1"):
    with pytest.raises(ValueError, match="residual bits"):
      A.parse_spec(bad, residual=res)
  with pytest.raises(ValueError, match="is not valid"):
    A.parse_spec("w4a4_r8_static", residual=res)
