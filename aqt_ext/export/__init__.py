"""Export targets of a trained aqt_ext model.

* `aqt_ext.export.onnx`: an ONNX graph with QuantizeLinear /
  DequantizeLinear around every quantized operand, for ONNX Runtime
  (needs the ``serve`` extra: ``onnx``, ``onnxruntime``).
* ``python -m aqt_ext.export --workdir=W --format=onnx --out=model.onnx``:
  the model a training workdir holds, checked by running it.

The integer serving checkpoint (orbax, run by XLA) is `aqt_ext.serve`.
Submodules are imported on use, so ``import aqt_ext.export`` loads no onnx.
"""
