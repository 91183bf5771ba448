#!/usr/bin/env bash
# The float checkpoint every point of the DQ ablation (v2) fine-tunes:
# cifar_resnet8 width 0.5 on the first 55,000 Fashion-MNIST training images
# (the last 5,000 are the validation split and are never trained on),
# 3 epochs, SGD + Nesterov lr 0.1 with cosine decay, no augmentation.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python -m aqt_ext.main --config=configs/base.py \
  --workdir=/tmp/dqv2_float --config.quant=float \
  --config.model=cifar_resnet8 --config.width=0.5 \
  --config.validation_examples=5000 --config.eval_split=validation \
  --config.num_epochs=3 --config.warmup_epochs=0.2 --config.batch_size=128 \
  --config.seed=0 --config.augment=False --config.checkpoint_every_steps=500
cp /tmp/dqv2_float/result.json experiments/dq_ablation_v2/float_result.json
