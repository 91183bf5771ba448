"""Train-step time of quantizer variants vs float, measured side by side.

A CIFAR-style ResNet-20 built from QuantConv / QuantDense; one jitted train
step (forward, backward, optax SGD update) at batch 128 on 28x28x1 input.
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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqt_ext import models
from aqt_ext.config import parse_spec

VARIANTS = {
    "float": "float",
    "uniform_w4a4": "w4a4",
    "uniform_w8a8": "w8a8",
    "lsq_w4a4": "lsq:w4a4",
    "pact_w4a4": "pact:w4a4",
    "dq_w4a4": "dq:w4a4",
}


def make_step(spec: str, batch):
  quant = parse_spec(spec, first=models.FIRST_LAYER, last=models.LAST_LAYER)
  model = models.create_model("cifar_resnet20", num_classes=10, quant=quant)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), batch["image"])
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
  state = (variables["params"], variables["batch_stats"],
           variables.get("quant_stats", {}), tx.init(variables["params"]))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, bstats, qstats, opt = state

    def loss_fn(p):
      v = {"params": p, "batch_stats": bstats}
      if qstats:
        v["quant_stats"] = qstats
      logits, new = model.apply(v, batch["image"], train=True,
                                mutable=["batch_stats", "quant_stats",
                                         "quant_losses"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]).mean()
      loss += sum(jnp.sum(x) for x in jax.tree.leaves(
          new.get("quant_losses", {})))
      return loss, new

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
    step, state = make_step(VARIANTS[name], batch)
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
  print(f"{'variant':<14} {'ms/step':>9} {'compile s':>10} {'x float':>8}")
  for r in rows:
    print(f"{r['variant']:<14} {r['ms_per_step']:>9.2f} {r['compile_s']:>10.2f}"
          f" {r['ratio_vs_float']:>8.3f}")


if __name__ == "__main__":
  main()
