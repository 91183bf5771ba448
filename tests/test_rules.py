"""quantize_model on ordinary Flax models that know nothing of aqt_ext."""

import functools
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from aqt_ext.core import quantizers as qz
from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant, layer_preset,
                            parse_spec)
from aqt_ext.core.context import QuantInitWarning
from aqt_ext.linen.layers import (QuantConv, QuantDense, QuantEinsum,
                                  calibrate_lsq_steps)
from aqt_ext.linen.rules import QuantDotGeneral, QuantizedModel, quantize_model

FLOAT = LayerQuant()
W8A8 = parse_spec("w8a8").default                       # unsigned inputs
W8A8_SIGNED = parse_spec("w8a8", first=".*").rules[0][1]  # signed inputs
W4_ONLY = LayerQuant(weight=TensorQuant("uniform", 4,
                                         granularity="per_channel"))
LSQ = LayerQuant(TensorQuant("lsq", 4, granularity="per_channel"),
                 TensorQuant("lsq", 4, grid="full"))


# ---------------------------------------------------------------------------
# Models in ordinary Flax style.
# ---------------------------------------------------------------------------

class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (32, 32):
      x = nn.relu(nn.Dense(features)(x))
    return nn.Dense(4)(x)


class Attention(nn.Module):
  """Self-attention from DenseGeneral projections, then a Flax MHA."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.DenseGeneral((2, 4), name=n)(x)
               for n in ("query", "key", "value"))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
    y = nn.DenseGeneral(8, axis=(-2, -1), name="out")(
        jnp.einsum("bhqk,bkhd->bqhd", w, v))
    y = nn.LayerNorm()(x + y)
    return y + nn.MultiHeadDotProductAttention(num_heads=2, name="mha")(y)


def _contracting(path: str, ndim: int) -> tuple[int, ...]:
  """Contracting axes of a kernel of the models above."""
  if path.endswith(("query", "key", "value")):
    return (0,)
  if path.endswith("out"):
    return (0, 1)
  return tuple(range(ndim - 1))


RNG = np.random.default_rng(0)
# name -> (model class, call args, call kwargs, regex of its layers)
CASES = {
    "cnn": (CNN, (RNG.normal(size=(4, 8, 8, 3)).astype(np.float32),),
            {"train": False}, "Conv|Dense"),
    "mlp": (MLP, (RNG.normal(size=(6, 12)).astype(np.float32),), {},
            "Dense"),
    "attention": (Attention, (RNG.normal(size=(2, 5, 8)).astype(np.float32),),
                  {}, "query|key|value|out"),
}


def random_variables(model, args, kwargs, seed=0):
  """The model's variables filled from numpy (no PRNG compile)."""
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs),
                          jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1] in ("scale", "var"):
      return (1 + 0.2 * rng.random(s.shape)).astype(np.float32)
    std = np.sqrt(1 / np.prod(s.shape[:-1])) if path[-1] == "kernel" else 0.1
    return (std * rng.normal(size=s.shape)).astype(np.float32)

  return unflatten_dict({k: jnp.asarray(fill(k, s))
                         for k, s in flatten_dict(shapes).items()})


VARIABLES = {name: random_variables(c[0](), c[1], c[2])
             for name, c in CASES.items()}


@functools.lru_cache(maxsize=None)
def output(name: str, lq: LayerQuant | None, **extra):
  """The output of case `name`: float model (lq None) or all its layers
  quantized by `lq`; computed once."""
  cls, args, kwargs, layers = CASES[name]
  model = cls() if lq is None else quantize_model(cls(), [(layers, lq)])
  return jax.jit(functools.partial(model.apply, **{**kwargs, **extra}))(
      VARIABLES[name], *args)


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _init_shapes(model, args, kwargs):
  return jax.eval_shape(functools.partial(model.init, **kwargs),
                        jax.random.PRNGKey(0), *args)


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------------------
# Same tree, same output when float, quantized kernels when asked.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_variable_tree_is_the_float_tree(name):
  cls, args, kwargs, layers = CASES[name]
  ref = _init_shapes(cls(), args, kwargs)
  for rules in ([(".*", FLOAT)], [(layers, W8A8_SIGNED)]):
    assert _shapes(_init_shapes(quantize_model(cls(), rules), args,
                                kwargs)) == _shapes(ref)
  # LSQ adds its steps next to the kernels, nothing else.
  flat_ref = flatten_dict(ref["params"])
  flat_lsq = flatten_dict(_init_shapes(quantize_model(cls(), [(layers, LSQ)]),
                                       args, kwargs)["params"])
  assert {k: v.shape for k, v in flat_lsq.items() if k in flat_ref} == {
      k: v.shape for k, v in flat_ref.items()}
  kernels = {k[:-1] for k in flat_ref if k[-1] == "kernel"}
  assert set(flat_lsq) - set(flat_ref) == {
      k + (n,) for k in kernels for n in ("input_lsq_step", "kernel_lsq_step")}


@pytest.mark.parametrize("name", list(CASES))
def test_float_rules_give_the_original_output(name):
  np.testing.assert_array_equal(output(name, FLOAT), output(name, None))


def test_float_rules_keep_batch_norm_training():
  """BatchNorm in training: same output and same updated statistics."""
  float_out, float_stats = output("cnn", None, train=True,
                                  mutable=("batch_stats",))
  out, stats = output("cnn", FLOAT, train=True, mutable=("batch_stats",))
  np.testing.assert_array_equal(out, float_out)
  jax.tree.map(np.testing.assert_array_equal, stats, float_stats)


@jax.jit
def _fake_quant_kernels(params):
  """Every kernel fake-quantized 4-bit per output channel (test oracle)."""
  def one(path, w):
    if path[-1] != "kernel":
      return w
    red = _contracting("/".join(path[:-1]), w.ndim)
    qp = qz.qparams_from_range(qz.observe_range(w, "full", red), "full", 4)
    return qz.fake_quant(w, qp)
  return unflatten_dict({k: one(k, w) for k, w in
                         flatten_dict(params).items()})


@pytest.mark.parametrize("name", list(CASES))
def test_the_kernels_used_are_quantized(name):
  """Weight-only 4-bit: the output is the float model's output with every
  kernel replaced by its per-channel fake quantization, which has at most
  16 values per output channel."""
  cls, args, kwargs, _ = CASES[name]
  v = VARIABLES[name]
  vq = dict(v, params=_fake_quant_kernels(v["params"]))
  for path, w in flatten_dict(vq["params"]).items():
    if path[-1] == "kernel":
      n_red = len(_contracting("/".join(path[:-1]), w.ndim))
      cols = np.asarray(w).reshape(-1, int(np.prod(w.shape[n_red:])))
      assert max(len(np.unique(c)) for c in cols.T) <= 16
      assert not np.allclose(w, flatten_dict(v["params"])[path])
  ref = jax.jit(functools.partial(cls().apply, **kwargs))(vq, *args)
  np.testing.assert_allclose(output(name, W4_ONLY), ref, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_w8a8_is_close_to_float(name):
  assert _rel_err(output(name, W8A8_SIGNED), output(name, None)) < 0.03


def _layer_io(name: str, lq: LayerQuant, feed=None) -> dict:
  """{call: (input, output)} of every quantized layer of case `name`.

  With `feed` (another run's record), each quantized layer is given the
  input that layer had in that run instead of its own upstream's output.
  """
  cls, args, kwargs, layers = CASES[name]
  model = quantize_model(cls(), [(layers, lq)])

  def run(variables, *call_args):
    record = {}

    def spy(next_fun, a, kw, context):
      mdl = context.module
      if context.method_name != "__call__" or not (
          isinstance(mdl, (QuantDense, QuantConv))
          or isinstance(getattr(mdl, "dot_general", None), QuantDotGeneral)):
        return next_fun(*a, **kw)
      key = "/".join(map(str, mdl.scope.path))
      key = f"{key}#{sum(k.startswith(key + '#') for k in record)}"
      if feed is not None:
        a = (feed[key][0],) + tuple(a[1:])
      record[key] = (a[0], next_fun(*a, **kw))
      return record[key][1]

    with nn.intercept_methods(spy):
      out = model.apply(variables, *call_args, **kwargs)
    return out, record

  return jax.jit(run)(VARIABLES[name], *args)


# Quantized layer calls per case: Conv, Conv, Dense / 3 Dense /
# query, key, value, out and MHA's own four projections.
N_QUANTIZED = {"cnn": 3, "mlp": 3, "attention": 8}


@pytest.mark.parametrize("name", list(CASES))
def test_int_execution_matches_fake_quant(name):
  """Layer by layer, on the same input: the integer operands are the same,
  only the float summation differs. End to end, a summation difference can
  move a downstream rounding by one step, so only closeness is asserted."""
  int_lq = W8A8_SIGNED.replace(execution="int")
  fake_out, fake = _layer_io(name, W8A8_SIGNED)
  _, fed = _layer_io(name, int_lq, feed=fake)
  assert len(fake) == N_QUANTIZED[name] and set(fed) == set(fake)
  for key, (x, y) in fake.items():
    np.testing.assert_array_equal(fed[key][0], x)
    np.testing.assert_allclose(fed[key][1], y, rtol=1e-4, atol=1e-4,
                               err_msg=key)
  int_out, _ = _layer_io(name, int_lq)
  assert _rel_err(int_out, fake_out) < 1e-2


def _grads(model, variables, args, kwargs):
  train = {"train": True, "mutable": ["batch_stats"]} if kwargs else {}

  def loss(params):
    out = model.apply(dict(variables, params=params), *args, **train)
    return jnp.sum(jnp.sin(out[0] if train else out))

  return flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))


@pytest.mark.parametrize("name", ["cnn", "attention"])  # mlp: LSQ test
def test_gradients_flow_and_are_finite(name):
  cls, args, kwargs, layers = CASES[name]
  grads = _grads(quantize_model(cls(), [(layers, W8A8_SIGNED)]),
                 VARIABLES[name], args, kwargs)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
  assert all(float(jnp.abs(g).sum()) > 0 for k, g in grads.items()
             if k[-1] == "kernel")


def test_lsq_from_a_float_checkpoint_trains_its_steps():
  """A float checkpoint loads as is; the LSQ steps are created from it and
  get gradients."""
  cls, args, kwargs, layers = CASES["mlp"]
  model = quantize_model(cls(), [(layers, LSQ)])
  _, v = jax.jit(functools.partial(model.apply, mutable=True))(
      VARIABLES["mlp"], *args, rngs={"params": jax.random.PRNGKey(0)})
  grads = _grads(model, v, args, kwargs)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
  for k, g in grads.items():
    assert float(jnp.abs(g).sum()) > 0, k


# ---------------------------------------------------------------------------
# Rules: first match, unused, refused, not quantizable.
# ---------------------------------------------------------------------------

MLP_X = CASES["mlp"][1]


def _abstract_init(model, args, kwargs=None):
  """Traces init (rules act at trace time) without compiling."""
  return _init_shapes(model, args, kwargs or {})


def test_first_match_wins_and_unused_rules_are_reported():
  model = quantize_model(MLP(), [("Dense_0", LSQ), ("Dense", W8A8),
                                 ("encoder", W8A8)])
  report = model.report(None, *MLP_X)
  assert {p: m.rule for p, m in report.layers.items()} == {
      "Dense_0": 0, "Dense_1": 1, "Dense_2": 1}
  assert report.unused == ("encoder",)
  assert model.unused_rules(None, *MLP_X) == ("encoder",)
  params = _abstract_init(model, MLP_X)["params"]
  assert "kernel_lsq_step" in params["Dense_0"]
  assert set(params["Dense_1"]) == {"kernel", "bias"}


def test_model_quant_default_applies_to_unmatched_layers():
  mq = ModelQuant(default=W8A8, rules=((r"_2$", FLOAT),))
  report = quantize_model(MLP(), mq).report(None, *MLP_X)
  assert report.quantized == ("Dense_0", "Dense_1")
  assert report.layers["Dense_0"].rule is None


def test_paths_are_relative_to_the_wrapped_model():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return quantize_model(MLP(), [("^Dense_0$", LSQ)])(x)

  params = _abstract_init(Outer(), MLP_X)["params"]
  (inner,) = params.values()
  assert "kernel_lsq_step" in inner["Dense_0"]


def test_invalid_rules_are_refused_when_built():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    quantize_model(MLP(), [("Dense[", W8A8)])
  with pytest.raises(TypeError, match="sequence of"):
    quantize_model(MLP(), W8A8)
  with pytest.raises(ValueError, match="must be"):
    quantize_model(MLP(), [("Dense", "w8a8")])


def test_rule_matching_an_unquantizable_module_warns():
  cls, args, kwargs, _ = CASES["cnn"]
  model = quantize_model(cls(), [("BatchNorm_0|Conv_0", W8A8_SIGNED)])
  with pytest.warns(UserWarning, match=r"'BatchNorm_0' \(BatchNorm\).*"
                    "cannot be quantized"):
    _abstract_init(model, args, kwargs)
  report = model.report(None, *args, **kwargs)
  assert report.not_quantizable == {"BatchNorm_0": "BatchNorm"}
  assert report.quantized == ("Conv_0",)
  # A float rule on such a module is harmless.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _abstract_init(quantize_model(cls(), [("BatchNorm", FLOAT)]), args,
                   kwargs)


def test_einsum_is_quantized_as_quant_einsum():
  """nn.Einsum matched by a rule runs as QuantEinsum on the same params."""
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((12, 3), "bi,io->bo")(x)

  qm = quantize_model(Model(), [(".*", W8A8)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12)), jnp.float32)
  variables = qm.init(jax.random.PRNGKey(0), x)
  direct = QuantEinsum((12, 3), "bi,io->bo", quant=W8A8)
  want = direct.apply({"params": variables["params"]["Einsum_0"]}, x)
  np.testing.assert_array_equal(qm.apply(variables, x), want)
  assert not np.array_equal(want, Model().apply(variables, x))
  assert qm.report(None, x).quantized == ("Einsum_0",)


def test_layers_that_cannot_be_mirrored_raise():
  class Doubling(nn.Dense):
    def __call__(self, x):
      return 2 * super().__call__(x)

  class Model(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
      return self.layer(x)

  x = np.ones((1, 6, 6, 2), np.float32)
  init = lambda layer, rules: _abstract_init(  # noqa: E731
      quantize_model(Model(layer), rules), (x,))
  with pytest.raises(TypeError, match="own __call__"):
    init(Doubling(3), [("layer", W8A8)])
  init(Doubling(3), [("layer", FLOAT)])  # a float rule first is the way out
  with pytest.raises(ValueError, match="padding='CIRCULAR'"):
    init(nn.Conv(3, (3, 3), padding="CIRCULAR"), [("layer", W8A8)])
  with pytest.raises(ValueError, match="sets mask.*allowed: mask=None"):
    init(nn.Conv(3, (1, 1), mask=jnp.ones((1, 1, 2, 3))), [("layer", W8A8)])


def test_quantized_model_is_a_flax_module():
  model = quantize_model(MLP(), [(".*", W8A8)])
  assert isinstance(model, QuantizedModel) and isinstance(model, nn.Module)


# ---------------------------------------------------------------------------
# Rules that quantize nothing, and rules that configure no layer.
# ---------------------------------------------------------------------------

def _warnings_of(fn, category=UserWarning) -> list[str]:
  """The messages of the `category` warnings that `fn()` emits, callbacks
  included."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.block_until_ready(fn())
    jax.effects_barrier()
  return [str(w.message) for w in caught if issubclass(w.category, category)]


def test_a_model_run_through_the_nnx_bridge_warns_that_nothing_is_quantized():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class NNXMLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = quantize_model(nnx.bridge.to_linen(NNXMLP), [(".*", W8A8_SIGNED)])
  got = _warnings_of(lambda: _abstract_init(model, MLP_X))
  assert len(got) == 1
  assert "nothing is quantized" in got[0]
  assert ("no nn.Dense/nn.DenseGeneral/nn.Conv/nn.Einsum layer was called"
          in got[0])
  assert "aqt_ext.nnx.quantize_model" in got[0]
  assert model.report(None, *MLP_X).layers == {}


def test_rules_matching_no_layer_path_warn_with_the_paths_and_patterns():
  model = quantize_model(MLP(), [("^encoder", W8A8_SIGNED)])
  (got,) = _warnings_of(lambda: _abstract_init(model, MLP_X))
  assert "nothing is quantized" in got and "'^encoder'" in got
  assert "'Dense_0', 'Dense_1', 'Dense_2'" in got


def test_each_rule_that_configures_no_layer_warns():
  model = quantize_model(MLP(), [("Dense", W8A8_SIGNED), ("_0$", LSQ),
                                 ("head", FLOAT)])
  got = _warnings_of(lambda: _abstract_init(model, MLP_X))
  assert len(got) == 2, got
  assert "rule 1 ('_0$') configures no layer: every layer it matches " \
         "('Dense_0') is taken by an earlier rule" in got[0]
  assert "rule 2 ('head') configures no layer: it matches none of the " \
         "layer paths 'Dense_0', 'Dense_1', 'Dense_2'" in got[1]


def test_rules_that_all_select_something_do_not_warn():
  cls, args, kwargs, _ = CASES["cnn"]
  # A float rule keeping BatchNorm float is not a rule that matches nothing.
  model = quantize_model(cls(), [("BatchNorm", FLOAT), (".*", W8A8_SIGNED)])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _abstract_init(model, args, kwargs)
    _abstract_init(quantize_model(MLP(), [(".*", FLOAT)]), MLP_X)


# ---------------------------------------------------------------------------
# Inputs on a grid without negative values.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,how", [
    ("uniform", "jit"), ("lsq", "jit"), ("pact", "jit"), ("lsq", "eager"),
    ("lsq", "jit_closure")])
def test_unsigned_input_grid_seeing_negative_values_warns(method, how):
  """Only Dense_0 sees negative values (the others follow a ReLU); it warns
  once, at jitted init (a callback), at eager init and at a jitted init that
  closes over the input (on the host), naming itself, the fraction and the
  fix."""
  (x,) = MLP_X
  model = quantize_model(MLP(), [(".*", layer_preset(method, 4, 4))])
  frac = float(np.mean(x < 0))
  assert 0.3 < frac < 0.7
  x_array = jnp.asarray(x)  # a concrete array inside the jit trace
  init = {"jit": lambda k: jax.jit(model.init)(k, x),
          "eager": lambda k: model.init(k, x),
          "jit_closure": jax.jit(lambda k: model.init(k, x_array))}[how]
  got = _warnings_of(lambda: init(jax.random.PRNGKey(0)), QuantInitWarning)
  assert len(got) == 1, got
  assert got[0].startswith("aqt_ext: layer 'Dense_0': its input")
  assert f"{frac:.1%} of the values it sees are negative" in got[0]
  assert "signed_input=True" in got[0] and "grid='full'" in got[0]
  if how == "jit":
    signed = quantize_model(MLP(), [(".*", layer_preset(method, 4, 4,
                                                        signed_input=True))])
    assert _warnings_of(lambda: jax.jit(signed.init)(jax.random.PRNGKey(0), x),
                        QuantInitWarning) == []


def test_negative_inputs_warn_at_the_first_static_calibration_only():
  (x,) = MLP_X
  static = LayerQuant(TensorQuant("uniform", 8, granularity="per_channel"),
                      TensorQuant("uniform", 8, grid="unsigned",
                                  calibration="static"))
  layer = QuantDense(3, quant=static)
  float_vars = nn.Dense(3).init(jax.random.PRNGKey(0), x)
  calibrate = jax.jit(functools.partial(layer.apply, mutable=["quant_stats"]))
  got = _warnings_of(lambda: calibrate(float_vars, x), QuantInitWarning)
  assert len(got) == 1 and "(top-level QuantDense): its input" in got[0]
  _, stats = calibrate(float_vars, x)
  assert int(stats["quant_stats"]["input_count"]) == 1
  assert _warnings_of(lambda: calibrate({**float_vars, **stats}, x),
                      QuantInitWarning) == []


# ---------------------------------------------------------------------------
# Layers inside nn.scan / nn.RNN.
# ---------------------------------------------------------------------------

LSQ8_SIGNED = layer_preset("lsq", 8, 8, signed_input=True)
SEQ = RNG.normal(size=(2, 5, 4)).astype(np.float32)  # (batch, time, features)
LSTM_GATES = ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, x):
    return carry, nn.Dense(3, name="d")(x)


class ScanModel(nn.Module):
  """A Dense, then a Dense inside nn.scan over time."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="pre")(x)
    scan = nn.scan(_Cell, variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=1, out_axes=1)
    return scan(name="scan")(jnp.zeros(()), x)[1]


def test_negative_inputs_inside_scan_warn_once_per_layer():
  """'scan/d' sees negative values at each of the 5 steps; it warns once."""
  model = quantize_model(ScanModel(), [(".*", layer_preset("uniform", 8, 8))])
  got = _warnings_of(lambda: model.init(jax.random.PRNGKey(0), SEQ),
                     QuantInitWarning)
  assert sorted(m.split(":")[1] for m in got) == [" layer 'pre'",
                                                   " layer 'scan/d'"]


def _float_params(params):
  return unflatten_dict({k: v for k, v in flatten_dict(params).items()
                         if k[-1] in ("kernel", "bias")})


def test_lsq_inside_rnn_inits_applies_trains_and_is_close_to_float():
  """nn.RNN(nn.LSTMCell): init warns that the input steps start data-free;
  calibrate_lsq_steps sets them from data; 8-bit LSQ is then close to the
  float model, and every step gets a finite, non-zero gradient."""
  float_model = nn.RNN(nn.LSTMCell(8))
  model = quantize_model(float_model, [(".*", LSQ8_SIGNED)])
  with pytest.warns(QuantInitWarning, match=r"layer 'cell/ii': its input LSQ "
                    r"step cannot be initialised from data inside a loop body"
                    r".*calibrate_lsq_steps"):
    v = jax.jit(model.init)(jax.random.PRNGKey(0), SEQ)
  assert set(v["params"]) == {"cell"}
  assert set(v["params"]["cell"]) == set(LSTM_GATES)
  assert set(model.report(None, SEQ).quantized) == {
      f"cell/{g}" for g in LSTM_GATES}
  v = calibrate_lsq_steps(model, v, SEQ)
  ref = jax.jit(float_model.apply)({"params": _float_params(v["params"])},
                                    SEQ)
  assert _rel_err(jax.jit(model.apply)(v, SEQ), ref) < 0.1
  grads = _grads(model, v, (SEQ,), {})
  for k, g in grads.items():
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0, k


def test_dq_inside_rnn_inits_from_pact_init_and_trains():
  """A DQ input clip inside nn.RNN cannot be fitted to the scanned data at
  init: it starts at pact_init with a warning, and the model trains."""
  dq8 = layer_preset("dq", 8, 8, signed_input=True)
  model = quantize_model(nn.RNN(nn.LSTMCell(8)), [(".*", dq8)])
  with pytest.warns(QuantInitWarning, match=r"layer 'cell/ii': its input DQ "
                    r"clip cannot be fitted to data inside a scan body"):
    v = jax.jit(model.init)(jax.random.PRNGKey(0), SEQ)
  alpha = v["params"]["cell"]["ii"]["input_dq_alpha"]
  np.testing.assert_allclose(alpha, dq8.input.pact_init)
  grads = _grads(model, v, (SEQ,), {})
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
  # The direct update trains the quantized weights (positions), not kernel.
  assert float(jnp.abs(grads[("cell", "ii", "kernel_dq_position")]).sum()) > 0
  assert float(jnp.abs(grads[("cell", "ii", "kernel")]).sum()) == 0


def test_rules_inside_rnn_see_the_variable_paths():
  model = quantize_model(nn.RNN(nn.LSTMCell(8)), [("^cell/ii$", LSQ8_SIGNED)])
  with pytest.warns(QuantInitWarning):
    params = _abstract_init(model, (SEQ,))["params"]["cell"]
  assert [g for g in LSTM_GATES if "input_lsq_step" in params[g]] == ["ii"]


def test_lsq_steps_outside_scan_from_init_data_inside_from_calibration():
  model = quantize_model(ScanModel(), [(".*", LSQ8_SIGNED)])
  with pytest.warns(QuantInitWarning, match="layer 'scan/d'"):
    v = jax.jit(model.init)(jax.random.PRNGKey(0), SEQ)
  p = v["params"]
  np.testing.assert_allclose(p["pre"]["input_lsq_step"],
                             qz.lsq_init_step(SEQ, "full", 8, (0, 1, 2)),
                             rtol=1e-6)
  np.testing.assert_allclose(p["scan"]["d"]["input_lsq_step"],
                             [[2 / np.sqrt(127)]], rtol=1e-6)
  cal = calibrate_lsq_steps(model, v, SEQ)
  # 'scan/d' saw the quantized 'pre' layer's output, at every time step.
  pre_out = jax.jit(quantize_model(nn.Dense(4), [(".*", LSQ8_SIGNED)]).apply)(
      {"params": p["pre"]}, SEQ)
  np.testing.assert_allclose(
      cal["params"]["scan"]["d"]["input_lsq_step"],
      qz.lsq_init_step(pre_out, "full", 8, (0, 1, 2)).reshape(1, 1),
      rtol=1e-5)
  changed = {k for k, a in flatten_dict(cal["params"]).items()
             if not np.array_equal(a, flatten_dict(p)[k])}
  assert changed == {("scan", "d", "input_lsq_step")}  # pre's was from data
  with pytest.raises(ValueError, match="no input with.*'lsq'"):
    calibrate_lsq_steps(quantize_model(ScanModel(), [(".*", W8A8_SIGNED)]),
                        {"params": _float_params(p)}, SEQ)


# ---------------------------------------------------------------------------
# The package.
# ---------------------------------------------------------------------------

def test_submodules_are_attributes_imported_on_first_use():
  code = """
import sys
import aqt_ext
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('orbax', 'tensorflow')
               or m in ('aqt_ext.serve', 'aqt_ext.train', 'aqt_ext.sweep'))
assert not heavy, heavy
assert callable(aqt_ext.serve.export) and callable(aqt_ext.serve.load)
assert callable(aqt_ext.cost.model_cost)
assert 'aqt_ext.serve' in sys.modules
try:
  aqt_ext.no_such_module
except AttributeError as e:
  assert 'no_such_module' in str(e)
else:
  raise AssertionError('no AttributeError')
"""
  subprocess.run([sys.executable, "-c", code], check=True, timeout=1800)
