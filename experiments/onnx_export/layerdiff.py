# Per fused layer: where ORT (fused kernels) and the same graph without ORT
# rewrites differ, on 1,000 test images: the fraction of 4-bit input
# integers (Clip outputs) and of activation-quantizer integers (`_rR`
# outputs) that differ, and by how many levels at most.
#   .venv/bin/python experiments/onnx_export/layerdiff.py WORKDIR [REQUANTIZE]
import json, sys, numpy as np, jax, ml_collections, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
from aqt_ext import train, data as D
from aqt_ext.export import onnx as ox
w = sys.argv[1]
rq = len(sys.argv) > 2 and sys.argv[2] == "true"
config = ml_collections.ConfigDict(json.load(open(f"{w}/config.json")))
model = train.create_model(config, 10)
v = train.load_variables(w, ("params", "batch_stats", "quant_stats"), "w", "", "")
x = next(D.eval_batches("fashion_mnist", 1000, None, 1000, split="test"))["image"]
p = ox.to_onnx(model, v, x[:8], call_kwargs={"train": False}, requantize=rq)
import tempfile, os
opt_path = os.path.join(tempfile.mkdtemp(), "opt.onnx")
ox.fused_ops(p, opt_path)
opt = onnx.load(opt_path)
inits = {t.name: t for t in opt.graph.initializer}
names = []
for n in opt.graph.node:
  if n.op_type == "DequantizeLinear" and (n.output[0].endswith("out_dq") or n.output[0].endswith("quant_dq")):
    names.append((n.output[0], TensorProto.FLOAT, "actdq:" + n.input[1]))
  if n.op_type == "Clip":
    names.append((n.output[0], TensorProto.UINT8, "clip"))
pn = {o for nd in p.graph.node for o in nd.output}
pname = lambda n: n if n in pn else n[2:].split("/")[0]
names = [t for t in names if pname(t[0]) in pn and "/" not in t[0]]
def run(m0, rename):
  m = onnx.ModelProto(); m.CopyFrom(m0)
  nm = [rename(n) for n, _, _ in names]
  for n, (_, dt, _) in zip(nm, names): m.graph.output.append(helper.make_tensor_value_info(n, dt, None))
  o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
  outs = s.run(nm + ["output"], {"input": x})
  return outs
a = run(p, pname); b = run(opt, lambda n: n)
for (nme, _, kind), u, vv in zip(names, a, b):
  if u.shape != vv.shape: vv = vv.transpose(0, 3, 1, 2)
  if kind.startswith("actdq"):
    sc = float(numpy_helper.to_array(inits[kind[6:]])); d = np.round((u - vv) / sc).astype(int); kind = "act"
  else:
    d = u.astype(int) - vv.astype(int)
  print(f"{kind:5s} {nme:45s} differ {np.mean(d != 0):.5f} max {np.abs(d).max()}")
print("pred agree", np.mean(a[-1].argmax(-1) == b[-1].argmax(-1)))
