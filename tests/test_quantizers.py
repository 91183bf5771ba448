"""Numeric checks of methods.md sec. 1-3 and the AQT v2 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqt_ext.core import quantizers as qz

jax.config.update("jax_default_matmul_precision", "highest")


def _uniform_q(x, grid, bits, axes):
  qp = qz.qparams_from_range(qz.observe_range(x, grid, axes), grid, bits)
  return qz.quantize(x, qp), qp


# ---------------------------------------------------------------------------
# AQT v2 oracle (aqtp on PyPI): int values equal elementwise.
# ---------------------------------------------------------------------------

CASES = [((16, 32), (1,)), ((4, 6, 6, 3), (1, 2, 3)), ((3, 3, 8, 16), (0, 1, 2)),
         ((64,), (0,)), ((5, 7, 9), (0, 2))]


@pytest.mark.parametrize("shape,axes", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits,preserve_max", [(8, False), (4, False),
                                               (2, False), (8, True)])
def test_aqt_oracle_qvalues(shape, axes, dtype, bits, preserve_max):
  aqt_quantizer = pytest.importorskip("aqt.jax.v2.aqt_quantizer")
  key = jax.random.PRNGKey(hash((shape, bits)) % 2**31)
  x = (jax.random.normal(key, shape) * 3.0).astype(dtype)
  x = x.at[(0,) * (len(shape) - 1)].set(0)  # a zero group somewhere
  if len(shape) == 2:
    x = x.at[3].set(0)  # an all-zero row: the zero-group guard
  ref = aqt_quantizer.quantizer_make(bits, preserve_max_val=preserve_max)
  qt, _ = ref.quant(x, calibration_axes=list(axes))
  ours, qp = _uniform_q(x, "restricted" if preserve_max else "aqt", bits, axes)
  assert ours.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(qt.qvalue.astype(jnp.float32)),
                                np.asarray(ours.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(qt.scale[0].astype(jnp.float32)),
                                np.asarray(qp.scale.astype(jnp.float32)))


@pytest.mark.parametrize("m,k,n", [(16, 32, 8), (3, 128, 5), (1, 7, 1)])
@pytest.mark.parametrize("bits", [8, 4])
def test_aqt_oracle_dot(m, k, n, bits):
  """AQT fully_quantized dot == our int-execution QuantDense, bit for bit."""
  aqt_config = pytest.importorskip("aqt.jax.v2.config")
  import aqt_ext as A
  kx, kw = jax.random.split(jax.random.PRNGKey(m * k * n))
  x = jax.random.normal(kx, (m, k))
  w = jax.random.normal(kw, (k, n)) * 0.1
  dg = aqt_config.fully_quantized(fwd_bits=bits, bwd_bits=None,
                                  use_stochastic_rounding=False)
  ref = dg(x, w, (((1,), (0,)), ((), ())))
  lq = A.layer_preset("aqt", bits, bits, signed_input=True)
  layer = A.QuantDense(n, use_bias=False, quant=lq.replace(execution="int"))
  ours = layer.apply({"params": {"kernel": w}}, x)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(ours))
  fake = A.QuantDense(n, use_bias=False, quant=lq).apply(
      {"params": {"kernel": w}}, x)
  np.testing.assert_allclose(fake, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Grids.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("grid", ["full", "restricted", "aqt", "unsigned",
                                  "asymmetric"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_values_and_levels(grid, bits):
  x = jax.random.normal(jax.random.PRNGKey(bits), (512,)) * 2 + 0.3
  q, qp = _uniform_q(x, grid, bits, (0,))
  qmin, qmax = qz.grid_range(grid, bits)
  assert float(q.min()) >= qmin and float(q.max()) <= qmax
  np.testing.assert_array_equal(q, jnp.round(q))
  assert len(np.unique(np.asarray(q))) <= 2 ** bits
  deq = qz.dequantize(q, qp)
  if grid == "unsigned":  # negatives clip to 0; positives within a step
    err = jnp.abs(deq - jnp.maximum(x, 0))
  else:
    err = jnp.abs(deq - x)
  assert float(err.max()) <= float(qp.scale.max()) * (1.0 + 1e-5)
  if grid == "asymmetric":  # zero is exactly representable
    np.testing.assert_array_equal(qz.fake_quant(jnp.zeros(3), qp), 0.0)


def test_grid_bounds_match_methods_md():
  assert qz.grid_range("full", 4) == (-8, 7)
  assert qz.grid_range("restricted", 4) == (-7, 7)
  assert qz.grid_range("aqt", 8) == (-127, 127)
  assert qz.grid_bound("aqt", 8) == 127.5
  assert qz.grid_bound("restricted", 8) == 127
  assert qz.grid_range("unsigned", 3) == (0, 7)


@pytest.mark.parametrize("grid", ["full", "aqt", "unsigned", "asymmetric"])
def test_zero_tensor_no_nan(grid):
  x = jnp.zeros((4, 8))
  q, qp = _uniform_q(x, grid, 4, (1,))
  assert bool(jnp.isfinite(qp.scale).all())
  np.testing.assert_array_equal(qz.dequantize(q, qp), 0.0)
  g = jax.grad(lambda v: qz.fake_quant(v, qp).sum())(x)
  assert bool(jnp.isfinite(g).all())


def test_rounding_modes():
  t = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
  np.testing.assert_array_equal(qz.round_(t, "half_even"),
                                [-2, -2, -0, 0, 2, 2])
  np.testing.assert_array_equal(qz.round_(t, "half_away"),
                                [-3, -2, -1, 1, 2, 3])


def test_ste_with_clipping_mask():
  qp = qz.QParams(jnp.array(0.5), None, -8.0, 7.0)  # real range [-4, 3.5]
  x = jnp.array([-5.0, -4.0, -1.3, 0.2, 3.5, 3.6, 9.0])
  g = jax.grad(lambda v: qz.fake_quant(v, qp).sum())(x)
  np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 0, 0])


def test_per_group_scales():
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))  # kernel (in, out)
  axes = qz.OperandAxes((0,), 0)
  view, vaxes = qz.split_groups(x, axes, 4)
  assert view.shape == (3, 4, 5) and vaxes.contracting == (1,)
  red = qz.reduce_axes(view.ndim, vaxes, "per_channel")
  rng = qz.observe_range(view, "full", red)
  assert rng["amax"].shape == (3, 1, 5)
  np.testing.assert_allclose(rng["amax"][1, 0, 2], jnp.abs(x[4:8, 2]).max())
  with pytest.raises(ValueError, match="group_size"):
    qz.split_groups(x, axes, 5)


# ---------------------------------------------------------------------------
# LSQ (methods.md sec. 2).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,expected", [(2, 1.596), (3, 0.921), (4, 0.603),
                                           (8, 0.1416)])
def test_lsq_init_on_gaussian(bits, expected):
  w = jax.random.normal(jax.random.PRNGKey(0), (1_000_000,))
  s = qz.lsq_init_step(w, "full", bits, (0,))
  assert abs(float(s[0]) - expected) / expected < 0.005


def test_lsq_step_gradient():
  bits, s, n = 3, 0.5, 10
  qn, qp = qz.lsq_range("full", bits)  # 4, 3
  g = 1.0 / np.sqrt(n * qp)
  v = jnp.array([-3.0, -2.0, -0.6, 0.1, 0.74, 1.5, 1.6, 4.0])

  def f(step, vi):
    return qz.lsq_quant(vi, step, "full", bits, n)

  grads = jax.vmap(jax.grad(f), in_axes=(None, 0))(jnp.array(s), v)
  vs = np.asarray(v) / s
  expected = np.where(vs < -qn, -qn, np.where(vs > qp, qp,
                                              -vs + np.round(vs)))
  np.testing.assert_allclose(grads, expected * g, rtol=1e-5, atol=1e-7)
  gv = jax.vmap(jax.grad(f, argnums=1), in_axes=(None, 0))(jnp.array(s), v)
  np.testing.assert_array_equal(gv, ((vs >= -qn) & (vs <= qp)).astype(float))


# ---------------------------------------------------------------------------
# PACT (methods.md sec. 3).
# ---------------------------------------------------------------------------

def test_pact_forward_and_gradients():
  bits, alpha = 2, 3.0
  x = jnp.array([-1.0, 0.4, 1.2, 2.9, 3.0, 5.0])
  y = qz.pact_quant(x, jnp.array(alpha), bits)
  np.testing.assert_allclose(y, [0, 0, 1, 3, 3, 3])
  ga = jax.vmap(jax.grad(lambda a, v: qz.pact_quant(v, a, bits)),
                in_axes=(None, 0))(jnp.array(alpha), x)
  np.testing.assert_array_equal(ga, [0, 0, 0, 0, 1, 1])
  gx = jax.vmap(jax.grad(lambda v: qz.pact_quant(v, jnp.array(alpha), bits))
                )(x)
  np.testing.assert_array_equal(gx, [0, 1, 1, 1, 0, 0])


def test_bf16_round_is_bf16_values_with_identity_grad():
  x = jax.random.normal(jax.random.PRNGKey(0), (100,))
  y = qz.bf16_round(x)
  np.testing.assert_array_equal(y, x.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(jax.grad(lambda v: qz.bf16_round(v).sum())(x),
                                1.0)
