# Per layer: the fraction of 4-bit input integers where ORT (fused kernels)
# and the same graph without ORT rewrites differ (500 test images).
#   .venv/bin/python experiments/onnx_export/layerdiff.py WORKDIR
import json, numpy as np, jax, ml_collections, onnx, onnxruntime as ort
from onnx import helper, TensorProto
from aqt_ext import train, data as D
from aqt_ext.export import onnx as ox
import sys
w = sys.argv[1] if len(sys.argv) > 1 else "/tmp/onnx_default"
config = ml_collections.ConfigDict(json.load(open(f"{w}/config.json")))
model = train.create_model(config, 10)
v = train.load_variables(w, ("params", "batch_stats", "quant_stats"), "w", "", "")
x = next(D.eval_batches("fashion_mnist", 500, None, 500, split="test"))["image"]
p = ox.to_onnx(model, v, x[:8], call_kwargs={"train": False}, requantize=False)
ox.fused_ops(p, "/tmp/def_opt.onnx")
opt = onnx.load("/tmp/def_opt.onnx")
clips = [o for n in opt.graph.node if n.op_type == "Clip" for o in n.output]
def run(m, names, level):
  m = onnx.ModelProto(); m.CopyFrom(mm := (opt if level else p))
  for n in names: m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.UINT8, None))
  o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
  return dict(zip(names, s.run(names, {"input": x})))
a = run(p, clips, 0); b = run(opt, clips, 1)
for n in clips:
  d = a[n].astype(int) - b[n].astype(int)
  print(f"{n:50s} differ {np.mean(d != 0):.5f} max {np.abs(d).max()}")
