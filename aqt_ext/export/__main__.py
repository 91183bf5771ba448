r"""Exports the model a training workdir holds, and checks the export by running it.

  python -m aqt_ext.export --workdir=W --format=onnx --out=model.onnx \
      [--requantize=true] [--float_layers=REGEX] [--check_examples=1000]

Reads ``W/config.json`` (the config that trained the model) and the latest
checkpoint in ``W/checkpoints``, writes the ONNX graph
(`aqt_ext.export.onnx.to_onnx`; requantization scales calibrated on the
first unaugmented training batch) to ``--out`` atomically, then runs it on
ONNX Runtime on the first ``--check_examples`` images of the split the run
evaluated, next to QAT eval (the model's own eval forward, fake quant), and
prints one JSON object: the images where the two predict the same class,
both accuracies, the largest logit difference, and the integer-kernel
nodes ORT runs (``fused``). Nothing is written when a check before the
export fails (flags, workdir, model).
"""

import json
import os
import re
import tempfile

from absl import app, flags
import jax
import ml_collections
import numpy as np

FORMATS = ("onnx",)
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json, "
                    "checkpoints/).")
flags.DEFINE_string("format", "onnx", f"Export format: one of {FORMATS}.")
flags.DEFINE_string("out", None, "The file to write (.onnx).")
flags.DEFINE_bool("requantize", True, "ONNX: int8 output requantization "
                  "where QAT has none, so that every conv runs as an integer "
                  "kernel (aqt_ext.export.onnx).")
flags.DEFINE_string("float_layers", "", "ONNX: a regex of integer layer "
                    "paths written as float ops on their fake-quant operands "
                    "(e.g. 'conv_init$': a first conv on few channels, whose "
                    "fused kernel would round its bias coarsely).")
flags.DEFINE_integer("check_examples", 1000, "Evaluation images the export "
                     "is checked on (0: no check).")


def check_flags() -> None:
  """Refuses bad flags before any work, naming the flag and what is allowed."""
  if FLAGS.format not in FORMATS:
    raise app.UsageError(f"--format={FLAGS.format!r} is not allowed; allowed "
                         f"values: {', '.join(FORMATS)}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: a training workdir")
  if not os.path.isfile(os.path.join(FLAGS.workdir, "config.json")):
    raise app.UsageError(f"--workdir={FLAGS.workdir!r} holds no config.json: "
                         "it must be the --workdir of a training run "
                         "(python -m aqt_ext.main)")
  if not FLAGS.out or not FLAGS.out.endswith(".onnx"):
    raise app.UsageError(f"--out={FLAGS.out!r}: allowed values are paths "
                         "ending in .onnx")
  try:
    re.compile(FLAGS.float_layers)
  except re.error as e:
    raise app.UsageError(f"--float_layers={FLAGS.float_layers!r} is not a "
                         f"valid regular expression: {e}") from None
  if FLAGS.check_examples < 0:
    raise app.UsageError(f"--check_examples={FLAGS.check_examples}: allowed "
                         "values are ints >= 0")


def main(argv) -> None:
  del argv
  check_flags()
  from aqt_ext import data as data_lib  # pylint: disable=g-import-not-at-top
  from aqt_ext import train  # pylint: disable=g-import-not-at-top
  from aqt_ext.export import onnx as ox  # pylint: disable=g-import-not-at-top
  with open(os.path.join(FLAGS.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("framework", "linen") != "linen":
    raise app.UsageError(f"{FLAGS.workdir}: config.framework="
                         f"{config.framework!r}; the ONNX export takes linen "
                         "models")
  info = data_lib.get_info(config.dataset, config.data_dir)
  model = train.create_model(config, info.num_classes)
  variables = train.load_variables(
      FLAGS.workdir, ("params", "batch_stats", "quant_stats"),
      f"--workdir={FLAGS.workdir!r}", "train the model there first",
      "Delete that step's folder to export an earlier checkpoint.")
  calibration = data_lib.make_train_stream(
      config.dataset, config.batch_size, config.seed, config.data_dir,
      augment=False, num_examples=config.num_train_examples,
      validation_examples=config.validation_examples).batch(0)["image"]
  kwargs = {"train": False}
  proto = ox.to_onnx(model, variables, np.asarray(calibration[:8]),
                     call_kwargs=kwargs, requantize=FLAGS.requantize,
                     calibration=np.asarray(calibration),
                     float_layers=FLAGS.float_layers or None)
  ox.save(proto, FLAGS.out)
  report = {"out": os.path.abspath(FLAGS.out),
            "bytes": os.path.getsize(FLAGS.out), "quant": config.quant,
            "requantize": FLAGS.requantize,
            "float_layers": FLAGS.float_layers}
  with tempfile.TemporaryDirectory() as tmp:
    report["fused"] = {k: v for k, v in ox.fused_ops(
        proto, os.path.join(tmp, "optimized.onnx")).items()
                       if k in ox.INTEGER_KERNELS}
  if FLAGS.check_examples:
    report.update(check(model, variables, proto, config, kwargs, data_lib,
                        ox))
  print(json.dumps(report, sort_keys=True), flush=True)


def check(model, variables, proto, config, kwargs, data_lib, ox) -> dict:
  """ORT next to QAT eval on the first --check_examples evaluation images."""
  sess = ox.session(proto)
  qat_fn = jax.jit(lambda v, x: model.apply(v, x, **kwargs))
  same = correct_ort = correct_qat = n = 0
  max_diff = 0.0
  for batch in data_lib.eval_batches(
      config.dataset, config.eval_batch_size, config.data_dir,
      FLAGS.check_examples, split=config.eval_split,
      validation_examples=config.validation_examples):
    x, y, mask = (np.asarray(batch[k]) for k in ("image", "label", "mask"))
    keep = mask > 0
    ort_out = sess.run(None, {ox.INPUT: x})[0][keep]
    qat_out = np.asarray(qat_fn(variables, x))[keep]
    y = y[keep]
    same += int(np.sum(ort_out.argmax(-1) == qat_out.argmax(-1)))
    correct_ort += int(np.sum(ort_out.argmax(-1) == y))
    correct_qat += int(np.sum(qat_out.argmax(-1) == y))
    max_diff = max(max_diff, float(np.max(np.abs(ort_out - qat_out))))
    n += int(keep.sum())
  return {"split": config.eval_split, "examples": n,
          "same_prediction": same / n, "ort_accuracy": correct_ort / n,
          "qat_accuracy": correct_qat / n, "max_logit_diff": max_diff}


if __name__ == "__main__":
  app.run(main)
