#!/usr/bin/env bash
# REx at 2-bit weights: rtn, rex order 2 full (sparsity 0) and sparse
# (sparsity 0.5) at W2A4 and W2A8, on the float ResNet-8 x0.5 of
# experiments/dq_ablation_v2/float.sh; validation split. Prints accuracy and
# weight MSE (the question: why did sparse beat full at W2A4 in
# experiments/ptq_fashion_mnist?).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/method_checks/rex_w2.txt
: > $out
for q in w2a4 w2a8; do
  for m in "rtn" "rex --config.ptq.sparsity=0.0" "rex --config.ptq.sparsity=0.5"; do
    set -- $m
    name=$1${2:+-${2##*=}}
    .venv/bin/python -m aqt_ext.ptq --config=configs/ptq_fashion_mnist.py:$1 ${2:-} \
      --checkpoint=/tmp/dqv2_float --workdir=/tmp/rex_w2/$name-$q \
      --config.model=cifar_resnet8 --config.width=0.5 \
      --config.validation_examples=5000 --config.eval_split=validation \
      --config.quant=$q 2>/dev/null | tail -1
    python3 -c "import json; d=json.load(open('/tmp/rex_w2/$name-$q/result.json')); print('  $name $q weight_mse', d['weight_mse'], 'acc', d['eval_accuracy'])"
  done
done | tee -a $out
