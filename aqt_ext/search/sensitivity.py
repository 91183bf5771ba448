"""Per-layer sensitivity to quantization, for mixed-precision allocation.

For every quantizable layer ``l`` (every conv / dense layer the cost model
counts) and every candidate ``c = (weight bits, input bits)``, an estimate
of the loss increase from quantizing layer ``l`` alone at ``c``, the rest of
the network in float, on a few batches of training or validation data:

* ``loss_delta`` (direct measurement): the mean loss over the batches with
  layer ``l`` quantized at ``c``, minus the float model's. L x C forward
  passes per batch, one compiled function: the widths are traced values.
* ``hessian`` (second order, HAWQ-v2): ``1/2 (Tr(H_W)/|W| ||Q(W) - W||^2 +
  Tr(H_X)/|X| ||Q(X) - X||^2)``, the Hessian traces of the loss w.r.t. the
  layer's kernel ``W`` and its input ``X`` estimated by Hutchinson's method
  (``E[v^T H v]`` over Rademacher ``v``; one Hessian-vector product gives
  every layer's trace at once), the quantization errors measured.

The quantization is the ``uniform`` preset's (`config.layer_preset`):
kernels per output channel on the ``full`` grid (absmax to 2^(b-1) - 1/2),
inputs per tensor on the ``unsigned`` grid (post-ReLU; the first layer's
signed, ``full``), rounding half to even: what the allocated rules train
with. The model is evaluated in inference mode (BatchNorm statistics).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from aqt_ext import cost as cost_lib

METHODS = ("loss_delta", "hessian")
DEFAULT_METHOD = "loss_delta"  # [measured] experiments/mixed_precision


def _fq_weight(w: jax.Array, bits: jax.Array) -> jax.Array:
  half = 2.0 ** (bits - 1)
  amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
  s = jnp.where(amax > 0, amax, 1.0) / (half - 0.5)
  return jnp.clip(jnp.round(w / s), -half, half - 1) * s


def _fq_input(x: jax.Array, bits: jax.Array, signed: bool) -> jax.Array:
  if signed:
    half = 2.0 ** (bits - 1)
    amax = jnp.max(jnp.abs(x))
    s = jnp.where(amax > 0, amax, 1.0) / (half - 0.5)
    return jnp.clip(jnp.round(x / s), -half, half - 1) * s
  top = 2.0 ** bits - 1
  amax = jnp.max(x)
  s = jnp.where(amax > 0, amax, 1.0) / top
  return jnp.clip(jnp.round(x / s), 0, top) * s


def _maybe(fq, x: jax.Array, bits: jax.Array | None, *args) -> jax.Array:
  """``fq(x, bits)`` where `bits` > 0, else `x` (bits 0: the side stays
  float; None: no quantizer in the graph at all)."""
  if bits is None:
    return x
  return jnp.where(bits > 0, fq(x, jnp.maximum(bits, 2), *args), x)


@dataclasses.dataclass(frozen=True)
class Probe:
  """A float linen model and its variables, with the layers to probe.

  Attributes:
    model: the linen model (any quantization config: it runs in float, the
      probe quantizing one layer at a time).
    variables: its ``params`` and ``batch_stats``.
    layers: the cost model's layers (`aqt_ext.cost.LayerCost`), in call
      order, one per module path.
    signed: per layer, whether its input grid is signed (the first layer).
  """

  model: nn.Module
  variables: dict
  layers: tuple[cost_lib.LayerCost, ...]
  signed: tuple[bool, ...]

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(l.path for l in self.layers)


def make_probe(model: nn.Module, variables: dict,
               image_shape: Sequence[int], first: str | None = None
               ) -> Probe:
  """The `Probe` of `model`; `first`: a regex naming the layer(s) whose
  input is signed (``models.FIRST_LAYER``)."""
  layers = cost_lib.model_cost(model, tuple(image_shape), train=False).layers
  unique = tuple({l.path: l for l in layers}.values())
  kernels = _kernel_keys(variables["params"])
  for l in unique:
    if l.path not in kernels:
      raise ValueError(f"layer {l.path!r} has no kernel in the variables' "
                       "params: they are not this model's")
  signed = tuple(bool(first and re.search(first, l.path)) for l in unique)
  return Probe(model, {k: v for k, v in variables.items()
                       if k in ("params", "batch_stats")}, unique, signed)


def _kernel_keys(params: dict) -> dict[str, tuple]:
  flat = traverse_util.flatten_dict(params)
  return {"/".join(k[:-1]): k for k in flat if k[-1] == "kernel"}


def _apply(probe: Probe, wbits, abits, x, eps=None, kernels=None,
           capture=False):
  """Logits with layer i's kernel quantized at ``wbits[i]`` and its input
  at ``abits[i]`` (0: float; `wbits` / `abits` None: all float), ``eps[i]`` added to that input; `kernels`
  overrides the kernels (path -> array); `capture` also returns each
  layer's float input."""
  index = {p: i for i, p in enumerate(probe.paths)}
  keys = _kernel_keys(probe.variables["params"])
  flat = traverse_util.flatten_dict(probe.variables["params"])
  for p, i in index.items():
    w = flat[keys[p]] if kernels is None else kernels[p]
    flat[keys[p]] = _maybe(_fq_weight, w, None if wbits is None else wbits[i])
  variables = {**probe.variables,
               "params": traverse_util.unflatten_dict(flat)}
  done, inputs = set(), {}

  def intercept(next_fun, args, kwargs, context):
    path = "/".join(str(p) for p in context.module.scope.path)
    i = index.get(path)
    if context.method_name != "__call__" or i is None or path in done:
      return next_fun(*args, **kwargs)
    done.add(path)
    xin = args[0]
    inputs[path] = xin
    if eps is not None:
      xin = xin + eps[path]
    xin = _maybe(_fq_input, xin, None if abits is None else abits[i],
                 probe.signed[i])
    return next_fun(xin, *args[1:], **kwargs)

  with nn.intercept_methods(intercept):
    logits = probe.model.apply(variables, x, train=False)
  return (logits, inputs) if capture else logits


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def _check(probe: Probe, batches, candidates):
  if not batches:
    raise ValueError("sensitivity: needs at least one batch")
  for c in candidates:
    if (len(c) != 2 or not all(isinstance(b, int) and 2 <= b <= 8
                               for b in c)):
      raise ValueError(f"sensitivity: candidate {c!r} is not allowed; "
                       "allowed: (weight bits, input bits) in 2..8")


def loss_delta(probe: Probe, batches: Sequence[dict],
               candidates: Sequence[tuple[int, int]]) -> np.ndarray:
  """(layers, candidates) loss increases, measured (module docstring)."""
  _check(probe, batches, candidates)
  n = len(probe.layers)

  @jax.jit
  def loss(wbits, abits, x, y):
    return _loss(_apply(probe, wbits, abits, x), y)

  zeros = jnp.zeros((n,), jnp.float32)
  base = np.mean([float(loss(zeros, zeros, b["image"], b["label"]))
                  for b in batches])
  out = np.zeros((n, len(candidates)))
  for i in range(n):
    for j, (wb, ab) in enumerate(candidates):
      wbits, abits = zeros.at[i].set(wb), zeros.at[i].set(ab)
      out[i, j] = np.mean([float(loss(wbits, abits, b["image"], b["label"]))
                           for b in batches]) - base
  return out


def hessian_traces(probe: Probe, batches: Sequence[dict], num_samples: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per layer, Hutchinson estimates of Tr(H_W) and Tr(H_X) of the mean
  loss (averaged over `num_samples` Rademacher vectors per batch)."""
  n = len(probe.layers)
  keys = _kernel_keys(probe.variables["params"])
  flat = traverse_util.flatten_dict(probe.variables["params"])
  kernels = {p: flat[keys[p]] for p in probe.paths}

  def loss(k, e, x, y):
    return _loss(_apply(probe, None, None, x, eps=e, kernels=k), y)

  @jax.jit
  def vhv(k, e, v, x, y):
    grad = lambda k_, e_: jax.grad(loss, argnums=(0, 1))(k_, e_, x, y)  # noqa: E731
    hv = jax.jvp(grad, (k, e), v)[1]
    return ({p: jnp.vdot(v[0][p], hv[0][p]) for p in k},
            {p: jnp.vdot(v[1][p], hv[1][p]) for p in e})

  @jax.jit
  def layer_inputs(x):
    return _apply(probe, None, None, x, capture=True)[1]

  tw, ta = np.zeros(n), np.zeros(n)
  key = jax.random.key(seed)
  for b in batches:
    eps = {p: jnp.zeros_like(v) for p, v in layer_inputs(b["image"]).items()}
    for _ in range(num_samples):
      key, kk, ke = jax.random.split(key, 3)
      v = (_rademacher(kk, kernels), _rademacher(ke, eps))
      w, a = vhv(kernels, eps, v, b["image"], b["label"])
      tw += np.array([float(w[p]) for p in probe.paths])
      ta += np.array([float(a[p]) for p in probe.paths])
  count = len(batches) * num_samples
  return tw / count, ta / count


def _rademacher(key, tree: dict) -> dict:
  keys = jax.random.split(key, len(tree))
  return {p: jax.random.rademacher(k, v.shape, v.dtype)
          for k, (p, v) in zip(keys, sorted(tree.items()))}


def quantization_errors(probe: Probe, batches: Sequence[dict],
                        bits: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Per layer and width in `bits`: ||Q(W) - W||^2 and the mean over the
  batches of ||Q(X) - X||^2 (the probe's quantizers)."""
  n = len(probe.layers)
  keys = _kernel_keys(probe.variables["params"])
  flat = traverse_util.flatten_dict(probe.variables["params"])

  @jax.jit
  def input_errors(x):
    inputs = _apply(probe, None, None, x, capture=True)[1]
    return {p: jnp.stack([jnp.sum((_fq_input(inputs[p], jnp.float32(b), s)
                                   - inputs[p]) ** 2) for b in bits])
            for p, s in zip(probe.paths, probe.signed)}

  ew = np.array([[float(jnp.sum((_fq_weight(flat[keys[p]], jnp.float32(b))
                                 - flat[keys[p]]) ** 2)) for b in bits]
                 for p in probe.paths])
  ea = np.zeros((n, len(bits)))
  for bt in batches:
    e = input_errors(bt["image"])
    ea += np.array([np.asarray(e[p]) for p in probe.paths])
  return ew, ea / len(batches)


def hessian(probe: Probe, batches: Sequence[dict],
            candidates: Sequence[tuple[int, int]], num_samples: int = 8,
            seed: int = 0) -> np.ndarray:
  """(layers, candidates) second-order estimates (module docstring)."""
  _check(probe, batches, candidates)
  tw, ta = hessian_traces(probe, batches, num_samples, seed)
  bits = sorted({b for c in candidates for b in c})
  ew, ea = quantization_errors(probe, batches, bits)
  sizes_w = np.array([l.weights for l in probe.layers], np.float64)
  x0 = batches[0]["image"]
  inputs = jax.eval_shape(lambda x: _apply(probe, None, None, x,
                                           capture=True)[1], x0)
  sizes_a = np.array([inputs[p].size for p in probe.paths], np.float64)
  col = {b: k for k, b in enumerate(bits)}
  out = np.zeros((len(probe.layers), len(candidates)))
  for j, (wb, ab) in enumerate(candidates):
    out[:, j] = 0.5 * (tw / sizes_w * ew[:, col[wb]]
                       + ta / sizes_a * ea[:, col[ab]])
  return out


def monotone(s: np.ndarray, candidates: Sequence[tuple[int, int]]
             ) -> np.ndarray:
  """Estimates `s` (layers x candidates) made consistent with what is
  known: each is clipped at 0 (quantizing a layer is not estimated to help:
  a negative loss delta is noise of the few batches), then raised to the
  largest estimate of any candidate with at least its weight and input bits
  (more bits cannot hurt more). Measured on a ResNet-20 w6a6 budget, 111 of
  550 raw loss deltas were negative; without this the exact allocator chose
  those and left up to 29 % of the budget unused."""
  s = np.maximum(np.asarray(s, np.float64), 0.0)
  out = np.empty_like(s)
  for j, (w, a) in enumerate(candidates):
    wider = [k for k, (w2, a2) in enumerate(candidates) if w2 >= w and a2 >= a]
    out[:, j] = s[:, wider].max(axis=1)
  return out


def estimate(method: str, probe: Probe, batches: Sequence[dict],
             candidates: Sequence[tuple[int, int]], **kw: Any) -> np.ndarray:
  """`loss_delta` or `hessian` by name."""
  if method not in METHODS:
    raise ValueError(f"sensitivity method={method!r} is not allowed; "
                     f"allowed: {', '.join(map(repr, METHODS))}")
  if method == "loss_delta":
    return loss_delta(probe, batches, candidates)
  return hessian(probe, batches, candidates, **kw)
