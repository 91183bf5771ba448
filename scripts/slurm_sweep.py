"""Prints a SLURM job-array script for a Pareto sweep (aqt_ext/sweep.py).

  python scripts/slurm_sweep.py --config=configs/sweep_fashion_mnist.py \\
      --workdir=/shared/sweeps/fmnist [--config.field=value ...] \\
      [--sbatch=time=04:00:00 --sbatch=gres=gpu:1 ...] [--max_parallel=N] \\
      > sweep.sbatch
  sbatch sweep.sbatch

Array task i runs ``python -m aqt_ext.sweep <the same --config flags>
--workdir=... --point_index=i`` from this checkout; results land in the same
layout as a local sweep. Creates WORKDIR/slurm/ for the task logs.
"""

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sweep configs import `configs.base`

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from aqt_ext import sweep

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Sweep config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory (on a file system the "
                    "nodes share).")
flags.DEFINE_multi_string("sbatch", [], "Extra '#SBATCH --KEY=VALUE' option "
                          "as KEY=VALUE, e.g. time=04:00:00; repeatable.")
flags.DEFINE_integer("max_parallel", 0, "At most this many tasks at once "
                     "(0: no cap).", lower_bound=0)
flags.DEFINE_string("python", sys.executable, "Python interpreter on the "
                    "nodes.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_sbatch(options: list[str]) -> dict[str, str]:
  """KEY=VALUE strings -> dict, naming a malformed one."""
  out = {}
  for option in options:
    key, eq, value = option.partition("=")
    if not eq or not key or key.startswith("-"):
      raise app.UsageError(f"--sbatch={option!r} is not allowed; allowed: "
                           "KEY=VALUE without dashes, e.g. time=04:00:00")
    out[key] = value
  return out


def main(argv):
  del argv
  points = sweep.make_points(FLAGS.config)
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(os.path.join(workdir, "slurm"), exist_ok=True)
  sys.stdout.write(sweep.slurm_script(
      sweep.config_args(sys.argv[1:]), workdir, len(points),
      parse_sbatch(FLAGS.sbatch), FLAGS.max_parallel, FLAGS.python,
      cwd=str(ROOT)))


if __name__ == "__main__":
  app.run(main)
