"""Training an NNX model (config.framework='nnx') in the training loop.

The NNX ResNets (`aqt_ext.models.nnx_resnet`) against their linen twins:
same variables (paths, shapes, count), same logits on the same variables,
float and quantized; the same `train_step` from the same variables (uniform,
LSQ, DQ with its auxiliary loss, static ranges) to the last bit; the same
`init_from` semantics; and an NNX run end to end: it learns, checkpoints,
resumes as if uninterrupted, and refuses a resume with the framework changed.
(That the NNX model learns follows from its steps being linen's, bit for
bit, and linen's learning on real data: test_train.py.)
"""

import functools
import json
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aqt_ext.nnx as anx
from aqt_ext import models, train
from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant,
                            layer_preset, parse_spec)

ROOT = pathlib.Path(__file__).resolve().parents[1]
flat = flax.traverse_util.flatten_dict


def tiny_config(data_dir, **kw):
  """A width-0.25 ResNet-8 on 128 Fashion-MNIST images, batch 32: 4 steps
  per epoch."""
  sys.path.insert(0, str(ROOT))
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  o = dict(framework="nnx", dataset="fashion_mnist", data_dir=str(data_dir),
           model="cifar_resnet8", width=0.25, quant="lsq:w4a4_fl8",
           batch_size=32, eval_batch_size=250, num_train_examples=128,
           num_eval_examples=250, num_epochs=1.0, warmup_epochs=0.5,
           learning_rate=0.05, log_every_steps=2, checkpoint_every_steps=2,
           keep_checkpoints=3, seed=3)
  o.update(kw)
  for k, v in o.items():
    c[k] = v
  return c


def spec_quant(spec) -> ModelQuant:
  if isinstance(spec, ModelQuant):
    return spec
  return parse_spec(spec, first=models.FIRST_LAYER, last=models.LAST_LAYER)


def twins(name, spec, width=0.25, num_classes=10):
  """(linen model, `train.NnxModel`) of one architecture and quant."""
  kw = dict(num_classes=num_classes, width=width, quant=spec_quant(spec))
  linen = models.create_model(name, **kw)
  return linen, train.NnxModel(lambda rngs, c: models.create_model(
      name, framework="nnx", rngs=rngs, in_features=c, **kw), linen)


def shapes(tree) -> dict:
  return {k: (tuple(np.shape(v)), jnp.dtype(v.dtype)) for k, v in flat(
      flax.core.unfreeze(tree)).items()}


def assert_trees_equal(a, b):
  """Same structure, every leaf bit for bit (dicts, optax states, ...)."""
  (la, ta), (lb, tb) = (jax.tree_util.tree_flatten_with_path(
      flax.core.unfreeze(t)) for t in (a, b))
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def images(n=8, hw=28, c=1, seed=0):
  return np.random.default_rng(seed).normal(size=(n, hw, hw, c)).astype(
      np.float32)


def random_floats(name, x, width=0.25, seed=1) -> dict:
  """Params and batch_stats of the float model `name`: He-normal
  kernels, random BN scales, biases, means and variances (so every residual
  branch and statistic counts). Drawn with numpy on the abstract init's
  shapes: compiling a jitted init (its threefry) is the slowest part of
  these tests."""
  linen = models.create_model(name, num_classes=10, width=width)
  v = jax.eval_shape(functools.partial(linen.init, train=False),
                     jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    if path[-1] == "kernel":
      fan_in = int(np.prod(a.shape[:-1]))
      return (rng.normal(size=a.shape) * np.sqrt(2 / fan_in)).astype(a.dtype)
    if path[-1] in ("scale", "var"):
      return (1.0 + 0.3 * rng.uniform(size=a.shape)).astype(a.dtype)
    return (0.1 * rng.normal(size=a.shape)).astype(a.dtype)  # bias, mean
  return {c: flax.traverse_util.path_aware_map(
      draw, flax.core.unfreeze(v[c])) for c in ("params", "batch_stats")}


# Every method in one model (fewer, slower compiles than one model each):
# DQ (levels; inputs with the auxiliary loss) by default, a static uniform
# range on the stem, LSQ in stage 0, PACT and a static DQ input in stage 1,
# dynamic uniform in stage 2 and on the head; the activation quantizers
# (`QuantAct`) of the residual adds: the stem's output and stage 2's
# branch and shortcut static, stage 1's branch by LSQ.
MIXED = ModelQuant(
    default=layer_preset("dq", 4, 4),
    rules=(
        (r"stem_quant$|^stage2_.*_quant$", LayerQuant(input=TensorQuant(
            "uniform", 8, grid="full", calibration="static",
            ema_decay=0.5))),
        (r"^stage1_block0/branch_quant$", LayerQuant(input=TensorQuant(
            "lsq", 6, grid="full"))),
        (models.FIRST_LAYER, LayerQuant(
            TensorQuant("uniform", 8, granularity="per_channel"),
            TensorQuant("uniform", 8, calibration="static", ema_decay=0.5))),
        (r"^stage0_.*conv", layer_preset("lsq", 4, 4)),
        (r"^stage1_block0/conv1$", layer_preset("pact", 4, 4)),
        (r"^stage1_block0/proj_conv$", LayerQuant(
            TensorQuant("uniform", 4, granularity="per_channel"),
            TensorQuant("dq", 4, grid="unsigned", calibration="static",
                        ema_decay=0.5))),
        (r"^stage2_.*conv", layer_preset("uniform", 4, 4)),
        (models.LAST_LAYER, layer_preset("uniform", 8, 8))))


# ---------------------------------------------------------------------------
# The NNX ResNets are the linen ones.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,width,hw,c,spec", [
    ("cifar_resnet20", 0.5, 28, 1, "lsq:w4a4_fl8"),
    ("cifar_resnet8", 1.0, 32, 3, "float"),
    ("resnet18", 0.25, 64, 3, "w4a4_fl8"),
    ("resnet50", 0.125, 64, 3, "dq:w4a4_fl8"),
])
def test_nnx_model_has_the_linen_variables(name, width, hw, c, spec):
  """Same paths, shapes and dtypes in every collection (learned quantizer
  parameters and static ranges included), hence the same parameter
  count."""
  linen, nx = twins(name, spec, width)
  x = jax.ShapeDtypeStruct((2, hw, hw, c), jnp.float32)
  want = jax.eval_shape(functools.partial(linen.init, train=False),
                        jax.random.key(0), x)
  got = jax.eval_shape(nx.init, jax.random.key(0), x)
  for coll in train.NNX_COLLECTIONS:
    assert shapes(got[coll]) == shapes(want.get(coll, {})), coll
  count = lambda t: sum(int(np.prod(s)) for s, _ in shapes(t).values())  # noqa: E731
  assert count(got["params"]) == count(want["params"]) > 0


def test_nnx_logits_equal_linen_on_linen_variables():
  """The stateful NNX model (`models.create_model(framework='nnx')`,
  quantizer variables from `aqt_ext.nnx.init`) with the linen variables
  copied in computes linen's logits in evaluation mode. (Quantized: every
  layer and method in evaluation mode in test_nnx.py; the whole quantized
  model in `test_nnx_train_steps_equal_linen`, and in evaluation mode in
  test_ptq_pipeline.py's `test_nnx_ptq_equals_linen`.)"""
  name, hw, c, width, spec = "cifar_resnet8", 16, 1, 0.25, "float"
  linen, _ = twins(name, spec, width)
  x = images(4, hw, c)
  variables = random_floats(name, x, width)
  want = jax.jit(functools.partial(linen.apply, train=False))(variables, x)

  @jax.jit
  def stateful(variables, x):  # (jitted: op by op is slow)
    model = models.create_model(
        name, framework="nnx", rngs=nnx.Rngs(5), in_features=c,
        num_classes=10, width=width, quant=spec_quant(spec))
    model.eval()
    anx.init(model, x)
    nnx.update(model, *variables.values())
    return model(x)
  got = stateful(variables, x)
  assert got.dtype == jnp.float32 and got.shape == (4, 10)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert float(jnp.abs(want).max()) > 0.1  # not a trivial comparison


# ---------------------------------------------------------------------------
# train_step: the same step in both frameworks.
# ---------------------------------------------------------------------------

def test_nnx_train_steps_equal_linen(tmp_path):
  """From the same float variables (`init_from`), both frameworks create
  the same quantizer variables (LSQ steps, DQ levels and clips, PACT clips,
  static ranges), and two train_steps (SGD with Nesterov momentum, weight
  decay) give the same loss, DQ auxiliary loss, parameters, optimizer
  state, BatchNorm statistics and static ranges, bit for bit."""
  linen, nx = twins("cifar_resnet8", MIXED)
  config = tiny_config(tmp_path)
  x = images(16, 16)
  floats = random_floats("cifar_resnet8", x)
  batches = [{"image": images(16, 16, seed=s),
              "label": np.random.default_rng(s).integers(0, 10, 16)
                       .astype(np.int32)} for s in (2, 3)]
  runs = {}
  for fw, model in (("linen", linen), ("nnx", nx)):
    state, schedule = train.create_state(config, model, x, 4, floats)
    step = jax.jit(functools.partial(train.train_step, num_classes=10,
                                     label_smoothing=0.0, schedule=schedule))
    trace = [state]
    for batch in batches:
      state, metrics = step(state, batch)
      trace.append((state, metrics))
    runs[fw] = trace
  (l0, *lsteps), (n0, *nsteps) = runs["linen"], runs["nnx"]
  for coll in ("params", "batch_stats", "quant_stats"):
    assert_trees_equal(getattr(l0, coll), getattr(n0, coll))
  assert_trees_equal(l0.params["head"], floats["params"]["head"])
  for (ls, lm), (ns, nm) in zip(lsteps, nsteps):
    for key in ("loss", "cross_entropy", "grad_norm", "param_norm",
                "quant_grad_norm", "quant_param_norm", "accuracy"):
      np.testing.assert_array_equal(lm[key], nm[key], err_msg=key)
    for coll in ("params", "batch_stats", "quant_stats"):
      assert_trees_equal(getattr(ls, coll), getattr(ns, coll))
    assert_trees_equal(ls.opt_state, ns.opt_state)
    assert float(nm["loss"] - nm["cross_entropy"]) > 0  # DQ's term
  # The static ranges (stem, stage1 projection, the activation quantizers)
  # moved: calibrated once at init_from (as linen's), then the EMA ran at
  # both steps.
  stats = flat(nsteps[-1][0].quant_stats)
  assert sorted("/".join(k[:-1]) for k in stats if k[-1] == "input_count") == [
      "conv_init", "stage1_block0/proj_conv", "stage2_block0/branch_quant",
      "stage2_block0/shortcut_quant", "stem_quant"]
  assert "input_lsq_step" in nsteps[-1][0].params["stage1_block0"][
      "branch_quant"]
  assert {int(v) for k, v in stats.items() if k[-1] == "input_count"} == {3}
  assert not np.array_equal(lsteps[-1][0].params["head"]["kernel"],
                            l0.params["head"]["kernel"])


# ---------------------------------------------------------------------------
# train_and_evaluate: checkpoints, resume, the framework field.
# ---------------------------------------------------------------------------

class Interrupted(Exception):
  pass


def final_checkpoint(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(pathlib.Path(workdir).resolve() / "checkpoints")
  try:
    return mgr.latest_step(), mgr.restore(mgr.latest_step())
  finally:
    mgr.close()


@pytest.fixture(scope="module")
def nnx_run(fashion_mnist_dir, tmp_path_factory):
  """An uninterrupted 4-step NNX run: (workdir, result)."""
  workdir = tmp_path_factory.mktemp("nnx_run")
  result = train.train_and_evaluate(tiny_config(fashion_mnist_dir),
                                    str(workdir))
  return workdir, result


def test_nnx_run_resumes_as_if_uninterrupted(fashion_mnist_dir, nnx_run,
                                             tmp_path, monkeypatch):
  """Stopped after its step-2 checkpoint and rerun, an NNX run resumes at
  step 2 and ends with the uninterrupted run's checkpoint, bit for bit; the
  checkpoint holds the linen twin's variable tree."""
  ref_dir, ref = nnx_run
  assert ref["steps"] == 4 and ref["resumed_from_step"] == 0
  assert ref["config"]["framework"] == "nnx"
  assert 0 <= ref["eval_accuracy"] <= 1 and ref["eval_examples"] == 250
  linen_twin = train.create_model(tiny_config(fashion_mnist_dir,
                                              framework="linen"), 10)
  assert ref["cost"] == train.model_cost(linen_twin, (28, 28, 1))

  save = train.save_checkpoint

  def save_then_stop(mgr, state):
    save(mgr, state)
    if int(state.step) == 2:
      raise Interrupted
  monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
  with pytest.raises(Interrupted):
    train.train_and_evaluate(tiny_config(fashion_mnist_dir), str(tmp_path))
  assert not (tmp_path / "result.json").exists()
  monkeypatch.setattr(train, "save_checkpoint", save)
  result = train.train_and_evaluate(tiny_config(fashion_mnist_dir),
                                    str(tmp_path))
  assert result["resumed_from_step"] == 2 and result["steps"] == 4
  (s1, t1), (s2, t2) = final_checkpoint(ref_dir), final_checkpoint(tmp_path)
  assert s1 == s2 == 4
  assert_trees_equal(t1, t2)
  assert result["eval_accuracy"] == ref["eval_accuracy"]
  x = jnp.zeros((1, 28, 28, 1))
  want = jax.eval_shape(functools.partial(linen_twin.init, train=False),
                        jax.random.key(0), x)
  for coll in ("params", "batch_stats", "quant_stats"):
    assert shapes(t1.get(coll, {})) == shapes(want.get(coll, {})), coll


def test_resume_with_the_framework_changed_is_refused(fashion_mnist_dir,
                                                      nnx_run, tmp_path):
  ref_dir, _ = nnx_run
  before = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
  with pytest.raises(train.ResumeConfigError,
                     match=r"config\.framework: 'nnx' saved, 'linen' now"):
    train.train_and_evaluate(tiny_config(fashion_mnist_dir,
                                         framework="linen"), str(ref_dir))
  assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == before
  # A workdir saved before the field existed was trained with linen.
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  saved = tiny_config(fashion_mnist_dir, framework="linen").to_dict()
  del saved["framework"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_resume(tiny_config(fashion_mnist_dir, framework="linen"),
                     str(tmp_path))
  with pytest.raises(train.ResumeConfigError,
                     match=r"config\.framework: 'linen' saved, 'nnx' now"):
    train.check_resume(tiny_config(fashion_mnist_dir), str(tmp_path))


def test_bad_framework_is_refused_before_work(tmp_path):
  with pytest.raises(ValueError, match=r"config\.framework='torch' is not "
                     r"allowed; allowed values: 'linen', 'nnx'"):
    train.train_and_evaluate(tiny_config(tmp_path, framework="torch"),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
