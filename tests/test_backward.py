"""The quantized backward pass (`aqt_ext.core.backward`, issue 16)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aqt_ext as A
from aqt_ext import nnx as aqt_nnx
from aqt_ext.config import GradQuant, LayerQuant, TensorQuant, parse_spec
from aqt_ext.core import backward as bw

INT8 = GradQuant("int")


def _vjp(f, x, w, g):
  """(output, dx, dw) of ``f(x, w)``, jitted (as training runs)."""
  def h(x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))
  return jax.jit(h)(x, w, g)


def _data(shape_x, shape_w, shape_g, dtype, seed):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kx, shape_x).astype(dtype),
          (jax.random.normal(kw, shape_w) * 0.1).astype(dtype),
          jax.random.normal(kg, shape_g).astype(dtype))


# ---------------------------------------------------------------------------
# The AQT v2 oracle: fully_quantized(fwd_bits=8, bwd_bits=8), deterministic.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape_x,n", [((16, 32), 8), ((3, 128), 5),
                                       ((1, 7), 1), ((2, 6, 24), 12)])
@pytest.mark.parametrize("use_fwd_quant", [True, False])
def test_equals_aqt_fully_quantized(dtype, shape_x, n, use_fwd_quant):
  aqt_config = pytest.importorskip("aqt.jax.v2.config")
  k = shape_x[-1]
  x, w, g = _data(shape_x, (k, n), shape_x[:-1] + (n,), dtype, k * n)
  dg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8,
                                  use_fwd_quant=use_fwd_quant,
                                  use_stochastic_rounding=False)
  dims = (((len(shape_x) - 1,), (0,)), ((), ()))
  ref = _vjp(lambda a, b: dg(a, b, dims), x, w, g)
  gq = INT8.replace(use_fwd_quant=use_fwd_quant)
  lq = A.layer_preset("aqt", 8, 8, signed_input=True).replace(
      execution="int", grad_input=gq, grad_weight=gq)
  layer = A.QuantDense(n, use_bias=False, quant=lq, dtype=dtype,
                       param_dtype=dtype)
  ours = _vjp(lambda a, b: layer.apply({"params": {"kernel": b}}, a), x, w, g)
  for name, r, o in zip(("output", "dx", "dw"), ref, ours):
    assert o.dtype == r.dtype, name
    np.testing.assert_array_equal(np.asarray(o, np.float32),
                                  np.asarray(r, np.float32), err_msg=name)


def test_fake_forward_gives_the_same_gradients_as_the_int_forward():
  x, w, g = _data((16, 32), (32, 8), (16, 8), jnp.float32, 1)
  lq = A.layer_preset("aqt", 8, 8, signed_input=True).replace(
      grad_input=INT8, grad_weight=INT8)
  outs = [_vjp(lambda a, b: A.QuantDense(8, use_bias=False, quant=q).apply(
      {"params": {"kernel": b}}, a), x, w, g)
          for q in (lq, lq.replace(execution="int"))]
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
  for a, b in zip(outs[0][1:], outs[1][1:]):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Every contraction: the quantized gradient is the exact vjp of the
# contraction at the quantized operands.
# ---------------------------------------------------------------------------

def _dequantized_vjp(op, g, x_side, w_side, gi, gw):
  """The oracle: the float vjp of the contraction, evaluated at the
  dequantized backward operands (no layout logic of ours involved)."""
  def operands(wrt_x):
    other = w_side if wrt_x else x_side
    gq = gi if wrt_x else gw
    a = g
    if gq.use_fwd_quant and other.ints is not None:
      a = g * op.fwd_scale_in_g(other.scale, of_x=not wrt_x)
      b = other.ints.astype(g.dtype)
    else:
      b = other.value
    g_keep, o_keep = op.keep(wrt_x)
    qa, sa = bw.quantize_grad_operand(a, gq, g_keep)
    qb, sb = bw.quantize_grad_operand(b, gq, o_keep)
    return (qa.astype(jnp.float32) * sa, qb.astype(jnp.float32) * sb)

  ga, wb = operands(True)
  dx = jax.vjp(lambda a: op.forward(a, wb), x_side.value)[1](ga)[0]
  gb, xb = operands(False)
  dw = jax.vjp(lambda b: op.forward(xb, b), w_side.value)[1](gb)[0]
  return dx, dw


def _sides(x, w, x_axes, w_axes, grid="aqt", gran="per_channel"):
  from aqt_ext.core import quantizers as qz
  out = []
  for v, axes in ((x, x_axes), (w, w_axes)):
    red = qz.reduce_axes(v.ndim, axes, gran)
    qp = qz.qparams_from_range(qz.observe_range(v, grid, red), grid, 8)
    out.append(bw.Side(v, qz.to_int(v, qp), qp.scale))
  return out


CONVS = [  # (x shape, w shape, conv kwargs)
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(window_strides=(1, 1),
                                      padding="SAME")),
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(window_strides=(2, 2),
                                      padding="VALID")),
    ((3, 8, 8, 6), (3, 3, 2, 9), dict(window_strides=(2, 1),
                                      padding=((1, 2), (0, 1)),
                                      feature_group_count=3)),
    ((2, 7, 7, 4), (3, 3, 4, 4), dict(window_strides=(1, 1), padding="SAME",
                                      rhs_dilation=(2, 2))),
    ((2, 11, 5), (3, 5, 7), dict(window_strides=(2,), padding="SAME")),
]


@pytest.mark.parametrize("case,fmt,use_fwd_quant", [
    *[(c, "int", True) for c in range(len(CONVS))],
    (1, "int", False), (2, "int", False), (0, "e5m2", False),
    (2, "e4m3", False)])
def test_conv_gradients_are_the_vjp_at_the_quantized_operands(
    case, fmt, use_fwd_quant):
  from aqt_ext.core import int_ops
  xs, ws, kw = CONVS[case]
  nsp = len(xs) - 2
  kw = dict(dict(lhs_dilation=(1,) * nsp, rhs_dilation=(1,) * nsp,
                 feature_group_count=1), **kw)
  kw["dimension_numbers"] = jax.lax.conv_dimension_numbers(
      xs, ws, int_ops.conv_spec(nsp))
  x, w, _ = _data(xs, ws, (1,), jnp.float32, case)
  op = bw.Conv(tuple(kw.items()), xs, ws)
  y = op.forward(x, w)
  g = jax.random.normal(jax.random.PRNGKey(7), y.shape)
  x_side, w_side = _sides(x, w, *int_ops.conv_axes(nsp))
  gq = GradQuant(fmt, use_fwd_quant=use_fwd_quant)
  out, vjp = jax.vjp(lambda a, b: bw.contract(op, gq, gq, a, b, x_side,
                                              w_side, None), x, w)
  np.testing.assert_array_equal(out, y)
  dx, dw = vjp(g)
  rdx, rdw = _dequantized_vjp(op, g, x_side, w_side, gq, gq)
  np.testing.assert_allclose(dx, rdx, rtol=2e-5, atol=1e-5 * float(
      jnp.abs(rdx).max()))
  np.testing.assert_allclose(dw, rdw, rtol=2e-5, atol=1e-5 * float(
      jnp.abs(rdw).max()))
  # ... and close to the exact gradient (8-bit grid: a few percent).
  edx, edw = jax.vjp(op.forward, x, w)[1](g)
  for got, exact in ((dx, edx), (dw, edw)):
    err = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    assert 0 < err < (0.05 if fmt == "int" else 0.2)


DOTS = [  # (x shape, w shape, dimension numbers): dense, general, batched
    ((6, 10), (10, 4), (((1,), (0,)), ((), ()))),
    ((2, 5, 3, 4), (3, 4, 7), (((2, 3), (0, 1)), ((), ()))),
    ((3, 5, 8), (3, 8, 6), (((2,), (1,)), ((0,), (0,)))),
    ((4, 9, 3), (3, 2, 9), (((1, 2), (2, 0)), ((), ()))),
]


@pytest.mark.parametrize("case", range(len(DOTS)))
@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
def test_dot_general_gradients_are_the_vjp_at_the_quantized_operands(
    case, gran):
  from aqt_ext.core import int_ops
  xs, ws, dims = DOTS[case]
  x, w, _ = _data(xs, ws, (1,), jnp.float32, 10 + case)
  op = bw.DotGeneral(dims, len(xs), len(ws))
  g = jax.random.normal(jax.random.PRNGKey(3), op.forward(x, w).shape)
  x_side, w_side = _sides(x, w, *int_ops.dot_general_axes(dims), gran=gran)
  gq = GradQuant("int", granularity=gran)
  _, vjp = jax.vjp(lambda a, b: bw.contract(op, gq, gq, a, b, x_side,
                                            w_side, None), x, w)
  dx, dw = vjp(g)
  rdx, rdw = _dequantized_vjp(op, g, x_side, w_side, gq, gq)
  np.testing.assert_allclose(dx, rdx, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(dw, rdw, rtol=2e-5, atol=1e-6)


def test_one_side_float_is_the_exact_vjp():
  x, w, g = _data((8, 12), (12, 5), (8, 5), jnp.float32, 4)
  lq = LayerQuant(grad_weight=INT8)  # float forward, quantized dw only
  f = lambda a, b: A.QuantDense(5, use_bias=False, quant=lq).apply(  # noqa
      {"params": {"kernel": b}}, a)
  y, dx, dw = _vjp(f, x, w, g)
  ey, edx, edw = _vjp(lambda a, b: a @ b, x, w, g)
  np.testing.assert_allclose(y, ey, rtol=1e-6)
  np.testing.assert_allclose(dx, edx, rtol=1e-6)
  assert not np.allclose(dw, edw, rtol=1e-6)  # quantized
  np.testing.assert_allclose(dw, edw, rtol=0.05, atol=0.05 * float(
      jnp.abs(edw).max()))


# ---------------------------------------------------------------------------
# Stochastic rounding and fp8.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int", "e5m2", "e4m3"])
def test_stochastic_rounding_is_unbiased_and_keyed(fmt):
  x = jax.random.normal(jax.random.PRNGKey(0), (64,)) * 3.0
  x = x.at[0].set(10.0)  # the absmax, which the int grid clips by half a step
  gq = GradQuant(fmt, rounding="stochastic")
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)

  def deq(key):
    q, s = bw.quantize_grad_operand(x, gq, (), key)
    return q.astype(jnp.float32) * s

  draws = jax.vmap(deq)(keys)
  nearest = deq(None)
  mean = draws.mean(0)
  # Per element the draw is one of the two neighbouring grid values, so its
  # standard deviation is at most half their distance; the mean of 4000
  # draws is within 5 standard errors of x.
  lo, hi = draws.min(0), draws.max(0)
  assert bool(jnp.all((draws == lo) | (draws == hi)))  # two values each
  assert bool(jnp.all((lo <= x) & (x <= hi) | (jnp.abs(x) == 10.0)))
  se = (hi - lo) / 2 / np.sqrt(len(keys))
  err = jnp.abs(mean - x)[1:]
  assert bool(jnp.all(err <= 5 * se[1:] + 1e-6)), float(err.max())
  # Nearest rounding is biased where SR is not: on average over elements
  # the SR mean is much closer.
  assert float(err.mean()) < 0.25 * float(jnp.abs(nearest - x)[1:].mean())
  np.testing.assert_array_equal(deq(keys[5]), deq(keys[5]))
  assert not np.array_equal(deq(keys[5]), deq(keys[6]))


def test_fp8_operand_is_a_saturating_cast_round_trip():
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 40)) * 50
  x = x.at[0, 0].set(1e30)  # a huge value: the scale absorbs it, no inf
  for fmt, (dtype, fmax) in bw.FP8.items():
    q, s = bw.quantize_grad_operand(x, GradQuant(fmt), (0,))
    assert q.dtype == dtype and s.shape == (6, 1)
    ref = (jnp.clip(x / s, -fmax, fmax)).astype(dtype)
    np.testing.assert_array_equal(q.astype(jnp.float32),
                                  ref.astype(jnp.float32))
    assert bool(jnp.isfinite(q.astype(jnp.float32)).all())
    np.testing.assert_allclose(jnp.abs(q.astype(jnp.float32)).max(1), fmax)


def test_stochastic_rounding_needs_and_uses_the_quant_stream():
  lq = A.layer_preset("aqt", 8, 8, signed_input=True).replace(
      grad_input=INT8.replace(rounding="stochastic"),
      grad_weight=INT8.replace(rounding="stochastic"))
  x, w, _ = _data((8, 16), (16, 4), (1,), jnp.float32, 5)
  layer = A.QuantDense(4, use_bias=False, quant=lq)

  def grads(key):
    rngs = None if key is None else {"quant": key}
    return jax.grad(lambda a, b: jnp.sum(jnp.sin(layer.apply(
        {"params": {"kernel": b}}, a, rngs=rngs))), argnums=(0, 1))(x, w)

  with pytest.raises(ValueError, match="'quant' stream"):
    grads(None)
  a, b, c = grads(jax.random.key(0)), grads(jax.random.key(0)), grads(
      jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a[0], c[0])

  # NNX: a layer built with a 'quant' stream draws a new key per call.
  m = aqt_nnx.QuantLinear(16, 4, use_bias=False, quant=lq,
                          rngs=nnx.Rngs(params=0, quant=3))
  m.kernel[...] = w
  f = lambda m: jnp.sum(jnp.sin(m(x)))  # noqa: E731
  g1, g2 = nnx.grad(f)(m), nnx.grad(f)(m)
  assert not np.array_equal(g1.kernel[...], g2.kernel[...])
  with pytest.raises(ValueError, match="'quant' stream"):
    nnx.grad(f)(aqt_nnx.QuantLinear(16, 4, quant=lq, rngs=nnx.Rngs(0)))


def test_nnx_and_linen_compute_the_same_quantized_gradients():
  lq = A.layer_preset("aqt", 8, 8, signed_input=True).replace(
      grad_input=INT8, grad_weight=GradQuant("e5m2", use_fwd_quant=False))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  lin = A.QuantConv(5, (3, 3), strides=2, quant=lq)
  v = lin.init(jax.random.PRNGKey(1), x)
  m = aqt_nnx.QuantConv(3, 5, (3, 3), strides=2, quant=lq,
                        rngs=nnx.Rngs(0))
  m.kernel[...], m.bias[...] = v["params"]["kernel"], v["params"]["bias"]
  gl = jax.grad(lambda p: jnp.sum(lin.apply({"params": p}, x) ** 2))(
      v["params"])
  gn = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  np.testing.assert_array_equal(gl["kernel"], gn.kernel[...])
  np.testing.assert_array_equal(gl["bias"], gn.bias[...])


# ---------------------------------------------------------------------------
# Config and spec.
# ---------------------------------------------------------------------------

def test_spec_and_bad_configs():
  m = parse_spec("aqt:w8a8_g8")
  assert m.default.grad_input == INT8 and m.default.grad_weight == INT8
  m = parse_spec("dq:w4a4_ge5m2sr")
  assert m.default.grad_input == GradQuant("e5m2", rounding="stochastic",
                                           use_fwd_quant=False)
  assert parse_spec("w4a4_g4").default.grad_weight.bits == 4
  with pytest.raises(ValueError, match="gradient bits 9"):
    parse_spec("w8a8_g9")
  with pytest.raises(ValueError, match="GradQuant.format='fp8'.*'e5m2'"):
    GradQuant("fp8")
  with pytest.raises(ValueError, match="rounding='stochastic' needs"):
    GradQuant(rounding="stochastic")
  with pytest.raises(ValueError, match="grad_input.use_fwd_quant=True needs"):
    LayerQuant(weight=TensorQuant("dq", 4), grad_input=INT8)
  with pytest.raises(TypeError, match="grad_weight must be a GradQuant"):
    LayerQuant(grad_weight="int8")


def test_resnet_trains_a_step_with_quantized_gradients():
  """A ResNet (strided, padded convs, BatchNorm, dense head) with int8
  gradients: finite gradients close to the fake-quant backward's."""
  from aqt_ext import models
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
  y = jnp.arange(4) % 10
  grads = []
  for spec in ("aqt:w8a8", "aqt:w8a8_ge5m2sr"):
    model = models.create_model("cifar_resnet8", num_classes=10, width=0.25,
                                quant=parse_spec(spec, first=models.FIRST_LAYER,
                                                 last=models.LAST_LAYER))
    v = model.init(jax.random.PRNGKey(1), x, train=False)

    def loss(p, model=model, v=v):
      logits, _ = model.apply({**v, "params": p}, x, train=True,
                              mutable=["batch_stats"],
                              rngs={"quant": jax.random.key(0)})
      return jnp.mean(nn.log_softmax(logits)[jnp.arange(4), y])

    grads.append(jax.jit(jax.grad(loss))(v["params"]))
  ref = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads[0])])
  for g in grads[1:]:
    flat = jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)])
    assert bool(jnp.isfinite(flat).all())
    cos = float(flat @ ref / jnp.linalg.norm(flat) / jnp.linalg.norm(ref))
    assert 0.9 < cos < 1.0 - 1e-7, cos
