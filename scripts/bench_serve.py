"""Inference time of served integer models vs the float model, side by side.

A CIFAR-style ResNet-20 on 28x28x1 input, batch 256. The float variant is the
float model's jitted eval forward; a ``served_*`` variant is the model
trained with that quant spec, exported with `aqt_ext.serve.export` (integer
kernels, int4 packed two to a byte) and run by `aqt_ext.serve.load`'s
integer forward (int8 operands, int32 accumulation). Weights are random
(timing does not depend on them). All variants are compiled and warmed up
first, then timed interleaved (round-robin, one batch each per round) so
that machine load affects them alike; the median is reported.

  python scripts/bench_serve.py [--rounds 20] [--batch 256]
      [--variants float,served_w8a8,served_w4a4_fl8]

Prints one JSON object per variant (variant, ms_per_batch, ratio_vs_float,
weight_bytes, compile_s), then a table. ``weight_bytes``: the float model's
params, or the served weights (integer kernels, scales, BatchNorm params).
"""

import argparse
import functools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from aqt_ext import models, serve
from aqt_ext.config import parse_spec

VARIANTS = {
    "float": "float",
    "served_w8a8": "w8a8",
    "served_w4a4_fl8": "w4a4_fl8",
}
EVAL = {"train": False}


def make_model(spec: str):
  quant = parse_spec(spec, first=models.FIRST_LAYER, last=models.LAST_LAYER)
  return models.create_model("cifar_resnet20", num_classes=10, quant=quant)


def random_variables(model, x, seed: int = 0) -> dict:
  """He-normal kernels, random BatchNorm parameters and statistics (numpy,
  so no PRNG program has to compile)."""
  shapes = jax.eval_shape(functools.partial(model.init, **EVAL),
                          jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1] in ("scale", "var"):
      return (0.5 + rng.random(s.shape)).astype(np.float32)
    if path[-1] == "kernel":
      std = np.sqrt(2 / np.prod(s.shape[:-1]))
      return (std * rng.normal(size=s.shape)).astype(np.float32)
    return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

  return unflatten_dict({k: jnp.asarray(fill(k, s))
                         for k, s in flatten_dict(shapes).items()})


def make_variant(spec: str, x, workdir: str):
  """(forward fn of x, weight bytes) of one variant."""
  model = make_model(spec)
  variables = random_variables(model, x)
  if spec == "float":
    fn = jax.jit(functools.partial(model.apply, **EVAL))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(variables["params"]))
    return functools.partial(fn, variables), nbytes
  directory = f"{workdir}/{spec}"
  result = serve.export(model, variables, x, directory, call_kwargs=EVAL)
  return serve.load(directory, model, x, call_kwargs=EVAL), result.served_bytes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  names = args.variants.split(",")
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f"--variants: {name!r} is not allowed; allowed values:"
                       f" {', '.join(VARIANTS)}")
  if names[0] != "float":
    names = ["float"] + [n for n in names if n != "float"]
  x = jnp.asarray(np.random.default_rng(1).normal(
      size=(args.batch, 28, 28, 1)), jnp.float32)
  fns, nbytes, compile_s = {}, {}, {}
  with tempfile.TemporaryDirectory() as workdir:
    for name in names:
      fns[name], nbytes[name] = make_variant(VARIANTS[name], x, workdir)
      t = time.perf_counter()
      jax.block_until_ready(fns[name](x))
      compile_s[name] = time.perf_counter() - t
      for _ in range(2):  # warm-up
        jax.block_until_ready(fns[name](x))
    times = {n: [] for n in names}
    for _ in range(args.rounds):
      for name in names:
        t = time.perf_counter()
        jax.block_until_ready(fns[name](x))
        times[name].append(time.perf_counter() - t)
  med = {n: 1e3 * float(np.median(times[n])) for n in names}
  rows = []
  for name in names:
    row = {"variant": name, "ms_per_batch": round(med[name], 2),
           "ratio_vs_float": round(med[name] / med["float"], 3),
           "weight_bytes": int(nbytes[name]),
           "compile_s": round(compile_s[name], 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"\n{jax.devices()[0].device_kind} ({jax.device_count()} device), "
        f"cifar_resnet20 28x28x1, batch {args.batch}, {args.rounds} "
        "interleaved rounds, median:")
  print(f"{'variant':<16} {'ms/batch':>9} {'x float':>8} {'weight bytes':>13}"
        f" {'x float':>8}")
  for r in rows:
    print(f"{r['variant']:<16} {r['ms_per_batch']:>9.2f} "
          f"{r['ratio_vs_float']:>8.3f} {r['weight_bytes']:>13,d} "
          f"{r['weight_bytes'] / nbytes['float']:>8.3f}")


if __name__ == "__main__":
  main()
