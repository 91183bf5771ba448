#!/usr/bin/env bash
# The main job: set up (first use), then train configs/default.py on real
# Fashion-MNIST (built offline from the Debian package), printing progress and
# the final test accuracy. Extra arguments go to aqt_ext.main, e.g.
#   bash scripts/run.sh --config=configs/fashion_mnist_w4a4.py --workdir=...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=("$@")
[[ " ${args[*]-} " == *" --config="* ]] || args+=("--config=configs/default.py")
[[ " ${args[*]-} " == *" --workdir="* ]] || args+=("--workdir=workdirs/default")
exec .venv/bin/python -m aqt_ext.main "${args[@]}"
