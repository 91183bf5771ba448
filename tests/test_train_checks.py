"""Training config checks: refused before any work, resumes that must match
the model's config, and damaged files that are named with what to do."""

import asyncio
import gzip
import io
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **kw):
  """A float width-0.25 ResNet-8 on 512 Fashion-MNIST images, batch 32: 16
  steps per epoch, 8 in all (the float run of tests/test_train.py's
  test_qat_from_float, so that the XLA cache serves both)."""
  sys.path.insert(0, str(ROOT))
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  o = dict(dataset="fashion_mnist", data_dir=str(data_dir),
           model="cifar_resnet8", width=0.25, quant="float", batch_size=32,
           eval_batch_size=250, num_train_examples=512, num_eval_examples=500,
           num_epochs=0.5, warmup_epochs=0.5, learning_rate=0.05,
           log_every_steps=8, checkpoint_every_steps=4, keep_checkpoints=2,
           seed=3)
  o.update(kw)
  for k, v in o.items():
    c[k] = v
  return c


# ---------------------------------------------------------------------------
# Refused before any work.
# ---------------------------------------------------------------------------

BAD_FIELDS = [
    ("keep_checkpoints", 0), ("checkpoint_every_steps", 0),
    ("log_every_steps", 0), ("eval_batch_size", 0), ("num_eval_examples", 0),
    ("num_train_examples", 0), ("eval_every_steps", -1), ("batch_size", 0),
    ("batch_size", 1024),  # more than the 512 training examples
    ("num_epochs", 0.05),  # 0.8 of a step: a run of 0 steps
    ("num_epochs", math.inf), ("learning_rate", -0.1),
    ("learning_rate", math.nan), ("learning_rate", math.inf),
    ("weight_decay", -1e-4), ("warmup_epochs", -1.0),
    ("quant_lr_multiplier", math.nan), ("momentum", 1.0),
    ("label_smoothing", 1.0), ("width", 0.0), ("seed", -1),
    ("quant", "w4a4_fl99"), ("validation_examples", -1),
    ("validation_examples", 60_000),  # no training example left
    ("num_train_examples", 58_000),  # overlaps validation_examples=5000
    ("eval_split", "val"), ("eval_split", "validation")]  # the last: with
# validation_examples=0


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_field_is_refused_before_the_workdir_exists(field, value,
                                                         tmp_path,
                                                         monkeypatch):
  from aqt_ext import data, train  # pylint: disable=g-import-not-at-top
  # Nothing to prepare data from: a run that got past the checks would fail
  # at once, with another error.
  monkeypatch.setattr(data, "LOCAL_FASHION_MNIST_DIR", tmp_path / "absent")
  cfg = tiny_config(tmp_path / "tfds", **{field: value})
  if field == "num_train_examples" and value == 58_000:
    cfg.validation_examples = 5000
  workdir = tmp_path / "w"
  name = "quant spec 'w4a4_fl99'" if field == "quant" else f"config.{field}="
  with pytest.raises(ValueError, match="allowed") as e:
    train.train_and_evaluate(cfg, str(workdir))
  assert name in str(e.value)
  assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_zero_step_run_names_the_smallest_num_epochs(tmp_path):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"config.num_epochs=0.05 .*>= 1/16, "
                     r"at least one training step \(16 steps per epoch"):
    train.validate_config(tiny_config(tmp_path, num_epochs=0.05))


def test_parse_spec_checks_every_width_without_first_last():
  from aqt_ext.config import parse_spec  # pylint: disable=g-import-not-at-top
  for spec, what in (("w4a4_fl99", "first/last-layer bits 99"),
                     ("w4a4_fl1", "first/last-layer bits 1"),
                     ("w9a4", "weight bits 9"), ("w4a0", "input bits 0")):
    with pytest.raises(ValueError, match=f"{what} are out of range; "
                       r"allowed: 2..8 or 'f'"):
      parse_spec(spec)
  parse_spec("w4a4_flf")  # 'f': first/last in float


# ---------------------------------------------------------------------------
# A rerun in a workdir must match the config that trained its model.
# ---------------------------------------------------------------------------

def test_saved_config_is_written_before_training(fashion_mnist_dir, tmp_path,
                                                 monkeypatch):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(fashion_mnist_dir)

  def stop(*args, **kwargs):
    raise RuntimeError("stopped before training")

  monkeypatch.setattr(train, "create_state", stop)
  with pytest.raises(RuntimeError, match="stopped before training"):
    train.train_and_evaluate(cfg, str(tmp_path))
  saved = json.loads((tmp_path / train.CONFIG_FILE).read_text())
  assert saved == json.loads(json.dumps(cfg.to_dict()))
  # No model there yet: another config may start in that workdir.
  other = tiny_config(fashion_mnist_dir, quant="w2a2", seed=4)
  with pytest.raises(RuntimeError, match="stopped before training"):
    train.train_and_evaluate(other, str(tmp_path))
  saved = json.loads((tmp_path / train.CONFIG_FILE).read_text())
  assert (saved["quant"], saved["seed"]) == ("w2a2", 4)


def test_resume_with_other_training_fields_is_refused(fashion_mnist_dir,
                                                      tmp_path):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  cfg = tiny_config(fashion_mnist_dir)
  train.train_and_evaluate(cfg, str(workdir))  # 8 steps, checkpoints 4, 8

  def snapshot():
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted(workdir.rglob("*")) if p.is_file()}

  before = snapshot()
  config_json = str(workdir / train.CONFIG_FILE)
  for changes, details in [
      (dict(quant="w2a2_fl8"),
       ["config.quant: 'float' saved, 'w2a2_fl8' now"]),
      (dict(learning_rate=0.2, seed=5),
       ["config.seed: 3 saved, 5 now",
        "config.learning_rate: 0.05 saved, 0.2 now"]),
      (dict(num_epochs=1.0),
       ["config.num_epochs: 0.5 saved, 1.0 now"])]:
    with pytest.raises(train.ResumeConfigError) as e:
      train.train_and_evaluate(tiny_config(fashion_mnist_dir, **changes),
                               str(workdir))
    message = str(e.value)
    for d in details:
      assert d in message
    assert config_json in message
    assert snapshot() == before  # nothing written
  # Fields that do not define the model may change: evaluation, logging.
  result = train.train_and_evaluate(
      tiny_config(fashion_mnist_dir, num_eval_examples=125, log_every_steps=1),
      str(workdir))
  assert result["resumed_from_step"] == 8 and result["eval_examples"] == 125
  assert (workdir / train.CONFIG_FILE).read_bytes() == before[
      train.CONFIG_FILE]
  # A workdir from before config.json: result.json's config is the record.
  (workdir / train.CONFIG_FILE).unlink()
  with pytest.raises(train.ResumeConfigError,
                     match=r"config.quant: 'float' saved, 'w8a8' now; saved "
                     r"in .*result.json"):
    train.train_and_evaluate(tiny_config(fashion_mnist_dir, quant="w8a8"),
                             str(workdir))
  # Checkpoints and no record of their config: refused, not guessed.
  (workdir / train.RESULT_FILE).unlink()
  with pytest.raises(train.CheckpointError, match="records no config"):
    train.train_and_evaluate(cfg, str(workdir))


# ---------------------------------------------------------------------------
# Damaged files.
# ---------------------------------------------------------------------------

def test_truncated_idx_file_is_named_with_what_to_do(tmp_path, monkeypatch):
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  if not data.LOCAL_FASHION_MNIST_DIR.is_dir():
    pytest.skip(f"{data.LOCAL_FASHION_MNIST_DIR} is missing")
  source = tmp_path / "fashion-mnist"
  source.mkdir()
  for f in data.LOCAL_FASHION_MNIST_DIR.glob("*.gz"):
    (source / f.name).symlink_to(f)
  damaged = source / "train-labels-idx1-ubyte.gz"
  whole = damaged.read_bytes()
  damaged.unlink()
  damaged.write_bytes(whole[:len(whole) // 2])
  monkeypatch.setattr(data, "LOCAL_FASHION_MNIST_DIR", source)
  with pytest.raises(ValueError) as e:
    data.ensure_prepared("fashion_mnist", tmp_path / "tfds")
  assert f"{damaged} is damaged" in str(e.value)
  assert "apt-get install --reinstall dataset-fashion-mnist" in str(e.value)


def test_idx_file_of_the_wrong_length_is_named(tmp_path):
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  header = np.array([2049, 10_000], ">u4").tobytes()
  path.write_bytes(gzip.compress(header + bytes(9_999)))  # one label short
  with pytest.raises(ValueError, match=r"is damaged: 10007 bytes after "
                     r"decompression, expected 10008"):
    data._check_idx_file(path)  # pylint: disable=protected-access
  path.write_bytes(gzip.compress(header + bytes(10_000)))
  data._check_idx_file(path)  # pylint: disable=protected-access


def _closed_loop_error():
  """The RuntimeError a callback scheduled on a closed loop raises."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError as e:
    return e
  raise AssertionError("a closed loop accepted a callback")


def test_aborted_restore_echoes_are_dropped_and_nothing_else(monkeypatch):
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  asyncio_logger = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_logger, "filters", [])
  train.silence_aborted_restore_echoes()

  def unraisable(exc):  # what sys.unraisablehook receives
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                 exc_traceback=exc.__traceback__,
                                 err_msg=None, object=None)

  echo = _closed_loop_error()
  other = RuntimeError("Event loop is closed")  # not from a closed loop
  unrelated = ValueError("x")
  for exc in (echo, other, unrelated):
    sys.unraisablehook(unraisable(exc))
  assert [u.exc_value for u in seen] == [other, unrelated]

  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  asyncio_logger.addHandler(handler)
  try:
    asyncio_logger.error("Task exception was never retrieved\nfuture: <Task "
                         "finished coro=<async_deserialize() done, defined at "
                         "/x/orbax/checkpoint/serialization.py:1>>")
    asyncio_logger.error("Task exception was never retrieved\nfuture: <Task "
                         "finished coro=<mine() done, defined at /x/app.py:1>>")
  finally:
    asyncio_logger.removeHandler(handler)
  assert "orbax" not in stream.getvalue() and "app.py" in stream.getvalue()


MAKE_DAMAGED_CHECKPOINT = """
import os, pathlib, sys
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from aqt_ext import train
d, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
params = {f"layer{i}": {"kernel": jnp.full((3, 3, 4, 8), float(i)),
                        "bias": jnp.zeros((8,))} for i in range(n)}
state = train.TrainState(step=jnp.array(1, jnp.int32), params=params,
                         batch_stats={}, quant_stats={}, opt_state={},
                         rng=jax.random.PRNGKey(0), apply_fn=None, tx=None)
mgr = ocp.CheckpointManager(os.path.abspath(d))
if mode == "save":
  train.save_checkpoint(mgr, state)
  for f in pathlib.Path(d, "1").rglob("*"):
    if f.is_file() and f.stat().st_size and "metadata" not in f.name.lower():
      f.write_bytes(b"\\0garbage")  # every data file; metadata intact
else:
  train.restore_checkpoint(mgr, state.replace(step=jnp.array(0, jnp.int32)))
"""


def test_damaged_checkpoint_error_is_not_buried_in_echoes(tmp_path):
  """Restoring a checkpoint whose data files are damaged (metadata intact)
  in a fresh process: the CheckpointError ends stderr, naming the step's
  folder, and no 'Event loop is closed' traceback surrounds it."""
  script = tmp_path / "ckpt.py"
  script.write_text(MAKE_DAMAGED_CHECKPOINT)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  d = str(tmp_path / "checkpoints")
  subprocess.run([sys.executable, str(script), d, "60", "save"], check=True,
                 env=env, cwd=ROOT, capture_output=True, timeout=1200)
  run = subprocess.run([sys.executable, str(script), d, "60", "restore"],
                       env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=1200)
  assert run.returncode != 0
  error = run.stderr.rfind("aqt_ext.train.CheckpointError: resuming the run")
  assert error >= 0, run.stderr[-3000:]
  assert (f"the checkpoint at step 1 in {d}/1 cannot be restored"
          in run.stderr[error:])
  assert "Traceback" not in run.stderr[error:]
  assert "Event loop is closed" not in run.stderr
  assert "never retrieved" not in run.stderr


def test_analyze_skips_an_ok_line_that_lacks_fields(tmp_path, capsys):
  from aqt_ext import sweep  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / sweep.RESULTS_FILE)
  good = sweep.Point("cifar_resnet8", 0.5, "w4a4", None, "uniform", 0)
  sweep.append_record(path, {
      "id": good.id, "axes": good.axes, "spec": good.spec, "status": "ok",
      "eval_accuracy": 0.8, "macs": 1e6, "bops": 1.6e7, "weight_bits": 4e4,
      "config": {"dataset": "fashion_mnist"}})
  sweep.append_record(path, {"id": "no-fields", "status": "ok"})
  sweep.append_record(path, {"id": "bad-axes", "status": "ok", "axes": {},
                             "spec": "w4a4", "eval_accuracy": "0.8",
                             "macs": 1, "bops": 1, "weight_bits": 1})
  table = sweep.analyze(str(tmp_path))
  rows = [line for line in table.splitlines() if line.startswith("| cifar")]
  assert len(rows) == 1 and rows[0].startswith("| cifar_resnet8 | 0.5 |")
  err = capsys.readouterr().err
  assert ("'no-fields' lacks axes, spec, eval_accuracy, macs, bops, "
          "weight_bits; line ignored") in err
  assert "'bad-axes' lacks axes.model" in err
  assert "has a non-numeric eval_accuracy" in err
