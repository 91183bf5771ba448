"""ONNX export (`aqt_ext.export.onnx`): the graph computes what the served
integer model computes, ONNX Runtime fuses its quantized ops into integer
kernels, and on real images (scikit-learn's digits) its predictions are
QAT eval's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from aqt_ext import LayerQuant, TensorQuant, models, parse_spec, serve  # noqa: E402
from aqt_ext.export import onnx as ox  # noqa: E402
from aqt_ext.linen import quantize_model  # noqa: E402

EVAL = {"train": False}


class CNN(nn.Module):
  """The shape of flax's (linen) mnist CNN, with a BatchNorm and max pool."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.Conv(32, (3, 3), strides=(2, 2), padding=((1, 0), (0, 1)))(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (1, 1), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def cnn_quant(spec: str = "w4a4_fl8_static"):
  return parse_spec(spec, first=r"Conv_0$", last=r"Dense_1$")


def unoptimized(proto):
  """A session running the graph as written (no ORT graph rewrites, so no
  fusion and no bias quantization): the translation's own numerics."""
  opts = ort.SessionOptions()
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  return ort.InferenceSession(proto.SerializeToString(), opts,
                              providers=["CPUExecutionProvider"])


def calibrated(model, x, seed=0):
  """Random variables with BatchNorm statistics and static input ranges
  from one train-mode pass on `x`."""
  v = jax.jit(functools.partial(model.init, **EVAL))(
      jax.random.PRNGKey(seed), x)
  _, upd = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats", "quant_stats"]))(v, x)
  return {**v, **upd}


def int_logits(model, v, x):
  twin = model.clone(quant=serve.int_execution(model.quant))
  return np.asarray(twin.apply(v, x, **EVAL))


def test_graph_computes_the_served_integer_model():
  """Layouts (NHWC -> NCHW), BatchNorm folded into the weight scales,
  strides / explicit and SAME padding, avg and max pooling, flatten, the
  4-bit clip on uint8 and the 8-bit signed first layer: the graph as
  written equals the XLA integer execution to float rounding, at another
  batch size than it was traced with."""
  x = np.random.default_rng(0).normal(size=(8, 12, 12, 1)).astype(np.float32)
  model = quantize_model(CNN(), cnn_quant())
  v = calibrated(model, x)
  proto = ox.to_onnx(model, v, x, call_kwargs=EVAL, requantize=False)
  sess = unoptimized(proto)
  (y,) = sess.run(None, {ox.INPUT: x})
  want = int_logits(model, v, x)
  np.testing.assert_allclose(y, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  # The batch axis is symbolic (static scales: rows are independent).
  np.testing.assert_array_equal(sess.run(None, {ox.INPUT: x[:3]})[0], y[:3])
  # The kernels are the trained integers in int8, each output channel
  # widened by an integer k_c (its scale divided by k_c).
  kernels = {t.name: onnx.numpy_helper.to_array(t)
             for t in proto.graph.initializer if t.name.endswith(".kernel")}
  assert set(kernels) == {"Conv_0.kernel", "Conv_1.kernel", "Dense_0.kernel",
                          "Dense_1.kernel"}
  assert all(k.dtype == np.int8 for k in kernels.values())
  conv1 = kernels["Conv_1.kernel"].reshape(32, -1).astype(np.int64)  # OIHW
  k = np.gcd.reduce(np.abs(conv1), axis=1)
  assert (k >= 15).all() and (np.abs(conv1) // k[:, None]).max() <= 8


def test_dynamic_input_ranges_are_computed_in_the_graph():
  x = np.random.default_rng(1).normal(size=(4, 12, 12, 1)).astype(np.float32)
  model = quantize_model(CNN(), cnn_quant("w4a4_fl8"))  # per-batch ranges
  v = calibrated(model, x)
  proto = ox.to_onnx(model, v, x, call_kwargs=EVAL, requantize=False)
  (y,) = unoptimized(proto).run(None, {ox.INPUT: x})
  want = int_logits(model, v, x)
  np.testing.assert_allclose(y, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  assert any(n.op_type == "ReduceMax" for n in proto.graph.node)


def test_float_model_exports_as_float_graph():
  x = np.random.default_rng(2).normal(size=(2, 12, 12, 1)).astype(np.float32)
  model = CNN()
  v = model.init(jax.random.PRNGKey(0), x)
  proto = ox.to_onnx(model, v, x, call_kwargs=EVAL)
  (y,) = unoptimized(proto).run(None, {ox.INPUT: x})
  np.testing.assert_allclose(y, model.apply(v, x), rtol=1e-4, atol=1e-5)
  assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


@pytest.fixture(scope="module")
def resnet8():
  x = np.random.default_rng(3).normal(size=(16, 28, 28, 1)).astype(np.float32)
  model = models.create_model("cifar_resnet8", num_classes=10, width=0.5,
                              quant=parse_spec("w4a4_fl8_static",
                                               first=models.FIRST_LAYER,
                                               last=models.LAST_LAYER))
  v = calibrated(model, x)
  return model, v, x, int_logits(model, v, x)


@pytest.mark.parametrize("requantize,fused_convs", [(True, 9), (False, 3)])
def test_resnet_convs_fuse_into_integer_kernels(resnet8, requantize,
                                                fused_convs, tmp_path):
  """The zoo's ResNet-8: with requantization every conv runs as ORT's
  QLinearConv; without it the convs whose QAT output is not quantized next
  (before the residual adds) stay float. The ORT output is checked against
  the integer execution either way."""
  model, v, x, want = resnet8
  proto = ox.to_onnx(model, v, x, call_kwargs=EVAL, requantize=requantize)
  fused = ox.fused_ops(proto, str(tmp_path / "opt.onnx"))
  assert fused.get("QLinearConv", 0) == fused_convs
  assert fused.get("QLinearConv", 0) + fused.get("Conv", 0) + fused.get(
      "FusedConv", 0) == 9
  (y,) = ox.session(proto).run(None, {ox.INPUT: x})
  # The exact graph: float rounding (measured 1.5e-7 of the largest logit).
  # The fast one: its int8 requantization of 6 conv outputs moves logits of
  # this random model by a few percent (measured 6.8 %).
  tol = 0.3 if requantize else 1e-4
  np.testing.assert_allclose(y, want, atol=tol * np.abs(want).max())


def test_unknown_op_is_refused_naming_it_and_the_module():
  class Sorts(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="proj")(x)
      return jnp.sort(x, axis=-1)

  x = np.ones((2, 3), np.float32)
  model = Sorts()
  with pytest.raises(ValueError, match=r"'sort' \(in module 'Sorts'\)"):
    ox.to_onnx(model, model.init(jax.random.PRNGKey(0), x), x)


def test_unsupported_layer_configs_are_refused_before_writing(tmp_path):
  x = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
  grouped = LayerQuant(TensorQuant("uniform", 4, granularity="per_group",
                                   group_size=4),
                       TensorQuant("uniform", 8, grid="full",
                                   calibration="static"))
  model = quantize_model(nn.Dense(4), [(".*", grouped)])
  v = calibrated_dense(model, x)
  with pytest.raises(ValueError, match="per_group weight scales"):
    ox.to_onnx(model, v, x)
  aqt = LayerQuant(TensorQuant("uniform", 8, granularity="per_channel"),
                   TensorQuant("uniform", 8, grid="aqt",
                               granularity="per_channel"))
  model = quantize_model(nn.Dense(4), [(".*", aqt)])
  with pytest.raises(ValueError, match="granularity='per_channel'"):
    ox.to_onnx(model, model.init(jax.random.PRNGKey(0), x), x)
  assert not list(tmp_path.iterdir())


def calibrated_dense(model, x):
  v = model.init(jax.random.PRNGKey(0), x)
  _, upd = model.apply(v, x, mutable=["quant_stats"])
  return {**v, **upd}


def digits():
  """scikit-learn's digits in [-0.5, 0.5]: (train x, y, test x, y), the
  first 1,400 images for training."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = (d.images / 16.0).astype(np.float32)[..., None] - 0.5
  return images[:1400], d.target[:1400], images[1400:], d.target[1400:]


def qat_train(model, xtr, ytr, steps):
  """`model`'s variables after `steps` QAT steps of Adam (batches of 64)."""
  v = jax.jit(functools.partial(model.init, **EVAL))(jax.random.PRNGKey(0),
                                                      xtr[:32])
  params, rest = v["params"], {k: c for k, c in v.items() if k != "params"}
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, rest, opt, x, y):
    def loss(p):
      out, upd = model.apply({"params": p, **rest}, x, train=True,
                             mutable=["batch_stats", "quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), (
          upd)
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), {**rest, **upd}, opt

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(xtr), 64)
    params, rest, opt = step(params, rest, opt, xtr[idx], ytr[idx])
  return {"params": params, **rest}


@pytest.fixture(scope="module")
def digits_model():
  """The CNN at w4a4 (first / last layer 8-bit), static input ranges,
  trained by QAT for 200 Adam steps on scikit-learn's digits (1,400 train
  images); the 397 others are the test images."""
  xtr, ytr, xte, yte = digits()
  model = quantize_model(CNN(), cnn_quant())
  return (model, qat_train(model, xtr, ytr, 200)) + (xtr, xte, yte)


@pytest.mark.parametrize("requantize", [False, True])
def test_ort_predicts_as_qat_eval_on_real_images(digits_model, requantize,
                                                 tmp_path):
  """On ORT with its fused integer kernels (and its int32 biases), the
  exported model predicts as QAT eval on the digits test images."""
  model, v, xtr, xte, yte = digits_model
  qat = np.asarray(model.apply(v, xte, **EVAL))
  acc = np.mean(qat.argmax(-1) == yte)
  assert acc > 0.85  # it learned
  proto = ox.to_onnx(model, v, xte[:64], call_kwargs=EVAL,
                     requantize=requantize, calibration=xtr[:256])
  path = str(tmp_path / "m.onnx")
  ox.save(proto, path)
  (y,) = ox.session(onnx.load(path)).run(None, {ox.INPUT: xte})
  agree = np.mean(y.argmax(-1) == qat.argmax(-1))
  # The exact graph: every image. The fast one requantizes the conv
  # outputs QAT keeps float to int8; at 4 bits a few values then land one
  # level apart (a translation error would disagree on most images).
  assert agree >= (0.97 if requantize else 0.995), agree
  assert abs(np.mean(y.argmax(-1) == yte) - acc) <= 0.02
  fused = ox.fused_ops(proto, str(tmp_path / "opt.onnx"))
  assert fused.get("QLinearConv", 0) == (2 if requantize else 1)
  assert fused.get("QGemm", 0) == 1  # Dense_0: its ReLU output is quantized


def test_command_refuses_bad_flags_before_any_work(tmp_path):
  """`python -m aqt_ext.export`: a bad flag is named with what is allowed,
  and nothing is written."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
  out = tmp_path / "m.onnx"

  def run(*flags):
    return subprocess.run([sys.executable, "-m", "aqt_ext.export", *flags],
                          cwd=root, capture_output=True, text=True)

  r = run(f"--workdir={tmp_path}", "--format=tflite", f"--out={out}")
  assert r.returncode != 0 and "--format='tflite' is not allowed" in r.stderr
  assert "allowed values: onnx" in r.stderr
  r = run(f"--workdir={tmp_path}", f"--out={out}")
  assert r.returncode != 0 and "holds no config.json" in r.stderr
  (tmp_path / "config.json").write_text("{}")
  r = run(f"--workdir={tmp_path}", f"--out={tmp_path / 'm.txt'}")
  assert r.returncode != 0 and "paths ending in .onnx" in r.stderr
  r = run(f"--workdir={tmp_path}", f"--out={out}", "--float_layers=conv(")
  assert r.returncode != 0 and "--float_layers='conv(' is not a valid" in (
      r.stderr)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_asymmetric_input_grid_keeps_its_zero_point():
  """A static asymmetric 4-bit input (zero point > 0 for inputs with
  negative values): the uint8 integers are clipped to the grid [0, 15]
  with the zero point inside, as QAT's quantizer does."""
  x = np.random.default_rng(5).normal(size=(16, 6)).astype(np.float32)
  asym = LayerQuant(TensorQuant("uniform", 4, granularity="per_channel"),
                    TensorQuant("uniform", 4, grid="asymmetric",
                                calibration="static"))
  model = quantize_model(nn.Dense(3), [(".*", asym)])
  v = calibrated_dense(model, x)
  proto = ox.to_onnx(model, v, x)
  zps = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
         if t.name.endswith("input_zero_point")]
  assert len(zps) == 1 and 0 < int(zps[0]) < 15
  (y,) = unoptimized(proto).run(None, {ox.INPUT: x})
  want = np.asarray(model.clone(quant=serve.int_execution(model.quant)).apply(
      v, x))
  np.testing.assert_allclose(y, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope="module")
def digits_resnet():
  """The zoo's ResNet-8 (width 0.5) at ``w4a4_fl8_static_r8``: the
  activations that meet a residual add are quantized in QAT. Trained by QAT
  for 150 Adam steps on scikit-learn's digits (first 1,400 images)."""
  xtr, ytr, xte, yte = digits()
  model = models.create_model("cifar_resnet8", num_classes=10, width=0.5,
                              quant=models.quant_spec("w4a4_fl8_static_r8"))
  return (model, qat_train(model, xtr, ytr, 150)) + (xtr, xte, yte)


def test_residual_quantized_resnet_is_exact_and_fully_fused(digits_resnet,
                                                            tmp_path):
  """With the residual adds' inputs quantized in QAT, every conv's output
  quantization is QAT's own: all 9 convs of the ResNet-8 run as ORT's
  QLinearConv in both graphs, no requantization is calibrated, the graph as
  written computes the integer execution to float rounding, and with ORT's
  fused kernels it predicts as QAT eval on the digits test images."""
  model, v, xtr, xte, yte = digits_resnet
  qat = np.asarray(model.apply(v, xte, **EVAL))
  acc = np.mean(qat.argmax(-1) == yte)
  assert acc > 0.85  # it learned
  want = int_logits(model, v, xte)
  float_layers = r"conv_init$|proj_conv$"
  for requantize, floats in ((True, None), (False, None),
                             (False, float_layers)):
    proto = ox.to_onnx(model, v, xte[:64], call_kwargs=EVAL,
                       requantize=requantize, float_layers=floats)
    nfloat = 3 if floats else 0  # conv_init, stage{1,2}_block0/proj_conv
    scales = {t.name: float(onnx.numpy_helper.to_array(t))
              for t in proto.graph.initializer
              if t.name.endswith((".out_scale", "_quant_scale"))}
    stored = serve.record_export(model, v, xte[:64], call_kwargs=EVAL)[1]
    # The outputs of conv_init (through its ReLU: stem_quant), of the 3
    # blocks' conv2 and of the 2 projections are QAT's activation scales
    # (a float layer's output quantization is its activation's Q/DQ).
    assert len(scales) == 6
    assert sorted(scales.values()) == sorted(
        float(np.reshape(s, ())) for k, s in stored.items()
        if k.endswith("_quant/input_scale"))
    (y,) = unoptimized(proto).run(None, {ox.INPUT: xte})
    np.testing.assert_allclose(y, want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    fused = ox.fused_ops(proto, str(tmp_path / f"opt{requantize}{nfloat}"
                                               ".onnx"))
    assert fused.get("QLinearConv", 0) == 9 - nfloat, fused
    assert fused.get("Conv", 0) + fused.get("FusedConv", 0) == nfloat, fused
    (y,) = ox.session(proto).run(None, {ox.INPUT: xte})
    agree = np.mean(y.argmax(-1) == qat.argmax(-1))
    # Measured 396 of 397 in every graph; ORT's int32 biases may flip a few
    # more on other CPUs' kernels.
    assert agree >= 0.99, (requantize, agree)
