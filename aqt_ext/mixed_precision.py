"""Mixed precision under a cost budget: per-layer widths from a checkpoint.

  python -m aqt_ext.mixed_precision --config=configs/fashion_mnist_float.py \\
      --checkpoint=workdirs/fm_float --budget_from=w4a4_fl8 --out=DIR

1. The layers and their costs come from the cost model of the config's
   model (`aqt_ext.cost`); the budget (``--budget_bops``,
   ``--budget_weight_bits``, or ``--budget_from``: the BOPs of a uniform
   spec such as ``w4a4_fl8``) is checked against the smallest and largest
   achievable cost before anything runs.
2. Sensitivities (`aqt_ext.search.sensitivity`, ``--method``) of each layer
   at each candidate (weight bits, input bits) in ``--bits`` x ``--bits``
   (with ``--budget_from``, its widths are added to ``--bits``: the uniform
   allocation is always a candidate), on ``--num_batches`` unaugmented *training* batches of the checkpoint's
   model (the held-out validation split and the test set are not read),
   made consistent (`sensitivity.monotone`: clipped at 0, never larger at
   more bits; the raw estimates are kept in allocation.json).
   ``--fixed_first_last=B`` keeps the first and last layer at B/B bits (as
   the ``_flB`` uniform baselines do; 0: allocate them too).
3. The exact allocation (`aqt_ext.search.allocate`) and its outputs in
   ``--out``: ``rules.json`` (a `ModelQuant` of ``uniform`` layers, one rule
   per layer; a training config names it as ``--config.quant=DIR/rules.json``),
   ``allocation.json`` (budget, totals, sensitivities, choice, the command)
   and ``table.md`` (layer, widths, cost shares, sensitivity).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from aqt_ext import fileio
from aqt_ext import config as qconfig
from aqt_ext.search import allocate as al

ALLOCATION_FILE, RULES_FILE, TABLE_FILE = ("allocation.json", "rules.json",
                                           "table.md")


def _linen_model(config: ml_collections.ConfigDict, num_classes: int,
                 quant: qconfig.ModelQuant):
  from aqt_ext import models  # pylint: disable=g-import-not-at-top
  return models.create_model(config.model, num_classes=num_classes,
                             width=config.width, quant=quant)


def candidates_of(bits: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Every (weight bits, input bits) pair of `bits`."""
  bits = sorted(set(bits))
  if not bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in bits):
    raise ValueError(f"bits={list(bits)!r} is not allowed; allowed: a "
                     "non-empty list of ints in 2..8")
  return tuple((w, a) for w in bits for a in bits)


def rules_of(allocation: al.Allocation, signed: Sequence[bool]
             ) -> qconfig.ModelQuant:
  """One ``uniform`` rule per layer (exact path match), its input signed
  where `signed` says (the first layer)."""
  return qconfig.ModelQuant(rules=tuple(
      (f"^{re.escape(l.path)}$", qconfig.layer_preset(
          "uniform", c[0], c[1], signed_input=s))
      for l, c, s in zip(allocation.layers, allocation.choice, signed)))


def candidate_bits(bits: Sequence[int], budget_from: str | None
                   ) -> list[int]:
  """`bits` (checked) plus the widths of the uniform spec `budget_from`:
  the allocation the budget comes from is always a candidate, so the
  allocator never does worse than it on its own objective."""
  candidates_of(bits)
  out = set(bits)
  if budget_from is not None:
    default = qconfig.parse_spec(budget_from).default
    out |= {t.bits for t in (default.weight, default.input)
            if t is not None and t.bits is not None}
  return sorted(out)


def budget_of(config: ml_collections.ConfigDict, num_classes: int,
              image_shape: Sequence[int], spec: str) -> float:
  """The BOPs of the config's model quantized by a uniform `spec`."""
  from aqt_ext import cost, models  # pylint: disable=g-import-not-at-top
  mq = models.quant_spec(spec)
  return cost.model_cost(_linen_model(config, num_classes, mq),
                         tuple(image_shape), train=False).bops


def format_table(allocation: al.Allocation) -> str:
  rows = allocation.table()
  out = ["| layer | W | A | BOPs share | memory share | sensitivity |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['layer']} | {r['weight_bits']} | {r['input_bits']} | "
               f"{r['bops_share']:.3f} | {r['memory_share']:.3f} | "
               f"{r['sensitivity']:.3g} |")
  out.append(f"| total | | | {allocation.bops:,.0f} BOPs | "
             f"{allocation.weight_bits:,.0f} bits | "
             f"{allocation.objective:.3g} |")
  return "\n".join(out) + "\n"


def run(config: ml_collections.ConfigDict, checkpoint: str, out: str, *,
        budget_bops: float | None = None,
        budget_weight_bits: float | None = None,
        budget_from: str | None = None, bits: Sequence[int] = (2, 3, 4, 8),
        method: str = "loss_delta", num_batches: int = 4,
        fixed_first_last: int = 8, hutchinson_samples: int = 8,
        command: str | None = None) -> dict:
  """Allocates per-layer widths (module docstring); returns what
  ``allocation.json`` holds."""
  from aqt_ext import cost, data as data_lib, models, train  # pylint: disable=g-import-not-at-top
  from aqt_ext.search import sensitivity as sens  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if method not in sens.METHODS:
    raise ValueError(f"method={method!r} is not allowed; allowed: "
                     f"{', '.join(map(repr, sens.METHODS))}")
  if isinstance(num_batches, bool) or not (isinstance(num_batches, int)
                                           and num_batches >= 1):
    raise ValueError(f"num_batches={num_batches!r} is not allowed; allowed: "
                     "an int >= 1")
  if fixed_first_last not in (0, *range(2, 9)):
    raise ValueError(f"fixed_first_last={fixed_first_last!r} is not allowed; "
                     "allowed: 0 (allocate them) or bits in 2..8")
  cands = candidates_of(candidate_bits(bits, budget_from))
  if budget_from is not None and budget_bops is not None:
    raise ValueError("give budget_bops or budget_from, not both")
  info = data_lib.get_info(config.dataset, config.data_dir)
  image_shape = tuple(info.image_shape)
  if budget_from is not None:
    budget_bops = budget_of(config, info.num_classes, image_shape,
                            budget_from)
  model = _linen_model(config, info.num_classes, qconfig.ModelQuant())
  layers = {l.path: l for l in cost.model_cost(
      model, image_shape, train=False).layers}
  fixed = {}
  if fixed_first_last:
    for p in layers:
      if re.search(models.FIRST_LAYER, p) or re.search(models.LAST_LAYER, p):
        fixed[p] = (fixed_first_last, fixed_first_last)

  def alloc_layers(sensitivity):
    return [al.Layer(p, l.macs, l.weights,
                     (fixed[p],) if p in fixed else cands,
                     (0.0,) if p in fixed else tuple(sensitivity[i]))
            for i, (p, l) in enumerate(layers.items())]

  # The budget is checked before any work.
  al.check_budgets(alloc_layers(np.zeros((len(layers), len(cands)))),
                   budget_bops, budget_weight_bits)
  variables = train.load_float_variables(checkpoint)
  probe = sens.make_probe(model, variables, image_shape, models.FIRST_LAYER)
  if probe.paths != tuple(layers):
    raise ValueError("the probe's layers differ from the cost model's")
  data_lib.ensure_prepared(config.dataset, config.data_dir)
  stream = data_lib.make_train_stream(
      config.dataset, config.batch_size, config.seed, config.data_dir,
      augment=False, num_examples=config.num_train_examples,
      validation_examples=config.validation_examples)
  batches = [stream.batch(i) for i in range(num_batches)]
  kw = dict(num_samples=hutchinson_samples) if method == "hessian" else {}
  t1 = time.time()
  raw = sens.estimate(method, probe, batches, cands, **kw)
  s = sens.monotone(raw, cands)
  sens_time = time.time() - t1
  allocation = al.allocate(alloc_layers(s), budget_bops=budget_bops,
                           budget_weight_bits=budget_weight_bits)
  rules = rules_of(allocation, probe.signed)
  os.makedirs(out, exist_ok=True)
  record = dict(
      command=command, checkpoint=checkpoint, method=method,
      candidates=[list(c) for c in cands], fixed=fixed,
      num_batches=num_batches, batch_size=config.batch_size,
      budget_bops=budget_bops, budget_weight_bits=budget_weight_bits,
      budget_from=budget_from, bops=allocation.bops,
      weight_bits=allocation.weight_bits, objective=allocation.objective,
      layers=allocation.table(),
      sensitivity={p: dict(zip(map(str, cands), map(float, row)))
                   for p, row in zip(layers, s)},
      sensitivity_raw={p: dict(zip(map(str, cands), map(float, row)))
                       for p, row in zip(layers, raw)},
      sensitivity_time_s=round(sens_time, 2),
      wall_time_s=round(time.time() - t0, 2))
  qconfig.save_rules(rules, os.path.join(out, RULES_FILE))
  fileio.write_text_atomic(os.path.join(out, TABLE_FILE),
                           format_table(allocation))
  fileio.write_text_atomic(os.path.join(out, ALLOCATION_FILE),
                           json.dumps(record, indent=1) + "\n")
  return record


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  budgets = [f.budget_bops, f.budget_weight_bits, f.budget_from]
  if all(b is None for b in budgets):
    raise ValueError("give --budget_bops, --budget_weight_bits and/or "
                     "--budget_from")
  record = run(f.config, f.checkpoint, f.out, budget_bops=f.budget_bops,
               budget_weight_bits=f.budget_weight_bits,
               budget_from=f.budget_from, bits=[int(b) for b in f.bits],
               method=f.method, num_batches=f.num_batches,
               fixed_first_last=f.fixed_first_last,
               hutchinson_samples=f.hutchinson_samples,
               command=" ".join(sys.argv))
  print(open(os.path.join(f.out, TABLE_FILE)).read())
  print(f"rules: {os.path.join(f.out, RULES_FILE)} ({record['bops']:,.0f} "
        f"BOPs, budget {record['budget_bops'] or 0:,.0f})")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training config (model, "
                                  "dataset) of the checkpoint.")
  flags.DEFINE_string("checkpoint", None, "Workdir of a finished run.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_float("budget_bops", None, "BOPs budget (one example).")
  flags.DEFINE_float("budget_weight_bits", None, "Weight memory budget.")
  flags.DEFINE_string("budget_from", None, "A uniform spec whose BOPs are "
                      "the budget, e.g. w4a4_fl8.")
  flags.DEFINE_list("bits", ["2", "3", "4", "8"], "Candidate widths.")
  flags.DEFINE_enum("method", "loss_delta", ["loss_delta", "hessian"],
                    "Sensitivity estimate.")
  flags.DEFINE_integer("num_batches", 4, "Training batches for it.")
  flags.DEFINE_integer("fixed_first_last", 8, "Bits of the first and last "
                       "layer (0: allocate them).")
  flags.DEFINE_integer("hutchinson_samples", 8, "Rademacher vectors per "
                       "batch (method hessian).")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
