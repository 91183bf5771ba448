"""The SLURM executor of the sweep driver (``--executor=slurm``).

The unfinished points go to the scheduler as job arrays, one array task per
point or per group of ``points_per_task`` points; each task runs its points
one after another with ``python -m aqt_ext.sweep ... --point_index=I``, the
same worker as the local executor's, so results.jsonl, the point workdirs,
locks and the analysis are shared by both. The driver then follows the
tasks with ``squeue`` and prints their progress from the scheduler's view.

Why sbatch scripts and not submitit: submitit pickles a Python callable per
job and follows jobs with ``sacct``, which needs SLURM's accounting database
(many clusters, and the test cluster, have none); our tasks are already a
command line with all their state on disk, and the point lock, resume and
failure records are the sweep's own. Writing the script keeps the dependency
list at sbatch, squeue and scontrol.

Submission. Points that need the sweep's float point (PTQ, mixed precision,
fine-tuning) go in a second array that starts after the first has ended
(``--dependency=afterany``; a task whose float point failed retries it under
its lock, as a local worker would). Before each ``sbatch`` the driver writes
``slurm/sub-N.json`` (which points each task runs); the job carries that
file's name as its comment and one job name per sweep directory, so a
driver that was killed, even between sbatch and its bookkeeping, finds its
arrays again with ``squeue --name`` and follows them instead of submitting
them again. Points with neither a finished result nor a live task are
submitted anew: a rerun retries the failed and cancelled ones.

Fault behaviour:
* A task that leaves the queue without a line for one of its points
  (cancelled, killed, timed out, node failure) gets a 'failed' line naming
  its job id and final state (``scontrol show job``); a rerun retries it.
* A requeued task resumes its points from their checkpoints (its output is
  appended to, ``--open-mode=append``).
* One point never runs twice at once: the worker's flock on the point's lock
  file (the shared file system must support flock, as NFS v4 and Lustre do).
* Killing the driver leaves its jobs running; rerun it to follow them, or
  ``scancel --name=<job name>`` to stop them.

Sweep-config options (``config.slurm``, all optional), see `OPTIONS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from typing import Any, Mapping, Sequence

from aqt_ext import fileio

SLURM_DIR = "slurm"  # in the sweep directory: scripts, submissions, logs

# config.slurm fields: sbatch option (None: the driver's own), allowed values.
OPTIONS: dict[str, tuple[str | None, str]] = {
    "partition": ("partition", "a partition name"),
    "time": ("time", "a time limit, e.g. '04:00:00' or '1-00:00:00'"),
    "cpus_per_task": ("cpus-per-task", "an int >= 1"),
    "gpus_per_task": ("gpus-per-task", "an int >= 0, or 'TYPE:N'"),
    "gres": ("gres", "a generic resource, e.g. 'gpu:1'"),
    "mem": ("mem", "memory per node, e.g. '16G'"),
    "account": ("account", "an account name"),
    "qos": ("qos", "a QOS name"),
    "constraint": ("constraint", "node features, e.g. 'a100'"),
    "max_parallel": (None, "an int >= 0: at most this many tasks of an "
                     "array at once (0: no cap)"),
    "points_per_task": (None, "an int >= 1: points one task runs in turn"),
    "extra": (None, "a list of further sbatch options, each '--name=value' "
              "or '--flag'"),
    "poll_s": (None, "seconds between squeue polls, > 0"),
}
DEFAULTS = {"cpus_per_task": 1, "max_parallel": 0, "points_per_task": 1,
            "extra": (), "poll_s": 2.0}
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # [D-]H[:M[:S]], M
_DRIVER_OWNED = ("array", "job-name", "comment", "output", "error",
                 "open-mode", "dependency", "requeue", "parsable")


class SlurmError(RuntimeError):
  """A scheduler command failed, or is missing."""


def _bad(field: str, value: Any) -> ValueError:
  return ValueError(f"config.slurm.{field}={value!r} is not allowed; "
                    f"allowed: {OPTIONS[field][1]}")


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
  """``config.slurm`` with defaults filled in; a ValueError naming the first
  unknown field or bad value (before anything is submitted)."""
  options = dict(options or {})
  for k in options:
    if k not in OPTIONS:
      raise ValueError(f"config.slurm.{k} is not a SLURM option; allowed: "
                       f"{', '.join(OPTIONS)}")
  out = {**DEFAULTS, **options}
  for k in ("cpus_per_task", "points_per_task"):
    v = out[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise _bad(k, v)
  v = out["max_parallel"]
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise _bad("max_parallel", v)
  v = out["poll_s"]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
    raise _bad("poll_s", v)
  if "time" in out and not (isinstance(out["time"], str)
                            and _TIME_RE.match(out["time"])):
    raise _bad("time", out["time"])
  if "gpus_per_task" in out:
    v = out["gpus_per_task"]
    if not ((isinstance(v, int) and not isinstance(v, bool) and v >= 0) or
            (isinstance(v, str) and re.match(r"^[\w.-]+:\d+$", v))):
      raise _bad("gpus_per_task", v)
  for k in ("partition", "gres", "mem", "account", "qos", "constraint"):
    if k in out and not (isinstance(out[k], str) and out[k]
                         and not any(c.isspace() for c in out[k])):
      raise _bad(k, out[k])
  extra = out["extra"]
  if isinstance(extra, str) or not all(
      isinstance(e, str) and re.match(r"^--[a-z][a-z-]*(=\S.*)?$", e)
      for e in extra):
    raise _bad("extra", extra)
  for e in extra:
    name = e[2:].split("=", 1)[0]
    if name in _DRIVER_OWNED:
      raise ValueError(f"config.slurm.extra sets --{name}, which the driver "
                       f"sets itself; allowed: sbatch options other than "
                       f"{', '.join('--' + o for o in _DRIVER_OWNED)}")
  out["extra"] = tuple(extra)
  return out


def job_name(sweep_dir: str) -> str:
  """One job name per sweep directory: how a rerun finds its arrays."""
  return f"aqt_sweep-{zlib.crc32(os.path.abspath(sweep_dir).encode()):08x}"


def sbatch_options(options: Mapping[str, Any]) -> list[str]:
  """The user's resource options as ``--name=value`` sbatch arguments."""
  out = [f"--{OPTIONS[k][0]}={options[k]}" for k in OPTIONS
         if OPTIONS[k][0] and k in options]
  return out + list(options.get("extra", ()))


def array_script(worker_args: Sequence[str], sweep_dir: str,
                 tasks: Sequence[Sequence[int]], options: Mapping[str, Any],
                 python: str = sys.executable, cwd: str | None = None,
                 header: Sequence[str] = ()) -> str:
  """A job-array script: task t runs the points ``tasks[t]`` in turn, each
  ``python -m aqt_ext.sweep <worker_args> --point_index=I``; its exit status
  is the last failing worker's. `options` are `check_options` output; the
  array, output and job-name lines are the caller's (`header`)."""
  sweep_dir = os.path.abspath(sweep_dir)
  cwd = cwd or os.getcwd()
  run = " ".join(shlex.quote(a) for a in (
      python, "-m", "aqt_ext.sweep", *worker_args, f"--workdir={sweep_dir}"))
  analyze_cmd = " ".join(shlex.quote(a) for a in (
      python, "-m", "aqt_ext.sweep", f"--workdir={sweep_dir}",
      "--analyze_only"))
  lines = [
      "#!/bin/bash",
      f"# Pareto sweep: {sum(map(len, tasks))} points in {len(tasks)} array "
      "task(s) (aqt_ext/sweep.py). A requeued or",
      "# resubmitted task resumes its points; a finished point exits at "
      "once. Analysis:",
      f"#   {analyze_cmd}",
      *(f"#SBATCH {h}" for h in header),
      *(f"#SBATCH {o}" for o in sbatch_options(options)),
      "set -uo pipefail",
      f"cd {shlex.quote(cwd)} || exit 1",
      f"export PYTHONPATH={shlex.quote(cwd)}${{PYTHONPATH:+:$PYTHONPATH}}",
      "POINTS=(" + " ".join(f"'{' '.join(map(str, t))}'" for t in tasks)
      + ")",
      "rc=0",
      'for i in ${POINTS[$SLURM_ARRAY_TASK_ID]}; do',
      f'  {run} --point_index="$i" || rc=$?',
      "done",
      "exit $rc",
  ]
  return "\n".join(lines) + "\n"


def _groups(indices: Sequence[int], size: int) -> list[list[int]]:
  return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


# ---------------------------------------------------------------------------
# The scheduler's commands.
# ---------------------------------------------------------------------------

def _command(*argv: str) -> str:
  if shutil.which(argv[0]) is None:
    raise SlurmError(f"--executor=slurm needs the SLURM client command "
                     f"{argv[0]!r}, which is not on PATH; run the driver on "
                     "a cluster login node, or use --executor=local")
  out = subprocess.run(list(argv), capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise SlurmError(f"{' '.join(argv)} exited with {out.returncode}: "
                     f"{out.stderr.strip() or out.stdout.strip()}")
  return out.stdout


def live_tasks(name: str) -> dict[tuple[str, int], tuple[str, str]]:
  """{(array job id, task id): (state, comment)} of the queued and running
  tasks of jobs named `name` (``squeue -r``: one line per array task)."""
  out = _command("squeue", "-h", "-r", f"--name={name}", "-o", "%F|%K|%T|%k")
  tasks = {}
  for line in out.splitlines():
    parts = line.strip().split("|", 3)
    if len(parts) == 4 and parts[1].isdigit():
      tasks[(parts[0], int(parts[1]))] = (parts[2], parts[3])
  return tasks


def final_state(job: str, task: int) -> str:
  """The state of a task that left the queue (``scontrol show job``), e.g.
  'CANCELLED' or 'FAILED ExitCode=3:0'; 'unknown' once SLURM forgot it."""
  try:
    out = _command("scontrol", "show", "job", "-o", f"{job}_{task}")
  except SlurmError:
    return "unknown (no longer known to scontrol)"
  state = re.search(r"JobState=(\S+)", out)
  code = re.search(r"ExitCode=(\S+)", out)
  return ((state.group(1) if state else "unknown")
          + (f" ExitCode={code.group(1)}" if code else ""))


# ---------------------------------------------------------------------------
# Submissions.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Submission:
  """One sbatch call: ``slurm/sub-N.json``."""

  name: str  # 'sub-N'
  tasks: list[list[int]]  # point indices per array task
  point_ids: list[list[str]]
  job_id: str | None = None
  depends_on: list[str] = dataclasses.field(default_factory=list)
  submitted_at: float = 0.0

  def all_point_ids(self) -> set[str]:
    return {pid for task in self.point_ids for pid in task}

  def check_indices(self, ids: Sequence[str], job: str, sweep_dir: str
                    ) -> None:
    """Refuses a config whose point indices no longer name the points this
    live array runs (its tasks pass --point_index)."""
    for task, pids in zip(self.tasks, self.point_ids):
      for index, pid in zip(task, pids):
        if index >= len(ids) or ids[index] != pid:
          raise ValueError(
              f"the live SLURM array {job} ({self.path(sweep_dir)}) runs "
              f"point {pid} as --point_index={index}, which this config "
              "gives another point: wait for the array to end, or stop it "
              f"(scancel --name={job_name(sweep_dir)}), before changing the "
              "sweep's axes")

  def path(self, sweep_dir: str) -> str:
    return os.path.join(sweep_dir, SLURM_DIR, f"{self.name}.json")

  def save(self, sweep_dir: str) -> None:
    fileio.write_json_atomic(self.path(sweep_dir), dataclasses.asdict(self))

  @classmethod
  def load(cls, sweep_dir: str, name: str) -> "Submission":
    with open(os.path.join(sweep_dir, SLURM_DIR, f"{name}.json")) as f:
      return cls(**json.load(f))


def _next_name(sweep_dir: str) -> str:
  taken = [int(m.group(1)) for f in os.listdir(os.path.join(sweep_dir,
                                                           SLURM_DIR))
           if (m := re.match(r"^sub-(\d+)\.json$", f))]
  return f"sub-{max(taken, default=-1) + 1}"


def submit(sweep_dir: str, indices: Sequence[int], point_ids: Sequence[str],
           worker_args: Sequence[str], options: Mapping[str, Any],
           depends_on: Sequence[str] = ()) -> Submission:
  """Submits the points `indices` as one array (after `depends_on` ended)."""
  by_index = dict(zip(indices, point_ids))
  tasks = _groups(list(indices), options["points_per_task"])
  sub = Submission(_next_name(sweep_dir), tasks,
                   [[by_index[i] for i in t] for t in tasks],
                   depends_on=list(depends_on), submitted_at=time.time())
  sub.save(sweep_dir)  # first: a rerun can read the tasks of a live array
  array = f"0-{len(tasks) - 1}" + (f"%{options['max_parallel']}"
                                   if options["max_parallel"] else "")
  header = [f"--job-name={job_name(sweep_dir)}", f"--comment={sub.name}",
            f"--array={array}", "--open-mode=append", "--requeue",
            "--output=" + os.path.join(sweep_dir, SLURM_DIR, "%A_%a.out")]
  if depends_on:
    header.append("--dependency=afterany:" + ":".join(depends_on))
  script = os.path.join(sweep_dir, SLURM_DIR, f"{sub.name}.sbatch")
  fileio.write_bytes_atomic(script, array_script(
      worker_args, sweep_dir, tasks, options, header=header).encode())
  sub.job_id = _command("sbatch", "--parsable", script).strip().split(";")[0]
  sub.save(sweep_dir)
  return sub
