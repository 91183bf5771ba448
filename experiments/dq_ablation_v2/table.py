"""Tables and plot of the DQ ablation v2 (README.md): per method and bit
width, validation accuracy at a third, two thirds and all of the budget
(mean +- sample std over seeds, and the seeds' values), the test accuracy
of the final models (read once, test_eval.py), the ranking at each
checkpoint, and per-seed differences of DQ against each baseline.

  python experiments/dq_ablation_v2/table.py OUT_DIR SWEEP_DIR...
  (OUT_DIR holds test_results.*.jsonl; the plot goes to OUT_DIR/curves.png)
"""

import collections
import glob
import json
import os
import statistics
import sys

from aqt_ext import sweep

ORDER = ("uniform", "pact", "lsq", "dqw", "dqwste", "dqa", "dq", "dqste",
         "float")
NAMES = {"uniform": "uniform STE (AQT numerics)", "pact": "PACT",
         "lsq": "LSQ", "dqw": "DQ weights only (direct)",
         "dqwste": "DQ weights only (latent STE)",
         "dqa": "DQ activations only", "dq": "DQ both (direct)",
         "dqste": "DQ both (latent STE)", "float": "float, same fine-tuning"}


def eval_curve(point_dir):
  """{step: validation accuracy} from the point's event file."""
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.lib.io import tf_record  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  curve = {}
  for f in sorted(glob.glob(os.path.join(point_dir, "events.*"))):
    for rec in tf_record.tf_record_iterator(f):
      e = event_pb2.Event.FromString(rec)
      for v in e.summary.value:
        if v.tag == "eval_accuracy":
          curve[int(e.step)] = float(tf.make_ndarray(v.tensor))
  return curve


def cell(xs):
  if not xs:
    return "-"
  sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
  return (f"{statistics.mean(xs):.2f} ± {sd:.2f} ("
          + ", ".join(f"{x:.2f}" for x in xs) + ")")


def main(out_dir, *sweep_dirs):
  val = collections.defaultdict(dict)  # (method, quant) -> seed -> curve
  for d in sweep_dirs:
    records, problems = sweep.read_results(os.path.join(d, sweep.RESULTS_FILE))
    for p in problems:
      print("warning:", p, file=sys.stderr)
    for pid, r in sweep.latest_records(records).items():
      if r.get("status") != "ok":
        continue
      assert r["eval_split"] == "validation", pid
      a = r["axes"]
      curve = eval_curve(os.path.join(d, sweep.POINTS_DIR, pid))
      curve[r["steps"]] = r["eval_accuracy"]
      val[(a["method"] or "float", a["quant"])][a["seed"]] = {
          s: 100 * x for s, x in curve.items()}
  test = collections.defaultdict(dict)
  for f in glob.glob(os.path.join(out_dir, "test_results.*.jsonl")):
    for line in open(f):
      r = json.loads(line)
      a = r["axes"]
      test[(a["method"] or "float", a["quant"])][a["seed"]] = (
          100 * r["test_accuracy"])
  quants = sorted({q for _, q in val if q != "float"})
  steps = sorted({s for c in val.values() for cv in c.values() for s in cv})
  for q in quants + ["float"]:
    print(f"\n### {q.upper()}: validation accuracy (%) at each step, "
          "test accuracy (%) of the final model; mean ± std (seeds 0, 1, 2)\n")
    print("| method | " + " | ".join(f"val @ {s}" for s in steps)
          + " | test |\n|---|" + "---:|" * (len(steps) + 1))
    for m in ORDER:
      if (m, q) not in val:
        continue
      seeds = sorted(val[(m, q)])
      row = [cell([val[(m, q)][s][t] for s in seeds if t in val[(m, q)][s]])
             for t in steps]
      row.append(cell([test[(m, q)][s] for s in sorted(test[(m, q)])]))
      print(f"| {NAMES[m]} | " + " | ".join(row) + " |")
  for q in quants:
    print(f"\n### {q.upper()}: ranking by mean validation accuracy\n")
    for t in steps:
      means = {m: statistics.mean(c[t] for c in val[(m, qq)].values())
               for (m, qq) in val if qq == q}
      print(f"- step {t}: " + " > ".join(
          f"{m} {v:.2f}" for m, v in sorted(means.items(),
                                            key=lambda kv: -kv[1])))
    print(f"\n### {q.upper()}: DQ both (direct) minus each method, per seed "
          "(final validation; final test)\n")
    last = steps[-1]
    for m in ORDER:
      if m in ("dq", "float") or (m, q) not in val:
        continue
      seeds = sorted(set(val[("dq", q)]) & set(val[(m, q)]))
      dv = [val[("dq", q)][s][last] - val[(m, q)][s][last] for s in seeds]
      dt = [test[("dq", q)][s] - test[(m, q)][s] for s in seeds
            if s in test[("dq", q)] and s in test[(m, q)]]
      print(f"- vs {m}: validation " + ", ".join(f"{x:+.2f}" for x in dv)
            + "; test " + ", ".join(f"{x:+.2f}" for x in dt))
  plot(out_dir, val, quants, steps)


def plot(out_dir, val, quants, steps):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(quants), figsize=(6 * len(quants), 4.5),
                           squeeze=False)
  axes = axes[0]
  for ax, q in zip(axes, quants):
    for m in ORDER:
      if (m, q) not in val:
        continue
      curves = val[(m, q)].values()
      ys = [statistics.mean(c[t] for c in curves) for t in steps]
      ax.plot(steps, ys, marker="o", label=NAMES[m],
              linestyle="--" if "ste" in m else "-")
    ax.set_title(f"{q.upper()} (first/last 8-bit), mean of 3 seeds")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)


if __name__ == "__main__":
  main(*sys.argv[1:])
