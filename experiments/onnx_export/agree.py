# Prediction agreement on the 10,000 test images: QAT fake quant, XLA integer
# execution, the ONNX graph on ORT without and with its graph rewrites.
#   .venv/bin/python experiments/onnx_export/agree.py WORKDIR
import json, numpy as np, jax, ml_collections, onnx, onnxruntime as ort
from aqt_ext import train, data as D, serve
from aqt_ext.export import onnx as ox
import sys
w = sys.argv[1] if len(sys.argv) > 1 else "/tmp/onnx_default"
config = ml_collections.ConfigDict(json.load(open(f"{w}/config.json")))
model = train.create_model(config, 10)
v = train.load_variables(w, ("params", "batch_stats", "quant_stats"), "w", "", "")
xs, ys = [], []
for b in D.eval_batches("fashion_mnist", 1000, None, 10000, split="test"):
  xs.append(b["image"]); ys.append(b["label"])
x, y = np.concatenate(xs), np.concatenate(ys)
fake = np.concatenate([np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(v, x[i:i+1000])) for i in range(0, 10000, 1000)])
twin = model.clone(quant=serve.int_execution(model.quant))
intl = np.concatenate([np.asarray(jax.jit(lambda v, a: twin.apply(v, a, train=False))(v, x[i:i+1000])) for i in range(0, 10000, 1000)])
res = {"fake_acc": float(np.mean(fake.argmax(-1) == y)), "int_acc": float(np.mean(intl.argmax(-1) == y)),
       "fake_vs_int_same": float(np.mean(fake.argmax(-1) == intl.argmax(-1)))}
for rq in (False, True):
  p = ox.to_onnx(model, v, x[:8], call_kwargs={"train": False}, requantize=rq, calibration=x[:128])
  o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  s0 = ort.InferenceSession(p.SerializeToString(), o, providers=["CPUExecutionProvider"])
  s1 = ox.session(p)
  u = np.concatenate([s0.run(None, {"input": x[i:i+1000]})[0] for i in range(0, 10000, 1000)])
  f = np.concatenate([s1.run(None, {"input": x[i:i+1000]})[0] for i in range(0, 10000, 1000)])
  res[f"rq{rq}"] = {"unopt_vs_int_same": float(np.mean(u.argmax(-1) == intl.argmax(-1))), "unopt_vs_int_maxdiff": float(np.abs(u - intl).max()),
                    "opt_vs_int_same": float(np.mean(f.argmax(-1) == intl.argmax(-1))), "opt_vs_fake_same": float(np.mean(f.argmax(-1) == fake.argmax(-1))),
                    "opt_acc": float(np.mean(f.argmax(-1) == y))}
print(json.dumps(res, indent=1))
