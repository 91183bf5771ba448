"""Tests for aqt_ext.models: shapes, parameter counts, per-layer quant, BN."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqt_ext.config import TensorQuant, parse_spec
from aqt_ext.cost import model_cost
from aqt_ext.models import FIRST_LAYER, LAST_LAYER, MODELS, create_model
from aqt_ext.models.resnet import CIFAR_DEPTHS, IMAGENET_STAGES


def _abstract_init(model, shape, train=False):
  """(logits, variables) as ShapeDtypeStructs: no compute."""
  x = jnp.zeros(shape, jnp.float32)
  return jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=train))


def _count(tree) -> int:
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,width,hw,classes", [
    ("resnet18", 0.25, 32, 7),
    ("resnet50", 0.25, 64, 11),
    ("cifar_resnet20", 1.0, 32, 10),
    ("cifar_resnet8", 0.5, 16, 100),
])
def test_output_shapes(name, width, hw, classes):
  model = create_model(name, num_classes=classes, width=width)
  logits, variables = _abstract_init(model, (2, hw, hw, 3))
  assert logits.shape == (2, classes) and logits.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}


def test_bf16_compute_keeps_float32_params_and_logits():
  model = create_model("cifar_resnet8", num_classes=10, dtype=jnp.bfloat16)
  logits, variables = _abstract_init(model, (2, 8, 8, 3))
  assert logits.dtype == jnp.float32
  assert {l.dtype for l in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def _depth(name: str) -> int:
  return int(re.search(r"\d+$", name).group())


def test_registry_names_and_depths():
  assert set(MODELS) == ({f"resnet{d}" for d in IMAGENET_STAGES}
                         | {f"cifar_resnet{d}" for d in CIFAR_DEPTHS})
  for name in MODELS:
    model = create_model(name, num_classes=10, width=0.25)
    hw = 8 if name.startswith("cifar") else 32
    layers = model_cost(model, (hw, hw, 3), train=False).layers
    main = [l for l in layers if not l.path.endswith("proj_conv")]
    proj = [l for l in layers if l.path.endswith("proj_conv")]
    assert len(main) == _depth(name), name  # weighted layers = depth
    # Projections where the shape changes: every stage of a bottleneck net,
    # stages 1.. of a basic net.
    assert len(proj) == (4 if _depth(name) in (26, 50, 101, 152, 200)
                         else 3 if name.startswith("resnet") else 2), name


def test_resnet50_parameter_count():
  model = create_model("resnet50", num_classes=1000)
  _, variables = _abstract_init(model, (1, 224, 224, 3))
  assert _count(variables["params"]) == 25_557_032


def _cifar_param_count(n: int, classes: int) -> int:
  """Hand count of CIFAR ResNet-(6n+2) with projection shortcuts."""
  conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
  bn = lambda c: 2 * c  # scale and bias  # noqa: E731
  total = conv(3, 3, 16) + bn(16)  # stem
  cin = 16
  for cout in (16, 32, 64):
    for _ in range(n):
      total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
      if cin != cout:
        total += conv(1, cin, cout) + bn(cout)
      cin = cout
  return total + 64 * classes + classes  # head kernel and bias


def test_cifar_resnet20_parameter_count():
  model = create_model("cifar_resnet20", num_classes=10)
  _, variables = _abstract_init(model, (1, 32, 32, 3))
  count = _count(variables["params"])
  assert count == _cifar_param_count(3, 10) == 272_474


def test_first_and_last_layer_rules():
  quant = parse_spec("w4a4_fl8", first=FIRST_LAYER, last=LAST_LAYER)
  for name, hw in (("cifar_resnet8", 8), ("resnet18", 32)):
    model = create_model(name, num_classes=10, width=0.25, quant=quant)
    bits = {l.path: (l.weight_bits, l.input_bits)
            for l in model_cost(model, (hw, hw, 3), train=False).layers}
    assert bits.pop("conv_init") == (8, 8)
    assert bits.pop("head") == (8, 8)
    assert set(bits.values()) == {(4, 4)}


def test_unknown_model_names_field_and_allowed_values():
  with pytest.raises(ValueError, match=r"model='resnet51'.*'resnet50'.*"
                     r"'cifar_resnet110'"):
    create_model("resnet51", num_classes=10)


@pytest.mark.parametrize("kw,msg", [
    ({"width": 0.0}, "width"),
    ({"width": 0.01}, "width"),
    ({"num_classes": 0}, "num_classes"),
])
def test_bad_fields(kw, msg):
  kw = {"num_classes": 10, **kw}
  with pytest.raises(ValueError, match=msg):
    _abstract_init(create_model("cifar_resnet8", **kw), (1, 8, 8, 3))


def _init(model, x):
  """Real init, jitted; an RBG key compiles much faster than threefry on CPU."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.key(0, impl="rbg"), x)


def _apply(model, variables, x, train):
  mutable = ["batch_stats"] if train else False
  return jax.jit(functools.partial(model.apply, train=train, mutable=mutable)
                 )(variables, x)


@pytest.fixture(scope="module")
def small():
  """A float CIFAR ResNet-8, a batch and its variables."""
  model = create_model("cifar_resnet8", num_classes=5, width=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  return model, x, _init(model, x)


@pytest.mark.parametrize("flag", [True, False])
def test_zero_init_residual_flag(small, flag):
  model, x, variables = small
  if not flag:
    variables = _init(model.clone(zero_init_residual=False), x)
  params = variables["params"]
  for block in ("stage0_block0", "stage1_block0", "stage2_block0"):
    np.testing.assert_array_equal(params[block]["bn2"]["scale"],
                                  0.0 if flag else 1.0)
    np.testing.assert_array_equal(params[block]["bn1"]["scale"], 1.0)


def test_quantized_forward(small):
  model, x, variables = small  # uniform quantizers add no variables
  quant = parse_spec("w4a4_fl8", first=FIRST_LAYER, last=LAST_LAYER)
  y_q, _ = _apply(model.clone(quant=quant), variables, x, train=True)
  y_f, _ = _apply(model, variables, x, train=True)
  assert y_q.shape == (4, 5) and np.all(np.isfinite(y_q))
  assert not np.allclose(y_q, y_f)


def test_batchnorm_train_vs_eval(small):
  # Float model: a dynamic per-tensor input quantizer would also couple the
  # examples of a batch.
  model, x, variables = small

  # Train: batch statistics; running averages updated in a mutable collection.
  y, updates = _apply(model, variables, x, train=True)
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  assert not np.allclose(old["bn_init"]["mean"], new["bn_init"]["mean"])
  y0, _ = _apply(model, variables, x[:1], train=True)
  assert not np.allclose(y0, y[:1], atol=1e-4)  # depends on the batch
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)  # the collection must be mutable

  # Eval: running averages, nothing updated, per-example outputs.
  y_eval = _apply(model, variables, x, train=False)
  np.testing.assert_allclose(_apply(model, variables, x[:1], train=False),
                             y_eval[:1], rtol=1e-5, atol=1e-5)


def test_residual_activation_quantizers():
  """``_r8``: the stem output, every branch output and projection
  shortcut before the add are quantized (8 bits, static range) by their
  `QuantAct`; the params are those of the model without them; in eval each
  one's output lies on its grid, and the float model's QuantActs are the
  identity (no variables)."""
  from aqt_ext import models  # pylint: disable=g-import-not-at-top
  from aqt_ext.core import quantizers as qz  # pylint: disable=g-import-not-at-top
  from aqt_ext.linen import QuantAct  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  quant = models.quant_spec("w4a4_fl8_static_r8")
  model = create_model("cifar_resnet8", num_classes=10, width=0.5,
                       quant=quant)
  v = model.init(jax.random.key(1), x, train=False)
  plain = create_model("cifar_resnet8", num_classes=10, width=0.5,
                       quant=models.quant_spec("w4a4_fl8_static"))
  v0 = plain.init(jax.random.key(1), x, train=False)
  assert jax.tree.map(np.shape, v["params"]) == jax.tree.map(np.shape,
                                                             v0["params"])
  stats = v["quant_stats"]
  acts = sorted("/".join(k[:-1]) for k in
                __import__("flax").traverse_util.flatten_dict(stats)
                if k[-1] == "input_amax" and k[-2].endswith("_quant"))
  assert acts == ["stage0_block0/branch_quant", "stage1_block0/branch_quant",
                  "stage1_block0/shortcut_quant",
                  "stage2_block0/branch_quant",
                  "stage2_block0/shortcut_quant"]
  assert "input_max" in stats["stem_quant"]  # unsigned: post-ReLU
  # Calibrate (BN scales made nonzero so that branches carry signal).
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.5 if "scale" in str(p) else a, v)
  _, upd = model.apply(v, x, train=True, mutable=["batch_stats",
                                                  "quant_stats"])
  v = {**v, **upd}
  seen = {}

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, QuantAct) and (
        context.method_name == "__call__"):
      seen["/".join(context.module.scope.path)] = (args[0], y)
    return y

  with __import__("flax").linen.intercept_methods(grab):
    model.apply(v, x, train=False)
  assert len(seen) == 6
  for path, (a, y) in seen.items():
    tq = quant.for_activation(path)
    st = __import__("flax").traverse_util.flatten_dict(v["quant_stats"])
    r = st[tuple(path.split("/")) + (
        "input_max" if tq.grid == "unsigned" else "input_amax",)]
    qp = qz.qparams_from_range({"max" if tq.grid == "unsigned" else "amax": r},
                               tq.grid, 8)
    np.testing.assert_array_equal(y, qz.fake_quant(a, qp))
    t = np.asarray(y) / np.asarray(qp.scale)
    np.testing.assert_allclose(t, np.round(t), atol=1e-3)
    assert not np.array_equal(y, a)
  # Float: the identity.
  fl = create_model("cifar_resnet8", num_classes=10, width=0.5)
  vf = fl.init(jax.random.key(1), x, train=False)
  assert "quant_stats" not in vf
  assert QuantAct().apply({}, x) is x
  with pytest.raises(ValueError, match="granularity='per_channel' is not "
                     "allowed for an activation quantizer"):
    QuantAct(TensorQuant("uniform", 8, granularity="per_channel")).init(
        jax.random.key(0), x)
