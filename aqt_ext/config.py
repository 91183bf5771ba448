"""Typed, validated quantization configs.

Three levels:

* `TensorQuant`: how one operand (a kernel or a layer input) is quantized.
* `LayerQuant`: the weight and input configs of one `QuantDense` / `QuantConv`.
* `ModelQuant`: a default `LayerQuant` plus per-layer overrides, matched by
  regular expression on the module path (first match wins).

Every field is checked when the object is built, so a bad value fails with an
error naming the field and its allowed values, never deep inside a trace.

Granularity is defined by the operand's role in the contraction:

* ``per_tensor``: one scale for the whole operand.
* ``per_channel``: one scale per index of the non-contracting axes: per output
  channel for a kernel; per row (dense) or per example (conv) for an input.
  This is AQT's "calibration over the contracting axes".
* ``per_in_channel``: one scale per input feature (the contracted feature axis).
  Fake-quant only: such scales do not factor out of an integer contraction.
* ``per_group``: the input-feature axis is cut into groups of ``group_size``;
  one scale per group and per non-contracting index.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Mapping, Sequence

from aqt_ext.fileio import write_text_atomic
from aqt_ext.core.methods import REGISTRY

METHODS = REGISTRY.names()
GRIDS = ("full", "restricted", "aqt", "unsigned", "asymmetric")
GRANULARITIES = ("per_tensor", "per_channel", "per_in_channel", "per_group")
CALIBRATIONS = ("dynamic", "static", "delayed")
FP8_FORMATS = ("e4m3", "e5m2")
ROUNDINGS = ("half_even", "half_away", "border")
EXECUTIONS = ("fake", "int")
GRAD_FORMATS = ("float", "int", "e4m3", "e5m2")
GRAD_GRANULARITIES = ("per_tensor", "per_channel")
GRAD_ROUNDINGS = ("nearest", "stochastic")
LSQ_INITS = ("data",)
DQ_INITS = ("kmeans", "uniform")
DQ_UPDATES = ("direct", "latent_ste")

MIN_BITS, MAX_BITS = 2, 8


def _check_choice(cls: str, field: str, value: Any, allowed: Sequence[Any]):
  if value not in allowed:
    raise ValueError(
        f"{cls}.{field}={value!r} is not allowed; allowed values: "
        f"{', '.join(repr(a) for a in allowed)}"
    )


def _check_range(cls: str, field: str, value: Any, lo, hi, *, low_open=False,
                 high_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > lo if low_open else value >= lo) and (
        value < hi if high_open else value <= hi)
  if not ok:
    lb = "(" if low_open else "["
    hb = ")" if high_open else "]"
    raise ValueError(
        f"{cls}.{field}={value!r} is out of range; allowed: {lb}{lo}, {hi}{hb}"
    )


@dataclasses.dataclass(frozen=True)
class TensorQuant:
  """Quantization of one operand.

  Attributes:
    method: ``float`` (pass-through), ``bf16`` (operand rounded to bfloat16),
      ``uniform`` (int-b, range from calibration), ``lsq`` (learned step),
      ``pact`` (learned clip, activations only), ``dq`` (Direct Quantization:
      learnable levels for weights, channel-error-weighted clip for inputs).
    bits: integer width, 2..8 (ignored by ``float`` / ``bf16``).
    grid: ``full`` [-2^(b-1), 2^(b-1)-1] with absmax mapped to 2^(b-1)-0.5;
      ``restricted`` +-(2^(b-1)-1) with absmax mapped to 2^(b-1)-1 (AQT's
      preserve_max_val); ``aqt`` AQT v2 numerics: absmax mapped to
      2^(b-1)-0.5, clip +-(2^(b-1)-1); ``unsigned`` [0, 2^b-1] (post-ReLU);
      ``asymmetric`` [0, 2^b-1] with a zero point.
    granularity: see the module docstring.
    group_size: size of a group along the input-feature axis (``per_group``).
    calibration: ``dynamic`` (range from the current tensor) or ``static``
      (EMA of batch ranges kept in the ``quant_stats`` collection, updated
      while that collection is mutable, frozen otherwise). Inputs only.
    ema_decay: decay of the static-range EMA.
    rounding: ``half_even`` (``jnp.round``, AQT's), ``half_away``, or
      ``border`` (AQuant, inputs only: round up when the fractional part
      reaches a per-input-channel border 1/2 + alpha (n + 1/2) + beta; alpha
      and beta live in the layer's ``aquant`` collection, zero (border 1/2)
      until set, e.g. by ``aqt_ext.ptq`` with method 'aquant'; method
      ``uniform``, granularity ``per_tensor`` or ``per_channel``).
    pact_init: initial PACT clip value.
    dq_init: DQ level initialisation, ``kmeans`` (Lloyd-Max) or ``uniform``.
    dq_err_weight: weight of the channel-error auxiliary objective (DQ inputs).
    dq_update: how DQ weights train: ``direct`` (level positions updated
      directly) or ``latent_ste`` (latent float weights, straight-through);
      `aqt_ext.core.dq`.
    fp8_format: the float8 format of method ``fp8``: ``e4m3``
      (``float8_e4m3fn``, largest 448) or ``e5m2`` (largest 57344).
    amax_history: steps of absmax history of ``calibration='delayed'``
      (method ``fp8``, inputs, per tensor: the scale comes from the largest
      absmax of the previous steps, as fp8 training recipes' delayed
      scaling; `aqt_ext.core.fp8`).
  """

  method: str = "float"
  bits: int | None = None
  grid: str = "full"
  granularity: str = "per_tensor"
  group_size: int | None = None
  calibration: str = "dynamic"
  ema_decay: float = 0.99
  rounding: str = "half_even"
  pact_init: float = 10.0
  dq_init: str = "kmeans"
  dq_err_weight: float = 1.0
  dq_update: str = "direct"
  fp8_format: str = "e4m3"
  amax_history: int = 16

  def __post_init__(self):
    c = "TensorQuant"
    _check_choice(c, "fp8_format", self.fp8_format, FP8_FORMATS)
    if (isinstance(self.amax_history, bool)
        or not isinstance(self.amax_history, int)):
      raise ValueError(f"{c}.amax_history={self.amax_history!r} must be an "
                       "int >= 1")
    _check_range(c, "amax_history", self.amax_history, 1, 1 << 20)
    _check_choice(c, "method", self.method, METHODS)
    _check_choice(c, "grid", self.grid, GRIDS)
    _check_choice(c, "granularity", self.granularity, GRANULARITIES)
    _check_choice(c, "calibration", self.calibration, CALIBRATIONS)
    _check_choice(c, "rounding", self.rounding, ROUNDINGS)
    _check_choice(c, "dq_init", self.dq_init, DQ_INITS)
    _check_choice(c, "dq_update", self.dq_update, DQ_UPDATES)
    _check_range(c, "ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
    _check_range(c, "pact_init", self.pact_init, 0.0, float("inf"),
                 low_open=True)
    _check_range(c, "dq_err_weight", self.dq_err_weight, 0.0, float("inf"))
    if self.quantized:
      if not isinstance(self.bits, int) or isinstance(self.bits, bool):
        raise ValueError(
            f"{c}.bits={self.bits!r} must be an int in [{MIN_BITS}, "
            f"{MAX_BITS}] for method={self.method!r}")
      _check_range(c, "bits", self.bits, MIN_BITS, MAX_BITS)
    elif self.bits is not None:
      raise ValueError(
          f"{c}.bits={self.bits!r} must be None for method={self.method!r} "
          "(unquantized)")
    if self.rounding == "border" and (
        self.method != "uniform" or self.granularity == "per_group"):
      raise ValueError(
          f"{c}.rounding='border' needs method='uniform' and granularity "
          f"'per_tensor' or 'per_channel'; got method={self.method!r}, "
          f"granularity={self.granularity!r}")
    if self.granularity == "per_group":
      if not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(
            f"{c}.group_size={self.group_size!r} must be a positive int when "
            "granularity='per_group'")
    elif self.group_size is not None:
      raise ValueError(
          f"{c}.group_size={self.group_size!r} is only allowed with "
          "granularity='per_group'")
    m = REGISTRY.get(self.method)
    for field, allowed in (("grid", m.grids),
                           ("granularity", m.granularities)):
      if allowed is not None and getattr(self, field) not in allowed:
        raise ValueError(
            f"{c}.{field}={getattr(self, field)!r} is not allowed with "
            f"method={self.method!r}; allowed values: "
            f"{', '.join(map(repr, allowed))}")
    if self.calibration == "static" and not m.static:
      raise ValueError(
          f"{c}.calibration='static' is not allowed with method="
          f"{self.method!r}; allowed methods: "
          f"{', '.join(repr(n) for n in METHODS if REGISTRY.get(n).static)}")
    if self.calibration == "delayed" and not m.delayed:
      raise ValueError(
          f"{c}.calibration='delayed' is not allowed with method="
          f"{self.method!r}; allowed methods: "
          f"{', '.join(repr(n) for n in METHODS if REGISTRY.get(n).delayed)}")
    if self.calibration == "delayed" and self.granularity != "per_tensor":
      raise ValueError(
          f"{c}.granularity={self.granularity!r} is not allowed with "
          "calibration='delayed' (one absmax history per tensor); allowed "
          "values: 'per_tensor'")
    if self.calibration == "static" and self.granularity not in (
        "per_tensor", "per_in_channel"):
      raise ValueError(
          f"{c}.granularity={self.granularity!r} is not allowed with "
          "calibration='static' (a static range cannot depend on the batch); "
          "allowed values: 'per_tensor', 'per_in_channel'")

  @property
  def quantized(self) -> bool:
    return REGISTRY.get(self.method).integer

  def replace(self, **kw) -> "TensorQuant":
    return dataclasses.replace(self, **kw)


FLOAT = TensorQuant()


@dataclasses.dataclass(frozen=True)
class GradQuant:
  """Quantization of one gradient contraction of a layer (AQT's dlhs and
  drhs): the upstream gradient g and the forward operand it meets.

  ``LayerQuant.grad_input`` computes dL/dx = g . kernel, ``grad_weight``
  dL/dkernel = x . g; each quantizes both of its operands and contracts them
  on their grid (int8 with int32 accumulation, or fp8 with float32
  accumulation), then rescales (`aqt_ext.core.backward`).

  Attributes:
    format: ``float`` (the exact gradient), ``int`` (``bits``-bit integers,
      AQT's grid: absmax to 2^(b-1)-0.5, clipped to +-(2^(b-1)-1)), or
      ``e4m3`` / ``e5m2`` (fp8, absmax to the format's largest value,
      saturating; e5m2 is the usual gradient format).
    bits: integer width, 2..8 (``int`` only; default 8).
    granularity: ``per_channel`` (one scale per index of the axes the
      gradient contraction does not sum over: AQT's calibration over the
      contracting axes) or ``per_tensor``.
    rounding: ``nearest`` (half to even) or ``stochastic`` (of the gradient
      operand g only: unbiased, from the ``'quant'`` PRNG stream the training
      loop threads through).
    use_fwd_quant: contract g with the forward's quantized operand, its
      scale moved into g (AQT's ``use_fwd_quant``; needs the operand on an
      integer grid of one scale per channel or tensor); else with the
      forward operand's float value.
  """

  format: str = "float"
  bits: int | None = None
  granularity: str = "per_channel"
  rounding: str = "nearest"
  use_fwd_quant: bool = True

  def __post_init__(self):
    c = "GradQuant"
    _check_choice(c, "format", self.format, GRAD_FORMATS)
    _check_choice(c, "granularity", self.granularity, GRAD_GRANULARITIES)
    _check_choice(c, "rounding", self.rounding, GRAD_ROUNDINGS)
    _check_choice(c, "use_fwd_quant", self.use_fwd_quant, (True, False))
    if self.format == "int":
      if self.bits is None:
        object.__setattr__(self, "bits", 8)
      if not isinstance(self.bits, int) or isinstance(self.bits, bool):
        raise ValueError(f"{c}.bits={self.bits!r} must be an int in "
                         f"[{MIN_BITS}, {MAX_BITS}] for format='int'")
      _check_range(c, "bits", self.bits, MIN_BITS, MAX_BITS)
    elif self.bits is not None:
      raise ValueError(f"{c}.bits={self.bits!r} must be None for "
                       f"format={self.format!r} (bits belong to 'int')")
    if self.format == "float" and self.rounding != "nearest":
      raise ValueError(f"{c}.rounding={self.rounding!r} needs a quantized "
                       "format; allowed formats: 'int', 'e4m3', 'e5m2'")

  @property
  def quantized(self) -> bool:
    return self.format != "float"

  def replace(self, **kw) -> "GradQuant":
    return dataclasses.replace(self, **kw)


FLOAT_GRAD = GradQuant()


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """Quantization of one layer: its kernel and its input.

  Attributes:
    weight: config of the kernel.
    input: config of the layer input (activation).
    execution: ``fake`` (quantize-dequantize, float op; for training) or
      ``int`` (integer operands through ``lax.dot_general`` /
      ``lax.conv_general_dilated`` with int32 accumulation, rescaled after;
      for inference, or with a quantized backward pass for fully quantized
      training: AQT's ``fully_quantized``).
    grad_input: how the gradient wrt the layer input is computed (AQT's
      dlhs; `GradQuant`, default exact).
    grad_weight: the same for the gradient wrt the kernel (AQT's drhs).
  """

  weight: TensorQuant = FLOAT
  input: TensorQuant = FLOAT
  execution: str = "fake"
  grad_input: GradQuant = FLOAT_GRAD
  grad_weight: GradQuant = FLOAT_GRAD

  def __post_init__(self):
    c = "LayerQuant"
    for name in ("weight", "input"):
      if not isinstance(getattr(self, name), TensorQuant):
        raise TypeError(f"{c}.{name} must be a TensorQuant, got "
                        f"{type(getattr(self, name)).__name__}")
    _check_choice(c, "execution", self.execution, EXECUTIONS)
    for name in ("grad_input", "grad_weight"):
      if not isinstance(getattr(self, name), GradQuant):
        raise TypeError(f"{c}.{name} must be a GradQuant, got "
                        f"{type(getattr(self, name)).__name__}")
    self._check_backward()
    w = self.weight
    if not REGISTRY.get(w.method).weights:
      raise ValueError(
          f"{c}.weight.method={w.method!r} is not allowed (it quantizes "
          "layer inputs only); allowed: " + ", ".join(
              repr(n) for n in METHODS if REGISTRY.get(n).weights))
    if w.grid in ("unsigned", "asymmetric") and w.quantized:
      raise ValueError(f"{c}.weight.grid={w.grid!r} is not allowed; allowed "
                       "values: 'full', 'restricted', 'aqt'")
    if w.calibration != "dynamic":
      raise ValueError(f"{c}.weight.calibration={w.calibration!r} is not "
                       "allowed; allowed values: 'dynamic'")
    if w.rounding == "border":
      raise ValueError(f"{c}.weight.rounding='border' is not allowed (AQuant "
                       "rounds inputs); allowed: 'half_even', 'half_away'")
    if self.execution == "int":
      for name in ("weight", "input"):
        t = getattr(self, name)
        if not REGISTRY.get(t.method).int_execution:
          raise ValueError(
              f"{c}.{name}.method={t.method!r} cannot run with "
              "execution='int'; allowed: " + ", ".join(
                  map(repr, REGISTRY.int_executable())))
        if t.granularity == "per_in_channel":
          raise ValueError(
              f"{c}.{name}.granularity='per_in_channel' cannot run with "
              "execution='int' (its scales do not factor out of the "
              "contraction); allowed: 'per_tensor', 'per_channel', "
              "'per_group'")

  def _check_backward(self) -> None:
    c = "LayerQuant"
    if not self.quantized_backward:
      return
    # grad_input meets the kernel, grad_weight the input.
    for name, operand in (("grad_input", "weight"), ("grad_weight", "input")):
      gq, tq = getattr(self, name), getattr(self, operand)
      if not (gq.quantized and gq.use_fwd_quant and tq.quantized):
        continue
      m = REGISTRY.get(tq.method)
      if not m.int_execution or tq.granularity not in ("per_tensor",
                                                       "per_channel"):
        raise ValueError(
            f"{c}.{name}.use_fwd_quant=True needs the forward {operand} on "
            "an integer grid with one scale per tensor or channel; got "
            f"{operand}.method={tq.method!r}, granularity="
            f"{tq.granularity!r}. Allowed: methods "
            f"{', '.join(map(repr, REGISTRY.int_executable()))} with "
            f"granularity 'per_tensor' or 'per_channel', or "
            f"{name}.use_fwd_quant=False")

  @property
  def quantized_backward(self) -> bool:
    """Whether either gradient contraction is quantized."""
    return self.grad_input.quantized or self.grad_weight.quantized

  @property
  def weight_bits(self) -> int:
    """Bits of a stored weight (16 for an unquantized kernel, as bf16;
    8 for fp8)."""
    return _bits_of(self.weight)

  @property
  def input_bits(self) -> int:
    return _bits_of(self.input)

  def replace(self, **kw) -> "LayerQuant":
    return dataclasses.replace(self, **kw)


def _bits_of(tq: TensorQuant) -> int:
  if tq.quantized:
    return tq.bits
  return REGISTRY.get(tq.method).fixed_bits or 16


FLOAT_LAYER = LayerQuant()


@dataclasses.dataclass(frozen=True)
class ModelQuant:
  """A default layer config plus per-layer overrides.

  `rules` is a sequence of ``(regex, LayerQuant)``; the first regex that
  ``re.search``-es a module path (``'/'``-joined names, e.g.
  ``'stage1_block0/conv1'``) picks that layer's config; otherwise `default`.
  """

  default: LayerQuant = FLOAT_LAYER
  rules: tuple[tuple[str, LayerQuant], ...] = ()

  def __post_init__(self):
    rules = tuple(tuple(r) for r in self.rules)
    object.__setattr__(self, "rules", rules)
    for i, rule in enumerate(rules):
      if len(rule) != 2 or not isinstance(rule[1], LayerQuant):
        raise ValueError(f"ModelQuant.rules[{i}] must be (regex, LayerQuant)")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise ValueError(f"ModelQuant.rules[{i}] pattern {rule[0]!r} is not a "
                         f"valid regular expression: {e}") from None

  def match(self, path: str | Iterable[str]) -> tuple[int | None,
                                                      LayerQuant]:
    """(index of the first rule whose regex `re.search`-es `path`, its
    LayerQuant), or (None, `default`): first match wins."""
    if not isinstance(path, str):
      path = "/".join(path)
    for i, (pattern, lq) in enumerate(self.rules):
      if re.search(pattern, path):
        return i, lq
    return None, self.default

  def for_path(self, path: str | Iterable[str]) -> LayerQuant:
    """The LayerQuant of the layer at `path` (see `match`)."""
    return self.match(path)[1]

  def for_activation(self, path: str | Iterable[str]) -> TensorQuant:
    """The TensorQuant of the activation quantizer (``QuantAct``) at
    `path`: the ``input`` of the first rule that matches it, float where no
    rule does. `default` never applies: it describes layer inputs (a 4-bit
    unsigned post-ReLU grid would be wrong for, say, a residual branch)."""
    i, lq = self.match(path)
    return FLOAT if i is None else lq.input

  def replace(self, **kw) -> "ModelQuant":
    return dataclasses.replace(self, **kw)


def activation_quant(quant: Any, path: str, cls: str = "QuantAct"
                     ) -> TensorQuant:
  """The TensorQuant of an activation quantizer (``QuantAct``, linen or
  NNX) at `path`: `quant` itself, or a ModelQuant resolved by
  `ModelQuant.for_activation`; checked (one scale per tensor)."""
  if isinstance(quant, ModelQuant):
    quant = quant.for_activation(path)
  if not isinstance(quant, TensorQuant):
    raise TypeError(f"{cls}.quant must be a TensorQuant or ModelQuant, got "
                    f"{type(quant).__name__}")
  if quant.method != "float" and quant.granularity != "per_tensor":
    raise ValueError(f"{cls} {path!r}: granularity={quant.granularity!r} is "
                     "not allowed for an activation quantizer; allowed: "
                     "'per_tensor'")
  return quant


# ---------------------------------------------------------------------------
# Structured rules: a ModelQuant as plain data (dicts, JSON files).
# ---------------------------------------------------------------------------

_NESTED = {LayerQuant: {"weight": TensorQuant, "input": TensorQuant,
                        "grad_input": GradQuant, "grad_weight": GradQuant}}


def to_dict(cfg: Any) -> Any:
  """A TensorQuant / GradQuant / LayerQuant / ModelQuant as plain data
  (fields equal to their defaults left out): what `from_dict` reads."""
  if isinstance(cfg, ModelQuant):
    return {"default": to_dict(cfg.default),
            "rules": [[p, to_dict(lq)] for p, lq in cfg.rules]}
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if v != f.default:
      out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else v
  return out


def _plain_mapping(d: Any) -> Any:
  """A ConfigDict (anything with ``to_dict``) as a dict; else `d`."""
  return d.to_dict() if callable(getattr(d, "to_dict", None)) else d


def _from_dict(cls: type, d: Any, where: str) -> Any:
  if isinstance(d, cls):
    return d
  d = _plain_mapping(d)
  if not isinstance(d, Mapping):
    raise ValueError(f"{where} must be a dict of {cls.__name__} fields; got "
                     f"{d!r}")
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(d) - set(names))
  if unknown:
    raise ValueError(f"{where} has the unknown field(s) {unknown}; allowed: "
                     f"{', '.join(names)}")
  kw = {}
  for k, v in d.items():
    sub = _NESTED.get(cls, {}).get(k)
    kw[k] = _from_dict(sub, v, f"{where}.{k}") if sub else v
  try:
    return cls(**kw)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def from_dict(d: Mapping[str, Any], where: str = "rules") -> ModelQuant:
  """A ModelQuant from plain data: ``{"default": LayerQuant fields,
  "rules": [[regex, LayerQuant fields], ...]}``, each LayerQuant as
  ``{"weight": TensorQuant fields, "input": ..., "execution": ...,
  "grad_input": GradQuant fields, "grad_weight": ...}`` (omitted fields take
  their defaults; a LayerQuant value may also be a spec string such as
  ``"w4a4"``, whose default layer it means). Everything the shorthand spec
  cannot say, per layer. Unknown fields and bad values are errors that name
  where they are. A ConfigDict works as a dict."""
  d = _plain_mapping(d)
  if not isinstance(d, Mapping):
    raise ValueError(f"{where} must be a dict with 'default' and 'rules'")
  unknown = sorted(set(d) - {"default", "rules"})
  if unknown:
    raise ValueError(f"{where} has the unknown field(s) {unknown}; allowed: "
                     "default, rules")

  def layer(v, at):
    if isinstance(v, str):
      return parse_spec(v).default
    return _from_dict(LayerQuant, v, at)

  rules = []
  for i, r in enumerate(d.get("rules", ())):
    if (not isinstance(r, (list, tuple)) or len(r) != 2
        or not isinstance(r[0], str)):
      raise ValueError(f"{where}.rules[{i}] must be [regex, LayerQuant "
                       f"fields]; got {r!r}")
    rules.append((r[0], layer(r[1], f"{where}.rules[{i}]")))
  default = layer(d.get("default", {}), f"{where}.default")
  try:
    return ModelQuant(default=default, rules=tuple(rules))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def save_rules(mq: ModelQuant, path: str) -> None:
  """Writes `mq` as a JSON rules file (atomically) that `parse_spec` (and
  so a training config's ``quant``) reads back."""
  write_text_atomic(path, json.dumps(to_dict(mq), indent=1,
                                        sort_keys=True) + "\n")


def load_rules(path: str) -> ModelQuant:
  """The ModelQuant of a JSON rules file (`save_rules`, `from_dict`)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    raise ValueError(f"quant rules file {path!r} cannot be read: {e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"quant rules file {path!r} is not valid JSON: {e}"
                     ) from None
  return from_dict(d, where=path)


# ---------------------------------------------------------------------------
# Presets and the one-string model spec.
# ---------------------------------------------------------------------------

QUANT_METHODS = ("uniform", "aqt", "lsq", "pact", "dq", "dqw", "dqa", "dqste",
                 "dqwste")


def layer_preset(method: str, wbits: int | None, abits: int | None, *,
                 signed_input: bool = False) -> LayerQuant:
  """A LayerQuant for a named method at the given widths.

  ``None`` bits leave that side in float. Weights are per output channel,
  inputs per tensor. `signed_input` picks a signed grid for the input (e.g. a
  network's first layer sees normalised pixels); otherwise the input is
  assumed non-negative (post-ReLU) and uses an unsigned grid.

  Methods: ``uniform`` (absmax, dynamic), ``aqt`` (AQT v2 numerics on both
  sides, per-channel calibration over contracting axes), ``lsq`` (LSQ on both
  sides), ``pact`` (PACT inputs, uniform weights), ``dq`` (DQ levels for
  weights and channel-error-weighted inputs), ``dqw`` / ``dqa`` (DQ on one
  side, uniform on the other); ``dqste`` / ``dqwste``: ``dq`` / ``dqw`` with
  the weights trained as latent floats through a straight-through estimator
  (``dq_update='latent_ste'``) instead of directly.
  """
  _check_choice("layer_preset", "method", method, QUANT_METHODS)
  in_grid = "full" if signed_input else "unsigned"

  def w(m, **kw):
    if wbits is None:
      return FLOAT
    return TensorQuant(method=m, bits=wbits, granularity="per_channel", **kw)

  def a(m, **kw):
    if abits is None:
      return FLOAT
    kw.setdefault("grid", in_grid)
    return TensorQuant(method=m, bits=abits, **kw)

  if method == "uniform":
    return LayerQuant(w("uniform"), a("uniform"))
  if method == "aqt":
    return LayerQuant(w("uniform", grid="aqt"),
                      a("uniform", grid="aqt", granularity="per_channel"))
  if method == "lsq":
    return LayerQuant(w("lsq"), a("lsq"))
  if method == "pact":
    if signed_input:
      return LayerQuant(w("uniform"), a("uniform"))
    return LayerQuant(w("uniform"), a("pact"))
  if method == "dq":
    return LayerQuant(w("dq"), a("dq"))
  if method == "dqw":
    return LayerQuant(w("dq"), a("uniform"))
  if method == "dqste":
    return LayerQuant(w("dq", dq_update="latent_ste"), a("dq"))
  if method == "dqwste":
    return LayerQuant(w("dq", dq_update="latent_ste"), a("uniform"))
  return LayerQuant(w("uniform"), a("dq"))  # dqa


_GRAD_SPEC = r"(?:_g(?P<g>\d+|e4m3|e5m2)(?P<sr>sr)?)?$"
_SPEC_RE = re.compile(
    r"^(?:(?P<method>[a-z]+):)?w(?P<w>\d+|f)a(?P<a>\d+|f)"
    r"(?:_fl(?P<fl>\d+|f))?(?P<static>_static)?(?:_r(?P<r>\d+))?"
    + _GRAD_SPEC)
_FP8_SPEC_RE = re.compile(
    r"^fp8(?:_(?P<fmt>e4m3|e5m2))?(?P<delayed>_delayed)?" + _GRAD_SPEC)


def parse_spec(spec: str, *, first: str | None = None,
               last: str | None = None,
               residual: Mapping[str, str] | None = None) -> ModelQuant:
  """Builds a ModelQuant from a one-string spec.

  A path ending in ``.json`` is a structured rules file (`load_rules`),
  read as it is (`first` and `last` do not apply).

  Grammar: ``float`` | ``bf16`` | ``fp8[_FMT][_delayed][_gG[sr]]`` |
  ``[METHOD:]wWaA[_flB][_static][_rR][_gG[sr]]`` where
  W, A, B are bit widths or ``f`` (float), METHOD one of `QUANT_METHODS`
  (default ``uniform``), and ``_flB`` puts the first and last layer at B bits
  with uniform quantization (the paper's "first/last at 8 bits"). `first` and
  `last` are regexes naming those layers; the first layer's input is signed.
  ``_static``: every uniform per-tensor input range is static (an EMA of
  batch ranges while training, frozen in eval: ``calibration='static'``)
  instead of the current batch's, as integer deployment needs (one stored
  input scale per layer, e.g. the ONNX export's fused kernels).
  ``_rR``: the activations named by `residual` (regex -> grid; the zoo's
  ResNets, `aqt_ext.models.RESIDUAL`: every residual branch's and
  projection shortcut's output before the add on the signed ``full`` grid,
  the stem's ReLU output on the ``unsigned`` one) are quantized by their
  ``QuantAct`` to R bits with a static range, per tensor: what an integer
  deployment rounds where a conv's output meets a residual add (ONNX
  Runtime's fused integer conv writes a quantized output), so that QAT
  eval computes it too.
  ``fp8``: every layer's kernel (per output channel) and input (per tensor)
  in float8 FMT, ``e4m3`` (default) or ``e5m2`` (`aqt_ext.core.fp8`);
  ``_delayed``: inputs scaled by their amax history (delayed scaling).
  ``_gG[sr]``: a quantized backward pass in every quantized layer, both
  gradient contractions (`GradQuant`, per channel) in G: integer bits or
  ``e4m3`` / ``e5m2``; ``sr`` rounds the gradient stochastically. Integer
  gradients meet the forward's quantized operand where it is on an integer
  grid (``use_fwd_quant``), fp8 gradients the operand's float value.
  Examples: ``w4a4``, ``lsq:w4a4_fl8``, ``aqt:w8a8``, ``wfa8``,
  ``w4a4_fl8_static``, ``w4a4_fl8_static_r8``, ``aqt:w8a8_g8`` (AQT's fully quantized training, with
  a fake-quant forward), ``w8a8_ge5m2sr``.
  """
  if spec.endswith(".json"):
    return load_rules(spec)
  if spec == "float":
    return ModelQuant()
  if spec == "bf16":
    bf = TensorQuant(method="bf16")
    return ModelQuant(default=LayerQuant(bf, bf))
  m = _FP8_SPEC_RE.match(spec)
  if m:
    fmt = m.group("fmt") or "e4m3"
    lq = LayerQuant(
        TensorQuant("fp8", fp8_format=fmt, granularity="per_channel"),
        TensorQuant("fp8", fp8_format=fmt, calibration=(
            "delayed" if m.group("delayed") else "dynamic")))
    return ModelQuant(default=_grad_spec(spec, m, lq))
  m = _SPEC_RE.match(spec)
  if not m:
    raise ValueError(
        f"quant spec {spec!r} is not valid; allowed: 'float', 'bf16', "
        "'fp8[_e4m3|_e5m2][_delayed][_gG[sr]]' or "
        "'[METHOD:]wWaA[_flB][_static][_rR][_gG[sr]]' with METHOD in "
        f"{', '.join(QUANT_METHODS)}, W, A, B in 2..8 or 'f', R in 2..8")
  for group, what in (("w", "weight"), ("a", "input"),
                      ("fl", "first/last-layer"), ("r", "residual")):
    b = m.group(group)
    if b not in (None, "f") and not MIN_BITS <= int(b) <= MAX_BITS:
      raise ValueError(
          f"quant spec {spec!r}: {what} bits {b} are out of range; allowed: "
          f"{MIN_BITS}..{MAX_BITS} or 'f' (float)")
  method = m.group("method") or "uniform"
  bits = lambda s: None if s in (None, "f") else int(s)  # noqa: E731
  default = layer_preset(method, bits(m.group("w")), bits(m.group("a")))
  rules = []
  if first is not None:
    if m.group("fl") is not None:
      fl = bits(m.group("fl"))
      rules.append((first, layer_preset("uniform", fl, fl, signed_input=True)))
    else:
      rules.append((first, layer_preset(
          method, bits(m.group("w")), bits(m.group("a")), signed_input=True)))
  if last is not None and m.group("fl") is not None:
    fl = bits(m.group("fl"))
    rules.append((last, layer_preset("uniform", fl, fl)))
  if m.group("static"):
    before = (default, tuple(rules))
    default = _static_input(default)
    rules = [(p, _static_input(lq)) for p, lq in rules]
    if before == (default, tuple(rules)):
      raise ValueError(
          f"quant spec {spec!r}: '_static' makes uniform per-tensor input "
          f"ranges static, and method {method!r} has none; allowed: a method "
          "with uniform inputs (uniform, pact's first layer, dqw, dqwste) or "
          "an '_flB' part")
  default = _grad_spec(spec, m, default)
  rules = [(p, _grad_spec(spec, m, lq)) for p, lq in rules]
  if m.group("r") is not None:
    rules[:0] = [(p, LayerQuant(input=TensorQuant(
        "uniform", int(m.group("r")), grid=grid, calibration="static")))
                 for p, grid in (residual or {}).items()]
  return ModelQuant(default=default, rules=tuple(rules))


def _grad_spec(spec: str, m: re.Match, lq: LayerQuant) -> LayerQuant:
  """`lq` with the spec's ``_gG[sr]`` part, if it has one."""
  g = m.group("g")
  if g is None:
    return lq
  if g.isdigit() and not MIN_BITS <= int(g) <= MAX_BITS:
    raise ValueError(
        f"quant spec {spec!r}: gradient bits {g} are out of range; allowed: "
        f"{MIN_BITS}..{MAX_BITS}, 'e4m3' or 'e5m2'")
  gq = GradQuant("int", int(g)) if g.isdigit() else GradQuant(g)
  if m.group("sr"):
    gq = gq.replace(rounding="stochastic")
  return _with_grads(lq, gq)


def _with_grads(lq: LayerQuant, gq: GradQuant) -> LayerQuant:
  """`lq` with both gradient contractions quantized by `gq` (if it
  quantizes anything), reusing a forward operand only where it is on an
  integer grid that allows it."""
  if lq.weight.method == "float" and lq.input.method == "float":
    return lq

  def reusable(tq: TensorQuant) -> bool:
    # fp8 gradients meet the float operand: its forward integers would be
    # rounded twice, to 8-bit integers and then to fp8.
    return gq.format == "int" and tq.quantized and (
        REGISTRY.get(tq.method).int_execution
        and tq.granularity in ("per_tensor", "per_channel"))

  return lq.replace(
      grad_input=gq.replace(use_fwd_quant=reusable(lq.weight)),
      grad_weight=gq.replace(use_fwd_quant=reusable(lq.input)))


def _static_input(lq: LayerQuant) -> LayerQuant:
  """`lq` with a static range for a uniform per-tensor input."""
  t = lq.input
  if t.method == "uniform" and t.granularity == "per_tensor":
    return lq.replace(input=dataclasses.replace(t, calibration="static"))
  return lq
