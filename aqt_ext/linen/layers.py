"""Linen layers: `QuantDense`, `QuantConv`, `QuantEinsum`, drop-in for
`nn.Dense`, `nn.Conv`, `nn.Einsum`.

Same constructor arguments (plus `quant`), same parameter names and shapes,
so a float checkpoint loads unchanged. The quantizers are those of
`aqt_ext.core` (one implementation for linen and NNX), reaching the layer's
variables through `LinenContext`:

* learned quantizer parameters sit in ``params`` next to ``kernel``
  (``kernel_lsq_step``, ``input_lsq_step``, ``input_pact_alpha``,
  ``kernel_dq_levels``, ``input_dq_alpha``); `aqt_ext.train.initial_variables`
  creates them from the loaded kernels when starting from a float checkpoint;
* static ranges sit in ``quant_stats``: updated when that collection is
  mutable, frozen otherwise (like BatchNorm's ``batch_stats``);
* AQuant borders (``rounding='border'``) in ``aquant``; DQ's auxiliary
  losses are sown into ``quant_losses`` when it is mutable.

LSQ input steps and DQ input clips are initialised from the batch given to
``init``. Inside a loop body (``nn.scan``, hence ``nn.RNN``;
``nn.while_loop``) flax cannot create a parameter from the loop's data: they
start from a data-free value with a `QuantInitWarning`, and
`calibrate_lsq_steps` sets LSQ input steps from data afterwards. Inputs on a
grid without negative values warn when they see negative values when their
quantizer is set.

``LayerQuant.execution='fake'`` quantizes both operands with
straight-through gradients masked by clipping, then runs the float op;
``'int'`` runs int8/int16 operands through the integer contraction of
`aqt_ext.core.int_ops` (int32 accumulation, then the input scale, then the
weight scale).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from aqt_ext.config import (LayerQuant, ModelQuant, TensorQuant,
                            activation_quant)
from aqt_ext.core import contract, initializers as fast_init, int_ops
from aqt_ext.core import lsq as lsq_lib
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import AQUANT, LOSSES, PARAMS, STATS
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.methods import quantize_activation, quantize_operand

# flax's lecun_normal, drawn flat: the same values, compiled in a fraction
# of the time for conv kernels (`aqt_ext.core.initializers`).
default_kernel_init = fast_init.lecun_normal()

# Flax loop transforms, as their scopes name them (``'scan(cell)'``).
LOOP_TRANSFORMS = ("scan", "while_loop")


def in_lifted_loop(mdl: nn.Module) -> bool:
  """Whether `mdl` runs inside the body of a flax loop transform
  (``nn.scan``, hence ``nn.RNN``; ``nn.while_loop``).

  There flax traces the body once more to create the broadcast variables:
  a parameter computed from the body's data is refused ("broadcasted variable
  has a data dependency on the scan body"), and since flax 0.12.12 so is
  any ``jax.debug.callback`` on that data.
  """
  prefixes = tuple(f"{t}(" for t in LOOP_TRANSFORMS)
  return any(str(p).startswith(prefixes)
             for p in getattr(mdl.scope, "debug_path", ()))


def module_path(mdl: nn.Module) -> str:
  """`mdl`'s module path, ``'/'``-joined (``''`` at the top level)."""
  return "/".join(str(p) for p in mdl.scope.path)


class LinenContext:
  """`aqt_ext.core.context.QuantContext` on a bound linen module (called
  from inside its compact method)."""

  def __init__(self, mdl: nn.Module):
    self.mdl = mdl
    self.path = module_path(mdl)
    self.layer_type = type(mdl).__name__
    self.initializing = mdl.is_initializing()
    self.in_loop = in_lifted_loop(mdl)

  def get(self, collection, name, init):
    if self.mdl.has_variable(collection, name):
      # Not mdl.param for an existing parameter: flax would trace `init`
      # once more (a shape check) and `init` may read cached views of the
      # operand, whose tracers must not leak from that trace.
      return nn.unbox(self.mdl.get_variable(collection, name))
    if collection == PARAMS:
      return self.mdl.param(name, lambda _: init())
    return self.mdl.variable(collection, name, init).value

  def set(self, collection, name, value):
    self.mdl.put_variable(collection, name, value)

  def has(self, collection, name):
    return self.mdl.has_variable(collection, name)

  def mutable(self, collection):
    return self.mdl.is_mutable_collection(collection)

  def sow(self, collection, name, value):
    self.mdl.sow(collection, name, value)

  def rng(self, stream):
    return self.mdl.make_rng(stream) if self.mdl.has_rng(stream) else None


def quant_operand(mdl: nn.Module, name: str, x: jax.Array, tq,
                  axes: qz.OperandAxes, *, is_weight: bool,
                  want_int: bool = False) -> Quantized:
  """`aqt_ext.core.methods.quantize_operand` for operand `x` of `mdl`."""
  return quantize_operand(LinenContext(mdl), name, x, tq, axes,
                          is_weight=is_weight, want_int=want_int)


def calibrate_lsq_steps(model: nn.Module, variables: Mapping[str, Any],
                        *args, **kwargs) -> dict:
  """`variables` with every LSQ input step set from data.

  Runs ``model.apply(variables, *args, **kwargs)`` once and sets each
  layer's ``{name}_lsq_step`` of an input to LSQ's initialisation
  ``2 mean|x| / sqrt(Qp)`` of the inputs that layer saw, averaged over its
  calls (every step of a scan; a step stored per scan step gets the
  average). Kernel steps and everything else are returned unchanged. Use it
  after ``init`` on models whose LSQ layers sit inside ``nn.scan`` /
  ``nn.RNN``, where ``init`` cannot read the data.

  Raises:
    ValueError: the model quantizes no input with LSQ.
  """
  record: dict = {}
  lsq_lib.RECORDS.append(record)
  try:
    jax.block_until_ready(jax.jit(functools.partial(model.apply, **kwargs))(
        variables, *args))
    jax.effects_barrier()
  finally:
    lsq_lib.RECORDS.remove(record)
  if not record:
    raise ValueError("calibrate_lsq_steps: the model quantizes no input with "
                     "TensorQuant.method='lsq'")
  params = flatten_dict(variables["params"])
  for key, (grid, bits, means) in record.items():
    if key not in params:
      raise ValueError(f"calibrate_lsq_steps: variables['params'] has no "
                       f"{'/'.join(key)!r}, the step of a layer the model ran")
    step = qz.lsq_init_step(np.mean(np.stack(means), axis=0), grid, bits, ())
    params[key] = jnp.broadcast_to(step, params[key].shape).astype(
        params[key].dtype)
  return {**variables, "params": unflatten_dict(params)}


def resolve_quant(mdl: nn.Module) -> LayerQuant:
  """The layer's LayerQuant; a ModelQuant is resolved by the module path."""
  q = mdl.quant
  if isinstance(q, ModelQuant):
    return q.for_path(module_path(mdl))
  if not isinstance(q, LayerQuant):
    raise TypeError(f"{type(mdl).__name__}.quant must be a LayerQuant or "
                    f"ModelQuant, got {type(q).__name__}")
  return q


class QuantDense(nn.Module):
  """`nn.Dense` with quantized kernel and input (see module docstring)."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = initializers.zeros_init()
  quant: LayerQuant | ModelQuant = LayerQuant()

  def layer_quant(self) -> LayerQuant:
    return resolve_quant(self)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias,
                                         dtype=self.dtype)
    y = contract.dot_general(LinenContext(self), resolve_quant(self), inputs,
                             kernel, int_ops.dense_dims(inputs.ndim),
                             self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class QuantConv(nn.Module):
  """`nn.Conv` with quantized kernel and input (see module docstring)."""

  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = initializers.zeros_init()
  quant: LayerQuant | ModelQuant = LayerQuant()

  def layer_quant(self) -> LayerQuant:
    return resolve_quant(self)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    x, batch_shape, kernel_shape, conv = conv_geometry(self, inputs)
    kernel = self.param("kernel", self.kernel_init, kernel_shape,
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)

    y = contract.conv(LinenContext(self), resolve_quant(self), x, kernel,
                      conv, self.precision)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y.reshape(batch_shape + y.shape[1:]) if batch_shape != (
        y.shape[0],) else y


class QuantAct(nn.Module):
  """Quantizes an activation that no layer takes as its input, and returns
  its dequantized value (straight-through gradients masked by clipping).

  E.g. a residual branch's output before the add: an integer deployment
  rounds it there (ONNX Runtime's fused integer conv writes a quantized
  output), and a QuantAct makes QAT compute the same. The range is the
  TensorQuant's (``calibration='static'``: an EMA in ``quant_stats``, as a
  layer input's). `quant` is a TensorQuant, or a ModelQuant whose first
  rule matching the module path gives it (``ModelQuant.for_activation``:
  the default never applies). Float: the identity, no variables.
  """

  quant: TensorQuant | ModelQuant = TensorQuant()

  def act_quant(self) -> TensorQuant:
    return activation_quant(self.quant, module_path(self))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    tq = self.act_quant()
    if tq.method == "float":
      return x
    return quantize_activation(LinenContext(self), x, tq).fake


def conv_geometry(mdl: nn.Module, inputs: jax.Array):
  """`aqt_ext.core.int_ops.conv_geometry` of a QuantConv's call."""
  return int_ops.conv_geometry(
      inputs, mdl.features, mdl.kernel_size, mdl.strides, mdl.padding,
      mdl.input_dilation, mdl.kernel_dilation, mdl.feature_group_count,
      type(mdl).__name__)


class QuantEinsum(nn.Module):
  """`nn.Einsum` with quantized kernel and input (see module docstring).

  The einsum runs as ``lax.dot_general`` plus a transpose
  (`aqt_ext.core.int_ops.einsum_dims`): letters shared by input, kernel and
  output are batch axes, letters shared by input and kernel only are
  contracted (per-channel scales: one per free index of each operand).
  """

  shape: Sequence[int]
  einsum_str: str | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = initializers.zeros_init()
  quant: LayerQuant | ModelQuant = LayerQuant()

  @nn.compact
  def __call__(self, inputs: jax.Array, einsum_str: str | None = None
               ) -> jax.Array:
    spec = nn.merge_param("einsum_str", self.einsum_str, einsum_str)
    kernel = self.param("kernel", self.kernel_init, tuple(self.shape),
                        self.param_dtype)
    bias_shape, bias_bcast = int_ops.einsum_bias_shape(spec, self.shape)
    bias = (self.param("bias", self.bias_init, bias_shape, self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias,
                                         dtype=self.dtype)
    y = contract.einsum(LinenContext(self), resolve_quant(self), spec,
                        inputs, kernel, self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, bias_bcast)
    return y
