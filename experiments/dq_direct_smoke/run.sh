#!/usr/bin/env bash
# DQ direct vs latent-STE weight updates (and uniform w4a4 for scale): a
# smoke run on real Fashion-MNIST (issue 14), cifar_resnet8 width 0.5, the
# first 10,000 training images, 2 epochs (156 steps), evaluated on the
# held-out validation split (the last 5,000 training images). Three seeds.
# A short budget: it shows that the direct update trains, not which update
# is better at convergence.
set -euo pipefail
cd "$(dirname "$0")/../.."
for seed in 0 1 2; do
  for q in dq:w4a4_fl8 dqste:w4a4_fl8 w4a4_fl8; do
    name=${q%%:w*}; name=${name/w4a4_fl8/uniform}
    out=/tmp/dq_smoke/$name-s$seed
    .venv/bin/python -m aqt_ext.main --config=configs/base.py \
      --workdir=$out --config.quant=$q \
      --config.model=cifar_resnet8 --config.width=0.5 \
      --config.num_train_examples=10000 --config.validation_examples=5000 \
      --config.eval_split=validation --config.num_epochs=2 \
      --config.warmup_epochs=0.2 --config.batch_size=128 --config.seed=$seed \
      --config.augment=False > $out.log 2>&1
    cp $out/result.json experiments/dq_direct_smoke/$name-s${seed}_result.json
  done
done
