"""The quantized contractions that every layer of both frameworks calls.

Each quantizes the layer's input and kernel by its `LayerQuant` (through
`aqt_ext.core.methods.quantize_operand`) and contracts them: the float op on
the fake-quantized values (``execution='fake'``), or the integer op of
`aqt_ext.core.int_ops` (``execution='int'``); with a quantized backward
pass (``LayerQuant.grad_input`` / ``grad_weight``) the gradients come from
`aqt_ext.core.backward`. A linen and an NNX layer differ only in where their
variables live, so on the same variables they compute the same values and
gradients, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from aqt_ext.core import backward, int_ops
from aqt_ext.core import quantizers as qz
from aqt_ext.core.context import QuantContext
from aqt_ext.core.int_ops import Quantized
from aqt_ext.core.methods import quantize_operand
from aqt_ext.core.operand import INPUT, WEIGHT


# The PRNG stream of stochastic rounding in the backward pass.
QUANT_RNG = "quant"


def _backward_key(ctx: QuantContext, cfg: Any) -> jax.Array | None:
  """The key of stochastic rounding, where the caller gave one (without,
  the forward runs and a gradient is refused: `backward.contract`)."""
  if not backward.needs_key(cfg.grad_input, cfg.grad_weight):
    return None
  return ctx.rng(QUANT_RNG)


def quantized(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
              x_axes: qz.OperandAxes, w_axes: qz.OperandAxes, op: Any,
              int_op: Callable[[Quantized, Quantized], jax.Array],
              precision: Any = None, preferred_element_type: Any = None
              ) -> jax.Array:
  """Quantizes `x` and `kernel` by `cfg` and contracts them: `int_op` on the
  integer operands (``cfg.execution == 'int'``), else `op` (an
  `aqt_ext.core.backward` `DotGeneral` or `Conv`) on the fake-quant values;
  with a quantized backward pass `aqt_ext.core.backward.contract` of `op`
  computes the forward and its gradients."""
  want_int = cfg.execution == "int"
  bwd = cfg.quantized_backward
  gi, gw = cfg.grad_input, cfg.grad_weight
  # With a quantized backward pass the operands keep their fake-quant value
  # (what autodiff flows through) and their integers (for the integer
  # forward, ``execution='int'``, and for ``use_fwd_quant``).
  x_q = quantize_operand(ctx, INPUT, x, cfg.input, x_axes, is_weight=False,
                         want_int=want_int and not bwd,
                         keep_ints=bwd and (want_int or gw.use_fwd_quant))
  w_q = quantize_operand(ctx, WEIGHT, kernel, cfg.weight, w_axes,
                         is_weight=True, want_int=want_int and not bwd,
                         keep_ints=bwd and (want_int or gi.use_fwd_quant))
  if not bwd:
    return int_op(x_q, w_q) if want_int else op.forward(
        x_q.fake, w_q.fake, precision, preferred_element_type)
  return backward.contract(
      op, gi, gw, x_q.fake, w_q.fake, backward.side(x, x_q),
      backward.side(kernel, w_q), _backward_key(ctx, cfg), precision,
      preferred_element_type, int_op if want_int else None,
      ctx.path or ctx.layer_type)


def dot_general(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
                dimension_numbers: int_ops.DimensionNumbers,
                precision: Any = None, preferred_element_type: Any = None
                ) -> jax.Array:
  """Quantized ``lax.dot_general(x, kernel, dimension_numbers)`` (dense,
  DenseGeneral / LinearGeneral)."""
  return quantized(
      ctx, cfg, x, kernel, *int_ops.dot_general_axes(dimension_numbers),
      backward.DotGeneral(dimension_numbers, x.ndim, kernel.ndim),
      lambda x_q, w_q: int_ops.int_dot_general(x_q, w_q, dimension_numbers,
                                               x.dtype),
      precision, preferred_element_type)


def conv(ctx: QuantContext, cfg: Any, x: jax.Array, kernel: jax.Array,
         conv_kwargs: dict, precision: Any = None) -> jax.Array:
  """Quantized ``lax.conv_general_dilated(x, kernel, **conv_kwargs)``
  (NHWC input with one batch axis, HWIO kernel)."""
  return quantized(
      ctx, cfg, x, kernel, *int_ops.conv_axes(kernel.ndim - 2),
      backward.Conv(tuple(conv_kwargs.items()), x.shape, kernel.shape),
      lambda x_q, w_q: int_ops.int_conv(x_q, w_q, conv_kwargs, x.dtype),
      precision)


def einsum(ctx: QuantContext, cfg: Any, spec: str, x: jax.Array,
           kernel: jax.Array, precision: Any = None) -> jax.Array:
  """Quantized ``jnp.einsum(spec, x, kernel)``, run as a ``dot_general``
  and a transpose (`int_ops.einsum_dims`)."""
  ed = int_ops.einsum_dims(spec, x.ndim, kernel.ndim)
  return jnp.transpose(dot_general(ctx, cfg, x, kernel, ed.dimension_numbers,
                                   precision), ed.perm)
