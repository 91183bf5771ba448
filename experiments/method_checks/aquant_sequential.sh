#!/usr/bin/env bash
# AQuant borders fitted in sequence against the float outputs (this commit)
# vs the one-pass fit to each layer alone (543a1de, checked out at
# /tmp/old_aquant: git worktree add /tmp/old_aquant 543a1de) vs rtn, on the
# float ResNet-8 x0.5 of experiments/dq_ablation_v2/float.sh, W4A4 (first and
# last layers included), validation split (the last 5,000 training images;
# calibration reads the first 55,000). Border options: the defaults (200
# Adam steps, lr 1e-2, 256 images).
set -euo pipefail
cd "$(dirname "$0")/../.."
common=(--checkpoint=/tmp/dqv2_float --config.model=cifar_resnet8
        --config.width=0.5 --config.validation_examples=5000
        --config.eval_split=validation --config.quant=$1)
out=experiments/method_checks/aquant_sequential_$1.txt
: > $out
for m in rtn aquant; do
  .venv/bin/python -m aqt_ext.ptq --config=configs/ptq_fashion_mnist.py:$m \
    --workdir=/tmp/aq_seq/$m-$1 "${common[@]}" 2>/dev/null | tee -a $out
done
(cd /tmp/old_aquant && /work/main/.venv/bin/python -m aqt_ext.ptq \
  --config=configs/ptq_fashion_mnist.py:aquant --workdir=/tmp/aq_seq/old-$1 \
  "${common[@]}" 2>/dev/null | sed 's/^/one-pass (543a1de) /') | tee -a $out
