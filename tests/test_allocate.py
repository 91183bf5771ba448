"""The mixed-precision allocator: within the budget, and optimal (equal to
brute force) on small instances."""

import numpy as np
import pytest

from aqt_ext.search import allocate as al

CANDS = ((2, 2), (4, 4), (8, 8), (4, 8))


def _instance(rng, n_layers, cands=CANDS):
  layers = []
  for i in range(n_layers):
    macs = int(rng.integers(1, 50)) * 1000
    # Sensitivity falls with bits, with noise (not always monotone).
    s = tuple(float(rng.exponential(1.0) / (w * a) + rng.normal(0, 0.01))
              for w, a in cands)
    layers.append(al.Layer(f"l{i}", macs, int(rng.integers(10, 500)), cands,
                           s))
  return layers


@pytest.mark.parametrize("seed", range(12))
def test_optimal_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  layers = _instance(rng, 5)
  lo, hi = al.cost_range(layers, "bops")
  wlo, whi = al.cost_range(layers, "weight_bits")
  budget = float(rng.uniform(lo, hi))
  kw = dict(budget_bops=budget)
  if seed % 3 == 0:
    kw["budget_weight_bits"] = float(rng.uniform(wlo, whi))
  best = al.brute_force(layers, **kw)
  if best is None:
    pytest.skip("no feasible choice drawn")  # not reached for these seeds
  got = al.allocate(layers, **kw)
  assert got.bops <= budget
  if "budget_weight_bits" in kw:
    assert got.weight_bits <= kw["budget_weight_bits"]
  np.testing.assert_allclose(got.objective, best.objective, rtol=1e-9,
                             atol=1e-12)


def test_budget_at_a_uniform_choice_and_tight_costs():
  """A budget equal to the all-(4,4) cost admits it; costs that differ by
  a few BOPs in a billion are still met exactly."""
  layers = [al.Layer("a", 10**8, 10, ((2, 2), (4, 4)), (1.0, 0.0)),
            al.Layer("b", 10**8 + 1, 10, ((2, 2), (4, 4)), (1.0, 0.0)),
            al.Layer("c", 3, 10, ((2, 2), (4, 4)), (1e-3, 0.0))]
  all4 = sum(l.bops((4, 4)) for l in layers)
  got = al.allocate(layers, budget_bops=all4)
  assert got.choice == ((4, 4),) * 3 and got.objective == 0.0
  # One BOP less: the cheapest layer has to drop (the exact optimum).
  got = al.allocate(layers, budget_bops=all4 - 1)
  assert got.choice == ((4, 4), (4, 4), (2, 2)) and got.bops <= all4 - 1
  assert got.choice == al.brute_force(layers, budget_bops=all4 - 1).choice


def test_infeasible_and_bad_input_are_clear_errors():
  layers = _instance(np.random.default_rng(0), 3)
  lo, hi = al.cost_range(layers, "bops")
  with pytest.raises(ValueError, match=(
      rf"budget_bops={lo - 1:,.0f} is infeasible.*{lo:,.0f} \(all smallest\)"
      rf" to {hi:,.0f}")):
    al.allocate(layers, budget_bops=lo - 1)
  with pytest.raises(ValueError, match="give budget_bops, budget_weight_bits"):
    al.allocate(layers)
  bad = [al.Layer("x", 1, 1, ((2, 2),), (float("nan"),))]
  with pytest.raises(ValueError, match="'x'.*not finite"):
    al.allocate(bad, budget_bops=10)
  table = al.allocate(layers, budget_bops=hi).table()
  assert [r["layer"] for r in table] == ["l0", "l1", "l2"]
  assert abs(sum(r["bops_share"] for r in table) - 1.0) < 1e-12


def test_ties_spend_the_budget():
  """Two layers whose estimates are 0 at 4 and 8 bits (noise floor): every
  choice of minimal objective ties, and the one that spends the most BOPs
  is taken."""
  cands = ((4, 4), (8, 8))
  layers = [al.Layer("a", 10, 5, cands, (0.0, 0.0)),
            al.Layer("b", 30, 5, cands, (0.0, 0.0))]
  got = al.allocate(layers, budget_bops=10 * 64 + 30 * 16)
  assert got.choice == ((8, 8), (4, 4)) and got.objective == 0.0
  got = al.allocate(layers, budget_bops=30 * 64 + 10 * 16)
  assert got.choice == ((4, 4), (8, 8))
  # The primary objective still decides: a lower estimate at lower cost wins.
  layers[0] = al.Layer("a", 10, 5, cands, (0.0, 0.5))
  got = al.allocate(layers, budget_bops=40 * 64)
  assert got.choice == ((4, 4), (8, 8))


def test_monotone_estimates():
  from aqt_ext.search import sensitivity  # pylint: disable=g-import-not-at-top
  cands = ((2, 2), (2, 8), (8, 2), (8, 8))
  raw = np.array([[3.0, -0.1, 0.5, 0.2],
                  [1.0, 2.0, -1.0, -0.5]])
  got = sensitivity.monotone(raw, cands)
  np.testing.assert_array_equal(got, [[3.0, 0.2, 0.5, 0.2],
                                      [2.0, 2.0, 0.0, 0.0]])
  assert (got >= 0).all()
  for j, (w, a) in enumerate(cands):
    for k, (w2, a2) in enumerate(cands):
      if w2 >= w and a2 >= a:
        assert (got[:, k] <= got[:, j]).all()
