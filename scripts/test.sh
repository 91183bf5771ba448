#!/usr/bin/env bash
# The whole test suite (sets the machine up first). `.ci/run` calls this.
# Two pytest-xdist workers (the CI machine has 2 cores), each taking whole test
# modules (--dist loadscope), so that a module's fixtures (trained runs,
# sweeps) are built once, not once per worker; PYTEST_WORKERS=0 runs in one
# process. CI=true: a missing Fashion-MNIST dataset fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadscope "$@"
