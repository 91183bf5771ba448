"""Numeric checks of PWLQ, REx and AQuant (methods.md sections 5, 6, 7)."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import stats

from aqt_ext.ptq import aquant, pwlq, rex
from aqt_ext.core.quantizers import fake_quant, qparams_from_range


def _normal(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _mse(a, b):
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b)) ** 2))


# ---------------------------------------------------------------------------
# PWLQ (sec. 5).
# ---------------------------------------------------------------------------

def test_pwlq_optimality_root_gaussian():
  m = np.array([4.0, 6.0])
  p = pwlq.optimal_breakpoint(m, stats.norm.cdf, stats.norm.pdf)
  np.testing.assert_allclose(p, [1.3920, 1.7547], atol=1e-3)
  # The root satisfies the printed condition 2mF(p) = 2m - p + m(m-2p)f(p).
  lhs = 2 * m * stats.norm.cdf(p)
  rhs = 2 * m - p + m * (m - 2 * p) * stats.norm.pdf(p)
  np.testing.assert_allclose(lhs, rhs, atol=1e-4)


@pytest.mark.parametrize("prior,formula", [
    ("gaussian", pwlq.breakpoint_gaussian),
    ("laplacian", pwlq.breakpoint_laplacian)])
def test_pwlq_one_shot_within_1pct_of_root(prior, formula):
  m = np.linspace(3.0, 10.0, 71)
  root = pwlq.optimal_breakpoint(m, *pwlq.prior_density(prior))
  rel = np.abs(np.asarray(formula(m, 1.0)) / np.asarray(root) - 1)
  assert rel.max() < 0.01, rel.max()
  # In units of the std: scaling the channel scales the breakpoint.
  np.testing.assert_allclose(formula(3 * m, 3.0), 3 * formula(m, 1.0),
                             rtol=1e-5)
  np.testing.assert_allclose(pwlq.breakpoint_bisection(m, 1.0, prior), root,
                             rtol=1e-5)


@pytest.mark.parametrize("m", [3.0, 4.0, 6.0, 10.0])
def test_pwlq_error_model_convex_with_minimum_at_root(m):
  p = np.linspace(1e-3, m / 2 - 1e-3, 2001)
  e = np.asarray(pwlq.pwlq_error_model(p, m, 4, stats.norm.cdf), np.float64)
  assert np.all(np.diff(e, 2) > -1e-12 * e.max())
  root = pwlq.optimal_breakpoint(m, stats.norm.cdf, stats.norm.pdf)
  assert abs(p[np.argmin(e)] - float(root)) < 2 * (p[1] - p[0])


@pytest.mark.parametrize("method", pwlq.METHODS)
def test_pwlq_mse_ratio_vs_uniform_4bit(method):
  bits = 4
  w = _normal((4608, 1), seed=0)
  m = np.abs(w).max(axis=0)
  uniform = fake_quant(jnp.asarray(w),
                       qparams_from_range({"amax": jnp.asarray(m)}, "full",
                                          bits))
  ratio = _mse(w, pwlq.pwlq_quantize(w, bits, method)) / _mse(w, uniform)
  lemma = (2**bits - 1) ** 2 / (16 * (2 ** (bits - 1) - 1) ** 2)
  assert lemma == pytest.approx(0.287, abs=1e-3)
  assert 0.16 < ratio < 0.25 and ratio < lemma, ratio


def test_pwlq_grid_levels_and_shape():
  bits = 3
  w = _normal((3, 3, 8, 5), seed=1)
  w_hat = np.asarray(pwlq.pwlq_quantize(w, bits))
  assert w_hat.shape == w.shape
  m = np.abs(w).max(axis=(0, 1, 2))
  assert np.all(np.abs(w_hat) <= m * (1 + 1e-6))
  for c in range(w.shape[-1]):  # centre 2^b levels + 2^(b-1) per tail
    assert len(np.unique(w_hat[..., c])) <= 2 ** (bits + 1)


def test_pwlq_given_breakpoint_regions():
  w = np.array([[-1.0], [-0.3], [0.05], [0.2], [0.45], [0.8]], np.float32)
  w_hat = np.asarray(pwlq.pwlq_fake_quant(w, np.array([0.3]), 2))[:, 0]
  # Centre: full 2-bit grid with p -> 1.5, step 0.2; tails: 1-bit on [p, m].
  np.testing.assert_allclose(w_hat, [-1.0, -0.2, 0.0, 0.2, 0.3, 1.0],
                             atol=1e-6)


@pytest.mark.parametrize("method", pwlq.METHODS)
def test_pwlq_bias_correction_matches_moments(method):
  w = _normal((3, 3, 16, 8), seed=2) * np.linspace(0.5, 2, 8) + np.linspace(
      -0.3, 0.3, 8)
  w_hat = np.asarray(pwlq.pwlq_quantize(w.astype(np.float32), 3, method,
                                        bias_correction=True))
  axes = (0, 1, 2)
  np.testing.assert_allclose(w_hat.mean(axes), w.mean(axes), atol=1e-5)
  np.testing.assert_allclose(w_hat.std(axes), w.std(axes), rtol=1e-5)


@pytest.mark.parametrize("method", pwlq.METHODS)
def test_pwlq_zero_and_constant_channels(method):
  w = _normal((32, 3), seed=3)
  w[:, 1] = 0.0
  w[:, 2] = 0.01
  for bias_correction in (False, True):
    w_hat = np.asarray(pwlq.pwlq_quantize(w, 4, method, bias_correction))
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_array_equal(w_hat[:, 1], 0.0)
    np.testing.assert_allclose(w_hat[:, 2], 0.01, rtol=1e-6)


def test_pwlq_invalid_options():
  w = _normal((16, 2), seed=4)
  m = np.abs(w).max(axis=0)
  not_an_array = object()  # validation must come before any use of w
  with pytest.raises(ValueError, match="method=.*grid.*gaussian"):
    pwlq.pwlq_quantize(not_an_array, 4, method="kmeans")
  with pytest.raises(ValueError, match="prior=.*laplacian"):
    pwlq.pwlq_quantize(not_an_array, 4, method="bisection", prior="cauchy")
  with pytest.raises(ValueError, match="bits="):
    pwlq.pwlq_quantize(not_an_array, 1)
  with pytest.raises(ValueError, match="ndim"):
    pwlq.pwlq_quantize(w[:, 0], 4)
  for bad in (m, np.zeros(2), -m / 4, 1.2 * m):
    with pytest.raises(ValueError, match=r"breakpoint=.*\(0, m\)"):
      pwlq.pwlq_fake_quant(w, bad, 4)
  pwlq.pwlq_fake_quant(w, 0.6 * m, 4)  # above m/2 is allowed


def test_pwlq_grid_search_spans_the_official_range():
  """Depthwise 3x3 kernels (9 weights per channel): the search covers p/m
  in (0, 1) as the official code's does, some channels' best breakpoint
  lies above m/2, and the MSE is below that of the same search stopped at
  m/2 (measured: 0.851x and 0.917x at 3 and 4 bits for seed 11, 0.901x and
  0.951x for seed 12); with 144 weights per channel the two agree within
  1%."""
  def mse(w, p, bits):
    return float(np.mean((w - np.asarray(pwlq.pwlq_fake_quant(w, p, bits)))
                         ** 2))
  for seed in (11, 12):
    w = _normal((3, 3, 1, 64), seed=seed)
    m = np.abs(w).max(axis=(0, 1, 2))
    for bits in (3, 4):
      p = np.asarray(pwlq.breakpoint_grid(w, bits))
      half = np.asarray(pwlq.breakpoint_grid(w, bits, max_ratio=0.5))
      assert np.all((p > 0) & (p < m)) and np.all(half < m / 2)
      assert (p > m / 2).sum() >= 8
      ratio = mse(w, p, bits) / mse(w, half, bits)
      assert ratio < 0.97, (seed, bits, ratio)
  w = _normal((3, 3, 16, 64), seed=3)
  ratio = mse(w, pwlq.breakpoint_grid(w, 4), 4) / mse(
      w, pwlq.breakpoint_grid(w, 4, max_ratio=0.5), 4)
  assert 0.99 < ratio <= 1.0, ratio
  with pytest.raises(ValueError, match="max_ratio=0.05"):
    pwlq.breakpoint_grid(w, 4, max_ratio=0.05)


# ---------------------------------------------------------------------------
# REx (sec. 6).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rex_bound_per_row(bits):
  w = _normal((128, 32), seed=5) * np.linspace(0.1, 3, 32, dtype=np.float32)
  terms = rex.rex_expand(w, 5, bits=bits)
  assert len(terms) == 5
  amax = np.abs(w).max(axis=0).astype(np.float64)
  partial = np.zeros(w.shape)
  for k, term in enumerate(terms, start=1):
    partial += np.asarray(term, np.float64)  # float64: bound goes to 1e-12
    err = np.abs(w - partial).max(axis=0)
    assert np.all(err <= amax / (2**bits - 2) ** k * (1 + 1e-6)), (k, err)


@pytest.mark.parametrize("bits,factor", [(2, 4), (3, 36), (4, 196)])
def test_rex_each_order_divides_mse(bits, factor):
  w = _normal((256, 64), seed=6)
  terms = rex.rex_expand(w, 4, bits=bits)
  mse = [_mse(w, np.sum(terms[:k], axis=0)) for k in range(1, 5)]
  ratios = np.array(mse[:-1]) / np.array(mse[1:])
  assert np.all((ratios > factor / 2) & (ratios < factor * 2)), ratios


def test_rex_layer_is_linear_in_terms():
  w = _normal((24, 10), seed=7)
  x = _normal((6, 24), seed=8)
  terms = rex.rex_expand(w, 3, bits=3)
  dense = lambda inputs, kernel: inputs @ kernel  # noqa: E731
  np.testing.assert_allclose(rex.rex_apply(dense, x, terms),
                             dense(x, sum(terms)), rtol=1e-5, atol=1e-6)


def test_rex_on_grid_weight_has_no_residual():
  bits = 4
  q = np.random.default_rng(9).integers(-7, 8, size=(20, 6))
  q[0] = 7  # every channel reaches the grid's end
  w = (q * 2.0 ** np.arange(-3, 3)).astype(np.float32)
  terms = rex.rex_expand(w, 3, bits=bits)
  np.testing.assert_array_equal(terms[0], w)
  for term in terms[1:]:
    np.testing.assert_array_equal(term, 0.0)


def test_rex_budgeted_sparsity():
  w = _normal((64, 32), seed=10) * np.linspace(0.2, 2, 32, dtype=np.float32)
  mse = {s: _mse(w, sum(rex.rex_expand(w, 2, sparsity=s))) for s in (0, 0.5)}
  order1 = _mse(w, rex.rex_expand(w, 1)[0])
  assert mse[0] < mse[0.5] < order1
  first, second = rex.rex_expand(w, 2, sparsity=0.5)
  kept = np.flatnonzero(np.any(np.asarray(second) != 0, axis=0))
  norms = np.sum((w - np.asarray(first)) ** 2, axis=0)
  assert set(kept) == set(np.argsort(-norms)[:16])


def test_rex_custom_quantizer_and_bops():
  per_tensor = lambda v: fake_quant(  # noqa: E731
      v, qparams_from_range({"amax": jnp.max(jnp.abs(v))}, "restricted", 4))
  w = _normal((16, 4), seed=11)
  terms = rex.rex_expand(w, 2, quantizer=per_tensor)
  np.testing.assert_array_equal(terms[0], per_tensor(jnp.asarray(w)))
  assert rex.rex_bops_factor(1) == 1.0
  assert rex.rex_bops_factor(2) == 2.0
  assert rex.rex_bops_factor(3, 0.5) == 2.0
  assert rex.rex_bops_factor(4, 0.75) == pytest.approx(1.75)


def test_rex_invalid_options():
  not_an_array = object()
  for order in (0, -1, 1.5):
    with pytest.raises(ValueError, match="order=.*K >= 1"):
      rex.rex_expand(not_an_array, order)
    with pytest.raises(ValueError, match="order="):
      rex.rex_bops_factor(order)
  for sparsity in (1.0, -0.1, 2.0):
    with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
      rex.rex_expand(not_an_array, 2, sparsity=sparsity)
    with pytest.raises(ValueError, match="sparsity="):
      rex.rex_bops_factor(2, sparsity)
  with pytest.raises(ValueError, match="bits="):
    rex.channel_quantizer(1)


# ---------------------------------------------------------------------------
# AQuant (sec. 7).
# ---------------------------------------------------------------------------

def test_aquant_single_product_error():
  w, w_hat, s = 0.37, 0.30, 0.1
  t = jnp.linspace(0.0, 3.0, 300_001)
  alpha, beta = aquant.init_border(np.array([[w]]), np.array([[w_hat]]))
  np.testing.assert_allclose(alpha, [w_hat / w - 1], rtol=1e-5)
  q = aquant.aquant_round(t, alpha, beta)
  np.testing.assert_array_equal(  # same as the per-product border
      q, jnp.floor(t) + (t - jnp.floor(t) >= jnp.clip(
          aquant.product_border(w, w_hat, jnp.floor(t)), 0, 1)))
  derived = float(jnp.mean(jnp.abs(w * s * t - w_hat * s * q)))
  nearest = float(jnp.mean(jnp.abs(w * s * t - w_hat * s * jnp.round(t))))
  assert derived == pytest.approx(0.00807, rel=0.02)
  assert nearest == pytest.approx(0.01187, rel=0.02)


def test_aquant_equal_weights_give_half_border():
  w = _normal((8, 5), seed=12)
  n = np.arange(-4, 8)
  np.testing.assert_array_equal(aquant.product_border(w[0, 0], w[0, 0], n),
                                0.5)
  alpha, beta = aquant.init_border(w, w)
  np.testing.assert_allclose(aquant.border(n[:, None], alpha, beta), 0.5,
                             atol=1e-6)


def test_aquant_init_border_minimises_channel_error():
  """The kappa border picks the q in {n, n+1} minimising sum_o error^2."""
  w = _normal((1, 6), seed=13)
  w_hat = w + 0.2 * _normal((1, 6), seed=14)
  alpha, beta = aquant.init_border(w, w_hat, in_axis=0)
  t = np.linspace(-3.0, 3.0, 6001, dtype=np.float32)
  q = np.asarray(aquant.aquant_round(jnp.asarray(t), alpha, beta))
  n = np.floor(t)

  def err(levels):
    return np.sum((w * t[:, None] - w_hat * levels[:, None]) ** 2, axis=1)

  best = np.where(err(n + 1) <= err(n), n + 1, n)
  assert np.mean(q == best) > 0.999  # ties at the border aside


@pytest.mark.parametrize("soft", [False, True])
def test_aquant_monotone_for_any_border(soft):
  t = jnp.linspace(-4.0, 4.0, 40_001)
  rng = np.random.default_rng(15)
  for alpha, beta in [(0.0, -1.0), (0.0, 1.0), (5.0, 0.0), (-5.0, 0.0)] + [
      tuple(rng.uniform(-1, 1, 2)) for _ in range(8)]:
    q = aquant.aquant_round(t, jnp.float32(alpha), jnp.float32(beta), soft,
                            temperature=0.05)
    assert np.all(np.diff(np.asarray(q)) >= 0), (alpha, beta)


def test_aquant_learn_border_lowers_error():
  rng = np.random.default_rng(16)
  cin, cout, qmax = 16, 8, 7.0
  gain = rng.uniform(0.5, 2.0, cin).astype(np.float32)
  x = np.abs(_normal((512, cin), seed=17)) * gain
  x_test = np.abs(_normal((512, cin), seed=18)) * gain
  w = _normal((cin, cout), seed=19)
  w_hat = rex.channel_quantizer(3)(jnp.asarray(w))
  scale = float(x.max() / qmax)
  dense = lambda inputs, kernel: inputs @ kernel  # noqa: E731
  init = aquant.init_border(w, w_hat)
  learned = aquant.learn_border(x, w, w_hat, scale, dense, steps=300,
                                lr=1e-2, qmin=0.0, qmax=qmax)
  for data in (x, x_test):
    err = lambda p: float(aquant.reconstruction_error(  # noqa: E731
        data, w, w_hat, scale, dense, *p, 0.0, qmax))
    assert err(learned) < 0.9 * err(init), (err(learned), err(init))


def test_aquant_learned_border_beats_rtn_on_held_out_float_targets():
  """The pipeline's objective at layer level: the layer's input comes from
  an already-quantized network (the float input plus the error of earlier
  quantized layers), the target is the float network's output of the layer.
  Fitted on 512 calibration inputs, the learned border beats round to
  nearest (border 1/2) and its own initial border on 512 held-out ones."""
  rng = np.random.default_rng(21)
  cin, cout, qmax = 16, 8, 7.0
  gain = rng.uniform(0.5, 2.0, cin).astype(np.float32)
  w = _normal((cin, cout), seed=22)
  w_hat = rex.channel_quantizer(3)(jnp.asarray(w))
  # An earlier 3-bit layer: its error reaches this layer's input.
  w_up = _normal((cin, cin), seed=23) / 4
  w_up_hat = rex.channel_quantizer(3)(jnp.asarray(w_up))
  dense = lambda inputs, kernel: inputs @ kernel  # noqa: E731

  def data(seed):
    z = np.abs(_normal((512, cin), seed=seed)) * gain
    x_float = np.maximum(z @ w_up, 0)
    return np.maximum(z @ np.asarray(w_up_hat), 0), dense(x_float, w)

  (x, y), (x_test, y_test) = data(24), data(25)
  scale = float(x.max() / qmax)
  learned = aquant.learn_border(x, w, w_hat, scale, dense, steps=300,
                                lr=1e-2, qmin=0.0, qmax=qmax, target=y)
  rtn = (jnp.zeros(cin), jnp.zeros(cin))
  init = aquant.init_border(w, w_hat)
  err = lambda p: float(aquant.reconstruction_error(  # noqa: E731
      x_test, w, w_hat, scale, dense, *p, 0.0, qmax, y_test))
  assert err(learned) < 0.9 * err(rtn), (err(learned), err(rtn))
  assert err(learned) < err(init), (err(learned), err(init))
  # Fitted to the layer alone instead, the border does not see the
  # upstream error and is worse against the float targets.
  alone = aquant.learn_border(x, w, w_hat, scale, dense, steps=300, lr=1e-2,
                              qmin=0.0, qmax=qmax)
  assert err(learned) < err(alone), (err(learned), err(alone))


def test_aquant_invalid_options():
  dense = lambda inputs, kernel: inputs @ kernel  # noqa: E731
  with pytest.raises(ValueError, match="steps="):
    aquant.learn_border(None, None, None, 0.1, dense, steps=0)
  with pytest.raises(ValueError, match="temperature="):
    aquant.learn_border(None, None, None, 0.1, dense, temperature=(0.1, 0.0))


def test_rtn_full_grid_is_the_16_level_uniform_baseline():
  """4-bit rtn on 'full' has 16 levels per channel, step max|w| / 7.5
  (the restricted grid 15, step max|w| / 7), and the restricted grid's MSE is about (7.5/7)^2 = 1.148x its own on
  Gaussian weights (methods.md sec. 5: report both beside PWLQ)."""
  from aqt_ext.ptq import pipeline  # pylint: disable=g-import-not-at-top
  w = _normal((4608, 4), seed=0)
  out = {}
  for grid in ("restricted", "full"):
    ptq = pipeline.ptq_defaults()
    ptq.grid = grid
    (w_hat,) = pipeline.quantize_kernel(w, 4, ptq)
    m = np.abs(w).max(0)
    step = m / (7.0 if grid == "restricted" else 7.5)
    codes = w_hat / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    lo = -7 if grid == "restricted" else -8
    assert np.round(codes).min() >= lo and np.round(codes).max() <= 7
    out[grid] = _mse(w, w_hat)
  assert 1.10 < out["restricted"] / out["full"] < 1.20, out
  with pytest.raises(ValueError, match="grid='aqt'"):
    rex.channel_quantizer(4, "aqt")
