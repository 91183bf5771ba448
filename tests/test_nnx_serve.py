"""Integer serving of NNX models (aqt_ext.nnx.serve): the served model equals
the QAT model's integer-execution twin exactly, in linen's on-disk layout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aqt_ext import nnx as qnnx
from aqt_ext import serve
from aqt_ext.config import LayerQuant, TensorQuant, layer_preset, parse_spec
from aqt_ext.nnx import serve as nserve
from third_party.flax_mnist_cnn import CNN

STATIC_W8A8 = LayerQuant(
    TensorQuant("uniform", 8, granularity="per_channel"),
    TensorQuant("uniform", 8, grid="full", calibration="static"))
DQ_W3A4 = LayerQuant(TensorQuant("dq", 3, granularity="per_channel"),
                     TensorQuant("dq", 4, grid="full"))


class Net(nnx.Module):
  """conv -> BN -> relu -> conv (2 groups) -> relu -> linear, all quantizable."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, padding="VALID",
                          feature_group_count=2, rngs=rngs)
    self.head = nnx.Linear(4 * 3 * 3, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


def _x(n=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)),
                     jnp.float32)


def _build(rules):
  model = Net(nnx.Rngs(0))
  qnnx.quantize_model(model, rules)
  return model


def _calibrated(rules, x):
  model = _build(rules)
  qnnx.init(model, x)
  model.train()
  for i in range(3):  # updates BN and static-range statistics
    model(_x(seed=i + 1))
  return model


def _twin_output(model, x):
  model.eval()
  nserve.int_execution_twin(model)
  return nnx.jit(lambda m, v: m(v))(model, x)


RULE_SETS = {
    "lsq": [("conv|head", layer_preset("lsq", 4, 8, signed_input=True))],
    "mixed": [("^conv$", layer_preset("lsq", 4, 8, signed_input=True)),
              ("conv2", layer_preset("pact", 4, 4)),
              ("head", STATIC_W8A8)],
    "dq": [("^conv$", layer_preset("uniform", 8, 8, signed_input=True)),
           ("conv2", DQ_W3A4), ("head", layer_preset("uniform", 4, 4))],
}


@pytest.mark.parametrize("rules", sorted(RULE_SETS))
def test_served_equals_the_integer_twin(rules, tmp_path):
  x = _x()
  model = _calibrated(RULE_SETS[rules], x)
  result = nserve.export(model, x, str(tmp_path / "e"))
  assert result.layers == 3
  meta = json.loads((tmp_path / "e" / serve.METADATA_FILE).read_text())
  assert sorted(meta["layers"]) == ["conv", "conv2", "head"]
  assert meta["float_layers"] == {"bn": {"module": "BatchNorm",
                                         "params": ["bias", "scale"]}}
  fresh = _build(RULE_SETS[rules])  # other weights: all come from the file
  qnnx.init(fresh, _x(seed=9))
  served = nserve.load(str(tmp_path / "e"), fresh)
  out = served(x)
  twin = _twin_output(model, x)
  if rules == "dq":
    # conv2's DQ layer runs in the twin as a float conv of the fake-quant
    # operands, served as conv(ints, table) * scale: equal up to float
    # rounding only (as in linen's test_dq_levels_serve_as_lookup_tables).
    np.testing.assert_allclose(out, twin, rtol=0,
                               atol=1e-6 * np.max(np.abs(twin)))
  else:
    np.testing.assert_array_equal(out, twin)
  # and close to the fake-quant evaluation of the QAT model
  assert result.ratio < 0.5


def test_load_refuses_other_rules_and_shapes(tmp_path):
  x = _x()
  model = _calibrated(RULE_SETS["lsq"], x)
  nserve.export(model, x, str(tmp_path / "e"))
  fewer = _build([("conv", layer_preset("lsq", 4, 8, signed_input=True))])
  qnnx.init(fewer, x)
  with pytest.raises(ValueError, match="integer layers .* differ"):
    nserve.load(str(tmp_path / "e"), fewer)
  with pytest.raises(FileExistsError):
    nserve.export(model, x, str(tmp_path / "e"))


def test_uncalibrated_static_range_is_refused(tmp_path):
  model = _build([("head", STATIC_W8A8)])
  qnnx.init(model, _x())
  with pytest.raises(ValueError, match="never calibrated"):
    nserve.export(model, _x(), str(tmp_path / "e"))
  assert not os.path.exists(tmp_path / "e" / serve.METADATA_FILE)


def _digits(n):
  """n real 28x28 digits (scikit-learn's 8x8 digits, each pixel 3x3 + pad)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  img = np.kron(d.images[:n] / 16.0, np.ones((3, 3)))  # 24x24
  img = np.pad(img, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32)
  return jnp.asarray(img), jnp.asarray(d.target[:n], jnp.int32)


def test_flax_mnist_cnn_quantized_trained_exported_served(tmp_path):
  """flax's examples/mnist CNN (tests/third_party), quantized by rules."""
  x, y = _digits(64)
  model = CNN(nnx.Rngs(0))
  report = qnnx.quantize_model(model, parse_spec(
      "lsq:w4a4_fl8", first=r"^conv1$", last=r"^linear2$"))
  assert report.quantized == ("conv1", "conv2", "linear1", "linear2")
  model.eval()  # init without dropout, as linen's init(train=False)
  qnnx.init(model, x, None)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  step0 = model.conv2.input_lsq_step[...]

  @nnx.jit
  def train_step(model, optimizer, x, y, rngs):
    def loss_fn(model, rngs):
      logits = model(x, rngs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
    optimizer.update(model, grads)
    return loss

  model.train()
  rngs = nnx.Rngs(dropout=1)
  losses = [float(train_step(model, optimizer, x, y, rngs)) for _ in range(6)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not np.array_equal(model.conv2.input_lsq_step[...], step0)
  nserve.export(model, (x, None), str(tmp_path / "e"))
  fresh = CNN(nnx.Rngs(5))
  qnnx.quantize_model(fresh, parse_spec("lsq:w4a4_fl8", first=r"^conv1$",
                                        last=r"^linear2$"))
  fresh.eval()
  qnnx.init(fresh, x, None)
  served = nserve.load(str(tmp_path / "e"), fresh)
  out = served(x, None)
  np.testing.assert_array_equal(out, _twin_output_args(model, x))
  assert out.shape == (64, 10)


def _twin_output_args(model, x):
  model.eval()
  nserve.int_execution_twin(model)
  return nnx.jit(lambda m, v: m(v, None))(model, x)


def test_served_matches_qat_eval_closely(tmp_path):
  x = _x()
  model = _calibrated(RULE_SETS["mixed"], x)
  model.eval()
  qat = nnx.jit(lambda m, v: m(v))(model, x)
  nserve.export(model, x, str(tmp_path / "e"))
  fresh = _build(RULE_SETS["mixed"])
  qnnx.init(fresh, x)
  out = nserve.load(str(tmp_path / "e"), fresh)(x)
  tol = 0.02 * float(jnp.max(jnp.abs(qat)))
  assert float(jnp.max(jnp.abs(out - qat))) <= tol



def test_residual_activation_quantizers_are_served(tmp_path):
  """The NNX ResNet-8 at ``w4a4_fl8_static_r8``: its `QuantAct`s' scales
  are stored as linen's are, and the served model equals its
  integer-execution twin bit for bit; a model without them refuses the
  checkpoint."""
  from aqt_ext import models  # pylint: disable=g-import-not-at-top

  def build(spec):
    return models.create_model(
        "cifar_resnet8", framework="nnx", rngs=nnx.Rngs(0), in_features=1,
        num_classes=10, width=0.25, quant=models.quant_spec(spec))

  x = _x(8)
  model = build("w4a4_fl8_static_r8")
  qnnx.init(model, x)
  model.train()
  for i in range(2):
    model(_x(8, seed=i + 1))
  nserve.export(model, x, str(tmp_path / "e"))
  meta = json.loads((tmp_path / "e" / serve.METADATA_FILE).read_text())
  assert sorted(meta["activations"]) == [
      "stage0_block0/branch_quant", "stage1_block0/branch_quant",
      "stage1_block0/shortcut_quant", "stage2_block0/branch_quant",
      "stage2_block0/shortcut_quant", "stem_quant"]
  fresh = build("w4a4_fl8_static_r8")
  qnnx.init(fresh, _x(8, seed=9))
  out = nserve.load(str(tmp_path / "e"), fresh)(x)
  np.testing.assert_array_equal(out, _twin_output(model, x))
  plain = build("w4a4_fl8_static")
  qnnx.init(plain, x)
  with pytest.raises(ValueError, match="quantized activations"):
    nserve.load(str(tmp_path / "e"), plain)
