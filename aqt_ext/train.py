"""Quantization-aware training: the importable training loop.

Follows flax/examples/imagenet: `train_and_evaluate(config, workdir)` trains
the model the config names, evaluates it, checkpoints with orbax, resumes
from the latest checkpoint when rerun, and writes ``workdir/result.json``.

* Data parallel over all devices with `jax.sharding` (a 1-D ``data`` mesh):
  the batch is split along it, the state is replicated. Multi-host runs call
  `jax.distributed.initialize` in `main.py`; each host feeds its slice.
* Training data are a pure function of (seed, step), so the data position of a
  resumed run is its step; the only RNG is the init key, saved with the state.
* Quantizer state (``quant_stats``) and learned quantizer parameters train with
  the model; their auxiliary losses (``quant_losses``) add to the loss.
* ``config.framework`` picks the Flax API of the model: ``linen`` (default)
  or ``nnx``. An NNX model runs in the same loop, seen functionally
  (`NnxModel`): its state is kept as pure dicts with the linen model's paths,
  so the steps, optimizer, checkpoints and resume are the same code.
* The config is checked before any work (`validate_config`) and saved as
  ``workdir/config.json`` when the run starts; a rerun in a workdir that
  holds a model must agree with it on `TRAINING_FIELDS` (`check_resume`).
"""

from __future__ import annotations

import functools
import json
import logging as py_logging
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aqt_ext import fileio, metric_writer
from aqt_ext import cost as cost_lib
from aqt_ext import data as data_lib
from aqt_ext import models
from aqt_ext import nnx as aqt_nnx
from aqt_ext.core.contract import QUANT_RNG
from aqt_ext.core.methods import REGISTRY

# Learned quantizer parameters, and those of them under weight decay (with
# every kernel), as the method registry names them.
QUANT_PARAM_RE = REGISTRY.learned_param_re()
DECAY_PARAM_RE = re.compile(r"(^|/)kernel$|" + REGISTRY.decayed_param_re(
).pattern)
OPTIMIZERS = ("sgd", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class ResumeConfigError(ValueError):
  """A rerun's config differs from the one that trained the workdir's model
  (`check_resume`)."""


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  quant_stats: Any
  opt_state: Any
  rng: jax.Array
  apply_fn: Any = struct.field(pytree_node=False)
  tx: Any = struct.field(pytree_node=False)

  def variables(self, params=None) -> dict:
    v = {"params": self.params if params is None else params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    if self.quant_stats:
      v["quant_stats"] = self.quant_stats
    return v


# ---------------------------------------------------------------------------
# Config -> model, optimizer.
# ---------------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses a bad training config, naming the field and its allowed values.

  `train_and_evaluate` calls it first, before anything is read or written;
  it also checks that the run has at least one training step (the number of
  training examples comes from `data.get_info`, which reads no data).
  """
  def refuse(field, allowed):
    raise ValueError(f"config.{field}={config[field]!r} is out of range; "
                     f"allowed: {allowed}")

  def choice(field, allowed):
    if config[field] not in allowed:
      raise ValueError(f"config.{field}={config[field]!r} is not allowed; "
                       f"allowed values: {', '.join(map(repr, allowed))}")

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  def integer(field, low, optional=False):
    v = config[field]
    if not ((optional and v is None) or (is_int(v) and v >= low)):
      refuse(field, f"an int >= {low}" + (" or None" if optional else ""))

  def number(field, low, low_open=False, high=math.inf):
    v = config[field]
    ok = (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
          and math.isfinite(v) and (v > low if low_open else v >= low)
          and v < high)
    if not ok:
      refuse(field, f"a finite number {'>' if low_open else '>='} {low}"
             + (f" and < {high}" if high != math.inf else ""))

  choice("framework", models.FRAMEWORKS)
  choice("optimizer", OPTIMIZERS)
  choice("dtype", tuple(DTYPES))
  choice("model", tuple(models.MODELS))
  choice("dataset", data_lib.DATASETS)
  for field in ("batch_size", "eval_batch_size", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints"):
    integer(field, 1)
  integer("eval_every_steps", 0)  # 0: evaluate only at the end
  integer("seed", 0)
  integer("num_train_examples", 1, optional=True)
  integer("num_eval_examples", 1, optional=True)
  integer("validation_examples", 0)
  choice("eval_split", data_lib.EVAL_SPLITS)
  if config.eval_split == "validation" and not config.validation_examples:
    refuse("eval_split", "'test', or 'validation' with "
           "config.validation_examples >= 1 (the held-out training examples "
           "it evaluates on)")
  number("num_epochs", 0, low_open=True)
  number("width", 0, low_open=True)
  for field in ("learning_rate", "weight_decay", "warmup_epochs",
                "quant_lr_multiplier"):
    number(field, 0)
  number("momentum", 0, high=1)
  number("label_smoothing", 0, high=1)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % jax.device_count():
      raise ValueError(f"config.{field}={config[field]} must be a multiple "
                       f"of the device count ({jax.device_count()})")
  # Raises on a bad spec, with the first/last-layer rules the model uses.
  models.quant_spec(config.quant)
  info = data_lib.get_info(config.dataset, config.data_dir)
  try:  # a hold-out that leaves no training data, or overlaps it
    data_lib.train_split(config.dataset, config.data_dir,
                         config.num_train_examples, config.validation_examples)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  kept = info.num_train - config.validation_examples
  examples = (kept if config.num_train_examples is None
              else min(config.num_train_examples, kept))
  steps_per_epoch = examples // config.batch_size
  if steps_per_epoch == 0:
    refuse("batch_size", f"1..{examples} (the number of training examples)")
  if int(config.num_epochs * steps_per_epoch) == 0:
    refuse("num_epochs", f">= 1/{steps_per_epoch}, at least one training "
           f"step ({steps_per_epoch} steps per epoch of {examples} examples "
           f"at batch_size {config.batch_size})")


# The collections an NNX model's state is kept in, as pure nested dicts with
# the linen variables' paths, by Variable type (``aquant``: the AQuant borders
# of a PTQ network, `aqt_ext.ptq`; training keeps the first three).
NNX_COLLECTIONS: dict[str, type[nnx.Variable]] = {
    "params": nnx.Param, "batch_stats": nnx.BatchStat,
    "quant_stats": aqt_nnx.QuantStat, "aquant": aqt_nnx.AQuantBorder}


def nnx_variables(model: nnx.Module) -> dict:
  """The state of an NNX model as linen variables: ``{collection: pure
  dict}`` for each of `NNX_COLLECTIONS`; refuses other Variable types (the
  loop would not keep them)."""
  _, *states, rest = nnx.split(model, *NNX_COLLECTIONS.values(), ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(v).__name__ for v in jax.tree.leaves(
        rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
    raise TypeError(f"the NNX model holds Variables of types {kinds}, which "
                    "training does not keep; allowed: "
                    f"{', '.join(t.__name__ for t in NNX_COLLECTIONS.values())}")
  return {c: nnx.to_pure_dict(s) for c, s in zip(NNX_COLLECTIONS, states)}


def _update_static_ranges(model: nnx.Module) -> None:
  """Every quantizer of `model` (layers and activation quantizers) updates
  its static ranges in the next passes (BatchNorm stays in eval mode)."""
  for _, q in (*aqt_nnx.quant_layers(model), *aqt_nnx.quant_acts(model)):
    q.use_running_average = False


class NnxModel:
  """An NNX model as the loop sees a model: linen's ``init`` and ``apply``.

  The loop is functional (`TrainState`, `train_step`, `eval_step`); an NNX
  model runs in it as its graphdef and state: `apply` merges the graphdef
  with the variables (`nnx.merge` of `NNX_COLLECTIONS`' pure dicts), puts
  the model in training or evaluation mode (``model.train()`` /
  ``model.eval()``: BatchNorm statistics and static quantizer ranges update
  in training only), calls it, and splits the updated ``batch_stats`` /
  ``quant_stats`` back, with the auxiliary losses the pass recorded
  (`aqt_ext.nnx.QuantLoss`, popped) as ``quant_losses``. The variables have
  the linen twin's paths and shapes, so the optimizer (its path-based
  weight-decay and learning-rate masks), the checkpoints (orbax, of the NNX
  state as pure dicts), resume and ``init_from`` are those of linen.

  Args:
    make: ``make(rngs, in_features)``, the (quantized) NNX model for
      `in_features` input channels, parameters from `rngs`.
    linen_twin: the linen model of the same architecture and quantization
      (`model_cost` measures it: same layers, paths and `LayerQuant`s).
  """

  def __init__(self, make: Any, linen_twin: Any = None):
    self.make = make
    self.linen_twin = linen_twin
    self._graphdefs: dict = {}

  def build(self, rng, x, float_variables=None) -> nnx.Module:
    """The NNX model with parameters from `rng` and its quantizer variables
    created from `x` by `aqt_ext.nnx.init` in evaluation mode (as linen's
    ``init(..., train=False)``), or with `float_variables`' params and
    batch_stats loaded unchanged and its quantizer variables created as
    `initial_variables` does for linen; returned in training mode."""
    model = self.make(nnx.Rngs(params=rng), x.shape[-1])
    if float_variables:
      have = set(flax.traverse_util.flatten_dict(nnx.to_pure_dict(
          nnx.state(model))))
      extra = sorted("/".join(k) for c in float_variables.values()
                     for k in flax.traverse_util.flatten_dict(c)
                     if k not in have)
      if extra:
        raise ValueError(
            f"the float variables hold {len(extra)} variables the float NNX "
            f"model lacks (e.g. {', '.join(extra[:3])}); allowed: a float "
            "model's params and batch_stats")
      nnx.update(model, *float_variables.values())
    model.eval()
    if float_variables:
      # As linen's ``apply(floats, x, train=False, mutable=[params,
      # batch_stats, quant_stats])``: BatchNorm on its loaded averages, the
      # quantizer parameters created from the loaded kernels and `x`, the
      # static ranges calibrated on `x` once; auxiliary losses dropped.
      _update_static_ranges(model)
      aqt_nnx.set_paths(model)
      model(x)
      nnx.pop(model, aqt_nnx.QuantLoss)
    else:
      aqt_nnx.init(model, x)
    model.train()
    self._graphdefs.setdefault(self._key(x), nnx.graphdef(model))
    return model

  def init(self, rng, x, float_variables=None) -> dict:
    """`nnx_variables` of `build` (jitted)."""
    return jax.jit(lambda r, x, f: nnx_variables(self.build(r, x, f)))(
        rng, x, float_variables)

  @staticmethod
  def _key(x) -> tuple:
    return tuple(x.shape[1:]), jnp.dtype(x.dtype)

  def graphdef(self, x) -> Any:
    """The graphdef of `build` for inputs like `x` (abstract, cached)."""
    key = self._key(x)
    if key not in self._graphdefs:
      like = jax.ShapeDtypeStruct((1, *key[0]), key[1])
      nnx.eval_shape(lambda x: self.build(jax.random.key(0), x), like)
    return self._graphdefs[key]

  def module(self, variables: dict, x) -> nnx.Module:
    """The stateful NNX model holding `variables`, for inputs like `x`."""
    return nnx.merge(self.graphdef(x), *(variables.get(c, {})
                                         for c in NNX_COLLECTIONS))

  def apply(self, variables: dict, x, train: bool = False, mutable=False,
            rngs: dict | None = None):
    """Linen's ``apply``: the output, and with `mutable` (collection names)
    also those collections after the pass. As in linen, evaluation with
    ``quant_stats`` mutable updates the static ranges (PTQ calibration:
    BatchNorm on its averages, the quantizers' EMA running). ``rngs['quant']``
    seeds stochastic rounding in the backward pass (`aqt_nnx.quant_key`)."""
    model = self.module(variables, x)
    if train:
      model.train()
    else:
      model.eval()
      if mutable and "quant_stats" in mutable:
        _update_static_ranges(model)
    if rngs and QUANT_RNG in rngs:
      with aqt_nnx.quant_key(rngs[QUANT_RNG]):
        y = model(x)
    else:
      y = model(x)
    if not mutable:
      return y
    losses = nnx.to_pure_dict(nnx.pop(model, aqt_nnx.QuantLoss))
    new = {**nnx_variables(model), "quant_losses": losses}
    return y, {c: new[c] for c in mutable if c in new}


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 quant: Any = None):
  """The linen model of the config, or its `NnxModel` (config.framework);
  quantized by `quant` (a ModelQuant), else by ``config.quant``."""
  if quant is None:
    quant = models.quant_spec(config.quant)
  kwargs = dict(num_classes=num_classes, width=config.width, quant=quant,
                dtype=DTYPES[config.dtype])
  linen = models.create_model(config.model, **kwargs)
  if config.framework == "linen":
    return linen
  if config.framework != "nnx":
    raise ValueError(f"config.framework={config.framework!r} is not allowed; "
                     f"allowed values: {', '.join(map(repr, models.FRAMEWORKS))}")
  return NnxModel(lambda rngs, in_features: models.create_model(
      config.model, framework="nnx", rngs=rngs, in_features=in_features,
      **kwargs), linen_twin=linen)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup then cosine decay to zero."""
  total = int(config.num_epochs * steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(warmup, 1), max(total, warmup + 1), 0.0)


def _path_labels(params, fn):
  return flax.traverse_util.path_aware_map(
      lambda path, _: fn("/".join(path)), params)


def create_optimizer(config, schedule: optax.Schedule, params
                     ) -> optax.GradientTransformation:
  """SGD (Nesterov) or AdamW; weight decay on kernels (and PACT clips) only;
  quantizer parameters optionally at their own learning-rate multiple."""
  decay_mask = _path_labels(params, lambda p: bool(DECAY_PARAM_RE.search(p)))

  def make(lr):
    if config.optimizer == "sgd":
      return optax.chain(
          optax.add_decayed_weights(config.weight_decay, decay_mask),
          optax.sgd(lr, momentum=config.momentum, nesterov=config.nesterov))
    return optax.adamw(lr, weight_decay=config.weight_decay, mask=decay_mask)

  if config.quant_lr_multiplier == 1.0:
    return make(schedule)
  labels = _path_labels(
      params, lambda p: "quant" if QUANT_PARAM_RE.search(p) else "model")
  qsched = lambda s: schedule(s) * config.quant_lr_multiplier  # noqa: E731
  return optax.multi_transform({"model": make(schedule), "quant": make(qsched)},
                               labels)


# ---------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------

def cross_entropy(logits, labels, num_classes: int, smoothing: float):
  onehot = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


# Folded into the run's key for the per-step keys of stochastic rounding.
_SR_STREAM = 0x5352


def train_step(state: TrainState, batch, *, num_classes, label_smoothing,
               schedule):
  # Stochastic rounding in a quantized backward pass draws from the 'quant'
  # stream: one key per step, reproducible from the seed (and on resume).
  quant_key = jax.random.fold_in(jax.random.fold_in(state.rng, _SR_STREAM),
                                 state.step)

  def loss_fn(params):
    logits, new = state.apply_fn(
        state.variables(params), batch["image"], train=True,
        mutable=["batch_stats", "quant_stats", "quant_losses"],
        rngs={QUANT_RNG: quant_key})
    ce = cross_entropy(logits, batch["label"], num_classes,
                       label_smoothing).mean()
    aux = sum(jnp.sum(x) for x in jax.tree.leaves(new.get("quant_losses",
                                                          {})))
    return ce + aux, (logits, new, ce)

  (loss, (logits, new, ce)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(step=state.step + 1, params=params,
                        opt_state=opt_state,
                        batch_stats=new.get("batch_stats", state.batch_stats),
                        quant_stats=new.get("quant_stats", state.quant_stats))
  metrics = {"loss": loss, "cross_entropy": ce,
             **_split_norms("grad_norm", grads),
             **_split_norms("param_norm", params),
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "learning_rate": schedule(state.step - 1)}
  return state, metrics


def eval_step(state: TrainState, batch, *, num_classes):
  logits = state.apply_fn(state.variables(), batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss_sum": jnp.sum(loss * mask),
          "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


# ---------------------------------------------------------------------------
# State creation, float init, checkpoints.
# ---------------------------------------------------------------------------

def initial_variables(model, batch, rng, float_variables=None) -> dict:
  """Initialises from a real batch (LSQ / DQ init is data-driven).

  With `float_variables` (a float model's params and batch_stats), those
  are loaded unchanged and only the quantizer parameters the float model
  lacks are created, from the loaded kernels and the batch. An `NnxModel`
  does the same (`NnxModel.build`); either framework loads the other's
  float checkpoint (same paths).
  """
  if isinstance(model, NnxModel):
    return model.init(rng, batch, float_variables)
  if float_variables is None:
    return jax.jit(functools.partial(model.init, train=False))(
        {"params": rng}, batch)
  fn = functools.partial(model.apply, train=False,
                         mutable=["params", "batch_stats", "quant_stats"],
                         rngs={"params": rng})
  _, variables = jax.jit(fn)(dict(float_variables), batch)
  return variables


def create_state(config, model, batch, steps_per_epoch, float_variables=None
                 ) -> tuple[TrainState, optax.Schedule]:
  rng = jax.random.PRNGKey(config.seed)
  variables = initial_variables(model, batch, rng, float_variables)
  variables = flax.core.unfreeze(variables)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = create_optimizer(config, schedule, variables["params"])
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      quant_stats=variables.get("quant_stats", {}),
      opt_state=tx.init(variables["params"]), rng=rng,
      apply_fn=model.apply, tx=tx)
  return state, schedule


# The config fields that define a trained model: what it is and how every
# step trained it. A workdir's model (its checkpoints, its result.json) was
# trained by the config saved in it (CONFIG_FILE); a rerun in that workdir
# resumes or re-evaluates that model and must agree on these fields
# (`check_resume`). The others (data_dir, evaluation, logging and checkpoint
# cadence) say where data are read and how the run is evaluated, logged and
# checkpointed, and may change between runs of one workdir.
TRAINING_FIELDS = ("dataset", "num_train_examples", "validation_examples",
                   "augment", "framework",
                   "model",
                   "width", "quant", "dtype", "init_from", "seed",
                   "optimizer", "learning_rate", "momentum", "nesterov",
                   "weight_decay", "label_smoothing", "warmup_epochs",
                   "num_epochs", "batch_size", "quant_lr_multiplier")
# Training fields added after workdirs were saved, with the value every
# earlier run had: a saved config that lacks one is compared as that value.
LEGACY_DEFAULTS = {"framework": "linen", "validation_examples": 0}
CONFIG_FILE = "config.json"  # in the workdir, next to checkpoints/
RESULT_FILE = "result.json"


def _plain(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def _has_checkpoint(workdir: str) -> bool:
  directory = _checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"{path} cannot be read ({type(e).__name__}: {e}); it records the "
        "config that trained this workdir's model. Restore it, or use another "
        "--workdir.") from e


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a rerun in `workdir` whose `TRAINING_FIELDS` differ from those
  of the config that trained the model there, naming each differing field
  with its saved and its new value.

  A workdir holds a trained model once it has a checkpoint or a result.json;
  its config is the CONFIG_FILE that `save_config` wrote at the start of its
  first run (or, for a workdir without one, result.json's ``config``). A
  workdir with no model is not checked. Fields the saved config lacks are
  not compared, but those of `LEGACY_DEFAULTS`, which take their value there.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  result_path = os.path.join(workdir, RESULT_FILE)
  if not (_has_checkpoint(workdir) or os.path.exists(result_path)):
    return
  if os.path.exists(config_path):
    saved, source = _read_json(config_path), config_path
  elif os.path.exists(result_path):
    result = _read_json(result_path)
    saved = result.get("config") if isinstance(result, dict) else None
    source = result_path
  else:
    saved, source = None, None
  if not isinstance(saved, dict):
    raise CheckpointError(
        f"{workdir} holds a trained model (checkpoints or {RESULT_FILE}) but "
        f"records no config that trained it (no {CONFIG_FILE}, no "
        f"{RESULT_FILE} with a 'config'), so a rerun there cannot be checked. "
        "Use another --workdir, or delete the checkpoints and result to start "
        "afresh.")
  saved = {**LEGACY_DEFAULTS, **saved}
  missing = object()
  diff = [f for f in TRAINING_FIELDS
          if saved.get(f, missing) is not missing
          and saved[f] != _plain(config.get(f))]
  if diff:
    details = "; ".join(f"config.{f}: {saved[f]!r} saved, "
                        f"{_plain(config.get(f))!r} now" for f in diff)
    raise ResumeConfigError(
        f"{workdir} holds a model trained with another config ({details}; "
        f"saved in {source}). Rerunning there resumes or re-evaluates that "
        "model, so these fields must be the saved ones: rerun with them, or "
        "use another --workdir.")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the config to ``workdir/CONFIG_FILE`` (atomically) unless the
  workdir already holds a model, whose config it then keeps (`check_resume`
  has checked the rerun against it)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) and (_has_checkpoint(workdir) or os.path.exists(
      os.path.join(workdir, RESULT_FILE))):
    return
  write_json_atomic(path, config.to_dict())


def _checkpoint_dir(workdir: str) -> str:
  # orbax needs an absolute path (a relative one fails at the first save).
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _checkpoint_manager(workdir: str, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options)


def _ckpt_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "quant_stats": state.quant_stats,
          "opt_state": state.opt_state, "rng": state.rng}


def save_checkpoint(mgr, state: TrainState) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = int(state.step)
  if mgr.latest_step() == step:
    return
  mgr.save(step, args=ocp.args.StandardSave(_ckpt_tree(state)))
  mgr.wait_until_finished()


def _is_closed_loop_echo(exc: BaseException | None) -> bool:
  """Whether `exc` is asyncio's 'Event loop is closed' from
  ``call_soon_threadsafe`` (a callback scheduled on a loop already closed)."""
  if not (isinstance(exc, RuntimeError)
          and str(exc) == "Event loop is closed"):
    return False
  tb = exc.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


class _AbandonedReadFilter(py_logging.Filter):
  """Drops asyncio's 'exception was never retrieved' for orbax / TensorStore
  reads (see `silence_aborted_restore_echoes`)."""

  MARKERS = ("/orbax/", "tensorstore")

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and any(m in message for m in self.MARKERS))


def _drop_closed_loop_echoes() -> None:
  """Wraps `sys.unraisablehook` (unless it is wrapped already) to drop
  `_is_closed_loop_echo` exceptions: a callback that reached an event loop
  after it was closed, whose operation was abandoned and its error reported
  where it was awaited."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_echoes", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_echo(unraisable.exc_value):
      previous(unraisable)

  hook.drops_closed_loop_echoes = True
  sys.unraisablehook = hook


def silence_aborted_restore_echoes() -> None:
  """Hides the echoes of a failed orbax restore; its error is kept.

  When one array of a checkpoint cannot be read, orbax raises that error and
  closes its event loop while TensorStore still completes the reads of the
  other arrays; each completion then fails to schedule its callback on the
  closed loop and is printed as an unraisable ``RuntimeError: Event loop is
  closed`` (one traceback per array), and asyncio logs each abandoned read
  as 'Task exception was never retrieved'. This drops those two kinds of
  message (and nothing else) for the rest of the process. `_restore`
  installs the first filter before every restore (the echoes can start as
  soon as orbax closes its loop, before its error reaches the caller) and
  calls this on the error path, just before the `CheckpointError` that
  reports the first error (the abandoned reads are logged later, when they
  are garbage collected).
  """
  _drop_closed_loop_echoes()
  logger = py_logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadFilter) for f in logger.filters):
    logger.addFilter(_AbandonedReadFilter())


def _restore(mgr, step: int, args, what: str, remedy: str):
  """``mgr.restore(step, args)``; a CheckpointError naming `what`, the
  folder and the `remedy` if the checkpoint cannot be read."""
  _drop_closed_loop_echoes()
  try:
    return mgr.restore(step, args=args)
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    silence_aborted_restore_echoes()
    raise CheckpointError(
        f"{what}: the checkpoint at step {step} in "
        f"{os.path.join(os.fspath(mgr.directory), str(step))} cannot be "
        f"restored ({type(e).__name__}: {e}). {remedy}") from e


def restore_checkpoint(mgr, state: TrainState) -> TrainState:
  """Restores the latest checkpoint into `state`; clear error if unreadable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = mgr.latest_step()
  if step is None:
    return state
  tree = _restore(
      mgr, step, ocp.args.StandardRestore(_ckpt_tree(state)),
      f"resuming the run in {mgr.directory}",
      f"Refusing to start afresh over it (step {step}): delete that step's "
      "folder to resume from an earlier one, or use another --workdir.")
  return state.replace(**tree)


def load_float_variables(workdir: str) -> dict:
  """Params and batch_stats of the latest checkpoint of a (float) run."""
  return load_variables(
      workdir, ("params", "batch_stats"), f"config.init_from={workdir!r}",
      "it must be the --workdir of a finished float run (e.g. of "
      "configs/fashion_mnist_float.py), or unset to train from scratch",
      "Point config.init_from to another finished float run, or delete "
      "that step's folder to use an earlier checkpoint of this one.")


def load_variables(workdir: str, collections: Sequence[str], what: str,
                   missing: str, remedy: str) -> dict:
  """The `collections` (those present and non-empty) of the latest
  checkpoint in `workdir`; a CheckpointError naming `what` with the hint
  `missing` if there is none, or `remedy` if it cannot be read."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = _checkpoint_dir(workdir)
  # No manager for a missing directory: it would create it.
  mgr = ocp.CheckpointManager(directory) if os.path.isdir(directory) else None
  step = mgr.latest_step() if mgr else None
  if step is None:
    raise CheckpointError(f"{what} holds no checkpoint: {missing}")
  try:
    tree = _restore(mgr, step, ocp.args.StandardRestore(), what, remedy)
  finally:
    mgr.close()
  return {c: tree[c] for c in collections if tree.get(c)}


write_json_atomic = fileio.write_json_atomic


# ---------------------------------------------------------------------------
# Evaluation and the loop.
# ---------------------------------------------------------------------------

def evaluate(state, eval_fn, config, shard) -> dict:
  totals = None
  for batch in data_lib.eval_batches(
      config.dataset, config.eval_batch_size, config.data_dir,
      config.num_eval_examples, split=config.eval_split,
      validation_examples=config.validation_examples):
    m = eval_fn(state, shard(batch))
    totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return {"eval_accuracy": float(totals["correct"]) / n,
          "eval_loss": float(totals["loss_sum"]) / n,
          "eval_examples": int(n), "eval_split": config.eval_split}


def _sharding():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def _make_sharder(data_sharding):
  """Host batch (global, same on every host) -> global sharded jax.Array."""
  nproc, pid = jax.process_count(), jax.process_index()

  def shard(batch):
    def one(x):
      local = np.split(x, nproc)[pid] if nproc > 1 else x
      return jax.make_array_from_process_local_data(data_sharding, local,
                                                     x.shape)
    return jax.tree.map(one, batch)
  return shard


def model_cost(model, image_shape) -> dict:
  """`cost.model_cost` of the model (of an `NnxModel`: its linen twin's)."""
  if isinstance(model, NnxModel):
    model = model.linen_twin
  return cost_lib.model_cost(model, tuple(image_shape), train=False).as_dict()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict:
  """Trains, evaluates, checkpoints; returns (and writes) the result."""
  validate_config(config)
  check_resume(config, workdir)
  t_start = time.time()
  # A missing float model is refused before the workdir is created.
  float_vars = (load_float_variables(config.init_from) if config.init_from
                else None)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    save_config(config, workdir)
  data_lib.ensure_prepared(config.dataset, config.data_dir)
  info = data_lib.get_info(config.dataset, config.data_dir)
  stream = data_lib.make_train_stream(
      config.dataset, config.batch_size, config.seed, config.data_dir,
      augment=config.augment, num_examples=config.num_train_examples,
      validation_examples=config.validation_examples)
  steps_per_epoch = stream.steps_per_epoch
  total_steps = int(config.num_epochs * steps_per_epoch)
  model = create_model(config, info.num_classes)

  state, schedule = create_state(config, model, stream.batch(0)["image"],
                                 steps_per_epoch, float_vars)
  # Replicated over the mesh first, so that a checkpoint restores onto it
  # (with several processes, each holds its local replicas; restoring onto
  # one local device first would need a cross-process transfer).
  data_sharding, repl = _sharding()
  state = jax.device_put(state, repl)
  mgr = _checkpoint_manager(workdir, config)
  state = restore_checkpoint(mgr, state)
  start_step = int(state.step)
  shard = _make_sharder(data_sharding)
  p_train = jax.jit(functools.partial(
      train_step, num_classes=info.num_classes,
      label_smoothing=config.label_smoothing, schedule=schedule),
      donate_argnums=0)
  p_eval = jax.jit(functools.partial(eval_step,
                                     num_classes=info.num_classes))

  writer = metric_writer.MetricWriter(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  logging.info("training %s %s (%s) on %s: steps %d..%d, %d steps/epoch",
               config.framework, config.model, config.quant, config.dataset,
               start_step, total_steps, steps_per_epoch)
  t_loop = t_window = time.time()
  train_metrics, pending = [], None  # the log window's steps
  window_start = start_step
  step = start_step
  batches = stream.iterate(start_step)
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(batches)
      state, metrics = p_train(state, shard(batch))
      # Check the previous step's loss while this one runs (no stall).
      if pending is not None:
        _check_finite(*pending)
        train_metrics.append(pending[1])
      pending = (step, metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        _check_finite(*pending)
        train_metrics.append(pending[1])
        pending = None
        summary = window_metrics(train_metrics).compute()
        now = time.time()  # after the host transfer: the window's steps ran
        writer.write_scalars(step, {
            **{f"train_{k}": float(v) for k, v in summary.items()},
            "steps_per_sec": (step - window_start) / max(now - t_window,
                                                         1e-9)})
        train_metrics, window_start, t_window = [], step, now
      if config.eval_every_steps and step % config.eval_every_steps == 0 \
          and step != total_steps:
        writer.write_scalars(step, _num(evaluate(state, p_eval, config,
                                                 shard)))
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        if pending is not None:
          _check_finite(*pending)
          train_metrics.append(pending[1])
          pending = None
        save_checkpoint(mgr, state)
  finally:
    batches.close()
  train_time = time.time() - t_loop
  result = evaluate(state, p_eval, config, shard)
  writer.write_scalars(total_steps, _num(result))
  writer.close()
  result.update(
      steps=total_steps, resumed_from_step=start_step,
      train_time_s=round(train_time, 2),
      steps_per_s_this_run=round((total_steps - start_step) / max(train_time,
                                                                   1e-9), 3),
      wall_time_s=round(time.time() - t_start, 2),
      config=config.to_dict(), cost=model_cost(model, info.image_shape),
      devices=jax.device_count(), platform=jax.devices()[0].platform)
  result.update({k: result["cost"][k] for k in ("macs", "bops",
                                                 "weight_bits")})
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, RESULT_FILE), result)
  logging.info("final eval accuracy %.4f loss %.4f after %d steps",
               result["eval_accuracy"], result["eval_loss"], total_steps)
  return result


AVERAGED_METRICS = ("loss", "cross_entropy", "accuracy", "grad_norm",
                    "param_norm", "quant_grad_norm", "quant_param_norm")


def _split_norms(name: str, tree) -> dict:
  """{name: the global norm over the model's parameters, quant_<name>: over
  the quantizers' learned parameters (`QUANT_PARAM_RE`: LSQ steps, PACT and
  DQ clips, DQ levels and positions; 0 where there are none)}. They are kept
  apart because the quantizers' values are in other units (DQ positions are
  level indices, their gradients are in level gaps), so one norm over both
  would not mean what it does for a float model."""
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  parts = {False: [], True: []}
  for path, leaf in flat.items():
    parts[bool(QUANT_PARAM_RE.search(path))].append(leaf)
  return {name: optax.global_norm(parts[False]),
          f"quant_{name}": optax.global_norm(parts[True])}


def window_metrics(steps: list[dict]):
  """The clu ``metrics.Collection`` of a training log window: the mean over
  its steps of `AVERAGED_METRICS` and the learning rate of its last step.

  Built once per log step from the steps' host values (one transfer; nothing
  is added to the per-step path). clu is imported here: it is a training
  extra, and `aqt_ext.serve` imports this module.
  """
  from clu import metrics  # pylint: disable=g-import-not-at-top
  host = jax.device_get(steps)
  count = np.int32(len(host))
  return metrics.Collection.create_collection(
      **{k: metrics.Average(total=np.sum([m[k] for m in host],
                                         dtype=np.float32), count=count)
         for k in AVERAGED_METRICS},
      learning_rate=metrics.LastValue(value=host[-1]["learning_rate"]))


def _num(d: dict) -> dict:
  return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _check_finite(step: int, metrics) -> None:
  """Stops on a non-finite loss, gradient or updated parameter."""
  for key in ("loss", "grad_norm", "param_norm", "quant_grad_norm",
              "quant_param_norm"):
    value = float(metrics[key])
    if not np.isfinite(value):
      raise NonFiniteLossError(
          f"{key} is {value} at step {step}; stopping. The last good "
          "checkpoint is kept (nothing was saved after the failure).")


__all__ = ["TrainState", "NnxModel", "train_and_evaluate", "create_model",
           "validate_config", "check_resume", "TRAINING_FIELDS",
           "CheckpointError", "ResumeConfigError", "NonFiniteLossError",
           "silence_aborted_restore_echoes"]
