"""fp8 as a quantization target (`aqt_ext.core.fp8`, issue 16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aqt_ext as A
from aqt_ext import nnx as aqt_nnx
from aqt_ext.config import LayerQuant, TensorQuant, parse_spec
from aqt_ext.core import fp8


def _reference(x, axes, fmt):
  """Cast round trip: scale absmax to the format's largest value, saturate,
  cast to fp8 and back, rescale."""
  dtype, fmax = fp8.FORMATS[fmt]
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax, 1) / fmax
  t = x * (1 / scale)
  return jnp.clip(t, -fmax, fmax).astype(dtype).astype(x.dtype) * scale


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gran,axes", [("per_tensor", None),
                                       ("per_channel", (0,))])
def test_fake_quant_is_a_cast_round_trip(fmt, dtype, gran, axes):
  w = (jax.random.normal(jax.random.PRNGKey(0), (24, 6)) * 0.3).astype(dtype)
  w = w.at[:, 2].set(0)  # a zero channel: scale 1, values 0
  lq = LayerQuant(weight=TensorQuant("fp8", fp8_format=fmt,
                                     granularity=gran))
  kernel_q = A.QuantDense(6, use_bias=False, quant=lq, dtype=dtype,
                          param_dtype=dtype).apply(
                              {"params": {"kernel": w}}, jnp.eye(24, dtype=dtype))
  ref = _reference(w, axes, fmt)
  np.testing.assert_array_equal(np.asarray(kernel_q, np.float32),
                                np.asarray(ref, np.float32))
  assert not np.array_equal(np.asarray(kernel_q, np.float32),
                            np.asarray(w, np.float32))  # rounded


def test_saturates_without_inf_or_nan_and_masks_the_gradient():
  x = jnp.array([1.0, -2.0, 3.0, 1e6, -1e30])
  scale = jnp.array(3.0 / 448.0)  # as a delayed scale from a past amax of 3
  y = fp8.fake_quant(x, scale, "e4m3")
  assert bool(jnp.isfinite(y).all())
  np.testing.assert_allclose(y[3:], [3.0, -3.0], rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(fp8.fake_quant(v, scale, "e4m3")))(x)
  np.testing.assert_array_equal(g, [1, 1, 1, 0, 0])


def test_delayed_scaling_uses_the_previous_steps_and_freezes_in_eval():
  lq = LayerQuant(input=TensorQuant("fp8", calibration="delayed",
                                    amax_history=3))
  layer = A.QuantDense(2, use_bias=False, quant=lq)
  w = jnp.eye(4)[:, :2]
  v = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  v = {"params": {"kernel": w}, "quant_stats": v["quant_stats"]}
  seen = []
  for amax in (2.0, 1.0, 8.0, 0.5, 0.5, 0.5):
    x = jnp.array([[amax, amax / 3, 0.1, 0.0]])
    y, new = layer.apply(v, x, mutable=["quant_stats"])
    v = {**v, **new}
    seen.append(float(y[0, 1]))  # amax/3 after the fp8 round trip
  hist = v["quant_stats"]["input_amax_history"]
  np.testing.assert_array_equal(hist, [0.5, 0.5, 0.5])
  # Step 0 scales by its own amax (2); steps 1 and 2 by the past's max, 2
  # (step 2's 8 saturates to 2); steps 3 to 5 by 8, still in the 3-step
  # history of the steps before them.
  def rt(value, past):
    return float(fp8.fake_quant(jnp.array(value), jnp.array(past / 448),
                                "e4m3"))
  assert seen[0] == rt(2 / 3, 2) and seen[1] == rt(1 / 3, 2)
  assert seen[2] == rt(8 / 3, 2) == 2.0  # saturated at the past amax
  assert seen[3] == rt(0.5 / 3, 8) and seen[5] == rt(0.5 / 3, 8)
  # Eval: frozen, scaled by the history's max.
  y = layer.apply(v, jnp.array([[3.0, 1.0, 0.0, 0.0]]))
  assert float(y[0, 0]) == rt(3.0, 0.5) == 0.5


def test_nnx_equals_linen():
  lq = parse_spec("fp8_delayed").default
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  lin = A.QuantConv(4, (3, 3), quant=lq)
  v = lin.init(jax.random.PRNGKey(1), x)
  m = aqt_nnx.QuantConv(3, 4, (3, 3), quant=lq, rngs=nnx.Rngs(0))
  m.kernel[...], m.bias[...] = v["params"]["kernel"], v["params"]["bias"]
  aqt_nnx.init(m, x)
  for _ in range(2):
    yl, new = lin.apply(v, x * 2, mutable=["quant_stats"])
    v = {**v, **new}
    yn = m(x * 2)
    np.testing.assert_array_equal(yl, yn)
  np.testing.assert_array_equal(v["quant_stats"]["input_amax_history"],
                                m.input_amax_history[...])


def test_config_and_cost():
  mq = parse_spec("fp8_e5m2_ge5m2sr")
  d = mq.default
  assert (d.weight.method, d.weight.fp8_format, d.input.calibration) == (
      "fp8", "e5m2", "dynamic")
  assert d.grad_input.format == "e5m2" and d.weight_bits == 8
  assert parse_spec("bf16").default.weight_bits == 16
  with pytest.raises(ValueError, match="fp8_format='e3m4'.*'e4m3', 'e5m2'"):
    TensorQuant("fp8", fp8_format="e3m4")
  with pytest.raises(ValueError, match="calibration='delayed' is not allowed "
                     "with method='uniform'; allowed methods: 'fp8'"):
    TensorQuant("uniform", bits=8, calibration="delayed")
  with pytest.raises(ValueError, match="'per_channel' is not allowed with "
                     "calibration='delayed'"):
    TensorQuant("fp8", calibration="delayed", granularity="per_channel")
  with pytest.raises(ValueError, match="cannot run with execution='int'"):
    LayerQuant(TensorQuant("fp8"), TensorQuant("fp8"), execution="int")
