"""Redraws a sweep's pareto.png from its summary.md table.

For a study whose results.jsonl was not kept: the table's costs are rounded
to 3 significant digits, which a log-scale plot does not show.

  .venv/bin/python scripts/plot_summary.py DIR/summary.md DIR/pareto.png \
      --title "fashion_mnist: accuracy vs cost"
"""

import argparse
import re

from aqt_ext import pareto

_SI = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _number(cell: str) -> float:
  m = re.fullmatch(r"([0-9.]+)([kMGT]?)", cell.strip())
  if not m:
    raise ValueError(f"not a number with an SI suffix: {cell!r}")
  return float(m.group(1)) * _SI[m.group(2)]


def read_summary(path: str) -> list[pareto.Row]:
  """The rows of a `pareto.summary_markdown` table, frontier flags included."""
  rows = []
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
  want = ["model", "width", "quant", "method", "seeds", "accuracy (%)", "MACs",
          "BOPs", "weight bits", "on frontier"]
  if header != want:
    raise ValueError(f"{path}: table columns {header}, expected {want}")
  for line in lines[1:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    model, width, quant, method, seeds, acc, macs, bops, bits, front = cells
    ptq = method.endswith("(PTQ)")
    method = method.removesuffix("(PTQ)").strip()
    m = re.fullmatch(r"(.*?)_fl(\d+)", quant)
    acc_mean = float(acc.split("±")[0]) / 100
    spread = float(acc.split("±")[1]) / 100 if "±" in acc else 0.0
    rows.append(pareto.Row(
        model=model, width=float(width), quant=m.group(1) if m else quant,
        first_last=int(m.group(2)) if m else None,
        method=None if method == "-" else method, spec=quant,
        label=f"{method}:{quant}" if ptq else quant,
        kind="ptq" if ptq else "qat", seeds=int(seeds), accuracy=acc_mean,
        accuracy_min=acc_mean - spread, accuracy_max=acc_mean + spread,
        macs=_number(macs), bops=_number(bops), weight_bits=_number(bits),
        on_bops_frontier="BOPs" in front, on_weight_bits_frontier="bits" in front))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("summary")
  parser.add_argument("png")
  parser.add_argument("--title", default="")
  args = parser.parse_args()
  pareto.write_bytes_atomic(args.png, pareto.plot_pareto(
      read_summary(args.summary), args.title))


if __name__ == "__main__":
  main()
