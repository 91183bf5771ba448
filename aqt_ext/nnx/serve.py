"""Integer serving of NNX models, in `aqt_ext.serve`'s on-disk layout.

``export(model, x, DIR)`` writes what `aqt_ext.serve.export` writes for a
linen model: the integer kernels and scales of every quantized layer
(`aqt_ext.nnx.quant_layers` whose LayerQuant is not entirely float), the
other parameters and the BatchNorm statistics as trained, ``serving.json``
last. ``load(DIR, model, x)`` checks the checkpoint against `model` (the
same architecture, quantized by the same rules), sets the model's float
parameters and statistics from it and returns a `ServedNnxModel` whose
integer layers run the stored integer kernels through the integer
contraction of `aqt_ext.core.int_ops`: the per-layer code is
`aqt_ext.serve`'s, seen through `NnxView`. The model runs in eval mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from aqt_ext import serve
from aqt_ext.config import ModelQuant
from aqt_ext.core.context import STATS
from aqt_ext.nnx.layers import (NnxContext, QuantAct, QuantConv, QuantEinsum,
                                QuantLayer, QuantLinear, QuantLinearGeneral,
                                QuantStat, intercept, quant_acts,
                                quant_layers, set_paths)
from aqt_ext.rules_report import is_float

KINDS = {QuantLinear: "dense", QuantConv: "conv",
         QuantLinearGeneral: "dense_general", QuantEinsum: "einsum"}


class NnxView(serve.ServingView):
  """An NNX quantized layer as `aqt_ext.serve` reads a linen one; its
  serving arrays are kept in `arrays` (name -> array)."""

  def __init__(self, layer: QuantLayer, arrays: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None):
    self.layer = layer
    self.kind = KINDS[type(layer)]
    self.path = layer.path
    self.type_name = type(layer).__name__
    self.arrays = dict(arrays or {})
    self.params = params  # served: the layer's stored params (bias)
    self.dtype, self.param_dtype = layer.dtype, layer.param_dtype
    self.use_bias = layer.bias is not None
    if self.kind == "einsum":
      self.shape, self.einsum_str = tuple(layer.kernel_shape), layer.einsum_str
    elif self.kind == "dense_general":
      self.axis, self.batch_dims = layer.axis, tuple(layer.batch_axis)
      self.features = layer.out_features
    else:
      self.features = layer.out_features
    if self.kind == "conv":
      for name in ("kernel_size", "strides", "padding", "input_dilation",
                   "kernel_dilation", "feature_group_count"):
        setattr(self, name, getattr(layer, name))

  def layer_quant(self):
    return self.layer.layer_quant()

  def quant_context(self):
    return NnxContext(self.layer)

  def has_variable(self, collection: str, name: str) -> bool:
    assert collection == "params", collection
    if name.startswith(serve.PARAM_PREFIX):
      return name[len(serve.PARAM_PREFIX):] in self.arrays
    if self.params is not None:
      return name in self.params
    return isinstance(getattr(self.layer, name, None), nnx.Variable)

  def get_variable(self, collection: str, name: str):
    assert self.has_variable(collection, name), name
    if name.startswith(serve.PARAM_PREFIX):
      return self.arrays[name[len(serve.PARAM_PREFIX):]]
    if self.params is not None:
      return self.params[name]
    return getattr(self.layer, name)[...]

  def put_variable(self, collection: str, name: str, value) -> None:
    assert collection == "params" and name.startswith(serve.PARAM_PREFIX)
    self.arrays[name[len(serve.PARAM_PREFIX):]] = value


class NnxActView(serve.ServingView):
  """An NNX `QuantAct` as `aqt_ext.serve` reads a linen one: its serving
  arrays (the stored scale) in `arrays`."""

  kind = "act"

  def __init__(self, act: QuantAct, arrays: Mapping[str, Any] | None = None):
    self.layer, self.path = act, act.path
    self.arrays = dict(arrays or {})

  def quant_context(self):
    return NnxContext(self.layer)

  def has_variable(self, collection: str, name: str) -> bool:
    assert collection == "params", collection
    return (name.startswith(serve.PARAM_PREFIX)
            and name[len(serve.PARAM_PREFIX):] in self.arrays)

  def get_variable(self, collection: str, name: str):
    assert self.has_variable(collection, name), name
    return self.arrays[name[len(serve.PARAM_PREFIX):]]

  def put_variable(self, collection: str, name: str, value) -> None:
    assert collection == "params" and name.startswith(serve.PARAM_PREFIX)
    self.arrays[name[len(serve.PARAM_PREFIX):]] = value


def _served_acts(model: nnx.Module) -> dict[str, QuantAct]:
  set_paths(model)
  return {p: a for p, a in quant_acts(model)
          if a.act_quant().method != "float"}


def _served_layers(model: nnx.Module) -> dict[str, QuantLayer]:
  set_paths(model)
  return {p: layer for p, layer in quant_layers(model)
          if not is_float(layer.layer_quant())}


def _pure(state) -> dict:
  return serve.unflat_tree({"/".join(map(str, k)): v.get_value() for k, v in
                            nnx.to_flat_state(state)})


def _variables(model: nnx.Module) -> dict:
  """The model's state as a linen-style variable dict, by path."""
  return {"params": _pure(nnx.state(model, nnx.Param)),
          "batch_stats": _pure(nnx.state(model, nnx.BatchStat)),
          STATS: _pure(nnx.state(model, QuantStat))}


def _eval_call(model: nnx.Module, args, kwargs):
  model.eval()
  return model(*args, **kwargs)


def export(model: nnx.Module, example_input: Any, directory: str, *,
           call_kwargs: Mapping[str, Any] | None = None) -> serve.ExportResult:
  """Writes the serving checkpoint of a trained, quantized NNX model.

  Args:
    model: the model (its quantizer variables created, static ranges
      calibrated); left in eval mode.
    example_input: an input batch, or a tuple of positional arguments.
    directory: a new directory.
    call_kwargs: keyword arguments of the model's eval call (static).

  Returns:
    An `aqt_ext.serve.ExportResult` with the sizes.
  """
  directory = serve.new_export_directory(directory)
  kwargs = dict(call_kwargs or {})
  layers = _served_layers(model)
  recorder = serve.ExportRecorder()
  for path, mdl in nnx.iter_modules(model):
    recorder.modules["/".join(map(str, path))] = type(mdl).__name__
  graphdef, state = nnx.split(model)

  def record(state, args):
    m = nnx.merge(graphdef, state)
    views = {}

    def hook(layer, *a, **kw):
      if isinstance(layer, QuantAct):
        view = views.setdefault(layer.path, NnxActView(layer))
        return recorder.record_act(view, layer.act_quant(),
                                   layer.quantized_call, *a, **kw)
      if layer.path not in layers:
        return layer.quantized_call(*a, **kw)
      view = views.setdefault(layer.path, NnxView(layer))
      return recorder.record(view, view.kind, *a, **kw)

    with intercept(hook):
      _eval_call(m, args, kwargs)
    return {p: v.arrays for p, v in views.items()}

  ints = jax.device_get(jax.jit(record)(state, serve.example_args(
      example_input)))
  return serve.write_export(directory, _variables(model), ints, recorder)


def _node(model: nnx.Module, path: str):
  node = model
  for key in path.split("/") if path else ():
    node = node[int(key)] if isinstance(node, (nnx.List, list)) else getattr(
        node, key)
  return node


def _check(tree: Mapping, metadata: Mapping, model: nnx.Module) -> None:
  """The checkpoint against the model: the same integer layers, the same
  shapes, no parameter missing or unknown."""
  layers = _served_layers(model)
  stored = metadata["layers"]
  if set(stored) != set(layers):
    raise ValueError(
        "the serving checkpoint's integer layers "
        f"{sorted(stored)} differ from the model's quantized layers "
        f"{sorted(layers)}; load with the model and rules that were exported")
  acts, stored_acts = _served_acts(model), metadata.get("activations", {})
  if set(stored_acts) != set(acts):
    raise ValueError(
        "the serving checkpoint's quantized activations "
        f"{sorted(stored_acts)} differ from the model's {sorted(acts)}; load "
        "with the model and rules that were exported")
  serving = serve.flat_tree(tree[serve.SERVE])
  for path, meta in stored.items():
    want = tuple(layers[path].kernel.shape)
    if tuple(meta["kernel_shape"]) != want:
      raise ValueError(f"parameter {path + '/kernel'!r}: the serving "
                       f"checkpoint has shape {tuple(meta['kernel_shape'])}, "
                       f"the model expects {want}")
    have = np.shape(serving.get(serve.join_path(path, "kernel")))
    if math.prod(have) != serve.packed_size(meta["bits"], meta["int_shape"]):
      raise ValueError(f"{serve.SERVE}/{path}/kernel has shape {have}, not "
                       "the packed size of its integer kernel")
  variables = _variables(model)
  skip = {serve.join_path(p, n) for p in layers
          for n in ("kernel",) + serve.QUANTIZER_PARAMS}
  for collection in ("params", "batch_stats"):
    want = {k: np.shape(v) for k, v in serve.flat_tree(
        variables[collection]).items() if k not in skip}
    have = {k: np.shape(v) for k, v in serve.flat_tree(
        tree.get(collection, {})).items()}
    for name in sorted(set(want) ^ set(have)):
      where = "model" if name in want else "serving checkpoint"
      raise ValueError(f"{collection} {name!r} is only in the {where}")
    for name, shape in have.items():
      if shape != want[name]:
        raise ValueError(f"{collection} {name!r}: the serving checkpoint has "
                         f"shape {shape}, the model expects {want[name]}")


@dataclasses.dataclass
class ServedNnxModel:
  """A loaded NNX serving checkpoint: ``served(x)``.

  Attributes:
    model: the NNX model, its float parameters and statistics set from the
      checkpoint (its integer layers' float kernels are never read).
    arrays: the serving arrays by layer path.
    metadata: the contents of ``serving.json``.
    call_kwargs: keyword arguments of every call (static).
  """

  model: nnx.Module
  arrays: dict
  metadata: dict
  call_kwargs: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._graphdef, self._state = nnx.split(self.model)
    self._fn = jax.jit(self._serve)

  def _serve(self, state, arrays, args):
    m = nnx.merge(self._graphdef, state)
    layers = set(self.metadata["layers"])

    def hook(layer, *a, **kw):
      if isinstance(layer, QuantAct):
        y = serve.serve_act(NnxActView(layer, arrays.get(layer.path)),
                            layer.act_quant(), *a, **kw)
        return layer.quantized_call(*a, **kw) if y is None else y
      if layer.path not in layers:
        return layer.quantized_call(*a, **kw)
      params = {"bias": layer.bias[...]} if layer.bias is not None else {}
      view = NnxView(layer, arrays[layer.path], params)
      return serve.serve_layer(view, view.kind, *a, **kw)

    with intercept(hook):
      return _eval_call(m, args, self.call_kwargs)

  def __call__(self, *args):
    return self._fn(self._state, self.arrays, args)


def load(directory: str, model: nnx.Module, *,
         call_kwargs: Mapping[str, Any] | None = None) -> ServedNnxModel:
  """Reads a serving checkpoint written by `export`, checks it against
  `model` (the same architecture and rules; its parameter values do not
  matter) and returns the served model.

  Raises ValueError naming the parameter on a mismatch,
  `aqt_ext.serve.ServingFormatError` on a damaged file.
  """
  metadata = serve.read_metadata(directory)
  tree = serve.read_arrays(directory)
  _check(tree, metadata, model)
  for collection in ("params", "batch_stats"):
    for name, value in serve.flat_tree(tree.get(collection, {})).items():
      parent, _, leaf = name.rpartition("/")
      getattr(_node(model, parent), leaf)[...] = value
  arrays = {p: {k[len(p) + 1:]: v for k, v in serve.flat_tree(
      tree[serve.SERVE]).items() if k.startswith(p + "/")}
            for p in (*metadata["layers"], *metadata.get("activations", {}))}
  model.eval()
  return ServedNnxModel(model, jax.device_put(arrays), metadata,
                        dict(call_kwargs or {}))


def int_execution_twin(model: nnx.Module) -> None:
  """Sets every quantized layer whose methods run in integers to
  ``execution='int'`` (in place): the QAT model's integer-inference twin,
  which the served model matches."""
  for _, layer in quant_layers(model):
    layer.quant = serve.int_execution(
        layer.quant if isinstance(layer.quant, ModelQuant)
        else ModelQuant(default=layer.quant)).for_path(layer.path)


__all__ = ["NnxView", "ServedNnxModel", "export", "int_execution_twin",
           "load"]
