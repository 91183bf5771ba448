"""The Pareto plot: its zoomed accuracy band, curve styles, and the PNG."""


import pytest

from aqt_ext import pareto


def _row(model, quant, acc, bops, kind="qat", method=None):
  method = method or (None if quant == "float" else "uniform")
  spec = quant if quant == "float" else f"{quant}_fl8"
  label = f"{method}:{spec}" if kind == "ptq" else spec
  return pareto.Row(model=model, width=0.5, quant=quant,
                    first_last=None if quant == "float" else 8, method=method,
                    spec=spec, label=label, kind=kind, seeds=1, accuracy=acc,
                    accuracy_min=acc, accuracy_max=acc, macs=bops / 8,
                    bops=bops, weight_bits=bops / 100)


def _study():
  rows = [_row("cifar_resnet8", "float", 0.875, 6e8),
          _row("cifar_resnet20", "float", 0.892, 2e9),
          _row("cifar_resnet8", "w8a8", 0.872, 1.5e8),
          _row("cifar_resnet8", "w4a4", 0.862, 4e7),
          _row("cifar_resnet8", "w4a4", 0.865, 4e7, "ptq", "pwlq_bc"),
          _row("cifar_resnet8", "w2a2", 0.60, 1.3e7),
          _row("cifar_resnet8", "w2a2", 0.17, 1.3e7, "ptq", "rtn"),
          _row("cifar_resnet14", "w2a2", 0.14, 2.4e7, "ptq", "rtn")]
  return pareto.mark_frontiers(rows)


def test_band_keeps_the_frontier_and_drops_collapsed_points():
  rows = _study()
  lo, hi = pareto.accuracy_band(rows)
  front = [100 * r.accuracy for r in rows
           if r.on_bops_frontier or r.on_weight_bits_frontier]
  assert all(lo < a < hi for a in front)
  assert hi > 100 * max(r.accuracy for r in rows)
  # The collapsed 2-bit PTQ points (14%, 17%) are dominated; the band leaves
  # them out and reaches no further down than the lowest frontier point (the
  # 60% w2a2 QAT one) plus a pad.
  below = sorted(100 * r.accuracy for r in rows if 100 * r.accuracy < lo)
  assert below == pytest.approx([14.0, 17.0])
  assert lo > min(front) - 3


def test_band_without_outliers_spans_the_data_only():
  rows = pareto.mark_frontiers([r for r in _study() if r.accuracy > 0.8])
  lo, hi = pareto.accuracy_band(rows)
  assert 100 * min(r.accuracy for r in rows) - 1 <= lo < 86.2
  assert 89.2 < hi <= 89.2 + 1


def test_curve_styles_colour_by_bits_and_dash_by_method():
  rows = {(r.quant, r.kind): r for r in _study()}
  w4_qat = pareto.curve_style(rows[("w4a4", "qat")])
  w4_ptq = pareto.curve_style(rows[("w4a4", "ptq")])
  w2_qat = pareto.curve_style(rows[("w2a2", "qat")])
  w2_ptq = pareto.curve_style(rows[("w2a2", "ptq")])
  assert w4_qat[0] == w4_ptq[0] != w2_qat[0] == w2_ptq[0]  # colour: bits
  assert w4_qat[1:] == w2_qat[1:] != w2_ptq[1:]  # line + marker: method
  assert pareto.curve_style(rows[("float", "qat")])[0] != w4_qat[0]


@pytest.mark.parametrize("keep_outliers", [True, False])
def test_plot_is_a_png(keep_outliers):
  rows = _study()
  if not keep_outliers:
    rows = pareto.mark_frontiers([r for r in rows if r.accuracy > 0.5])
  png = pareto.plot_pareto(rows, "t")
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_summary_reads_the_table_back(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parents[1] / "scripts" / "plot_summary.py"
  spec = importlib.util.spec_from_file_location("plot_summary", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  rows = _study()
  table = tmp_path / "summary.md"
  table.write_text(pareto.summary_markdown(rows))
  back = mod.read_summary(str(table))
  key = lambda r: (r.model, r.quant, r.kind, r.method)  # noqa
  assert sorted(map(key, back)) == sorted(map(key, rows))
  for a, b in zip(sorted(back, key=key), sorted(rows, key=key)):
    assert a.accuracy == pytest.approx(b.accuracy, abs=5e-5)
    assert a.bops == pytest.approx(b.bops, rel=5e-3)
    assert (a.on_bops_frontier, a.on_weight_bits_frontier) == (
        b.on_bops_frontier, b.on_weight_bits_frontier)
    assert a.label == b.label


def _record(seed, acc, split=None):
  r = {"axes": {"model": "cifar_resnet8", "width": 0.5, "quant": "w4a4",
                "first_last": 8, "method": "uniform", "seed": seed},
       "spec": "w4a4_fl8", "eval_accuracy": acc, "macs": 1.0, "bops": 2.0,
       "weight_bits": 3.0}
  if split is not None:
    r["eval_split"] = split
  return r


def test_tables_name_the_split_the_accuracy_was_measured_on():
  """A sweep evaluated on the validation split says so in its table; old
  records (no eval_split) were test-set numbers; seeds measured on
  different splits are not averaged."""
  (row,) = pareto.summarize([_record(0, 0.8, "validation"),
                             _record(1, 0.9, "validation")])
  assert row.split == "validation" and row.accuracy == pytest.approx(0.85)
  assert "Accuracy: validation accuracy" in pareto.summary_markdown([row])
  (old,) = pareto.summarize([_record(0, 0.8)])
  assert "Accuracy: test accuracy" in pareto.summary_markdown([old])
  with pytest.raises(ValueError, match="different splits"):
    pareto.summarize([_record(0, 0.8, "validation"), _record(1, 0.9, "test")])
