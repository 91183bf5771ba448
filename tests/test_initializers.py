"""`aqt_ext.core.initializers` draws the same values as `jax.nn.initializers`."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqt_ext.core import initializers

SHAPES = [(5, 3), (3, 3, 4, 8), (2, 3, 3, 5, 4), (3, 4, 6)]
DISTRIBUTIONS = ["truncated_normal", "normal", "uniform"]
MODES = ["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_variance_scaling_equals_jax(distribution, dtype):
  # (jax's own rank-4 draws are what is slow to compile, so each shape is
  # drawn once per mode-and-distribution pair, cycling the modes.)
  for i, shape in enumerate(SHAPES):
    mode = MODES[i % len(MODES)]
    ours = initializers.variance_scaling(1.7, mode, distribution)
    ref = jax.nn.initializers.variance_scaling(1.7, mode, distribution)
    key = jax.random.key(i)
    got, want = ours(key, shape, dtype), ref(key, shape, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(want, np.float32))
  # ... and under jit, where the compile cost differs. (jax's own eager
  # and jitted draws can differ by an ulp, so compare like with like.)
  shape = (3, 3, 4, 8)
  ours = initializers.variance_scaling(2.0, "fan_out", distribution)
  ref = jax.nn.initializers.variance_scaling(2.0, "fan_out", distribution)
  got = jax.jit(ours, static_argnums=(1, 2))(key, shape, dtype)
  want = jax.jit(ref, static_argnums=(1, 2))(key, shape, dtype)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def test_axes_and_default_dtype_follow_jax():
  shape = (4, 3, 3, 6)
  kw = dict(in_axis=0, out_axis=(1, 3), batch_axis=())
  ours = initializers.variance_scaling(2.0, "fan_in", "normal", **kw)
  ref = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal", **kw)
  key = jax.random.key(3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no float64-truncation warning
    got = ours(key, shape)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, ref(key, shape))
  np.testing.assert_array_equal(initializers.lecun_normal()(key, shape),
                                jax.nn.initializers.lecun_normal()(key, shape))


def test_draws_are_not_degenerate():
  # Equality with jax would also hold for two constant functions; check the
  # draw has the variance it is meant to have.
  w = initializers.variance_scaling(2.0, "fan_out", "normal")(
      jax.random.key(0), (3, 3, 64, 64))
  assert abs(float(jnp.var(w)) - 2.0 / (9 * 64)) < 0.05 * 2.0 / (9 * 64)


def test_bad_mode_and_distribution_name_the_allowed_values():
  with pytest.raises(ValueError, match="mode='fan'.*'fan_in'"):
    initializers.variance_scaling(1.0, "fan", "normal")
  with pytest.raises(ValueError, match="distribution='gauss'.*'uniform'"):
    initializers.variance_scaling(1.0, "fan_in", "gauss")
