"""Mixed precision: sensitivity estimates, and the command's rules round
trip (the allocated widths are the widths the model then uses)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqt_ext import config as qconfig
from aqt_ext import cost, mixed_precision, models
from aqt_ext.search import allocate as al
from aqt_ext.search import sensitivity as sens

from test_ptq_pipeline import random_variables, save_checkpoint
from test_train import tiny_config


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(16, name="a")(x))
    return nn.Dense(10, name="b")(x)


def _two_layer(seed=0, n=256):
  """The model, its variables, and batches labelled by the float model:
  layer a's kernel has one huge entry on an input that is always 0, so it
  sets a's scale without touching the output; at 2 bits every other entry
  of a rounds to 0 (a visibly hurt layer), while b is Gaussian."""
  rng = np.random.default_rng(seed)
  a = rng.normal(0, 0.5, (8, 16)).astype(np.float32)
  a[7, :] = 40.0
  b = rng.normal(0, 0.5, (16, 10)).astype(np.float32)
  params = {"a": {"kernel": a, "bias": np.zeros(16, np.float32)},
            "b": {"kernel": b, "bias": np.zeros(10, np.float32)}}
  model = TwoLayer()
  x = rng.normal(size=(n, 8)).astype(np.float32)
  x[:, 7] = 0.0
  labels = np.argmax(model.apply({"params": params}, x), -1)
  batches = [{"image": jnp.asarray(x[i::2]), "label": jnp.asarray(labels[i::2])}
             for i in range(2)]
  return model, {"params": params}, batches


def test_sensitivities_are_finite_and_larger_for_the_hurt_layer():
  model, variables, batches = _two_layer()
  probe = sens.make_probe(model, variables, (8,), first="^a$")
  assert probe.paths == ("a", "b") and probe.signed == (True, False)
  cands = ((2, 8), (8, 8), (8, 2))
  ld = sens.loss_delta(probe, batches, cands)
  hs = sens.hessian(probe, batches, cands, num_samples=16)
  for s in (ld, hs):
    assert s.shape == (2, 3) and np.all(np.isfinite(s))
    assert s[0, 0] > 3 * s[1, 0]  # a at 2-bit weights hurts more than b
    assert s[0, 0] > 3 * s[0, 1]  # ... and more than a at 8 bits
  assert np.all(hs >= 0)  # the Hessian of a convex loss in the logits
  # Quantizing nothing changes nothing: the estimates' zero point.
  assert abs(ld[1, 1]) < 0.05 * ld[0, 0]


def test_hutchinson_traces_match_the_exact_hessian():
  """Per-layer Hutchinson traces (one Rademacher vector over every kernel
  and layer input at once) against the exact traces of the joint Hessian,
  within 4 standard errors of the estimator, computed from that Hessian."""
  model, variables, batches = _two_layer(n=64)
  probe = sens.make_probe(model, variables, (8,))
  n = 400
  tw, ta = sens.hessian_traces(probe, batches[:1], num_samples=n)
  b, params = batches[0], variables["params"]
  x = b["image"]
  sizes = [params["a"]["kernel"].size, params["b"]["kernel"].size, x.size,
           x.shape[0] * 16]
  shapes = [params["a"]["kernel"].shape, params["b"]["kernel"].shape,
            x.shape, (x.shape[0], 16)]

  def loss(flat):
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])
    ka, kb, ea, eb = (p.reshape(s) for p, s in zip(parts, shapes))
    h1 = nn.relu((x + ea) @ ka + params["a"]["bias"])
    logits = (h1 + eb) @ kb + params["b"]["bias"]
    return sens._loss(logits, b["label"])  # pylint: disable=protected-access

  flat = jnp.concatenate([params["a"]["kernel"].ravel(),
                          params["b"]["kernel"].ravel(),
                          jnp.zeros(x.size), jnp.zeros(x.shape[0] * 16)])
  h = np.asarray(jax.hessian(loss)(flat), np.float64)
  bounds = np.cumsum([0] + sizes)
  for estimate, k in ((tw[0], 0), (tw[1], 1), (ta[0], 2), (ta[1], 3)):
    lo, hi = bounds[k], bounds[k + 1]
    block = h[lo:hi]
    exact = np.trace(block[:, lo:hi])
    inside = block[:, lo:hi] - np.diag(np.diag(block[:, lo:hi]))
    var = np.sum(inside ** 2) * 2 + (np.sum(block ** 2)
                                     - np.sum(block[:, lo:hi] ** 2))
    se = np.sqrt(var / n)
    assert exact > 0 and 4 * se < 0.5 * exact
    assert abs(estimate - exact) <= 4 * se, (k, estimate, exact, se)


def test_sweep_point_rules_round_trip_through_the_cost_model(
    fashion_mnist_dir, tmp_path):
  """A sweep's mixed-precision point (`sweep.run_mp`): allocation within the
  BOPs of uniform w4a4_fl8 on a float checkpoint, then fine-tuning with the
  rules; the trained model's widths (through the cost model) are the
  allocated ones, layer by layer and in total."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from aqt_ext import sweep  # pylint: disable=g-import-not-at-top
  net = models.create_model("cifar_resnet8", num_classes=10, width=0.25)
  save_checkpoint(str(tmp_path / "ckpt"), random_variables(net))
  config = tiny_config(fashion_mnist_dir, model="cifar_resnet8", width=0.25,
                       quant="w4a4_fl8", num_epochs=0.125,
                       init_from=str(tmp_path / "ckpt"))
  with config.unlocked():
    config.mp = ml_collections.ConfigDict(dict(
        method="loss_delta", bits=(2, 4, 8), num_batches=1))
  workdir = str(tmp_path / "point")
  result = sweep.run_mp(config, workdir)
  out = os.path.join(workdir, sweep.MP_DIR)
  record = json.load(open(os.path.join(out, "allocation.json")))
  rules = qconfig.parse_spec(os.path.join(out, "rules.json"))
  layers = cost.model_cost(models.create_model(
      "cifar_resnet8", num_classes=10, width=0.25, quant=rules), (28, 28, 1),
      train=False).layers
  used = {l.path: (l.weight_bits, l.input_bits) for l in layers}
  chosen = {r["layer"]: (r["weight_bits"], r["input_bits"])
            for r in record["layers"]}
  assert used == chosen == {k: tuple(v) for k, v in
                            result["mp"]["widths"].items()}
  assert used["conv_init"] == used["head"] == (8, 8)
  assert result["bops"] == record["bops"] == sum(l.bops for l in layers)
  assert record["bops"] <= record["budget_bops"]
  assert record["budget_bops"] == mixed_precision.budget_of(
      config, 10, (28, 28, 1), "w4a4_fl8")
  assert result["config"]["quant"] == os.path.join(out, "rules.json")
  assert open(os.path.join(out, "table.md")).read().startswith("| layer |")
  assert json.load(open(os.path.join(workdir, "result.json")))["mp"] == (
      result["mp"])


def test_infeasible_budget_fails_before_any_work(fashion_mnist_dir, tmp_path):
  config = tiny_config(fashion_mnist_dir, model="cifar_resnet8", width=0.25,
                       quant="float")
  lo = mixed_precision.budget_of(config, 10, (28, 28, 1), "w2a2_fl8")
  # No checkpoint exists: the budget is refused before it is looked for.
  with pytest.raises(ValueError, match=r"budget_bops=.* is infeasible: .*"
                     r"achievable total is [\d,]+ \(all smallest\)"):
    mixed_precision.run(config, str(tmp_path / "none"), str(tmp_path / "o"),
                        budget_bops=lo - 1, bits=(2, 4, 8))
  assert not os.path.exists(tmp_path / "o")
  with pytest.raises(ValueError, match=r"bits=\[1, 4\] is not allowed"):
    mixed_precision.run(config, "x", str(tmp_path / "o"), budget_bops=lo,
                        bits=(1, 4))
  with pytest.raises(ValueError, match="method='greedy' is not allowed"):
    mixed_precision.run(config, "x", str(tmp_path / "o"), budget_bops=lo,
                        method="greedy")


def test_structured_rules_round_trip_and_errors(tmp_path):
  mq = qconfig.parse_spec("aqt:w8a8_fl8_g8sr", first=models.FIRST_LAYER,
                          last=models.LAST_LAYER)
  path = str(tmp_path / "r.json")
  qconfig.save_rules(mq, path)
  assert qconfig.parse_spec(path) == mq
  assert qconfig.from_dict({"default": "w4a4", "rules": [["head", "w8a8"]]}
                           ) == qconfig.ModelQuant(
      default=qconfig.parse_spec("w4a4").default,
      rules=(("head", qconfig.parse_spec("w8a8").default),))
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert qconfig.from_dict(ml_collections.ConfigDict(qconfig.to_dict(mq))
                           ) == mq
  for bad, msg in [
      ({"default": {"weight": {"bitz": 3}}},
       r"rules.default.weight has the unknown field\(s\) \['bitz'\]; "
       "allowed: method, bits"),
      ({"default": {"weight": {"method": "uniform", "bits": 12}}},
       r"rules.default.weight: TensorQuant.bits=12 is out of range"),
      ({"rules": [["(", {}]]}, "not a valid regular expression"),
      ({"rule": []}, r"unknown field\(s\) \['rule'\]; allowed: default, "
       "rules")]:
    with pytest.raises(ValueError, match=msg):
      qconfig.from_dict(bad)
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="is not valid JSON"):
    qconfig.parse_spec(str(tmp_path / "bad.json"))



def test_budget_from_widths_are_always_candidates():
  """The uniform choice a budget comes from is always feasible: its widths
  join the candidate bits."""
  from aqt_ext import mixed_precision  # pylint: disable=g-import-not-at-top
  assert mixed_precision.candidate_bits((2, 4, 8), "w6a6_fl8") == [2, 4, 6, 8]
  assert mixed_precision.candidate_bits((2, 4, 8), "w3a8") == [2, 3, 4, 8]
  assert mixed_precision.candidate_bits((2, 3), None) == [2, 3]
  with pytest.raises(ValueError, match=r"bits=\[1, 4\] is not allowed"):
    mixed_precision.candidate_bits((1, 4), "w4a4")
