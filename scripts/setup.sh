#!/usr/bin/env bash
# Sets up a fresh machine: the Fashion-MNIST files (Debian package, where apt
# is available), a virtual environment in .venv, and the package with its
# training and test extras at the tested versions. Idempotent and quick when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] installing Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq dataset-fashion-mnist \
    || echo "[setup] warning: could not install dataset-fashion-mnist; training on Fashion-MNIST will say how to get it"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.aqt_ext_installed
want=$(cat setup.py scripts/constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing aqt_ext[train,test] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[train,test]"
  echo "$want" > "$stamp"
fi
