"""Tables of the mixed-precision study (configs/sweep_mixed_precision.py).

  python experiments/mixed_precision/analyze_study.py \
      workdirs/sweep_mixed_precision > experiments/mixed_precision/study.md

Reads the sweep's results.jsonl: per model and budget (the BOPs of uniform
wNaN first/last 8-bit), uniform QAT and mixed precision (`mp`), both
fine-tuned from the same float model for the same 0.5 epoch, evaluated on
the 5,000-image validation split; the margin mp - uniform paired by seed;
and the widths mp gave each layer (per seed).
"""

import collections
import json
import statistics
import sys


MP_METHODS = ("mp", "mp_min3")


def main(sweep_dir: str) -> None:
  latest = {}
  with open(f"{sweep_dir}/results.jsonl") as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        latest[r["id"]] = r
  ok = [r for r in latest.values() if r["status"] == "ok"]
  failed = [r["id"] for r in latest.values() if r["status"] != "ok"]
  by = collections.defaultdict(dict)
  for r in ok:
    a = r["axes"]
    key = (a["model"], a["width"], a["quant"], a["method"] or "float")
    by[key][a["seed"]] = r
  models = sorted({(k[0], k[1]) for k in by}, key=lambda m: m[0],
                  reverse=True)
  print("| model | budget | method | float acc | uniform acc | mp acc | "
        "mp - uniform (per seed) | mean margin | mp BOPs / budget |")
  print("|---|---|---|---|---|---|---|---|---|")
  widths_tables = []
  for model, width in models:
    floats = by[(model, width, "float", "float")]
    for quant in ("w3a3", "w4a4", "w6a6"):
      for method in MP_METHODS:
        uni = by.get((model, width, quant, "uniform"), {})
        mp = by.get((model, width, quant, method), {})
        seeds = sorted(set(uni) & set(mp))
        if not seeds:
          continue
        margins = [mp[s]["eval_accuracy"] - uni[s]["eval_accuracy"]
                   for s in seeds]

        def stat(points, seeds=seeds):
          v = [points[s]["eval_accuracy"] * 100 for s in seeds]
          sd = statistics.stdev(v) if len(v) > 1 else 0.0
          return f"{statistics.mean(v):.2f} ± {sd:.2f}"

        ratio = min(mp[s]["bops"] / mp[s]["mp"]["budget_bops"] for s in seeds)
        print(f"| {model} x{width:g} | {quant}_fl8 | {method} | "
              f"{stat(floats)} | {stat(uni)} | {stat(mp)} | "
              f"{', '.join(f'{100 * m:+.2f}' for m in margins)} | "
              f"{100 * statistics.mean(margins):+.2f} | >= {ratio:.4f} |")
        layers = list(mp[seeds[0]]["mp"]["widths"])
        rows = [f"| {layer} | " + " | ".join(
            "w{}a{}".format(*mp[s]["mp"]["widths"][layer]) for s in seeds)
                + " |" for layer in layers]
        widths_tables.append(
            f"\n{model} x{width:g}, budget {quant}_fl8, {method} "
            f"(uniform: every layer {quant}, first/last w8a8)\n\n"
            f"| layer | {' | '.join(f'seed {s}' for s in seeds)} |\n"
            f"|---|{'---|' * len(seeds)}\n" + "\n".join(rows))
  print(f"\n{len(ok)} points ok, {len(failed)} failed"
        + (f": {failed}" if failed else ""))
  print("\n## Widths chosen by mixed precision (weight bits, input bits)")
  print("\n".join(widths_tables))


if __name__ == "__main__":
  main(sys.argv[1])
