"""Per-layer bit widths under a cost budget, chosen exactly.

Given, for every quantizable layer ``l`` and every candidate ``c`` of its
``(weight bits, input bits)``, a sensitivity ``s[l, c]`` (the estimated loss
increase of quantizing ``l`` alone at ``c``, `aqt_ext.search.sensitivity`)
and its costs (BOPs ``macs_l * w_c * a_c``, weight memory ``weights_l *
w_c``), `allocate` picks one candidate per layer minimising ``sum_l s[l,
c_l]`` subject to the budgets: an integer program (binary ``x[l, c]``, one
per layer, linear budget rows) solved to optimality by HiGHS through
``scipy.optimize.milp``. The objective assumes the layers' losses add, as
HAWQ-v2 and ModelOpt's auto_quantize do. Among the choices of minimal
objective, the one that spends the most budget is taken (a second program).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

Candidate = tuple[int, int]  # (weight bits, input bits)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of the allocation: its path, MACs and weight count (one
  example, `aqt_ext.cost.LayerCost`), and the candidates it may take with
  their sensitivities (one per candidate)."""

  path: str
  macs: int
  weights: int
  candidates: tuple[Candidate, ...]
  sensitivity: tuple[float, ...]

  def bops(self, c: Candidate) -> float:
    return float(self.macs) * c[0] * c[1]

  def weight_bits(self, c: Candidate) -> float:
    return float(self.weights) * c[0]


@dataclasses.dataclass(frozen=True)
class Allocation:
  """The chosen candidate of each layer, with its totals."""

  layers: tuple[Layer, ...]
  choice: tuple[Candidate, ...]
  objective: float
  bops: float
  weight_bits: float

  def table(self) -> list[dict]:
    """One row per layer: path, widths, cost shares, sensitivity."""
    rows = []
    for layer, c in zip(self.layers, self.choice):
      rows.append(dict(
          layer=layer.path, weight_bits=c[0], input_bits=c[1],
          bops=layer.bops(c),
          bops_share=layer.bops(c) / self.bops if self.bops else 0.0,
          memory_bits=layer.weight_bits(c),
          memory_share=(layer.weight_bits(c) / self.weight_bits
                        if self.weight_bits else 0.0),
          sensitivity=layer.sensitivity[layer.candidates.index(c)]))
    return rows


def cost_range(layers: Sequence[Layer], measure: str) -> tuple[float, float]:
  """(smallest, largest) total of `measure` ('bops' or 'weight_bits') over
  all choices."""
  f = (lambda l, c: l.bops(c)) if measure == "bops" else (
      lambda l, c: l.weight_bits(c))
  return (sum(min(f(l, c) for c in l.candidates) for l in layers),
          sum(max(f(l, c) for c in l.candidates) for l in layers))


def check_budgets(layers: Sequence[Layer], budget_bops: float | None,
                  budget_weight_bits: float | None) -> None:
  """Raises a ValueError for bad layers or an infeasible budget (naming
  the achievable range)."""
  if not layers:
    raise ValueError("allocate: no layers to allocate")
  for l in layers:
    if not l.candidates or len(l.candidates) != len(l.sensitivity):
      raise ValueError(f"layer {l.path!r}: needs one sensitivity per "
                       f"candidate ({len(l.candidates)} candidates, "
                       f"{len(l.sensitivity)} sensitivities)")
    if not np.all(np.isfinite(l.sensitivity)):
      raise ValueError(f"layer {l.path!r}: a sensitivity is not finite: "
                       f"{l.sensitivity}")
  if budget_bops is None and budget_weight_bits is None:
    raise ValueError("allocate: give budget_bops, budget_weight_bits or both")
  for name, budget, measure in (("budget_bops", budget_bops, "bops"),
                                ("budget_weight_bits", budget_weight_bits,
                                 "weight_bits")):
    if budget is None:
      continue
    lo, hi = cost_range(layers, measure)
    if not budget >= lo:
      raise ValueError(
          f"{name}={budget:,.0f} is infeasible: with these candidates the "
          f"achievable total is {lo:,.0f} (all smallest) to {hi:,.0f} (all "
          "largest)")


def allocate(layers: Sequence[Layer], *, budget_bops: float | None = None,
             budget_weight_bits: float | None = None) -> Allocation:
  """The exact minimum-sensitivity choice within the budget(s) (module
  docstring). An infeasible budget is a ValueError that says the smallest
  and largest achievable totals."""
  layers = tuple(layers)
  check_budgets(layers, budget_bops, budget_weight_bits)
  index = [(i, j) for i, l in enumerate(layers)
           for j in range(len(l.candidates))]
  n = len(index)
  obj = np.array([layers[i].sensitivity[j] for i, j in index], np.float64)
  obj = obj / max(float(np.max(np.abs(obj))), 1e-300)  # O(1) for the gaps
  one_each = np.zeros((len(layers), n))
  for k, (i, _) in enumerate(index):
    one_each[i, k] = 1.0
  rows = []
  for budget, f in ((budget_bops, Layer.bops),
                    (budget_weight_bits, Layer.weight_bits)):
    if budget is not None:
      rows.append((np.array([f(layers[i], layers[i].candidates[j])
                             for i, j in index]), float(budget)))
  pick = _solve(obj, rows, one_each, index, len(layers))
  # Among the choices of minimal objective, the one that spends the most of
  # the (first) budget: estimates that tie (e.g. at noise level at high
  # widths) should not leave bits unused.
  best = float(obj[pick].sum())
  spend = rows[0][0] / max(float(np.max(rows[0][0])), 1.0)
  pick = _solve(-spend, rows, one_each, index, len(layers),
                extra=(obj, best + 1e-9 * max(1.0, abs(best))),
                fallback=pick)
  choice = tuple(layers[i].candidates[j]
                 for (i, j), p in zip(index, pick) if p)
  return _result(layers, choice, budget_bops, budget_weight_bits)


def _solve(c, rows, one_each, index, num_layers, extra=None, fallback=None):
  """The 0/1 pick (one candidate per layer) minimising ``c @ x`` within the
  budget rows (and ``extra = (row, bound)``). HiGHS meets a row to a
  tolerance: a choice over a budget (or over `extra`) by less than that is
  cut off (a no-good cut: not all of its picks again) and the program
  solved again. Only infeasible choices are cut, so the optimum stays.
  `fallback`: returned if the program with `extra` finds nothing."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  n = len(index)
  checks = list(rows) + ([extra] if extra is not None else [])
  cuts = []
  for _ in range(100):
    constraints = [optimize.LinearConstraint(one_each, 1.0, 1.0)]
    for row, budget in checks:
      scale = max(float(np.max(np.abs(row))), 1e-300)  # O(1) rows
      constraints.append(optimize.LinearConstraint(
          row[None] / scale, -np.inf, budget / scale))
    if cuts:
      constraints.append(optimize.LinearConstraint(
          np.array(cuts, np.float64), -np.inf, num_layers - 1.0))
    res = optimize.milp(c, constraints=constraints,
                        integrality=np.ones(n), bounds=optimize.Bounds(0, 1),
                        options=dict(mip_rel_gap=0.0))
    if res.status != 0 or res.x is None:
      if fallback is not None:
        return fallback
      raise ValueError(f"allocate: the integer program found no solution "
                       f"({res.message})")
    pick = np.zeros(n, bool)
    for i in range(num_layers):
      ks = [k for k, (li, _) in enumerate(index) if li == i]
      pick[max(ks, key=lambda k: res.x[k])] = True
    if all(float(row[pick].sum()) <= bound for row, bound in checks):
      return pick
    cuts.append(pick.astype(np.float64))
  if fallback is not None:
    return fallback
  raise ValueError("allocate: no choice within the budget after 100 cuts")


def _result(layers, choice, budget_bops, budget_weight_bits) -> Allocation:
  bops = sum(l.bops(c) for l, c in zip(layers, choice))
  wbits = sum(l.weight_bits(c) for l, c in zip(layers, choice))
  for name, budget, total in (("BOPs", budget_bops, bops),
                              ("weight bits", budget_weight_bits, wbits)):
    if budget is not None and total > budget:
      raise ValueError(f"allocate: the solver's choice exceeds the {name} "
                       f"budget ({total:,.0f} > {budget:,.0f})")
  objective = sum(l.sensitivity[l.candidates.index(c)]
                  for l, c in zip(layers, choice))
  return Allocation(layers, choice, float(objective), float(bops),
                    float(wbits))


def brute_force(layers: Sequence[Layer], *, budget_bops: float | None = None,
                budget_weight_bits: float | None = None
                ) -> Allocation | None:
  """The optimum by enumerating every choice (small instances: tests)."""
  layers = tuple(layers)
  best = None
  for choice in itertools.product(*(l.candidates for l in layers)):
    bops = sum(l.bops(c) for l, c in zip(layers, choice))
    wbits = sum(l.weight_bits(c) for l, c in zip(layers, choice))
    if budget_bops is not None and bops > budget_bops:
      continue
    if budget_weight_bits is not None and wbits > budget_weight_bits:
      continue
    obj = sum(l.sensitivity[l.candidates.index(c)]
              for l, c in zip(layers, choice))
    if best is None or obj < best[0]:
      best = (obj, choice)
  if best is None:
    return None
  return _result(layers, best[1], budget_bops, budget_weight_bits)
