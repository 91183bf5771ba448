"""Which sensitivity estimate allocates better? (issue 17)

On a float checkpoint (ResNet-20 width 1, Fashion-MNIST), for each budget
(the BOPs of uniform w3a3/w4a4/w6a6 with first/last at 8 bits), allocate
with each estimate (loss_delta, hessian) from the same 4 unaugmented
training batches, then measure, without any fine-tuning, the accuracy and
loss of the allocated model and of the uniform model at that budget on 40
other training batches (5,120 images the estimates did not see; the test
set is not read). Also the Spearman rank correlation of each estimate with
the loss increase measured on 8 of those batches, over all (layer,
candidate) pairs.

  .venv/bin/python experiments/mixed_precision/compare_estimates.py \
      --checkpoint=DIR [--out=experiments/mixed_precision/compare.json]
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

sys.path.insert(0, ".")
from configs import fashion_mnist_float  # noqa: E402
from aqt_ext import cost, data as data_lib, mixed_precision, models, train  # noqa: E402
from aqt_ext import config as qconfig  # noqa: E402
from aqt_ext.search import allocate as al, sensitivity as sens  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--out", default="experiments/mixed_precision/compare.json")
  ap.add_argument("--eval_batches", type=int, default=40)
  ap.add_argument("--truth_batches", type=int, default=8)
  args = ap.parse_args()
  t0 = time.time()
  config = fashion_mnist_float.get_config()
  info = data_lib.get_info(config.dataset, config.data_dir)
  model = models.create_model(config.model, num_classes=info.num_classes,
                              width=config.width)
  shape = tuple(info.image_shape)
  probe = sens.make_probe(model, train.load_float_variables(args.checkpoint),
                          shape, models.FIRST_LAYER)
  stream = data_lib.make_train_stream(config.dataset, 128, 0, config.data_dir,
                                      augment=False)
  est_batches = [stream.batch(i) for i in range(4)]
  eval_batches = [stream.batch(i) for i in range(100, 100 + args.eval_batches)]
  cands = mixed_precision.candidates_of((2, 3, 4, 8))
  out = dict(command=" ".join(sys.argv), checkpoint=args.checkpoint,
             candidates=[list(c) for c in cands])
  estimates = {}
  for method in sens.METHODS:
    t = time.time()
    estimates[method] = sens.estimate(method, probe, est_batches, cands)
    out[f"{method}_time_s"] = round(time.time() - t, 1)
    print(method, out[f"{method}_time_s"], "s", flush=True)
  n = len(probe.layers)

  @jax.jit
  def metrics(wbits, abits, x, y):
    logits = sens._apply(probe, wbits, abits, x)  # pylint: disable=protected-access
    return sens._loss(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)  # pylint: disable=protected-access

  def measure(widths, batches=None):
    batches = eval_batches if batches is None else batches
    wb = jnp.asarray([w for w, _ in widths], jnp.float32)
    ab = jnp.asarray([a for _, a in widths], jnp.float32)
    r = [metrics(wb, ab, b["image"], b["label"]) for b in batches]
    return (float(np.mean([float(l) for l, _ in r])),
            float(np.mean([float(a) for _, a in r])))

  zeros = [(0, 0)] * n
  base_loss, base_acc = measure(zeros)
  out["float"] = dict(loss=base_loss, accuracy=base_acc)
  # The measured single-layer loss increases on the first `truth_batches`
  # evaluation batches.
  tb = eval_batches[:args.truth_batches]
  truth_base = measure(zeros, tb)[0]
  truth = np.zeros((n, len(cands)))
  for i in range(n):
    for j, c in enumerate(cands):
      w = list(zeros)
      w[i] = c
      truth[i, j] = measure(w, tb)[0] - truth_base
  for method, s in estimates.items():
    out[f"{method}_spearman"] = float(stats.spearmanr(s.ravel(),
                                                      truth.ravel())[0])
  fixed = {p: (8, 8) for p in probe.paths if any(
      __import__("re").search(r, p) for r in (models.FIRST_LAYER,
                                              models.LAST_LAYER))}
  layers = {l.path: l for l in cost.model_cost(model, shape,
                                               train=False).layers}
  out["budgets"] = []
  for spec in ("w3a3_fl8", "w4a4_fl8", "w6a6_fl8"):
    budget = mixed_precision.budget_of(config, info.num_classes, shape, spec)
    uni_bits = int(spec[1])
    uniform = [fixed.get(p, (uni_bits, uni_bits)) for p in probe.paths]
    row = dict(spec=spec, budget_bops=budget)
    row["uniform_loss"], row["uniform_accuracy"] = measure(uniform)
    for method, s in estimates.items():
      alloc = al.allocate(
          [al.Layer(p, layers[p].macs, layers[p].weights,
                    (fixed[p],) if p in fixed else cands,
                    (0.0,) if p in fixed else tuple(s[i]))
           for i, p in enumerate(probe.paths)], budget_bops=budget)
      row[f"{method}_loss"], row[f"{method}_accuracy"] = measure(alloc.choice)
      row[f"{method}_bops"] = alloc.bops
      row[f"{method}_widths"] = [list(c) for c in alloc.choice]
    out["budgets"].append(row)
    print(json.dumps({k: v for k, v in row.items() if "widths" not in k}),
          flush=True)
  out["wall_time_s"] = round(time.time() - t0, 1)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print("spearman", {m: out[f"{m}_spearman"] for m in estimates})


if __name__ == "__main__":
  main()
