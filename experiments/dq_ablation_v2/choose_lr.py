"""Each method's learning rate for the DQ ablation v2: the rate with the
highest validation accuracy at W2A2, seed 0 (float: the float fine-tuning),
of {0.01, 0.03, 0.1} and, for a method whose best was at an edge, the next
rate out (0.003 or 0.3; run.sh lr_edge), from the lr-stage sweeps of
run.sh; prints the table and the main-stage commands.

  python experiments/dq_ablation_v2/choose_lr.py [ROOT=/tmp]
"""

import collections
import sys

from aqt_ext import sweep

RATES = ("0.003", "0.01", "0.03", "0.1", "0.3")  # 0.003, 0.3: lr_edge only


def main(root: str = "/tmp") -> None:
  acc = collections.defaultdict(dict)
  for lr in RATES:
    records, problems = sweep.read_results(
        f"{root}/dqv2_lr{lr}/{sweep.RESULTS_FILE}")
    for p in problems:
      print("warning:", p, file=sys.stderr)
    for r in sweep.latest_records(records).values():
      if r.get("status") == "ok":
        assert r["eval_split"] == "validation", r
        acc[r["axes"]["method"] or "float"][lr] = 100 * r["eval_accuracy"]
  print("| method | " + " | ".join(f"lr {lr}" for lr in RATES)
        + " | chosen |\n|---|" + "---:|" * (len(RATES) + 1))
  groups = collections.defaultdict(list)
  for method, by_lr in acc.items():
    missing = [lr for lr in RATES[1:-1] if lr not in by_lr]
    if missing:
      print(f"{method}: missing rates {missing}", file=sys.stderr)
      continue
    best = max(by_lr, key=lambda lr: by_lr[lr])  # first on ties
    if best in (RATES[1], RATES[-2]) and not {RATES[0], RATES[-1]} & set(by_lr):
      print(f"{method}: best rate {best} is at the grid's edge; run "
            "run.sh lr_edge", file=sys.stderr)
    groups[best].append(method)
    print(f"| {method} | " + " | ".join(
        f"{by_lr[lr]:.2f}" if lr in by_lr else "-" for lr in RATES)
          + f" | {best} |")
  print()
  for lr, methods in sorted(groups.items()):
    qat = [m for m in methods if m != "float"]
    if qat:
      print(f"bash experiments/dq_ablation_v2/run.sh main {lr} "
            f"\"({','.join(repr(m) for m in qat)},)\"")
    if "float" in methods:
      print(f"bash experiments/dq_ablation_v2/run.sh float {lr}")


if __name__ == "__main__":
  main(*sys.argv[1:])
