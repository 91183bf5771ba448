"""Train-step time of quantizer variants vs float, measured side by side.

A CIFAR-style ResNet-20 built from QuantConv / QuantDense (linen) or from
the NNX model zoo (``nnx_*`` rows: the same model and quantizers on NNX);
one jitted train step (forward, backward, optax SGD update) at batch 128 on
28x28x1 input. ``hand_ste_w4a4`` is the floor: the float linen model with a
minimal hand-written straight-through fake quant (per-output-channel absmax
kernels, per-tensor absmax inputs, 4 bits, every layer), applied by an
interceptor and a map over the kernels, so it costs only its own ops.
All variants are compiled first, then timed interleaved (round-robin, one
step each per round) so that machine load affects them alike; the median of
the per-step times is reported.

  python scripts/bench_step.py [--rounds 30] [--variants float,w4a4,...]

Prints one JSON object per variant (variant, ms_per_step, compile_s,
ratio_vs_float), then a table.
"""

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqt_ext import models, train

VARIANTS = {
    "float": "float",
    "hand_ste_w4a4": "float",
    "uniform_w4a4": "w4a4",
    "uniform_w8a8": "w8a8",
    "lsq_w4a4": "lsq:w4a4",
    "pact_w4a4": "pact:w4a4",
    "dq_w4a4": "dq:w4a4",
    # Quantized backward passes (issue 16): AQT numerics forward, then int8
    # or fp8 gradient contractions (emulated on CPU).
    "aqt_w8a8": "aqt:w8a8",
    "aqt_w8a8_g8": "aqt:w8a8_g8",
    "aqt_w8a8_g8sr": "aqt:w8a8_g8sr",
    "aqt_w8a8_ge5m2": "aqt:w8a8_ge5m2",
    "fp8": "fp8",
    "fp8_ge5m2": "fp8_ge5m2",
    "nnx_float": "float",
    "nnx_uniform_w4a4": "w4a4",
    "nnx_lsq_w4a4": "lsq:w4a4",
    "nnx_dq_w4a4": "dq:w4a4",
}
HAND_BITS = 4


def _ste_absmax(x, axes):
  """Symmetric int-b fake quant, scale = absmax over `axes` / (2^(b-1) - 1),
  straight-through gradient."""
  qmax = 2.0 ** (HAND_BITS - 1) - 1
  s = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / qmax
  s = jnp.where(s > 0, s, 1.0)
  q = jnp.clip(jnp.round(x / s), -qmax, qmax) * s
  return x + jax.lax.stop_gradient(q - x)


def _hand_ste_kernels(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, v: _ste_absmax(v, tuple(range(v.ndim - 1)))
      if path[-1].key == "kernel" else v, params)


def _hand_ste_inputs(next_fun, args, kwargs, context):
  if context.method_name == "__call__" and type(
      context.module).__name__ in ("QuantConv", "QuantDense"):
    args = (_ste_absmax(args[0], None),) + tuple(args[1:])
  return next_fun(*args, **kwargs)


def loss_and_stats(logits, labels, losses):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss + sum(jnp.sum(x) for x in jax.tree.leaves(losses))


def make_step(spec: str, batch, hand_ste: bool = False, nnx: bool = False):
  """The jitted train step of a variant; with `nnx`, of the NNX model as the
  training loop runs it (`aqt_ext.train.NnxModel`: merged inside the step)."""
  quant = models.quant_spec(spec)
  if nnx:
    model = train.NnxModel(lambda rngs, in_features: models.create_model(
        "cifar_resnet20", num_classes=10, quant=quant, framework="nnx",
        rngs=rngs, in_features=in_features))
    variables = model.init(jax.random.PRNGKey(0), batch["image"])
  else:
    model = models.create_model("cifar_resnet20", num_classes=10,
                                quant=quant)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), batch["image"])
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
  state = (variables["params"], variables["batch_stats"],
           variables.get("quant_stats", {}), tx.init(variables["params"]))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, bstats, qstats, opt = state

    def loss_fn(p):
      v = {"params": _hand_ste_kernels(p) if hand_ste else p,
           "batch_stats": bstats}
      if qstats:
        v["quant_stats"] = qstats
      apply = functools.partial(model.apply, v, batch["image"], train=True,
                                mutable=["batch_stats", "quant_stats",
                                         "quant_losses"],
                                rngs={"quant": jax.random.key(0)})
      if hand_ste:
        with nn.intercept_methods(_hand_ste_inputs):
          logits, new = apply()
      else:
        logits, new = apply()
      return loss_and_stats(logits, batch["label"],
                            new.get("quant_losses", {})), new

    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), new["batch_stats"],
            new.get("quant_stats", qstats), opt), loss

  return step, state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  names = args.variants.split(",")
  if names[0] != "float":
    names = ["float"] + [n for n in names if n != "float"]
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, 28, 28, 1)),
                                jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  steps, states, compile_s = {}, {}, {}
  for name in names:
    step, state = make_step(VARIANTS[name], batch,
                            hand_ste=name.startswith("hand_ste"),
                            nnx=name.startswith("nnx_"))
    t = time.perf_counter()
    state, loss = step(state, batch)
    jax.block_until_ready(loss)
    compile_s[name] = time.perf_counter() - t
    for _ in range(2):  # warm-up
      state, loss = step(state, batch)
    jax.block_until_ready(loss)
    steps[name], states[name] = step, state
  times = {n: [] for n in names}
  for _ in range(args.rounds):
    for name in names:
      t = time.perf_counter()
      states[name], loss = steps[name](states[name], batch)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t)
  med = {n: 1e3 * float(np.median(times[n])) for n in names}
  rows = []
  for name in names:
    row = {"variant": name, "ms_per_step": round(med[name], 2),
           "compile_s": round(compile_s[name], 2),
           "ratio_vs_float": round(med[name] / med["float"], 3)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"\n{jax.devices()[0].device_kind} ({jax.device_count()} device), "
        f"batch {args.batch}, {args.rounds} interleaved rounds, median:")
  print(f"{'variant':<18} {'ms/step':>9} {'compile s':>10} {'x float':>8} "
        f"{'compile x':>10}")
  for r in rows:
    print(f"{r['variant']:<18} {r['ms_per_step']:>9.2f} "
          f"{r['compile_s']:>10.2f} {r['ratio_vs_float']:>8.3f} "
          f"{r['compile_s'] / compile_s['float']:>10.2f}")
  for name in names:
    twin = name[len("nnx_"):] if name.startswith("nnx_") else None
    if twin in med:
      print(f"{name}: {med[name] / med[twin]:.3f}x the linen {twin} step")


if __name__ == "__main__":
  main()
