"""Pareto sweeps: train every (model size, bit width, method, seed) point.

After "Pareto-Optimal Quantized ResNet Is Mostly 4-bit": for a compute budget,
which bit width and model size give the best accuracy? A sweep config
(``configs/sweep_*.py``, `get_config()`) has

* ``base``: a training config (``configs/base.py`` fields);
* axes ``models`` ((name, width) pairs), ``quants`` ('float', 'bf16' or W/A
  pairs such as 'w8a8', 'w4a4', 'w4a8'), ``first_last`` (None, or the bits of
  the first and last layer: 8 appends '_fl8' to the spec), ``methods`` (keys of
  `METHODS`: the QAT quantizers 'uniform', 'lsq', 'pact', 'dq', ... and the
  PTQ methods of `PTQ_METHODS`, 'rtn', 'pwlq', 'pwlq_bc', 'rex', ...) and
  ``seeds``.

The points are the cartesian product (an unquantized point ignores method and
first/last, so it appears once per model and seed). Each has a stable id, a
readable slug plus a hash of its axes (``cifar_resnet8-x0.5-lsq-w4a4_fl8-s0-
1a2b3c4d``), and its own workdir. Each method names a runner kind; `RUNNERS`
maps kinds to functions ``(training config, workdir) -> result``. QAT is
`train.train_and_evaluate`. A PTQ point (`aqt_ext.ptq.pipeline.run_ptq`)
quantizes the checkpoint of the sweep's float point with the same model,
width and seed, so PTQ and QAT land in one table and plot: a sweep with a PTQ
method must have 'float' among its quants. The local executor starts a PTQ
point once its float point has finished; a worker given a PTQ point whose
float point has not finished runs that first (under the float point's lock,
so a SLURM task never trains it twice) and records both.

Layout of ``--workdir=DIR``::

  DIR/results.jsonl        one JSON line per finished (or failed) point
  DIR/points/<id>/         the point's training workdir: checkpoints,
                           result.json, log.txt (worker output), lock
  DIR/sweep_config.json    the sweep config of the first run (a rerun with
                           another ``base`` is refused)
  DIR/jax_cache/           persistent XLA compilation cache, shared by points
  DIR/summary.md, DIR/frontier.csv, DIR/pareto.png   the analysis (pareto.py)

CLI::

  python -m aqt_ext.sweep --config=configs/sweep_quick.py --workdir=DIR \\
      [--parallel=N] [--config.base.num_epochs=2 ...]
  python -m aqt_ext.sweep --workdir=DIR --analyze_only
  python -m aqt_ext.sweep --config=... --workdir=DIR --point_index=I

The first form runs all unfinished points in N worker processes (default: the
CPU count on CPU, one per GPU on GPUs, each pinned to its GPU), then writes the
analysis. Each worker is the third form, run as a subprocess with the same
``--config`` flags (pass overrides as ``--config.field=value``), its output in
the point's log.txt. ``--analyze_only`` redraws the analysis from
results.jsonl. ``--point_index=I`` runs point I alone (one SLURM array task).

Kill-and-rerun safety. Rerunning the same command continues the sweep:

* A point is finished iff its result.json exists and its latest line in
  results.jsonl has status ok; finished points are skipped. Interrupted points
  resume from their latest checkpoint (same workdir). Failed points (a line
  with status 'failed' and the error) are retried; the others go on.
* A worker holds an exclusive lock (fcntl.flock) on its point's lock file from
  the finished check to its line, so one point never runs twice at once, even
  with a worker orphaned by a killed driver still running, or concurrent
  SLURM tasks. Under that lock a result.json without its line (a kill between
  the two writes) gets its line appended instead of training again.
* Lines are appended under an exclusive flock of results.jsonl, one
  ``os.write`` of the whole line, then fsync; readers take a shared lock. A
  line cut by a crash is reported and skipped by readers, and the next append
  starts on a new line.
* The analysis files are written atomically (temp file + os.replace).

Beyond one machine: ``--executor=slurm`` submits the unfinished points to a
SLURM scheduler as job arrays, with the resources of the sweep config's
optional ``slurm`` field (partition, time, cpus_per_task, gpus_per_task,
gres, mem, account, ...; `aqt_ext.slurm.OPTIONS`), follows them with squeue
and writes the same results and analysis; the sweep directory must be on a
file system the nodes share (with flock)::

  python -m aqt_ext.sweep --config=configs/sweep_fashion_mnist.py \\
      --workdir=/shared/sweep --executor=slurm

A killed driver's arrays keep running; rerunning it follows them instead of
submitting them again, then submits what failed or was cancelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections

from aqt_ext import fileio, pareto, slurm
from aqt_ext.config import MAX_BITS, MIN_BITS, QUANT_METHODS

RESULTS_FILE = "results.jsonl"
POINTS_DIR = "points"
SWEEP_CONFIG_FILE = "sweep_config.json"
JAX_CACHE_DIR = "jax_cache"
EXIT_POINT_FAILED = 3  # a worker's exit status after recording a failure
UNQUANTIZED = ("float", "bf16")
# A quants value: W/A bits or fp8, then `config.parse_spec`'s optional
# ``_static`` (static input ranges), ``_rR`` (the zoo's residual adds
# quantized to R bits) and ``_gG[sr]`` (a quantized backward pass), e.g.
# 'w8a8_g8', 'fp8_delayed_ge5m2', 'w4a4_static_r8'. The first/last bits go
# between the forward part and these (`Point.spec`).
_QUANT_RE = re.compile(r"^(?P<fwd>w(\d+|f)a(\d+|f)|fp8(?:_e4m3|_e5m2)?"
                       r"(?:_delayed)?)"
                       r"(?P<static>_static)?(?P<res>_r\d+)?"
                       r"(?P<grads>_g(?:\d+|e4m3|e5m2)(?:sr)?)?$")


def _methodless(quant: str) -> bool:
  """Whether a quants value ignores the method and first/last axes: the
  unquantized ones and fp8 (one quantizer, every layer)."""
  return quant in UNQUANTIZED or quant.startswith("fp8")


# ---------------------------------------------------------------------------
# Methods and runners.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
  """A value of the ``methods`` axis.

  Attributes:
    kind: key of `RUNNERS` that runs the method's points.
    quant_prefix: method prefix of the quant spec (None: no prefix).
    ptq: for kind 'ptq', the ``config.ptq`` fields it sets (method first);
      for kind 'mp', the ``config.mp`` fields (`run_mp`).
  """

  kind: str
  quant_prefix: str | None = None
  ptq: tuple[tuple[str, Any], ...] = ()


def run_qat(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Quantization-aware training: `train.train_and_evaluate`."""
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


def run_ptq(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Post-training quantization of the float checkpoint in
  ``config.init_from`` by ``config.ptq`` (`aqt_ext.ptq.pipeline.run_ptq`)."""
  from aqt_ext.ptq import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.run_ptq(pipeline.with_ptq_defaults(config), None, workdir)


MP_DIR = "mp"  # a mixed-precision point's allocation, in its workdir


def run_mp(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Mixed precision: per-layer widths allocated on the float checkpoint in
  ``config.init_from`` within the BOPs of the uniform spec ``config.quant``
  (``python -m aqt_ext.mixed_precision``, options ``config.mp``), written
  to ``workdir/mp/``, then QAT fine-tuning of the float model with those
  rules. A rerun after an interruption keeps the allocation it made and
  resumes the training from its checkpoint."""
  from aqt_ext import mixed_precision, train  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, MP_DIR)
  rules = os.path.join(out, mixed_precision.RULES_FILE)
  record_path = os.path.join(out, mixed_precision.ALLOCATION_FILE)
  if not os.path.exists(record_path):
    mixed_precision.run(config, config.init_from, out,
                        budget_from=config.quant, command="sweep point",
                        **config.mp.to_dict())
  with open(record_path) as f:
    record = json.load(f)
  c = config.copy_and_resolve_references()
  c.quant = rules
  result = train.train_and_evaluate(c, workdir)
  result["mp"] = {k: record[k] for k in (
      "method", "budget_from", "budget_bops", "bops", "objective",
      "sensitivity_time_s")}
  result["mp"]["widths"] = {r["layer"]: [r["weight_bits"], r["input_bits"]]
                            for r in record["layers"]}
  fileio.write_json_atomic(os.path.join(workdir, "result.json"), result)
  return result


Runner = Callable[[ml_collections.ConfigDict, str], dict]
# A runner trains and/or quantizes, evaluates, writes workdir/result.json
# atomically (keys as train.train_and_evaluate's) and returns that result.
RUNNERS: dict[str, Runner] = {"qat": run_qat, "ptq": run_ptq, "mp": run_mp}
# PTQ methods quantize the sweep's float point of the same model, width and
# seed (it runs first); options not named keep `pipeline.ptq_defaults()`.
PTQ_METHODS: dict[str, dict[str, Any]] = {
    "rtn": dict(method="rtn"),
    "rtn_full": dict(method="rtn", grid="full"),  # 2^b levels
    "pwlq": dict(method="pwlq"),
    "pwlq_bc": dict(method="pwlq", bias_correction=True),
    "rex": dict(method="rex", order=2),
    "rex_sparse": dict(method="rex", order=2, sparsity=0.5),
    "aquant": dict(method="aquant"),
}
METHODS: dict[str, Method] = {
    **{m: Method("qat", None if m == "uniform" else m)
       for m in QUANT_METHODS},
    **{m: Method("ptq", ptq=tuple(o.items())) for m, o in PTQ_METHODS.items()},
    # Mixed precision within the BOPs of the point's uniform spec, allocated
    # from the float point of the same model, width and seed, then
    # fine-tuned (`run_mp`); the two sensitivity estimates.
    "mp": Method("mp", ptq=(("method", "loss_delta"),)),
    "mp_hessian": Method("mp", ptq=(("method", "hessian"),)),
    # Without 2-bit candidates (QAT recovers 2-bit layers badly).
    "mp_min3": Method("mp", ptq=(("method", "loss_delta"),
                                 ("bits", (3, 4, 8)))),
}
_FROM_FLOAT = ("ptq", "mp")  # kinds that start from the sweep's float point


# ---------------------------------------------------------------------------
# Points.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
  """One training run of a sweep: its axis values."""

  model: str
  width: float
  quant: str
  first_last: int | None
  method: str | None  # None for an unquantized quant
  seed: int
  # Training-config overrides of a point fine-tuned from its float point
  # (the sweep's ``finetune``; mixed-precision points always start there).
  finetune: tuple[tuple[str, Any], ...] = ()

  @property
  def spec(self) -> str:
    """The quant spec (`config.parse_spec`), e.g. ``lsq:w4a4_fl8``; a PTQ
    point's has no method prefix (its method is in ``config.ptq``)."""
    if _methodless(self.quant):
      return self.quant
    prefix = METHODS[self.method].quant_prefix
    fl = f"_fl{self.first_last}" if self.first_last is not None else ""
    m = _QUANT_RE.match(self.quant)
    return ((f"{prefix}:" if prefix else "") + m.group("fwd") + fl
            + "".join(m.group(g) or "" for g in ("static", "res", "grads")))

  @property
  def kind(self) -> str:
    """The runner kind (a key of `RUNNERS`)."""
    return "qat" if self.method is None else METHODS[self.method].kind

  @property
  def label(self) -> str:
    """The spec, with the method in front for PTQ (``pwlq_bc:w4a4_fl8``):
    one curve of the plot per label."""
    if self.kind in _FROM_FLOAT:
      return f"{self.method}:{self.spec}"
    return f"ft:{self.spec}" if self.finetune else self.spec

  @property
  def starts_from_float(self) -> bool:
    return self.kind in _FROM_FLOAT or bool(self.finetune)

  @property
  def dependency(self) -> Point | None:
    """The point whose checkpoint this one needs: the float point (same
    model, width and seed) of a PTQ, mixed-precision or fine-tuned point;
    None for a point trained from scratch."""
    if not self.starts_from_float:
      return None
    return Point(self.model, self.width, "float", None, None, self.seed)

  @property
  def axes(self) -> dict[str, Any]:
    axes = dataclasses.asdict(self)
    if not self.finetune:
      del axes["finetune"]  # the ids of points trained from scratch
    else:
      axes["finetune"] = [list(kv) for kv in self.finetune]
    return axes

  @property
  def id(self) -> str:
    """Readable slug plus a hash of the axes; stable across runs."""
    digest = hashlib.sha1(json.dumps(self.axes, sort_keys=True).encode())
    slug = f"{self.model}-x{self.width:g}-{self.label}-s{self.seed}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", slug) + "-" + digest.hexdigest()[:8]

  def config(self, base: ml_collections.ConfigDict
             ) -> ml_collections.ConfigDict:
    """The training config: `base` with this point's values (a PTQ point:
    plus ``ptq`` with its method's options; ``init_from`` is set to the
    float point's workdir when it runs)."""
    c = base.copy_and_resolve_references()
    c.model, c.width, c.quant, c.seed = (self.model, self.width, self.spec,
                                         self.seed)
    if self.kind == "ptq":
      with c.unlocked():
        c.ptq = ml_collections.ConfigDict(dict(METHODS[self.method].ptq))
    if self.kind == "mp":
      with c.unlocked():
        c.mp = ml_collections.ConfigDict(dict(METHODS[self.method].ptq))
    for k, v in self.finetune:
      c[k] = v
    return c


def _field_error(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"config.{field}={value!r} is not allowed; allowed: "
                    f"{allowed}")


def _check_sweep(sweep: ml_collections.ConfigDict) -> None:
  """Checks `base` and every axis value, naming the field and the allowed
  values."""
  from aqt_ext import models  # pylint: disable=g-import-not-at-top
  if not isinstance(sweep.get("base"), ml_collections.ConfigDict):
    raise ValueError("config.base must be a training ConfigDict (the fields "
                     "of configs/base.py)")
  for axis in ("models", "quants", "first_last", "methods", "seeds"):
    if axis not in sweep or not sweep[axis]:
      raise ValueError(f"config.{axis} must be a non-empty list")
  for i, entry in enumerate(sweep.models):
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or entry[0] not in models.MODELS
        or isinstance(entry[1], bool)
        or not isinstance(entry[1], (int, float)) or not entry[1] > 0):
      raise _field_error(f"models[{i}]", entry, "(name, width) with name in "
                         f"{', '.join(map(repr, models.MODELS))} and width > 0")
  for i, q in enumerate(sweep.quants):
    if q not in UNQUANTIZED and not (isinstance(q, str)
                                     and _QUANT_RE.match(q)):
      raise _field_error(f"quants[{i}]", q, "'float', 'bf16', 'wWaA' with W,"
                         f" A in {MIN_BITS}..{MAX_BITS} or 'f' (the method "
                         "goes in config.methods, first/last bits in "
                         "config.first_last), or 'fp8[_e4m3|_e5m2][_delayed]'; either "
                         "quantized form may end in '_static' (static input "
                         "ranges), '_rR' (residual adds at R bits) and a "
                         "quantized backward pass '_gG[sr]' with G bits, "
                         "'e4m3' or 'e5m2', in that order")
  for i, fl in enumerate(sweep.first_last):
    if fl is not None and (isinstance(fl, bool) or fl not in range(
        MIN_BITS, MAX_BITS + 1)):
      raise _field_error(f"first_last[{i}]", fl,
                         f"None or an int in {MIN_BITS}..{MAX_BITS}")
  for i, m in enumerate(sweep.methods):
    if m not in METHODS:
      raise _field_error(f"methods[{i}]", m, ", ".join(map(repr, METHODS)))
  finetune = sweep.get("finetune")
  if finetune is not None:
    if not isinstance(finetune, (dict, ml_collections.ConfigDict)):
      raise _field_error("finetune", finetune, "None or a dict of "
                         "config.base fields")
    for k in dict(finetune):
      if k not in sweep.base or k in ("model", "width", "quant", "seed",
                                      "init_from"):
        raise _field_error(f"finetune.{k}", dict(finetune)[k],
                           "a field of config.base other than model, width, "
                           "quant, seed and init_from")
  if sweep.get("slurm") is not None:
    slurm.check_options(dict(sweep.slurm))
  for i, s in enumerate(sweep.seeds):
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise _field_error(f"seeds[{i}]", s, "an int >= 0")


def make_points(sweep: ml_collections.ConfigDict) -> list[Point]:
  """The validated cartesian product of the axes, duplicates dropped.

  Order: models, quants, first_last, methods, seeds (seeds vary fastest); a
  point's index in this list is its ``--point_index``.
  """
  from aqt_ext import models  # pylint: disable=g-import-not-at-top
  _check_sweep(sweep)
  finetune = tuple(sorted(dict(sweep.get("finetune") or {}).items()))
  points: dict[str, Point] = {}
  for (model, width), quant, fl, method, seed in itertools.product(
      sweep.models, sweep.quants, sweep.first_last, sweep.methods,
      sweep.seeds):
    methodless = _methodless(quant)
    kind = None if methodless else METHODS[method].kind
    m = None if quant in UNQUANTIZED else _QUANT_RE.match(quant)
    if kind == "ptq" and m.group("grads"):
      raise ValueError(
          f"config.quants has {quant!r}, a quantized backward pass, and "
          f"config.methods the PTQ method {method!r}, which does not train; "
          "allowed with a gradient suffix: the QAT methods")
    if kind in _FROM_FLOAT and (m.group("static") or m.group("res")):
      raise ValueError(
          f"config.quants has {quant!r} ('_static' / '_rR') and "
          f"config.methods the {kind} method {method!r}, which calibrates "
          "its own ranges and quantizes no residual add; allowed with these "
          "suffixes: the QAT methods")
    p = Point(model, float(width), quant, None if methodless else fl,
              None if methodless else method, seed)
    if finetune and quant not in UNQUANTIZED and p.kind in ("qat", "mp"):
      p = dataclasses.replace(p, finetune=finetune)
    try:
      models.quant_spec(p.spec)  # the zoo's first/last/residual regexes
    except ValueError as e:
      raise ValueError(f"config.quants / config.methods / config.first_last "
                       f"give the invalid spec {p.spec!r}: {e}") from None
    points.setdefault(p.id, p)
  ptq = sorted({m for m in sweep.methods if METHODS[m].kind in _FROM_FLOAT})
  if ptq and "float" not in sweep.quants:
    raise ValueError(f"config.methods has the PTQ or mixed-precision "
                     f"method(s) {ptq}, which start from the sweep's float "
                     "model: add 'float' to config.quants")
  if finetune and "float" not in sweep.quants:
    raise ValueError("config.finetune fine-tunes the sweep's float model: "
                     "add 'float' to config.quants")
  return list(points.values())


# ---------------------------------------------------------------------------
# results.jsonl: locked appends, tolerant reads.
# ---------------------------------------------------------------------------

def append_record(path: str, record: Mapping[str, Any]) -> None:
  """Appends `record` as one JSON line: exclusive flock, one write, fsync.

  If the file does not end with a newline (a writer died mid-line), the line
  starts with one, so only the cut line is lost.
  """
  line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
      line = b"\n" + line
    written = os.write(fd, line)
    while written < len(line):  # only on a short write (e.g. a full disk)
      written += os.write(fd, line[written:])
    os.fsync(fd)
  finally:
    os.close(fd)  # releases the lock


def read_results(path: str) -> tuple[list[dict], list[str]]:
  """All valid lines of results.jsonl (under a shared lock), and a problem
  message per line that is not valid JSON (e.g. cut by a crash)."""
  if not os.path.exists(path):
    return [], []
  with open(path, "rb") as f:
    fcntl.flock(f, fcntl.LOCK_SH)
    data = f.read()
  records, problems = [], []
  lines = data.split(b"\n")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "id" not in record:
        raise ValueError("not a record")
      records.append(record)
    except ValueError:
      where = ("truncated last line" if number == len(lines)
               else "invalid line")
      problems.append(f"{path}:{number}: {where} ignored "
                      f"({len(line)} bytes: {line[:60]!r}...)")
  return records, problems


def latest_records(records: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
  """The last line of each point id."""
  return {r["id"]: dict(r) for r in records}


def point_workdir(sweep_dir: str, point: Point) -> str:
  return os.path.join(sweep_dir, POINTS_DIR, point.id)


def is_finished(sweep_dir: str, point: Point,
                latest: Mapping[str, Mapping[str, Any]]) -> bool:
  """result.json exists and the point's latest line has status ok."""
  return (latest.get(point.id, {}).get("status") == "ok" and os.path.exists(
      os.path.join(point_workdir(sweep_dir, point), "result.json")))


# ---------------------------------------------------------------------------
# One point (a worker process).
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def point_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive flock on ``workdir/lock`` (waits for its holder)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock"), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process running {workdir}", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


def point_line(point: Point, status: str, **fields) -> dict:
  return {**fields, "id": point.id, "axes": point.axes, "spec": point.spec,
          "label": point.label, "kind": point.kind, "status": status,
          "recorded_at": time.time()}


class DependencyError(RuntimeError):
  """The point a PTQ point quantizes did not finish."""


def _point_config(point: Point, base: ml_collections.ConfigDict,
                  sweep_dir: str) -> ml_collections.ConfigDict:
  """`point`'s config; a PTQ point's float point is run first if it has not
  finished (under its own lock, so never twice) and becomes ``init_from``."""
  config = point.config(base)
  dep = point.dependency
  if dep is not None:
    status = run_point(dep, base, sweep_dir)
    if status not in ("ok", "skipped", "recovered"):
      raise DependencyError(
          f"the float point {dep.id} that this point starts from failed; "
          f"see {os.path.join(point_workdir(sweep_dir, dep), 'log.txt')} or "
          f"its line in {RESULTS_FILE}")
    config.init_from = point_workdir(sweep_dir, dep)
  return config


def run_point(point: Point, base: ml_collections.ConfigDict,
              sweep_dir: str) -> str:
  """Runs `point` unless finished; appends its line. Returns its status:
  'skipped' (finished already), 'ok', 'recovered' (result.json found without
  its line; line appended) or 'failed' (line with the error appended)."""
  results = os.path.join(sweep_dir, RESULTS_FILE)
  workdir = point_workdir(sweep_dir, point)
  with point_lock(workdir):
    latest = latest_records(read_results(results)[0])
    if is_finished(sweep_dir, point, latest):
      return "skipped"
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
      with open(result_path) as f:
        append_record(results, point_line(point, "ok", **json.load(f)))
      return "recovered"
    try:
      result = RUNNERS[point.kind](_point_config(point, base, sweep_dir),
                                   workdir)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      append_record(results, point_line(
          point, "failed", error=f"{type(e).__name__}: {e}",
          traceback=traceback.format_exc()))
      return "failed"
    append_record(results, point_line(point, "ok", **result))
    return "ok"


# ---------------------------------------------------------------------------
# Sweep config on disk.
# ---------------------------------------------------------------------------

def _plain(config: ml_collections.ConfigDict) -> dict:
  """JSON-compatible dict (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def check_and_save_config(sweep: ml_collections.ConfigDict,
                          sweep_dir: str) -> None:
  """Refuses a ``base`` other than the saved one (finished points would mix
  training budgets), else saves the sweep config as sweep_config.json."""
  path = os.path.join(sweep_dir, SWEEP_CONFIG_FILE)
  current = _plain(sweep)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get("base", {})
    diff = sorted(k for k in set(saved) | set(current["base"])
                  if saved.get(k) != current["base"].get(k))
    if diff:
      details = "; ".join(f"config.base.{k}: {saved.get(k)!r} saved, "
                          f"{current['base'].get(k)!r} now" for k in diff)
      raise ValueError(
          f"{sweep_dir} holds a sweep with another training config "
          f"({details}). Use another --workdir, or delete {path} to mix "
          "them knowingly.")
  pareto.write_bytes_atomic(path, json.dumps(current, indent=2,
                                             sort_keys=True).encode())


# ---------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------

# What the analysis reads from a line with status 'ok' (`pareto.aggregate`):
# these fields, numbers among them, and `pareto.CONFIG_AXES` in ``axes``.
OK_FIELDS = ("axes", "spec", "eval_accuracy", "macs", "bops", "weight_bits")
_NUMERIC_OK_FIELDS = ("eval_accuracy", "macs", "bops", "weight_bits")


def analysis_problem(record: Mapping[str, Any]) -> str | None:
  """Why a line of results.jsonl cannot be analysed, or None: a line with
  status 'ok' that lacks a field of `OK_FIELDS` (or an axis) or whose
  accuracy or cost is not a number."""
  if record.get("status") != "ok":
    return None
  missing = [f for f in OK_FIELDS if f not in record]
  axes = record.get("axes")
  if isinstance(axes, dict):
    missing += [f"axes.{k}" for k in pareto.CONFIG_AXES if k not in axes]
  elif axes is not None:
    missing.append("axes as a mapping")
  bad = [f for f in _NUMERIC_OK_FIELDS if f in record and (
      isinstance(record[f], bool)
      or not isinstance(record[f], (int, float)))]
  if not (missing or bad):
    return None
  what = [f"lacks {', '.join(missing)}"] if missing else []
  what += [f"has a non-numeric {', '.join(bad)}"] if bad else []
  return (f"the status 'ok' line of point {record['id']!r} "
          f"{' and '.join(what)}")


def analyze(sweep_dir: str) -> str:
  """Writes summary.md, frontier.csv, pareto.png from results.jsonl; returns
  the summary table. Cut or invalid lines, and 'ok' lines that lack what the
  analysis reads (`analysis_problem`), are reported on stderr and ignored."""
  path = os.path.join(sweep_dir, RESULTS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: no point of a sweep in "
                            f"{sweep_dir} has finished yet")
  records, problems = read_results(path)
  usable = []
  for r in records:
    problem = analysis_problem(r)
    if problem:
      problems.append(f"{path}: {problem}; line ignored")
    else:
      usable.append(r)
  for p in problems:
    print(f"warning: {p}", file=sys.stderr, flush=True)
  latest = list(latest_records(usable).values())
  ok = [r for r in latest if r.get("status") == "ok"]
  failed = [r for r in latest if r.get("status") == "failed"]
  datasets = sorted({r["config"].get("dataset", "?")
                     if isinstance(r.get("config"), dict) else "?"
                     for r in ok})
  title = f"{', '.join(datasets)}: accuracy vs cost ({len(ok)} points)"
  return pareto.write_report(pareto.summarize(ok), failed, sweep_dir, title)


# ---------------------------------------------------------------------------
# Local executor.
# ---------------------------------------------------------------------------

def config_args(argv: Sequence[str]) -> list[str]:
  """The ``--config`` and ``--config.*`` flags of `argv` as ``--name=value``,
  the config file path made absolute, to hand the same config to workers."""
  out, i = [], 0
  while i < len(argv):
    name, eq, value = argv[i].partition("=")
    i += 1
    if name != "--config" and not name.startswith("--config."):
      continue
    if not eq and i < len(argv):
      value, i = argv[i], i + 1
    if name == "--config":
      value = os.path.abspath(value)
    out.append(f"{name}={value}")
  return out


def probe_devices() -> tuple[str, int]:
  """(JAX default backend, local device count), probed in a subprocess so
  that this process never holds an accelerator; JAX_PLATFORMS=cpu skips it."""
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    return "cpu", 1
  code = "import jax; print(jax.default_backend(), jax.local_device_count())"
  out = subprocess.run([sys.executable, "-c", code], check=True, text=True,
                       capture_output=True).stdout.split()
  return out[-2], int(out[-1])


def worker_env(slot: int, parallel: int, backend: str, devices: int
               ) -> dict[str, str]:
  """Environment of the worker in `slot`: on GPUs, pinned to one GPU."""
  env = dict(os.environ)
  if backend == "gpu":
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(d) for d in range(devices)]
    env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
    if parallel > len(ids):
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def _hms(seconds: float) -> str:
  s = int(round(seconds))
  h, m = divmod(s // 60, 60)
  return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


class Progress:
  """Prints one line per finished point: done/total, elapsed, ETA."""

  def __init__(self, total: int, done: int):
    self.total, self.done, self.ran, self.t0 = total, done, 0, time.time()

  def report(self, point: Point, status: str, seconds: float,
             record: Mapping[str, Any]) -> None:
    self.done += 1
    self.ran += 1
    elapsed = time.time() - self.t0
    eta = elapsed / self.ran * (self.total - self.done)
    if status == "ok":
      what = f"acc {record['eval_accuracy']:.4f}"
    else:
      what = (record.get("error") or "no error recorded").splitlines()[0][:120]
    print(f"[{self.done}/{self.total}] {status:6s} {point.id} {what} "
          f"({seconds:.0f} s) | elapsed {_hms(elapsed)}, ETA {_hms(eta)}",
          flush=True)


def tail(path: str, lines: int = 30) -> str:
  """The last `lines` lines of the log `path` (a note if it is missing)."""
  if not os.path.exists(path):
    return f"({path} does not exist)"
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


@dataclasses.dataclass
class _Worker:
  index: int
  slot: int
  proc: subprocess.Popen
  log: str
  started: float


def _finish(w: _Worker, point: Point, sweep_dir: str,
            progress: Progress) -> bool:
  """Reports a worker that exited; records a crash no line recorded.
  Returns whether the point failed."""
  results = os.path.join(sweep_dir, RESULTS_FILE)
  rc = w.proc.returncode
  if rc not in (0, EXIT_POINT_FAILED):  # died before it could record itself
    how = (f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}")
    append_record(results, point_line(
        point, "failed", error=f"worker exited with {how}; log: {w.log}",
        traceback=tail(w.log)))
  record = latest_records(read_results(results)[0]).get(point.id, {})
  status = record.get("status", "failed")
  progress.report(point, status, time.time() - w.started, record)
  return status != "ok"


def _exit_on_sigterm(signum: int, frame: Any) -> None:
  """SIGTERM -> SystemExit, so that the workers are stopped on the way out."""
  del frame
  raise SystemExit(128 + signum)


def _ready(todo: Sequence[int], running: Sequence[_Worker],
           points: Sequence[Point]) -> int | None:
  """The first point of `todo` whose dependency is neither to run nor
  running (PTQ points wait for their float point); None if there is none."""
  pending = {points[i].id for i in todo} | {points[w.index].id
                                            for w in running}
  for i in todo:
    dep = points[i].dependency
    if dep is None or dep.id not in pending:
      return i
  return None


def run_local(points: Sequence[Point], sweep_dir: str,
              worker_args: Sequence[str], parallel: int | None) -> int:
  """Runs the unfinished `points` in `parallel` worker processes, each
  ``python -m aqt_ext.sweep <worker_args> --point_index=I`` (`worker_args`
  must give the config these points came from). Returns the number of
  points that failed."""
  latest = latest_records(read_results(os.path.join(sweep_dir,
                                                    RESULTS_FILE))[0])
  todo = [i for i, p in enumerate(points)
          if not is_finished(sweep_dir, p, latest)]
  backend, devices = probe_devices()
  if parallel is None:
    parallel = (os.cpu_count() or 1) if backend == "cpu" else (
        devices if backend == "gpu" else 1)
  print(f"sweep {sweep_dir}: {len(points)} points, "
        f"{len(points) - len(todo)} finished, {len(todo)} to run on "
        f"{parallel} {backend} worker(s)", flush=True)
  progress = Progress(len(points), len(points) - len(todo))
  running: list[_Worker] = []
  free = list(range(parallel))
  failures = 0
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    while todo or running:
      while free and (index := _ready(todo, running, points)) is not None:
        slot = free.pop(0)
        todo.remove(index)
        log = os.path.join(point_workdir(sweep_dir, points[index]), "log.txt")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "ab") as out:
          proc = subprocess.Popen(
              [sys.executable, "-m", "aqt_ext.sweep", *worker_args,
               f"--workdir={sweep_dir}", f"--point_index={index}"],
              stdout=out, stderr=subprocess.STDOUT,
              env=worker_env(slot, parallel, backend, devices))
        running.append(_Worker(index, slot, proc, log, time.time()))
      time.sleep(0.2)
      for w in [w for w in running if w.proc.poll() is not None]:
        running.remove(w)
        free.append(w.slot)
        failures += _finish(w, points[w.index], sweep_dir, progress)
  finally:
    for w in running:  # interrupted: stop the workers; a rerun resumes them
      w.proc.terminate()
    for w in running:
      w.proc.wait()
  return failures


# ---------------------------------------------------------------------------
# SLURM executor (the scheduler's side: `aqt_ext.slurm`).
# ---------------------------------------------------------------------------

def run_slurm(points: Sequence[Point], sweep_dir: str,
              worker_args: Sequence[str],
              options: Mapping[str, Any] | None) -> int:
  """Submits the unfinished `points` as SLURM job arrays (or follows the
  arrays a killed driver submitted, `aqt_ext.slurm`), waits for them and
  returns the number of points that failed."""
  options = slurm.check_options(options)
  os.makedirs(os.path.join(sweep_dir, slurm.SLURM_DIR), exist_ok=True)
  name = slurm.job_name(sweep_dir)
  ids = [p.id for p in points]
  # Arrays a previous driver submitted that still have tasks in the queue.
  followed: dict[str, slurm.Submission] = {}
  live: set[int] = set()
  for (job, task), (_, comment) in slurm.live_tasks(name).items():
    if job not in followed:
      followed[job] = slurm.Submission.load(sweep_dir, comment)
      followed[job].check_indices(ids, job, sweep_dir)
    live.update(followed[job].tasks[task])
  if followed:
    print(f"following the SLURM array(s) {', '.join(followed)} submitted "
          f"before ({len(live)} point(s) still queued or running)",
          flush=True)
  latest = latest_records(read_results(os.path.join(sweep_dir,
                                                    RESULTS_FILE))[0])
  todo = [i for i, p in enumerate(points)
          if i not in live and not is_finished(sweep_dir, p, latest)]
  pending = {ids[i] for i in todo} | {ids[i] for i in live}
  # Points that need a float point still to run go in a second array that
  # starts after every array running one of those float points.
  first = [i for i in todo if points[i].dependency is None
           or points[i].dependency.id not in pending]
  second = [i for i in todo if i not in first]
  submitted: dict[str, slurm.Submission] = {}
  for group in (first, second):
    if not group:
      continue
    deps = ({points[i].dependency.id for i in group} if group is second
            else set())
    after = [job for job, sub in {**followed, **submitted}.items()
             if deps & sub.all_point_ids()]
    sub = slurm.submit(sweep_dir, group, [ids[i] for i in group],
                       worker_args, options, depends_on=after)
    submitted[sub.job_id] = sub
    print(f"submitted SLURM array {sub.job_id} ({name}): {len(group)} "
          f"point(s) in {len(sub.tasks)} task(s)"
          + (f", after {', '.join(after)}" if after else "")
          + f"; logs {os.path.join(sweep_dir, slurm.SLURM_DIR)}/"
          f"{sub.job_id}_<task>.out", flush=True)
  done = len(points) - len(todo) - len(live)
  print(f"sweep {sweep_dir}: {len(points)} points, {done} finished, "
        f"{len(points) - done} in SLURM", flush=True)
  return _follow_slurm(points, sweep_dir, {**followed, **submitted},
                       options["poll_s"], Progress(len(points), done))


def _follow_slurm(points: Sequence[Point], sweep_dir: str,
                  tracked: Mapping[str, slurm.Submission], poll_s: float,
                  progress: Progress) -> int:
  """Polls squeue until every task of `tracked` has left the queue, printing
  the queue's view when it changes; a point whose task ended without its
  line gets a 'failed' line with the task's final state. Returns the number
  of points that failed."""
  results = os.path.join(sweep_dir, RESULTS_FILE)
  name = slurm.job_name(sweep_dir)
  remaining = {(job, t) for job, sub in tracked.items()
               for t in range(len(sub.tasks))}
  t0 = time.time()
  failures, last_view = 0, None
  while remaining:
    queue = slurm.live_tasks(name)
    states = [queue[k][0] for k in remaining if k in queue]
    view = (states.count("PENDING"), states.count("RUNNING"),
            len(states) - states.count("PENDING") - states.count("RUNNING"))
    view += (progress.done, failures)
    if view != last_view:
      print(f"slurm: {view[0]} task(s) queued, {view[1]} running"
            + (f", {view[2]} in another state" if view[2] else "")
            + f" | {progress.done}/{progress.total} points done, "
            f"{failures} failed", flush=True)
      last_view = view
    for job, task in sorted(k for k in remaining if k not in queue):
      remaining.discard((job, task))
      sub = tracked[job]
      latest = latest_records(read_results(results)[0])
      state = None
      for index in sub.tasks[task]:
        point = points[index]
        record = latest.get(point.id, {})
        if record.get("recorded_at", 0) < sub.submitted_at:
          state = state or slurm.final_state(job, task)
          log = os.path.join(sweep_dir, slurm.SLURM_DIR, f"{job}_{task}.out")
          record = point_line(
              point, "failed", error=f"SLURM task {job}_{task} ended "
              f"({state}) without recording this point; log: {log}",
              traceback=tail(log))
          append_record(results, record)
        failures += record["status"] != "ok"
        progress.report(point, record["status"], time.time() - t0, record)
    if remaining:
      time.sleep(poll_s)
  return failures


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------

def define_flags() -> None:
  """The CLI flags (defined on demand: importing this module defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Sweep directory (results.jsonl, "
                      "points/, analysis).")
  config_flags.DEFINE_config_file("config", None, "Sweep config file "
                                  "(configs/sweep_*.py).", lock_config=True)
  flags.DEFINE_integer("parallel", None, "Worker processes (default: CPU "
                       "count on CPU, GPU count on GPUs).", lower_bound=1)
  flags.DEFINE_integer("point_index", None, "Run only this point (e.g. "
                       "$SLURM_ARRAY_TASK_ID).", lower_bound=0)
  flags.DEFINE_enum("executor", "local", ["local", "slurm"], "local: worker "
                    "processes on this machine; slurm: SLURM job arrays "
                    "(options in the sweep config's 'slurm' field).")
  flags.DEFINE_bool("analyze_only", False, "Only redraw the analysis from "
                    "results.jsonl.")
  flags.mark_flags_as_required(["workdir"])


def _run_one(points: Sequence[Point], base: ml_collections.ConfigDict,
             sweep_dir: str, index: int) -> int:
  """Worker: runs point `index`; exit status 0 or EXIT_POINT_FAILED."""
  if index >= len(points):
    raise ValueError(f"--point_index={index} is out of range; allowed: 0.."
                     f"{len(points) - 1} ({len(points)} points)")
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(sweep_dir, JAX_CACHE_DIR))
  point = points[index]
  print(f"point {index}: {point.id}", flush=True)
  status = run_point(point, base, sweep_dir)
  print(f"point {index}: {status}", flush=True)
  return EXIT_POINT_FAILED if status == "failed" else 0


def main(argv: Sequence[str]) -> int:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  sweep_dir = os.path.abspath(f.workdir)
  if f.analyze_only:
    print(analyze(sweep_dir), end="", flush=True)
    return 0
  if f.config is None:
    raise app.UsageError("--config is required unless --analyze_only")
  points = make_points(f.config)
  os.makedirs(sweep_dir, exist_ok=True)
  check_and_save_config(f.config, sweep_dir)
  if f.point_index is not None:
    return _run_one(points, f.config.base, sweep_dir, f.point_index)
  t0 = time.time()
  if f.executor == "slurm":
    if f.parallel is not None:
      raise app.UsageError("--parallel is for --executor=local; with "
                           "--executor=slurm set config.slurm.max_parallel")
    failures = run_slurm(points, sweep_dir, config_args(sys.argv[1:]),
                         f.config.get("slurm"))
  else:
    failures = run_local(points, sweep_dir, config_args(sys.argv[1:]),
                         f.parallel)
  print(analyze(sweep_dir), end="", flush=True)
  print(f"sweep done in {_hms(time.time() - t0)}; {failures} point(s) failed"
        + (" (rerun to retry)" if failures else "") + f"; see {sweep_dir}",
        flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
