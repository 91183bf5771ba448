"""Entry point: python -m aqt_ext.main --config=configs/default.py --workdir=DIR

Rerunning the same command resumes from the latest checkpoint in DIR; a
rerun whose model-defining fields (`aqt_ext.train.TRAINING_FIELDS`) differ
from DIR/config.json is refused, naming them.

Multi-process (multi-host) runs: N copies of the command joined by
`jax.distributed.initialize`, each feeding its slice of every batch; process
0 writes config.json and result.json, all of them write the checkpoints.

  # by hand, on each host i of N:
  python -m aqt_ext.main ... --coordinator_address=HOST0:1234 \\
      --num_processes=N --process_id=i
  # under SLURM: JAX reads the address, count and index from srun's tasks
  srun -n N python -m aqt_ext.main ...

On CPU the processes use gloo collectives (`jax_cpu_collectives_
implementation`); on GPU NCCL and on TPU the ICI/DCN collectives need
nothing set here (a TPU VM slice runs one process per host, detected
by JAX as well).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and "
                    "result.json go.")
config_flags.DEFINE_config_file("config", None, "Training config file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 "
                    "for a multi-process run (default: detected by JAX "
                    "from srun or a TPU VM, or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process "
                     "run (with --coordinator_address).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index, "
                     "0..num_processes-1 (with --coordinator_address).",
                     lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def distributed_args(coordinator_address: str | None,
                     num_processes: int | None, process_id: int | None,
                     environ=os.environ) -> dict | None:
  """The `jax.distributed.initialize` arguments of this run, or None for a
  single-process run. Explicit flags must come all three together; without
  them a multi-process run is detected from srun's environment (a job step
  of more than one task: ``SLURM_STEP_NUM_TASKS``; the batch script of a
  multi-task job is one process and is not one) or from
  $JAX_COORDINATOR_ADDRESS, and JAX reads the rest itself."""
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise app.UsageError(
          f"--{', --'.join(missing)} missing: a multi-process run given by "
          "flags needs --coordinator_address, --num_processes and "
          "--process_id together (or none of them, under srun)")
    if process_id >= num_processes:
      raise app.UsageError(f"--process_id={process_id} is not allowed; "
                           f"allowed: 0..{num_processes - 1}")
    return given
  if int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 or environ.get(
      "JAX_COORDINATOR_ADDRESS"):
    return {}
  return None


class _QuietLibraries:
  """absl log filter dropping INFO chatter of orbax and TFDS."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    return record.levelno > 20 or not any(n in record.pathname
                                          for n in self.NOISY)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  dist = distributed_args(FLAGS.coordinator_address, FLAGS.num_processes,
                          FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  if dist is not None:
    # Cross-process collectives of the CPU backend (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**dist)
    logging.info("process %d of %d", jax.process_index(),
                 jax.process_count())
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX devices: %s", jax.devices())
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(f"final {result['eval_split']} accuracy: "
        f"{result['eval_accuracy']:.4f} "
        f"(loss {result['eval_loss']:.4f}, {result['steps']} steps, "
        f"{result['wall_time_s']:.0f} s); result: "
        f"{os.path.join(FLAGS.workdir, 'result.json')}", flush=True)


if __name__ == "__main__":
  app.run(main)
