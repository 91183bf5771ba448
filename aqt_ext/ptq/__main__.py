"""Post-training quantization of a float checkpoint:

  python -m aqt_ext.ptq --config=configs/ptq_fashion_mnist.py:pwlq \
      --checkpoint=FLOAT_WORKDIR --workdir=OUT [--config.quant=w4a8 ...]

FLOAT_WORKDIR is the --workdir of a float training run (`aqt_ext.main`); the
result goes to OUT/result.json. See `aqt_ext.ptq.pipeline`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Workdir of the float training run "
                    "(holding checkpoints/); default: config.init_from.")
flags.DEFINE_string("workdir", None, "Where result.json goes.")
config_flags.DEFINE_config_file("config", None, "PTQ config file "
                                "(configs/ptq_*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  from aqt_ext.ptq import pipeline  # pylint: disable=g-import-not-at-top
  result = pipeline.run_ptq(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir)
  print(f"PTQ {result['method']} {result['config']['quant']}: "
        f"{result['eval_split']} accuracy "
        f"{result['eval_accuracy']:.4f} (loss {result['eval_loss']:.4f}, "
        f"{result['bops']:.4g} BOPs, PTQ {result['ptq_time_s']:.0f} s, "
        f"total {result['wall_time_s']:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
