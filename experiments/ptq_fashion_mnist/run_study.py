"""PTQ study: every method at every bit width on one float checkpoint.

  .venv/bin/python experiments/ptq_fashion_mnist/run_study.py \\
      --checkpoint=/tmp/ptq_float --workdir=/tmp/ptq_study --width=0.5

Runs `aqt_ext.ptq.pipeline.run_ptq` for each (bits, method) point in one
process, so that points with equal models share their compilations; each
point writes WORKDIR/<bits>-<label>/result.json exactly as
``python -m aqt_ext.ptq --config=configs/ptq_fashion_mnist.py:<method>
--config.quant=<bits> --config.width=<width> [--config.ptq.<k>=<v> ...]``
would. A point whose result.json exists is not rerun. Prints a markdown
table and writes WORKDIR/summary.json.
"""

import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from aqt_ext.ptq import pipeline  # noqa: E402
from configs import ptq_fashion_mnist  # noqa: E402

flags.DEFINE_string("checkpoint", None, "Workdir of the float run.")
flags.DEFINE_string("workdir", None, "Where the points' result.json go.")
flags.DEFINE_float("width", 0.5, "Width of the float model (as trained).")
flags.DEFINE_list("bits", ["w8a8", "w4a8", "w4a4", "w3a8", "w2a4"],
                  "config.quant values.")
flags.mark_flags_as_required(["checkpoint", "workdir"])
FLAGS = flags.FLAGS

# label -> (ptq.method, ptq options)
METHODS = {
    "rtn": ("rtn", {}),
    "pwlq": ("pwlq", {}),
    "pwlq+bc": ("pwlq", {"bias_correction": True}),
    "rex K=2": ("rex", {"order": 2}),
    "rex K=2 s=0.5": ("rex", {"order": 2, "sparsity": 0.5}),
    "rex K=2 ensemble": ("rex", {"order": 2, "execution": "ensemble"}),
    # Fewer border steps and examples than the defaults (200, 256), to spare
    # the shared CPU: one learn_border per layer, 22 layers per point.
    "aquant": ("aquant", {"border_steps": 100, "border_examples": 128}),
}
FIELDS = ("eval_accuracy", "bops", "weight_bits", "stored_weight_bits",
          "weight_mse", "ptq_time_s", "wall_time_s")


def point_dir(bits: str, label: str) -> str:
  slug = label.replace(" ", "_").replace("=", "").replace("+", "_")
  return os.path.join(FLAGS.workdir, f"{bits}-{slug}")


def run_point(bits: str, label: str, method: str, options: dict) -> dict:
  """The point's result, from its result.json if it has one."""
  out = point_dir(bits, label)
  path = os.path.join(out, "result.json")
  if not os.path.exists(path):
    config = ptq_fashion_mnist.get_config(method)
    config.width, config.quant = FLAGS.width, bits
    for key, value in options.items():
      config.ptq[key] = value
    pipeline.run_ptq(config, FLAGS.checkpoint, out)
  with open(path) as f:
    result = json.load(f)
  return {"bits": bits, "label": label, **{k: result[k] for k in FIELDS}}


def main(argv):
  del argv
  rows = [run_point("float", "float", "rtn", {})]
  for bits in FLAGS.bits:
    for label, (method, options) in METHODS.items():
      rows.append(run_point(bits, label, method, options))
      print(rows[-1], flush=True)
  with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("| bits | method | test acc % | GBOPs | weight MSE | PTQ s | wall s |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    mse = "-" if r["weight_mse"] is None else f"{r['weight_mse']:.2e}"
    print(f"| {r['bits']} | {r['label']} | {100 * r['eval_accuracy']:.2f} | "
          f"{r['bops'] / 1e9:.3f} | {mse} | {r['ptq_time_s']:.0f} | "
          f"{r['wall_time_s']:.0f} |")


if __name__ == "__main__":
  app.run(main)
