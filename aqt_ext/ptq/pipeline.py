"""Post-training quantization (PTQ) of a trained float checkpoint.

``run_ptq(config, checkpoint_dir, workdir)`` (CLI: ``python -m aqt_ext.ptq``):

1. Refuses a bad config before any work (`validate_ptq_config`), naming the
   field and its allowed values.
2. Loads the float checkpoint (`train.load_float_variables`) and checks it
   against the model the config names: the first variable (``params`` or
   ``batch_stats``; modules in the model's call order) whose shape differs,
   or that only one side has, is named with both shapes
   (`CheckpointMismatchError`).
3. Folds every BatchNorm into its conv (`bn_fold`).
4. Quantizes every conv and dense kernel whose layer has quantized weights in
   ``config.quant`` by ``config.ptq.method`` (below), at that layer's weight
   bits. The result is stored dequantized in ``params``; the model then runs
   with float weights (``TensorQuant('float')``) on those values.
5. Calibrates the static activation ranges of the layers' inputs on the first
   ``config.num_calibration_batches`` training batches (no augmentation),
   through the ``quant_stats`` collection of `aqt_ext.core.context`: ``ema`` (the
   layers' EMA, decay ``ptq.ema_decay``, first batch taken as is) or ``max``
   (the maximum over the batches of each batch's range).
6. Evaluates on the whole eval split (or ``config.num_eval_examples``) and
   writes ``workdir/result.json`` atomically.

Bits come from ``config.quant``, a `config.parse_spec` string without a
METHOD prefix: ``wWaA`` (e.g. ``w4a8``), optionally ``_flB`` (first and last
layer at B bits), or ``float``. Inputs are per-tensor uniform: unsigned after
a ReLU, signed (``full`` grid) for the first layer, as in QAT.

Methods (``config.ptq.method``):

* ``rtn``: round to nearest on the symmetric restricted grid
  +-(2^(b-1) - 1), scale absmax / (2^(b-1) - 1) per output channel or per
  tensor (``ptq.granularity``); with ``ptq.grid='full'`` on all 2^b levels
  [-2^(b-1), 2^(b-1) - 1], scale absmax / (2^(b-1) - 1/2) (the 16-level
  uniform baseline at 4 bits; the 15-level grid has (7.5/7)^2 = 1.15x its
  rounding MSE, so PWLQ's gain over uniform must be read against both).
* ``pwlq``: piecewise linear, per output channel (`pwlq.py`); breakpoint by
  ``ptq.breakpoint`` (``grid``, ``gaussian``, ``laplacian``, ``bisection``
  with ``ptq.prior``, or ``fixed``: p = ``ptq.breakpoint_ratio`` * max|w|,
  the ratio in (0, 1), i.e. p in (0, m)); ``ptq.bias_correction``.
* ``rex``: residual expansion of order K = ``ptq.order`` over ``rtn``
  (`rex.py`), group sparsity ``ptq.sparsity`` for the orders >= 2. Each
  layer's BOPs are multiplied by ``rex_bops_factor(K, s)`` through
  `cost.model_cost`'s multipliers. ``ptq.execution='sum'`` (the only one):
  each layer runs its K products on the same quantized input and adds them,
  i.e. it uses the kernel sum_k R_k (equal by linearity, up to float
  rounding). The ``ensemble`` execution was removed: its copies with the
  residual kernels R_k in every layer shrink layer after layer, so the sum
  of their logits was round to nearest (W4A8: copy-2 logits 2.3e-5 of copy
  1's, 100% of predictions equal to rtn; on a 2-layer linear net it dropped
  the cross terms). The papers' ensemble construction (REx's early arXiv
  versions, PIPE, arXiv 2311.15806) could not be read here; a faithful one
  must keep the first-order correction and be tested against the sum.

* ``aquant``: ``rtn`` weights; every quantized layer input is rounded with an
  AQuant border per input channel (`aquant.py`): initialised by
  ``init_border`` from the folded float and quantized kernels and, with
  ``ptq.learn_border``, fitted layer by layer in call order by
  ``learn_border`` (``border_steps`` Adam steps at ``border_lr``) on the
  first ``border_examples`` calibration images (`learn_borders`): layer l's
  input is captured from the quantized network whose layers before l
  already have their learned borders, and its target is the float
  network's output of layer l (the paper's framework: sequential, against
  the float outputs). The scale is the
  static range calibrated with borders 1/2 (round half up). Eval uses the
  hard border, inside the quantized layers: their inputs have
  ``rounding='border'`` (`aqt_ext.core.uniform.border_rounding`), with the
  per-channel ``input_border_alpha`` / ``input_border_beta`` of each layer
  in the ``aquant`` variable collection.

result.json has the keys of training's (eval_accuracy, eval_loss,
eval_examples, steps = 0, wall_time_s, config, cost, macs, bops,
weight_bits, devices, platform) plus ``method``, ``ptq`` (the options that
method uses), ``ptq_time_s`` (BN folding, weight quantization, calibration
and border learning, JIT compilation included; loading and eval excluded),
``checkpoint``, ``weight_mse`` (mean squared difference between the folded
float kernels and the kernels the network effectively uses, over all
quantized weights) and ``stored_weight_bits`` (weight memory with the
method's storage: PWLQ one region bit more per weight, REx the BOPs factor
times the b-bit memory; ``weight_bits`` counts b bits per weight).

``config.framework='nnx'`` runs the same steps on the NNX model of the
config (`train.NnxModel`): calibration with its quantizers' EMA running in
evaluation mode, the borders captured through `aqt_ext.nnx.intercept`,
eval. Its checkpoint is that of an NNX run, or a linen run's: both hold the
same variable tree. Shapes, module order and cost are read from the linen
twin (same paths, shapes and quantization).

`ptq_runner(method, **options)` gives a runner ``(config, workdir) ->
result`` that reads the float checkpoint from ``config.init_from``. (The
sweep, `aqt_ext.sweep`, sets ``config.ptq`` from its `PTQ_METHODS` table
instead, and calls `run_ptq`.)
"""

from __future__ import annotations

import copy
import functools
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from aqt_ext import cost as cost_lib
from aqt_ext import data as data_lib
from aqt_ext import models
from aqt_ext import nnx as aqt_nnx
from aqt_ext.core import quantizers as qz
from aqt_ext import train
from aqt_ext.config import LayerQuant, ModelQuant, parse_spec
from aqt_ext.core.context import AQUANT, STATS
from aqt_ext.linen.layers import QuantConv, QuantDense
from aqt_ext.ptq import aquant, bn_fold, pwlq, rex

METHODS = ("rtn", "pwlq", "rex", "aquant")
GRANULARITIES = ("per_channel", "per_tensor")
BREAKPOINTS = pwlq.METHODS + ("fixed",)
EXECUTIONS = ("sum",)
CALIBRATIONS = ("ema", "max")

Path = str  # '/'-joined module path, e.g. 'stage1_block0/conv2'
Model = Any  # a linen Module, or a `train.NnxModel` (config.framework='nnx')
Terms = list  # a layer's dequantized kernel terms (numpy): one, or K for REx
Runner = Callable[[ml_collections.ConfigDict, str], dict]


class CheckpointMismatchError(ValueError):
  """The float checkpoint does not fit the model the config names."""


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------

def ptq_defaults() -> ml_collections.ConfigDict:
  """The ``config.ptq`` fields and their defaults (module docstring)."""
  p = ml_collections.ConfigDict()
  p.method = "rtn"
  p.granularity = "per_channel"  # rtn; base quantizer of rex and aquant
  p.grid = "restricted"  # rtn, rex, aquant: 2^b - 1 levels, or 'full': 2^b
  p.breakpoint = "grid"  # pwlq
  p.breakpoint_ratio = 0.25  # pwlq with breakpoint='fixed': p / max|w|
  p.prior = "gaussian"  # pwlq with breakpoint='bisection'
  p.bias_correction = False  # pwlq
  p.order = 2  # rex: K
  p.sparsity = 0.0  # rex
  p.execution = "sum"  # rex
  p.learn_border = True  # aquant
  p.border_steps = 200
  p.border_lr = 1e-2
  p.border_examples = 256
  p.calibration = "ema"
  p.ema_decay = 0.9
  return p


def with_ptq_defaults(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """A copy of a training config with the PTQ fields it lacks added (field
  references kept, so that typed None fields stay overridable)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    if "num_calibration_batches" not in c:
      c.num_calibration_batches = 8
    if "ptq" not in c:
      c.ptq = ml_collections.ConfigDict()
    for key, value in ptq_defaults().items():
      if key not in c.ptq:
        c.ptq[key] = value
  return c


def _refuse(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"config.{field}={value!r} is not allowed; allowed "
                    f"values: {allowed}")


def _check_choice(field: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise _refuse(field, value, ", ".join(map(repr, allowed)))


def _check_bool(field: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise _refuse(field, value, "True, False")


def _check_int(field: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise _refuse(field, value, f"ints >= {low}")


def _check_interval(field: str, value: Any, low: float, high: float,
                    low_open: bool, note: str = "") -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (low < value if low_open else low <= value) and value < high
  if not ok:
    raise _refuse(field, value, f"{'(' if low_open else '['}{low}, {high})"
                  + note)


def spec_model_quant(quant: str) -> ModelQuant:
  """The bits of every layer: `parse_spec` of ``config.quant``, refused
  unless it is plain uniform (``float`` or ``wWaA[_flB]``)."""
  mq = models.quant_spec(quant)
  for lq in (mq.default, *(lq for _, lq in mq.rules)):
    if (lq.weight.method not in ("float", "uniform")
        or lq.input.method not in ("float", "uniform")
        or lq.input.granularity != "per_tensor"):
      raise _refuse("quant", quant, "'float' or 'wWaA[_flB]' without a "
                    "METHOD prefix (the PTQ method is config.ptq.method)")
  return mq


def validate_ptq_config(config: ml_collections.ConfigDict) -> ModelQuant:
  """Refuses a bad PTQ config before any work, naming the field; returns
  the per-layer bits (`spec_model_quant`)."""
  train.validate_config(config)
  spec = spec_model_quant(config.quant)
  p = config.ptq
  _check_choice("ptq.method", p.method, METHODS)
  _check_choice("ptq.granularity", p.granularity, GRANULARITIES)
  _check_choice("ptq.grid", p.grid, rex.GRIDS)
  _check_choice("ptq.breakpoint", p.breakpoint, BREAKPOINTS)
  _check_interval("ptq.breakpoint_ratio", p.breakpoint_ratio, 0.0, 1.0, True,
                  " exclusive: the breakpoint p = ratio * m must lie in "
                  "(0, m), m = max|w| of the output channel")
  _check_choice("ptq.prior", p.prior, pwlq.PRIORS)
  _check_bool("ptq.bias_correction", p.bias_correction)
  _check_int("ptq.order", p.order, 1)
  _check_interval("ptq.sparsity", p.sparsity, 0.0, 1.0, False)
  if p.execution == "ensemble":
    raise _refuse("ptq.execution", p.execution, "'sum' (the ensemble "
                  "execution was removed: it equalled round to nearest; see "
                  "aqt_ext.ptq.pipeline)")
  _check_choice("ptq.execution", p.execution, EXECUTIONS)
  _check_choice("ptq.calibration", p.calibration, CALIBRATIONS)
  _check_interval("ptq.ema_decay", p.ema_decay, 0.0, 1.0, False)
  _check_bool("ptq.learn_border", p.learn_border)
  _check_int("ptq.border_steps", p.border_steps, 1)
  _check_interval("ptq.border_lr", p.border_lr, 0.0, float("inf"), True)
  _check_int("ptq.border_examples", p.border_examples, 1)
  _check_int("num_calibration_batches", config.num_calibration_batches, 1)
  return spec


def _method_options(config: ml_collections.ConfigDict) -> dict:
  """The options the chosen method uses (for result tables)."""
  p = config.ptq
  fields = {"rtn": ["granularity", "grid"],
            "pwlq": ["breakpoint", "bias_correction"],
            "rex": ["granularity", "grid", "order", "sparsity", "execution"],
            "aquant": ["granularity", "grid", "learn_border"]}[p.method]
  if p.method == "pwlq" and p.breakpoint == "fixed":
    fields.append("breakpoint_ratio")
  if p.method == "pwlq" and p.breakpoint == "bisection":
    fields.append("prior")
  if p.method == "aquant" and p.learn_border:
    fields += ["border_steps", "border_lr", "border_examples"]
  fields.append("calibration")
  if p.calibration == "ema":
    fields.append("ema_decay")
  out = {f: p[f] for f in fields}
  out["num_calibration_batches"] = config.num_calibration_batches
  return out


# ---------------------------------------------------------------------------
# Model, checkpoint.
# ---------------------------------------------------------------------------

def _ptq_layer(lq: LayerQuant, ema_decay: float, border: bool
               ) -> LayerQuant:
  """Float weights (quantized offline); a quantized input gets a static
  range, and AQuant's border rounding with `border`."""
  if not lq.input.quantized:
    return LayerQuant()
  return LayerQuant(input=lq.input.replace(
      calibration="static", ema_decay=ema_decay,
      **({"rounding": "border"} if border else {})))


def ptq_model_quant(spec: ModelQuant, ema_decay: float,
                    border: bool = False) -> ModelQuant:
  """The ModelQuant the PTQ network runs with (see `_ptq_layer`)."""
  layer = functools.partial(_ptq_layer, ema_decay=ema_decay, border=border)
  return ModelQuant(default=layer(spec.default),
                    rules=tuple((p, layer(lq)) for p, lq in spec.rules))


def _create_model(config: ml_collections.ConfigDict, num_classes: int,
                  quant: ModelQuant) -> Model:
  """The PTQ network of the config's model: linen, or with
  ``config.framework='nnx'`` the NNX model as `train.NnxModel` runs it."""
  return train.create_model(config, num_classes, quant=quant)


def _linen(model: Model) -> nn.Module:
  """`model`, or the linen twin of an NNX model (same layers, paths,
  variable shapes and quantization: what shapes and costs are read from)."""
  return model.linen_twin if isinstance(model, train.NnxModel) else model


def init_shapes(model: Model, image_shape: Sequence[int]
                ) -> tuple[dict, list[Path]]:
  """(variable shapes of ``model.init``, module paths in call order), by
  tracing alone (no compute); of an NNX model, its linen twin's (the NNX
  variables have the twin's paths and shapes)."""
  model = _linen(model)
  order: list[Path] = []

  def record(next_fun, args, kwargs, context):
    path = "/".join(str(p) for p in context.module.scope.path)
    if context.method_name == "__call__" and path not in order:
      order.append(path)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), x)
  return shapes, order


def _shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
  return {"/".join(k): tuple(v.shape)
          for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def check_checkpoint(expected: Mapping, module_order: Sequence[Path],
                     variables: Mapping, checkpoint_dir: str, model: str
                     ) -> None:
  """Raises `CheckpointMismatchError` naming the first variable whose shape
  differs or that one side lacks, with both shapes. Compares ``params`` and
  ``batch_stats``; "first" follows the modules' call order in the model
  (then the checkpoint-only ones, sorted)."""
  def pick(tree):
    return {c: tree[c] for c in ("params", "batch_stats") if c in tree}

  def rank(path: str) -> tuple:
    module = "/".join(path.split("/")[1:-1])
    known = module in module_order
    return (not known, module_order.index(module) if known else 0, path)

  want, have = _shapes(pick(expected)), _shapes(pick(variables))
  for path in sorted(want.keys() | have.keys(), key=rank):
    if want.get(path) != have.get(path):
      show = lambda s: "absent" if s is None else str(s)  # noqa: E731
      raise CheckpointMismatchError(
          f"checkpoint {checkpoint_dir!r} does not match the model of the "
          f"config ({model}): first mismatching variable {path!r} has shape "
          f"{show(have.get(path))} in the checkpoint and "
          f"{show(want.get(path))} in the model")


# ---------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------

def rtn_quantizer(bits: int, granularity: str, grid: str = "restricted"
                  ) -> rex.Quantizer:
  """Round to nearest on +-(2^(b-1) - 1) (``restricted``, 2^b - 1 levels)
  or [-2^(b-1), 2^(b-1) - 1] (``full``, 2^b levels), absmax scale per
  output channel (last axis) or per tensor."""
  if granularity == "per_channel":
    return rex.channel_quantizer(bits, grid)

  def quantize(w: jax.Array) -> jax.Array:
    rng = qz.observe_range(w, grid, tuple(range(w.ndim)))
    return qz.fake_quant(w, qz.qparams_from_range(rng, grid, bits))

  return quantize


def _pwlq(w: jax.Array, bits: int, ptq: ml_collections.ConfigDict
          ) -> jax.Array:
  if ptq.breakpoint != "fixed":
    return pwlq.pwlq_quantize(w, bits, ptq.breakpoint, ptq.bias_correction,
                              ptq.prior)
  m, _ = pwlq.channel_stats(w)
  w_hat = pwlq.pwlq_fake_quant(w, ptq.breakpoint_ratio * m, bits)
  return pwlq.bias_correct(w, w_hat) if ptq.bias_correction else w_hat


@functools.lru_cache(maxsize=None)
def _rtn_expansion(bits: int, granularity: str, grid: str, order: int,
                   sparsity: float) -> Callable[[jax.Array], list[jax.Array]]:
  """Jitted REx expansion over `rtn_quantizer` (order 1: plain rtn), one
  compilation per kernel shape for all runs of a process."""
  base = rtn_quantizer(bits, granularity, grid)
  return jax.jit(lambda w: rex.rex_expand(w, order, base, sparsity))


def quantize_kernel(w: jax.Array, bits: int, ptq: ml_collections.ConfigDict
                    ) -> Terms:
  """The dequantized terms of one kernel (numpy): K for REx, else one."""
  if ptq.method == "pwlq":
    terms = [_pwlq(w, bits, ptq)]
  else:
    order = ptq.order if ptq.method == "rex" else 1
    terms = _rtn_expansion(bits, ptq.granularity, ptq.grid, order,
                           float(ptq.sparsity))(w)
  return [np.asarray(t) for t in terms]


def _kernels(params: Mapping) -> dict[Path, np.ndarray]:
  return {"/".join(k[:-1]): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(dict(params)).items()
          if k[-1] == "kernel"}


def quantize_params(params: Mapping, spec: ModelQuant,
                    ptq: ml_collections.ConfigDict) -> dict[Path, Terms]:
  """Terms of every kernel whose layer has quantized weights in `spec`."""
  out = {}
  for path, w in _kernels(params).items():
    lq = spec.for_path(path)
    if lq.weight.quantized:
      out[path] = quantize_kernel(w, lq.weight.bits, ptq)
  return out


def weight_mse(params: Mapping, terms: Mapping[Path, Terms]) -> float | None:
  """Mean of (w - sum_k R_k)^2 over all quantized weights (None if none)."""
  if not terms:
    return None
  kernels = _kernels(params)
  sq = sum(float(np.sum((kernels[p].astype(np.float64) - sum(t)) ** 2))
           for p, t in terms.items())
  return sq / sum(kernels[p].size for p in terms)


def _with_kernels(variables: Mapping, kernels: Mapping[Path, jax.Array]
                  ) -> dict:
  flat = flax.traverse_util.flatten_dict(dict(variables["params"]))
  for path, kernel in kernels.items():
    flat[(*path.split("/"), "kernel")] = kernel
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat)}


def member_variables(folded: Mapping, terms: Mapping[Path, Terms]
                     ) -> list[dict]:
  """Variables of the network(s) whose logits are summed: one, with each
  quantized kernel the sum of its terms."""
  return [_with_kernels(folded, {p: sum(t) for p, t in terms.items()})]


# ---------------------------------------------------------------------------
# Activations: calibration, AQuant.
# ---------------------------------------------------------------------------

def calibration_images(config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """The first ``num_calibration_batches`` training batches, unaugmented."""
  stream = data_lib.make_train_stream(
      config.dataset, config.batch_size, config.seed, config.data_dir,
      augment=False, num_examples=config.num_train_examples,
      validation_examples=config.validation_examples)
  return [stream.batch(i)["image"]
          for i in range(config.num_calibration_batches)]


def _max_ranges(per_batch: Sequence[Mapping]) -> dict:
  """Elementwise max over batches of each range (min for ``*_min``)."""
  def pick(path, *leaves):
    op = np.minimum if path[-1].key.endswith("_min") else np.maximum
    return functools.reduce(op, leaves)
  return jax.tree_util.tree_map_with_path(pick, *per_batch)


@functools.partial(jax.jit, static_argnames="model")
def _batch_ranges(variables: Mapping, x: jax.Array, *, model: nn.Module
                  ) -> dict:
  """``quant_stats`` after one calibration batch (static `model`: the
  compilation is shared by every run with an equal model)."""
  _, new = model.apply(variables, x, train=False, mutable=[STATS])
  return new[STATS]


def calibrate(model: nn.Module, members: Sequence[Mapping], init_stats: Mapping,
              images: Sequence[np.ndarray], mode: str) -> list[dict]:
  """Each member's variables with its ``quant_stats`` calibrated."""
  ranges = functools.partial(_batch_ranges, model=model)
  out = []
  for v in members:
    if mode == "ema":
      stats = init_stats
      for x in images:
        stats = ranges({**v, STATS: stats}, x)
    else:
      stats = _max_ranges([ranges({**v, STATS: init_stats}, x)
                           for x in images])
    out.append({**v, STATS: stats})
  return out


def _subtree(tree: Mapping, path: Path) -> Mapping:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _input_qparams(spec: ModelQuant, stats: Mapping, path: Path
                   ) -> qz.QParams:
  """The calibrated static quantization of the input of layer `path`."""
  tq = spec.for_path(path).input
  rng = {k.removeprefix("input_"): v for k, v in _subtree(stats, path).items()
         if k != "input_count"}
  return qz.qparams_from_range(rng, tq.grid, tq.bits)


def initial_borders(spec: ModelQuant, stats: Mapping, folded: Mapping,
                    terms: Mapping[Path, Terms]) -> dict[Path, dict]:
  """AQuant variables of every layer with a quantized input: the static
  scale, the grid's clip range and `aquant.init_border` (alpha, beta)."""
  out = {}
  for path, w in _kernels(folded["params"]).items():
    if not spec.for_path(path).input.quantized:
      continue
    qp = _input_qparams(spec, stats, path)
    w_hat = sum(terms[path]) if path in terms else w
    alpha, beta = aquant.init_border(w, w_hat)
    out[path] = {"scale": np.reshape(qp.scale, ()),
                 "qmin": np.float32(qp.qmin), "qmax": np.float32(qp.qmax),
                 "alpha": alpha, "beta": beta}
  return out


def nest_by_path(flat: Mapping[Path, dict]) -> dict:
  """``{'a/b': {name: x}}`` -> ``{'a': {'b': {name: x}}}`` (a collection)."""
  return flax.traverse_util.unflatten_dict(
      {(*p.split("/"), k): v for p, d in flat.items() for k, v in d.items()})


def with_borders(variables: Mapping, borders: Mapping[Path, dict]) -> dict:
  """`variables` with the layers' ``aquant`` collection set from `borders`
  (the ``alpha``, ``beta`` of `initial_borders` / `learn_borders`)."""
  return {**variables, AQUANT: nest_by_path(
      {p: {"input_border_alpha": b["alpha"], "input_border_beta": b["beta"]}
       for p, b in borders.items()})}


FloatOp = Callable[[jax.Array, jax.Array], jax.Array]  # (input, kernel) -> y


def capture_layer_inputs(model: Model, variables: Mapping,
                         images: np.ndarray,
                         paths: Sequence[Path] | None = None
                         ) -> tuple[dict[Path, jax.Array], dict[Path, FloatOp]]:
  """(input, the layer's bias-free float op of input and kernel) of the
  quantized layers at `paths` (default: every layer that rounds its input
  with a border), in one pass of the network with `variables`; the inputs
  in call order."""
  paths = None if paths is None else tuple(paths)
  inputs = _inputs(model, variables, images, paths)
  if isinstance(model, train.NnxModel):
    return inputs, _nnx_float_ops(model, variables, images, paths)
  layers = {}
  jax.eval_shape(functools.partial(_linen_run, model=model, paths=paths,
                                   layers=layers), variables, images)
  return inputs, {p: _linen_float_op(layer) for p, (layer, _) in
                  layers.items()}


def _wanted(paths: tuple[Path, ...] | None, path: Path,
            has_border: bool) -> bool:
  return has_border if paths is None else path in paths


def _linen_run(variables, images, *, model, paths, layers):
  def record(next_fun, args, kwargs, context):
    mdl = context.module
    if (context.method_name == "__call__"
        and isinstance(mdl, (QuantConv, QuantDense))):
      path = "/".join(str(p) for p in mdl.scope.path)
      if _wanted(paths, path, mdl.has_variable(AQUANT, "input_border_alpha")):
        layers[path] = (mdl.clone(parent=None, use_bias=False,
                                  quant=LayerQuant()), args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, images, train=False)
  return {p: inp for p, (_, inp) in layers.items()}


@functools.partial(jax.jit, static_argnames=("model", "paths"))
def _linen_inputs(variables, images, *, model, paths):
  return _linen_run(variables, images, model=model, paths=paths, layers={})


def _linen_float_op(layer: nn.Module) -> FloatOp:
  return lambda x, k: layer.apply({"params": {"kernel": k}}, x)


def _has_border(layer: Any) -> bool:
  return isinstance(getattr(layer, "input_border_alpha", None),
                    aqt_nnx.AQuantBorder)


@functools.partial(jax.jit, static_argnames=("model", "paths"))
def _nnx_inputs(variables, images, *, model, paths):
  """`capture_layer_inputs`' inputs of an NNX model, through
  `aqt_ext.nnx.intercept`."""
  inputs = {}

  def record(layer, *args, **kwargs):
    if _wanted(paths, layer.path, _has_border(layer)):
      inputs[layer.path] = args[0]
    return layer.quantized_call(*args, **kwargs)

  with aqt_nnx.intercept(record):
    model.apply(variables, images, train=False)
  return inputs


def _nnx_float_ops(model: train.NnxModel, variables: Mapping,
                   images: np.ndarray, paths: tuple[Path, ...] | None
                   ) -> dict[Path, FloatOp]:
  """The float ops of an NNX model's layers: a copy of the layer without
  quantization and bias, its kernel replaced."""
  ops = {}
  for path, layer in aqt_nnx.quant_layers(model.module(variables, images)):
    if _wanted(paths, path, _has_border(layer)):
      plain = nnx.clone(layer)
      plain.quant, plain.bias = LayerQuant(), None
      ops[path] = _nnx_float_op(*nnx.split(plain))
  return ops


def _nnx_float_op(graphdef: Any, state: Any) -> FloatOp:
  def op(x, k):
    layer = nnx.merge(graphdef, state)
    layer.kernel[...] = k
    return layer.quantized_call(x)
  return op


def learn_borders(model: Model, float_model: Model, variables: Mapping,
                  images: np.ndarray, borders: Mapping[Path, dict],
                  folded: Mapping, terms: Mapping[Path, Terms],
                  ptq: ml_collections.ConfigDict) -> dict[Path, dict]:
  """`aquant.learn_border` per layer, in call order, each against the float
  network's output of that layer.

  The float network (`float_model` on the folded float `folded`) gives each
  layer's float input x and target y = op(x, w). Layer l's input x_hat comes
  from the quantized network (`model`, `variables`) with the borders of the
  layers before it already learned (later layers do not change it), so a
  border also absorbs the error of the quantized layers before it.
  """
  paths = tuple(borders)
  x_float, ops = capture_layer_inputs(float_model, folded, images, paths)
  kernels = _kernels(folded["params"])
  out = dict(borders)
  for path in x_float:  # call order
    b = borders[path]
    inputs = _inputs(model, with_borders(variables, out), images, paths)
    w = kernels[path]
    w_hat = sum(terms[path]) if path in terms else w
    alpha, beta = aquant.learn_border(
        inputs[path], w, w_hat, b["scale"], ops[path], ptq.border_steps,
        ptq.border_lr, qmin=float(b["qmin"]), qmax=float(b["qmax"]),
        target=ops[path](x_float[path], w))
    out[path] = {**b, "alpha": alpha, "beta": beta}
    logging.info("aquant border of %s learned", path)
  return out


def _inputs(model: Model, variables: Mapping, images: np.ndarray,
            paths: tuple[Path, ...] | None) -> dict[Path, jax.Array]:
  """The inputs of the layers at `paths` (compiled once per model and
  paths)."""
  run = _nnx_inputs if isinstance(model, train.NnxModel) else _linen_inputs
  return run(variables, images, model=model, paths=paths)


def aquant_members(config: ml_collections.ConfigDict, model: Model,
                   float_model: Model,
                   spec: ModelQuant, calibrated: Mapping, folded: Mapping,
                   terms: Mapping[Path, Terms], images: Sequence[np.ndarray]
                   ) -> list[dict]:
  """The calibrated variables with every border initialised and, with
  ``ptq.learn_border``, learned (`model` rounds its inputs with them)."""
  ptq = config.ptq
  borders = initial_borders(spec, calibrated.get(STATS, {}), folded, terms)
  if ptq.learn_border and borders:
    x = np.concatenate(images)[:ptq.border_examples]
    borders = learn_borders(model, float_model,
                            with_borders(calibrated, borders), x, borders,
                            folded, terms, ptq)
  return [with_borders(calibrated, borders)]


# ---------------------------------------------------------------------------
# Evaluation, cost, the pipeline.
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "num_classes"))
def _eval_sums(members: Sequence[Mapping], batch: Mapping, *,
               model: nn.Module, num_classes: int) -> dict:
  """Masked sums as `train.evaluate` wants; the logits are summed over the
  members."""
  logits = sum(model.apply(v, batch["image"], train=False) for v in members)
  mask = batch["mask"]
  loss = train.cross_entropy(logits, batch["label"], num_classes, 0.0)
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss_sum": jnp.sum(loss * mask),
          "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def ptq_cost(config: ml_collections.ConfigDict, num_classes: int,
             image_shape: Sequence[int], spec: ModelQuant,
             terms: Mapping[Path, Terms]) -> tuple[dict, float]:
  """(cost dict as training's, stored weight bits) of the PTQ network."""
  ptq = config.ptq
  factor = (rex.rex_bops_factor(ptq.order, ptq.sparsity)
            if ptq.method == "rex" else 1.0)
  multipliers = {f"^{re.escape(p)}$": factor for p in terms}
  cost = cost_lib.model_cost(_linen(_create_model(config, num_classes, spec)),
                             tuple(image_shape), multipliers=multipliers,
                             train=False)
  region_bit = ptq.method == "pwlq"
  stored = sum(
      l.memory_bits * l.bops_multiplier
      * ((l.weight_bits + 1) / l.weight_bits if region_bit and l.path in terms
         else 1.0)
      for l in {l.path: l for l in cost.layers}.values())
  return cost.as_dict(), stored


def _zeros(shapes: Mapping) -> dict:
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def run_ptq(config: ml_collections.ConfigDict, checkpoint_dir: str | None,
            workdir: str) -> dict:
  """Quantizes a float checkpoint after training, evaluates, writes and
  returns ``workdir/result.json`` (module docstring).

  Args:
    config: a training config (model, dataset, ``quant`` bits) with the PTQ
      fields; missing ones take `ptq_defaults`.
    checkpoint_dir: workdir of the float training run (holding
      ``checkpoints/``); None reads ``config.init_from``.
    workdir: where result.json goes.
  """
  t_start = time.time()
  config = with_ptq_defaults(config)
  spec = validate_ptq_config(config)
  checkpoint_dir = checkpoint_dir or config.init_from
  if not checkpoint_dir:
    raise ValueError("no float checkpoint: pass checkpoint_dir (CLI "
                     "--checkpoint) or set config.init_from")
  ptq = config.ptq
  info = data_lib.get_info(config.dataset, config.data_dir)
  model = _create_model(config, info.num_classes, ptq_model_quant(
      spec, ptq.ema_decay, border=ptq.method == "aquant"))
  shapes, module_order = init_shapes(model, info.image_shape)
  float_vars = train.load_float_variables(checkpoint_dir)
  check_checkpoint(shapes, module_order, float_vars, checkpoint_dir,
                   f"model={config.model!r}, width={config.width!r}")
  data_lib.ensure_prepared(config.dataset, config.data_dir)

  t_ptq = time.time()
  folded = bn_fold.fold_batch_norm(float_vars, _linen(model).bn_epsilon)
  terms = quantize_params(folded["params"], spec, ptq)
  members = member_variables(folded, terms)
  images = calibration_images(config)
  if AQUANT in shapes:  # borders 1/2 (alpha = beta = 0) while calibrating
    members = [{**m, AQUANT: _zeros(shapes[AQUANT])} for m in members]
  if STATS in shapes:
    members = calibrate(model, members, _zeros(shapes[STATS]), images,
                        ptq.calibration)
  if ptq.method == "aquant":
    members = aquant_members(
        config, model, _create_model(config, info.num_classes, ModelQuant()),
        spec, members[0], folded, terms, images)
  ptq_time = time.time() - t_ptq
  logging.info("PTQ %s (%s) done in %.1f s; evaluating", ptq.method,
               config.quant, ptq_time)

  eval_fn = functools.partial(_eval_sums, model=model,
                              num_classes=info.num_classes)
  result = train.evaluate(members, eval_fn, config, lambda batch: batch)
  cost, stored_bits = ptq_cost(config, info.num_classes, info.image_shape,
                               spec, terms)
  result.update(
      steps=0, method=ptq.method, ptq=_method_options(config),
      ptq_time_s=round(ptq_time, 2),
      wall_time_s=round(time.time() - t_start, 2),
      checkpoint=checkpoint_dir, weight_mse=weight_mse(folded["params"],
                                                       terms),
      stored_weight_bits=stored_bits, config=config.to_dict(), cost=cost,
      devices=jax.device_count(), platform=jax.devices()[0].platform)
  result.update({k: cost[k] for k in ("macs", "bops", "weight_bits")})
  if jax.process_index() == 0:
    train.write_json_atomic(os.path.join(workdir, "result.json"), result)
  logging.info("PTQ %s %s: eval accuracy %.4f", ptq.method, config.quant,
               result["eval_accuracy"])
  return result


def ptq_runner(method: str, **options: Any) -> Runner:
  """A sweep runner ``(config, workdir) -> result`` for one PTQ method.

  It sets ``config.ptq.method = method`` and ``config.ptq.<k> = v`` for the
  `options`, and quantizes the float checkpoint in ``config.init_from``
  (which must match the config's model and width).
  """
  _check_choice("ptq.method", method, METHODS)

  def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    c = with_ptq_defaults(config)
    c.ptq.method = method
    for key, value in options.items():
      c.ptq[key] = value
    return run_ptq(c, None, workdir)

  return run


__all__ = ["METHODS", "CheckpointMismatchError", "ptq_defaults",
           "with_ptq_defaults", "validate_ptq_config", "run_ptq",
           "ptq_runner", "quantize_kernel", "quantize_params",
           "member_variables"]
