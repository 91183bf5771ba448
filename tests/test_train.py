"""Training loop: resume after SIGKILL, determinism, NaN stop, bad checkpoints,
data parallelism; `train_step`'s quantizer state and auxiliary losses.

Runs tiny models on a slice of the real Fashion-MNIST (built offline), and
`train_step` on two-layer models and random batches; no accuracy is
asserted here beyond "it learns something".
"""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aqt_ext as A
from aqt_ext.core import clip_search, dq, levels
from aqt_ext.config import LayerQuant, TensorQuant

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_overrides(data_dir, **kw):
  o = dict(dataset="fashion_mnist", data_dir=str(data_dir),
           model="cifar_resnet8", width=0.25, quant="lsq:w4a4_fl8",
           batch_size=32, eval_batch_size=250, num_train_examples=512,
           num_eval_examples=500, num_epochs=2.0, warmup_epochs=0.5,
           learning_rate=0.05, log_every_steps=8, checkpoint_every_steps=8,
           keep_checkpoints=3, seed=3)
  o.update(kw)
  return o


def tiny_config(data_dir, **kw):
  sys.path.insert(0, str(ROOT))
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  for k, v in tiny_overrides(data_dir, **kw).items():
    c[k] = v
  return c


def main_cmd(workdir, data_dir, **kw):
  cmd = [sys.executable, "-m", "aqt_ext.main",
         f"--config={ROOT / 'configs' / 'base.py'}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir,
                                                          **kw).items()]
  return cmd


def final_params(workdir, like=None):
  """(step, tree) of the latest checkpoint in `workdir`. With `like` (a
  tree of the same structure), restored onto this process's first device
  whatever mesh saved it (orbax refuses a plain restore of a checkpoint
  saved by another device topology)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  target = None
  if like is not None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        np.shape(a), np.asarray(a).dtype, sharding=one), like)
  tree = mgr.restore(mgr.latest_step(),
                     args=ocp.args.StandardRestore(target))
  return mgr.latest_step(), tree


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_writes_result_and_the_seed_matters(fashion_mnist_dir,
                                                  tmp_path, monkeypatch):
  # Same seed -> same parameters: test_sigkill_and_rerun_resumes_identically
  # (a rerun of the same command ends bit-identical to the reference run).
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(tiny_config(fashion_mnist_dir),
                           str(tmp_path / "a"))
  on_disk = json.loads((tmp_path / "a" / "result.json").read_text())
  for key in ("eval_accuracy", "eval_loss", "steps", "macs", "bops",
              "weight_bits", "config", "wall_time_s"):
    assert key in on_disk
  assert on_disk["steps"] == 32 and on_disk["eval_examples"] == 500
  assert on_disk["config"]["quant"] == "lsq:w4a4_fl8"
  assert on_disk["macs"] > 0 and on_disk["bops"] > 0
  # Learned something on real data (10 classes: chance is 0.1).
  assert on_disk["eval_accuracy"] > 0.15  # 500 examples: 6 sigma
  _, p1 = final_params(tmp_path / "a")
  # A different seed gives different parameters. This run's --workdir is
  # relative, as in the README (orbax refuses relative checkpoint paths).
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny_config(fashion_mnist_dir, seed=4,
                                       num_epochs=0.25), "c")
  _, p3 = final_params(tmp_path / "c")
  assert not np.array_equal(np.asarray(p3["params"]["head"]["kernel"]),
                            np.asarray(p1["params"]["head"]["kernel"]))


def test_train_metrics_window_is_a_clu_collection():
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  from clu import metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  keys = ("loss", "cross_entropy", "accuracy", "grad_norm", "param_norm",
          "quant_grad_norm", "quant_param_norm", "learning_rate")
  steps = [{k: np.float32(rng.uniform()) for k in keys} for _ in range(5)]
  window = train.window_metrics(steps)
  assert isinstance(window, metrics.Collection)
  out = window.compute()
  for k in keys[:-1]:  # means over the window
    np.testing.assert_allclose(out[k], np.mean([m[k] for m in steps]),
                               rtol=1e-6)
  assert out["learning_rate"] == steps[-1]["learning_rate"]  # the last step's


# ---------------------------------------------------------------------------
# train_step on tiny in-process models: quantizer state and auxiliary losses.
# ---------------------------------------------------------------------------

class TwoLayerNet(nn.Module):
  """Dense -> relu -> Dense; `first` / `second` quantize the layers."""

  first: Any
  second: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = A.QuantDense(8, name="dense0", quant=self.first)(x)
    return A.QuantDense(3, name="dense1", quant=self.second)(nn.relu(x))


def _grads_as_state():
  """An optax transformation that leaves the params unchanged and keeps
  the gradients it was given as its state (so a test reads exactly what
  train_step differentiated)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (
          jax.tree.map(jnp.zeros_like, grads), grads))


def _tiny_step(model, images, tmp_path):
  """(state, jitted train_step) as `train_and_evaluate` builds them, the
  optimizer replaced by `_grads_as_state`."""
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  state, schedule = train.create_state(tiny_config(tmp_path), model, images,
                                       steps_per_epoch=4)
  tx = _grads_as_state()
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  step = jax.jit(functools.partial(train.train_step, num_classes=3,
                                   label_smoothing=0.0, schedule=schedule))
  return state, step


def _batches(n, size=16, features=6):
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(size, features)).astype(np.float32)
                    * (1.0 + i),
           "label": rng.integers(0, 3, size).astype(np.int32)}
          for i in range(n)]


def test_train_step_updates_static_quant_stats(tmp_path):
  """Static input ranges (uniform and DQ) are EMAs that train_step
  advances: batch range at the first step, then the EMA."""
  decay = 0.5
  first = LayerQuant(input=TensorQuant("uniform", 8, calibration="static",
                                       ema_decay=decay))
  second = LayerQuant(input=TensorQuant("dq", 4, grid="unsigned",
                                        calibration="static",
                                        ema_decay=decay))
  model = TwoLayerNet(first, second)
  b1, b2 = _batches(2)
  state, step = _tiny_step(model, b1["image"], tmp_path)
  assert int(state.quant_stats["dense0"]["input_count"]) == 0
  assert int(state.quant_stats["dense1"]["input_count"]) == 0
  # What one forward pass with mutable stats computes from these params.
  _, want = jax.jit(functools.partial(
      model.apply, train=True, mutable=["quant_stats"]))(state.variables(),
                                                         b1["image"])
  state1, _ = step(state, b1)
  s1 = state1.quant_stats
  assert int(s1["dense0"]["input_count"]) == 1
  assert int(s1["dense1"]["input_count"]) == 1
  amax1 = np.abs(b1["image"]).max()
  np.testing.assert_allclose(s1["dense0"]["input_amax"], amax1, rtol=1e-6)
  np.testing.assert_allclose(s1["dense1"]["input_dq_clip"],
                             want["quant_stats"]["dense1"]["input_dq_clip"],
                             rtol=1e-6)
  state2, _ = step(state1, b2)
  s2 = state2.quant_stats
  assert int(s2["dense0"]["input_count"]) == 2
  np.testing.assert_allclose(
      s2["dense0"]["input_amax"],
      decay * amax1 + (1 - decay) * np.abs(b2["image"]).max(), rtol=1e-6)
  assert float(s2["dense1"]["input_dq_clip"]) != float(
      s1["dense1"]["input_dq_clip"])


def test_train_step_adds_the_dq_auxiliary_loss(tmp_path):
  """A DQ input's channel-error term (quant_losses) is part of the loss
  train_step differentiates: with dq_err_weight 1 the loss is CE + E(alpha)
  and alpha's gradient exceeds that of the same step at weight 0 by exactly
  dE/d alpha; the other gradients are unchanged (E trains alpha only, and
  the first layer's input is the data)."""
  bits = 4

  def model(weight):
    return TwoLayerNet(
        LayerQuant(input=TensorQuant("dq", bits, dq_err_weight=weight)),
        LayerQuant())

  (batch,) = _batches(1)
  runs = {}
  for weight in (1.0, 0.0):
    state, step = _tiny_step(model(weight), batch["image"], tmp_path)
    new, metrics = step(state, batch)
    runs[weight] = (state, new.opt_state, metrics, new.params)
  (s1, g1, m1, _), (s0, g0, m0, _) = runs[1.0], runs[0.0]
  alpha_g = lambda tree: tree["dense0"]["input_dq_alpha"]  # noqa: E731
  new_params = lambda run: run[3]  # noqa: E731
  assert_trees_equal(s1.params, s0.params)  # same init
  alpha = s1.params["dense0"]["input_dq_alpha"]
  x = batch["image"][::dq.AUX_STRIDE]
  err, derr = jax.value_and_grad(
      lambda a: clip_search.channel_error(x, a, bits, "full"))(alpha)
  assert float(err) > 0 and float(derr) != 0
  np.testing.assert_allclose(m1["loss"] - m1["cross_entropy"], err,
                             rtol=1e-5)
  np.testing.assert_allclose(m0["loss"], m0["cross_entropy"], rtol=0)
  np.testing.assert_allclose(m1["cross_entropy"], m0["cross_entropy"],
                             rtol=1e-6)
  da = g1["dense0"]["input_dq_alpha"] - g0["dense0"]["input_dq_alpha"]
  np.testing.assert_allclose(da, derr, rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(derr)))
  for path in (("dense0", "kernel"), ("dense0", "bias"),
               ("dense1", "kernel")):
    np.testing.assert_allclose(g1[path[0]][path[1]], g0[path[0]][path[1]],
                               rtol=1e-6, atol=1e-7)
  # The logged norms keep the model's parameters and the quantizer's apart.
  flat = flax.traverse_util.flatten_dict(g1, sep="/")
  model_sq = sum(float(jnp.sum(v ** 2)) for k, v in flat.items()
                 if not k.endswith("_dq_alpha"))
  np.testing.assert_allclose(m1["grad_norm"], model_sq ** 0.5, rtol=1e-5)
  np.testing.assert_allclose(m1["quant_grad_norm"], abs(float(alpha_g(g1))),
                             rtol=1e-5)
  np.testing.assert_allclose(
      m1["quant_param_norm"], abs(float(alpha_g(new_params(runs[1.0])))),
      rtol=1e-5)


def test_sigkill_and_rerun_resumes_identically(fashion_mnist_dir, tmp_path):
  """Kill mid-run, rerun the same command: it resumes and ends with the
  parameters of an uninterrupted run of the same config and seed, bit for
  bit (so training is also deterministic across processes)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  long = dict(num_epochs=4.0, checkpoint_every_steps=16)  # 64 steps
  ref = tmp_path / "ref"
  subprocess.run(main_cmd(ref, fashion_mnist_dir, **long), check=True,
                 env=env, cwd=ROOT, capture_output=True)

  run = tmp_path / "run"
  proc = subprocess.Popen(main_cmd(run, fashion_mnist_dir, **long), env=env,
                          cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = run / "checkpoints"
  deadline = time.time() + 1200  # a hang guard only: it waits for step 16
  while proc.poll() is None:
    done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] \
        if ckpts.exists() else []
    if done and max(done) >= 16:
      break
    if time.time() > deadline:
      proc.kill()
      pytest.fail("the run wrote no checkpoint >= 16 within the hang guard")
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (run / "result.json").exists()

  out = subprocess.run(main_cmd(run, fashion_mnist_dir, **long), check=True,
                       env=env, cwd=ROOT, capture_output=True, text=True)
  result = json.loads((run / "result.json").read_text())
  assert 16 <= result["resumed_from_step"] < 64, out.stderr[-2000:]
  s1, p1 = final_params(ref)
  s2, p2 = final_params(run)
  assert s1 == s2 == 64
  assert_trees_equal(p1, p2)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    fashion_mnist_dir, tmp_path):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(fashion_mnist_dir, quant="float", learning_rate=1e30,
                    warmup_epochs=0.0, checkpoint_every_steps=1,
                    num_epochs=1.0)
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as e:
    train.train_and_evaluate(cfg, str(tmp_path))
  bad_step = int(e.value.args[0].split("at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("*")
                 if p.name.isdigit())
  assert saved and max(saved) == bad_step - 1
  _, tree = final_params(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(tree["params"]))
  assert not (tmp_path / "result.json").exists()


def test_corrupted_checkpoint_is_reported_not_overwritten(fashion_mnist_dir,
                                                          tmp_path):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(fashion_mnist_dir, num_epochs=1.0)
  train.train_and_evaluate(cfg, str(tmp_path))
  latest = tmp_path / "checkpoints" / "16"
  assert latest.is_dir()
  # Damage every data file of the latest checkpoint.
  damaged = 0
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0garbage")
      damaged += 1
  assert damaged
  before = sorted(str(p) for p in latest.rglob("*"))
  cfg2 = tiny_config(fashion_mnist_dir, num_epochs=1.0)  # same schedule: a resume
  with pytest.raises(train.CheckpointError, match="step 16"):
    train.train_and_evaluate(cfg2, str(tmp_path))
  assert sorted(str(p) for p in latest.rglob("*")) == before
  assert (tmp_path / "checkpoints" / "8").is_dir()


def test_bad_config_is_refused_before_work(tmp_path):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  for field, value, msg in [("optimizer", "lamb", "config.optimizer"),
                            ("model", "resnet51", "config.model"),
                            ("quant", "w4a", "quant spec"),
                            ("dataset", "svhn", "config.dataset")]:
    cfg = tiny_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=msg):
      train.train_and_evaluate(cfg, str(tmp_path / field))
    assert not (tmp_path / field).exists()
  shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("name", [
    "default", "fashion_mnist_float", "fashion_mnist_w4a4",
    "cifar10_resnet20", "imagenet_resnet50_bf16", "imagenet_resnet50_w8a8",
    "imagenet_resnet50_w4a4"])
def test_shipped_configs_validate(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  config = importlib.import_module(f"configs.{name}").get_config()
  train.validate_config(config)
  if name.startswith("imagenet"):
    assert config.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
    assert (config.num_epochs, config.warmup_epochs) == (250, 5)


# A tiny float run (8 steps): trained once in this process, on one device.
FLOAT_RUN = dict(quant="float", num_epochs=0.5)


@pytest.fixture(scope="module")
def float_run(fashion_mnist_dir, tmp_path_factory):
  """The workdir of `FLOAT_RUN`, trained in this process (one device)."""
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("float_run")
  train.train_and_evaluate(tiny_config(fashion_mnist_dir, **FLOAT_RUN),
                           str(workdir))
  return workdir


def test_training_writes_tensorboard_scalars(float_run):
  """The loop's TensorFlow-free writer (`aqt_ext.metric_writer`) writes an
  event file TensorBoard's own reader reads: the train scalars at each log
  step and the final eval, equal to result.json's."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(float_run))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert {"train_loss", "train_accuracy", "train_learning_rate",
          "steps_per_sec", "eval_accuracy", "eval_loss"} <= tags
  assert [e.step for e in events.Scalars("train_loss")] == [8]
  result = json.loads((float_run / "result.json").read_text())
  (final,) = events.Scalars("eval_accuracy")
  assert final.step == result["steps"] == 8
  assert final.value == pytest.approx(result["eval_accuracy"], rel=1e-6)
  assert events.Scalars("steps_per_sec")[0].value > 0


def test_data_parallel_over_two_devices_equals_one_device(
    fashion_mnist_dir, float_run, tmp_path):
  """The batch is sharded over a 2-device mesh (forced host devices), and
  training is the same as on one device with the same global batch.

  Float model: the runs differ only in the order of the cross-device sums
  (gradients, BatchNorm statistics), a float32 rounding difference. Each
  step moves the parameters far more than that, so every parameter and
  statistic must agree to 1e-3 of how far the 8 steps moved its collection
  (rounding alone stays below 1e-5 of it). A quantized model would not do: one
  rounding flip of a weight or activation between the runs changes the
  trajectory by a quantization step.
  """
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  subprocess.run(main_cmd(tmp_path, fashion_mnist_dir, **FLOAT_RUN),
                 check=True, env=env, cwd=ROOT, capture_output=True,
                 timeout=1800)  # a hang guard only
  two = json.loads((tmp_path / "result.json").read_text())
  one = json.loads((float_run / "result.json").read_text())
  assert (two["devices"], one["devices"]) == (2, 1)
  assert two["steps"] == one["steps"] == 8
  assert two["eval_examples"] == one["eval_examples"] == 500
  s1, p1 = final_params(float_run)
  s2, p2 = final_params(tmp_path, like=p1)
  assert s1 == s2 == 8
  cfg = tiny_config(fashion_mnist_dir, **FLOAT_RUN)
  init = train.create_model(cfg, 10).init(
      jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 28, 28, 1)), train=False)
  flat = flax.traverse_util.flatten_dict
  for coll in ("params", "batch_stats"):
    start, a, b = flat(init[coll]), flat(p1[coll]), flat(p2[coll])
    assert set(a) == set(b) == set(start)
    moved = {k: np.abs(np.asarray(a[k]) - np.asarray(start[k])).max()
             for k in a}
    diff = {k: np.abs(np.asarray(b[k]) - np.asarray(a[k])).max() for k in a}
    assert all(m > 0 for m in moved.values()), (coll, moved)
    # Per collection: a leaf that barely moves (a BatchNorm bias, 2e-5) can
    # differ by a few percent of its own movement on another XLA build, but
    # no leaf may differ by more than 1e-3 of the collection's movement.
    worst = max(diff, key=diff.get)
    assert diff[worst] <= 1e-3 * max(moved.values()), (
        coll, worst, diff[worst], max(moved.values()))
  # Evaluation: same 500 examples, same parameters up to rounding.
  assert abs(two["eval_accuracy"] - one["eval_accuracy"]) * 500 <= 1
  np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-4)


def test_init_from_without_checkpoint_is_refused(fashion_mnist_dir, tmp_path):
  """A missing float model stops the run before anything is written."""
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "no_float_run"
  empty.mkdir()
  cfg = tiny_config(fashion_mnist_dir, init_from=str(empty))
  with pytest.raises(train.CheckpointError, match="config.init_from="):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  assert list(empty.iterdir()) == []  # nothing created in the named dir


def test_qat_from_float_checkpoint(fashion_mnist_dir, float_run):
  """Float params load unchanged; LSQ steps are created from them."""
  from aqt_ext import data, train  # pylint: disable=g-import-not-at-top
  floats = train.load_float_variables(str(float_run))
  cfg = tiny_config(fashion_mnist_dir, quant="lsq:w4a4_fl8",
                    init_from=str(float_run))
  model = train.create_model(cfg, 10)
  batch = data.make_train_stream("fashion_mnist", 32, 0,
                                 fashion_mnist_dir).batch(0)["image"]
  state, _ = train.create_state(cfg, model, batch, 16, floats)
  p = state.params
  np.testing.assert_array_equal(p["head"]["kernel"],
                                floats["params"]["head"]["kernel"])
  conv = p["stage0_block0"]["conv1"]
  assert set(conv) == {"kernel", "kernel_lsq_step", "input_lsq_step"}
  # LSQ init from the loaded kernel: s = 2 mean|w| / sqrt(Qp), per channel.
  w = np.asarray(floats["params"]["stage0_block0"]["conv1"]["kernel"])
  np.testing.assert_allclose(
      np.ravel(conv["kernel_lsq_step"]),
      2 * np.abs(w).mean(axis=(0, 1, 2)) / np.sqrt(7), rtol=1e-5)
  np.testing.assert_array_equal(state.batch_stats["bn_init"]["mean"],
                                floats["batch_stats"]["bn_init"]["mean"])
