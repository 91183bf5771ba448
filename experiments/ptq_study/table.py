"""Tables and plot of the PTQ study (configs/sweep_ptq_study.py).

  python experiments/ptq_study/table.py SWEEP_DIR > experiments/ptq_study/tables.md

Reads SWEEP_DIR/results.jsonl (the latest line of each point) and each
point's result.json (weight MSE, PTQ time); prints markdown: per bit width,
test accuracy mean ± std over the float checkpoints with the per-checkpoint
values, BOPs, weight MSE; then per-checkpoint differences for the
comparisons the study is about. Writes experiments/ptq_study/accuracy.png.
"""

import collections
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from aqt_ext import sweep

QUANTS = ("w8a8", "w4a8", "w4a4", "w2a4")
METHODS = ("rtn", "rtn_full", "pwlq", "pwlq_bc", "rex", "rex_sparse", "aquant")
LABELS = {
    "float": "float (BN folded)",
    "rtn": "rtn (2^b - 1 levels)",
    "rtn_full": "rtn, 2^b levels",
    "pwlq": "PWLQ",
    "pwlq_bc": "PWLQ + bias corr.",
    "rex": "REx K=2",
    "rex_sparse": "REx K=2, s=0.5",
    "aquant": "AQuant",
}
# (a, b): a minus b, per checkpoint.
PAIRS = (("pwlq", "rtn_full"), ("pwlq_bc", "pwlq"), ("rtn_full", "rtn"),
         ("rex", "rtn"), ("rex", "rex_sparse"), ("aquant", "rtn"))


def _fmt(values, scale=100.0, digits=2):
  v = [x * scale for x in values]
  sd = statistics.stdev(v) if len(v) > 1 else 0.0
  each = ", ".join(f"{x:.{digits}f}" for x in v)
  return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} ({each})"


def main(sweep_dir: str) -> None:
  records, problems = sweep.read_results(
      os.path.join(sweep_dir, "results.jsonl"))
  for p in problems:
    print(f"<!-- {p} -->")
  rows = collections.defaultdict(dict)  # (quant, method) -> seed -> result
  for rec in sweep.latest_records(records).values():
    if rec.get("status") != "ok":
      print(f"- point {rec['id']} status {rec.get('status')}")
      continue
    a = rec["axes"]
    method = "float" if a["quant"] == "float" else a["method"]
    path = os.path.join(sweep_dir, "points", rec["id"], "result.json")
    with open(path) as f:
      res = json.load(f)
    rows[(a["quant"], method)][a["seed"]] = res
  seeds = sorted({s for r in rows.values() for s in r})
  print(f"Test accuracy (%) mean ± std over the float checkpoints (seeds "
        f"{', '.join(map(str, seeds))}; per-checkpoint values in brackets). "
        "GBOPs per image; weight MSE: mean over checkpoints.\n")
  print("| bits | method | test accuracy % | GBOPs | weight MSE | PTQ s (mean) |")
  print("|---|---|---|---:|---:|---:|")
  order = [("float", "float")] + [(q, m) for q in QUANTS for m in METHODS]
  for q, m in order:
    r = rows.get((q, m))
    if not r:
      continue
    res = [r[s] for s in sorted(r)]
    acc = _fmt([x["eval_accuracy"] for x in res])
    gbops = res[0]["bops"] / 1e9
    mse = [x.get("weight_mse") for x in res]
    mse = f"{statistics.mean(mse):.2e}" if None not in mse else "-"
    t = [x.get("ptq_time_s") for x in res]
    t = f"{statistics.mean(t):.0f}" if None not in t else "-"
    print(f"| {q} | {LABELS[m]} | {acc} | {gbops:.3f} | {mse} | {t} |")
  print("\n### Per-checkpoint differences (test accuracy points)\n")
  for q in QUANTS:
    print(f"- **{q}**:")
    for a, b in PAIRS:
      ra, rb = rows.get((q, a), {}), rows.get((q, b), {})
      common = sorted(set(ra) & set(rb))
      if not common:
        continue
      d = [100 * (ra[s]["eval_accuracy"] - rb[s]["eval_accuracy"])
           for s in common]
      print(f"  {a} - {b}: " + ", ".join(f"{x:+.2f}" for x in d))
  _plot(rows, os.path.join(os.path.dirname(__file__), "accuracy.png"))


def _plot(rows, path: str) -> None:
  fig, axes = plt.subplots(1, len(QUANTS), figsize=(4 * len(QUANTS), 4),
                           sharey=False)
  for ax, q in zip(axes, QUANTS):
    for i, m in enumerate(METHODS):
      r = rows.get((q, m))
      if not r:
        continue
      acc = [100 * r[s]["eval_accuracy"] for s in sorted(r)]
      ax.scatter([i] * len(acc), acc, s=12, color=f"C{i}", alpha=0.6)
      ax.errorbar([i], [statistics.mean(acc)],
                  yerr=[statistics.stdev(acc) if len(acc) > 1 else 0],
                  fmt="o", color=f"C{i}", capsize=4)
    f = rows.get(("float", "float"))
    if f:
      ax.axhline(100 * statistics.mean(x["eval_accuracy"] for x in f.values()),
                 color="k", ls="--", lw=0.8, label="float")
    ax.set_xticks(range(len(METHODS)))
    ax.set_xticklabels([LABELS[m] for m in METHODS], rotation=60, ha="right",
                       fontsize=8)
    ax.set_title(f"{q.upper()}, every layer")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  fig.suptitle("PTQ of 3 float ResNet-8 x0.5 checkpoints (Fashion-MNIST); "
               "dots: checkpoints, bars: mean ± std")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
