"""The NNX layers and rules (`aqt_ext.nnx`).

* Parity: for every quantization method and every layer type, an NNX layer
  and its linen twin on the same weights, inputs and state give
  bit-identical outputs, gradients (input and every parameter), quantizer
  variables, static-range updates (train mode) and frozen evaluation, and
  sown auxiliary losses.
* `aqt_ext.nnx.quantize_model`: first-match rules, the report, warnings,
  refusals, the same Variables kept, equality with a model built directly
  from the quantized layers.
The upstream flax MNIST CNN (vendored) is quantized by rules, trained,
exported and served in tests/test_nnx_serve.py.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

import aqt_ext.linen as al
import aqt_ext.nnx as anx
from aqt_ext.nnx import layers as nnx_layers
from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant, layer_preset)
from aqt_ext.core import int_ops
from aqt_ext.core.context import AQUANT, LOSSES, PARAMS, STATS

TQ = TensorQuant
FLOAT = LayerQuant()
FLOAT_TQ = TQ()
NNX_TYPES = {PARAMS: nnx.Param, STATS: anx.QuantStat, AQUANT: anx.AQuantBorder}


# ---------------------------------------------------------------------------
# Methods. Options: unsigned (inputs made non-negative), static (several
# train steps update the ranges), border (nonzero AQuant borders), dtype.
# ---------------------------------------------------------------------------

def _lq(w, a, **kw):
  return LayerQuant(w, a, **kw)


METHODS = {
    "uniform_full": (_lq(TQ("uniform", 4, granularity="per_channel"),
                         TQ("uniform", 4)), {}),
    "uniform_restricted": (_lq(
        TQ("uniform", 3, grid="restricted"),
        TQ("uniform", 5, grid="restricted", granularity="per_channel")), {}),
    "uniform_aqt": (_lq(
        TQ("uniform", 4, grid="aqt", granularity="per_channel"),
        TQ("uniform", 8, grid="aqt", granularity="per_channel")), {}),
    "uniform_unsigned_group": (_lq(
        TQ("uniform", 4, granularity="per_group", group_size=4),
        TQ("uniform", 4, grid="unsigned", granularity="per_group",
           group_size=4)), {"unsigned": True}),
    "uniform_asymmetric": (_lq(
        TQ("uniform", 2, grid="restricted", granularity="per_channel",
           rounding="half_away"),
        TQ("uniform", 3, grid="asymmetric")), {}),
    "uniform_in_channel": (_lq(
        TQ("uniform", 4, granularity="per_in_channel"),
        TQ("uniform", 4, granularity="per_in_channel")), {}),
    "lsq": (_lq(TQ("lsq", 4, granularity="per_channel"),
                TQ("lsq", 4, grid="full")), {}),
    "lsq_unsigned": (_lq(
        TQ("lsq", 3, grid="restricted", granularity="per_channel"),
        TQ("lsq", 4, grid="unsigned")), {"unsigned": True}),
    "lsq_group": (_lq(
        TQ("lsq", 3, granularity="per_group", group_size=4),
        TQ("lsq", 4, grid="full", granularity="per_group", group_size=4)),
                  {}),
    "pact": (_lq(TQ("uniform", 4, granularity="per_channel"),
                 TQ("pact", 4, grid="unsigned", pact_init=2.0)),
             {"unsigned": True}),
    "dq_dynamic": (_lq(TQ("dq", 3), TQ("dq", 4, grid="full",
                                        dq_err_weight=0.5)), {}),
    "dq_static": (_lq(
        TQ("dq", 3, granularity="per_channel"),
        TQ("dq", 4, grid="unsigned", calibration="static", ema_decay=0.5)),
                  {"unsigned": True, "static": True}),
    "static_uniform": (_lq(
        TQ("uniform", 4, granularity="per_channel"),
        TQ("uniform", 4, calibration="static", ema_decay=0.5)),
                       {"static": True}),
    "static_in_channel": (_lq(
        TQ("uniform", 4),
        TQ("uniform", 3, grid="asymmetric", granularity="per_in_channel",
           calibration="static", ema_decay=0.9)), {"static": True}),
    "border": (_lq(
        TQ("uniform", 4, granularity="per_channel"),
        TQ("uniform", 4, granularity="per_channel", rounding="border")),
               {"border": True}),
    "border_static": (_lq(
        TQ("uniform", 3),
        TQ("uniform", 4, grid="unsigned", rounding="border",
           calibration="static", ema_decay=0.5)),
                      {"border": True, "static": True, "unsigned": True}),
    "int_uniform": (_lq(TQ("uniform", 8, granularity="per_channel"),
                        TQ("uniform", 8, granularity="per_channel"),
                        execution="int"), {}),
    "int_lsq_pact": (_lq(TQ("lsq", 4, granularity="per_channel"),
                         TQ("pact", 4, grid="unsigned", pact_init=2.0),
                         execution="int"), {"unsigned": True}),
    "int_static": (_lq(TQ("uniform", 4),
                       TQ("uniform", 8, calibration="static"),
                       execution="int"), {"static": True}),
    "int_group": (_lq(TQ("uniform", 4, granularity="per_group", group_size=4),
                      TQ("uniform", 4, granularity="per_group", group_size=4),
                      execution="int"), {}),
    "bf16": (_lq(TQ("bf16"), TQ("bf16")), {}),
    "bf16_compute": (_lq(FLOAT_TQ, TQ("uniform", 8)),
                     {"dtype": jnp.bfloat16}),
}


# ---------------------------------------------------------------------------
# Layers: (linen module, NNX layer, input shape), built from (quant, dtype).
# Every input has 8 features (per_group uses groups of 4). Weights come from
# numpy (the same in both frameworks; no jax.random program to compile per
# shape), biases are nonzero.
# ---------------------------------------------------------------------------

def np_init(seed, scale=0.5):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(np.random.default_rng(seed).normal(
        0.0, scale, size=shape), dtype)
  return init


INITS = dict(kernel_init=np_init(0), bias_init=np_init(1, 0.1))


def _dense(lq, dtype):
  return (al.QuantDense(5, dtype=dtype, quant=lq, **INITS),
          anx.QuantLinear(8, 5, dtype=dtype, quant=lq, rngs=nnx.Rngs(0),
                          **INITS),
          (2, 3, 8))


def _dense_general(lq, dtype):
  """Two contracting axes (the kernel shape of the batched layers below)."""
  lin = al.quantize_model(
      nn.DenseGeneral(5, axis=(-2, -1), dtype=dtype, **INITS),
      ModelQuant(default=lq))
  return (lin, anx.QuantLinearGeneral((3, 8), 5, axis=(-2, -1), dtype=dtype,
                                      quant=lq, rngs=nnx.Rngs(0), **INITS),
          (2, 3, 8))


def _dense_general_batch(lq, dtype):
  """A batch axis (a kernel per index of axis 0)."""
  lin = al.quantize_model(
      nn.DenseGeneral(5, axis=-1, batch_dims=(0,), dtype=dtype, **INITS),
      ModelQuant(default=lq))
  return (lin, anx.QuantLinearGeneral(8, 5, axis=-1, batch_axis={0: 3},
                                      dtype=dtype, quant=lq,
                                      rngs=nnx.Rngs(0), **INITS),
          (3, 2, 8))


def _einsum(spec, kernel_shape, x_shape):
  def build(lq, dtype):
    bias_shape = int_ops.einsum_bias_shape(spec, kernel_shape)[0]
    return (al.QuantEinsum(kernel_shape, spec, dtype=dtype, quant=lq,
                           **INITS),
            anx.QuantEinsum(spec, kernel_shape, bias_shape, dtype=dtype,
                            quant=lq, rngs=nnx.Rngs(0), **INITS),
            x_shape)
  return build


def _conv(x_shape, **kw):
  def build(lq, dtype):
    features = kw.get("features", 6)
    rest = {k: v for k, v in kw.items() if k not in ("features",
                                                      "kernel_size")}
    return (al.QuantConv(features, kw["kernel_size"], dtype=dtype, quant=lq,
                         **rest, **INITS),
            anx.QuantConv(x_shape[-1], features, kw["kernel_size"],
                          dtype=dtype, quant=lq, rngs=nnx.Rngs(0), **rest,
                          **INITS),
            x_shape)
  return build


LAYERS = {
    "dense": _dense,
    "dense_general": _dense_general,
    "dense_general_batch": _dense_general_batch,
    "einsum": _einsum("bti,io->bto", (8, 5), (2, 3, 8)),
    "einsum_batch": _einsum("bhi,hio->bho", (3, 8, 5), (2, 3, 8)),
    # The conv geometries, on one input shape (each new shape costs
    # compiles of every eager op); the first two share the kernel shape.
    "conv_s2_same_groups2": _conv((2, 6, 6, 8), kernel_size=(3, 3),
                                  strides=2, padding="SAME",
                                  feature_group_count=2),
    "conv_explicit_dilated_groups2": _conv(
        (2, 6, 6, 8), kernel_size=(3, 3), strides=(1, 2),
        padding=((1, 0), (2, 1)), kernel_dilation=(2, 1),
        feature_group_count=2),
    "conv_valid_dilated_depthwise": _conv(
        (2, 6, 6, 8), features=8, kernel_size=(3, 3), padding="VALID",
        kernel_dilation=(1, 2), feature_group_count=8),
}

# Every method on the dense layer; on the other layers those that exercise
# their own axes (per_channel / per_group scales, the integer contraction,
# per-channel borders, static ranges, the auxiliary loss).
COMBOS = {
    "dense": list(METHODS),
    "dense_general": ["lsq", "int_uniform"],
    "dense_general_batch": ["int_uniform", "static_uniform"],
    "einsum": ["uniform_unsigned_group", "int_uniform", "bf16"],
    "einsum_batch": ["uniform_aqt", "lsq", "int_uniform", "border"],
    "conv_s2_same_groups2": ["lsq", "int_uniform", "dq_dynamic"],
    "conv_explicit_dilated_groups2": ["int_static", "uniform_unsigned_group"],
    "conv_valid_dilated_depthwise": ["int_lsq_pact", "border"],
}
CASES = [(layer, method) for layer, methods in COMBOS.items()
         for method in methods]



def test_every_method_and_layer_is_covered():
  assert {m for _, m in CASES} == set(METHODS)
  assert {layer for layer, _ in CASES} == set(LAYERS)


# ---------------------------------------------------------------------------
# The parity harness.
# ---------------------------------------------------------------------------

def _inputs(shape, unsigned, seed):
  x = np.random.default_rng(100 + seed).normal(0.0, 1.5, size=shape)
  return jnp.asarray(np.abs(x) if unsigned else x, jnp.float32)


def flat_tree(tree):
  return {"/".join(map(str, k)): v
          for k, v in flatten_dict(dict(tree)).items()}


def nnx_variables(layer) -> dict:
  """The layer's variables as linen's collections: {collection: {name: v}}."""
  out = {}
  for col, typ in NNX_TYPES.items():
    d = nnx.to_pure_dict(nnx.state(layer, typ))
    if d:
      out[col] = d
  return out


def assert_same_tree(got, want, what):
  got, want = flat_tree(got), flat_tree(want)
  assert set(got) == set(want), (what, sorted(got), sorted(want))
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k], np.float32),
                                  np.asarray(want[k], np.float32),
                                  err_msg=f"{what}: {k}")
    assert jnp.asarray(got[k]).dtype == jnp.asarray(want[k]).dtype, (what, k)


def build_pair(layer_name, method_name):
  """(linen module, linen variables, NNX layer) on the same state, after
  checking that both create the same quantizer variables from the same
  kernel and batch."""
  lq, opts = METHODS[method_name]
  lin, layer, shape = LAYERS[layer_name](lq, opts.get("dtype"))
  x = _inputs(shape, opts.get("unsigned", False), 1)
  lvars = lin.init(jax.random.PRNGKey(0), x)
  lvars = jax.tree.map(jnp.asarray, dict(lvars))
  # The same initializers give the same float parameters, laid out alike;
  # the NNX layer then creates its quantizer variables from them and x.
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(getattr(layer, name)[...],
                                  lvars[PARAMS][name])
  anx.init(layer, x)
  assert_same_tree(nnx_variables(layer), lvars, "init")
  assert not nnx.state(layer, anx.QuantLoss)  # init records no loss
  if opts.get("border"):
    rng = np.random.default_rng(3)
    for k in ("alpha", "beta"):
      name = f"input_border_{k}"
      v = jnp.asarray(rng.uniform(-0.2, 0.2, lvars[AQUANT][name].shape),
                      jnp.float32)
      lvars[AQUANT][name] = v
      getattr(layer, name)[...] = v
  return lin, lvars, layer, shape, opts


def linen_step(lin, lvars, x, ct, train):
  mutable = [STATS, LOSSES] if train else False

  def loss_fn(params, x):
    out = lin.apply({**lvars, PARAMS: params}, x, mutable=mutable)
    y, upd = out if train else (out, {})
    aux = sum(jax.tree.leaves(upd.get(LOSSES, {})), jnp.zeros((), y.dtype))
    return jnp.sum(y * ct) + aux, (y, upd)

  (loss, (y, upd)), (gp, gx) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(lvars[PARAMS], x)
  return loss, y, dict(upd), gp, gx


def nnx_step(layer, x, ct):
  def loss_fn(m, x):
    y = m(x)
    losses = jax.tree.leaves(nnx.state(m, anx.QuantLoss))
    return jnp.sum(y * ct) + sum(losses, jnp.zeros((), y.dtype)), y

  (loss, y), (gp, gx) = nnx.value_and_grad(
      loss_fn, argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True)(
          layer, x)
  return loss, y, nnx.to_pure_dict(gp), gx


def compare_step(lin, lvars, layer, x, ct, train):
  """One call of both in train or eval mode: outputs, gradients, losses and
  updated statistics equal. Returns linen's variables after the step."""
  loss_l, y_l, upd, gp_l, gx_l = linen_step(lin, lvars, x, ct, train)
  loss_n, y_n, gp_n, gx_n = nnx_step(layer, x, ct)
  assert y_n.dtype == y_l.dtype and y_n.shape == y_l.shape
  np.testing.assert_array_equal(np.asarray(y_n, np.float32),
                                np.asarray(y_l, np.float32))
  np.testing.assert_array_equal(np.asarray(loss_n, np.float32),
                                np.asarray(loss_l, np.float32))
  np.testing.assert_array_equal(gx_n, gx_l)
  assert_same_tree(gp_n, gp_l, "grads")
  # Sown auxiliary losses: the same tuples (DQ dynamic inputs, train only).
  sown_n = {k: tuple(v.get_value())
            for k, v in nnx.state(layer, anx.QuantLoss).items()}
  sown_l = {k: tuple(v) for k, v in upd.get(LOSSES, {}).items()}
  assert set(sown_n) == set(sown_l)
  for k, v in sown_l.items():
    assert len(sown_n[k]) == len(v) == 1
    np.testing.assert_array_equal(sown_n[k][0], v[0])
  np.testing.assert_array_equal(anx.pop_losses(layer),
                                sum(jax.tree.leaves(sown_l), 0.0))
  assert not nnx.state(layer, anx.QuantLoss)
  if STATS in upd:
    lvars = {**lvars, STATS: upd[STATS]}
  assert_same_tree(nnx_variables(layer), lvars, "variables after the step")
  return lvars, bool(sown_l)


@pytest.mark.parametrize("layer_name,method_name", [
    pytest.param(a, b, id=f"{a}-{b}") for a, b in CASES])
def test_nnx_layer_matches_linen_bit_for_bit(layer_name, method_name):
  lin, lvars, layer, shape, opts = build_pair(layer_name, method_name)
  unsigned, static = opts.get("unsigned", False), opts.get("static", False)
  lq = METHODS[method_name][0]
  y_shape = jax.eval_shape(lambda x: lin.apply(lvars, x),
                           jax.ShapeDtypeStruct(shape, jnp.float32)).shape
  ct = _inputs(y_shape, False, 9)
  # Train mode: static ranges updated (several steps for the static methods),
  # DQ's auxiliary loss sown.
  for step in range(3 if static else 1):
    x = _inputs(shape, unsigned, 10 + step)
    lvars, sown = compare_step(lin, lvars, layer, x, ct, train=True)
    assert sown == (lq.input.method == "dq"
                    and lq.input.calibration == "dynamic")
  if static:
    np.testing.assert_array_equal(layer.input_count[...], 3)
    frozen = nnx_variables(layer)
  # Eval mode: static ranges frozen, no loss sown.
  layer.eval()
  assert layer.use_running_average
  lvars, sown = compare_step(lin, lvars, layer, _inputs(shape, unsigned, 20),
                             ct, train=False)
  assert not sown
  if static:
    assert_same_tree(nnx_variables(layer), frozen, "frozen in eval")


def test_linen_lsq_per_group_kernel_applies():
  lq = LayerQuant(TQ("lsq", 3, granularity="per_group", group_size=4))
  lin = al.QuantDense(5, quant=lq)
  x = _inputs((4, 8), False, 0)
  lin.apply(lin.init(jax.random.PRNGKey(0), x), x)


def test_nnx_lsq_per_group_kernel_matches_its_definition():
  """Where linen cannot run it (above): the NNX layer's LSQ per_group
  kernel is LSQ of each group of 4 input features with its own step."""
  lq, _ = METHODS["lsq_group"]
  lq = lq.replace(input=TQ("float"))
  layer = anx.QuantLinear(8, 5, quant=lq, rngs=nnx.Rngs(0), **INITS)
  x = _inputs((2, 3, 8), False, 0)
  anx.init(layer, x)
  w = layer.kernel[...]
  step = layer.kernel_lsq_step[...]
  assert step.shape == (2, 1, 5)
  np.testing.assert_allclose(
      step, 2 * jnp.mean(jnp.abs(w.reshape(2, 4, 5)), axis=1,
                         keepdims=True) / np.sqrt(3), rtol=1e-6)
  wq = jnp.clip(jnp.round(w.reshape(2, 4, 5) / step), -4, 3) * step
  np.testing.assert_allclose(layer(x), x @ wq.reshape(8, 5) + layer.bias[...],
                             rtol=1e-5, atol=1e-6)


def test_static_ranges_follow_the_ema_and_freeze_in_eval():
  """The values themselves: the first update takes the batch, later ones
  the EMA; eval uses the stored range (not the batch's)."""
  lq = LayerQuant(TQ("uniform", 4), TQ("uniform", 4, calibration="static",
                                       ema_decay=0.5))
  layer = anx.QuantLinear(8, 5, quant=lq, rngs=nnx.Rngs(0), **INITS)
  xs = [_inputs((2, 3, 8), False, s) for s in range(3)]
  anx.init(layer, xs[0])
  np.testing.assert_array_equal(layer.input_count[...], 0)
  amax = [float(jnp.max(jnp.abs(x))) for x in xs]
  layer(xs[1])
  np.testing.assert_allclose(layer.input_amax[...], amax[1], rtol=1e-6)
  layer(xs[2])
  np.testing.assert_allclose(layer.input_amax[...],
                             0.5 * amax[1] + 0.5 * amax[2], rtol=1e-6)
  layer.eval()
  big = 100 * xs[0]
  frozen = layer(big)
  np.testing.assert_array_equal(layer.input_count[...], 2)
  layer.train()
  assert not np.array_equal(layer(big), frozen)  # the batch's own range


def test_jitted_training_step_matches_linen():
  """nnx.jit on the NNX layer vs jax.jit on linen apply, static ranges and
  LSQ on a DenseGeneral: the compiled paths agree too."""
  lq = LayerQuant(TQ("lsq", 4, granularity="per_channel"),
                  TQ("uniform", 4, calibration="static", ema_decay=0.5))
  lin, layer, shape = _dense_general(lq, None)
  x0 = _inputs(shape, False, 0)
  lvars = dict(lin.init(jax.random.PRNGKey(0), x0))
  anx.init(layer, x0)
  assert_same_tree(nnx_variables(layer), lvars, "init")

  @nnx.jit
  def nstep(m, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

  @jax.jit
  def lstep(v, x):
    def f(p):
      y, upd = lin.apply({**v, PARAMS: p}, x, mutable=[STATS])
      return jnp.sum(y ** 2), upd
    g, upd = jax.grad(f, has_aux=True)(v[PARAMS])
    return g, upd

  for s in range(2):
    x = _inputs(shape, False, 5 + s)
    gn = nnx.to_pure_dict(nstep(layer, x))
    gl, upd = lstep(lvars, x)
    lvars = {**lvars, STATS: upd[STATS]}
    assert_same_tree(gn, gl, "jit grads")
    assert_same_tree(nnx_variables(layer), lvars, "jit variables")


# ---------------------------------------------------------------------------
# The layers as drop-ins for their float NNX layers.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make_float,make_quant", [
    (lambda r: nnx.Linear(3, 4, rngs=r),
     lambda r: anx.QuantLinear(3, 4, rngs=r)),
    (lambda r: nnx.LinearGeneral((2, 3), (4,), axis=(-2, -1), rngs=r),
     lambda r: anx.QuantLinearGeneral((2, 3), (4,), axis=(-2, -1), rngs=r)),
    (lambda r: nnx.Conv(3, 5, (3, 3), strides=2, rngs=r),
     lambda r: anx.QuantConv(3, 5, (3, 3), strides=2, rngs=r)),
    (lambda r: nnx.Einsum("bi,io->bo", (3, 4), (4,), rngs=r),
     lambda r: anx.QuantEinsum("bi,io->bo", (3, 4), (4,), rngs=r)),
], ids=["linear", "linear_general", "conv", "einsum"])
def test_quant_layer_has_its_float_layers_state(make_float, make_quant):
  f, q = make_float(nnx.Rngs(0)), make_quant(nnx.Rngs(0))
  assert isinstance(q, type(f))
  sf, sq = nnx.state(f), nnx.state(q)
  assert_same_tree(nnx.to_pure_dict(sq), nnx.to_pure_dict(sf), "state")
  assert {k: type(v) for k, v in flat_tree(sq).items()} == {
      k: type(v) for k, v in flat_tree(sf).items()}


def test_quant_layer_with_float_config_computes_the_float_layer():
  x = _inputs((2, 5, 5, 3), False, 0)
  f = nnx.Conv(3, 4, (3, 3), padding=((1, 2), (0, 1)), rngs=nnx.Rngs(0))
  q = anx.QuantConv(3, 4, (3, 3), padding=((1, 2), (0, 1)),
                    rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(q(x), f(x))


# ---------------------------------------------------------------------------
# aqt_ext.nnx.quantize_model.
# ---------------------------------------------------------------------------

A = LayerQuant(TQ("lsq", 4, granularity="per_channel"), TQ("lsq", 4))
B = layer_preset("uniform", 8, 8, signed_input=True)
C = layer_preset("aqt", 4, 4)
D = layer_preset("uniform", 4, 8)


class Block(nnx.Module):
  def __init__(self, cin, cout, *, rngs, conv=nnx.Conv):
    self.conv = conv(cin, cout, (3, 3), rngs=rngs, **INITS)
    self.bn = nnx.BatchNorm(cout, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


class Net(nnx.Module):
  """Conv blocks in an nnx.List, an Embed, an nnx.Sequential head."""

  def __init__(self, *, rngs, conv=nnx.Conv, linear=nnx.Linear):
    self.embed = nnx.Embed(10, 8, embedding_init=np_init(2), rngs=rngs)
    self.blocks = nnx.List([Block(3, 8, rngs=rngs, conv=conv),
                            Block(8, 8, rngs=rngs, conv=conv)])
    self.head = nnx.Sequential(linear(8, 16, rngs=rngs, **INITS), nnx.relu,
                               linear(16, 4, rngs=rngs, **INITS))
    self.out = linear(4, 2, rngs=rngs, **INITS)

  def __call__(self, x, ids):
    for block in self.blocks:
      x = block(x)
    h = x.mean(axis=(1, 2)) + self.embed(ids)
    return self.out(self.head(h))


NET_X = (_inputs((2, 6, 6, 3), False, 0), jnp.array([1, 7]))
NET_PATHS = ("blocks/0/conv", "blocks/1/conv", "head/layers/0",
             "head/layers/2", "out")


def _caught(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn()
  return out, [str(w.message) for w in caught
               if issubclass(w.category, UserWarning)]


def test_rules_first_match_report_and_warnings():
  model = Net(rngs=nnx.Rngs(0))
  rules = [("blocks/0/conv", A),   # 0
           ("conv", B),            # 1: blocks/1/conv
           ("blocks/1/conv", C),   # 2: shadowed by 1
           ("head/layers/0", FLOAT),  # 3: stays float
           ("head", D),            # 4: head/layers/2
           ("embed", D),           # 5: not quantizable
           ("decoder", A)]         # 6: matches nothing
  report, got = _caught(lambda: anx.quantize_model(model, rules))
  assert {p: (m.layer, m.rule, m.pattern) for p, m in
          report.layers.items()} == {
              "blocks/0/conv": ("Conv", 0, "blocks/0/conv"),
              "blocks/1/conv": ("Conv", 1, "conv"),
              "head/layers/0": ("Linear", 3, "head/layers/0"),
              "head/layers/2": ("Linear", 4, "head"),
              "out": ("Linear", None, None)}
  assert report.layers["blocks/0/conv"].quant == A
  assert report.layers["out"].quant == FLOAT
  assert report.quantized == ("blocks/0/conv", "blocks/1/conv",
                              "head/layers/2")
  assert report.not_quantizable == {"embed": "Embed"}
  assert report.unused == ("blocks/1/conv", "embed", "decoder")
  assert len(got) == 3, got
  assert got[0] == ("quantize_model: rule 5 ('embed') matches 'embed' "
                    "(Embed), which cannot be quantized (supported: "
                    "nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum); "
                    "they stay float")
  assert got[1] == ("quantize_model: rule 2 ('blocks/1/conv') configures no "
                    "layer: every layer it matches ('blocks/1/conv') is "
                    "taken by an earlier rule")
  assert got[2].startswith(
      "quantize_model: rule 6 ('decoder') configures no layer: it matches "
      "none of the layer paths 'blocks/0/conv', 'blocks/1/conv', ")
  # The layers themselves.
  assert type(model.blocks[0].conv) is anx.QuantConv
  assert model.blocks[0].conv.quant == A
  assert model.blocks[0].conv.path == "blocks/0/conv"
  assert type(model.blocks[1].conv) is anx.QuantConv
  assert model.blocks[1].conv.quant == B
  assert type(model.head.layers[0]) is nnx.Linear  # the float rule
  assert type(model.head.layers[2]) is anx.QuantLinear
  assert model.head.layers[2].path == "head/layers/2"
  assert type(model.out) is nnx.Linear  # the float default
  assert type(model.embed) is nnx.Embed
  assert type(model.blocks[0].bn) is nnx.BatchNorm


def test_linen_rules_warn_alike():
  """The linen twin of the shadowed-rule warning has the same text."""
  class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(nn.Dense(4, name="conv")(x))

  lin = al.quantize_model(Lin(), [("conv", B), ("conv$", C), ("nope", A)])
  _, got = _caught(lambda: lin.init(jax.random.PRNGKey(0), jnp.ones((1, 3))))
  model = nnx.Dict(conv=nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                   out=nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  _, got_nnx = _caught(lambda: anx.quantize_model(
      model, [("conv", B), ("conv$", C), ("nope", A)]))
  assert got_nnx == got and len(got) == 2


def test_model_quant_default_applies_to_unmatched_layers():
  model = Net(rngs=nnx.Rngs(0))
  mq = ModelQuant(default=D, rules=(("^out$", FLOAT), ("blocks/0", B)))
  report, got = _caught(lambda: anx.quantize_model(model, mq))
  assert {p: m.rule for p, m in report.layers.items()} == {
      "blocks/0/conv": 1, "blocks/1/conv": None, "head/layers/0": None,
      "head/layers/2": None, "out": 0}
  assert report.quantized == NET_PATHS[:4]
  assert type(model.out) is nnx.Linear
  assert model.blocks[1].conv.quant == D
  # Rule 1 also matches the BatchNorm of blocks/0 (the default, no rule, is
  # silent on the Embed).
  assert report.not_quantizable == {"blocks/0/bn": "BatchNorm"}
  assert len(got) == 1 and "'blocks/0/bn' (BatchNorm)" in got[0], got


def test_quantized_layers_keep_the_same_variables():
  model = Net(rngs=nnx.Rngs(0))
  flat_before = flat_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  kernels = {p: _module(model, p).kernel for p in NET_PATHS}
  biases = {p: _module(model, p).bias for p in NET_PATHS}
  anx.quantize_model(model, ModelQuant(default=A))
  for p in NET_PATHS:
    assert isinstance(_module(model, p), nnx_layers.QuantLayer)
    assert _module(model, p).kernel is kernels[p]
    assert _module(model, p).bias is biases[p]
  # Before init: the float model's parameter paths and values, no others.
  flat_q = flat_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert list(flat_q) == list(flat_before)
  assert_same_tree(flat_q, flat_before, "params before init")
  # A float checkpoint (another float model's state) loads as is.
  ckpt = nnx.state(Net(rngs=nnx.Rngs(0)), nnx.Param)
  values = jax.tree.map(lambda v: np.asarray(v) * 2 + 1,
                        nnx.to_pure_dict(ckpt))
  nnx.replace_by_pure_dict(ckpt, values)
  nnx.update(model, ckpt)
  assert_same_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)), values,
                   "loaded checkpoint")
  nnx.jit(anx.init)(model, *NET_X)
  flat_after = flat_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert set(flat_after) - set(flat_before) == {
      f"{p}/{n}" for p in NET_PATHS for n in ("kernel_lsq_step",
                                              "input_lsq_step")}


def _module(model, path):
  m = model
  for k in path.split("/"):
    m = m[int(k)] if k.isdigit() else getattr(m, k)
  return m


def test_quantized_by_rules_equals_built_directly():
  lq = LayerQuant(TQ("lsq", 4, granularity="per_channel"),
                  TQ("uniform", 4, calibration="static", ema_decay=0.9))
  by_rules = Net(rngs=nnx.Rngs(0))
  anx.quantize_model(by_rules, [("conv|head|out", lq)])
  direct = Net(rngs=nnx.Rngs(0),
               conv=functools.partial(anx.QuantConv, quant=lq),
               linear=functools.partial(anx.QuantLinear, quant=lq))
  # Both under one nnx.jit per mode (one compile instead of many eager ops).
  nnx.jit(lambda a, b: (anx.init(a, *NET_X), anx.init(b, *NET_X)))(
      by_rules, direct)
  assert_same_tree(nnx.to_pure_dict(nnx.state(by_rules)),
                   nnx.to_pure_dict(nnx.state(direct)), "state")
  both = nnx.jit(lambda a, b, x, ids: (a(x, ids), b(x, ids)))
  for s in range(2):
    y_rules, y_direct = both(by_rules, direct,
                             _inputs((2, 6, 6, 3), False, 30 + s), NET_X[1])
    np.testing.assert_array_equal(y_rules, y_direct)
  assert_same_tree(nnx.to_pure_dict(nnx.state(by_rules)),
                   nnx.to_pure_dict(nnx.state(direct)), "state after")
  np.testing.assert_array_equal(by_rules.blocks[0].conv.input_count[...], 2)
  by_rules.eval()
  direct.eval()
  y_rules, y_direct = both(by_rules, direct, *NET_X)
  np.testing.assert_array_equal(y_rules, y_direct)


def test_quantize_model_refuses_what_it_cannot_mirror():
  def custom_dot(*args, **kwargs):
    return jax.lax.dot_general(*args, **kwargs)

  model = nnx.Dict(a=nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                   b=nnx.Linear(3, 4, dot_general=custom_dot,
                                rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'b' \(nnx.Linear\) sets "
                     "dot_general"):
    anx.quantize_model(model, [(".*", B)])
  assert type(model.a) is nnx.Linear  # nothing replaced on refusal
  anx.quantize_model(model, [("b", FLOAT), (".*", B)])  # a float rule first
  assert type(model.a) is anx.QuantLinear and type(model.b) is nnx.Linear

  conv = nnx.Dict(c=nnx.Conv(3, 4, (3, 3), padding="CIRCULAR",
                             rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="padding='CIRCULAR' cannot be "
                     "quantized"):
    anx.quantize_model(conv, [("c", B)])
  assert type(conv.c) is nnx.Conv


def test_quantize_model_refuses_subclasses_with_their_own_call():
  class Doubling(nnx.Linear):
    def __call__(self, x):
      return 2 * super().__call__(x)

  model = nnx.Dict(d=Doubling(3, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=r"matches 'd', a Doubling \(subclass "
                     r"of nnx.Linear\) with its own __call__"):
    anx.quantize_model(model, [("d", B)])
  _, got = _caught(lambda: anx.quantize_model(model, [("d", FLOAT),
                                                      (".*", B)]))
  assert type(model.d) is Doubling
  assert len(got) == 1 and "nothing is quantized" in got[0]
  assert "'d' (Doubling)" in got[0]
  # An NNX model with no supported layer: the message says where NNX looks.
  _, got = _caught(lambda: anx.quantize_model(
      nnx.Dict(n=nnx.LayerNorm(4, rngs=nnx.Rngs(0))), [("^zzz$", B)]))
  assert len(got) == 1 and "nothing is quantized" in got[0], got
  assert "layer is a submodule of the model" in got[0], got[0]
  assert "its submodules with variables: 'n' (LayerNorm)" in got[0], got[0]
  assert "wrapped model" not in got[0] and "called" not in got[0]


def test_quantize_model_refuses_a_linen_module():
  with pytest.raises(TypeError, match="must be an nnx.Module, got Dense"):
    anx.quantize_model(nn.Dense(3), [(".*", B)])
  with pytest.raises(TypeError, match="ModelQuant or a sequence"):
    anx.quantize_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), B)



def test_init_leaves_existing_variables_unchanged():
  """Like linen's init: creates the quantizer variables, updates nothing
  (BatchNorm's running statistics included)."""
  model = Net(rngs=nnx.Rngs(0))
  anx.quantize_model(model, ModelQuant(default=A))
  before = nnx.to_pure_dict(nnx.state(model))
  anx.init(model, *NET_X)
  after = nnx.to_pure_dict(nnx.state(model))
  flat_after = flat_tree(after)
  assert_same_tree({k: flat_after[k] for k in flat_tree(before)},
                   flat_tree(before), "existing variables")


# flax examples/mnist CNN: quantized by rules, trained, exported and served
# in tests/test_nnx_serve.py.
