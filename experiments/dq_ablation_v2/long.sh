#!/usr/bin/env bash
# Ranking stability: the same fine-tuning at twice the budget (1 epoch, 429
# steps, its own cosine schedule) for uniform STE, LSQ, DQ activations only
# and DQ both (direct and latent STE) at W2A2, 3 seeds, each at the rate it
# chose for the half-epoch budget (lr_choice.md); validation split.
set -euo pipefail
cd "$(dirname "$0")/../.."
long() {
  .venv/bin/python -m aqt_ext.sweep --config=configs/sweep_dq_ablation_v2.py \
    --config.base.init_from=/tmp/dqv2_float --parallel=2 \
    --config.base.num_epochs=1.0 --config.base.eval_every_steps=143 \
    --config.base.checkpoint_every_steps=143 --config.base.log_every_steps=143 \
    --config.quants="('w2a2',)" --workdir=/tmp/dqv2_long_lr$1 \
    --config.base.learning_rate=$1 --config.methods="$2"
}
long 0.003 "('dq',)"
long 0.01 "('dqa','dqste')"
long 0.03 "('lsq',)"
long 0.1 "('uniform',)"
dirs=(/tmp/dqv2_long_lr0.003 /tmp/dqv2_long_lr0.01 /tmp/dqv2_long_lr0.03
      /tmp/dqv2_long_lr0.1)
.venv/bin/python experiments/dq_ablation_v2/table.py /tmp/dqv2_long_tables \
  "${dirs[@]}" > experiments/dq_ablation_v2/tables_long.md
