"""QuantDense / QuantConv: drop-in behaviour, gradients, integer execution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import aqt_ext as A
from aqt_ext.core import quantizers as qz
from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant

jax.config.update("jax_default_matmul_precision", "highest")
KEY = jax.random.PRNGKey(0)


def _x(shape, key=1, relu=True):
  x = jax.random.normal(jax.random.PRNGKey(key), shape)
  return jax.nn.relu(x) if relu else x


# ---------------------------------------------------------------------------
# Drop-in: same parameters, same outputs when unquantized.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda cls, **q: cls(7, **q),
    lambda cls, **q: cls(7, use_bias=False, **q),
])
def test_dense_is_drop_in(make):
  x = _x((3, 5, 9))
  ref = make(nn.Dense)
  v = ref.init(KEY, x)
  ours = make(A.QuantDense)
  assert (jax.tree.map(jnp.shape, ours.init(KEY, x))
          == jax.tree.map(jnp.shape, v))
  np.testing.assert_array_equal(ours.apply(v, x), ref.apply(v, x))
  # A float checkpoint loads unchanged into a quantized layer.
  q = make(A.QuantDense, quant=A.parse_spec("w4a4").default)
  assert q.apply(v, x).shape == (3, 5, 7)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(3, 3), padding=((1, 2), (0, 1)), kernel_dilation=2),
    dict(kernel_size=(1, 1), feature_group_count=2, use_bias=False),
    dict(kernel_size=(3,)),
])
def test_conv_is_drop_in(kw):
  shape = (2, 9, 4) if len(kw["kernel_size"]) == 1 else (2, 9, 9, 4)
  x = _x(shape)
  ref = nn.Conv(6, **kw)
  v = ref.init(KEY, x)
  ours = A.QuantConv(6, **kw)
  assert (jax.tree.map(jnp.shape, ours.init(KEY, x))
          == jax.tree.map(jnp.shape, v))
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-6,
                             atol=1e-6)
  # Unbatched input, like nn.Conv.
  np.testing.assert_allclose(ours.apply(v, x[0]), ref.apply(v, x[0]),
                             rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Gradients = float op's gradients at the quantized operands, masked.
# ---------------------------------------------------------------------------

def _masked_operand(x, tq, axes):
  """Reference: fake-quant value and clipping mask, computed explicitly."""
  red = qz.reduce_axes(x.ndim, axes, tq.granularity)
  qp = qz.qparams_from_range(qz.observe_range(x, tq.grid, red), tq.grid,
                             tq.bits)
  t = x / qp.scale
  mask = ((t >= qp.qmin) & (t <= qp.qmax)).astype(x.dtype)
  q = jnp.clip(jnp.round(t), qp.qmin, qp.qmax) * qp.scale
  return q, mask


@pytest.mark.parametrize("kw", [
    dict(strides=1, padding="SAME", feature_group_count=1),
    dict(strides=2, padding="VALID", feature_group_count=1),
    dict(strides=(2, 1), padding=((2, 0), (1, 1)), feature_group_count=2),
])
@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_conv_gradients_match_reference(kw, grid):
  x = _x((2, 8, 8, 4), relu=False)
  lq = LayerQuant(TensorQuant("uniform", 3, grid=grid,
                              granularity="per_channel"),
                  TensorQuant("uniform", 4, grid=grid))
  layer = A.QuantConv(6, (3, 3), use_bias=False, quant=lq, **kw)
  w = layer.init(KEY, x)["params"]["kernel"]
  g_out = jax.random.normal(jax.random.PRNGKey(5),
                            layer.apply({"params": {"kernel": w}}, x).shape)
  gx, gw = jax.jit(jax.grad(
      lambda x_, w_: jnp.sum(layer.apply({"params": {"kernel": w_}}, x_)
                             * g_out), argnums=(0, 1)))(x, w)

  qx, mx = _masked_operand(x, lq.input, qz.OperandAxes((1, 2, 3), 3))
  qw, mw = _masked_operand(w, lq.weight, qz.OperandAxes((0, 1, 2), 2))
  pad = kw["padding"]
  strides = kw["strides"] if isinstance(kw["strides"], tuple) else (
      kw["strides"],) * 2

  def conv(a, b):
    return lax.conv_general_dilated(
        a, b, strides, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=kw["feature_group_count"])

  _, vjp = jax.vjp(conv, qx, qw)
  rx, rw = vjp(g_out)
  np.testing.assert_allclose(gx, rx * mx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, rw * mw, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(gw).sum()) > 0 and float(jnp.abs(gx).sum()) > 0
  if grid == "full":  # absmax maps past qmax: the max element is clipped
    assert float(mw.min()) == 0.0


def test_dense_gradients_match_reference():
  x = _x((5, 12), relu=False)
  lq = LayerQuant(TensorQuant("uniform", 2, grid="full",
                              granularity="per_channel"),
                  TensorQuant("uniform", 3, grid="full",
                              granularity="per_channel"))
  layer = A.QuantDense(4, use_bias=False, quant=lq)
  w = layer.init(KEY, x)["params"]["kernel"]
  gx, gw = jax.jit(jax.grad(lambda a, b: jnp.sum(
      jnp.sin(layer.apply({"params": {"kernel": b}}, a))), argnums=(0, 1)))(
          x, w)
  qx, mx = _masked_operand(x, lq.input, qz.OperandAxes((1,), 1))
  qw, mw = _masked_operand(w, lq.weight, qz.OperandAxes((0,), 0))
  ry, (rx, rw) = jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(a @ b)),
                                    argnums=(0, 1))(qx, qw)
  np.testing.assert_allclose(gx, rx * mx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, rw * mw, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Integer execution.
# ---------------------------------------------------------------------------

INT_CONFIGS = {
    "w4a4_unsigned": A.layer_preset("uniform", 4, 4),
    "w8a8_full_rows": LayerQuant(
        TensorQuant("uniform", 8, granularity="per_channel"),
        TensorQuant("uniform", 8, grid="full", granularity="per_channel")),
    "w3a5_asym": LayerQuant(TensorQuant("uniform", 3, granularity="per_channel"),
                            TensorQuant("uniform", 5, grid="asymmetric")),
    "w2a8_aqt": A.layer_preset("aqt", 2, 8),
    "lsq_w4a4": A.layer_preset("lsq", 4, 4),
    "pact_w4a3": LayerQuant(TensorQuant("uniform", 4, granularity="per_channel"),
                            TensorQuant("pact", 3, grid="unsigned",
                                        pact_init=2.0)),
}


@pytest.mark.parametrize("name", sorted(INT_CONFIGS))
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_int_execution_matches_fake_quant(name, kind):
  lq = INT_CONFIGS[name]
  x = _x((4, 6, 6, 8), relu="asym" not in name)
  if kind == "dense":
    make = lambda q: A.QuantDense(5, quant=q)  # noqa: E731
  else:
    make = lambda q: A.QuantConv(5, (3, 3), strides=2, quant=q)  # noqa: E731
  v = make(lq).init(KEY, x)
  fake = make(lq).apply(v, x)
  ints = make(lq.replace(execution="int")).apply(v, x)
  np.testing.assert_allclose(ints, fake, rtol=1e-5, atol=1e-5)


def test_int_execution_per_group_dense():
  wq = TensorQuant("uniform", 4, granularity="per_group", group_size=4)
  xq = TensorQuant("uniform", 8, grid="full", granularity="per_group",
                   group_size=4)
  for lq in [LayerQuant(wq, A.layer_preset("uniform", 4, 8).input),
             LayerQuant(wq, xq)]:
    x = _x((3, 16), relu=lq.input.grid == "unsigned")
    v = A.QuantDense(6, quant=lq).init(KEY, x)
    fake = A.QuantDense(6, quant=lq).apply(v, x)
    ints = A.QuantDense(6, quant=lq.replace(execution="int")).apply(v, x)
    np.testing.assert_allclose(ints, fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_int_execution_exact_with_power_of_two_scales(kind):
  # restricted 8-bit grid maps absmax to 127; absmax = 127/8 -> scale 1/8.
  rng = np.random.default_rng(0)
  x = rng.integers(-127, 128, (4, 6, 6, 8)).astype(np.float32) / 8
  x[..., 0] = 127 / 8  # every row / example has absmax 127/8
  w = rng.integers(-127, 128, (3, 3, 8, 5)).astype(np.float32) / 4
  w[0, 0, 0, :] = 127 / 4
  lq = LayerQuant(TensorQuant("uniform", 8, grid="restricted",
                              granularity="per_channel"),
                  TensorQuant("uniform", 8, grid="restricted",
                              granularity="per_channel"))
  if kind == "dense":
    make = lambda q: A.QuantDense(5, use_bias=False, quant=q)  # noqa: E731
    w = w[0, 0]
  else:
    make = lambda q: A.QuantConv(5, (3, 3), use_bias=False, quant=q)  # noqa
  v = {"params": {"kernel": jnp.asarray(w)}}
  fake = make(lq).apply(v, x)
  ints = make(lq.replace(execution="int")).apply(v, x)
  np.testing.assert_array_equal(ints, fake)


# Integer-execution oracle: LSQ steps are parameters, so the scales s_x (per
# tensor) and s_w (per output channel) are chosen here, not calibrated, and
# the operands are built as ints * scale: x * (1/s) lies within a few ulps
# of the integer, so the layer's integer operands are exactly these ints.
ORACLE_LQ = LayerQuant(TensorQuant("lsq", 4, granularity="per_channel"),
                       TensorQuant("lsq", 8), execution="int")


def _oracle_operands(x_shape, w_shape, seed):
  """(xi, wi, s_x, s_w): int64 operands on the 8-bit (input) and 4-bit
  (kernel) full grids, a float32 scalar and (O,) float32 scales that are
  not powers of two (so the rescale order shows in the last bits)."""
  rng = np.random.default_rng(seed)
  xi = rng.integers(-128, 128, x_shape)
  wi = rng.integers(-8, 8, w_shape)
  sx = np.float32(0.0173)
  sw = rng.uniform(0.01, 0.1, w_shape[-1]).astype(np.float32)
  return xi, wi, sx, sw


def _oracle_params(xi, wi, sx, sw):
  x = (xi.astype(np.float32) * sx).astype(np.float32)
  w = (wi.astype(np.float32) * sw).astype(np.float32)
  for q, v, s in ((xi, x, sx), (wi, w, sw)):  # the ints are recovered
    np.testing.assert_array_equal(np.round(v / s), q)
  params = {"kernel": jnp.asarray(w),
            "kernel_lsq_step": jnp.asarray(sw).reshape((1,) * (wi.ndim - 1)
                                                       + (-1,)),
            "input_lsq_step": jnp.full((1,) * xi.ndim, sx)}
  return jnp.asarray(x), {"params": params}


def _rescale(acc, sx, sw):
  """AQT's order (methods.md sec. 1): float32(acc) * s_x, then * s_w."""
  out = acc.astype(np.float32) * sx
  assert out.dtype == np.float32
  return (out * sw).astype(np.float32)


def _conv_pads(size, k_eff, stride, padding):
  """Explicit (lo, hi) pads per spatial dim, as lax computes 'SAME'."""
  if padding == "VALID":
    return [(0, 0)] * len(size)
  if padding == "SAME":
    pads = []
    for n, k, s in zip(size, k_eff, stride):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  return [tuple(p) for p in padding]


def _int_conv_reference(xi, wi, strides, padding, input_dilation,
                        kernel_dilation, groups):
  """int64 NHWC x HWIO convolution by explicit windows (numpy)."""
  n, h, w, c = xi.shape
  kh, kw, cg, out = wi.shape
  ld, rd, st = input_dilation, kernel_dilation, strides
  xd = np.zeros((n, (h - 1) * ld[0] + 1, (w - 1) * ld[1] + 1, c), np.int64)
  xd[:, ::ld[0], ::ld[1]] = xi
  k_eff = ((kh - 1) * rd[0] + 1, (kw - 1) * rd[1] + 1)
  size = (h, w) if isinstance(padding, str) else xd.shape[1:3]
  (t, b), (l, r) = _conv_pads(size, k_eff, st, padding)
  xp = np.pad(xd, [(0, 0), (t, b), (l, r), (0, 0)])
  oh = (xp.shape[1] - k_eff[0]) // st[0] + 1
  ow = (xp.shape[2] - k_eff[1]) // st[1] + 1
  og = out // groups
  acc = np.zeros((n, oh, ow, out), np.int64)
  for i in range(kh):
    for j in range(kw):
      win = xp[:, i * rd[0]:i * rd[0] + (oh - 1) * st[0] + 1:st[0],
               j * rd[1]:j * rd[1] + (ow - 1) * st[1] + 1:st[1]]
      for g in range(groups):
        acc[..., g * og:(g + 1) * og] += np.einsum(
            "nhwc,co->nhwo", win[..., g * cg:(g + 1) * cg],
            wi[i, j, :, g * og:(g + 1) * og].astype(np.int64))
  return acc


@pytest.mark.parametrize("kw", [
    dict(),
    dict(strides=2, padding="VALID"),
    dict(strides=(2, 1), padding=((2, 0), (1, 1)), feature_group_count=2),
    dict(padding=((1, 2), (0, 1)), kernel_dilation=2, input_dilation=(1, 2)),
    dict(strides=(1, 2), feature_group_count=4, features=8),  # depthwise
])
def test_int_conv_matches_integer_oracle_bit_exactly(kw):
  """QuantConv int execution (jitted, as served) == an int64 numpy
  convolution of the same integer operands, rescaled as
  float32(acc) * s_x * s_w in that order."""
  kw = {"strides": 1, "padding": "SAME", "input_dilation": 1,
        "kernel_dilation": 1, "feature_group_count": 1, "features": 6, **kw}
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
  groups, features = kw["feature_group_count"], kw["features"]
  xi, wi, sx, sw = _oracle_operands((2, 7, 8, 4), (3, 3, 4 // groups,
                                                   features), seed=groups)
  x, v = _oracle_params(xi, wi, sx, sw)
  layer = A.QuantConv(features, (3, 3), strides=kw["strides"],
                      padding=kw["padding"],
                      input_dilation=kw["input_dilation"],
                      kernel_dilation=kw["kernel_dilation"],
                      feature_group_count=groups, use_bias=False,
                      quant=ORACLE_LQ)
  assert (jax.tree.map(jnp.shape, jax.eval_shape(layer.init, KEY, x))
          == jax.tree.map(jnp.shape, v))
  got = np.asarray(jax.jit(layer.apply)(v, x))
  acc = _int_conv_reference(xi, wi, pair(kw["strides"]), kw["padding"],
                            pair(kw["input_dilation"]),
                            pair(kw["kernel_dilation"]), groups)
  assert np.abs(acc).max() < 2 ** 24  # exact in float32
  want = _rescale(acc, sx, sw)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  # The order is observable here: the other orders differ in some elements.
  for other in (acc.astype(np.float32) * (sx * sw), _rescale(acc, sw, sx)):
    assert not np.array_equal(want, other)


@pytest.mark.parametrize("x_shape", [(5, 12), (2, 3, 12)])
def test_int_dense_matches_integer_oracle_bit_exactly(x_shape):
  """QuantDense int execution (jitted, as served) == int64 numpy matmul of
  the same integer operands, rescaled as float32(acc) * s_x * s_w in that
  order."""
  xi, wi, sx, sw = _oracle_operands(x_shape, (12, 7), seed=1)
  x, v = _oracle_params(xi, wi, sx, sw)
  layer = A.QuantDense(7, use_bias=False, quant=ORACLE_LQ)
  assert (jax.tree.map(jnp.shape, jax.eval_shape(layer.init, KEY, x))
          == jax.tree.map(jnp.shape, v))
  got = np.asarray(jax.jit(layer.apply)(v, x))
  acc = xi.astype(np.int64) @ wi.astype(np.int64)
  want = _rescale(acc, sx, sw)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  for other in (acc.astype(np.float32) * (sx * sw), _rescale(acc, sw, sx)):
    assert not np.array_equal(want, other)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_int_execution_jaxpr_has_integer_operands(kind):
  lq = A.layer_preset("uniform", 4, 4).replace(execution="int")
  x = _x((2, 6, 6, 8))
  layer = (A.QuantDense(5, quant=lq) if kind == "dense"
           else A.QuantConv(5, (3, 3), quant=lq))
  v = layer.init(KEY, x)
  jaxpr = jax.make_jaxpr(lambda a: layer.apply(v, a))(x).jaxpr
  prim = "dot_general" if kind == "dense" else "conv_general_dilated"
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top

  def eqns(jp):  # every equation, also those inside jit/custom_vjp bodies
    for e in jp.eqns:
      yield e
      for sub in jex_core.jaxprs_in_params(e.params):
        yield from eqns(sub)

  all_eqns = list(eqns(jaxpr))
  ops = [e for e in all_eqns if e.primitive.name == prim]
  assert len(ops) == 1
  (op,) = ops
  if jax.default_backend() != "cpu":
    assert [str(a.aval.dtype) for a in op.invars] == ["int8", "int8"]
    assert op.params["preferred_element_type"] == jnp.int32
    return
  # On CPU the int32 accumulation is computed exactly in float32
  # (`int_ops.accumulate`): the operands are the int8 tensors, converted.
  producer = {id(o): e for e in all_eqns for o in e.outvars}
  for a in op.invars:
    conv = producer[id(a)]
    assert conv.primitive.name == "convert_element_type"
    assert str(conv.invars[0].aval.dtype) == "int8"


# ---------------------------------------------------------------------------
# Static ranges, overrides, widths, jit/grad safety.
# ---------------------------------------------------------------------------

def test_static_ranges_ema_and_frozen_eval():
  tq = TensorQuant("uniform", 8, grid="unsigned", calibration="static",
                   ema_decay=0.5)
  layer = A.QuantDense(3, quant=LayerQuant(A.layer_preset(
      "uniform", 8, 8).weight, tq))
  x1, x2 = 2.0 * jnp.ones((2, 4)), 4.0 * jnp.ones((2, 4))
  v = layer.init(KEY, x1)
  assert int(v["quant_stats"]["input_count"]) == 0  # init does not update
  _, s = layer.apply(v, x1, mutable=["quant_stats"])
  assert float(s["quant_stats"]["input_max"].max()) == 2.0
  v = {**v, **s}
  _, s = layer.apply(v, x2, mutable=["quant_stats"])
  assert float(s["quant_stats"]["input_max"].max()) == 3.0  # 0.5*2 + 0.5*4
  v = {**v, **s}
  # Frozen at eval: range 3, so an input of 6 is clipped to 3.
  y_eval = layer.apply(v, 6.0 * jnp.ones((1, 4)))
  y_ref = layer.apply(v, 3.0 * jnp.ones((1, 4)))
  np.testing.assert_allclose(y_eval, y_ref)


def test_model_quant_rules_resolve_by_path():
  class Net(nn.Module):
    quant: ModelQuant

    @nn.compact
    def __call__(self, x):
      x = A.QuantConv(4, (3, 3), name="conv_init", quant=self.quant)(x)
      x = A.QuantConv(4, (3, 3), name="conv_mid", quant=self.quant)(
          nn.relu(x))
      return A.QuantDense(3, name="head", quant=self.quant)(
          nn.relu(x).mean((1, 2)))

  mq = A.parse_spec("w4a4_fl8", first=r"conv_init$", last=r"head$")
  seen = {}

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, (A.QuantConv, A.QuantDense))
        and context.method_name == "__call__"):
      lq = context.module.layer_quant()
      seen[context.module.name] = (lq.weight_bits, lq.input_bits,
                                   lq.input.grid)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    Net(mq).init(KEY, _x((1, 8, 8, 3), relu=False))
  assert seen == {"conv_init": (8, 8, "full"), "conv_mid": (4, 4, "unsigned"),
                  "head": (8, 8, "unsigned")}


@pytest.mark.parametrize("w,a", [(4, 8), (8, 4), (2, 2), (3, 5)])
@pytest.mark.parametrize("method", ["uniform", "lsq", "pact", "aqt"])
def test_any_widths_jit_grad_safe(w, a, method):
  lq = A.layer_preset(method, w, a)
  x = _x((2, 6, 6, 3))
  layer = A.QuantConv(4, (3, 3), quant=lq)
  v = layer.init(KEY, x)

  @jax.jit
  def loss(params, x):
    y = layer.apply({**v, "params": params}, x)
    return jnp.mean(y ** 2), y

  g, y = jax.grad(loss, has_aux=True)(v["params"], x)
  assert all(bool(jnp.isfinite(t).all()) for t in jax.tree.leaves(g))
  assert float(jnp.abs(g["kernel"]).sum()) > 0
  # The kernel really is quantized: at most 2^w levels per output channel,
  # in the kernel the layer multiplies by (read from the layer itself).
  wk = v["params"]["kernel"]
  q = effective_kernel(layer, v, x)
  assert q.shape == wk.shape
  for c in range(wk.shape[-1]):
    assert 2 <= len(np.unique(q[..., c])) <= 2 ** w


def effective_kernel(layer, v, x):
  """The kernel a stride-1 'SAME' QuantConv (odd kernel size) applies to its
  input, read from the layer: the layer is linear in an input tangent, so
  the jvp for a tangent that is one-hot at pixel p, channel c, is
  conv(one-hot, w_q): output pixel p - k + (K - 1) / 2 holds tap k of w_q
  for that input channel, times the input quantizer's straight-through
  derivative (one constant close to 1 for every tap, which maps distinct
  levels to distinct values). p is interior and set to a small positive
  value, inside every input grid's range (unclipped, derivative nonzero)."""
  kh, kw = layer.kernel_size
  _, h, w, cin = x.shape
  i, j = h // 2, w // 2
  x = x.at[0, i, j, :].set(1e-3)
  tangents = jnp.zeros((cin,) + x.shape).at[
      jnp.arange(cin), 0, i, j, jnp.arange(cin)].set(1.0)
  out = jax.jit(jax.vmap(lambda t: jax.jvp(
      lambda a: layer.apply(v, a), (x,), (t,))[1]))(tangents)
  # out[c, 0, i + kh // 2 - a, j + kw // 2 - b, o] = w_q[a, b, c, o].
  taps = out[:, 0, i - kh // 2:i + kh // 2 + 1, j - kw // 2:j + kw // 2 + 1]
  return np.asarray(jnp.transpose(taps[:, ::-1, ::-1], (1, 2, 0, 3)))


def test_unquantized_bf16_config():
  lq = A.parse_spec("bf16").default
  x = _x((2, 8))
  layer = A.QuantDense(3, quant=lq)
  v = layer.init(KEY, x)
  k = v["params"]["kernel"]
  y = layer.apply(v, x)
  ref = (x.astype(jnp.bfloat16).astype(jnp.float32)
         @ k.astype(jnp.bfloat16).astype(jnp.float32)) + v["params"]["bias"]
  np.testing.assert_allclose(y, ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# Config validation: clear errors at construction time.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(method="uniform", bits=0), "bits"),
    (dict(method="uniform", bits=33), "bits"),
    (dict(method="uniform", bits=4.0), "bits"),
    (dict(method="lsqq", bits=4), "method"),
    (dict(method="uniform", bits=4, granularity="per_row"), "granularity"),
    (dict(method="uniform", bits=4, granularity="per_group"), "group_size"),
    (dict(method="uniform", bits=4, group_size=8), "group_size"),
    (dict(method="uniform", bits=4, grid="signed"), "grid"),
    (dict(method="uniform", bits=4, rounding="floor"), "rounding"),
    (dict(method="lsq", bits=4, rounding="border"), "rounding"),
    (dict(method="uniform", bits=4, rounding="border",
          granularity="per_group", group_size=4), "rounding"),
    (dict(method="uniform", bits=4, calibration="static",
          granularity="per_channel"), "granularity"),
    (dict(method="pact", bits=4, grid="full"), "grid"),
    (dict(method="float", bits=4), "bits"),
    (dict(method="uniform", bits=4, ema_decay=1.0), "ema_decay"),
])
def test_bad_tensor_config_names_field(kw, field):
  with pytest.raises(ValueError, match=rf"TensorQuant\.{field}"):
    TensorQuant(**kw)


def test_bad_layer_and_model_configs():
  with pytest.raises(ValueError, match="LayerQuant.weight.method"):
    LayerQuant(TensorQuant("pact", 4, grid="unsigned"))
  with pytest.raises(ValueError, match="LayerQuant.execution"):
    LayerQuant(execution="integer")
  with pytest.raises(ValueError, match="LayerQuant.weight.rounding='border'"):
    LayerQuant(TensorQuant("uniform", 4, rounding="border"))
  with pytest.raises(ValueError, match="LayerQuant.input.granularity"):
    LayerQuant(TensorQuant("uniform", 4), TensorQuant(
        "uniform", 4, granularity="per_in_channel"), execution="int")
  with pytest.raises(ValueError, match="regular expression"):
    ModelQuant(rules=(("conv[", LayerQuant()),))
  with pytest.raises(ValueError, match="quant spec"):
    A.parse_spec("w4a")
  with pytest.raises(ValueError, match="allowed values"):
    A.parse_spec("foo:w4a4")
