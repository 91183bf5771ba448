"""One operand of a contraction, as the quantization methods receive it.

`Operand` bundles what a method needs (the tensor, its role and axes, its
`TensorQuant`) and derives the layout the scales are computed in: for
``per_group`` the feature axis split into (groups, group_size). `finish`
turns a method's grid into the fake-quant value or the integer operand.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax import lax

from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import (PARAMS, STATS, QuantContext,
                                  warn_negative_inputs)
from aqt_ext.core.int_ops import Quantized

WEIGHT, INPUT = "kernel", "input"  # the operand names of every layer


@dataclasses.dataclass(frozen=True)
class Operand:
  """An operand to quantize.

  Attributes:
    name: ``'kernel'`` or ``'input'``; quantizer variables are named
      ``{name}_{suffix}`` (``kernel_lsq_step``, ``input_amax``, ...).
    x: the tensor, in the layer's compute dtype.
    tq: its `TensorQuant` (duck-typed: core does not import the configs).
    axes: the roles of its axes in the contraction.
    is_weight: whether it is the kernel.
    want_int: whether integer execution asks for the integer operand.
    keep_ints: whether the fake-quant value also keeps its integers and
      scale (a quantized backward pass with ``use_fwd_quant``).
  """

  name: str
  x: jax.Array
  tq: Any
  axes: qz.OperandAxes
  is_weight: bool
  want_int: bool = False
  keep_ints: bool = False

  @functools.cached_property
  def _layout(self):
    if self.tq.granularity == "per_group":
      view, vaxes = qz.split_groups(self.x, self.axes, self.tq.group_size)
      return view, vaxes, qz.reduce_axes(view.ndim, vaxes, "per_channel")
    return (self.x, self.axes,
            qz.reduce_axes(self.x.ndim, self.axes, self.tq.granularity))

  @property
  def grouped(self) -> bool:
    return self.tq.granularity == "per_group"

  @property
  def view(self) -> jax.Array:
    """The tensor in scale layout (feature axis split for ``per_group``)."""
    return self._layout[0]

  @property
  def view_axes(self) -> qz.OperandAxes:
    return self._layout[1]

  @property
  def reduced(self) -> tuple[int, ...]:
    """The axes of `view` one scale is reduced over."""
    return self._layout[2]

  def with_x(self, x: jax.Array) -> "Operand":
    return dataclasses.replace(self, x=x)


def num_per_scale(shape, axes) -> int:
  """The number of elements of `shape` over `axes` (at least 1)."""
  return int(np.prod([shape[a] for a in axes])) or 1


def finish(op: Operand, qp: qz.QParams, fake: Callable[[jax.Array], jax.Array],
           rounding: qz.Rounding) -> Quantized:
  """The quantized operand on grid `qp`: integers (``op.want_int``) or
  ``fake(view)`` reshaped back to the operand's shape (with its integers
  too for ``op.keep_ints``)."""
  if op.want_int:
    return Quantized(None, qz.to_int(op.view, qp, rounding), qp, op.grouped)
  y = materialize(fake(op.view))
  y = y.reshape(op.x.shape) if op.grouped else y
  if op.keep_ints:
    return Quantized(y, qz.to_int(op.view, qp, rounding), qp, op.grouped)
  return Quantized(y)


def materialize(y: jax.Array) -> jax.Array:
  """`y`, computed once: an optimization barrier between a fake-quantized
  operand and its consumers.

  Its value and gradient are those of `y`. Without it XLA:CPU duplicates
  the cheap elementwise fake quant (and with it the elementwise chain that
  produced the operand: BatchNorm, ReLU, the residual adds of every earlier
  block) into each consumer, above all the layout transpose feeding the
  kernel gradient, which then reads a dozen arrays with strided access
  instead of one; measured on ResNet-20 that costs more than the quantizer
  itself.
  """
  return lax.optimization_barrier(y)


def check_sign(ctx: QuantContext, op: Operand, what: str,
               param: str | None = None) -> Operand:
  """`op` with its input checked for negative values (`warn_negative_inputs`)
  on the calls that set the quantizer: at initialisation, when its learned
  parameter ``{name}_{param}`` is created, or at the first update of a static
  range (a traced bool under jit)."""
  if ctx.initializing:
    due = True
  elif param is not None:
    due = not ctx.has(PARAMS, f"{op.name}_{param}")
  elif op.tq.calibration == "static" and ctx.mutable(STATS):
    count = f"{op.name}_count"
    due = True if not ctx.has(STATS, count) else ctx.get(
        STATS, count, lambda: None) == 0
  else:
    return op
  if due is False:
    return op
  return op.with_x(warn_negative_inputs(ctx, op.name, op.x, what, due))
