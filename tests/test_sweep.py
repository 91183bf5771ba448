"""Pareto sweep: points, frontier, results.jsonl safety, kill-and-rerun,
failures, SLURM array tasks, --analyze_only.

The sweeps here train tiny points (cifar_resnet8 x0.25, 256 training
examples, 32 steps) in worker subprocesses that share one XLA compilation
cache; all use the same training config (the step count is baked into the
compiled train step), so only the first point of each quant compiles. Most
of a worker's time is importing TensorFlow and JAX and tracing the model, so
the sweeps have as few points as what they test needs. Subprocess timeouts
and waits are hang guards (`HANG_GUARD_S`), not speed limits.
"""

import fcntl
import importlib.util
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from aqt_ext import pareto, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HANG_GUARD_S = 1200

TINY_BASE = dict(dataset="fashion_mnist", batch_size=32, eval_batch_size=250,
                 num_train_examples=256, num_eval_examples=250,
                 num_epochs=4.0, warmup_epochs=0.5, learning_rate=0.05,
                 log_every_steps=8, checkpoint_every_steps=4, augment=False)
GOOD = ("cifar_resnet8", 0.25)
TOO_NARROW = ("cifar_resnet8", 0.04)  # 0 channels: fails in model init


def write_sweep_config(path, models, seeds, quants=("w4a4",),
                       methods=("uniform",), slurm=None, **base):
  path.write_text(f"""
import ml_collections
from configs import base


def get_config():
  c = ml_collections.ConfigDict()
  c.base = base.get_config()
  c.base.update({dict(TINY_BASE, **base)!r})
  c.models = {tuple(models)!r}
  c.quants = {tuple(quants)!r}
  c.first_last = (None,)
  c.methods = {tuple(methods)!r}
  c.seeds = {tuple(seeds)!r}
  c.slurm = {slurm!r}
  return c
""")
  return path


def load_config(path, data_dir):
  spec = importlib.util.spec_from_file_location("sweep_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.base.data_dir = str(data_dir)
  return c


@pytest.fixture(scope="session")
def worker_env():
  """Environment of sweep subprocesses (with conftest's shared compilation
  cache)."""
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def sweep_cmd(config_path, workdir, data_dir, *extra):
  return [sys.executable, "-m", "aqt_ext.sweep", f"--config={config_path}",
          f"--config.base.data_dir={data_dir}", f"--workdir={workdir}",
          *extra]


def lines_of(workdir):
  records, problems = sweep.read_results(str(workdir / "results.jsonl"))
  assert not problems
  return records


def statuses(records, point_id):
  return [r["status"] for r in records if r["id"] == point_id]


# ---------------------------------------------------------------------------
# Pure: points, frontier, aggregation.
# ---------------------------------------------------------------------------

def test_points_product_ids_and_validation():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      base=dict(num_epochs=1.0),
      models=(("cifar_resnet8", 0.5), ("cifar_resnet14", 1)),
      quants=("float", "w4a4"), first_last=(None, 8),
      methods=("uniform", "lsq"), seeds=(0, 1)))
  points = sweep.make_points(c)
  # float ignores method and first/last: 2 models x (1 + 4) x 2 seeds.
  assert len(points) == 20
  assert len({p.id for p in points}) == 20
  specs = sorted({p.spec for p in points})
  assert specs == ["float", "lsq:w4a4", "lsq:w4a4_fl8", "w4a4", "w4a4_fl8"]
  p = points[0]
  assert p.id.startswith("cifar_resnet8-x0.5-float-s0-") and p.method is None
  # Stable: the id depends on the axes only; width 1 == 1.0.
  assert sweep.Point("cifar_resnet14", 1.0, "w4a4", 8, "lsq", 1).id in {
      q.id for q in points}
  base = ml_collections.ConfigDict(dict(model="x", width=0.0, quant="",
                                        seed=9, num_epochs=3.0))
  cfg = points[-1].config(base)
  assert (cfg.model, cfg.width, cfg.quant, cfg.seed, cfg.num_epochs) == (
      "cifar_resnet14", 1.0, "lsq:w4a4_fl8", 1, 3.0)
  assert base.model == "x"
  for field, value, msg in [
      ("quants", ("lsq:w4a4",), r"config.quants\[0\]='lsq:w4a4'.*allowed"),
      ("quants", ("w9a9",), "invalid spec 'w9a9'"),
      ("methods", ("uniform", "ptq9"), r"config.methods\[1\]='ptq9'.*'lsq'"),
      ("models", (("resnet9", 1.0),), r"config.models\[0\].*'cifar_resnet8'"),
      ("first_last", (1,), r"config.first_last\[0\]=1.*None or an int"),
      ("seeds", (-1,), r"config.seeds\[0\]=-1.*>= 0"),
      ("seeds", (), "config.seeds must be a non-empty list"),
      ("base", None, "config.base must be a training ConfigDict")]:
    bad = ml_collections.ConfigDict(c.to_dict())
    bad[field] = value
    with pytest.raises(ValueError, match=msg):
      sweep.make_points(bad)


def test_low_precision_training_quants():
  """Quants with a quantized backward pass ('w8a8_g8') and fp8 ('fp8_ge5m2',
  which ignores method and first/last) give the specs `parse_spec` reads;
  a gradient suffix with a PTQ method is refused."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from aqt_ext.config import parse_spec  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      base=dict(num_epochs=1.0), models=(("cifar_resnet8", 0.5),),
      quants=("float", "w8a8_g8", "fp8_ge5m2", "w4a4"), first_last=(None, 8),
      methods=("aqt",), seeds=(0,)))
  points = sweep.make_points(c)
  specs = sorted(p.spec for p in points)
  assert specs == ["aqt:w4a4", "aqt:w4a4_fl8", "aqt:w8a8_fl8_g8",
                   "aqt:w8a8_g8", "float", "fp8_ge5m2"]
  for p in points:
    parse_spec(p.spec)
  fp8 = next(p for p in points if p.quant == "fp8_ge5m2")
  assert (fp8.method, fp8.first_last, fp8.kind) == (None, None, "qat")
  lq = parse_spec("aqt:w8a8_fl8_g8", first="conv_init").rules[0][1]
  assert lq.grad_weight.format == "int" and lq.weight.bits == 8
  # The ids of points without a gradient suffix are those of before.
  assert sweep.Point("cifar_resnet8", 0.5, "w4a4", 8, "aqt", 0).id in {
      p.id for p in points}
  bad = ml_collections.ConfigDict(c.to_dict())
  bad.methods = ("aqt", "rtn")
  with pytest.raises(ValueError, match="'w8a8_g8'.*PTQ method 'rtn'.*QAT"):
    sweep.make_points(bad)
  bad.methods, bad.quants = ("aqt",), ("fp8_g9x",)
  with pytest.raises(ValueError, match=r"quants\[0\]='fp8_g9x'.*fp8"):
    sweep.make_points(bad)


def test_static_and_residual_quants():
  """'_static' and '_rR' quants (the ONNX-exact deployment specs) make the
  specs the trainer reads, the first/last bits in their place, with the
  zoo's residual quantizers; with a PTQ method, or an fp8 one, they are
  refused before any point runs. fp8's '_delayed' passes through."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from aqt_ext import models  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      base=dict(num_epochs=1.0), models=(("cifar_resnet8", 0.5),),
      quants=("w4a4_static_r8", "w4a4_r8_g8"), first_last=(None, 8),
      methods=("uniform",), seeds=(0,)))
  specs = sorted(p.spec for p in sweep.make_points(c))
  assert specs == ["w4a4_fl8_r8_g8", "w4a4_fl8_static_r8", "w4a4_r8_g8",
                   "w4a4_static_r8"]
  mq = models.quant_spec("w4a4_fl8_static_r8")
  assert mq.for_activation("stage1/block0/branch_quant").bits == 8
  assert mq.for_path("stage1/block0/conv1").input.calibration == "static"
  bad = ml_collections.ConfigDict(c.to_dict())
  bad.quants, bad.methods = ("float", "w4a4_r8"), ("pwlq",)
  with pytest.raises(ValueError, match="'w4a4_r8'.*ptq method 'pwlq'.*QAT"):
    sweep.make_points(bad)
  bad.quants, bad.methods = ("w4a4_r8_static",), ("uniform",)
  with pytest.raises(ValueError, match=r"quants\[0\]='w4a4_r8_static'"):
    sweep.make_points(bad)
  bad.quants = ("fp8_static",)
  with pytest.raises(ValueError, match="invalid spec 'fp8_static'"):
    sweep.make_points(bad)
  c.quants = ("fp8_delayed_ge5m2",)  # delayed scaling: parse_spec's form
  (p,) = sweep.make_points(c)
  assert p.spec == "fp8_delayed_ge5m2"
  assert models.quant_spec(p.spec).default.input.calibration == "delayed"


def test_mixed_precision_and_finetuned_points():
  """'mp' points take their budget from the uniform spec, start from the
  float point, and carry their allocation options; with ``finetune`` the
  quantized QAT points start there too, under other ids and labels than
  points trained from scratch."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      base=dict(num_epochs=3.0, learning_rate=0.1, model="x", width=1.0,
                quant="", seed=0, init_from=None),
      models=(("cifar_resnet20", 1.0),), quants=("float", "w4a4"),
      first_last=(8,), methods=("uniform", "mp", "mp_hessian"), seeds=(0,)))
  scratch = {p.label: p for p in sweep.make_points(c)}
  assert sorted(scratch) == ["float", "mp:w4a4_fl8", "mp_hessian:w4a4_fl8",
                             "w4a4_fl8"]
  mp, float_point = scratch["mp:w4a4_fl8"], scratch["float"]
  assert mp.kind == "mp" and mp.dependency == float_point
  assert scratch["w4a4_fl8"].dependency is None
  cfg = mp.config(c.base)
  assert cfg.quant == "w4a4_fl8" and cfg.mp.to_dict() == dict(
      method="loss_delta")
  assert scratch["mp_hessian:w4a4_fl8"].config(c.base).mp.method == "hessian"
  c.finetune = dict(num_epochs=1.0, learning_rate=0.02)
  tuned = {p.label: p for p in sweep.make_points(c)}
  assert sorted(tuned) == ["float", "ft:w4a4_fl8", "mp:w4a4_fl8",
                           "mp_hessian:w4a4_fl8"]
  ft = tuned["ft:w4a4_fl8"]
  assert ft.dependency == float_point == tuned["float"]
  assert ft.id != scratch["w4a4_fl8"].id and tuned["float"].id == (
      float_point.id)
  assert tuned["mp:w4a4_fl8"].id != mp.id
  cfg = ft.config(c.base)
  assert (cfg.num_epochs, cfg.learning_rate, cfg.quant) == (1.0, 0.02,
                                                            "w4a4_fl8")
  assert tuned["float"].config(c.base).num_epochs == 3.0
  c.finetune = dict(quant="w2a2")
  with pytest.raises(ValueError, match=r"config.finetune.quant='w2a2' is "
                     "not allowed.*other than model, width, quant"):
    sweep.make_points(c)
  c.finetune, c.quants = None, ("w4a4",)
  with pytest.raises(ValueError, match=r"mixed-precision method\(s\) "
                     r"\['mp', 'mp_hessian'\]"):
    sweep.make_points(c)


def test_ptq_points_depend_on_the_float_point():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      base=dict(num_epochs=1.0), models=(("cifar_resnet8", 0.5),),
      quants=("w4a4", "float"), first_last=(8,),
      methods=("uniform", "pwlq_bc", "rex"), seeds=(0,)))
  points = sweep.make_points(c)
  by_label = {p.label: p for p in points}
  assert sorted(by_label) == ["float", "pwlq_bc:w4a4_fl8", "rex:w4a4_fl8",
                              "w4a4_fl8"]
  uni, pw, float_point = (by_label["w4a4_fl8"], by_label["pwlq_bc:w4a4_fl8"],
                          by_label["float"])
  # PTQ quant spec has no prefix (the method goes in config.ptq) but the id
  # and the curve label tell it from uniform QAT at the same spec.
  assert pw.spec == uni.spec == "w4a4_fl8" and pw.id != uni.id
  assert "pwlq_bc-w4a4_fl8" in pw.id
  assert (pw.kind, uni.kind, float_point.kind) == ("ptq", "qat", "qat")
  assert pw.dependency == float_point and uni.dependency is None
  base = ml_collections.ConfigDict(dict(model="x", width=0.0, quant="",
                                        seed=9, init_from=None))
  cfg = pw.config(base)
  assert cfg.quant == "w4a4_fl8" and cfg.ptq.to_dict() == dict(
      method="pwlq", bias_correction=True)
  assert by_label["rex:w4a4_fl8"].config(base).ptq.to_dict() == dict(
      method="rex", order=2)
  # Scheduling: a PTQ point waits while its float point is to run or running.
  index = {p.id: i for i, p in enumerate(points)}
  i_pw, i_f, i_u = index[pw.id], index[float_point.id], index[uni.id]
  assert sweep._ready([i_pw, i_f], [], points) == i_f  # pylint: disable=protected-access
  running = [sweep._Worker(i_f, 0, None, "", 0.0)]  # pylint: disable=protected-access
  assert sweep._ready([i_pw], running, points) is None  # pylint: disable=protected-access
  assert sweep._ready([i_pw, i_u], running, points) == i_u  # pylint: disable=protected-access
  assert sweep._ready([i_pw], [], points) == i_pw  # pylint: disable=protected-access
  c.quants = ("w4a4",)
  with pytest.raises(ValueError, match=r"PTQ or mixed-precision method\(s\) "
                     r"\['pwlq_bc', 'rex'\].*add 'float' to config.quants"):
    sweep.make_points(c)


def test_frontier_with_ties_and_dominated_points():
  costs = [1, 2, 2, 3, 2, 4, 0.5, 4, 5]
  acc = [.5, .7, .6, .7, .7, .9, .4, .9, .85]
  # (2,.6) and (3,.7) are dominated by (2,.7); the tie (2,.7)/(2,.7) and the
  # tie (4,.9)/(4,.9) stay; (5,.85) is dominated by (4,.9).
  assert pareto.frontier_mask(costs, acc) == [
      True, True, False, False, True, True, True, True, False]
  assert pareto.frontier_mask([], []) == []
  with pytest.raises(ValueError, match="same length"):
    pareto.frontier_mask([1], [])


def record(model, width, quant, seed, acc, macs, weights, bits, method=None):
  p = sweep.Point(model, width, quant, None, method, seed)
  return {"id": p.id, "axes": p.axes, "spec": p.spec, "status": "ok",
          "eval_accuracy": acc, "macs": macs, "bops": macs * bits * bits,
          "weight_bits": weights * bits,
          "config": {"dataset": "fashion_mnist"}}


def test_aggregate_over_seeds_before_the_frontier():
  rows = pareto.summarize([
      record("cifar_resnet8", 0.5, "w4a4", 0, 0.9, 100, 10, 4, "uniform"),
      record("cifar_resnet8", 0.5, "w4a4", 1, 0.5, 100, 10, 4, "uniform"),
      record("cifar_resnet8", 0.5, "w4a4", 1, 0.8, 100, 10, 4, "lsq"),
      record("cifar_resnet8", 0.25, "float", 0, 0.6, 4, 2, 16)])
  by_spec = {r.spec: r for r in rows}
  u = by_spec["w4a4"]
  assert (u.seeds, u.accuracy, u.accuracy_min, u.accuracy_max) == (
      2, pytest.approx(0.7), 0.5, 0.9)
  # On the mean, lsq (0.8) dominates uniform (0.7) at equal cost, although
  # uniform's best seed (0.9) is higher.
  assert not u.on_bops_frontier and not u.on_weight_bits_frontier
  assert by_spec["lsq:w4a4"].on_bops_frontier
  f = by_spec["float"]  # cheaper and worse: on both frontiers
  assert f.on_bops_frontier and f.on_weight_bits_frontier and f.seeds == 1
  # Sorted by BOPs (1024 < 1600), then by accuracy.
  assert [r.spec for r in rows] == ["float", "lsq:w4a4", "w4a4"]
  table = pareto.summary_markdown(rows)
  assert "| cifar_resnet8 | 0.5 | w4a4 | uniform | 2 | 70.00 ± 20.00 |" in \
      table


# ---------------------------------------------------------------------------
# results.jsonl.
# ---------------------------------------------------------------------------

def _append_many(path, barrier, writer, n):
  barrier.wait()  # all writers start at once
  for i in range(n):
    sweep.append_record(path, {"id": f"{writer}-{i}",
                               "pad": "x" * (3000 + 7 * i)})


def test_concurrent_appends_keep_every_line(tmp_path):
  path = tmp_path / "results.jsonl"
  writers, n = 4, 150
  # spawn: forking a process that has JAX loaded can deadlock the child.
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(writers)
  procs = [ctx.Process(target=_append_many, args=(str(path), barrier, w, n))
           for w in range(writers)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(HANG_GUARD_S)
  assert [p.exitcode for p in procs] == [0] * writers
  raw = path.read_bytes().split(b"\n")
  assert raw[-1] == b"" and len(raw) == writers * n + 1
  ids = [json.loads(line)["id"] for line in raw[:-1]]
  assert sorted(ids) == sorted(f"{w}-{i}" for w in range(writers)
                               for i in range(n))


def test_truncated_last_line_is_reported_and_next_append_is_clean(tmp_path):
  path = str(tmp_path / "results.jsonl")
  sweep.append_record(path, {"id": "a", "status": "ok"})
  with open(path, "ab") as f:
    f.write(b'{"id": "b", "stat')  # a writer died mid-line
  records, problems = sweep.read_results(path)
  assert [r["id"] for r in records] == ["a"]
  assert len(problems) == 1 and "truncated last line" in problems[0]
  sweep.append_record(path, {"id": "c", "status": "ok"})
  records, problems = sweep.read_results(path)
  assert [r["id"] for r in records] == ["a", "c"]
  assert len(problems) == 1 and ":2: invalid line" in problems[0]


def test_result_without_line_is_recovered_once_under_the_point_lock(
    tmp_path, monkeypatch):
  point = sweep.Point("cifar_resnet8", 0.25, "w4a4", None, "uniform", 0)
  workdir = pathlib.Path(sweep.point_workdir(str(tmp_path), point))
  workdir.mkdir(parents=True)
  # Killed between result.json and its line.
  (workdir / "result.json").write_text(json.dumps(
      {"eval_accuracy": 0.5, "macs": 1, "bops": 16, "weight_bits": 4}))
  out, waiting, flock = {}, threading.Event(), fcntl.flock

  def blocking_flock_signals(f, op):
    if op == fcntl.LOCK_EX:  # blocking: the non-blocking try found a holder
      waiting.set()
    return flock(f, op)

  def run():
    try:
      out["status"] = sweep.run_point(point, None, str(tmp_path))
    finally:
      waiting.set()  # also where run_point did not wait

  with sweep.point_lock(str(workdir)):  # e.g. an orphaned worker holds it
    monkeypatch.setattr(sweep.fcntl, "flock", blocking_flock_signals)
    t = threading.Thread(target=run)
    t.start()
    assert waiting.wait(HANG_GUARD_S)  # run_point waits for the lock ...
    t.join(0.5)  # (time for a run_point that did not wait to finish)
    assert t.is_alive() and "status" not in out
    assert not (tmp_path / "results.jsonl").exists()
  t.join(HANG_GUARD_S)  # ... and goes on once it is released
  assert not t.is_alive() and out["status"] == "recovered"
  assert sweep.run_point(point, None, str(tmp_path)) == "skipped"
  assert statuses(lines_of(tmp_path), point.id) == ["ok"]


def test_changed_base_is_refused(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(base=dict(num_epochs=2.0), seeds=(0,)))
  sweep.check_and_save_config(c, str(tmp_path))
  c.seeds = (0, 1)  # more points: fine
  sweep.check_and_save_config(c, str(tmp_path))
  c.base.num_epochs = 3.0
  with pytest.raises(ValueError, match=r"config.base.num_epochs: 2.0 saved"):
    sweep.check_and_save_config(c, str(tmp_path))


# ---------------------------------------------------------------------------
# Real sweeps (subprocesses).
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_sweep(fashion_mnist_dir, worker_env, tmp_path_factory):
  """A finished sweep (2 workers) of a good and a failing model, each a
  float point (QAT's runner) and the rtn w4a4 PTQ point that depends on it."""
  tmp = tmp_path_factory.mktemp("failed_sweep")
  config = write_sweep_config(tmp / "sweep_cfg.py", [GOOD, TOO_NARROW], [0],
                              quants=("float", "w4a4"), methods=("rtn",))
  workdir = tmp / "sweep"
  run = subprocess.run(sweep_cmd(config, workdir, fashion_mnist_dir,
                                 "--parallel=2"),
                       env=worker_env, cwd=ROOT, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
  points = sweep.make_points(load_config(config, fashion_mnist_dir))
  return workdir, config, run, points


def test_failing_point_is_recorded_and_the_others_finish(failed_sweep):
  workdir, _, run, points = failed_sweep
  good_float, good_rtn, bad_float, bad_rtn = points
  assert run.returncode == 1, run.stderr[-3000:]
  records = lines_of(workdir)
  for p in (good_float, good_rtn):
    assert statuses(records, p.id) == ["ok"]
    assert (workdir / "points" / p.id / "result.json").exists()
  line = {r["id"]: r for r in records}
  assert line[bad_float.id]["status"] == "failed"
  assert "width=0.04" in line[bad_float.id]["error"]
  assert "Traceback" in line[bad_float.id]["traceback"]
  # The PTQ point of the failed float model fails, naming that point.
  assert line[bad_rtn.id]["status"] == "failed"
  assert (f"DependencyError: the float point {bad_float.id}"
          in line[bad_rtn.id]["error"])
  # The PTQ point quantized its model's float checkpoint: rtn w4a4 with
  # calibrated static input ranges, a result like training's.
  rtn = line[good_rtn.id]
  assert rtn["method"] == "rtn" and rtn["steps"] == 0
  assert rtn["checkpoint"] == str(workdir / "points" / good_float.id)
  assert rtn["bops"] == pytest.approx(line[good_float.id]["bops"] / 16)
  assert (rtn["label"], rtn["kind"]) == ("rtn:w4a4", "ptq")
  assert "[4/4]" in run.stdout and "ETA" in run.stdout
  summary = (workdir / "summary.md").read_text()
  assert f"`{bad_float.id}`: ValueError: width=0.04" in summary
  assert f"`{bad_rtn.id}`: DependencyError" in summary
  assert "| cifar_resnet8 | 0.25 | float | - | 1 |" in summary
  assert "| cifar_resnet8 | 0.25 | w4a4 | rtn (PTQ) | 1 |" in summary


def test_slurm_options_are_checked_and_written_as_sbatch_lines(tmp_path):
  from aqt_ext import slurm  # pylint: disable=g-import-not-at-top
  options = slurm.check_options(dict(
      partition="gpu", time="04:00:00", gpus_per_task=1, mem="16G",
      extra=("--exclusive", "--signal=USR1@90"), points_per_task=2))
  assert options["cpus_per_task"] == 1 and options["max_parallel"] == 0
  script = slurm.array_script(["--config=/c.py"], str(tmp_path),
                              [[0, 2], [4]], options,
                              header=["--array=0-1"], python="py", cwd="/r")
  for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu",
               "#SBATCH --time=04:00:00", "#SBATCH --cpus-per-task=1",
               "#SBATCH --gpus-per-task=1", "#SBATCH --mem=16G",
               "#SBATCH --exclusive", "#SBATCH --signal=USR1@90",
               "POINTS=('0 2' '4')", "cd /r || exit 1",
               f'  py -m aqt_ext.sweep --config=/c.py --workdir={tmp_path} '
               '--point_index="$i" || rc=$?'):
    assert line + "\n" in script
  # Task t of the array runs its points in turn (bash, as sbatch would).
  out = subprocess.run(
      ["bash", "-c", script.replace("py -m aqt_ext.sweep", "echo")
       .replace("cd /r", f"cd {tmp_path}")],
      env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True,
      text=True, check=True).stdout
  assert out.splitlines() == [
      f"--config=/c.py --workdir={tmp_path} --point_index={i}" for i in (0, 2)]
  for bad, match in (
      (dict(partiton="x"), r"config.slurm.partiton is not a SLURM option; "
       r"allowed: partition, time"),
      (dict(time="4 hours"), r"config.slurm.time='4 hours' is not allowed; "
       r"allowed: a time limit"),
      (dict(cpus_per_task=0), r"cpus_per_task=0 is not allowed"),
      (dict(extra=("--array=0-3",)), r"sets --array, which the driver sets"),
      (dict(extra="--exclusive"), r"config.slurm.extra='--exclusive' is not "
       r"allowed; allowed: a list")):
    with pytest.raises(ValueError, match=match):
      slurm.check_options(bad)


def _wait_for(what, condition, proc=None):
  """Polls `condition` (a hang guard, not a speed limit)."""
  deadline = time.time() + HANG_GUARD_S
  while not (value := condition()):
    assert proc is None or proc.poll() is None, f"{what}: the driver ended"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.1)
  return value


class HeldPointLock:
  """Holds a point's lock: its worker starts (its task RUNNING), then waits
  until `release`."""

  def __init__(self, workdir, point):
    lock_dir = workdir / "points" / point.id
    lock_dir.mkdir(parents=True, exist_ok=True)
    self.file = open(lock_dir / "lock", "a")  # pylint: disable=consider-using-with
    fcntl.flock(self.file, fcntl.LOCK_EX)

  def release(self):
    self.file.close()


def test_slurm_executor_through_requeue_cancel_and_a_killed_driver(
    failed_sweep, slurm_cluster, fashion_mnist_dir, worker_env, tmp_path):
  """The 4 points of `failed_sweep` (2 fail by design) on a real SLURM
  cluster: the float point resumes from a checkpoint, is requeued while it
  runs, and the driver is SIGKILLed; the rerun driver follows the arrays
  instead of submitting again; one running task is cancelled; a third run
  retries what failed. Each point has exactly one ok line, with the
  accuracy of the local run."""
  local_dir, _, _, points = failed_sweep
  good_float, good_rtn, bad_float, bad_rtn = points
  config = write_sweep_config(
      tmp_path / "sweep_cfg.py", [GOOD, TOO_NARROW], [0],
      quants=("float", "w4a4"), methods=("rtn",),
      slurm=dict(time="00:30:00", cpus_per_task=1, poll_s=0.2))
  workdir = tmp_path / "sweep"
  # The float point starts from a copy of the local run's checkpoint of
  # step 28 of 32 (its final one deleted), so it resumes there.
  src = local_dir / "points" / good_float.id
  dst = workdir / "points" / good_float.id
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
  (dst / "result.json").unlink()
  shutil.rmtree(dst / "checkpoints" / "32")
  assert (dst / "checkpoints" / "28").is_dir()
  env = {**worker_env, **slurm_cluster.env}
  cmd = sweep_cmd(config, workdir, fashion_mnist_dir, "--executor=slurm")

  def sub(n):
    path = workdir / "slurm" / f"sub-{n}.json"
    return json.loads(path.read_text()) if path.exists() else None

  def task_of(s, point):
    index = points.index(point)
    return f"{s['job_id']}_{[index in t for t in s['tasks']].index(True)}"

  def state(task):
    out = slurm_cluster.run("squeue", "-h", "-j", task, "-o", "%T")
    return out.strip()

  # Both tasks of the first array run, blocked on their points' locks, when
  # the float one is requeued and the driver killed; they stay blocked until
  # the second driver has looked at the queue, so it finds all 4 points
  # there.
  locks = [HeldPointLock(workdir, p) for p in (good_float, bad_float)]
  driver = subprocess.Popen(cmd, env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
  first = _wait_for("the first array", lambda: (s := sub(0)) and
                    s["job_id"] and s, driver)
  assert sorted(map(tuple, first["point_ids"])) == sorted(
      [(good_float.id,), (bad_float.id,)])
  second = _wait_for("the second array", lambda: (s := sub(1)) and
                     s["job_id"] and s, driver)
  assert second["depends_on"] == [first["job_id"]]
  float_task = task_of(first, good_float)
  for task in (float_task, task_of(first, bad_float)):
    _wait_for(f"task {task} to run", lambda t=task: state(t) == "RUNNING",
              driver)
  float_log = workdir / "slurm" / f"{float_task}.out"
  _wait_for("the float point's worker to wait for its lock", lambda:
            float_log.exists() and "waiting for another process running"
            in float_log.read_text(), driver)
  slurm_cluster.run("scontrol", "requeue", float_task)
  _wait_for("the requeue", lambda: state(float_task) == "PENDING", driver)
  os.killpg(driver.pid, signal.SIGKILL)
  driver.communicate()

  rtn_lock = HeldPointLock(workdir, good_rtn)
  rerun = subprocess.Popen(cmd, env=env, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seen = []
  while not (seen and " in SLURM" in seen[-1]):  # its view of the queue
    seen.append(rerun.stdout.readline())
    assert seen[-1], "".join(seen)
  for lock in locks:  # the requeued task runs the float point now
    lock.release()
  rtn_task = task_of(second, good_rtn)
  _wait_for("the rtn task to run", lambda: state(rtn_task) == "RUNNING",
            rerun)
  slurm_cluster.run("scancel", rtn_task)
  rtn_lock.release()
  out, _ = rerun.communicate(timeout=HANG_GUARD_S)
  out = "".join(seen) + out
  assert rerun.returncode == 1, out[-3000:]
  assert f"following the SLURM array(s) {first['job_id']}, " \
         f"{second['job_id']}" in out
  assert "submitted SLURM array" not in out and sub(2) is None
  line = sweep.latest_records(lines_of(workdir))
  assert line[good_float.id]["status"] == "ok"
  assert line[good_float.id]["resumed_from_step"] == 28
  assert line[good_rtn.id]["status"] == "failed"
  assert f"SLURM task {rtn_task} ended (CANCELLED" in \
      line[good_rtn.id]["error"]
  assert "width=0.04" in line[bad_float.id]["error"]
  # Both runs of the requeued task are in its log (appended, not replaced).
  log = float_log.read_text()
  assert log.count(f"point 0: {good_float.id}") == 2
  assert "DUE TO JOB REQUEUE" in log and log.count("point 0: ok") == 1

  # The third run retries the cancelled and the failed points.
  third = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
  assert third.returncode == 1, third.stdout[-3000:] + third.stderr[-3000:]
  assert "4 points, 1 finished, 3 in SLURM" in third.stdout
  records = lines_of(workdir)
  local = sweep.latest_records(lines_of(local_dir))
  for p in (good_float, good_rtn):
    assert statuses(records, p.id).count("ok") == 1
    mine = sweep.latest_records(records)[p.id]
    assert mine["eval_accuracy"] == local[p.id]["eval_accuracy"]
    assert mine["eval_loss"] == local[p.id]["eval_loss"]
  for p in (bad_float, bad_rtn):
    assert "ok" not in statuses(records, p.id)
  summary = (workdir / "summary.md").read_text()
  assert "| cifar_resnet8 | 0.25 | w4a4 | rtn (PTQ) | 1 |" in summary


def test_sigkill_and_rerun_loses_and_duplicates_no_point(
    fashion_mnist_dir, worker_env, tmp_path):
  # 2 float points of 32 steps each (as failed_sweep's: compiled already),
  # one worker: kill everything while the second trains, after the first
  # finished.
  config = write_sweep_config(tmp_path / "sweep_cfg.py", [GOOD], [0, 1],
                              quants=("float",))
  first, second = sweep.make_points(load_config(config, fashion_mnist_dir))
  workdir = tmp_path / "sweep"
  cmd = sweep_cmd(config, workdir, fashion_mnist_dir, "--parallel=1")
  proc = subprocess.Popen(cmd, env=worker_env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  ckpts = workdir / "points" / second.id / "checkpoints"
  deadline = time.time() + HANG_GUARD_S
  while time.time() < deadline and proc.poll() is None:
    if any(p.name.isdigit() for p in ckpts.glob("*")):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "sweep ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker
  proc.wait()
  assert statuses(lines_of(workdir), first.id) == ["ok"]
  assert not (workdir / "points" / second.id / "result.json").exists()

  rerun = subprocess.run(cmd, env=worker_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "2 points, 1 finished, 1 to run" in rerun.stdout
  records = lines_of(workdir)
  assert sorted(r["id"] for r in records) == sorted([first.id, second.id])
  assert all(r["status"] == "ok" for r in records)
  resumed = [r for r in records if r["id"] == second.id][0]
  assert resumed["resumed_from_step"] >= 4 and resumed["steps"] == 32


def test_analyze_only_redraws_from_results(tmp_path, worker_env):
  path = str(tmp_path / "results.jsonl")
  sizes = [("cifar_resnet8", 0.25, 1e6, 2e4), ("cifar_resnet8", 0.5, 4e6, 8e4),
           ("cifar_resnet14", 0.5, 7e6, 15e4)]
  acc = {("float", 0.25): .81, ("float", 0.5): .86, ("float", 14): .89,
         ("w4a4", 0.25): .72, ("w4a4", 0.5): .845, ("w4a4", 14): .875}
  for model, width, macs, weights in sizes:
    for quant, bits in (("float", 16), ("w4a4", 4)):
      key = (quant, 14 if model == "cifar_resnet14" else width)
      for seed, delta in ((0, -0.01), (1, 0.01)):
        sweep.append_record(path, record(
            model, width, quant, seed, acc[key] + delta, macs, weights, bits,
            None if quant == "float" else "uniform"))
  bad = sweep.Point("cifar_resnet8", 0.04, "w4a4", None, "uniform", 0)
  sweep.append_record(path, {"id": bad.id, "axes": bad.axes,
                             "status": "failed", "error": "ValueError: x"})
  with open(path, "ab") as f:
    f.write(b'{"id": "cut')
  for name in pareto.REPORT_FILES:
    (tmp_path / name).write_text("stale")
  run = subprocess.run([sys.executable, "-m", "aqt_ext.sweep",
                        f"--workdir={tmp_path}", "--analyze_only"],
                       env=worker_env, cwd=ROOT, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "truncated last line" in run.stderr
  summary = (tmp_path / "summary.md").read_text()
  assert run.stdout == summary
  assert summary.count("| cifar_resnet") == 6
  assert "| cifar_resnet14 | 0.5 | w4a4 | uniform | 2 | 87.50 ± 1.00 |" in \
      summary
  assert f"`{bad.id}`: ValueError: x" in summary
  csv_rows = (tmp_path / "frontier.csv").read_text().splitlines()
  # Frontier: the three w4a4 models, then float resnet14.
  assert [r.split(",")[6] for r in csv_rows[1:]] == ["w4a4"] * 3 + ["float"]
  assert csv_rows[-1].startswith("cifar_resnet14,0.5,float,,,qat,float,2,")
  assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(tmp_path.glob("*.tmp"))


def test_a_points_latest_line_wins(tmp_path):
  """A point that failed, then succeeded, is ok (and one that succeeded,
  then failed, is failed): the last line of a point id is its state, for
  `latest_records`, `is_finished` and the report."""
  path = str(tmp_path / sweep.RESULTS_FILE)
  retried = record("cifar_resnet8", 0.25, "w4a4", 0, 0.8, 1e6, 2e4, 4,
                   "uniform")
  broke = record("cifar_resnet8", 0.5, "w4a4", 0, 0.85, 4e6, 8e4, 4,
                 "uniform")
  sweep.append_record(path, {**retried, "status": "failed",
                             "error": "RuntimeError: first try"})
  sweep.append_record(path, broke)
  sweep.append_record(path, retried)
  sweep.append_record(path, {**broke, "status": "failed",
                             "error": "RuntimeError: second try"})
  records, problems = sweep.read_results(path)
  assert not problems and len(records) == 4
  latest = sweep.latest_records(records)
  assert latest[retried["id"]] == retried
  assert latest[broke["id"]]["status"] == "failed"
  assert latest[broke["id"]]["error"] == "RuntimeError: second try"
  points = {r["id"]: sweep.Point("cifar_resnet8", w, "w4a4", None, "uniform",
                                 0) for r, w in ((retried, 0.25), (broke, 0.5))}
  assert set(points) == {retried["id"], broke["id"]}
  for point in points.values():  # both have a result.json
    os.makedirs(sweep.point_workdir(str(tmp_path), point))
    with open(os.path.join(sweep.point_workdir(str(tmp_path), point),
                           "result.json"), "w") as f:
      f.write("{}")
  assert sweep.is_finished(str(tmp_path), points[retried["id"]], latest)
  assert not sweep.is_finished(str(tmp_path), points[broke["id"]], latest)
  summary = sweep.analyze(str(tmp_path))
  assert f"`{broke['id']}`: RuntimeError: second try" in summary
  assert f"`{retried['id']}`" not in summary and "first try" not in summary
  assert "| cifar_resnet8 | 0.25 | w4a4 | uniform | 1 | 80.00" in summary
