#!/usr/bin/env bash
# DQ ablation v2 (issue 14). Stage "lr": each method's learning rate,
# chosen on the validation split from {0.01, 0.03, 0.1} at W2A2, seed 0,
# extended by one rate (0.003 or 0.3) for the methods whose best rate was
# at an edge (choose_lr.py prints the choice). Stage "main": the methods that chose
# rate LR x {W2A2, W3A3} x 3 seeds, one sweep per rate (and "float": the
# float fine-tuning points). Each stage is a sweep: rerun to resume.
#   bash experiments/dq_ablation_v2/float.sh
#   bash experiments/dq_ablation_v2/run.sh lr
#   bash experiments/dq_ablation_v2/run.sh lr_edge   # 0.003 / 0.3 where the
#     choice was 0.01 / 0.1 (the grid's edge)
#   .venv/bin/python experiments/dq_ablation_v2/choose_lr.py
#   bash experiments/dq_ablation_v2/run.sh main LR "('m1','m2')"   # per rate
#   bash experiments/dq_ablation_v2/run.sh float LR
set -euo pipefail
cd "$(dirname "$0")/../.."
sweep() {
  .venv/bin/python -m aqt_ext.sweep --config=configs/sweep_dq_ablation_v2.py \
    --config.base.init_from=/tmp/dqv2_float --parallel=2 "$@"
}
case "$1" in
  lr)
    for lr in 0.01 0.03 0.1; do
      sweep --workdir=/tmp/dqv2_lr$lr --config.base.learning_rate=$lr \
        --config.quants="('float','w2a2')" \
        --config.seeds="(0,)"
    done ;;
  lr_edge)  # rates beyond the grid's edge for the methods that chose an edge
    sweep --workdir=/tmp/dqv2_lr0.003 --config.base.learning_rate=0.003 \
      --config.quants="('float','w2a2')" --config.seeds="(0,)" \
      --config.methods="('dq','dqw','dqwste','dqa','dqste')"
    sweep --workdir=/tmp/dqv2_lr0.3 --config.base.learning_rate=0.3 \
      --config.quants="('w2a2',)" --config.seeds="(0,)" \
      --config.methods="('uniform','pact')" ;;
  main)
    sweep --workdir=/tmp/dqv2_main_lr$2 --config.base.learning_rate=$2 \
      --config.quants="('w2a2','w3a3')" --config.methods="$3" ;;
  float)
    sweep --workdir=/tmp/dqv2_float_lr$2 --config.base.learning_rate=$2 \
      --config.quants="('float',)" ;;
  *) echo "usage: run.sh lr | main LR METHODS | float LR" >&2; exit 2 ;;
esac
