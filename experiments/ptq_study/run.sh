#!/usr/bin/env bash
# PTQ study on three float checkpoints (issue 14): the sweep (rerun to
# resume), then the tables and plot. README.md: protocol and reading.
set -euo pipefail
cd "$(dirname "$0")/../.."
w=${1:-/tmp/ptq_study3}
.venv/bin/python -m aqt_ext.sweep --config=configs/sweep_ptq_study.py \
  --workdir=$w --parallel=2
.venv/bin/python experiments/ptq_study/table.py $w > experiments/ptq_study/tables.md
