"""ONNX export: a trained aqt_ext model as a QDQ graph for ONNX Runtime.

``to_onnx(model, variables, x, call_kwargs={'train': False})`` returns an
``onnx.ModelProto``; `save` writes it atomically. The graph is made from
the model's *served* forward (`aqt_ext.serve`): the model is traced to a
jaxpr in which every integer layer is one opaque equation carrying its
`aqt_ext.serve.IntLayer` record (the integers and scales QAT learned or
calibrated), and each equation becomes ONNX nodes:

* An integer conv / dense layer: ``QuantizeLinear`` of its input with the
  stored input scale and zero point (uint8 for unsigned and asymmetric
  grids, int8 for signed ones), a ``Clip`` on the integers where the grid is
  narrower than 8 bits (a 4-bit unsigned input is clipped to [0, 15]),
  ``DequantizeLinear``; the integer kernel as an int8 initializer with its
  per-output-channel scale through ``DequantizeLinear(axis=0)``; then
  ``Conv`` / ``MatMul`` with the bias. ONNX Runtime fuses a
  DQ -> Conv -> Q group into ``QLinearConv`` and DQ -> MatMul into
  ``MatMulIntegerToFloat``. Kernels of 2-8 bits are all stored in int8:
  ONNX int4 initializers were measured not to fuse in ORT 1.32 (they ran as
  dequantised float, 0.7x the float graph; experiments/RESULTS.md).
* Per-channel affine ops on an integer conv's output (BatchNorm in eval
  mode, a bias) are folded into its weight scales and bias: the integers
  stay as trained, the scale of output channel c becomes ``s_c * g_c``
  (the channel's integers negated where ``g_c < 0``).
* Everything else runs in float: ReLU, adds, pooling, reshape, float
  layers. The graph is NCHW inside (ONNX's convolution layout); the input
  and output keep the model's layout (NHWC images). An op the exporter does
  not know is refused, naming the JAX primitive and the module path.

Requantization [design]: ORT's integer conv kernel (``QLinearConv``) needs a
quantized output. Where QAT's next op is a quantized layer's input (after a
ReLU), that layer's own ``QuantizeLinear`` is the output quantization, so
nothing is added. Where QAT quantizes the activation itself (a `QuantAct`:
the zoo ResNets' ``_rR`` spec quantizes what meets each residual add), its
stored scale is the conv's output quantization (a Q/DQ pair that ORT fuses
into the kernel). Where QAT does neither (a conv before a residual add of a
model trained without ``_rR``), ``requantize=True`` adds an int8 Q/DQ pair
on the conv's output with the scale ``max|y| / 127`` calibrated on
`calibration` inputs; that rounding is not in the QAT model and is where
ORT's output departs from QAT eval (the fast graph). With
``requantize=False`` those convs run as float convs on dequantised integers
(the exact graph, slower). ``float_layers`` writes chosen layers as float
ops on QAT's fake-quant operands (see `to_onnx`).

ORT's int32 bias [design]: a fused kernel adds the (folded) bias rounded to
its accumulator grid, ``s_x * s_w``, which QAT does not; at 4 bits that
flips some next-layer integers, and the flips compound through a deep
network. The exporter makes that grid finer without changing a weight or an
input: each output channel's integers are stored times ``k_c = floor(127 /
max |w_c|)`` with the scale over ``k_c`` (always), and in the exact graph
each narrow unsigned input's integers times ``k_x = floor(255 / q_max)``
(17 for 4 bits; a DequantizeLinear / QuantizeLinear pair, which costs time
and so is left out of the fast graph). The saturating u8 x s8 pairs this
makes are exact on CPUs with VNNI (AVX-512 VNNI / AVX-VNNI) and ARM; ORT's
AVX2-only kernels may saturate them.

Numerics against the served model (``LayerQuant.execution='int'``): the
same integers (``QuantizeLinear`` rounds half to even and saturates as
`aqt_ext.core.quantizers.to_int` clips then rounds), summed in ORT's own
order, so outputs differ by float rounding, and a value on a rounding edge
of the next layer's grid can land one level apart. Measured on the default
ResNet-20 (experiments/RESULTS.md): without ``_rR``, the exact graph
predicts as QAT eval on 100 % of the Fashion-MNIST test images, the fast
one on 96.9 %; trained with ``_r8``, every conv fused, 97.7 % (99.3 % with
the inputs widened, 99.8 % with the first conv and the projections as
float ops): there the only departure left is ORT's rounding of each bias to
the int32 grid, and a 4-bit network compounds those one-level flips.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex
import numpy as np

from aqt_ext import serve
from aqt_ext.core import quantizers as qz

try:
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top
except ImportError as e:  # pragma: no cover - the serve extra
  raise ImportError("aqt_ext.export.onnx needs the 'serve' extra: pip install "
                    "'aqt_ext[serve]' (onnx, onnxruntime)") from e

OPSET = 21
INPUT, OUTPUT = "input", "output"
NCHW = (0, 3, 1, 2)  # physical NCHW of a logical NHWC tensor

# ---------------------------------------------------------------------------
# Tracing: every integer layer becomes one equation.
# ---------------------------------------------------------------------------

_INT_LAYER = jex.Primitive("aqt_int_layer")
_INT_LAYER.def_abstract_eval(lambda x, *, index, out: out)
# A quantized activation (`QuantAct`) with its stored scale.
_QUANT_ACT = jex.Primitive("aqt_quant_act")
_QUANT_ACT.def_abstract_eval(
    lambda x, *, index: jax.core.ShapedArray(x.shape, x.dtype))


@dataclasses.dataclass(frozen=True)
class ActRecord:
  """A quantized activation: its path, TensorQuant and stored scale."""

  path: str
  quant: Any
  qp: qz.QParams


# Grids whose per-tensor dynamic scale the graph computes (no zero point).
_DYNAMIC_GRIDS = ("full", "restricted", "unsigned")


class _Recorder:
  """Interceptor: integer layers bind `_INT_LAYER` (their record kept by
  index); every other module runs its own code."""

  def __init__(self):
    self.records: list[serve.IntLayer] = []
    self.acts: list[ActRecord] = []

  def __call__(self, next_fun, args, kwargs, context):
    mdl = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    tq = serve.served_act(mdl)
    if tq is not None:
      return self.act(mdl, tq, *args, **kwargs)
    kind = serve.served_kind(mdl)
    if kind is None:
      return next_fun(*args, **kwargs)
    with jax.ensure_compile_time_eval():  # the stored arrays, concrete
      rec = serve.int_layer(mdl, kind, *args, **kwargs)
    _check_layer(rec)
    self.records.append(rec)
    x = rec.ops.x
    out = jax.core.ShapedArray(_out_shape(rec), x.dtype)
    return _INT_LAYER.bind(x, index=len(self.records) - 1, out=out)

  def act(self, mdl, tq, x):
    path = serve._path(mdl)  # pylint: disable=protected-access
    with jax.ensure_compile_time_eval():
      qp = serve.act_qparams(mdl, tq)
    if qp is None:
      raise ValueError(
          f"activation {path!r} is quantized with a dynamic range "
          f"(method={tq.method!r}, calibration={tq.calibration!r}): ONNX "
          "export needs its stored scale; use calibration='static' (the "
          "spec's _rR), LSQ or PACT")
    if tq.bits > 8 or qp.qmin < -128 or qp.qmax > 255:
      raise ValueError(f"activation {path!r}: its grid [{qp.qmin}, "
                       f"{qp.qmax}] does not fit 8 bits")
    self.acts.append(ActRecord(path, tq, jax.tree.map(np.asarray, qp)))
    return _QUANT_ACT.bind(x, index=len(self.acts) - 1)


def _check_layer(rec: serve.IntLayer) -> None:
  where = f"layer {rec.path!r}"
  if rec.kind not in ("dense", "conv"):
    raise ValueError(f"{where}: ONNX export supports integer dense and conv "
                     f"layers, not {rec.kind!r}")
  if rec.input_qp is None and (rec.input.granularity != "per_tensor" or
                               rec.input.grid not in _DYNAMIC_GRIDS):
    raise ValueError(
        f"{where} quantizes its input per batch with granularity="
        f"{rec.input.granularity!r}, grid={rec.input.grid!r}: ONNX export "
        "computes dynamic input scales per tensor on the grids "
        f"{_DYNAMIC_GRIDS} (ORT's integer conv takes one input scale); use "
        "one of those, or a stored input scale (static range, LSQ, PACT)")
  if rec.input_qp is not None and np.size(rec.input_qp.scale) != 1:
    raise ValueError(f"{where}: the input scale has shape "
                     f"{np.shape(rec.input_qp.scale)}; ONNX export supports "
                     "one input scale per layer (per_tensor)")
  if rec.kernel.ints is None:
    raise ValueError(f"{where}: DQ lookup-table kernels (non-uniform levels) "
                     "have no ONNX integer form; export DQ models whose "
                     "levels are uniform, or serve them with aqt_ext.serve")
  if rec.kernel.grouped:
    raise ValueError(f"{where}: per_group weight scales are not supported by "
                     "the ONNX export (per_channel and per_tensor are)")
  if rec.kind == "conv":
    c = rec.ops.conv
    if any(d != 1 for d in c["lhs_dilation"]):
      raise ValueError(f"{where}: input dilation has no ONNX Conv form")
    if len(rec.ops.kernel_shape) != 4 or rec.ops.batch_shape != (
        rec.ops.x.shape[0],):
      raise ValueError(f"{where}: ONNX export supports 2-D convolutions on "
                       "(N, H, W, C) inputs")
  if rec.kind == "dense" and rec.ops.x.ndim < 2:
    raise ValueError(f"{where}: a dense layer's input needs a batch axis")


def _out_shape(rec: serve.IntLayer) -> tuple[int, ...]:
  x, ks = rec.ops.x, rec.ops.kernel_shape
  if rec.kind == "dense":
    return x.shape[:-1] + (ks[-1],)
  return jax.eval_shape(
      lambda a, w: lax.conv_general_dilated(a, w, **rec.ops.conv),
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      jax.ShapeDtypeStruct(ks, x.dtype)).shape


def trace(model: nn.Module, variables: Mapping, example_input: Any, *,
          call_kwargs: Mapping[str, Any] | None = None
          ) -> tuple[jex.ClosedJaxpr, list[serve.IntLayer], list[ActRecord]]:
  """The served model's jaxpr on `example_input` (its integer layers as
  `_INT_LAYER` equations, its quantized activations as `_QUANT_ACT`), the
  layers' records and the activations'."""
  kwargs = dict(call_kwargs or {})
  args = serve.example_args(example_input)
  if len(args) != 1:
    raise ValueError(f"ONNX export takes models of one input, got "
                     f"{len(args)} positional inputs")
  v, ints, recorder = serve.record_export(model, variables, example_input,
                                          call_kwargs=kwargs)
  layers = _Recorder()
  if recorder.layers:
    tree = serve.serving_tree(v, ints, recorder.layers)
    apply = lambda x: serve.serving_apply(model, tree, x, **kwargs)  # noqa: E731
  else:  # a float model: its own forward
    apply = lambda x: model.apply(v, x, **kwargs)  # noqa: E731

  def fn(x):
    with nn.intercept_methods(layers):
      return apply(x)

  closed = jax.make_jaxpr(fn)(jnp.asarray(args[0]))
  return closed, layers.records, layers.acts


# ---------------------------------------------------------------------------
# Graph building.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _T:
  """An ONNX tensor: its name, its logical (JAX) shape, and `perm`: the
  ONNX tensor is ``transpose(logical, perm)`` (None: the same layout)."""

  name: str
  shape: tuple[int, ...]
  perm: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Pending:
  """An integer layer's output not yet emitted, times `mul` plus `add`
  per output channel (folded BatchNorm and biases)."""

  x: _T
  index: int
  shape: tuple[int, ...]
  mul: np.ndarray
  add: np.ndarray


_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh",
          "logistic": "Sigmoid", "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf",
          "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "sin": "Sin",
          "cos": "Cos"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
           "max": "Max", "min": "Min", "pow": "Pow"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin"}
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint")
_IDENTITY = ("copy", "copy_p", "optimization_barrier")


def _sub_jaxpr(eqn) -> jex.ClosedJaxpr | jex.Jaxpr:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      return eqn.params[key]
  raise KeyError(eqn.primitive.name)


def _onnx_dtype(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Builder:
  """Walks a jaxpr and emits ONNX nodes (see the module docstring)."""

  def __init__(self, records: Sequence[serve.IntLayer],
               requant_scales: Mapping[int, float] | None = None,
               widen: bool = True, widen_inputs: bool = False,
               acts: Sequence[ActRecord] = (),
               float_layers: str | None = None):
    self.records = records
    self.float_layers = float_layers
    self.acts = acts
    self.widen = widen
    self.widen_inputs = widen_inputs
    # Layer index -> the (scale, zero point, lo, hi) of its int8 output.
    self.requant = {i: (np.float32(r), 0, -128, 127)
                    for i, r in (requant_scales or {}).items()}
    self.nodes: list = []
    self.inits: list = []
    self.names: set[str] = set()
    self.emitted: dict[int, tuple] = {}  # id(pending) -> (it, its tensor)
    self.layer_outputs: dict[int, _T] = {}  # record index -> conv output
    self.batch = None

  # Names, constants, nodes. -------------------------------------------------

  def name(self, hint: str) -> str:
    base = hint.replace("/", ".") or "t"
    n, i = base, 1
    while n in self.names:
      i += 1
      n = f"{base}_{i}"
    self.names.add(n)
    return n

  def const(self, value: Any, hint: str = "c") -> str:
    n = self.name(hint)
    self.inits.append(numpy_helper.from_array(np.asarray(value), n))
    return n

  def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
    out = self.name(hint)
    self.nodes.append(helper.make_node(op, list(inputs), [out],
                                       name=self.name("n." + hint), **attrs))
    return out

  # Values. ------------------------------------------------------------------

  def tensor(self, v: Any, where: str) -> _T:
    """`v` (a constant, an ONNX tensor or a pending layer) as a tensor."""
    if isinstance(v, _T):
      return v
    if isinstance(v, _Pending):
      if id(v) not in self.emitted:  # (kept with v: its id stays v's)
        self.emitted[id(v)] = (v, self.emit_layer(v))
      return self.emitted[id(v)][1]
    a = np.asarray(v)
    if a.dtype == np.float64:
      a = a.astype(np.float32)
    return _T(self.const(a, "const"), a.shape)

  def layout(self, v: Any, perm: tuple[int, ...] | None, where: str) -> _T:
    """`v` as a tensor laid out by `perm` (None: the logical layout)."""
    if not isinstance(v, (_T, _Pending)):
      a = np.asarray(v)
      if a.dtype == np.float64:
        a = a.astype(np.float32)
      if perm is not None and a.ndim <= len(perm):
        r = a.reshape((1,) * (len(perm) - a.ndim) + a.shape)
        return _T(self.const(np.transpose(r, perm), "const"), r.shape, perm)
      return _T(self.const(a, "const"), a.shape)
    t = self.tensor(v, where)
    if t.perm == perm:
      return t
    cur = t.perm or tuple(range(len(t.shape)))
    want = perm or tuple(range(len(t.shape)))
    # physical_out = transpose(physical_in, q), q[j] = cur.index(want[j]).
    q = [cur.index(a) for a in want]
    return _T(self.node("Transpose", [t.name], "transpose", perm=q), t.shape,
              perm)

  # The integer layer. -------------------------------------------------------

  def emit_layer(self, p: _Pending) -> _T:
    rec = self.records[p.index]
    hint = rec.path or "layer"
    qp = rec.input_qp
    lo, hi = (int(v) for v in qz.grid_range(rec.input.grid, rec.input.bits))
    unsigned = lo >= 0
    ctype = np.uint8 if unsigned else np.int8
    zp = 0 if qp is None or qp.zero_point is None else int(np.round(
        np.asarray(qp.zero_point).reshape(())))
    if not -128 <= zp <= (255 if unsigned else 127):
      raise ValueError(f"layer {rec.path!r}: input zero point {zp} does not "
                       "fit 8 bits")
    conv = rec.kind == "conv"
    x = self.layout(p.x, NCHW if conv else None, hint)
    if qp is not None:
      sx = self.const(np.float32(np.asarray(qp.scale).reshape(())),
                      hint + ".input_scale")
    else:  # per batch, as `qz.observe_range` / `qz.qparams_from_range`
      r = x.name if unsigned else self.node("Abs", [x.name], hint + ".abs")
      r = self.node("ReduceMax", [r], hint + ".range", keepdims=0)
      zero = self.node("LessOrEqual", [r, self.const(np.float32(0),
                                                     "zero")], hint + ".empty")
      r = self.node("Where", [zero, self.const(np.float32(1), "one"), r],
                    hint + ".guard")
      sx = self.node("Div", [r, self.const(np.float32(qz.grid_bound(
          rec.input.grid, rec.input.bits)), hint + ".bound")],
                     hint + ".input_scale")
    as_float = bool(self.float_layers) and re.search(self.float_layers,
                                                      rec.path) is not None
    if as_float:  # QAT's fake quant in float ops: nothing for ORT to fuse
      dq = self.fake_quant(x.name, sx, zp, lo, hi, hint)
    else:
      zx = self.const(ctype(zp), hint + ".input_zero_point")
      q = self.quantize(x.name, sx, zx, ctype, lo, hi, hint + ".")
      kx = 255 // hi if (self.widen_inputs and unsigned and zp == 0
                         and hi < 255) else 1
      if kx > 1:  # the same integers times kx, on a kx times finer scale
        sx_w = self.node("Div", [sx, self.const(np.float32(kx), "kx")],
                         hint + ".input_scale_widened")
        q = self.node("QuantizeLinear", [self.node(
            "DequantizeLinear", [q, sx, zx], hint + ".dq_narrow"), sx_w, zx],
                      hint + ".q_widened")
        sx = sx_w
      dq = self.node("DequantizeLinear", [q, sx, zx], hint + ".dq")
    ints = np.asarray(rec.kernel.ints).astype(np.int32)
    ws = np.asarray(rec.kernel.qp.scale, np.float32)
    out = ints.shape[-1]
    ws = np.broadcast_to(ws.reshape(-1), (out,)) if ws.size in (1, out) else (
        None)
    if ws is None:
      raise ValueError(f"layer {rec.path!r}: weight scale of shape "
                       f"{np.shape(rec.kernel.qp.scale)} is not per output "
                       "channel or per tensor")
    mul, add = p.mul.astype(np.float64), p.add.astype(np.float64)
    # Each output channel's integers times k_c = floor(127 / max |w_c|) and
    # its scale over k_c: the same weights, but ORT's int32 bias (rounded to
    # s_x * s_w) gets a k_c times finer grid (15x at 4 bits).
    amax = np.abs(ints.reshape(-1, out)).max(axis=0)
    k = np.maximum(127 // np.maximum(amax, 1), 1) if (
        self.widen and not as_float) else 1
    sign = np.where(mul < 0, -1, 1)
    ints = ints * (sign * k)  # the trained integers, up to sign and k
    scale = (ws.astype(np.float64) * np.abs(mul) / k).astype(np.float32)
    bias = np.zeros((out,)) if rec.bias is None else np.asarray(
        rec.bias, np.float64)
    bias = (bias * mul + add).astype(np.float32)
    if conv:
      w = np.transpose(ints, (3, 2, 0, 1)).astype(np.int8)  # HWIO -> OIHW
      axis = 0
    else:
      w = ints.astype(np.int8)  # (K, N)
      axis = 1
    if as_float:  # the dequantized kernel
      shape = [1] * w.ndim
      shape[axis] = out
      dw = self.const(w.astype(np.float32) * scale.reshape(shape),
                      hint + ".kernel_float")
    else:
      wq = self.const(w, hint + ".kernel")
      dw = self.node("DequantizeLinear", [wq, self.const(
          scale, hint + ".kernel_scale"), self.const(
              np.zeros((out,), np.int8), hint + ".kernel_zero")],
                     hint + ".dw", axis=axis)
    b = self.const(bias, hint + ".bias")
    if conv:
      c = rec.ops.conv
      pads = c["padding"]
      spatial = rec.ops.x.shape[1:3]
      window = [(k - 1) * d + 1 for k, d in zip(rec.ops.kernel_shape[:2],
                                                c["rhs_dilation"])]
      if isinstance(pads, str):
        pads = lax.padtype_to_pads(spatial, window, c["window_strides"], pads)
      y = self.node("Conv", [dq, dw, b], hint + ".conv",
                    strides=list(c["window_strides"]),
                    dilations=list(c["rhs_dilation"]),
                    group=int(c["feature_group_count"]),
                    pads=[int(pads[0][0]), int(pads[1][0]), int(pads[0][1]),
                          int(pads[1][1])],
                    kernel_shape=list(rec.ops.kernel_shape[:2]))
      t = _T(y, p.shape, NCHW)
    else:
      y = self.node("MatMul", [dq, dw], hint + ".matmul")
      t = _T(self.node("Add", [y, b], hint + ".bias_add"), p.shape)
    self.layer_outputs[p.index] = t
    if p.index in self.requant:
      t = self.qdq(t, *self.requant[p.index], hint + ".out")
    return t

  def fake_quant(self, x: str, sx: str, zp: int, lo: int, hi: int,
                 hint: str) -> str:
    """`x` quantized and dequantized in float ops, as
    `aqt_ext.core.quantizers.quantize` / `dequantize` compute it
    (``clip(x * (1/s) + z)``, rounded half to even, ``(q - z) * s``)."""
    t = self.node("Mul", [x, self.node("Reciprocal", [sx], hint + ".rscale")],
                  hint + ".t")
    if zp:
      t = self.node("Add", [t, self.const(np.float32(zp), "zp")], hint + ".tz")
    t = self.node("Clip", [t, self.const(np.float32(lo), "lo"),
                           self.const(np.float32(hi), "hi")], hint + ".tclip")
    q = self.node("Round", [t], hint + ".round")
    if zp:
      q = self.node("Sub", [q, self.const(np.float32(zp), "zp")], hint + ".qz")
    return self.node("Mul", [q, sx], hint + ".fake_quant")

  def qdq(self, t: _T, scale, zp: int, lo: int, hi: int, hint: str) -> _T:
    """QuantizeLinear (then a Clip where the grid is narrower than its 8-bit
    type) and DequantizeLinear of `t`: int8 for a signed grid, uint8 for
    an unsigned one."""
    ctype = np.uint8 if lo >= 0 else np.int8
    s = self.const(np.float32(scale), hint + "_scale")
    z = self.const(ctype(zp), hint + "_zero_point")
    q = self.quantize(t.name, s, z, ctype, lo, hi, hint + "_")
    return dataclasses.replace(t, name=self.node(
        "DequantizeLinear", [q, s, z], hint + "_dq"))

  def quantize(self, x: str, s: str, z: str, ctype, lo: int, hi: int,
               prefix: str) -> str:
    """QuantizeLinear of `x` to `ctype`, then a Clip where the grid [lo, hi]
    is narrower than the type: the grid's range bounds q itself (zero point
    included), as in `qz.quantize`."""
    q = self.node("QuantizeLinear", [x, s, z], prefix + "q")
    info = np.iinfo(ctype)
    if (lo, hi) != (info.min, info.max):
      q = self.node("Clip", [q, self.const(ctype(lo), prefix + "qmin"),
                             self.const(ctype(hi), prefix + "qmax")],
                    prefix + "clip")
    return q

  def act(self, index: int, x: Any, use: int, where: str) -> _T:
    """A quantized activation: on an integer layer's output that nothing
    else reads, that layer's output quantization (ORT fuses it into the
    integer kernel); elsewhere a Q/DQ pair."""
    rec = self.acts[index]
    qp = rec.qp
    zp = 0 if qp.zero_point is None else int(np.round(
        np.asarray(qp.zero_point).reshape(())))
    lo, hi = int(qp.qmin), int(qp.qmax)
    spec = (np.float32(np.asarray(qp.scale).reshape(())), zp, lo, hi)
    if isinstance(x, _Pending) and use == 1 and id(x) not in self.emitted:
      self.requant[x.index] = spec
      return self.tensor(x, where)
    return self.qdq(self.tensor(x, where), *spec, rec.path or "act")

  # Equations. ---------------------------------------------------------------

  def run(self, jaxpr: jex.Jaxpr, consts: Sequence[Any],
          args: Sequence[Any], scope: str = "") -> list[Any]:
    """`jaxpr`'s outputs on `args`; `scope`: the module path of the call it
    is the body of (names in its equations are relative to it)."""
    env: dict[Any, Any] = {}
    uses: dict[Any, int] = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if isinstance(v, jex.Var):
          uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
      if isinstance(v, jex.Var):
        uses[v] = uses.get(v, 0) + 1

    def read(v):
      return v.val if isinstance(v, jex.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = np.asarray(c)
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins, [uses.get(v, 0) if isinstance(v, jex.Var)
                                 else 0 for v in eqn.invars], scope)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list, uses: list[int], scope: str) -> list:
    prim = eqn.primitive.name
    inner = str(eqn.source_info.name_stack)
    where = "/".join(p for p in (scope, inner) if p) or "<top>"
    if prim == _QUANT_ACT.name:
      return [self.act(eqn.params["index"], ins[0], uses[0], where)]
    if prim == _INT_LAYER.name:
      (x,) = ins
      index = eqn.params["index"]
      out = self.records[index].ops.kernel_shape[-1]
      return [_Pending(self.tensor(x, where), index,
                       tuple(eqn.outvars[0].aval.shape), np.ones((out,)),
                       np.zeros((out,)))]
    if all(not isinstance(v, (_T, _Pending)) for v in ins):
      return self.fold(eqn, ins, where)
    if prim in _CALLS:
      sub = _sub_jaxpr(eqn)
      jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (
          sub, ())
      args = [self.tensor(v, where) if isinstance(v, _Pending) and u > 1
              else v for v, u in zip(ins, uses)]
      return self.run(jaxpr, consts, args, "" if where == "<top>" else where)
    handler = getattr(self, "op_" + prim, None)
    if handler is not None:
      return handler(eqn, ins, uses, where)
    if prim in _UNARY:
      t = self.tensor(ins[0], where)
      return [_T(self.node(_UNARY[prim], [t.name], prim), t.shape, t.perm)]
    if prim in _BINARY:
      return [self.binary(prim, ins, uses, tuple(eqn.outvars[0].aval.shape),
                          where)]
    if prim in _IDENTITY:
      return [ins[0]]
    raise ValueError(f"ONNX export: the JAX op {prim!r} (in module "
                     f"{where!r}) has no ONNX translation here; supported: "
                     f"{sorted(self.supported())}")

  @classmethod
  def supported(cls) -> set[str]:
    return ({n[3:] for n in dir(cls) if n.startswith("op_")} | set(_UNARY)
            | set(_BINARY) | set(_CALLS) | set(_IDENTITY))

  def fold(self, eqn, ins, where) -> list:
    """An equation on constants only: evaluated here (constant folding)."""
    with jax.ensure_compile_time_eval():
      out = eqn.primitive.bind(*ins, **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o) for o in outs]

  def binary(self, prim: str, ins: list, uses: list[int],
             shape: tuple[int, ...], where: str):
    a, b = ins
    # Fold a per-channel affine op into a pending integer layer.
    for p, c, first in ((a, b, True), (b, a, False)):
      if (isinstance(p, _Pending) and not isinstance(c, (_T, _Pending))
          and prim in ("add", "sub", "mul", "div")
          and uses[0 if first else 1] == 1):
        vec = _channel_vector(np.asarray(c), p.shape)
        if vec is None or (prim in ("sub", "div") and not first):
          break
        if prim == "add":
          return dataclasses.replace(p, add=p.add + vec)
        if prim == "sub":
          return dataclasses.replace(p, add=p.add - vec)
        if prim == "mul":
          return dataclasses.replace(p, mul=p.mul * vec, add=p.add * vec)
        return dataclasses.replace(p, mul=p.mul / vec, add=p.add / vec)
    if prim == "max":
      for x, c in ((a, b), (b, a)):
        if not isinstance(c, (_T, _Pending)) and np.all(np.asarray(c) == 0):
          t = self.tensor(x, where)
          return _T(self.node("Relu", [t.name], "relu"), t.shape, t.perm)
    perm = None
    for v in (a, b):
      if isinstance(v, (_T, _Pending)):
        t = self.tensor(v, where)
        if t.perm is not None and len(t.shape) == len(shape):
          perm = t.perm
          break
    ta, tb = self.layout(a, perm, where), self.layout(b, perm, where)
    return _T(self.node(_BINARY[prim], [ta.name, tb.name], prim), shape, perm)

  # Handlers: op_<primitive>(eqn, ins, uses, where) -> list of outputs. -------

  def op_convert_element_type(self, eqn, ins, uses, where):
    t = self.tensor(ins[0], where)
    new = np.dtype(eqn.params["new_dtype"])
    if new == np.dtype(eqn.invars[0].aval.dtype):
      return [ins[0]]
    return [_T(self.node("Cast", [t.name], "cast", to=_onnx_dtype(new)),
               t.shape, t.perm)]

  def op_integer_pow(self, eqn, ins, uses, where):
    t = self.tensor(ins[0], where)
    y = eqn.params["y"]
    if y == 2:
      return [_T(self.node("Mul", [t.name, t.name], "square"), t.shape,
                 t.perm)]
    e = self.const(np.float32(y), "exponent")
    return [_T(self.node("Pow", [t.name, e], "pow"), t.shape, t.perm)]

  def op_rsqrt(self, eqn, ins, uses, where):
    t = self.tensor(ins[0], where)
    s = self.node("Sqrt", [t.name], "sqrt")
    return [_T(self.node("Reciprocal", [s], "rsqrt"), t.shape, t.perm)]

  def op_stop_gradient(self, eqn, ins, uses, where):
    return [ins[0]]

  def op_clamp(self, eqn, ins, uses, where):
    lo, x, hi = ins
    if isinstance(lo, (_T, _Pending)) or isinstance(hi, (_T, _Pending)):
      raise ValueError(f"ONNX export: clamp with tensor bounds (in "
                       f"{where!r}) is not supported")
    t = self.tensor(x, where)
    dt = np.dtype(eqn.invars[1].aval.dtype)
    return [_T(self.node("Clip", [t.name, self.const(np.asarray(lo, dt)),
                                  self.const(np.asarray(hi, dt))], "clip"),
               t.shape, t.perm)]

  def op_reshape(self, eqn, ins, uses, where):
    t = self.layout(ins[0], None, where)
    new = [int(d) for d in eqn.params["new_sizes"]]
    if self.batch is not None and new and new[0] == self.batch and (
        t.shape and t.shape[0] == self.batch):
      new[0] = 0  # copy the batch size from the input at run time
    shape = self.const(np.asarray(new, np.int64), "shape")
    return [_T(self.node("Reshape", [t.name, shape], "reshape"),
               tuple(eqn.outvars[0].aval.shape))]

  def op_squeeze(self, eqn, ins, uses, where):
    t = self.layout(ins[0], None, where)
    axes = self.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return [_T(self.node("Squeeze", [t.name, axes], "squeeze"),
               tuple(eqn.outvars[0].aval.shape))]

  def op_expand_dims(self, eqn, ins, uses, where):
    t = self.layout(ins[0], None, where)
    axes = self.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return [_T(self.node("Unsqueeze", [t.name, axes], "unsqueeze"),
               tuple(eqn.outvars[0].aval.shape))]

  def op_broadcast_in_dim(self, eqn, ins, uses, where):
    t = self.layout(ins[0], None, where)
    shape = tuple(eqn.params["shape"])
    dims = eqn.params["broadcast_dimensions"]
    mid = [1] * len(shape)
    for i, d in enumerate(dims):
      mid[d] = t.shape[i]
    r = self.node("Reshape", [t.name, self.const(np.asarray(mid, np.int64),
                                                 "shape")], "reshape")
    if tuple(mid) == shape:
      return [_T(r, shape)]
    e = self.node("Expand", [r, self.const(np.asarray(shape, np.int64),
                                           "shape")], "expand")
    return [_T(e, shape)]

  def op_transpose(self, eqn, ins, uses, where):
    t = self.tensor(ins[0], where)
    perm = tuple(eqn.params["permutation"])
    cur = t.perm or tuple(range(len(t.shape)))
    new = tuple(perm.index(a) for a in cur)
    shape = tuple(t.shape[a] for a in perm)
    return [_T(t.name, shape, None if new == tuple(range(len(new))) else new)]

  def _reduce(self, op: str, eqn, ins, where, keep=False):
    t = self.tensor(ins[0], where)
    axes = tuple(eqn.params["axes"])
    cur = t.perm or tuple(range(len(t.shape)))
    phys = sorted(cur.index(a) for a in axes)
    left = [a for a in cur if a not in axes]
    # renumber the remaining logical axes
    order = sorted(left)
    new = tuple(order.index(a) for a in left)
    y = self.node(op, [t.name, self.const(np.asarray(phys, np.int64),
                                          "axes")], op.lower(), keepdims=0)
    return _T(y, tuple(eqn.outvars[0].aval.shape),
              None if new == tuple(range(len(new))) else new)

  def op_reduce_sum(self, eqn, ins, uses, where):
    return [self._reduce("ReduceSum", eqn, ins, where)]

  def op_reduce_max(self, eqn, ins, uses, where):
    return [self._reduce("ReduceMax", eqn, ins, where)]

  def op_reduce_min(self, eqn, ins, uses, where):
    return [self._reduce("ReduceMin", eqn, ins, where)]

  def op_argmax(self, eqn, ins, uses, where):
    t = self.layout(ins[0], None, where)
    (axis,) = eqn.params["axes"]
    y = self.node("ArgMax", [t.name], "argmax", axis=int(axis), keepdims=0)
    return [_T(self.node("Cast", [y], "cast", to=_onnx_dtype(
        eqn.params["index_dtype"])), tuple(eqn.outvars[0].aval.shape))]

  def _pool(self, op: str, eqn, ins, where) -> _T:
    p = eqn.params
    win, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    pads = tuple(tuple(x) for x in p["padding"])
    if (len(win) != 4 or win[0] != 1 or win[3] != 1 or strides[0] != 1
        or strides[3] != 1 or pads[0] != (0, 0) or pads[3] != (0, 0)
        or any(d != 1 for d in p["base_dilation"])
        or any(d != 1 for d in p["window_dilation"])):
      raise ValueError(f"ONNX export: {eqn.primitive.name} over other axes "
                       f"than H, W of an NHWC tensor (in {where!r}) is not "
                       "supported")
    t = self.layout(ins[0], NCHW, where)
    attrs = dict(kernel_shape=list(win[1:3]), strides=list(strides[1:3]),
                 pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
    if op == "AveragePool":
      attrs["count_include_pad"] = 1
    y = self.node(op, [t.name], op.lower(), **attrs)
    return _T(y, tuple(eqn.outvars[0].aval.shape), NCHW)

  def op_reduce_window_sum(self, eqn, ins, uses, where):
    t = self._pool("AveragePool", eqn, ins, where)
    n = np.float32(np.prod(eqn.params["window_dimensions"]))
    return [_T(self.node("Mul", [t.name, self.const(n, "window")], "sum"),
               t.shape, t.perm)]

  def op_reduce_window_max(self, eqn, ins, uses, where):
    return [self._pool("MaxPool", eqn, ins, where)]

  def op_dot_general(self, eqn, ins, uses, where):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = ins
    an = len(eqn.invars[0].aval.shape)
    bn = len(eqn.invars[1].aval.shape)
    if not (tuple(lc) == (an - 1,) and tuple(rc) == (0,) and bn == 2
            and not lb and not rb):
      raise ValueError(f"ONNX export: dot_general with dimension numbers "
                       f"{eqn.params['dimension_numbers']} (in {where!r}) is "
                       "not supported (x[..., K] @ w[K, N] is)")
    ta, tb = self.layout(a, None, where), self.layout(b, None, where)
    return [_T(self.node("MatMul", [ta.name, tb.name], "matmul"),
               tuple(eqn.outvars[0].aval.shape))]

  def op_conv_general_dilated(self, eqn, ins, uses, where):
    p = eqn.params
    dn = p["dimension_numbers"]
    x, w = ins
    if (tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.rhs_spec) != (
        3, 2, 0, 1) or tuple(dn.out_spec) != (0, 3, 1, 2)
        or any(d != 1 for d in p["lhs_dilation"])
        or isinstance(w, (_T, _Pending))):
      raise ValueError(f"ONNX export: a float convolution other than NHWC x "
                       f"HWIO with a constant kernel (in {where!r}) is not "
                       "supported")
    t = self.layout(x, NCHW, where)
    w = np.transpose(np.asarray(w, np.float32), (3, 2, 0, 1))
    pads = p["padding"]
    y = self.node("Conv", [t.name, self.const(w, "kernel")], "conv",
                  strides=list(p["window_strides"]),
                  dilations=list(p["rhs_dilation"]),
                  group=int(p["feature_group_count"]),
                  pads=[int(pads[0][0]), int(pads[1][0]), int(pads[0][1]),
                        int(pads[1][1])])
    return [_T(y, tuple(eqn.outvars[0].aval.shape), NCHW)]

  def op_concatenate(self, eqn, ins, uses, where):
    dim = eqn.params["dimension"]
    perm = next((self.tensor(v, where).perm for v in ins
                 if isinstance(v, (_T, _Pending))), None)
    ts = [self.layout(v, perm, where) for v in ins]
    axis = (perm or tuple(range(len(ts[0].shape)))).index(dim)
    return [_T(self.node("Concat", [t.name for t in ts], "concat",
                         axis=int(axis)),
               tuple(eqn.outvars[0].aval.shape), perm)]


def _channel_vector(c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """`c` as one value per last-axis channel of `shape` if it broadcasts so
  (a scalar, or ones but the last axis), else None."""
  out = shape[-1]
  if c.size == 1:
    return np.full((out,), float(c.reshape(())))
  if c.ndim <= len(shape) and c.shape[-1] == out and c.size == out:
    return c.reshape(out).astype(np.float64)
  return None


def to_onnx(model: nn.Module, variables: Mapping, example_input: Any, *,
            call_kwargs: Mapping[str, Any] | None = None,
            calibration: Any = None, requantize: bool = True,
            dynamic_batch: bool = True,
            float_layers: str | None = None) -> "onnx.ModelProto":
  """The ONNX graph of a trained aqt_ext model (module docstring).

  Args:
    model: the QAT model (QuantDense / QuantConv layers or a
      `aqt_ext.linen.quantize_model` wrapper), integer-executable with
      stored input scales.
    variables: its trained variables (or a TrainState).
    example_input: an input batch (traces the model).
    call_kwargs: keyword arguments of the eval call, e.g. ``{'train':
      False}``.
    calibration: inputs for the requantization scales (default:
      `example_input`).
    requantize: the fast graph: add the int8 output requantization where
      QAT has none, so that every integer conv runs as ORT's
      ``QLinearConv``. False: the exact graph (module docstring).
    dynamic_batch: the input's batch axis is symbolic (``'batch'``).
    float_layers: a regex of integer layer paths (``re.search``) written as
      float ops on QAT's fake-quant operands instead (no Q/DQ nodes, so ORT
      runs them as float convs / matmuls): exact to float rounding, for a
      layer whose fused kernel rounds its bias coarsely and that costs
      little in float, such as a first conv on few input channels.

  Returns:
    The checked ``onnx.ModelProto`` (opset `OPSET`).
  """
  if float_layers is not None:
    try:
      re.compile(float_layers)
    except re.error as e:
      raise ValueError(f"float_layers={float_layers!r} is not a valid regular "
                       f"expression: {e}") from None
  closed, records, acts = trace(model, variables, example_input,
                                call_kwargs=call_kwargs)
  x = np.asarray(example_input)
  build = functools.partial(_build, closed, records, x,
                            dynamic_batch=dynamic_batch, acts=acts,
                            float_layers=float_layers)
  proto, built = build({}, widen_inputs=not requantize)
  if requantize:
    fed = _quantized_consumers(built)
    need = [i for i, t in sorted(built.layer_outputs.items())
            if records[i].kind == "conv" and i not in fed and not (
                float_layers and re.search(float_layers, records[i].path))]
    if need:
      cal = np.asarray(x if calibration is None else calibration)
      ranges = _output_ranges(proto, [built.layer_outputs[i].name
                                      for i in need], cal)
      scales = {i: max(r, 1e-12) / 127.0 for i, r in zip(need, ranges)}
      proto, _ = build(scales)
  onnx.checker.check_model(proto)
  return proto


def _build(closed, records, x: np.ndarray, requant: Mapping[int, float], *,
           dynamic_batch: bool, widen_inputs: bool = False,
           acts: Sequence[ActRecord] = (), float_layers: str | None = None
           ) -> tuple["onnx.ModelProto", _Builder]:
  b = _Builder(records, requant, widen_inputs=widen_inputs, acts=acts,
               float_layers=float_layers)
  b.batch = x.shape[0] if dynamic_batch else None
  (out,) = b.run(closed.jaxpr, closed.consts, [_T(INPUT, x.shape)])
  t = b.layout(out, None, "<output>")
  b.nodes.append(helper.make_node("Identity", [t.name], [OUTPUT],
                                  name="n.output"))
  batch = ["batch"] if dynamic_batch else [x.shape[0]]
  graph = helper.make_graph(
      b.nodes, "aqt_ext",
      [helper.make_tensor_value_info(INPUT, _onnx_dtype(x.dtype),
                                     batch + list(x.shape[1:]))],
      [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                     batch + list(t.shape[1:]))], b.inits)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(
      "", OPSET)], producer_name="aqt_ext")
  proto.ir_version = min(proto.ir_version, 10)
  return proto, b


_PASS_THROUGH = ("Relu", "Identity")


def _quantized_consumers(b: _Builder) -> set[int]:
  """Indices of the integer layers whose output goes (through ReLUs) only
  into QuantizeLinear nodes: the next layers' input quantization is their
  output quantization."""
  consumers: dict[str, list] = {}
  for n in b.nodes:
    for i in n.input:
      consumers.setdefault(i, []).append(n)

  def quantized(name: str) -> bool:
    cs = consumers.get(name, [])
    return bool(cs) and all(
        c.op_type == "QuantizeLinear" or (c.op_type in _PASS_THROUGH and
                                          quantized(c.output[0]))
        for c in cs)

  return {i for i, t in b.layer_outputs.items() if quantized(t.name)}


def _output_ranges(proto, names: Sequence[str], x: np.ndarray
                   ) -> list[float]:
  """max |value| of the named tensors of `proto` on input `x` (ONNX
  Runtime)."""
  model = onnx.ModelProto()
  model.CopyFrom(proto)
  for name in names:
    model.graph.output.append(helper.make_tensor_value_info(
        name, TensorProto.FLOAT, None))
  res = session(model).run(list(names), {INPUT: x})
  return [float(np.max(np.abs(r))) for r in res]


def session(proto: "onnx.ModelProto", threads: int = 0,
            optimized_path: str | None = None, spinning: bool = True):
  """An ONNX Runtime CPU session on `proto` (all graph optimizations).

  ``spinning=False``: its worker threads sleep between runs instead of
  spin-waiting (ORT's default), so that they take no CPU from other
  programs run in between (a side-by-side benchmark)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  if threads:
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
  if not spinning:
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
  if optimized_path:
    opts.optimized_model_filepath = optimized_path
  return ort.InferenceSession(proto.SerializeToString(), opts,
                              providers=["CPUExecutionProvider"])


INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm",
                   "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul")


def fused_ops(proto: "onnx.ModelProto", path: str) -> dict[str, int]:
  """Node counts by op type of the graph ONNX Runtime runs (optimized and
  saved to `path`): whether the quantized ops became integer kernels."""
  session(proto, optimized_path=path)
  counts: dict[str, int] = {}
  for n in onnx.load(path).graph.node:
    counts[n.op_type] = counts.get(n.op_type, 0) + 1
  return counts


def save(proto: "onnx.ModelProto", path: str) -> None:
  """Writes `proto` to `path` atomically (a temporary file, then rename)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto.SerializeToString())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


__all__ = ["INTEGER_KERNELS", "OPSET", "fused_ops", "save", "session",
           "to_onnx", "trace"]
