"""`QuantDense` and `QuantConv`: drop-in for `nn.Dense` / `nn.Conv`.

Same constructor arguments (plus `quant`), same parameter names and shapes,
so a float checkpoint loads unchanged; quantizers that learn (LSQ steps, PACT
clips, DQ levels and clips) add parameters next to ``kernel`` whose names
end in ``_lsq_step``, ``_pact_alpha``, ``_dq_levels`` or ``_dq_alpha``;
`aqt_ext.train.initial_variables` creates them from the loaded kernels when
starting from a float checkpoint. Static activation ranges live
in the ``quant_stats`` collection: updated when that collection is mutable,
frozen otherwise (like BatchNorm's ``batch_stats``).

Data-driven initialisation and input grids. LSQ's input step is
initialised from the batch given to ``init`` (``2 mean|x| / sqrt(Qp)``).
Inside a loop body (``nn.scan``, hence ``nn.RNN``; ``nn.while_loop``) flax
cannot create a parameter from the loop's data: there the input step starts
at the same formula for an input of ones and a `QuantInitWarning` says so;
`calibrate_lsq_steps` then sets every input step from data (averaged over
all calls, every loop step included). Inputs whose grid cannot hold negative
values (``grid='unsigned'``, PACT) warn, with a `QuantInitWarning` naming the
layer, when they see negative values at ``init``, when their parameter is
created, or at the first update of a static range (once per layer and trace,
on concrete or traced values; inside a loop body only where the loop's
outputs are computed, e.g. at an eager ``init``, not a jitted one, which
computes the variables only).

Inputs with ``rounding='border'`` (AQuant) round with per-channel border
parameters from the ``aquant`` collection, in fake and integer execution.

Fake quantization (``execution='fake'``) quantizes both operands with
straight-through gradients masked by clipping, then runs the float op, so the
gradients are the float op's gradients at the quantized operands, masked.
Integer execution (``execution='int'``) runs int8/int16 operands through
``lax.dot_general`` / ``lax.conv_general_dilated`` with int32 accumulation and
multiplies by the input scale, then the weight scale (AQT's order).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from aqt_ext import quantizers as qz
from aqt_ext.config import LayerQuant, ModelQuant, TensorQuant

STATS = "quant_stats"
AQUANT = "aquant"  # AQuant border parameters of inputs with rounding='border'
default_kernel_init = initializers.lecun_normal()


@dataclasses.dataclass
class Quantized:
  """A quantized operand: its fake-quant value, or (for int execution) the
  integer tensor and scale in `view` layout (feature axis split into groups
  for ``per_group``)."""

  fake: jax.Array | None
  ints: jax.Array | None = None
  qp: qz.QParams | None = None
  grouped: bool = False


def _num_per_scale(view_shape, red_axes) -> int:
  return int(np.prod([view_shape[a] for a in red_axes])) or 1


def _static_range(mdl: nn.Module, name: str, batch_rng: dict, decay: float
                  ) -> dict:
  """EMA of batch ranges in `quant_stats`; batch range until first update."""
  count = mdl.variable(STATS, f"{name}_count", lambda: jnp.zeros((), jnp.int32))
  emas = {k: mdl.variable(STATS, f"{name}_{k}", lambda v=v: jnp.zeros_like(v))
          for k, v in batch_rng.items()}
  batch_rng = jax.lax.stop_gradient(batch_rng)
  if mdl.is_mutable_collection(STATS) and not mdl.is_initializing():
    first = count.value == 0
    for k, var in emas.items():
      var.value = jnp.where(first, batch_rng[k],
                            decay * var.value + (1 - decay) * batch_rng[k])
    count.value = count.value + 1
  trained = count.value > 0
  return {k: jnp.where(trained, var.value, batch_rng[k])
          for k, var in emas.items()}


def border_rounding(mdl: nn.Module, name: str, channels: int,
                    qp: qz.QParams) -> Callable[[jax.Array], jax.Array]:
  """AQuant rounding of an input with `channels` channels (last axis): its
  per-channel border parameters ``{name}_border_alpha`` / ``_beta`` in the
  `AQUANT` collection (zero, i.e. border 1/2, until set), result clipped to
  the grid (a border of 0 rounds the grid's top value up)."""
  alpha, beta = (mdl.variable(AQUANT, f"{name}_border_{k}", jnp.zeros,
                              (channels,), jnp.float32).value
                 for k in ("alpha", "beta"))
  return lambda t: jnp.clip(qz.border_round(t, alpha, beta), qp.qmin,  # noqa: E731
                            qp.qmax)


class QuantInitWarning(UserWarning):
  """A quantizer that could not be set from the data, or data that do not
  fit the quantizer's grid (see the module docstring)."""


def layer_name(mdl: nn.Module) -> str:
  """`mdl`'s module path, ``'/'``-joined and quoted, for messages."""
  path = "/".join(str(p) for p in mdl.scope.path)
  return repr(path) if path else f"(top-level {type(mdl).__name__})"


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


def host_call(mdl: nn.Module, fn: Callable[..., None], x: jax.Array,
              *args) -> jax.Array:
  """Calls ``fn(*args)`` on the host with the values of `args`; returns `x`,
  to be used in place of `x`.

  Concrete `args` are passed at once; traced ones by ``jax.debug.callback``,
  or, inside a loop body (`in_lifted_loop`), by a ``jax.pure_callback``
  whose zero result is added to `x`: it runs where `x` is used (not where
  the loop's outputs are dead code, as in a jitted ``init``) and drops out
  of flax's pass that creates the loop's broadcast variables.
  """
  if not any(isinstance(a, jax.core.Tracer) for a in args):
    fn(*args)
    return x
  if not in_lifted_loop(mdl):
    jax.debug.callback(fn, *args)
    return x

  def call(*values):
    fn(*values)
    return np.zeros((), np.float32)

  zero = jax.pure_callback(call, jax.ShapeDtypeStruct((), jnp.float32),
                           *map(lax.stop_gradient, args),
                           vmap_method="sequential")
  return x + zero.astype(x.dtype)


def lsq_step_init(mdl: nn.Module, name: str, view: jax.Array, grid: str,
                  bits: int, red: Sequence[int], is_weight: bool
                  ) -> jax.Array:
  """LSQ's initial step for operand `view` of `mdl`: from the data, or, for
  an input inside a loop body (`in_lifted_loop`), the same formula for an
  input of ones, with a `QuantInitWarning`."""
  if is_weight or not in_lifted_loop(mdl):
    return qz.lsq_init_step(view, grid, bits, red)
  start = 2.0 / float(qz.lsq_range(grid, bits)[1]) ** 0.5
  if not mdl.has_variable("params", f"{name}_lsq_step"):  # not a shape check
    warnings.warn(
        f"aqt_ext: layer {layer_name(mdl)}: its {name} LSQ step cannot be "
        "initialised from data inside a loop body (nn.scan / nn.RNN / "
        "nn.while_loop create their parameters without the loop's data); it "
        f"starts at {start:.3g}, LSQ's initialisation for an {name} of ones. "
        "Set it from data with aqt_ext.layers.calibrate_lsq_steps(model, "
        "variables, *example_args)", QuantInitWarning, stacklevel=2)
  return qz.lsq_init_step(jnp.ones(view.shape, view.dtype), grid, bits, red)


# Records of the calibrate_lsq_steps calls in progress (innermost last):
# params path -> (grid, bits, [mean |input| of each call]).
_LSQ_RECORDS: list[dict] = []


def _record_lsq_input(record: dict, key: tuple[str, ...], grid: str,
                      bits: int, mean: Any) -> None:
  record.setdefault(key, (grid, bits, []))[2].append(np.asarray(mean))


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
  _LSQ_RECORDS.append(record)
  try:
    jax.block_until_ready(jax.jit(functools.partial(model.apply, **kwargs))(
        variables, *args))
    jax.effects_barrier()
  finally:
    _LSQ_RECORDS.remove(record)
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


def _clips_negative(tq: TensorQuant) -> bool:
  """Whether the input grid of `tq` has no negative values."""
  if tq.method == "pact":
    return True
  if tq.method == "uniform":
    return tq.grid == "unsigned"
  return tq.method == "lsq" and qz.lsq_range(tq.grid, tq.bits)[0] <= 0


def _sign_check_due(mdl: nn.Module, name: str, tq: TensorQuant):
  """Whether this call of an input quantizer checks the input's sign: at
  init, when the quantizer's parameter is created, at the first update of a
  static range (a traced bool under jit)."""
  if mdl.is_initializing():
    return True
  if tq.method in ("lsq", "pact"):
    suffix = "lsq_step" if tq.method == "lsq" else "pact_alpha"
    return not mdl.has_variable("params", f"{name}_{suffix}")
  if tq.calibration == "static" and mdl.is_mutable_collection(STATS):
    if not mdl.has_variable(STATS, f"{name}_count"):
      return True
    return mdl.get_variable(STATS, f"{name}_count") == 0
  return False


def warn_negative_inputs(mdl: nn.Module, name: str, x: jax.Array,
                         tq: TensorQuant, due: Any = True) -> jax.Array:
  """A `QuantInitWarning` when `x`, an input that `tq` quantizes on a grid
  without negative values, has negative values and `due` is true; returns
  `x`, to be used in place of `x` (see `host_call`).

  Checked on the host where `x` is concrete, else by a callback (inside
  ``lax.cond`` on a traced `due`); warns at most once per trace, so once per
  layer for all the steps of a scan.
  """
  path = layer_name(mdl)
  grid = "PACT's [0, alpha]" if tq.method == "pact" else f"grid={tq.grid!r}"
  warned = []

  def report(frac, low):
    if warned or not frac > 0:
      return
    warned.append(True)
    warnings.warn(
        f"aqt_ext: layer {path}: its {name} is quantized on a grid without "
        f"negative values ({tq.method}, {grid}), which clips them to 0, but "
        f"{float(frac):.1%} of the values it sees are negative (min "
        f"{float(low):.3g}); use a signed input grid: layer_preset(..., "
        "signed_input=True) or TensorQuant(grid='full')", QuantInitWarning,
        stacklevel=2)

  def stats(v):
    v = lax.stop_gradient(v)
    return jnp.mean((v < 0).astype(jnp.float32)), jnp.min(v)

  traced_due = isinstance(due, jax.core.Tracer)
  if not traced_due and not bool(due):
    return x
  if not isinstance(x, jax.core.Tracer) and not traced_due:
    with jax.ensure_compile_time_eval():  # concrete even inside a jit trace
      report(*stats(x))
    return x

  def check(v):
    return host_call(mdl, report, v, *stats(v))

  return lax.cond(due, check, lambda v: v, x) if traced_due else check(x)


def quant_operand(mdl: nn.Module, name: str, x: jax.Array, tq: TensorQuant,
                  axes: qz.OperandAxes, *, is_weight: bool,
                  want_int: bool = False) -> Quantized:
  """Quantizes operand `x` of `mdl` by `tq`; creates the quantizer's state.

  Must be called from inside a compact method of `mdl`.
  """
  if tq.method == "float":
    return Quantized(x)
  if tq.method == "bf16":
    return Quantized(qz.bf16_round(x))
  if tq.method == "dq":
    from aqt_ext import dq  # pylint: disable=g-import-not-at-top
    if want_int and not is_weight:  # serving a DQ input (aqt_ext.serve)
      qp = dq.input_qparams(mdl, name, x, tq)
      return Quantized(None, qz.to_int(x, qp, tq.rounding), qp)
    fn = dq.quant_weight if is_weight else dq.quant_input
    return Quantized(fn(mdl, name, x, tq, axes))

  if not is_weight and _clips_negative(tq):
    due = _sign_check_due(mdl, name, tq)
    if due is not False:
      x = warn_negative_inputs(mdl, name, x, tq, due)

  grouped = tq.granularity == "per_group"
  if grouped:
    view, vaxes = qz.split_groups(x, axes, tq.group_size)
    red = qz.reduce_axes(view.ndim, vaxes, "per_channel")
  else:
    view, vaxes = x, axes
    red = qz.reduce_axes(x.ndim, axes, tq.granularity)
  bits, grid = tq.bits, tq.grid

  rounding = tq.rounding
  if tq.method == "uniform":
    rng = qz.observe_range(view, grid, red)
    if tq.calibration == "static":
      rng = _static_range(mdl, name, rng, tq.ema_decay)
    qp = qz.qparams_from_range(
        rng, grid, bits, "half_even" if rounding == "border" else rounding)
    if rounding == "border":
      rounding = border_rounding(mdl, name, x.shape[-1], qp)
    fake_fn = lambda v: qz.fake_quant(v, qp, rounding)  # noqa: E731
  elif tq.method == "lsq":
    step = mdl.param(f"{name}_lsq_step", lambda _: lsq_step_init(
        mdl, name, view, grid, bits, red, is_weight))
    if not is_weight and _LSQ_RECORDS:  # inside calibrate_lsq_steps
      mean = jnp.mean(jnp.abs(lax.stop_gradient(view)), axis=red,
                      keepdims=True)
      key = tuple(str(p) for p in mdl.scope.path) + (f"{name}_lsq_step",)
      view = host_call(mdl, functools.partial(
          _record_lsq_input, _LSQ_RECORDS[-1], key, grid, bits), view, mean)
    if is_weight:
      n = view.size // step.size
    else:  # features per example (paper: number of features)
      n = _num_per_scale(view.shape, vaxes.contracting)
    qp = qz.lsq_qparams(step, grid, bits)
    fake_fn = lambda v: qz.lsq_quant(v, step, grid, bits, n,  # noqa: E731
                                     tq.rounding)
  elif tq.method == "pact":
    alpha = mdl.param(f"{name}_pact_alpha",
                      lambda _: jnp.full((), tq.pact_init, jnp.float32))
    qp = qz.pact_qparams(alpha, bits)
    fake_fn = lambda v: qz.pact_quant(v, alpha, bits, tq.rounding)  # noqa: E731
  else:
    raise ValueError(f"TensorQuant.method={tq.method!r}")

  if want_int:
    return Quantized(None, qz.to_int(view, qp, rounding), qp, grouped)
  fake = fake_fn(view)
  return Quantized(fake.reshape(x.shape) if grouped else fake)


def _check_int_layouts(x_q: Quantized, w_q: Quantized, conv: bool):
  if conv and (x_q.grouped or w_q.grouped):
    raise ValueError("TensorQuant.granularity='per_group' cannot run with "
                     "LayerQuant.execution='int' in QuantConv; allowed: "
                     "'per_tensor', 'per_channel'")


def int_dense(x_q: Quantized, w_q: Quantized, out_dtype) -> jax.Array:
  """Integer dense: int32 accumulation, then * s_x * s_w."""
  xi, wi = x_q.ints, w_q.ints
  if xi.dtype != wi.dtype:
    xi, wi = xi.astype(jnp.int16), wi.astype(jnp.int16)
  sx, sw = x_q.qp.scale, w_q.qp.scale
  if not (x_q.grouped or w_q.grouped):
    acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return (acc.astype(out_dtype) * sx.astype(out_dtype)
            * sw.reshape(sw.shape[-1:]).astype(out_dtype))
  # Grouped: one int dot per group (batch dim G), rescale, sum over groups.
  g = (x_q.ints.shape[-1] if x_q.grouped else w_q.ints.shape[1])
  if not x_q.grouped:
    xi = xi.reshape(xi.shape[:-1] + (xi.shape[-1] // g, g))
    sx = jnp.expand_dims(sx, -1) if sx.ndim == xi.ndim - 1 else sx
  if not w_q.grouped:
    wi = wi.reshape((wi.shape[0] // g, g) + wi.shape[1:])
    sw = sw.reshape((1, 1) + sw.shape[-1:])
  acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (1,)), ((xi.ndim - 2,),
                                                           (0,))),
                        preferred_element_type=jnp.int32)  # (G, B..., O)
  nb = xi.ndim - 2
  sx_t = jnp.moveaxis(jnp.broadcast_to(sx, xi.shape[:-1] + (1,))
                      if sx.size > 1 else sx.reshape((1,) * xi.ndim),
                      -2, 0)  # (G|1, B..., 1)
  sw_t = sw.reshape((sw.shape[0],) + (1,) * nb + sw.shape[-1:])
  out = acc.astype(out_dtype) * sx_t.astype(out_dtype) * sw_t.astype(out_dtype)
  return out.sum(axis=0)


def resolve_quant(mdl: nn.Module) -> LayerQuant:
  """The layer's LayerQuant; a ModelQuant is resolved by the module path."""
  q = mdl.quant
  if isinstance(q, ModelQuant):
    return q.for_path("/".join(str(p) for p in mdl.scope.path))
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
    cfg = resolve_quant(self)
    want_int = cfg.execution == "int"
    x_axes = qz.OperandAxes((inputs.ndim - 1,), inputs.ndim - 1)
    w_axes = qz.OperandAxes((0,), 0)
    x_q = quant_operand(self, "input", inputs, cfg.input, x_axes,
                        is_weight=False, want_int=want_int)
    w_q = quant_operand(self, "kernel", kernel, cfg.weight, w_axes,
                        is_weight=True, want_int=want_int)
    if want_int:
      y = int_dense(x_q, w_q, inputs.dtype)
    else:
      y = lax.dot_general(x_q.fake, w_q.fake,
                          (((inputs.ndim - 1,), (0,)), ((), ())),
                          precision=self.precision)
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
    nsp = len(kernel_shape) - 2
    kernel = self.param("kernel", self.kernel_init, kernel_shape,
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)

    cfg = resolve_quant(self)
    want_int = cfg.execution == "int"
    x_axes = qz.OperandAxes(tuple(range(1, nsp + 2)), nsp + 1)
    w_axes = qz.OperandAxes(tuple(range(nsp + 1)), nsp)
    x_q = quant_operand(self, "input", x, cfg.input, x_axes, is_weight=False,
                        want_int=want_int)
    w_q = quant_operand(self, "kernel", kernel, cfg.weight, w_axes,
                        is_weight=True, want_int=want_int)
    if want_int:
      _check_int_layouts(x_q, w_q, conv=True)
      y = int_conv(x_q, w_q, conv, x.dtype)
    else:
      y = lax.conv_general_dilated(x_q.fake, w_q.fake,
                                   precision=self.precision, **conv)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y.reshape(batch_shape + y.shape[1:]) if batch_shape != (
        y.shape[0],) else y


def conv_geometry(mdl: "QuantConv", inputs: jax.Array):
  """Validated geometry of a QuantConv call.

  Returns (x, batch_shape, kernel_shape, conv_kwargs): the input with its
  leading batch dims flattened into one, those dims, the kernel shape, and
  the keyword arguments of `lax.conv_general_dilated`.
  """
  kernel_size = ((mdl.kernel_size,) if isinstance(mdl.kernel_size, int)
                 else tuple(mdl.kernel_size))
  nsp = len(kernel_size)

  def tup(v, name):
    if v is None:
      return (1,) * nsp
    if isinstance(v, int):
      return (v,) * nsp
    if len(v) != nsp:
      raise ValueError(f"QuantConv.{name}={v!r} must have {nsp} entries")
    return tuple(v)

  if isinstance(mdl.padding, str) and mdl.padding not in ("SAME", "VALID"):
    raise ValueError(f"QuantConv.padding={mdl.padding!r} is not supported;"
                     " allowed: 'SAME', 'VALID', int or (lo, hi) pairs")
  batch_shape = inputs.shape[:-(nsp + 1)]
  x = inputs.reshape((-1,) + inputs.shape[-(nsp + 1):])
  in_features = x.shape[-1]
  if in_features % mdl.feature_group_count:
    raise ValueError(
        f"QuantConv.feature_group_count={mdl.feature_group_count} must "
        f"divide the input features ({in_features})")
  kernel_shape = kernel_size + (in_features // mdl.feature_group_count,
                                mdl.features)
  conv = dict(window_strides=tup(mdl.strides, "strides"),
              padding=canonicalize_padding(mdl.padding, nsp),
              lhs_dilation=tup(mdl.input_dilation, "input_dilation"),
              rhs_dilation=tup(mdl.kernel_dilation, "kernel_dilation"),
              dimension_numbers=lax.conv_dimension_numbers(
                  x.shape, kernel_shape, conv_spec(nsp)),
              feature_group_count=mdl.feature_group_count)
  return x, batch_shape, kernel_shape, conv


def int_conv(x_q: Quantized, w_q: Quantized, conv: dict, out_dtype
             ) -> jax.Array:
  """Integer convolution: int32 accumulation, then * s_x * s_w."""
  xi, wi = x_q.ints, w_q.ints
  if xi.dtype != wi.dtype:
    xi, wi = xi.astype(jnp.int16), wi.astype(jnp.int16)
  acc = lax.conv_general_dilated(xi, wi, preferred_element_type=jnp.int32,
                                 **conv)
  sx, sw = x_q.qp.scale, w_q.qp.scale
  return (acc.astype(out_dtype) * sx.astype(out_dtype)
          * sw.reshape(sw.shape[-1:]).astype(out_dtype))


def conv_spec(nsp: int):
  sp = "HWDXYZ"[:nsp] if nsp <= 3 else None
  if sp is None:
    raise ValueError(f"QuantConv supports 1-3 spatial dims, got {nsp}")
  return ("N" + sp + "C", sp + "IO", "N" + sp + "C")
