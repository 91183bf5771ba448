#!/usr/bin/env bash
# The whole test suite (sets the machine up first). `.ci/run` calls this.
# Two pytest-xdist workers (the CI machine has 2 cores); PYTEST_WORKERS=0 runs
# in one process. CI=true: a missing Fashion-MNIST dataset fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
