#!/usr/bin/env bash
# The main stage at the rates choose_lr.py printed (lr_choice.md), then the
# test-set reading of every final model (2 processes), then the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
r=experiments/dq_ablation_v2/run.sh
bash $r main 0.003 "('dq','dqwste',)"
bash $r main 0.01 "('dqw','dqa','dqste',)"
bash $r float 0.01
bash $r main 0.03 "('lsq',)"
bash $r main 0.1 "('uniform','pact',)"
dirs=(/tmp/dqv2_main_lr0.003 /tmp/dqv2_main_lr0.01 /tmp/dqv2_float_lr0.01
      /tmp/dqv2_main_lr0.03 /tmp/dqv2_main_lr0.1)
for k in 0 1; do
  .venv/bin/python experiments/dq_ablation_v2/test_eval.py /tmp/dqv2_test \
    "${dirs[@]}" --shard $k/2 > /tmp/dqv2_test_$k.log 2>&1 &
done
wait
.venv/bin/python experiments/dq_ablation_v2/table.py /tmp/dqv2_test "${dirs[@]}" \
  > experiments/dq_ablation_v2/tables.md
cp /tmp/dqv2_test/curves.png /tmp/dqv2_test/test_results.*.jsonl experiments/dq_ablation_v2/
