"""Serving export: packing, integer-only inference, checks on load."""

import functools
import json
import os
import shutil
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import aqt_ext
from aqt_ext import models, serve
from aqt_ext.config import LayerQuant, TensorQuant, parse_spec
from aqt_ext.linen.rules import quantize_model

EVAL = {"train": False}
RESNET_QUANT = parse_spec("w4a4_fl8", first=models.FIRST_LAYER,
                          last=models.LAST_LAYER)
# Served outputs vs the QAT model run with integer execution: each integer
# layer computes the same integers (int32 sums are exact) and the same
# elementwise float scaling from the same input, so a model whose float code
# between those layers is correctly rounded elementwise arithmetic (additions,
# multiplications, ReLU: the MLP, ConvNet, two-tower and scanned-stack models)
# gives equal outputs, bit for bit. Float reductions and matmuls (norms,
# softmax, pooling, float layers) can be compiled with another summation order
# in the two programs, and transcendentals (exp, tanh, sigmoid) are
# approximations whose rounding can depend on vectorisation; such models agree
# to float rounding, amplified at dynamic rounding edges as below, and are
# compared with TOL.
# Served outputs vs the QAT model's fake-quant eval: |diff| <= TOL * max|ref|.
# The fake path sums dequantized products in float32 (relative error about
# n * 2^-24 of the summed magnitudes), the integer path sums exactly and
# scales once. Alone that moves outputs by ~1e-5 of their magnitude; where a
# later layer quantizes its input dynamically, an element within that error of
# a rounding edge lands one grid step apart (1/15 of the range at 4 bits, on
# that one element). TOL = 2% of the largest output admits a few such steps,
# while a wrong kernel, scale, zero point or layout moves outputs by a large
# fraction of it.
TOL = 0.02


def assert_close_to_qat(out, ref, tol=TOL):
  """|out - ref| <= tol * max|ref|; predictions (argmax of the last axis)
  agree wherever ref's top-2 margin exceeds 2 * tol * max|ref|.

  The second follows from the first (a flip needs two logits to move by the
  margin together); it is asserted so that a failure names the examples.
  """
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  bound = tol * np.max(np.abs(ref))
  assert np.max(np.abs(out - ref)) <= bound, (np.max(np.abs(out - ref)),
                                              bound)
  top2 = np.sort(ref, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 2 * bound
  flips = np.argwhere(clear & (out.argmax(-1) != ref.argmax(-1)))
  assert not flips.size, f"predictions differ at {flips.tolist()}"


def resnet(width=0.25, quant=RESNET_QUANT):
  return models.create_model("cifar_resnet8", num_classes=10, width=width,
                             quant=quant)


def random_variables(model, x, seed=0, rngs_names=(), **kwargs):
  """Variables filled from numpy (no PRNG compile); BN statistics random.

  `x`: the input, or a tuple of the positional arguments; `rngs_names`: the
  ``make_rng`` streams the model draws from.
  """
  args = x if isinstance(x, tuple) else (x,)
  rngs = {n: jax.random.PRNGKey(0) for n in ("params",) + tuple(rngs_names)}
  shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, **kwargs),
                                   rngs, *args))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1] in ("scale", "var"):
      return (0.5 + rng.random(s.shape)).astype(np.float32)
    if path[-1] == "kernel":
      std = np.sqrt(2 / np.prod(s.shape[:-1]))
      return (std * rng.normal(size=s.shape)).astype(np.float32)
    return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

  return unflatten_dict({k: jnp.asarray(fill(k, s))
                         for k, s in flatten_dict(shapes).items()})


def qat_logits(model, variables, x, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def int_twin(model):
  """The same model with integer execution (QuantDense / QuantConv)."""
  return model.clone(quant=serve.int_execution(model.quant))


# ---------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(7,), (3, 3, 5, 4), (1,)])
def test_pack_unpack_round_trip(bits, shape):
  rng = np.random.default_rng(bits)
  q = rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), size=shape)
  q.flat[0], q.flat[-1] = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  packed = serve.pack_ints(q, bits)
  per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
  assert packed.dtype == (np.uint8 if per_byte > 1 else np.int8)
  assert packed.size == -(-q.size // per_byte) == serve.packed_size(bits,
                                                                    shape)
  out = jax.jit(serve.unpack_ints, static_argnums=(1, 2))(packed, bits, shape)
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(out, q)


def test_pack_layout_and_range():
  # Two's complement nibbles, first value in the low bits.
  np.testing.assert_array_equal(serve.pack_ints([-1, 2, 7], 4), [0x2F, 0x07])
  np.testing.assert_array_equal(serve.pack_ints([1, -2, 0, -1], 2), [0xC9])
  with pytest.raises(ValueError,
                     match=r"do not fit 3 bits; allowed: \[-4, 3\]"):
    serve.pack_ints([4], 3)
  with pytest.raises(ValueError, match="bits=9"):
    serve.storage_bits(9)
  with pytest.raises(ValueError, match="do not hold"):
    serve.unpack_ints(np.zeros(3, np.uint8), 4, (7,))


# ---------------------------------------------------------------------------
# A w4a4 (first and last layer 8-bit) ResNet-8.
# ---------------------------------------------------------------------------

# Batch 500, as the Fashion-MNIST test evaluates: compiled code is shared.
X = np.random.default_rng(1).normal(size=(500, 28, 28, 1)).astype(np.float32)
QAT_EVAL = jax.jit(functools.partial(resnet().apply, **EVAL))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model = resnet()
  variables = random_variables(model, X, **EVAL)
  directory = str(tmp_path_factory.mktemp("serve") / "resnet8")
  result = serve.export(model, variables, X, directory, call_kwargs=EVAL)
  return model, variables, directory, result


def test_served_logits_match_qat_eval(exported):
  model, variables, directory, _ = exported
  served = serve.load(directory, model, X, call_kwargs=EVAL)(X)
  assert_close_to_qat(served, QAT_EVAL(variables, X))
  # Global average pooling is a float reduction (see TOL).
  assert_close_to_qat(served, qat_logits(int_twin(model), variables, X,
                                         **EVAL))


def test_serving_tree_holds_integer_kernels_only(exported):
  model, variables, directory, result = exported
  served = serve.load(directory, model, X, call_kwargs=EVAL)
  params = flatten_dict(served.variables["params"])
  assert not any(k[-1] == "kernel" for k in params)
  assert set(served.variables) == {"params", "batch_stats", serve.SERVE}
  layers = served.metadata["layers"]
  assert len(layers) == result.layers == 10  # 7 convs, 2 projections, head
  kernels = flatten_dict(served.variables[serve.SERVE])
  for path, meta in layers.items():
    k = kernels[tuple(path.split("/")) + ("kernel",)]
    bits = 8 if path in ("conv_init", "head") else 4
    assert meta["bits"] == bits
    assert k.dtype == (np.int8 if bits == 8 else np.uint8)
  # BatchNorm parameters and statistics are kept as they are.
  np.testing.assert_array_equal(served.variables["params"]["bn_init"]["scale"],
                                variables["params"]["bn_init"]["scale"])
  jax.tree.map(np.testing.assert_array_equal,
               served.variables["batch_stats"], variables["batch_stats"])
  assert json.load(open(os.path.join(directory, "serving.json")))[
      "layout_version"] == serve.LAYOUT_VERSION


def test_sizes(exported):
  _, variables, directory, result = exported
  kernels = flatten_dict(variables["params"])
  packed = flatten_dict(serve.load(directory, resnet(), X,
                                   call_kwargs=EVAL).variables[serve.SERVE])
  for path, k in kernels.items():
    if path[-1] == "kernel" and path[0] not in ("conv_init", "head"):
      assert packed[path].nbytes * 8 == k.nbytes  # int4: 1/8 of float32
  assert result.served_kernel_bytes < result.float_kernel_bytes / 5
  assert result.served_bytes < result.float_params_bytes / 4
  assert result.kernel_ratio == (result.served_kernel_bytes
                                 / result.float_kernel_bytes)


def test_layout_version_is_checked(exported, tmp_path):
  _, _, directory, _ = exported
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  meta = json.loads((copy / "serving.json").read_text())
  meta["layout_version"] = 4
  (copy / "serving.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"layout_version=4; this code reads "
                     r"layout_version in \(1, 2, 3\)"):
    serve.load(str(copy), resnet(), X, call_kwargs=EVAL)
  # Versions 1 (no lookup-table layers) and 2 (no float layers) still load.
  ref = serve.load(directory, resnet(), X[:8], call_kwargs=EVAL)(X[:8])
  del meta["float_layers"]
  for version in (1, 2):
    meta["layout_version"] = version
    (copy / "serving.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(
        serve.load(str(copy), resnet(), X[:8], call_kwargs=EVAL)(X[:8]), ref)


class SmallCNN(nn.Module):
  """conv_init -> conv (BatchNorm, stride 2) -> head: the zoo's first and
  last layer names around one middle layer (DQ compiles per layer, and one
  middle layer shows what every middle layer does)."""

  quant: Any = None

  @nn.compact
  def __call__(self, x, train=False):
    q = dict(quant=self.quant)
    x = nn.relu(aqt_ext.QuantConv(8, (3, 3), name="conv_init", **q)(x))
    x = aqt_ext.QuantConv(16, (3, 3), strides=(2, 2), name="conv", **q)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    return aqt_ext.QuantDense(10, name="head", **q)(x.mean(axis=(1, 2)))


def dq_model(spec):
  return SmallCNN(quant=parse_spec(spec, first=models.FIRST_LAYER,
                                   last=models.LAST_LAYER))


def served_vs_qat(model, variables, directory):
  """(serving metadata, served logits, QAT eval logits) on X[:100]."""
  serve.export(model, variables, X[:100], directory, call_kwargs=EVAL)
  served = serve.load(directory, model, X[:100], call_kwargs=EVAL)
  return (served.metadata, served(X[:100]),
          qat_logits(model, variables, X[:100], **EVAL), served)


@pytest.mark.parametrize("spec,bits", [("dq:w4a4_fl8", 4),
                                       ("dqw:w3a8_fl8", 3)])
def test_dq_levels_serve_as_lookup_tables(spec, bits, tmp_path):
  model = dq_model(spec)
  variables = jax.jit(functools.partial(model.init, **EVAL))(
      jax.random.PRNGKey(0), X[:100])  # k-means levels, fitted DQ clips
  meta, out, ref, served = served_vs_qat(model, variables,
                                         str(tmp_path / "s"))
  layers = meta["layers"]
  lut = sorted(p for p, m in layers.items() if m["weight"] == "lut")
  assert lut == sorted(p for p in layers if p not in ("conv_init", "head"))
  stored = flatten_dict(served.variables[serve.SERVE])
  for path in lut:
    shape = layers[path]["kernel_shape"]
    assert stored[(*path.split("/"), "kernel_levels")].shape == (
        shape[-1], 2 ** bits)
    assert stored[(*path.split("/"), "kernel")].size == serve.packed_size(
        bits, shape)  # b-bit indices
    assert (*path.split("/"), "kernel_scale") not in stored
  # Table kernels run the same float op on the same operand values as the
  # fake path (the integer input is exact in float), so only summation order
  # differs: 1e-4 of the largest logit, far above float32 rounding.
  assert_close_to_qat(out, ref, tol=1e-4)


def test_uniform_dq_levels_serve_as_integers(tmp_path):
  model = dq_model("dqw:w4a8_fl8")
  variables = jax.jit(functools.partial(model.init, **EVAL))(
      jax.random.PRNGKey(0), X[:100])
  flat = flatten_dict(variables["params"])
  rng = np.random.default_rng(3)
  for key, levels in flat.items():  # per channel: d (k - 8), d > 0
    if key[-1] == "kernel_dq_levels":
      d = rng.uniform(0.01, 0.05, (levels.shape[0], 1))
      flat[key] = jnp.asarray(d * (np.arange(16) - 8), jnp.float32)
  variables = {**variables, "params": unflatten_dict(flat)}
  meta, out, ref, served = served_vs_qat(model, variables,
                                         str(tmp_path / "s"))
  assert {m["weight"] for m in meta["layers"].values()} == {"int"}
  stored = flatten_dict(served.variables[serve.SERVE])
  assert not [k for k in stored if k[-1] == "kernel_levels"]
  assert_close_to_qat(out, ref)


def test_shapes_are_checked_against_the_model(exported):
  _, _, directory, _ = exported
  with pytest.raises(ValueError, match=r"'params/conv_init/kernel': the "
                     r"serving checkpoint has shape \(3, 3, 1, 4\), the model "
                     r"expects \(3, 3, 1, 8\)"):
    serve.load(directory, resnet(width=0.5), X, call_kwargs=EVAL)


def test_export_refuses_existing_checkpoint_and_non_integer_layers(
    exported, tmp_path):
  model, variables, directory, _ = exported
  with pytest.raises(FileExistsError):
    serve.export(model, variables, X, directory, call_kwargs=EVAL)
  # Weight-only quantization (float input) has no integer execution.
  weight_only = LayerQuant(weight=TensorQuant("uniform", 4))
  with pytest.raises(ValueError, match="'conv_init' cannot be served with "
                     "integer execution: .*input.method='float'.*; or give "
                     "the layer an entirely float LayerQuant"):
    serve.export(model.clone(quant=model.quant.replace(
        rules=((models.FIRST_LAYER, weight_only),))), variables, X[:8],
                 str(tmp_path / "x"), call_kwargs=EVAL)
  assert not os.path.exists(tmp_path / "x")


def test_float_first_layer_is_served_float(exported, tmp_path):
  _, variables, all_int, _ = exported
  model = resnet(quant=RESNET_QUANT.replace(
      rules=((models.FIRST_LAYER, LayerQuant()),) + RESNET_QUANT.rules))
  x = X[:50]
  result = serve.export(model, variables, x, str(tmp_path), call_kwargs=EVAL)
  served = serve.load(str(tmp_path), model, x, call_kwargs=EVAL)
  meta = served.metadata
  assert "conv_init" not in meta["layers"] and result.layers == 9
  assert meta["float_layers"]["conv_init"] == {"module": "QuantConv",
                                               "params": ["kernel"]}
  assert meta["float_layers"]["bn_init"]["params"] == ["bias", "scale"]
  assert result.float_layers == len(meta["float_layers"])
  np.testing.assert_array_equal(
      served.variables["params"]["conv_init"]["kernel"],
      variables["params"]["conv_init"]["kernel"])
  out = served(x)
  assert_close_to_qat(out, qat_logits(int_twin(model), variables, x, **EVAL))
  assert_close_to_qat(out, qat_logits(model, variables, x, **EVAL))
  # The checkpoint's integer layers must be the model's integer layers.
  with pytest.raises(ValueError, match="'conv_init' is quantized in the "
                     "model but the serving checkpoint holds no integer "
                     "kernel"):
    serve.load(str(tmp_path), resnet(), x, call_kwargs=EVAL)
  with pytest.raises(ValueError, match="'conv_init' is float in the model "
                     "but the serving checkpoint holds it as an integer "
                     "layer"):
    serve.load(all_int, model, x, call_kwargs=EVAL)


# ---------------------------------------------------------------------------
# quantize_model-wrapped models: Dense (static, LSQ, PACT, groups),
# DenseGeneral (attention), Conv (padding, dilation, strides, groups).
# ---------------------------------------------------------------------------

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (32, 32):
      x = nn.relu(nn.Dense(features)(x))
    return nn.Dense(4)(x)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2)(x)


class ConvNet(nn.Module):
  """Convs with explicit padding, dilation, strides, feature groups."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding=((1, 2), (0, 1)),
                        kernel_dilation=2)(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 1), feature_group_count=2,
                        use_bias=False)(x))
    return nn.Conv(3, 1, padding="VALID")(x)


def _tq(method, bits, **kw):
  return TensorQuant(method, bits, **kw)


MLP_RULES = [
    ("Dense_0", LayerQuant(_tq("uniform", 8, granularity="per_channel"),
                           _tq("uniform", 8, grid="full",
                               calibration="static"))),
    ("Dense_1", LayerQuant(_tq("lsq", 3, granularity="per_channel"),
                           _tq("pact", 4, grid="unsigned"))),
    ("Dense_2", LayerQuant(_tq("uniform", 2, granularity="per_group",
                               group_size=8),
                           _tq("lsq", 4, grid="unsigned"))),
]
W4A8_RULES = [(".*", LayerQuant(
    _tq("uniform", 4, granularity="per_channel"),
    _tq("uniform", 8, grid="full")))]


@pytest.mark.parametrize("cls,rules,shape,exact", [
    (MLP, MLP_RULES, (16, 12), True),
    (Attention, W4A8_RULES, (2, 5, 8), False),  # float softmax, products
    (ConvNet, W4A8_RULES, (2, 9, 9, 2), True)])
def test_wrapped_model_serves_like_its_integer_execution(cls, rules, shape,
                                                         exact, tmp_path):
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  model = quantize_model(cls(), rules)
  # Float checkpoint -> quantizer state from the data (LSQ steps, static
  # ranges calibrated on one batch).
  _, variables = jax.jit(functools.partial(model.apply, mutable=True))(
      random_variables(cls(), x), x, rngs={"params": jax.random.PRNGKey(0)})
  serve.export(model, variables, x, str(tmp_path))
  served = serve.load(str(tmp_path), model, x)
  twin = quantize_model(cls(), serve.int_execution(model.quant))
  (np.testing.assert_array_equal if exact else assert_close_to_qat)(
      served(x), qat_logits(twin, variables, x))
  assert_close_to_qat(served(x), qat_logits(model, variables, x))
  assert not any(k[-1] == "kernel" for k in flatten_dict(
      served.variables["params"]))


def test_float_layers_of_a_wrapped_model_are_served_float(tmp_path):
  x = np.random.default_rng(2).normal(size=(16, 12)).astype(np.float32)
  model = quantize_model(MLP(), [("Dense_0", W4A8_RULES[0][1])])
  variables = random_variables(MLP(), x)
  serve.export(model, variables, x, str(tmp_path))
  served = serve.load(str(tmp_path), model, x)
  assert list(served.metadata["layers"]) == ["Dense_0"]
  assert served.metadata["float_layers"] == {
      p: {"module": "Dense", "params": ["bias", "kernel"]}
      for p in ("Dense_1", "Dense_2")}
  twin = quantize_model(MLP(), serve.int_execution(model.quant))
  np.testing.assert_array_equal(served(x), qat_logits(twin, variables, x))
  assert_close_to_qat(served(x), qat_logits(model, variables, x))


def test_uncalibrated_static_range_is_refused(tmp_path):
  x = np.ones((2, 12), np.float32)
  model = quantize_model(MLP(), [(".*", MLP_RULES[0][1])])
  stats = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["quant_stats"]
  variables = dict(random_variables(MLP(), x), quant_stats=jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), stats))  # as init leaves them
  with pytest.raises(ValueError, match="'Dense_0': the static input range "
                     "was never calibrated"):
    serve.export(model, variables, x, str(tmp_path))


# ---------------------------------------------------------------------------
# Real data: a ResNet-8 trained 50 steps on Fashion-MNIST.
# ---------------------------------------------------------------------------

def _train(model, variables, stream, steps):
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, stats, opt, batch):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats},
                                batch["image"], train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]).mean(), new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  for i in range(steps):
    params, stats, opt = step(params, stats, opt, stream.batch(i))
  return {"params": params, "batch_stats": stats}


def test_fashion_mnist_served_logits_match_qat_eval(fashion_mnist_dir,
                                                    tmp_path):
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  model = resnet()
  stream = data.make_train_stream("fashion_mnist", 32, 0, fashion_mnist_dir,
                                  augment=False, num_examples=1600)
  variables = _train(model, random_variables(model, X, **EVAL), stream, 50)
  serve.export(model, variables, X, str(tmp_path), call_kwargs=EVAL)
  served = serve.load(str(tmp_path), model, X, call_kwargs=EVAL)
  n = 0
  for batch in data.eval_batches("fashion_mnist", 500, fashion_mnist_dir,
                                 num_examples=1000):
    assert_close_to_qat(served(batch["image"]),
                        QAT_EVAL(variables, batch["image"]))
    n += int(batch["mask"].sum())
  assert n == 1000


# ---------------------------------------------------------------------------
# Flax model shapes from flax's own examples: an LSTM (nn.RNN, nn.scan), a
# stack of scanned blocks, an lm1b-style decoder with logically partitioned
# params, an imagenet-style ResNet (a list field, `train` argument), a
# vae-style model (an array keyword argument, `make_rng`), a two-input model
# and one with layers the rules leave float. Weights and inputs 4 / 8 bits,
# uniform and dynamic (no quantizer state).
# ---------------------------------------------------------------------------

W4A8 = W4A8_RULES[0][1]


def jitted_apply(model, kwargs):
  """``model.apply`` jitted: (variables, args, array kwargs, rngs) traced,
  the other kwargs of `kwargs` static."""
  static = {k: v for k, v in kwargs.items()
            if not isinstance(v, (jax.Array, np.ndarray))}
  return jax.jit(lambda v, args, kw, rngs: model.apply(
      v, *args, rngs=rngs, **kw, **static))


def serve_and_compare(model, variables, args, directory, kwargs=None,
                      rngs=None, exact=True):
  """Exports `model`, loads it, serves `args`, checks its outputs equal the
  integer-execution twin's (`exact`; within TOL where the model has float
  reductions, matmuls or transcendentals) and are within TOL of the QAT
  (fake-quant) eval. Returns the served model and the twin's jitted apply
  (`jitted_apply`)."""
  kwargs = dict(kwargs or {})
  arrays = {k: v for k, v in kwargs.items()
            if isinstance(v, (jax.Array, np.ndarray))}
  serve.export(model, variables, args, directory, call_kwargs=kwargs,
               rngs=rngs)
  served = serve.load(directory, model, args, call_kwargs=kwargs, rngs=rngs)
  out = served(*args, rngs=rngs, **kwargs)
  twin = jitted_apply(model.clone(quant=serve.int_execution(model.quant)),
                      kwargs)
  jax.tree.map(np.testing.assert_array_equal if exact else assert_close_to_qat,
               out, twin(variables, args, arrays, rngs))
  jax.tree.map(assert_close_to_qat, out, jitted_apply(model, kwargs)(
      variables, args, arrays, rngs))
  return served, twin


class LSTMClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, time, features)
    y = nn.RNN(nn.LSTMCell(8))(x)
    return nn.Dense(3)(y[:, -1])


class ScannedBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(16)(x))), None


class ScannedStack(nn.Module):
  """Three blocks stacked by nn.scan: params with a leading layer axis."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x, _ = nn.scan(ScannedBlock, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=3)()(x, None)
    return nn.Dense(3)(x)


def bare_rnn():
  """nn.RNN as the wrapped model itself (the model quantize_model shares its
  scope with is the lifted transform)."""
  return nn.RNN(nn.LSTMCell(8))


@pytest.mark.parametrize("cls,shape,exact", [
    (LSTMClassifier, (4, 5, 6), False),  # sigmoid, tanh
    (bare_rnn, (4, 5, 6), False),
    (ScannedStack, (4, 6), True)], ids=["lstm", "bare_rnn", "stacked"])
def test_layers_inside_nn_scan_are_served(cls, shape, exact, tmp_path):
  x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  model = quantize_model(cls(), [(".*", W4A8)])
  variables = random_variables(cls(), x)
  served, _ = serve_and_compare(model, variables, (x,), str(tmp_path),
                                exact=exact)
  layers = served.metadata["layers"]
  kernels = {k[:-1]: v for k, v in flatten_dict(variables["params"]).items()
             if k[-1] == "kernel"}
  assert sorted(layers) == sorted("/".join(k) for k in kernels)
  stored = flatten_dict(served.variables[serve.SERVE])
  for path, kernel in kernels.items():
    per = layers["/".join(path)]["kernel_shape"]
    lead = kernel.shape[:kernel.ndim - len(per)]  # scanned: (3,)
    assert lead == ((3,) if "ScanScannedBlock_0" in path else ())
    assert stored[path + ("kernel",)].shape == lead + (
        serve.packed_size(4, per),)


class RematMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(MLP)()(x)


class VmappedMLP(nn.Module):
  """Two MLPs, one per leading index: params stacked by nn.vmap."""

  @nn.compact
  def __call__(self, x):
    return nn.vmap(MLP, variable_axes={"params": 0},
                   split_rngs={"params": True})()(x)


@pytest.mark.parametrize("cls,shape", [(RematMLP, (8, 12)),
                                       (VmappedMLP, (2, 8, 12))])
def test_layers_inside_remat_and_vmap_are_served(cls, shape, tmp_path):
  x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  model = quantize_model(cls(), W4A8_RULES)
  served, _ = serve_and_compare(model, random_variables(cls(), x), (x,),
                                str(tmp_path))
  assert len(served.metadata["layers"]) == 3


def partitioned(init, *names):
  return nn.with_logical_partitioning(init, names)


class Lm1bMlp(nn.Module):
  """flax examples/lm1b MlpBlock."""

  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform()
    y = nn.Dense(self.mlp_dim, kernel_init=partitioned(init, "embed", "mlp"),
                 bias_init=partitioned(nn.initializers.normal(1e-6),
                                       "mlp"))(x)
    return nn.Dense(x.shape[-1], kernel_init=partitioned(init, "mlp", "embed"),
                    bias_init=partitioned(nn.initializers.normal(1e-6),
                                          "embed"))(nn.relu(y))


class Lm1bDecoder(nn.Module):
  """flax examples/lm1b Decoder, one block: shared embedding (logits by
  ``attend``), causal self-attention, MLP, every param logically
  partitioned."""

  vocab: int = 32
  dim: int = 16

  @nn.compact
  def __call__(self, tokens):
    def norm():
      return nn.LayerNorm(scale_init=partitioned(nn.initializers.ones,
                                                 "embed"),
                          bias_init=partitioned(nn.initializers.zeros,
                                                "embed"))
    embed = nn.Embed(self.vocab, self.dim, embedding_init=partitioned(
        nn.initializers.normal(1.0), "vocab", "embed"))
    x = embed(tokens)
    y = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=self.dim, use_bias=False,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), "embed",
                                "kv"), deterministic=True)(
                                    norm()(x), mask=nn.make_causal_mask(tokens))
    x = x + y
    x = x + Lm1bMlp(32)(norm()(x))
    return embed.attend(norm()(x))


def test_logically_partitioned_params_are_served(tmp_path):
  tokens = np.random.default_rng(5).integers(0, 32, size=(4, 6)).astype(
      np.int32)
  rules = [(r"Dense_\d|query|key|value|out", W4A8)]
  model = quantize_model(Lm1bDecoder(), rules)
  boxed = jax.eval_shape(Lm1bDecoder().init, jax.random.PRNGKey(0), tokens)
  variables = nn.meta.replace_boxed(
      boxed, random_variables(Lm1bDecoder(), tokens))  # boxed, as init gives
  assert any(isinstance(v, nn.LogicallyPartitioned) for v in jax.tree.leaves(
      variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)))
  unboxed = nn.unbox(variables)
  serve.export(model, variables, tokens, str(tmp_path))
  served = serve.load(str(tmp_path), model, tokens)
  out = served(tokens)
  twin = quantize_model(Lm1bDecoder(), serve.int_execution(model.quant))
  assert_close_to_qat(out, qat_logits(twin, unboxed, tokens))  # norms, softmax
  assert_close_to_qat(out, qat_logits(model, unboxed, tokens))
  meta = served.metadata
  assert sorted(meta["layers"]) == sorted(
      [f"Lm1bMlp_0/Dense_{i}" for i in range(2)]
      + [f"MultiHeadDotProductAttention_0/{n}"
         for n in ("query", "key", "value", "out")])
  assert meta["float_layers"]["Embed_0"] == {"module": "Embed",
                                             "params": ["embedding"]}
  # The boxed and the unboxed state export the same checkpoint.
  serve.export(model, unboxed, tokens, str(tmp_path / "unboxed"))
  np.testing.assert_array_equal(
      serve.load(str(tmp_path / "unboxed"), model, tokens)(tokens), out)


class ImagenetBlock(nn.Module):
  """flax examples/imagenet ResNetBlock."""

  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides,
                           name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ImagenetResNet(nn.Module):
  """flax examples/imagenet ResNet: `stage_sizes` is a list (an unhashable
  module)."""

  stage_sizes: Sequence[int]
  num_classes: int
  num_filters: int = 64
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, axis_name="batch")
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
             name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        x = ImagenetBlock(self.num_filters * 2 ** i,
                          strides=(2, 2) if i > 0 and j == 0 else (1, 1),
                          conv=conv, norm=norm, act=self.act)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def test_module_with_a_list_field_is_served(tmp_path):
  x = np.random.default_rng(6).normal(size=(4, 16, 16, 3)).astype(np.float32)
  resnet18_like = ImagenetResNet(stage_sizes=[1, 1], num_classes=5,
                                 num_filters=4)
  with pytest.raises(TypeError):
    hash(resnet18_like)
  model = quantize_model(resnet18_like, [("(?i)conv|dense", W4A8)])
  variables = random_variables(resnet18_like, x, train=False)
  served, _ = serve_and_compare(model, variables, (x,), str(tmp_path), EVAL,
                                exact=False)  # average pooling
  assert len(served.metadata["layers"]) == 7  # 6 convs, the head
  # `train` passed positionally is static, as a keyword.
  positional = serve.load(str(tmp_path), model, (x, False))
  np.testing.assert_array_equal(positional(x, False), served(x))


def reparameterize(rng, mean, logvar):
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, logvar.shape)


class VaeEncoder(nn.Module):
  latents: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return (nn.Dense(self.latents, name="fc2_mean")(x),
            nn.Dense(self.latents, name="fc2_logvar")(x))


class VaeDecoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    z = z + 0.1 * jax.random.normal(self.make_rng("noise"), z.shape)
    return nn.Dense(12, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(z)))


class Vae(nn.Module):
  """flax examples/vae VAE (`z_rng` an array argument), its decoder drawing
  from the ``noise`` stream."""

  latents: int = 4

  def setup(self):
    self.encoder = VaeEncoder(self.latents)
    self.decoder = VaeDecoder()

  def __call__(self, x, z_rng):
    mean, logvar = self.encoder(x)
    return self.decoder(reparameterize(z_rng, mean, logvar)), mean, logvar


def test_array_keyword_arguments_and_rngs_are_served(tmp_path):
  x = np.random.default_rng(7).normal(size=(8, 12)).astype(np.float32)
  key, noise = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  model = quantize_model(Vae(), [(".*", W4A8)])
  variables = random_variables(Vae(), x, z_rng=key, rngs_names=("noise",))
  served, twin = serve_and_compare(model, variables, (x,), str(tmp_path),
                                   {"z_rng": key}, rngs={"noise": noise},
                                   exact=False)  # exp, normal samples
  assert len(served.metadata["layers"]) == 5
  # Keys are traced, not baked in: other keys, other samples, as in QAT.
  other, rngs = {"z_rng": jax.random.PRNGKey(3)}, {
      "noise": jax.random.PRNGKey(4)}
  out = served(x, rngs=rngs, **other)
  jax.tree.map(assert_close_to_qat, out, twin(variables, (x,), other, rngs))
  assert not np.allclose(out[0], served(x)[0])
  with pytest.raises(TypeError, match=r"neither an array nor hashable"):
    served(x, z_rng={1, 2})


class TwoTower(nn.Module):
  @nn.compact
  def __call__(self, a, b):
    a = nn.relu(nn.Dense(8, name="a_proj")(a))
    b = nn.relu(nn.Dense(8, name="b_proj")(b))
    return nn.Dense(4)(a * b)


def test_two_input_model_is_served(tmp_path):
  rng = np.random.default_rng(8)
  a = rng.normal(size=(8, 6)).astype(np.float32)
  b = rng.normal(size=(8, 10)).astype(np.float32)
  model = quantize_model(TwoTower(), [(".*", W4A8)])
  variables = random_variables(TwoTower(), (a, b))
  served, _ = serve_and_compare(model, variables, (a, b), str(tmp_path))
  assert sorted(served.metadata["layers"]) == ["Dense_0", "a_proj", "b_proj"]


class MixedFloat(nn.Module):
  """Conv, Einsum and Dense (quantized) around ConvTranspose and ConvLocal,
  which `quantize_model` leaves float."""

  @nn.compact
  def __call__(self, x):  # (batch, 6, 6, 2)
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.ConvLocal(3, (3, 3), strides=(2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Einsum((x.shape[-1], 6), "bi,io->bo")(x))
    return nn.Dense(3)(x)


def test_layers_left_float_are_served_float(tmp_path):
  x = np.random.default_rng(9).normal(size=(4, 6, 6, 2)).astype(np.float32)
  model = quantize_model(MixedFloat(), [(".*", W4A8)])
  variables = random_variables(MixedFloat(), x)
  with pytest.warns(UserWarning, match="cannot be quantized"):
    served, _ = serve_and_compare(model, variables, (x,), str(tmp_path),
                                  exact=False)  # float convs
  meta = served.metadata
  assert sorted(meta["layers"]) == ["Conv_0", "Dense_0", "Einsum_0"]
  assert meta["layers"]["Einsum_0"]["module"] == "QuantEinsum"
  assert meta["float_layers"] == {
      "ConvLocal_0": {"module": "ConvLocal", "params": ["bias", "kernel"]},
      "ConvTranspose_0": {"module": "ConvTranspose",
                          "params": ["bias", "kernel"]}}
  params = served.variables["params"]
  for name in meta["float_layers"]:  # stored as trained
    jax.tree.map(np.testing.assert_array_equal, params[name],
                 variables["params"][name])
  for name in meta["layers"]:  # integer kernel, float bias
    assert set(params[name]) == {"bias"}


# ---------------------------------------------------------------------------
# Damaged checkpoints.
# ---------------------------------------------------------------------------

def test_truncated_files_name_the_file(exported, tmp_path):
  _, _, directory, _ = exported
  meta_copy, arrays_copy = tmp_path / "meta", tmp_path / "arrays"
  shutil.copytree(directory, meta_copy)
  text = (meta_copy / "serving.json").read_text()
  (meta_copy / "serving.json").write_text(text[:len(text) // 2])
  with pytest.raises(serve.ServingFormatError,
                     match=r"serving\.json is not valid JSON .* damaged or "
                     "truncated; export the model again") as e:
    serve.load(str(meta_copy), resnet(), X, call_kwargs=EVAL)
  assert str(meta_copy) in str(e.value)
  assert isinstance(e.value, ValueError)

  shutil.copytree(directory, arrays_copy)
  data = [p for p in (arrays_copy / "arrays").rglob("*")
          if p.is_file() and p.parent.name == "d"]
  assert data  # the OCDBT data files
  for p in data:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)
  with pytest.raises(serve.ServingFormatError,
                     match=r"the serving arrays cannot be read .*; the export "
                     "is damaged or incomplete; export the model again") as e:
    serve.load(str(arrays_copy), resnet(), X, call_kwargs=EVAL)
  assert str(arrays_copy / "arrays") in str(e.value)


class EinsumModel(nn.Module):
  """Einsums (one with a batch letter) between ReLUs: served exactly."""

  @nn.compact
  def __call__(self, x):  # (batch, 3, 4)
    x = nn.relu(nn.Einsum((3, 4, 5), "bhi,hio->bho")(x))
    x = nn.relu(nn.Einsum((5, 6), "bhi,io->bho")(x))
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_einsum_layers_are_served_from_integers(tmp_path):
  x = np.random.default_rng(11).normal(size=(4, 3, 4)).astype(np.float32)
  model = quantize_model(EinsumModel(), [(".*", W4A8)])
  variables = random_variables(EinsumModel(), x)
  served, _ = serve_and_compare(model, variables, (x,), str(tmp_path))
  meta = served.metadata["layers"]
  assert sorted(meta) == ["Dense_0", "Einsum_0", "Einsum_1"]
  assert meta["Einsum_0"]["kernel_shape"] == [3, 4, 5]
  assert set(served.variables["params"]["Einsum_0"]) == {"bias"}


def test_residual_activation_quantizers_are_served(tmp_path):
  """``_r8`` (the activations meeting the residual adds quantized by their
  `QuantAct`): each one's trained scale is stored, listed under
  ``activations``, and the served logits equal the integer-execution twin's
  bit for bit; a model without them refuses the checkpoint, and an
  uncalibrated one is refused at export."""
  quant = models.quant_spec("w4a4_fl8_static_r8")
  model = resnet(quant=quant)
  x = X[:32]
  v = random_variables(model, x, train=False)
  _, upd = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats", "quant_stats"]))(v, x)
  variables = {**v, **upd}
  served, _ = serve_and_compare(model, variables, (x,), str(tmp_path / "s"),
                                EVAL)
  acts = served.metadata["activations"]
  assert sorted(acts) == sorted(
      ["stem_quant", "stage0_block0/branch_quant",
       "stage1_block0/branch_quant", "stage1_block0/shortcut_quant",
       "stage2_block0/branch_quant", "stage2_block0/shortcut_quant"])
  assert all(m["input"] == "stored" for m in acts.values())
  stored = flatten_dict(served.variables[serve.SERVE])
  assert ("stage1_block0", "shortcut_quant", "input_scale") in stored
  plain = resnet(quant=models.quant_spec("w4a4_fl8_static"))
  with pytest.raises(ValueError, match="'stem_quant' is float in the model"):
    serve.load(str(tmp_path / "s"), plain, x, call_kwargs=EVAL)
  with pytest.raises(ValueError, match="'stem_quant' is quantized in the "
                     "model but the serving checkpoint holds no scale"):
    serve.export(plain, {k: c for k, c in variables.items()},
                 x, str(tmp_path / "p"), call_kwargs=EVAL)
    serve.load(str(tmp_path / "p"), model, x, call_kwargs=EVAL)
  raw = {**variables, "quant_stats": jax.tree.map(jnp.zeros_like,
                                                  variables["quant_stats"])}
  with pytest.raises(ValueError, match="never calibrated"):
    serve.export(model, raw, x, str(tmp_path / "u"), call_kwargs=EVAL)
