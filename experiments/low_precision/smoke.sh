#!/usr/bin/env bash
# Smoke runs (issue 16): CIFAR ResNet-20 w0.5 on Fashion-MNIST, 1 epoch,
# the main job's hyperparameters, float vs fp8 e4m3 fwd + e5m2 bwd, seeds 0, 1.
set -e
for spec in float fp8_ge5m2; do for seed in 0 1; do
  .venv/bin/python -m aqt_ext.main --config=configs/default.py \
    --config.quant=$spec --config.num_epochs=1.0 --config.seed=$seed \
    --workdir=/tmp/lp_smoke/$spec-s$seed
done; done
