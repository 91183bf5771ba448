#!/usr/bin/env bash
# Issue 16's training check: float vs int8 fwd+bwd vs fp8 e4m3/e5m2, ResNet-20
# width 1, 2 epochs, 3 seeds, through the sweep driver (rerun to resume).
set -e
cd "$(dirname "$0")/../.."
uptime
.venv/bin/python -m aqt_ext.sweep --config=configs/sweep_low_precision.py \
  --workdir=workdirs/sweep_low_precision --parallel=2
uptime
