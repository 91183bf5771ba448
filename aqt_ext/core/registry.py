"""The record of a quantization method, and the registry that holds them.

A method is one file in `aqt_ext.core` defining a `Method` and one line in
`aqt_ext.core.methods` registering it. Everything that depends on the
method (config validation, the optimizer's parameter groups, serving,
the cost model) asks the registry instead of listing method names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

from aqt_ext.core.context import QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.operand import INPUT, WEIGHT, Operand


def _trained_input(tq: Any) -> bool:
  del tq
  return True


@dataclasses.dataclass(frozen=True)
class Method:
  """How one quantization method quantizes an operand, and its properties.

  Attributes:
    name: the `TensorQuant.method` value.
    quantize: ``quantize(ctx, operand) -> Quantized``.
    weight_params: suffixes of the parameters it learns for a kernel
      (stored as ``kernel_{suffix}`` next to the kernel).
    input_params: the same for a layer input (``input_{suffix}``).
    decayed_params: those of its learned parameters under weight decay.
    weights, inputs: whether it may quantize kernels / layer inputs.
    integer: whether it puts values on an integer grid (float and bf16 do
      not: a layer with neither operand on a grid is a float layer).
    static: whether ``calibration='static'`` is supported.
    delayed: whether ``calibration='delayed'`` is supported.
    fixed_bits: the width of a value of a method without ``bits`` (bf16:
      16, fp8: 8; None: unquantized, counted as 16 by the cost model).
    int_execution: whether ``LayerQuant.execution='int'`` can run it.
    weight_export: how serving stores its kernels: ``'int'`` (integers and
      a scale) or ``'lut'`` (level indices and a table).
    stored_input_scale: ``f(tq)``: whether serving stores a trained input
      scale (else it recomputes the range of each batch).
    grids: the grids it allows (None: all).
    granularities: the granularities it allows (None: all).
  """

  name: str
  quantize: Callable[[QuantContext, Operand], Quantized]
  weight_params: tuple[str, ...] = ()
  input_params: tuple[str, ...] = ()
  decayed_params: tuple[str, ...] = ()
  weights: bool = True
  inputs: bool = True
  integer: bool = True
  static: bool = False
  delayed: bool = False
  fixed_bits: int | None = None
  int_execution: bool = False
  weight_export: str = "int"
  stored_input_scale: Callable[[Any], bool] = _trained_input
  grids: tuple[str, ...] | None = None
  granularities: tuple[str, ...] | None = None

  def params(self, operand: str) -> tuple[str, ...]:
    """The full names of the parameters it learns for `operand`."""
    suffixes = self.weight_params if operand == WEIGHT else self.input_params
    return tuple(f"{operand}_{s}" for s in suffixes)


class Registry:
  """Methods by name, and the questions asked of all of them."""

  def __init__(self, methods: Iterable[Method]):
    self._methods: dict[str, Method] = {}
    for m in methods:
      self.register(m)

  def register(self, method: Method) -> None:
    if method.name in self._methods:
      raise ValueError(f"quantization method {method.name!r} is registered "
                       "twice")
    self._methods[method.name] = method

  def names(self) -> tuple[str, ...]:
    return tuple(self._methods)

  def get(self, name: str) -> Method:
    if name not in self._methods:
      raise ValueError(f"TensorQuant.method={name!r} is not allowed; allowed "
                       f"values: {', '.join(map(repr, self._methods))}")
    return self._methods[name]

  def learned_params(self) -> tuple[str, ...]:
    """The names of every learned quantizer parameter, of both operands."""
    return tuple(dict.fromkeys(
        p for m in self._methods.values()
        for op in (WEIGHT, INPUT) for p in m.params(op)))

  def learned_param_re(self) -> re.Pattern:
    """Matches a ``'/'``-joined parameter path that ends in a learned
    quantizer parameter."""
    return _ends_in(self.learned_params())

  def decayed_param_re(self) -> re.Pattern:
    """Matches the learned quantizer parameters under weight decay."""
    return _ends_in(tuple(dict.fromkeys(
        f"{op}_{s}" for m in self._methods.values() for s in m.decayed_params
        for op in (WEIGHT, INPUT) if s in (
            m.weight_params if op == WEIGHT else m.input_params))))

  def int_executable(self) -> tuple[str, ...]:
    return tuple(n for n, m in self._methods.items() if m.int_execution)


def _ends_in(names: tuple[str, ...]) -> re.Pattern:
  if not names:
    return re.compile(r"(?!)")
  return re.compile(r"(^|/)(" + "|".join(map(re.escape, names)) + r")$")
