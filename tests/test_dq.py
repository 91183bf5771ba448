"""Direct Quantization (aqt_ext.core.dq, levels, clip_search): the checks of methods.md sec. 4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqt_ext import LayerQuant, QuantConv, QuantDense, TensorQuant
from aqt_ext.core import clip_search, dq
from aqt_ext.core import levels as lv
from aqt_ext.core.operand import Operand
from aqt_ext.linen.layers import LinenContext
from aqt_ext.core import quantizers as qz

KERNEL_AXES = qz.OperandAxes((0, 1, 2), 2)  # a (3, 3, I, O) conv kernel


class WeightOnly(nn.Module):
  """A conv-shaped kernel quantized by `dq.quant_weight`."""

  tq: TensorQuant
  shape: tuple = (3, 3, 4, 6)

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", nn.initializers.normal(1.0), self.shape)
    return dq.quant_weight(LinenContext(self), Operand(
        "kernel", kernel, self.tq, KERNEL_AXES, is_weight=True))


def _weight_model(bits, granularity, dq_init="kmeans", seed=0,
                  dq_update="direct"):
  mdl = WeightOnly(TensorQuant(method="dq", bits=bits,
                               granularity=granularity, dq_init=dq_init,
                               dq_update=dq_update))
  return mdl, mdl.init(jax.random.PRNGKey(seed))["params"]


def _group_view(w, levels):
  """(N, G) weights and (G, L) levels."""
  return (np.asarray(w).reshape(-1, max(1, levels.size // levels.shape[-1])),
          np.asarray(levels).reshape(-1, levels.shape[-1]))


# ---------------------------------------------------------------------------
# (a) Learnable levels.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_outputs_are_levels(bits, granularity):
  mdl, params = _weight_model(bits, granularity)
  levels = params["kernel_dq_levels"]
  assert levels.shape == ((6,) if granularity == "per_channel" else ()) + (
      2 ** bits,)
  wq = mdl.apply({"params": params})
  assert wq.shape == params["kernel"].shape
  w2, lv2 = _group_view(wq, lv.sorted_levels(levels))
  for g in range(lv2.shape[0]):
    values = np.unique(w2[:, g])
    assert len(values) <= 2 ** bits
    assert np.all(np.isin(values, lv2[g]))
  # Each weight takes its nearest level.
  dist = np.abs(np.asarray(params["kernel"]).reshape(w2.shape)[:, :, None]
                - lv2[None])
  np.testing.assert_allclose(np.abs(np.asarray(params["kernel"]).reshape(
      w2.shape) - w2), dist.min(-1), rtol=1e-6)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_exact_level_gradient_and_latent_ste(granularity):
  mdl, params = _weight_model(3, granularity, dq_update="latent_ste")
  assert "kernel_dq_position" not in params
  g = jax.random.normal(jax.random.PRNGKey(1), params["kernel"].shape)
  grads = jax.grad(lambda p: jnp.sum(g * mdl.apply({"params": p})))(params)
  levels = params["kernel_dq_levels"]
  idx = lv.assign(params["kernel"], lv.sorted_levels(levels))
  num = levels.shape[-1]
  groups = max(1, levels.size // num)
  seg = (np.asarray(idx).reshape(-1, groups)
         + num * np.arange(groups)[None]).ravel()
  want = jax.ops.segment_sum(np.asarray(g).reshape(-1, groups).ravel(), seg,
                             num_segments=groups * num)
  np.testing.assert_allclose(grads["kernel_dq_levels"],
                             np.asarray(want).reshape(levels.shape),
                             rtol=1e-5, atol=1e-5)
  # Latent weights: plain straight-through.
  np.testing.assert_array_equal(grads["kernel"], g)


# The direct update (dq_update='direct', the default).

def _direct(bits=3, granularity="per_channel", seed=0):
  """(model, params, sorted table, (N, G) positions view, (N, G) index)."""
  mdl, params = _weight_model(bits, granularity, seed=seed)
  table = lv.sorted_levels(params["kernel_dq_levels"])
  u2, _ = _group_view(params["kernel_dq_position"], table)
  return mdl, params, table, u2, np.asarray(lv.position_index(u2, 2 ** bits))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_direct_init_equals_latent_and_gradients_follow_the_rule(granularity):
  """At init the direct forward equals the latent one (same assignment);
  the level gradient is the exact segment sum; the position gradient is
  g / (the gap in the direction of the step -g); the kernel gets none."""
  mdl, params, table, u2, idx = _direct(3, granularity)
  latent, lparams = _weight_model(3, granularity, dq_update="latent_ste")
  np.testing.assert_array_equal(mdl.apply({"params": params}),
                                latent.apply({"params": lparams}))
  assert np.all(np.abs(u2 - idx) <= 0.5)
  g = jax.random.normal(jax.random.PRNGKey(1), params["kernel"].shape)
  grads = jax.grad(lambda p: jnp.sum(g * mdl.apply({"params": p})))(params)
  assert not np.any(grads["kernel"])
  num = table.shape[-1]
  _, lv2 = _group_view(params["kernel"], table)
  groups = lv2.shape[0]
  g2 = np.asarray(g).reshape(-1, groups)
  seg = (idx + num * np.arange(groups)[None]).ravel()
  want = jax.ops.segment_sum(g2.ravel(), seg, num_segments=groups * num)
  np.testing.assert_allclose(grads["kernel_dq_levels"],
                             np.asarray(want).reshape(table.shape),
                             rtol=1e-5, atol=1e-5)
  cols = np.arange(groups)[None]
  below = lv2[cols, np.maximum(idx, 1)] - lv2[cols, np.maximum(idx, 1) - 1]
  above = (lv2[cols, np.minimum(idx, num - 2) + 1]
           - lv2[cols, np.minimum(idx, num - 2)])
  want_u = g2 / np.where(g2 > 0, below, above)
  got_u, _ = _group_view(grads["kernel_dq_position"], table)
  np.testing.assert_allclose(got_u, want_u, rtol=1e-5)


def test_direct_small_step_keeps_and_large_step_moves_one_level():
  """A weight-space step smaller than the distance to the midpoint leaves
  every assignment; one that crosses the midpoint (but not the next one)
  moves the weight to the neighbouring level and no further; moving a level
  moves every weight at it."""
  mdl, params, table, u2, idx = _direct(3, "per_channel")
  shape = params["kernel"].shape
  _, lv2 = _group_view(params["kernel"], table)
  num, groups = table.shape[-1], lv2.shape[0]
  cols = np.arange(groups)[None]
  inner = (idx > 0) & (idx < num - 1)
  up = lv2[cols, np.minimum(idx + 1, num - 1)] - lv2[cols, idx]

  def step(eta, g2):
    """One SGD step of size eta on the positions, loss sum(g * w_q)."""
    g = jnp.asarray(g2.reshape(shape))
    grad = jax.grad(lambda p: jnp.sum(g * mdl.apply({"params": p})))(params)
    return {**params, "kernel_dq_position":
            params["kernel_dq_position"] - eta * grad["kernel_dq_position"]}

  def index_after(p):
    u, _ = _group_view(p["kernel_dq_position"], table)
    return np.asarray(lv.position_index(u, num))

  # Move every weight up (g = -1) by a weight-space distance d * gap_above.
  g_up = -np.ones((u2.shape[0], groups), np.float32)
  to_mid = 0.5 - (u2 - idx)  # residual distance to the upper midpoint
  small = step(1.0, g_up * np.where(inner, 0.9 * to_mid * up, 0.0))
  np.testing.assert_array_equal(index_after(small), idx)
  large = step(1.0, g_up * np.where(inner, (to_mid + 0.5) * up, 0.0))
  np.testing.assert_array_equal(index_after(large)[inner], idx[inner] + 1)
  np.testing.assert_array_equal(index_after(large)[~inner], idx[~inner])
  # Moving level j of channel 0 by delta moves every weight at it by delta
  # (assignments unchanged, unlike latent weights re-assigned by distance).
  j = int(np.bincount(idx[:, 0], minlength=num).argmax())
  levels = np.array(params["kernel_dq_levels"])
  order = np.argsort(levels[0])
  delta = 0.3 * float(np.min(np.diff(np.asarray(table[0]))))
  levels[0, order[j]] += delta
  moved = mdl.apply({"params": {**params, "kernel_dq_levels": levels}})
  before = mdl.apply({"params": params})
  w_b, _ = _group_view(before, table)
  w_m, _ = _group_view(moved, table)
  at_j = idx[:, 0] == j
  np.testing.assert_allclose(w_m[at_j, 0] - w_b[at_j, 0], delta, rtol=1e-5)
  np.testing.assert_array_equal(w_m[~at_j, 0], w_b[~at_j, 0])


def test_direct_positions_beyond_the_end_levels_are_not_pushed_further():
  """Beyond [-1/2, L - 1/2] a position gets no gradient pushing it out."""
  u = jnp.array([[-0.7], [-0.2], [2.6], [3.6]])  # 4 levels, one group
  levels = jnp.array([-1.0, 0.0, 1.0, 2.0])
  grad = lambda g: jax.grad(lambda u: jnp.sum(  # noqa: E731
      jnp.asarray(g) * lv.quantize_positions(u, levels)))(u)
  down = np.asarray(grad([[1.0], [1.0], [1.0], [1.0]]))[:, 0]
  up = np.asarray(grad([[-1.0], [-1.0], [-1.0], [-1.0]]))[:, 0]
  assert down[0] == 0 and down[1] > 0 and down[2] > 0 and down[3] > 0
  assert up[3] == 0 and up[0] < 0 and up[1] < 0 and up[2] < 0


def test_levels_sorted_and_distinct_after_large_sgd_steps():
  mdl, params = _weight_model(2, "per_channel")
  target = 5.0 * jax.random.normal(jax.random.PRNGKey(2),
                                   params["kernel"].shape)

  def loss(p):
    return jnp.sum((mdl.apply({"params": p}) - target) ** 2)

  @jax.jit
  def sgd(p):
    return jax.tree_util.tree_map(lambda a, b: a - 3.0 * b, p,
                                  jax.grad(loss)(p))

  for _ in range(5):
    params = sgd(params)
  raw = params["kernel_dq_levels"]
  assert not np.all(np.diff(raw, axis=-1) > 0)  # the raw param left order
  used = lv.sorted_levels(raw)
  assert np.all(np.isfinite(used)) and np.all(np.diff(used, axis=-1) > 0)
  w2, lv2 = _group_view(mdl.apply({"params": params}), used)
  assert all(np.all(np.isin(w2[:, g], lv2[g])) for g in range(lv2.shape[0]))


def test_sorted_levels_separates_coinciding_levels():
  for v in (jnp.zeros((4,)), jnp.full((2, 8), 0.3), jnp.array([1., 1, 0, 1]),
            jnp.array([0.7, 0.7, 0.7, 0.70000017])):
    u = lv.sorted_levels(v)
    assert np.all(np.isfinite(u)) and np.all(np.diff(u, axis=-1) > 0)
  v = jnp.array([-1.5, -0.5, 0.5, 1.5])
  np.testing.assert_array_equal(lv.sorted_levels(v), v)


def _shuffled_levels(num, groups, seed):
  """(groups..., num) well-separated levels (neighbours about 1 apart, far
  more than the minimum gap), each row in a non-sorted random order."""
  rng = np.random.default_rng(seed)
  base = (np.arange(num) - num / 2 + rng.uniform(-0.2, 0.2, groups + (num,))
          ).astype(np.float32)
  out = np.empty_like(base)
  for idx in np.ndindex(*groups):
    perm = rng.permutation(num)
    while np.array_equal(perm, np.arange(num)):
      perm = rng.permutation(num)
    out[idx] = base[idx][perm]
  return out


@pytest.mark.parametrize("groups", [(), (3,)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sorted_levels_is_sort_of_shuffled_separated_levels(bits, groups):
  """methods.md sec. 4: sorted_levels(v) == sort(v) for a shuffled,
  well-separated v (the gap rule changes nothing there)."""
  v = _shuffled_levels(2 ** bits, groups, seed=bits)
  assert not np.all(np.diff(v, axis=-1) > 0)
  np.testing.assert_array_equal(lv.sorted_levels(jnp.asarray(v)),
                                np.sort(v, axis=-1))


def _min_gap_reference(v, min_gap):
  """sorted_levels by its documented rule, in float64: s = sort(v),
  gap = min_gap * max(span, max|s|, 1e-12) / (L - 1),
  u_0 = s_0, u_j = max(s_j, u_{j-1} + gap). Returns (u, gap)."""
  s = np.sort(np.asarray(v, np.float64), axis=-1)
  num = s.shape[-1]
  ref = np.maximum(s[..., -1:] - s[..., :1],
                   np.max(np.abs(s), -1, keepdims=True))
  gap = min_gap * np.maximum(ref, 1e-12) / (num - 1)
  u = s.copy()
  for j in range(1, num):
    u[..., j] = np.maximum(s[..., j], u[..., j - 1] + gap[..., 0])
  return u, gap


@pytest.mark.parametrize("min_gap", [lv.MIN_GAP, 0.1])
def test_sorted_levels_keeps_levels_distinct_by_min_gap(min_gap):
  cases = [np.zeros(4), np.full((2, 8), 0.3), np.array([1., 1, 0, 1]),
           np.array([0.7, -1, 0.7, 2, 0.7, -1, 3, 0.7]),
           np.array([0.7, 0.7, 0.7, 0.70000017]),
           _shuffled_levels(8, (2,), seed=5)]
  for v in cases:
    v = np.asarray(v, np.float32)
    u = np.asarray(lv.sorted_levels(jnp.asarray(v), min_gap=min_gap),
                   np.float64)
    want, gap = _min_gap_reference(v, min_gap)
    # u is float32 (|u| <= 3: ulp <= 2.4e-7); the reference is exact in
    # float64. Four ulps cover the rounding of gap, the ramp and the sum.
    ulp = 4 * np.spacing(np.float32(np.max(np.abs(want)) + 1.0))
    np.testing.assert_allclose(u, want, rtol=0, atol=ulp)
    assert np.all(np.diff(u, axis=-1) >= gap - ulp), (v, u)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_layer_uses_the_sorted_stored_levels(granularity):
  """A layer whose stored levels are shuffled quantizes exactly as with
  them sorted, and each stored level gets the gradient of the position it
  sorts into."""
  mdl, params = _weight_model(3, granularity)
  levels = np.asarray(params["kernel_dq_levels"])
  perm = np.random.default_rng(0).permutation(levels.shape[-1])
  assert not np.array_equal(perm, np.arange(levels.shape[-1]))
  shuffled = {**params, "kernel_dq_levels": jnp.asarray(levels[..., perm])}
  g = jax.random.normal(jax.random.PRNGKey(1), params["kernel"].shape)

  def value_and_grad(p):
    return jax.value_and_grad(lambda p: jnp.sum(g * mdl.apply(
        {"params": p})))(p), mdl.apply({"params": p})

  (_, grad_sorted), wq_sorted = value_and_grad(params)
  (_, grad_shuffled), wq_shuffled = value_and_grad(shuffled)
  np.testing.assert_array_equal(wq_shuffled, wq_sorted)
  assert len(np.unique(np.asarray(wq_sorted))) > 2  # not collapsed
  np.testing.assert_array_equal(grad_shuffled["kernel_dq_levels"],
                                np.asarray(grad_sorted["kernel_dq_levels"])
                                [..., perm])


@pytest.mark.parametrize("bits", [2, 3])
def test_kmeans_init_beats_uniform_on_gaussian(bits):
  w = jax.random.normal(jax.random.PRNGKey(3), (4096,))
  mse = {m: float(jnp.mean((w - lv.quantize_levels(
      w, lv.init_levels(w, bits, (0,), m))) ** 2))
         for m in ("kmeans", "uniform")}
  assert mse["kmeans"] < 0.9 * mse["uniform"]
  # Lloyd-Max MSE of N(0, 1): 0.1175 (2 bits), 0.03454 (3 bits).
  assert mse["kmeans"] == pytest.approx({2: 0.1175, 3: 0.03454}[bits],
                                        rel=0.1)


def test_uniform_init_and_export():
  w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 4, 6))
  uni = lv.init_levels(w, 3, (0, 1, 2), "uniform")
  s = qz.lsq_init_step(w, "full", 3, (0, 1, 2)).reshape(6, 1)
  np.testing.assert_allclose(uni, s * np.arange(-4, 4), rtol=1e-6)
  assert lv.is_uniform(uni)
  assert not lv.is_uniform(lv.init_levels(w, 3, (0, 1, 2), "kmeans"))
  idx, table = lv.export_indices(w, uni)
  assert idx.dtype == jnp.uint8 and idx.shape == w.shape
  assert int(idx.max()) < 8
  np.testing.assert_array_equal(
      np.take_along_axis(np.asarray(table).T, np.asarray(idx).reshape(-1, 6),
                         0).reshape(w.shape), lv.quantize_levels(w, uni))


def test_degenerate_weights_no_nan():
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda w, v: jnp.sum(lv.quantize_levels(w, lv.sorted_levels(v))),
      argnums=(0, 1)))
  for w in (jnp.zeros((3, 3, 4, 6)), jnp.full((3, 3, 4, 6), 0.7)):
    for method in ("kmeans", "uniform"):
      table = lv.init_levels(w, 2, (0, 1, 2), method)
      assert np.all(np.diff(table, axis=-1) > 0)
      val, grads = value_and_grad(w, table)
      assert all(np.all(np.isfinite(g)) for g in grads)
      if method == "kmeans":  # a constant group is one of its levels
        np.testing.assert_allclose(val, float(jnp.sum(w)), rtol=1e-5)


def test_weight_config_errors():
  with pytest.raises(ValueError, match="TensorQuant.granularity=.*per_group"
                     ".*allowed values: 'per_tensor', 'per_channel'"):
    WeightOnly(TensorQuant(method="dq", bits=2, granularity="per_group",
                           group_size=2)).init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="TensorQuant.grid='restricted'"):
    WeightOnly(TensorQuant(method="dq", bits=2, grid="restricted")).init(
        jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------
# (b) Channel-error-weighted clip.
# ---------------------------------------------------------------------------

def _per_channel_error(x, alpha, bits, grid):
  q = clip_search.clip_quant(x, alpha, bits, grid)
  return np.asarray(jnp.sum((x - q) ** 2, 0) / jnp.sum(x ** 2, 0))


def test_channel_weighted_clip_60_plus_4():
  """60 channels of std 1, 4 of std 20; relu'd for the unsigned grid."""
  std = jnp.concatenate([jnp.ones(60), jnp.full(4, 20.0)])
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(5), (2048, 64)) * std)
  bits, grid = 4, "unsigned"
  a_ch = clip_search.fit_clip(x, bits, grid)
  a_pool = clip_search.pooled_mse_clip(x, bits, grid)
  assert a_ch < a_pool
  e_ch = _per_channel_error(x, a_ch, bits, grid)
  e_pool = _per_channel_error(x, a_pool, bits, grid)
  assert np.median(e_ch) < np.median(e_pool)
  assert np.mean(e_ch[60:]) > np.mean(e_pool[60:])
  # fit_clip minimises E over its candidates.
  errs = [clip_search.channel_error(x, a, bits, grid)
          for a in clip_search.clip_candidates(x, grid, clip_search.NUM_CLIP_CANDIDATES)]
  assert clip_search.channel_error(x, a_ch, bits, grid) == pytest.approx(min(errs))


def _normalised_mean_clip(x, bits, grid):
  """The first design's clip: mean of errors over each channel's own energy
  (no floor), by the same grid search."""
  cands = clip_search.clip_candidates(x, grid, clip_search.NUM_CLIP_CANDIDATES)
  return cands[int(np.argmin([np.mean(_per_channel_error(x, a, bits, grid))
                              for a in cands]))]


def test_near_silent_minority_does_not_pull_the_clip_down():
  """40 channels of std 1, 24 of std 0.05 (methods.md sec. 4 (ii)): the
  median channel's error stays within 2x of the pooled-MSE clip's, where
  the unfloored normalised mean makes it many times worse."""
  std = jnp.concatenate([jnp.ones(40), jnp.full(24, 0.05)])
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(6), (2048, 64)) * std)
  bits, grid = 4, "unsigned"
  a_ch = clip_search.fit_clip(x, bits, grid)
  a_pool = clip_search.pooled_mse_clip(x, bits, grid)
  a_norm = _normalised_mean_clip(x, bits, grid)
  med = lambda a: float(np.median(_per_channel_error(x, a, bits, grid)))  # noqa: E731
  assert med(a_ch) <= 2 * med(a_pool), (a_ch, a_pool, med(a_ch), med(a_pool))
  assert med(a_norm) > 5 * med(a_pool), (a_norm, med(a_norm))  # the old bug
  assert a_norm < 0.6 * a_pool <= a_ch


@pytest.mark.parametrize("grid", ["unsigned", "full"])
def test_silent_channels_give_no_nan(grid):
  """All-zero channels, or an all-zero input (methods.md sec. 4 (iii))."""
  x = jax.random.normal(jax.random.PRNGKey(7), (256, 8))
  for v in (x.at[:, :5].set(0.0), jnp.zeros_like(x)):
    alpha = clip_search.fit_clip(v, 4, grid)
    val, grad = jax.value_and_grad(
        lambda a, v=v: clip_search.channel_error(v, a, 4, grid))(alpha)
    assert np.isfinite([float(alpha), float(val), float(grad)]).all()
    assert float(alpha) > 0


@pytest.mark.parametrize("grid", ["unsigned", "full"])
def test_channel_error_value_and_lsq_gradient(grid):
  """E and dE/d alpha match autodiff of the LSQ-style fake quant."""
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(9), (16, 3, 8))
  x = x.at[..., 0].set(0.0)  # a zero channel counts as zero error
  qmin, qmax = qz.grid_range(grid, 3)
  bound = qz.grid_bound(grid, 3)

  def ref(alpha):
    q = qz.fake_quant(x, qz.QParams(alpha / bound, None, qmin, qmax))
    energy = jnp.sum(x ** 2, (0, 1))
    err = jnp.sum((x - q) ** 2, (0, 1)) / (
        jnp.maximum(energy, jnp.sort(energy)[3:5].mean()) + 1e-8)  # median
    return jnp.mean(err)

  got_fn = jax.jit(jax.value_and_grad(
      lambda a: clip_search.channel_error(x, a, 3, grid)))
  want_fn = jax.jit(jax.value_and_grad(ref))
  for alpha in (0.5, 2.0, 5.0):
    val, grad = got_fn(jnp.float32(alpha))
    want_val, want_grad = want_fn(jnp.float32(alpha))
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  assert not np.any(jax.grad(lambda x: clip_search.channel_error(
      x, jnp.float32(2.0), 3, grid))(x))  # x is stop-gradiented


@pytest.mark.parametrize("grid", ["unsigned", "full"])
def test_clip_quant_pact_gradient(grid):
  x = jnp.linspace(-3.0, 3.0, 61)
  alpha = jnp.float32(2.0)
  qmin, qmax = qz.grid_range(grid, 3)
  bound = qz.grid_bound(grid, 3)
  dx, da = jax.grad(lambda x, a: jnp.sum(clip_search.clip_quant(x, a, 3, grid)),
                    argnums=(0, 1))(x, alpha)
  hi, lo = qmax / bound * 2.0, qmin / bound * 2.0
  inside = (x > lo) & (x < hi)
  np.testing.assert_array_equal(dx, inside.astype(jnp.float32))
  want = qmax / bound * jnp.sum(x >= hi) + qmin / bound * jnp.sum(x <= lo)
  np.testing.assert_allclose(da, want, rtol=1e-6)
  q = clip_search.clip_quant(x, alpha, 3, grid)
  assert len(np.unique(q)) <= 8 and float(q.max()) <= hi + 1e-6


# ---------------------------------------------------------------------------
# Layers: jit, grad, aux loss, static calibration.
# ---------------------------------------------------------------------------

def _layer(kind, bits, granularity, **input_kw):
  quant = LayerQuant(
      weight=TensorQuant(method="dq", bits=bits, granularity=granularity),
      input=TensorQuant(method="dq", bits=bits, grid="unsigned", **input_kw))
  if kind == "dense":
    return QuantDense(5, quant=quant), (8, 6)
  return QuantConv(6, (3, 3), quant=quant), (2, 6, 6, 4)


@pytest.mark.parametrize("kind,bits,granularity", [
    ("dense", 2, "per_channel"), ("conv", 2, "per_tensor"),
    ("conv", 3, "per_channel")])
def test_layer_jit_grad_aux_loss(kind, bits, granularity):
  layer, shape = _layer(kind, bits, granularity)
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(6), shape))
  x = x.at[..., 0].set(0.0)  # a zero input channel
  params = layer.init(jax.random.PRNGKey(7), x)["params"]
  assert set(params) == {"kernel", "bias", "kernel_dq_levels",
                         "kernel_dq_position", "input_dq_alpha"}
  params["kernel"] = params["kernel"].at[..., 1].set(0.0)  # zero out-channel

  def loss(p, task_weight):
    y, state = layer.apply({"params": p}, x, mutable=["quant_losses"])
    aux = sum(jax.tree_util.tree_leaves(state["quant_losses"]))
    return task_weight * jnp.sum(y ** 2) + aux, (y, state["quant_losses"])

  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (total, (y, sown)), grads = loss_and_grad(params, 1.0)
  assert list(sown) == ["input_dq_err"]
  np.testing.assert_allclose(sown["input_dq_err"][0], clip_search.channel_error(
      x[::dq.AUX_STRIDE], params["input_dq_alpha"], bits, "unsigned"),
                             rtol=1e-5)
  assert np.isfinite(total) and np.all(np.isfinite(y))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g))
  (aux, _), aux_grads = loss_and_grad(params, 0.0)
  assert aux > 0 and float(aux_grads["input_dq_alpha"]) != 0.0
  for k in ("kernel", "kernel_dq_levels", "kernel_dq_position", "bias"):
    assert not np.any(aux_grads[k])  # the aux loss trains alpha only
  assert not np.any(grads["kernel"])  # direct: the float kernel is unused
  # Not mutable: sow is a no-op and the output is unchanged.
  np.testing.assert_allclose(layer.apply({"params": params}, x), y,
                             rtol=1e-6, atol=1e-6)


def test_alpha_init_from_data_or_pact_init():
  layer, shape = _layer("dense", 3, "per_tensor", pact_init=6.0)
  zero = layer.init(jax.random.PRNGKey(0), jnp.zeros(shape))["params"]
  assert float(zero["input_dq_alpha"]) == 6.0
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), shape))
  data = layer.init(jax.random.PRNGKey(0), x)["params"]
  assert float(data["input_dq_alpha"]) == pytest.approx(
      float(clip_search.fit_clip(x, 3, "unsigned")))


def _dense_ref(params, x, alpha, bits):
  """QuantDense by hand: clip-quantized input times DQ kernel, plus bias."""
  kernel = lv.quantize_levels(params["kernel"],
                              lv.sorted_levels(params["kernel_dq_levels"]))
  return (clip_search.clip_quant(x, alpha, bits, "unsigned") @ kernel
          + params["bias"])


def test_static_calibration_ema():
  layer, shape = _layer("dense", 4, "per_tensor", calibration="static",
                        ema_decay=0.5)
  x1 = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(8), shape))
  x2 = 3.0 * x1 + 0.5
  variables = layer.init(jax.random.PRNGKey(0), x1)
  params = variables["params"]
  assert "input_dq_alpha" not in params
  assert int(variables["quant_stats"]["input_count"]) == 0
  fit = lambda x: clip_search.fit_clip(x, 4, "unsigned")  # noqa: E731
  apply = layer.apply
  # Frozen and never updated: the batch clip is used.
  np.testing.assert_allclose(apply(variables, x2),
                             _dense_ref(params, x2, fit(x2), 4), rtol=1e-5,
                             atol=1e-5)
  # Mutable: the first update takes the batch clip, then the EMA.
  _, upd = apply(variables, x1, mutable=["quant_stats"])
  assert int(upd["quant_stats"]["input_count"]) == 1
  assert float(upd["quant_stats"]["input_dq_clip"]) == pytest.approx(
      float(fit(x1)))
  y, upd = apply({"params": params, **upd}, x2, mutable=["quant_stats"])
  stats = upd["quant_stats"]
  ema = 0.5 * fit(x1) + 0.5 * fit(x2)
  assert float(stats["input_dq_clip"]) == pytest.approx(float(ema), rel=1e-6)
  np.testing.assert_allclose(y, _dense_ref(params, x2, ema, 4), rtol=1e-5,
                             atol=1e-5)
  # Frozen: the EMA is used and not updated (x1's own clip differs).
  assert float(fit(x1)) != pytest.approx(float(ema))
  frozen = {"params": params, "quant_stats": stats}
  np.testing.assert_allclose(apply(frozen, x1),
                             _dense_ref(params, x1, ema, 4), rtol=1e-5,
                             atol=1e-5)
  _, same = apply(frozen, x1, mutable=["quant_losses"])
  assert "quant_stats" not in same


def test_input_config_errors():
  with pytest.raises(ValueError, match="TensorQuant.grid='asymmetric'.*"
                     "allowed values: 'unsigned', 'full'"):
    _, shape = _layer("dense", 2, "per_tensor")
    QuantDense(3, quant=LayerQuant(input=TensorQuant(
        method="dq", bits=2, grid="asymmetric"))).init(
            jax.random.PRNGKey(0), jnp.ones(shape))
