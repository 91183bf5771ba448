"""What a quantizer needs from the layer that calls it, framework-free.

A quantizer keeps state: learned parameters (LSQ steps, PACT and DQ clips,
DQ levels), static ranges (`STATS`), AQuant borders (`AQUANT`) and auxiliary
losses (`LOSSES`). It reaches them through a `QuantContext`, which
`aqt_ext.linen` implements on a bound ``nn.Module`` and `aqt_ext.nnx` on an
``nnx.Module``; the quantizers themselves (`aqt_ext.core.operand` and the
method files) are written once against it, so both frameworks run the same
code. This module also holds the one EMA of static ranges and the checks
that warn (`QuantInitWarning`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PARAMS = "params"
STATS = "quant_stats"  # static ranges: EMA statistics and their count
AQUANT = "aquant"  # AQuant border parameters of inputs with rounding='border'
LOSSES = "quant_losses"  # auxiliary losses the training loop adds


class QuantInitWarning(UserWarning):
  """A quantizer that could not be set from the data, or data that do not
  fit the quantizer's grid."""


class QuantContext(Protocol):
  """The quantizer's view of the calling layer.

  Attributes:
    path: the layer's module path, ``'/'``-joined (for messages and records).
    layer_type: the layer's class name (for messages).
    initializing: whether the layer is creating its variables (linen
      ``init``); NNX layers create them at their first call and are never
      "initializing".
    in_loop: whether the layer runs inside the body of a loop transform that
      cannot create a parameter from the loop's data (linen ``nn.scan``,
      ``nn.RNN``, ``nn.while_loop``).
  """

  path: str
  layer_type: str
  initializing: bool
  in_loop: bool

  def get(self, collection: str, name: str, init: Callable[[], jax.Array]
          ) -> jax.Array:
    """The variable's value, created by ``init()`` if it does not exist."""

  def set(self, collection: str, name: str, value: jax.Array) -> None:
    """Stores a new value of an existing variable."""

  def has(self, collection: str, name: str) -> bool:
    """Whether the variable exists."""

  def mutable(self, collection: str) -> bool:
    """Whether the layer may update `collection` (`STATS`: static ranges are
    learning; `LOSSES`: auxiliary losses are collected)."""

  def sow(self, collection: str, name: str, value: jax.Array) -> None:
    """Records `value` (appended to the values recorded under `name`)."""

  def rng(self, stream: str) -> jax.Array | None:
    """A fresh PRNG key of `stream`, or None where the caller gave none."""


def layer_name(ctx: QuantContext) -> str:
  """The layer's path, quoted, for messages."""
  return repr(ctx.path) if ctx.path else f"(top-level {ctx.layer_type})"


def updating(ctx: QuantContext, collection: str = STATS) -> bool:
  """Whether this call updates `collection` (never while initializing)."""
  return ctx.mutable(collection) and not ctx.initializing


def ema(ctx: QuantContext, name: str, batch: Callable[[], Mapping[str, Any]],
        decay: float) -> dict:
  """The static statistics ``{name}_{key}`` of an operand: an EMA of the
  per-batch statistics ``batch()`` in `STATS`, with the count of updates in
  ``{name}_count``.

  Updated while `STATS` is mutable (not at initialisation); the first update
  takes the batch's value. Frozen otherwise; until the first update the
  batch's own statistics are used (computed only then).
  """
  shapes = jax.eval_shape(batch)
  count = ctx.get(STATS, f"{name}_count", lambda: jnp.zeros((), jnp.int32))
  old = {k: ctx.get(STATS, f"{name}_{k}",
                    lambda s=s: jnp.zeros(s.shape, s.dtype))
         for k, s in shapes.items()}
  if ctx.initializing:
    return dict(batch())
  if updating(ctx):
    new = lax.stop_gradient(dict(batch()))
    first = count == 0
    out = {k: jnp.where(first, new[k], decay * old[k] + (1 - decay) * new[k])
           for k in old}
    for k, v in out.items():
      ctx.set(STATS, f"{name}_{k}", v)
    ctx.set(STATS, f"{name}_count", count + 1)
    return out
  return lax.cond(count > 0, lambda: old,
                  lambda: lax.stop_gradient(dict(batch())))


def host_call(ctx: QuantContext, fn: Callable[..., None], x: jax.Array,
              *args) -> jax.Array:
  """Calls ``fn(*args)`` on the host with the values of `args`; returns `x`,
  to be used in place of `x`.

  Concrete `args` are passed at once; traced ones by ``jax.debug.callback``,
  or, inside a loop body (``ctx.in_loop``), by a ``jax.pure_callback`` whose
  zero result is added to `x`: it runs where `x` is used (not where the
  loop's outputs are dead code, as in a jitted ``init``) and drops out of
  flax's pass that creates the loop's broadcast variables.
  """
  if not any(isinstance(a, jax.core.Tracer) for a in args):
    fn(*args)
    return x
  if not ctx.in_loop:
    jax.debug.callback(fn, *args)
    return x

  def call(*values):
    fn(*values)
    return np.zeros((), np.float32)

  zero = jax.pure_callback(call, jax.ShapeDtypeStruct((), jnp.float32),
                           *map(lax.stop_gradient, args),
                           vmap_method="sequential")
  return x + zero.astype(x.dtype)


def warn_negative_inputs(ctx: QuantContext, name: str, x: jax.Array,
                         what: str, due: Any = True) -> jax.Array:
  """A `QuantInitWarning` when `x`, an input quantized on a grid without
  negative values (`what` names it), has negative values and `due` is true;
  returns `x`, to be used in place of `x` (see `host_call`).

  Checked on the host where `x` is concrete, else by a callback (inside
  ``lax.cond`` on a traced `due`); warns at most once per trace, so once per
  layer for all the steps of a scan.
  """
  path = layer_name(ctx)
  warned = []

  def report(frac, low):
    if warned or not frac > 0:
      return
    warned.append(True)
    warnings.warn(
        f"aqt_ext: layer {path}: its {name} is quantized on a grid without "
        f"negative values ({what}), which clips them to 0, but "
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
    return host_call(ctx, report, v, *stats(v))

  return lax.cond(due, check, lambda v: v, x) if traced_due else check(x)
