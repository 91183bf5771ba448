#!/usr/bin/env bash
# DQ direct vs latent-STE weight updates: a smoke run on real Fashion-MNIST
# (issue 14), evaluated on the held-out validation split. One seed each: it
# shows that the direct update trains, not which update is better.
set -euo pipefail
cd "$(dirname "$0")/../.."
for q in dq:w4a4_fl8 dqste:w4a4_fl8; do
  .venv/bin/python -m aqt_ext.main --config=configs/base.py \
    --workdir=/tmp/dq_smoke/${q%%:*} --config.quant=$q \
    --config.model=cifar_resnet8 --config.width=0.5 \
    --config.num_train_examples=10000 --config.validation_examples=5000 \
    --config.eval_split=validation --config.num_epochs=2 \
    --config.warmup_epochs=0.2 --config.batch_size=128 --config.seed=0 \
    --config.augment=False
  cp /tmp/dq_smoke/${q%%:*}/result.json experiments/dq_direct_smoke/${q%%:*}_result.json
done
