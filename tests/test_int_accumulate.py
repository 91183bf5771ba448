"""`int_ops.accumulate`: int32 accumulation computed exactly, in float32 on
CPU (digit splits where one output sums too many products), against a
numpy int64 oracle and the native int32 contraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.lax import convolution as conv_internal

from aqt_ext.core import backward, int_ops


def _dot(a, b, t):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=t)


@pytest.mark.parametrize("k,plan", [(1040, (1, 1)), (5000, (2, 1)),
                                    (100_000, (2, 2)), (300_000, None)])
def test_dot_exact_in_every_plan(k, plan):
  assert int_ops.accumulate_plan(k, 128, 128) == plan or k == 1040
  assert int_ops.accumulate_plan(k, 127, 127) == plan
  rng = np.random.default_rng(k)
  # Mostly large values of one sign (the sums are far past 2^24 where
  # they can be), some odd and small ones (so float32 rounding shows).
  a = rng.choice([127, 126, -1, 3], size=(4, k)).astype(np.int8)
  b = rng.choice([127, 125, 1, -3], size=(k, 3)).astype(np.int8)
  oracle = a.astype(np.int64) @ b.astype(np.int64)
  got = jax.jit(lambda x, y: int_ops.accumulate(x, y, _dot, k, 127, 127))(
      a, b)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), oracle)
  if plan not in (None, (1, 1)):
    # One float32 contraction would not be exact here: the test can fail.
    naive = _dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                 jnp.float32)
    assert np.any(np.asarray(naive, np.float64) != oracle)


def test_plan_reads_grid_ranges_and_zero_points():
  from aqt_ext.core import quantizers as qz
  ints = jnp.zeros((2,), jnp.int16)
  assert int_ops.int_bound(ints) == 32768
  assert int_ops.int_bound(ints, qz.QParams(1., None, -7., 7.)) == 7
  assert int_ops.int_bound(ints, qz.QParams(1., jnp.zeros(()), 0., 255.)
                           ) == 255
  # 4-bit operands: a float32 contraction is exact up to 2^24 / 49 terms.
  assert int_ops.accumulate_plan(2 ** 24 // 49, 7, 7) == (1, 1)
  # Digits (up to 8) do not shrink a 4-bit operand: the native path runs.
  assert int_ops.accumulate_plan(2 ** 24 // 49 + 1, 7, 7) is None


def test_mixed_dtypes_exact():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, size=(3, 2000)).astype(np.uint8)
  b = rng.integers(-127, 128, size=(2000, 5)).astype(np.int8)
  got = int_ops.accumulate(jnp.asarray(a), jnp.asarray(b), _dot, 2000)
  np.testing.assert_array_equal(
      np.asarray(got), a.astype(np.int64) @ b.astype(np.int64))
  # The bounds are the operands' own (255, 128), not int16's after the
  # common cast: digits of a, float32 contractions only.
  assert int_ops.accumulate_plan(2000, 255, 128) == (2, 1)
  jaxpr = jax.make_jaxpr(lambda x, y: int_ops.accumulate(x, y, _dot, 2000))(
      a, b)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2 and all(
      v.aval.dtype == jnp.float32 for e in dots for v in e.invars)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 2)])
def test_conv_gradient_contractions_equal_native_int32(stride, groups):
  """Both gradient contractions of a conv, as `backward.Conv` runs them
  (float32 digits on CPU), equal XLA's native int32 contraction."""
  n, h, c, o = 16, 12, 4, 6
  x_shape, w_shape = (n, h, h, c), (3, 3, c // groups, o)
  kw = dict(window_strides=(stride, stride), padding="SAME",
            lhs_dilation=(1, 1), rhs_dilation=(1, 1),
            dimension_numbers=lax.conv_dimension_numbers(
                x_shape, w_shape, ("NHWC", "HWIO", "NHWC")),
            feature_group_count=groups)
  op = backward.Conv(tuple(kw.items()), x_shape, w_shape)
  params = op._transpose_params()
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.choice([-127, 127, 5], size=x_shape), jnp.int8)
  w = jnp.asarray(rng.choice([-127, 127, 2], size=w_shape), jnp.int8)
  ho = -(-h // stride)
  g = jnp.asarray(rng.choice([-127, 127, 1], size=(n, ho, ho, o)), jnp.int8)
  one = jnp.ones(())
  dx = op.grad_contract(True, g, one, w, one, jnp.float32)
  dw = op.grad_contract(False, g, one, x, one, jnp.float32)
  native_dx = conv_internal._conv_general_dilated_transpose_lhs(
      g, backward._Aval(x_shape, jnp.int32), w,
      preferred_element_type=jnp.int32, **params)
  native_dw = conv_internal._conv_general_dilated_transpose_rhs(
      g, x, backward._Aval(w_shape, jnp.int32),
      preferred_element_type=jnp.int32, **params)
  # dw sums 16 x ho^2 products of up to 127^2: past float32's exact range.
  assert n * ho * ho * 127 * 127 > 2 ** 24 or stride == 2
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(native_dx))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(native_dw))
