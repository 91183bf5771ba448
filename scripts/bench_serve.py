"""Inference time of served integer models vs the float model, side by side.

A CIFAR-style ResNet-20 on 28x28x1 input, at each batch size of --batch.
Variants:

* ``float``: the float model's jitted eval forward (XLA).
* ``served_<spec>``: the model trained with that quant spec, exported with
  `aqt_ext.serve.export` (integer kernels, int4 packed two to a byte) and
  run by `aqt_ext.serve.load`'s integer forward (XLA: int8 operands, int32
  accumulation).
* ``ort_float``: the float model as an ONNX graph on ONNX Runtime (CPU).
* ``ort_<spec>``: the model exported by `aqt_ext.export.onnx.to_onnx` (QDQ,
  int8 initializers, static input scales; ``_static`` specs) on ONNX
  Runtime, with the int8 output requantization that lets every conv run as
  ``QLinearConv``; ``ort_exact_<spec>``: without it (convs before residual
  adds run as float convs on dequantised integers).
* ``ort_w4a4_fl8_r8``: the model trained with its residual adds' inputs
  quantized (``_r8``): every conv's output quantization is QAT's own, so
  all 21 convs run as ``QLinearConv`` without any added requantization;
  ``ort_wide_w4a4_fl8_r8``: the same with the 4-bit input integers widened
  (the int32 bias on a 17x finer grid; ``requantize=False``);
  ``ort_exact_w4a4_fl8_r8``: widened, and the first conv and the two
  projections as float ops (``float_layers``): the graph closest to QAT
  eval (experiments/RESULTS.md).

Weights are random (timing does not depend on them); static input ranges
are calibrated on the benchmark batch. All variants of a batch size are
compiled / loaded and warmed up first, then timed interleaved (round-robin,
one batch each per round) so that machine load affects them alike; the
median is reported. ORT runs with --threads intra-op threads that sleep
between runs (no spin-waiting: a spinning session takes CPU from the
variant timed after it).

  python scripts/bench_serve.py [--rounds 20] [--batch 1,128] [--threads 2]
      [--variants float,served_w8a8,...]

Prints one JSON object per variant and batch size (variant, batch,
ms_per_batch, ratio_vs_float, throughput_vs_float, weight_bytes, file_bytes,
fused: ORT's integer-kernel nodes, compile_s), then a table.
``weight_bytes``: the float model's params, or the served weights (integer
kernels, scales, BatchNorm params); ``file_bytes``: the .onnx file.
"""

import argparse
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from onnx import numpy_helper

from aqt_ext import models, serve

VARIANTS = {
    "float": "float",
    "served_w8a8": "w8a8",
    "served_w4a4_fl8": "w4a4_fl8",
    "ort_float": "float",
    "ort_w8a8": "w8a8_static",
    "ort_w4a4_fl8": "w4a4_fl8_static",
    "ort_exact_w4a4_fl8": "w4a4_fl8_static",
    "ort_w4a4_fl8_r8": "w4a4_fl8_static_r8",
    "ort_wide_w4a4_fl8_r8": "w4a4_fl8_static_r8",
    "ort_exact_w4a4_fl8_r8": "w4a4_fl8_static_r8",
}
# The ONNX export's float_layers of a variant (default: none).
FLOAT_LAYERS = {"ort_exact_w4a4_fl8_r8": r"conv_init$|proj_conv$"}
EVAL = {"train": False}


def make_model(spec: str):
  quant = models.quant_spec(spec)
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


def calibrated(model, variables, x) -> dict:
  """`variables` with the static input ranges calibrated on `x` (one
  train-mode pass; the random BatchNorm statistics are kept)."""
  if "quant_stats" not in variables:
    return variables
  _, upd = jax.jit(functools.partial(model.apply, train=True,
                                     mutable=["batch_stats", "quant_stats"]))(
                                         variables, x)
  return {**variables, "quant_stats": upd["quant_stats"]}


def make_variant(name: str, x, workdir: str, threads: int):
  """(forward fn of x, weight bytes, file bytes, fused node count)."""
  spec = VARIANTS[name]
  model = make_model(spec)
  variables = calibrated(model, random_variables(model, x), x)
  if name.startswith("ort_"):
    from aqt_ext.export import onnx as ox  # pylint: disable=g-import-not-at-top
    proto = ox.to_onnx(model, variables, np.asarray(x), call_kwargs=EVAL,
                       requantize=not name.startswith(("ort_exact_",
                                                       "ort_wide_")),
                       float_layers=FLOAT_LAYERS.get(name))
    path = f"{workdir}/{name}.onnx"
    ox.save(proto, path)
    fused = ox.fused_ops(proto, f"{workdir}/{name}.opt.onnx")
    sess = ox.session(proto, threads=threads, spinning=False)
    fn = lambda a: sess.run(None, {ox.INPUT: np.asarray(a)})[0]  # noqa: E731
    inits = sum(np.asarray(numpy_helper.to_array(t)).nbytes
                for t in proto.graph.initializer)
    return fn, inits, os.path.getsize(path), sum(
        fused.get(k, 0) for k in ox.INTEGER_KERNELS)
  if spec == "float":
    fn = jax.jit(functools.partial(model.apply, **EVAL))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(variables["params"]))
    return functools.partial(fn, variables), nbytes, None, None
  directory = f"{workdir}/{name}"
  result = serve.export(model, variables, x, directory, call_kwargs=EVAL)
  return (serve.load(directory, model, x, call_kwargs=EVAL),
          result.served_bytes, None, None)


def block(y):
  return jax.block_until_ready(y) if isinstance(y, jax.Array) else y


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--batch", default="1,128")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  names = args.variants.split(",")
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f"--variants: {name!r} is not allowed; allowed values:"
                       f" {', '.join(VARIANTS)}")
  try:
    batches = [int(b) for b in args.batch.split(",")]
  except ValueError:
    raise ValueError(f"--batch={args.batch!r}: allowed values are "
                     "comma-separated positive ints") from None
  if names[0] != "float":
    names = ["float"] + [n for n in names if n != "float"]
  rows = []
  for batch in batches:
    rows += bench(names, batch, args.rounds, args.threads)
  print(f"\n{jax.devices()[0].device_kind} ({jax.device_count()} device, "
        f"{os.cpu_count()} CPUs), cifar_resnet20 28x28x1, {args.rounds} "
        f"interleaved rounds, median; ORT {args.threads} threads:")
  print(f"{'variant':<20} {'batch':>5} {'ms/batch':>9} {'x float':>8} "
        f"{'thru x':>7} {'weight bytes':>13} {'x float':>8} {'fused':>5}")
  for r in rows:
    print(f"{r['variant']:<20} {r['batch']:>5} {r['ms_per_batch']:>9.2f} "
          f"{r['ratio_vs_float']:>8.3f} {r['throughput_vs_float']:>7.2f} "
          f"{r['weight_bytes']:>13,d} {r['weight_ratio']:>8.3f} "
          f"{'-' if r['fused'] is None else r['fused']:>5}")


def bench(names, batch: int, rounds: int, threads: int) -> list[dict]:
  x = jnp.asarray(np.random.default_rng(1).normal(
      size=(batch, 28, 28, 1)), jnp.float32)
  fns, nbytes, fbytes, fused, compile_s = {}, {}, {}, {}, {}
  with tempfile.TemporaryDirectory() as workdir:
    for name in names:
      fns[name], nbytes[name], fbytes[name], fused[name] = make_variant(
          name, x, workdir, threads)
      t = time.perf_counter()
      block(fns[name](x))
      compile_s[name] = time.perf_counter() - t
      for _ in range(2):  # warm-up
        block(fns[name](x))
    times = {n: [] for n in names}
    for _ in range(rounds):
      for name in names:
        t = time.perf_counter()
        block(fns[name](x))
        times[name].append(time.perf_counter() - t)
  med = {n: 1e3 * float(np.median(times[n])) for n in names}
  rows = []
  for name in names:
    row = {"variant": name, "batch": batch,
           "ms_per_batch": round(med[name], 3),
           "ratio_vs_float": round(med[name] / med["float"], 3),
           "throughput_vs_float": round(med["float"] / med[name], 3),
           "weight_bytes": int(nbytes[name]),
           "weight_ratio": round(nbytes[name] / nbytes["float"], 3),
           "file_bytes": fbytes[name], "fused": fused[name],
           "compile_s": round(compile_s[name], 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  main()
