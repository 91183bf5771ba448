"""quantize_model on ordinary Flax models that know nothing of aqt_ext."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from aqt_ext import quantizers as qz
from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant, parse_spec
from aqt_ext.rules import QuantizedModel, quantize_model

FLOAT = LayerQuant()
W8A8 = parse_spec("w8a8").default                       # unsigned inputs
W8A8_SIGNED = parse_spec("w8a8", first=".*").rules[0][1]  # signed inputs
W4_ONLY = LayerQuant(weight=TensorQuant("uniform", 4, granularity="per_channel"))
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
CASES = {
    "cnn": (CNN, (RNG.normal(size=(4, 8, 8, 3)).astype(np.float32),),
            {"train": False}),
    "mlp": (MLP, (RNG.normal(size=(6, 12)).astype(np.float32),), {}),
    "attention": (Attention, (RNG.normal(size=(2, 5, 8)).astype(np.float32),),
                  {}),
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


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  cls, args, kwargs = CASES[request.param]
  return cls, args, kwargs, random_variables(cls(), args, kwargs)


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _apply(model, variables, args, kwargs, **extra):
  return jax.jit(functools.partial(model.apply, **kwargs, **extra))(
      variables, *args)


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------------------
# Same tree, same output when float, quantized kernels when asked.
# ---------------------------------------------------------------------------

def test_variable_tree_is_the_float_tree(case):
  cls, args, kwargs, _ = case
  init = lambda m: jax.eval_shape(  # noqa: E731
      functools.partial(m.init, **kwargs), jax.random.PRNGKey(0), *args)
  ref = init(cls())
  for rules in ([(".*", FLOAT)], [(".*", W8A8_SIGNED)]):
    assert _shapes(init(quantize_model(cls(), rules))) == _shapes(ref)
  # LSQ adds its steps next to the kernels, nothing else.
  flat_ref = flatten_dict(ref["params"])
  flat_lsq = flatten_dict(init(quantize_model(cls(), [(".*", LSQ)]))["params"])
  assert {k: v.shape for k, v in flat_lsq.items() if k in flat_ref} == {
      k: v.shape for k, v in flat_ref.items()}
  extra = {k for k in flat_lsq if k not in flat_ref}
  kernels = {k[:-1] for k in flat_ref if k[-1] == "kernel"}
  assert extra == {k + (n,) for k in kernels
                   for n in ("input_lsq_step", "kernel_lsq_step")}


def test_float_rules_give_the_original_output(case):
  cls, args, kwargs, v = case
  q = quantize_model(cls(), [(".*", FLOAT)])
  np.testing.assert_array_equal(_apply(q, v, args, kwargs),
                                _apply(cls(), v, args, kwargs))
  if "train" in kwargs:  # BatchNorm in training: same output and statistics
    out_q, new_q = _apply(q, v, args, {"train": True},
                          mutable=["batch_stats"])
    out_f, new_f = _apply(cls(), v, args, {"train": True},
                          mutable=["batch_stats"])
    np.testing.assert_array_equal(out_q, out_f)
    jax.tree.map(np.testing.assert_array_equal, new_q, new_f)


def test_the_kernels_used_are_quantized(case):
  """Weight-only 4-bit: the output is the float model's output with every
  kernel replaced by its per-channel fake quantization (<= 16 values per
  output channel)."""
  cls, args, kwargs, v = case
  out = _apply(quantize_model(cls(), [(".*", W4_ONLY)]), v, args, kwargs)

  def fake_quant(path, w):
    if path[-1] != "kernel":
      return w
    red = _contracting("/".join(path[:-1]), w.ndim)
    qp = qz.qparams_from_range(qz.observe_range(w, "full", red), "full", 4)
    wq = qz.fake_quant(w, qp)
    per_channel = np.asarray(wq).reshape(-1, *wq.shape[len(red):])
    per_channel = per_channel.reshape(per_channel.shape[0], -1)
    assert max(len(np.unique(c)) for c in per_channel.T) <= 16
    assert not np.allclose(wq, w)
    return wq

  vq = dict(v, params=unflatten_dict({
      k: fake_quant(k, w) for k, w in flatten_dict(v["params"]).items()}))
  np.testing.assert_allclose(out, _apply(cls(), vq, args, kwargs),
                             rtol=1e-5, atol=1e-6)


def test_w8a8_is_close_to_float(case):
  cls, args, kwargs, v = case
  out = _apply(quantize_model(cls(), [(".*", W8A8_SIGNED)]), v, args, kwargs)
  assert _rel_err(out, _apply(cls(), v, args, kwargs)) < 0.03


def test_int_execution_matches_fake_quant(case):
  """Same integer operands; only float summation order differs, and a
  dynamic range may then round an activation one level apart."""
  cls, args, kwargs, v = case
  run = lambda lq: _apply(  # noqa: E731
      quantize_model(cls(), [(".*", lq)]), v, args, kwargs)
  fake, ints = run(W8A8_SIGNED), run(W8A8_SIGNED.replace(execution="int"))
  np.testing.assert_allclose(ints, fake, rtol=1e-4, atol=1e-4)


def test_gradients_flow_and_are_finite(case):
  cls, args, kwargs, v = case
  model = quantize_model(cls(), [(".*", LSQ)])
  # A float checkpoint loads as is; LSQ steps are created from it.
  _, v = _apply(model, v, args, kwargs, mutable=True,
                rngs={"params": jax.random.PRNGKey(0)})
  kw = {"train": True, "mutable": ["batch_stats"]} if kwargs else {}

  def loss(params):
    out = model.apply(dict(v, params=params), *args, **kw)
    out = out[0] if kwargs else out
    return jnp.sum(jnp.sin(out))

  grads = flatten_dict(jax.jit(jax.grad(loss))(v["params"]))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
  for k, g in grads.items():
    if k[-1] in ("kernel", "kernel_lsq_step", "input_lsq_step"):
      assert float(jnp.abs(g).sum()) > 0, k


# ---------------------------------------------------------------------------
# Rules: first match, unused, refused, not quantizable.
# ---------------------------------------------------------------------------

MLP_X = CASES["mlp"][1]


def test_first_match_wins_and_unused_rules_are_reported():
  model = quantize_model(MLP(), [("Dense_0", LSQ), ("Dense", W8A8),
                                 ("encoder", W8A8)])
  report = model.report(None, *MLP_X)
  assert {p: m.rule for p, m in report.layers.items()} == {
      "Dense_0": 0, "Dense_1": 1, "Dense_2": 1}
  assert report.unused == ("encoder",)
  assert model.unused_rules(None, *MLP_X) == ("encoder",)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *MLP_X)["params"]
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

  params = jax.eval_shape(Outer().init, jax.random.PRNGKey(0),
                          *MLP_X)["params"]
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
  cls, args, kwargs = CASES["cnn"]
  model = quantize_model(cls(), [("BatchNorm_0|Conv_0", W8A8_SIGNED)])
  with pytest.warns(UserWarning, match=r"'BatchNorm_0' \(BatchNorm\).*"
                    "cannot be quantized"):
    model.init(jax.random.PRNGKey(0), *args, **kwargs)
  report = model.report(None, *args, **kwargs)
  assert report.not_quantizable == {"BatchNorm_0": "BatchNorm"}
  assert report.quantized == ("Conv_0",)
  # A float rule on such a module is harmless.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    quantize_model(cls(), [("BatchNorm", FLOAT)]).init(
        jax.random.PRNGKey(0), *args, **kwargs)


def test_einsum_is_not_quantizable():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((12, 3), "bi,io->bo")(x)

  with pytest.warns(UserWarning, match=r"'Einsum_0' \(Einsum\)"):
    quantize_model(Model(), [(".*", W8A8)]).init(jax.random.PRNGKey(0),
                                                 *MLP_X)


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
  init = lambda layer, rules: quantize_model(  # noqa: E731
      Model(layer), rules).init(jax.random.PRNGKey(0), x)
  with pytest.raises(TypeError, match="own __call__"):
    init(Doubling(3), [("layer", W8A8)])
  init(Doubling(3), [("layer", FLOAT)])  # a float rule first is the way out
  with pytest.raises(ValueError, match="padding='CIRCULAR'"):
    init(nn.Conv(3, (3, 3), padding="CIRCULAR"), [("layer", W8A8)])
  with pytest.raises(ValueError, match="mask="):
    init(nn.Conv(3, (1, 1), mask=jnp.ones((1, 1, 2, 3))), [("layer", W8A8)])


def test_quantized_model_is_a_flax_module():
  model = quantize_model(MLP(), [(".*", W8A8)])
  assert isinstance(model, QuantizedModel) and isinstance(model, nn.Module)
