"""Pareto analysis of a sweep: which bit width and model size is best per cost.

Pure functions over result records (the ``status: ok`` lines of a sweep's
``results.jsonl``, see `aqt_ext.sweep`), plus writers:

* `aggregate`: one `Row` per configuration (model, width, quant, first/last,
  method), accuracy averaged over seeds (mean, min, max).
* `frontier_mask`: the non-dominated items when the cost is lower-is-better
  and the quality higher-is-better. `mark_frontiers` applies it to the rows in
  (BOPs, accuracy) and in (weight bits, accuracy), on the mean accuracy.
* `summary_markdown`, `frontier_csv`, `plot_pareto` (PNG bytes, matplotlib
  with the Agg backend) and `write_report`, which writes ``summary.md``,
  ``frontier.csv`` and ``pareto.png`` atomically (temp file + os.replace).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from aqt_ext import fileio

CONFIG_AXES = ("model", "width", "quant", "first_last", "method")
REPORT_FILES = ("summary.md", "frontier.csv", "pareto.png")


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration, its accuracy aggregated over seeds.

  Attributes:
    model, width, quant, first_last, method: the configuration's axes
      (`method` is None for an unquantized model).
    spec: the full quant spec string the model trained with.
    label: the curve it belongs to: the spec, or ``method:spec`` for PTQ.
    kind: 'qat' (trained with its quantizers) or 'ptq' (quantized after
      training).
    seeds: how many seeds were aggregated.
    accuracy, accuracy_min, accuracy_max: mean, min and max accuracy on
      the evaluation split.
    split: that split, the records' ``eval_split`` ('test' for records
      written before the field existed).
    macs, bops, weight_bits: cost of one inference (`aqt_ext.cost`).
    on_bops_frontier, on_weight_bits_frontier: non-dominated in (BOPs,
      accuracy) / (weight bits, accuracy).
  """

  model: str
  width: float
  quant: str
  first_last: int | None
  method: str | None
  spec: str
  label: str
  kind: str
  seeds: int
  accuracy: float
  accuracy_min: float
  accuracy_max: float
  macs: float
  bops: float
  weight_bits: float
  on_bops_frontier: bool = False
  on_weight_bits_frontier: bool = False
  split: str = "test"

  @property
  def quant_label(self) -> str:
    """The quant axis with its first/last policy, e.g. ``w4a4_fl8``."""
    return self.quant + (f"_fl{self.first_last}" if self.first_last else "")

  @property
  def model_label(self) -> str:
    """Short model size label, e.g. ``resnet8 x0.5``."""
    return f"{self.model.removeprefix('cifar_')} x{self.width:g}"


# ---------------------------------------------------------------------------
# Pure analysis.
# ---------------------------------------------------------------------------

def frontier_mask(costs: Sequence[float], qualities: Sequence[float]
                  ) -> list[bool]:
  """Which items are Pareto-optimal (lower cost, higher quality is better).

  Item j dominates item i when it costs no more, is no worse, and is strictly
  better in at least one of the two. Exact ties dominate neither other, so
  identical items are all on the frontier.
  """
  if len(costs) != len(qualities):
    raise ValueError(f"costs ({len(costs)}) and qualities ({len(qualities)}) "
                     "must have the same length")

  def dominated(i: int) -> bool:
    return any(
        costs[j] <= costs[i] and qualities[j] >= qualities[i]
        and (costs[j] < costs[i] or qualities[j] > qualities[i])
        for j in range(len(costs)))

  return [not dominated(i) for i in range(len(costs))]


def _config_key(record: Mapping[str, Any]) -> tuple:
  """`CONFIG_AXES`, then the fine-tuning overrides (a point fine-tuned from
  the float model is another configuration than one trained from
  scratch)."""
  axes = record["axes"]
  return tuple(axes[k] for k in CONFIG_AXES) + (
      json.dumps(axes.get("finetune"), sort_keys=True),)


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[Row]:
  """One Row per configuration (all axes but the seed), sorted by BOPs.

  Each record needs ``axes`` (with the keys of `CONFIG_AXES`), ``spec``,
  ``eval_accuracy``, ``macs``, ``bops`` and ``weight_bits``. Cost does not
  depend on the seed; the first record's is kept.
  """
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in records:
    groups.setdefault(_config_key(r), []).append(r)
  rows = []
  for key, group in groups.items():
    acc = [float(r["eval_accuracy"]) for r in group]
    first = group[0]
    splits = {r.get("eval_split", "test") for r in group}
    if len(splits) > 1:
      raise ValueError(f"the seeds of configuration {key} were evaluated on "
                       f"different splits ({', '.join(sorted(splits))}); "
                       "their accuracies cannot be averaged")
    rows.append(Row(**dict(zip(CONFIG_AXES, key[:len(CONFIG_AXES)])),
                    spec=first["spec"],
                    label=first.get("label", first["spec"]),
                    kind=first.get("kind", "qat"),
                    seeds=len(group), accuracy=sum(acc) / len(acc),
                    accuracy_min=min(acc), accuracy_max=max(acc),
                    macs=first["macs"], bops=first["bops"],
                    weight_bits=first["weight_bits"], split=splits.pop()))
  return sorted(rows, key=lambda r: (r.bops, -r.accuracy))


def mark_frontiers(rows: Sequence[Row]) -> list[Row]:
  """`rows` with their (BOPs, accuracy) and (weight bits, accuracy) flags."""
  acc = [r.accuracy for r in rows]
  on_bops = frontier_mask([r.bops for r in rows], acc)
  on_bits = frontier_mask([r.weight_bits for r in rows], acc)
  return [dataclasses.replace(r, on_bops_frontier=b, on_weight_bits_frontier=w)
          for r, b, w in zip(rows, on_bops, on_bits)]


def summarize(records: Iterable[Mapping[str, Any]]) -> list[Row]:
  """Aggregated rows with their frontier flags."""
  return mark_frontiers(aggregate(records))


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------

def _si(x: float) -> str:
  """3 significant digits with an SI suffix: 1.23M, 45.6G."""
  for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.3g}{suffix}"
  return f"{x:.3g}"


def _accuracy_cell(row: Row) -> str:
  mean = f"{100 * row.accuracy:.2f}"
  if row.seeds == 1:
    return mean
  return f"{mean} ± {50 * (row.accuracy_max - row.accuracy_min):.2f}"


def _split_label(rows: Sequence[Row]) -> str:
  """The evaluation split(s) of `rows`: 'test', 'validation', or both."""
  return " / ".join(sorted({r.split for r in rows})) or "test"


def _first_line(text: str | None) -> str:
  return text.splitlines()[0] if text else ""


def _frontier_cell(row: Row) -> str:
  return ", ".join(name for name, on in (("BOPs", row.on_bops_frontier),
                                         ("bits", row.on_weight_bits_frontier))
                   if on)


def summary_markdown(rows: Sequence[Row],
                     failed: Sequence[Mapping[str, Any]] = ()) -> str:
  """Markdown table of `rows`, then the failed points and their errors."""
  lines = [
      "| model | width | quant | method | seeds | accuracy (%) | MACs | BOPs "
      "| weight bits | on frontier |",
      "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(
        f"| {r.model} | {r.width:g} | {r.quant_label} | {r.method or '-'}"
        f"{' (PTQ)' if r.kind == 'ptq' else ''} | "
        f"{r.seeds} | {_accuracy_cell(r)} | {_si(r.macs)} | {_si(r.bops)} | "
        f"{_si(r.weight_bits)} | {_frontier_cell(r)} |")
  lines += ["", f"Accuracy: {_split_label(rows)} accuracy, mean over seeds "
            "± half the min-max range. On frontier: not dominated in (BOPs, accuracy) and/or "
            "(weight bits, accuracy)."]
  if failed:
    lines += ["", f"Failed points ({len(failed)}; retried on the next run):",
              ""]
    lines += [f"- `{f['id']}`: {_first_line(f.get('error'))}" for f in failed]
  return "\n".join(lines) + "\n"


def frontier_csv(rows: Sequence[Row]) -> str:
  """CSV of the rows on either frontier, sorted by BOPs."""
  fields = ("model", "width", "quant", "first_last", "method", "kind",
            "spec", "seeds", "accuracy", "accuracy_min", "accuracy_max", "macs",
            "bops", "weight_bits", "on_bops_frontier",
            "on_weight_bits_frontier")
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(fields)
  for r in rows:
    if r.on_bops_frontier or r.on_weight_bits_frontier:
      writer.writerow(["" if getattr(r, f) is None else getattr(r, f)
                       for f in fields])
  return out.getvalue()


# ---------------------------------------------------------------------------
# Plot.
# ---------------------------------------------------------------------------

# A curve's colour says its bit width, its line and marker say its method.
_FLOAT_COLOUR = "black"
_BITS_COLOURS = {8: "tab:blue", 6: "tab:cyan", 5: "tab:olive", 4: "tab:green",
                 3: "tab:orange", 2: "tab:red", 1: "tab:purple"}
_METHOD_STYLES = (  # (method prefix of the label, line style, marker)
    ("rtn", "--", "s"), ("pwlq", ":", "^"), ("rex", "-.", "D"),
    ("aquant", (0, (3, 1, 1, 1, 1, 1)), "v"))
_QAT_STYLE = ("-", "o")
_MP_STYLES = {  # mixed-precision methods: (line style, marker)
    "mp": ((0, (5, 2)), "*"), "mp_hessian": (":", "P"),
    "mp_min3": ((0, (1, 1)), "d")}
BAND_POINTS = 12.0  # [design] the zoomed band spans >= this many points


def _weight_bits_of(row: Row) -> int | None:
  """The weight bit width of a quantized row's spec (``w4a4`` -> 4)."""
  head = row.quant.split("_")[0]
  if head.startswith("w") and "a" in head:
    bits = head[1:head.index("a")]
    return int(bits) if bits.isdigit() else None
  return None


def curve_style(row: Row) -> tuple[str, Any, str]:
  """(colour, line style, marker) of the curve `row` belongs to."""
  bits = _weight_bits_of(row)
  colour = _FLOAT_COLOUR if bits is None else _BITS_COLOURS.get(bits, "0.4")
  if row.kind == "ptq":
    for prefix, ls, marker in _METHOD_STYLES:
      if (row.method or "").startswith(prefix):
        return colour, ls, marker
    return colour, "--", "X"
  if row.kind == "mp":
    return (colour,) + _MP_STYLES.get(row.method or "", ((0, (3, 1, 1, 1)),
                                                         "h"))
  return (colour,) + _QAT_STYLE


def accuracy_band(rows: Sequence[Row]) -> tuple[float, float]:
  """The y range (accuracy, %) that the main axes show.

  It spans every frontier point and everything within `BAND_POINTS` of the
  best accuracy, so a few collapsed runs (e.g. 2-bit PTQ at chance) cannot
  squeeze the informative band into a sliver; the points below it are drawn
  on a short axis of their own (see `plot_pareto`).
  """
  acc = [100 * r.accuracy for r in rows]
  front = [100 * r.accuracy for r in rows
           if r.on_bops_frontier or r.on_weight_bits_frontier] or acc
  top = max(acc)
  lo = min(min(front), top - BAND_POINTS)
  lo = max(min(acc), lo)
  pad = max(0.06 * (top - lo), 0.5)
  return lo - pad, top + pad


def _curves(rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
  """Rows grouped by label (one curve each), most bits per MAC first."""
  groups: dict[str, list[Row]] = {}
  for r in rows:
    groups.setdefault(r.label, []).append(r)
  return sorted(((spec, sorted(g, key=lambda r: r.bops))
                 for spec, g in groups.items()),
                key=lambda item: -item[1][0].bops / max(item[1][0].macs, 1))


def _draw(ax, rows: Sequence[Row], cost: str, flag: str, scale: float,
          frontier: bool = True) -> None:
  """Curves (and the frontier) of one panel on one axes."""
  for label, group in _curves(rows):
    colour, ls, marker = curve_style(group[0])
    x = [getattr(r, cost) * scale for r in group]
    y = [100 * r.accuracy for r in group]
    err = [[100 * (r.accuracy - r.accuracy_min) for r in group],
           [100 * (r.accuracy_max - r.accuracy) for r in group]]
    ax.errorbar(x, y, yerr=err if any(r.seeds > 1 for r in group) else None,
                color=colour, ls=ls, marker=marker, ms=5, lw=1.3, capsize=2,
                alpha=0.9)
  ax.set_xscale("log")
  ax.grid(True, which="both", alpha=0.3)
  if not frontier:
    return
  front = sorted((r for r in rows if getattr(r, flag)),
                 key=lambda r: getattr(r, cost))
  fx = [getattr(r, cost) * scale for r in front]
  fy = [100 * r.accuracy for r in front]
  ax.plot(fx, fy, color="0.3", ls="-", lw=0.8, drawstyle="steps-post",
          zorder=3)
  ax.scatter(fx, fy, s=130, facecolors="none", edgecolors="k", lw=1.2,
             zorder=4)


_LABEL_OFFSETS = ((6, 6), (6, -20), (-8, 10), (-8, -24), (6, 22), (6, -36),
                  (-8, 26), (-8, -40))  # points; right/left x above/below
_LABEL_FONT = 6.5


def _label_frontier(ax, rows: Sequence[Row], cost: str, flag: str,
                    scale: float) -> None:
  """Labels each frontier point (model and spec), placing each label at the
  first offset whose box overlaps no label placed before it."""
  fig_dpi = ax.figure.dpi
  placed: list[tuple[float, float, float, float]] = []
  front = sorted((r for r in rows if getattr(r, flag)),
                 key=lambda r: getattr(r, cost))
  for r in front:
    text = f"{r.model_label}\n{r.label}"
    w = 0.6 * _LABEL_FONT * max(map(len, text.split("\n")))  # points
    h = 1.25 * _LABEL_FONT * 2
    px, py = ax.transData.transform((getattr(r, cost) * scale,
                                     100 * r.accuracy)) * 72 / fig_dpi
    for dx, dy in _LABEL_OFFSETS:
      x0 = px + dx if dx > 0 else px + dx - w
      box = (x0, py + dy, x0 + w, py + dy + h)
      if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3]
                 and b[1] < box[3] for b in placed):
        break
    placed.append(box)
    ax.annotate(text, (getattr(r, cost) * scale, 100 * r.accuracy),
                textcoords="offset points", xytext=(dx, dy),
                ha="left" if dx > 0 else "right", va="bottom",
                fontsize=_LABEL_FONT, color="0.2")


def _legend_handles(rows: Sequence[Row]) -> list[Any]:
  """Proxy artists: a colour per weight bit width, a line per method, and
  the frontier circle."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  by_bits: dict[int | None, Row] = {}
  for r in sorted(rows, key=lambda r: -(_weight_bits_of(r) or 99)):
    by_bits.setdefault(_weight_bits_of(r), r)
  by_method: dict[str, Row] = {}
  for r in rows:
    by_method.setdefault(
        f"{r.method} (PTQ)" if r.kind == "ptq" else
        f"{r.method} (mixed precision)" if r.kind == "mp" else
        "QAT (and float)", r)
  handles = [Line2D([], [], color=curve_style(r)[0], lw=6, alpha=0.8,
                    label="float" if bits is None else f"w{bits}")
             for bits, r in by_bits.items()]
  handles += [Line2D([], [], color="0.3", ls=curve_style(r)[1],
                     marker=curve_style(r)[2], label=name)
              for name, r in by_method.items()]
  handles.append(Line2D([], [], ls="none", marker="o", ms=11, mfc="none",
                        mec="k", label="Pareto frontier"))
  return handles


def plot_pareto(rows: Sequence[Row], title: str = "") -> bytes:
  """PNG: accuracy vs BOPs and vs weight memory, both on log x axes.

  Colour is the weight bit width, line and marker the method (QAT solid,
  each PTQ method its own dashes), circles the Pareto frontier, and only
  frontier points are labelled. The main axes show `accuracy_band`; points
  below it go on a short axis underneath, so they stay visible without
  crushing the band.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  lo, hi = accuracy_band(rows)
  below = [r for r in rows if 100 * r.accuracy < lo]
  if below:
    fig, axes = plt.subplots(2, 2, figsize=(14, 6.8), sharex="col",
                             gridspec_kw={"height_ratios": [4, 1],
                                          "hspace": 0.06})
    tops, bottoms = axes[0], axes[1]
  else:
    fig, tops = plt.subplots(1, 2, figsize=(14, 5.6))
    bottoms = [None, None]
  panels = (("bops", "on_bops_frontier", "BOPs per image (log)", 1.0),
            ("weight_bits", "on_weight_bits_frontier",
             "weight memory (KiB, log)", 1 / 8 / 1024))
  for top, bottom, (cost, flag, xlabel, scale) in zip(tops, bottoms, panels):
    _draw(top, rows, cost, flag, scale)
    top.set_ylim(lo, hi)
    top.set_ylabel(f"{_split_label(rows)} accuracy (%)")
    if bottom is None:
      top.set_xlabel(xlabel)
      continue
    _draw(bottom, rows, cost, flag, scale, frontier=False)  # none below
    b_lo = min(100 * r.accuracy for r in below)
    pad = 0.08 * max(lo - b_lo, 1.0)
    bottom.set_ylim(b_lo - pad, lo)
    bottom.set_xlabel(xlabel)
    bottom.set_ylabel("below\nband", fontsize=8)
    top.spines["bottom"].set_visible(False)
    bottom.spines["top"].set_visible(False)
    top.tick_params(bottom=False, which="both")
    kw = dict(transform=top.transAxes, color="k", clip_on=False, lw=1)
    top.plot((-0.01, 0.01), (-0.01, 0.01), **kw)
    top.plot((0.99, 1.01), (-0.01, 0.01), **kw)
  fig.legend(handles=_legend_handles(rows), loc="center right", fontsize=8,
             frameon=False)
  fig.suptitle(title or "accuracy vs cost")
  fig.subplots_adjust(left=0.06, right=0.86, top=0.92, bottom=0.09,
                      wspace=0.18)
  for top, (cost, flag, _, scale) in zip(tops, panels):
    top.autoscale_view()
    _label_frontier(top, rows, cost, flag, scale)  # once the layout is fixed
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return buf.getvalue()


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------

write_bytes_atomic = fileio.write_bytes_atomic  # the package's one writer


def write_report(rows: Sequence[Row], failed: Sequence[Mapping[str, Any]],
                 out_dir: str, title: str = "") -> str:
  """Writes summary.md, frontier.csv and pareto.png; returns the table."""
  table = summary_markdown(rows, failed)
  write_bytes_atomic(os.path.join(out_dir, "summary.md"), table.encode())
  write_bytes_atomic(os.path.join(out_dir, "frontier.csv"),
                     frontier_csv(rows).encode())
  write_bytes_atomic(os.path.join(out_dir, "pareto.png"),
                     plot_pareto(rows, title))
  return table


__all__ = ["Row", "aggregate", "frontier_mask", "mark_frontiers", "summarize",
           "summary_markdown", "frontier_csv", "plot_pareto", "write_report",
           "write_bytes_atomic", "accuracy_band", "curve_style",
           "REPORT_FILES"]
