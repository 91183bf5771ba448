#!/usr/bin/env bash
# The default job (configs/default.py) with static input ranges and the
# residual adds' inputs quantized to 8 bits (w4a4_fl8_static_r8), so that
# every conv's output quantization is QAT's own; then its ONNX exports and
# their checks on the 10,000 test images.
set -euo pipefail
cd "$(dirname "$0")/../.."
w=${1:-/tmp/r8/w}
.venv/bin/python -m aqt_ext.main --config=configs/default.py --workdir=$w \
  --config.quant=w4a4_fl8_static_r8
for rq in true false; do
  .venv/bin/python -m aqt_ext.export --workdir=$w --format=onnx \
    --out=$w/model_requantize_$rq.onnx --requantize=$rq --check_examples=10000
done
.venv/bin/python -m aqt_ext.export --workdir=$w --format=onnx \
  --out=$w/model_float_layers.onnx --requantize=false \
  --float_layers='conv_init$|proj_conv$' --check_examples=10000
