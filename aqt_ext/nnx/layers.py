"""NNX layers: `QuantLinear`, `QuantLinearGeneral`, `QuantConv`,
`QuantEinsum`, drop-in for `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`,
`nnx.Einsum`.

Each subclasses its float layer: the same constructor arguments (``rngs``
included), the same ``kernel`` / ``bias`` parameters, so a float NNX state
loads unchanged; ``quant=`` takes a `LayerQuant`, or a `ModelQuant`
resolved by the layer's ``path`` (which `aqt_ext.nnx.quantize_model` sets).
The quantizers are those of `aqt_ext.core`, the same code the linen layers
run, so on the same variables both compute the same values and gradients,
bit for bit. Their state is kept as attributes of the layer named as the
linen variables are, each of its own type:

* learned quantizer parameters, `nnx.Param` (``kernel_lsq_step``,
  ``input_lsq_step``, ``input_pact_alpha``, ``kernel_dq_levels``,
  ``input_dq_alpha``);
* static ranges, `QuantStat` (``input_amax``, ``input_count``, ...): updated
  in training mode, frozen after ``model.eval()`` (which sets
  ``use_running_average=True``, as for BatchNorm);
* AQuant borders, `AQuantBorder`; DQ's auxiliary losses, `QuantLoss`
  (recorded in training mode; `pop_losses` takes them).

Quantizer variables are created at the layer's first call, from its data
(LSQ's input step, DQ's input clip). Create them with `init` before building
the optimizer (``nnx.Optimizer(model, tx, wrt=nnx.Param)`` covers the
parameters that exist), and before running the model under a transform that
cannot add variables (``nnx.scan``, ``nnx.vmap`` of batched values).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant, activation_quant
from aqt_ext.core import contract, initializers, int_ops
from aqt_ext.core.methods import quantize_activation
from aqt_ext.core.context import AQUANT, LOSSES, PARAMS, STATS
from aqt_ext.core.contract import QUANT_RNG

# nnx's default lecun_normal, drawn flat: the same values, compiled in a
# fraction of the time for conv kernels (`aqt_ext.core.initializers`).
_KERNEL_INIT = initializers.lecun_normal()


class QuantStat(nnx.Variable):
  """A static range statistic (linen collection ``quant_stats``)."""


class AQuantBorder(nnx.Variable):
  """An AQuant border parameter, set by PTQ (linen collection ``aquant``)."""


class QuantLoss(nnx.Variable):
  """Auxiliary losses of one forward pass, a tuple (linen
  ``quant_losses``)."""


VARIABLE_TYPES: dict[str, type[nnx.Variable]] = {
    PARAMS: nnx.Param, STATS: QuantStat, AQUANT: AQuantBorder,
    LOSSES: QuantLoss}


class NnxContext:
  """`aqt_ext.core.context.QuantContext` on an NNX quantized layer."""

  def __init__(self, layer: "QuantLayer"):
    self.layer = layer
    self.path = layer.path
    self.layer_type = type(layer).__name__
    self.initializing = layer.initializing
    self.in_loop = False

  def _var(self, name: str) -> nnx.Variable | None:
    v = getattr(self.layer, name, None)
    return v if isinstance(v, nnx.Variable) else None

  def get(self, collection, name, init):
    var = self._var(name)
    if var is None:
      var = VARIABLE_TYPES[collection](init())
      setattr(self.layer, name, var)
    return var[...]

  def set(self, collection, name, value):
    self._var(name)[...] = value

  def has(self, collection, name):
    var = self._var(name)
    return var is not None and isinstance(var, VARIABLE_TYPES[collection])

  def mutable(self, collection):
    if collection in (STATS, LOSSES):
      return not self.layer.use_running_average
    return collection == AQUANT

  def rng(self, stream):
    rngs = getattr(self.layer, "quant_rngs", None)
    if rngs is not None:
      return rngs()
    if not _QUANT_KEYS:
      return None
    key, calls = _QUANT_KEYS[-1]
    n = calls[id(self.layer)] = calls.get(id(self.layer), -1) + 1
    return jax.random.fold_in(jax.random.fold_in(
        key, zlib.crc32(self.layer.path.encode())), n)

  def sow(self, collection, name, value):
    var = self._var(name)
    if var is None:
      setattr(self.layer, name, VARIABLE_TYPES[collection]((value,)))
    else:
      var.set_value(tuple(var.get_value()) + (value,))


class QuantLayer:
  """What the quantized NNX layers share: `quant`, `path` and the flags."""

  quant: LayerQuant | ModelQuant
  path: str
  use_running_average: bool
  initializing: bool

  def _init_quant(self, quant: LayerQuant | ModelQuant, rngs: Any = None
                  ) -> None:
    if not isinstance(quant, (LayerQuant, ModelQuant)):
      raise TypeError(f"{type(self).__name__}.quant must be a LayerQuant or "
                      f"ModelQuant, got {type(quant).__name__}")
    self.quant = quant
    # The stream of stochastic rounding in the backward pass, if given.
    self.quant_rngs = (rngs[QUANT_RNG].fork()
                       if isinstance(rngs, nnx.Rngs) and QUANT_RNG in rngs
                       else nnx.data(None))
    self.path = ""
    self.use_running_average = False
    self.initializing = False

  def layer_quant(self) -> LayerQuant:
    """The layer's LayerQuant; a ModelQuant is resolved by `path`."""
    if isinstance(self.quant, ModelQuant):
      return self.quant.for_path(self.path)
    return self.quant

  def __call__(self, *args, **kwargs):
    if _HOOKS:
      return _HOOKS[-1](self, *args, **kwargs)
    return self.quantized_call(*args, **kwargs)


# The innermost `quant_key` block's (key, calls per layer).
_QUANT_KEYS: list[tuple[jax.Array, dict]] = []


@contextlib.contextmanager
def quant_key(key: jax.Array):
  """Within the block, a quantized layer without a ``'quant'`` stream of its
  own draws stochastic rounding keys from `key`, folded with its path and
  call count (the training loop's per-step key; no RNG state is added to
  the model)."""
  _QUANT_KEYS.append((key, {}))
  try:
    yield
  finally:
    _QUANT_KEYS.pop()


# The innermost `intercept` hook runs in place of every quantized layer.
_HOOKS: list[Callable[..., Any]] = []


@contextlib.contextmanager
def intercept(hook: Callable[..., Any]):
  """Within the block, a quantized layer's call ``layer(*args)`` runs
  ``hook(layer, *args)`` instead (serving uses it; the hook may call
  ``layer.quantized_call(*args)``)."""
  _HOOKS.append(hook)
  try:
    yield
  finally:
    _HOOKS.remove(hook)


def _params(layer) -> tuple[jax.Array, jax.Array | None]:
  return (layer.kernel[...],
          layer.bias[...] if layer.bias is not None else None)


class QuantLinear(QuantLayer, nnx.Linear):
  """`nnx.Linear` with quantized kernel and input (see module docstring)."""

  def __init__(self, in_features: int, out_features: int, *,
               quant: LayerQuant | ModelQuant = LayerQuant(), **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self._init_quant(quant, kwargs.get("rngs"))

  __call__ = QuantLayer.__call__  # whatever the bases' order

  def quantized_call(self, inputs: jax.Array) -> jax.Array:
    kernel, bias = _params(self)
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    y = contract.dot_general(NnxContext(self), self.layer_quant(), inputs,
                             kernel, int_ops.dense_dims(inputs.ndim),
                             self.precision, self.preferred_element_type)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _normalize_axes(axes: Any, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


class QuantLinearGeneral(QuantLayer, nnx.LinearGeneral):
  """`nnx.LinearGeneral` with quantized kernel and input: kernel scales per
  output feature (all non-contracting kernel axes) for ``per_channel``."""

  def __init__(self, in_features, out_features, *,
               quant: LayerQuant | ModelQuant = LayerQuant(), **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self._init_quant(quant, kwargs.get("rngs"))

  __call__ = QuantLayer.__call__  # whatever the bases' order

  def quantized_call(self, inputs: jax.Array) -> jax.Array:
    ndim = inputs.ndim
    axis = _normalize_axes(self.axis, ndim)
    batch_axis = _normalize_axes(tuple(self.batch_axis.keys()), ndim)
    nb, na = len(batch_axis), len(axis)
    expanded_batch_shape = tuple(
        inputs.shape[a] if a in batch_axis else 1 for a in range(ndim)
        if a not in axis)
    kernel, bias = _params(self)
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    dims = ((axis, tuple(range(nb, nb + na))), (batch_axis, tuple(range(nb))))
    out = contract.dot_general(NnxContext(self), self.layer_quant(), inputs,
                               kernel, dims, self.precision,
                               self.preferred_element_type)
    if bias is not None:
      out = out + jnp.reshape(bias, (*expanded_batch_shape,
                                     *self.out_features))
    return out


class QuantConv(QuantLayer, nnx.Conv):
  """`nnx.Conv` with quantized kernel and input; paddings 'SAME', 'VALID',
  ints and (lo, hi) pairs, no ``mask``."""

  def __init__(self, in_features: int, out_features: int, kernel_size,
               strides=1, *, quant: LayerQuant | ModelQuant = LayerQuant(),
               **kwargs):
    kwargs.setdefault("kernel_init", _KERNEL_INIT)
    super().__init__(in_features, out_features, kernel_size, strides,
                     **kwargs)
    if self.mask is not None:
      raise ValueError("QuantConv.mask is not supported; allowed: None")
    self._init_quant(quant, kwargs.get("rngs"))

  __call__ = QuantLayer.__call__  # whatever the bases' order

  def quantized_call(self, inputs: jax.Array) -> jax.Array:
    x, batch_shape, kernel_shape, conv = int_ops.conv_geometry(
        inputs, self.out_features, self.kernel_size, self.strides,
        self.padding, self.input_dilation, self.kernel_dilation,
        self.feature_group_count, type(self).__name__)
    kernel, bias = _params(self)
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    y = contract.conv(NnxContext(self), self.layer_quant(), x, kernel, conv,
                      self.precision)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y.reshape(batch_shape + y.shape[1:]) if batch_shape != (
        y.shape[0],) else y


class QuantEinsum(QuantLayer, nnx.Einsum):
  """`nnx.Einsum` with quantized kernel and input, run as a dot_general
  and a transpose (`aqt_ext.core.int_ops.einsum_dims`)."""

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *,
               quant: LayerQuant | ModelQuant = LayerQuant(), **kwargs):
    kwargs.setdefault("kernel_init", _KERNEL_INIT)
    super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
    self._init_quant(quant, kwargs.get("rngs"))

  __call__ = QuantLayer.__call__  # whatever the bases' order

  def quantized_call(self, inputs: jax.Array, einsum_str: str | None = None
                     ) -> jax.Array:
    spec = (einsum_str if einsum_str is not None else self.einsum_str
            ).replace(" ", "")
    kernel, bias = _params(self)
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    y = contract.einsum(NnxContext(self), self.layer_quant(), spec, inputs,
                        kernel, self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, int_ops.einsum_bias_shape(
          spec, self.kernel_shape)[1])
    return y


class QuantAct(nnx.Module):
  """`aqt_ext.linen.QuantAct` on NNX: quantizes an activation that no layer
  takes as its input (e.g. a residual branch's output before the add) and
  returns its dequantized value. `quant`: a TensorQuant, or a ModelQuant
  whose first rule matching `path` gives it (the default never applies);
  `aqt_ext.nnx.quantize_model` sets it. Its static range is `QuantStat`
  attributes named as the linen variables (``input_amax``, ...), updated in
  training mode and frozen after ``model.eval()``. Float: the identity."""

  def __init__(self, quant: TensorQuant | ModelQuant = TensorQuant()):
    activation_quant(quant, "")  # the type, at once
    self.quant = quant
    self.path = ""
    self.use_running_average = False
    self.initializing = False

  def act_quant(self) -> TensorQuant:
    return activation_quant(self.quant, self.path)

  def __call__(self, x: jax.Array) -> jax.Array:
    if _HOOKS and self.act_quant().method != "float":
      return _HOOKS[-1](self, x)
    return self.quantized_call(x)

  def quantized_call(self, x: jax.Array) -> jax.Array:
    tq = self.act_quant()
    if tq.method == "float":
      return x
    return quantize_activation(NnxContext(self), x, tq).fake


QUANT_LAYERS: dict[type, type] = {
    nnx.Linear: QuantLinear, nnx.LinearGeneral: QuantLinearGeneral,
    nnx.Conv: QuantConv, nnx.Einsum: QuantEinsum}


def quant_layers(model: nnx.Module):
  """(path, layer) of every quantized layer in `model`."""
  for path, mdl in nnx.iter_modules(model):
    if isinstance(mdl, QuantLayer):
      yield "/".join(str(p) for p in path), mdl


def quant_acts(model: nnx.Module):
  """(path, QuantAct) of every activation quantizer in `model`."""
  for path, mdl in nnx.iter_modules(model):
    if isinstance(mdl, QuantAct):
      yield "/".join(str(p) for p in path), mdl


def set_paths(model: nnx.Module) -> None:
  """Sets each quantized layer's and activation quantizer's `path` to its
  place in `model`."""
  for path, layer in (*quant_layers(model), *quant_acts(model)):
    layer.path = path


def init(model: nnx.Module, *args, **kwargs) -> Any:
  """Creates the quantizer variables of `model` from one forward pass on
  ``model(*args, **kwargs)``, as linen's ``init`` does: static ranges are
  created but not updated, no auxiliary loss is recorded, and every variable
  that existed before (BatchNorm statistics, RNG counts) keeps its value.
  Returns the output."""
  set_paths(model)
  layers = [m for _, m in (*quant_layers(model), *quant_acts(model))]
  existing = [(v, v.get_value()) for _, v in nnx.iter_graph(model)
              if isinstance(v, nnx.Variable)]
  for layer in layers:
    layer.initializing = True
  try:
    return model(*args, **kwargs)
  finally:
    for layer in layers:
      layer.initializing = False
    for var, value in existing:  # BatchNorm statistics, RNG counts, ...
      var.set_value(value)


def pop_losses(model: nnx.Module) -> jax.Array:
  """The sum of the auxiliary losses the last forward passes recorded
  (removed from the model), 0.0 if none."""
  state = nnx.pop(model, QuantLoss)
  leaves = jax.tree_util.tree_leaves(state)
  return sum(leaves, jnp.zeros((), jnp.float32))
