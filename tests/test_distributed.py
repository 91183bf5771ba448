"""Multi-process training: `python -m aqt_ext.main` as 2 processes joined by
`jax.distributed` (gloo collectives on CPU), by flags and under srun on a
real SLURM cluster, against one process with 2 devices."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aqt_ext import main as main_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
HANG_GUARD_S = 900  # subprocess waits are hang guards, not speed limits

# A tiny float model, 96 steps (6 epochs of 512 images, batch 32), a
# checkpoint every 8 steps: long enough to kill a process between two.
RUN = dict(dataset="fashion_mnist", model="cifar_resnet8", width=0.25,
           quant="float", batch_size=32, eval_batch_size=250,
           num_train_examples=512, num_eval_examples=500, num_epochs=6.0,
           warmup_epochs=0.5, learning_rate=0.05, log_every_steps=8,
           checkpoint_every_steps=8, keep_checkpoints=3, seed=3)
STEPS = 96


def main_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "aqt_ext.main",
          f"--config={ROOT / 'configs' / 'base.py'}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in RUN.items()), *extra]


def env_of(**extra):
  """The subprocess environment: CPU, this checkout, no inherited XLA_FLAGS
  (the device count is the test's), plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def restore(workdir):
  """(step, tree) of the latest checkpoint, onto this process's device,
  whatever topology saved it (targets from the checkpoint's metadata)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mgr.latest_step()
  meta = ocp.StandardCheckpointer().metadata(
      os.path.join(workdir, "checkpoints", str(step), "default"))
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return step, mgr.restore(step, args=ocp.args.StandardRestore(target))


@pytest.fixture(scope="module")
def one_process_two_devices(fashion_mnist_dir, tmp_path_factory):
  """The reference: one process, 2 forced host devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  subprocess.run(main_cmd(workdir, fashion_mnist_dir), check=True,
                 env=env_of(XLA_FLAGS="--xla_force_host_platform_device_"
                            "count=2"), cwd=ROOT, capture_output=True,
                 timeout=HANG_GUARD_S)
  return workdir


def test_distributed_flags_are_checked():
  with pytest.raises(Exception, match=r"--num_processes, --process_id "
                     r"missing"):
    main_lib.distributed_args("h:1", None, None, {})
  with pytest.raises(Exception, match=r"--process_id=2 is not allowed; "
                     r"allowed: 0..1"):
    main_lib.distributed_args("h:1", 2, 2, {})
  assert main_lib.distributed_args("h:1", 2, 1, {}) == dict(
      coordinator_address="h:1", num_processes=2, process_id=1)
  assert main_lib.distributed_args(None, None, None, {}) is None
  # srun's job step of 2 tasks; not the batch script of a 2-task job.
  assert main_lib.distributed_args(
      None, None, None, {"SLURM_STEP_NUM_TASKS": "2"}) == {}
  assert main_lib.distributed_args(
      None, None, None, {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) is None


def test_two_processes_killed_and_restarted_under_srun_equal_one_process(
    one_process_two_devices, slurm_cluster, fashion_mnist_dir, tmp_path):
  """2 processes x 1 CPU device, started by flags, one SIGKILLed after a
  checkpoint (the other then killed too); both restarted by ``srun -n 2``
  (JAX reads the coordinator, count and index from SLURM), resuming from
  that checkpoint. The final parameters, statistics and optimizer state
  equal the one-process 2-device run's exactly: both run the same 2-way
  SPMD program on the same shards, and the cross-device sums (gradients,
  BatchNorm statistics) add two partial sums, which floating point does the
  same way in either order; the resume is exact (data and RNG are functions
  of the step)."""
  workdir = tmp_path / "run"
  port = free_port()
  procs = [subprocess.Popen(
      main_cmd(workdir, fashion_mnist_dir,
               f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"),
      env=env_of(), cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=open(tmp_path / f"p{i}.log", "wb"), start_new_session=True)  # pylint: disable=consider-using-with
      for i in range(2)]
  ckpts = workdir / "checkpoints"
  deadline = time.time() + HANG_GUARD_S
  while not any(p.name.isdigit() and int(p.name) >= 16
                for p in ckpts.glob("*")):
    assert all(p.poll() is None for p in procs), \
        (tmp_path / "p0.log").read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  os.killpg(procs[1].pid, signal.SIGKILL)
  os.killpg(procs[0].pid, signal.SIGKILL)  # it would wait for its peer
  for p in procs:
    p.wait()
  assert not (workdir / "result.json").exists(), "the run ended first"
  killed_at = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert killed_at < STEPS

  run = subprocess.run(
      ["srun", "-n", "2", "--kill-on-bad-exit=1",
       *main_cmd(workdir, fashion_mnist_dir)],
      env=env_of(**slurm_cluster.env), cwd=ROOT, capture_output=True,
      text=True, timeout=HANG_GUARD_S)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "process 1 of 2" in run.stderr and "process 0 of 2" in run.stderr
  two = json.loads((workdir / "result.json").read_text())
  one = json.loads((one_process_two_devices / "result.json").read_text())
  assert two["devices"] == one["devices"] == 2
  assert two["resumed_from_step"] == killed_at and two["steps"] == STEPS
  assert (two["eval_accuracy"], two["eval_loss"]) == (one["eval_accuracy"],
                                                      one["eval_loss"])
  s1, t1 = restore(one_process_two_devices)
  s2, t2 = restore(workdir)
  assert s1 == s2 == STEPS
  l1 = jax.tree_util.tree_leaves_with_path(t1)
  l2 = jax.tree.leaves(t2)
  assert len(l1) == len(l2) and len(l1) > 10
  for (path, a), b in zip(l1, l2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))
