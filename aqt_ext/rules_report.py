"""What quantizing a model by rules did: the per-layer record, the report
and the warnings, shared by `aqt_ext.linen.rules` and `aqt_ext.nnx.rules`
(framework-free)."""

from __future__ import annotations

import dataclasses
import re
import warnings

from typing import Any, Mapping, Sequence

from aqt_ext.config import LayerQuant, ModelQuant
from aqt_ext.core.int_ops import CONV_PADDINGS


Rules = ModelQuant | Sequence[tuple[str, LayerQuant]]


def as_model_quant(rules: Rules) -> ModelQuant:
  """A `ModelQuant` from rules; a sequence gets a float default.

  Regexes are compiled here, so an invalid one is refused at once.
  """
  if isinstance(rules, ModelQuant):
    return rules
  if isinstance(rules, (str, bytes, LayerQuant)) or not isinstance(
      rules, Sequence):
    raise TypeError("quantize_model rules must be a ModelQuant or a sequence "
                    f"of (regex, LayerQuant), got {type(rules).__name__}")
  return ModelQuant(rules=tuple(rules))


def supported_base(mdl: Any, supported) -> tuple[type | None, bool]:
  """(the type of `supported` that `mdl` is an instance of, or None;
  whether `mdl`'s class overrides that type's ``__call__``)."""
  for base in supported:
    if isinstance(mdl, base):
      return base, type(mdl).__call__ is not base.__call__
  return None, False


def refuse_unmirrored(path: str, layer: str,
                      settings: Mapping[str, tuple[Any, Any]],
                      padding: Any = None) -> None:
  """Raises when a layer to quantize has a setting the quantized layer
  cannot mirror.

  Args:
    path: the layer's module path.
    layer: its type, as the user wrote it (``'nn.Conv'``, ``'nnx.Linear'``).
    settings: name -> (value, default) of the settings that must keep their
      defaults.
    padding: a conv layer's padding (None for other layers).
  """
  for name, (value, default) in settings.items():
    if value is not default:
      raise ValueError(
          f"quantize_model: {path!r} ({layer}) sets {name}, which the "
          f"quantized layer cannot mirror; allowed: {name}={default!r}")
  if isinstance(padding, str) and padding not in CONV_PADDINGS:
    raise ValueError(
        f"quantize_model: {path!r} {layer}.padding={padding!r} cannot be "
        f"quantized; allowed: {', '.join(map(repr, CONV_PADDINGS))}, int or "
        "(lo, hi) pairs")


def is_float(lq: LayerQuant) -> bool:
  """True when neither operand of the layer is quantized or rounded."""
  return lq.weight.method == "float" and lq.input.method == "float"


@dataclasses.dataclass(frozen=True)
class LayerMatch:
  """How one supported layer was configured.

  Attributes:
    layer: the layer type, e.g. ``'Dense'``.
    rule: index of the rule that matched, None where the default applied.
    pattern: that rule's regex (None for the default).
    quant: the LayerQuant it got.
  """

  layer: str
  rule: int | None
  pattern: str | None
  quant: LayerQuant


@dataclasses.dataclass(frozen=True)
class RulesReport:
  """What the rules did on one trace of the model.

  Attributes:
    layers: path -> `LayerMatch`, for every supported layer called.
    unused: the regexes of rules that selected no supported layer.
    not_quantizable: path -> type name, for modules owning variables that a
      rule matched but that cannot be quantized (left float).
  """

  layers: dict[str, LayerMatch]
  unused: tuple[str, ...]
  not_quantizable: dict[str, str]

  @property
  def quantized(self) -> tuple[str, ...]:
    """Paths of the layers that run quantized."""
    return tuple(p for p, m in self.layers.items() if not is_float(m.quant))


@dataclasses.dataclass
class Record:
  """What one pass over a model saw: supported layers, unquantizable
  matches, the rules that matched other modules owning variables, NNX
  bridge modules (linen only).

  Attributes:
    supported: the names of the supported layer types, for messages.
    found, others_found: how layers and other modules are found, for the
      message when no layer is: linen's rules see the modules called inside
      the wrapped model, NNX's the submodules of the model.
  """

  supported: tuple[str, ...]
  found: str = "was called inside the wrapped model"
  others_found: str = "modules with variables it called"

  layers: dict[str, LayerMatch] = dataclasses.field(default_factory=dict)
  # path -> (type name, index of the rule that matched it)
  not_quantizable: dict[str, tuple[str, int]] = dataclasses.field(
      default_factory=dict)
  other_matches: set[int] = dataclasses.field(default_factory=set)
  # path -> type name of the unsupported modules owning variables
  others: dict[str, str] = dataclasses.field(default_factory=dict)
  nnx: set[str] = dataclasses.field(default_factory=set)

  def report(self, quant: ModelQuant) -> RulesReport:
    used = {m.rule for m in self.layers.values()}
    unused = tuple(p for i, (p, _) in enumerate(quant.rules) if i not in used)
    return RulesReport(dict(self.layers), unused,
                       {p: t for p, (t, _) in self.not_quantizable.items()})

  def warn(self, quant: ModelQuant) -> None:
    """One warning per rule that matched modules it cannot quantize."""
    by_rule: dict[int, list[str]] = {}
    for path, (name, rule) in self.not_quantizable.items():
      by_rule.setdefault(rule, []).append(f"{path!r} ({name})")
    for rule, found in sorted(by_rule.items()):
      warnings.warn(
          f"quantize_model: rule {rule} ({quant.rules[rule][0]!r}) matches "
          f"{', '.join(found)}, which cannot be quantized (supported: "
          f"{', '.join(self.supported)}); they stay "
          "float", stacklevel=2)
    self._warn_unmatched(quant)

  def _warn_unmatched(self, quant: ModelQuant) -> None:
    """Warns when rules that quantize select no layer: all of them (saying
    why), or, where some layer is quantized, each rule that selects none."""
    if is_float(quant.default) and all(is_float(lq) for _, lq in quant.rules):
      return  # nothing to quantize was asked for
    supported = "/".join(self.supported)
    patterns = ", ".join(repr(p) for p, _ in quant.rules) or "none"
    if not self.layers:
      why = f"no {supported} layer {self.found}"
      if self.others:
        why += (f" ({self.others_found}: " + ", ".join(
            f"{p!r} ({t})" for p, t in list(self.others.items())[:8]) + ")")
      if self.nnx:
        why += (f"; it runs NNX modules through nnx.bridge "
                f"({', '.join(sorted(self.nnx))}), which this linen "
                "quantize_model does not see into: quantize the NNX model "
                "itself with aqt_ext.nnx.quantize_model before bridging it")
      warnings.warn(f"quantize_model: nothing is quantized, the model runs "
                    f"in float: {why}", stacklevel=3)
      return
    if all(is_float(m.quant) for m in self.layers.values()):
      warnings.warn(
          "quantize_model: nothing is quantized, the model runs in float: "
          f"no rule (patterns: {patterns}) matches any of the "
          f"{len(self.layers)} layer paths {_some(self.layers)}",
          stacklevel=3)
      return
    used = ({m.rule for m in self.layers.values()} | self.other_matches
            | {rule for _, rule in self.not_quantizable.values()})
    for i, (pattern, _) in enumerate(quant.rules):
      if i in used:
        continue
      shadowed = [p for p in self.layers if re.search(pattern, p)]
      why = (f"every layer it matches ({_some(shadowed)}) is taken by an "
             "earlier rule" if shadowed else
             f"it matches none of the layer paths {_some(self.layers)}")
      warnings.warn(f"quantize_model: rule {i} ({pattern!r}) configures no "
                    f"layer: {why}", stacklevel=3)


def _some(paths, n: int = 8) -> str:
  """The first `n` of `paths`, quoted, and how many there are in all."""
  paths = list(paths)
  shown = ", ".join(repr(p) for p in paths[:n])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")
