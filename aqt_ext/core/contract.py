"""The quantized contractions that every layer of both frameworks calls.

Each quantizes the layer's input and kernel by its `LayerQuant` (through
`aqt_ext.core.methods.quantize_operand`) and contracts them: the float op on
the fake-quantized values (``execution='fake'``), or the integer op of
`aqt_ext.core.int_ops` (``execution='int'``). A linen and an NNX layer
differ only in where their variables live, so on the same variables they
compute the same values and gradients, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from aqt_ext.core import int_ops
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.methods import quantize_operand
from aqt_ext.core.operand import INPUT, WEIGHT


def quantized(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
              x_axes: qz.OperandAxes, w_axes: qz.OperandAxes,
              fake_op: Callable[[jax.Array, jax.Array], jax.Array],
              int_op: Callable[[Quantized, Quantized], jax.Array]
              ) -> jax.Array:
  """Quantizes `x` and `kernel` by `cfg` and contracts them by `int_op` on
  the integer operands (``cfg.execution == 'int'``), else by `fake_op`."""
  want_int = cfg.execution == "int"
  x_q = quantize_operand(ctx, INPUT, x, cfg.input, x_axes, is_weight=False,
                         want_int=want_int)
  w_q = quantize_operand(ctx, WEIGHT, kernel, cfg.weight, w_axes,
                         is_weight=True, want_int=want_int)
  return int_op(x_q, w_q) if want_int else fake_op(x_q.fake, w_q.fake)


def dot_general(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
                dimension_numbers: int_ops.DimensionNumbers,
                precision: Any = None, preferred_element_type: Any = None
                ) -> jax.Array:
  """Quantized ``lax.dot_general(x, kernel, dimension_numbers)`` (dense,
  DenseGeneral / LinearGeneral)."""
  return quantized(
      ctx, cfg, x, kernel, *int_ops.dot_general_axes(dimension_numbers),
      lambda a, w: lax.dot_general(
          a, w, dimension_numbers, precision=precision,
          preferred_element_type=preferred_element_type),
      lambda x_q, w_q: int_ops.int_dot_general(x_q, w_q, dimension_numbers,
                                               x.dtype))


def conv(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
         conv_kwargs: dict, precision: Any = None) -> jax.Array:
  """Quantized ``lax.conv_general_dilated(x, kernel, **conv_kwargs)``
  (NHWC input with one batch axis, HWIO kernel)."""
  return quantized(
      ctx, cfg, x, kernel, *int_ops.conv_axes(kernel.ndim - 2),
      lambda a, w: lax.conv_general_dilated(a, w, precision=precision,
                                            **conv_kwargs),
      lambda x_q, w_q: int_ops.int_conv(x_q, w_q, conv_kwargs, x.dtype))


def einsum(ctx: QuantContext, cfg: Any, spec: str, x: jax.Array,
           kernel: jax.Array, precision: Any = None) -> jax.Array:
  """Quantized ``jnp.einsum(spec, x, kernel)``, run as a ``dot_general``
  and a transpose (`int_ops.einsum_dims`)."""
  ed = int_ops.einsum_dims(spec, x.ndim, kernel.ndim)
  return jnp.transpose(dot_general(ctx, cfg, x, kernel, ed.dimension_numbers,
                                   precision), ed.perm)
