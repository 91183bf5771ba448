"""Entry point: python -m aqt_ext.main --config=configs/default.py --workdir=DIR

Rerunning the same command resumes from the latest checkpoint in DIR; a
rerun whose model-defining fields (`aqt_ext.train.TRAINING_FIELDS`) differ
from DIR/config.json is refused, naming them.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and "
                    "result.json go.")
config_flags.DEFINE_config_file("config", None, "Training config file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """absl log filter dropping INFO chatter of orbax and TFDS."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    return record.levelno > 20 or not any(n in record.pathname
                                          for n in self.NOISY)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
      "SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # multi-host (pod / SLURM) runs
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
