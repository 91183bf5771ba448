#!/usr/bin/env bash
# The default job (configs/default.py) with static input ranges
# (w4a4_fl8_static), so that the ONNX export can run every layer on ORT's
# fused integer kernels; then its export and the check on the test set.
set -euo pipefail
cd "$(dirname "$0")/../.."
w=${1:-/tmp/onnx_default}
.venv/bin/python -m aqt_ext.main --config=configs/default.py --workdir=$w \
  --config.quant=w4a4_fl8_static
for rq in true false; do
  .venv/bin/python -m aqt_ext.export --workdir=$w --format=onnx \
    --out=$w/model_requantize_$rq.onnx --requantize=$rq --check_examples=10000
done
