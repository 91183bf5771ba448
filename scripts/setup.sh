#!/usr/bin/env bash
# Sets up a fresh machine: the Fashion-MNIST files (Debian package
# dataset-fashion-mnist, where apt is available), a virtual environment in
# .venv, and the package with its training and test extras at the tested
# versions. Idempotent and quick when everything is already there.
#
# Python: $PYTHON if set, else the newest of python3.13 and python3.12 that
# runs here (on PATH, or installed by pyenv), with the versions of
# scripts/constraints.txt; else python3.11 with scripts/constraints-py311.txt.
# A .venv made by another Python version is made again. Every check runs
# before any work; a failure says what to install.
#
# The dataset: installed with apt-get (as root, or through sudo where it
# exists). Where it cannot be installed the setup says why and goes on (the
# tests that need it skip); under CI=true it exits with status 1, as a CI run
# must not pass without the real data.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[setup] $*"; }
err() { echo "[setup] error: $*" >&2; }
on_ci() { case "${CI:-}" in true | TRUE | True | 1) return 0 ;; esac; return 1; }

# "3.12" for a Python that runs, nothing otherwise (e.g. a pyenv shim of a
# version that is not selected).
py_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
    || true
}

# --- Python -----------------------------------------------------------------
PY="" PYV=""
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON PYV=$(py_version "$PY")
  if [ -z "$PYV" ]; then
    err "PYTHON=$PYTHON does not run; set PYTHON to a Python >= 3.11"
    exit 1
  fi
else
  pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
  for want in 3.13 3.12 3.11; do
    for cand in "python$want" "$pyenv_root"/versions/"$want".*/bin/python3; do
      [ "$(py_version "$cand")" = "$want" ] && { PY=$cand PYV=$want; break 2; }
    done
  done
  if [ -z "$PY" ]; then
    err "no Python 3.11, 3.12 or 3.13 runs here (python3 is" \
        "'$(py_version python3)'); install one, e.g." \
        "\`apt-get install python3.12 python3.12-venv\`, or set PYTHON"
    exit 1
  fi
fi
PY=$(command -v "$PY")
case "$PYV" in
  [0-2].* | 3.[0-9] | 3.10)
    err "$PY is Python $PYV; aqt_ext needs Python >= 3.11 (3.12+ for the" \
        "current jax): install e.g. \`apt-get install python3.12" \
        "python3.12-venv\`, or set PYTHON to a newer Python"
    exit 1 ;;
  3.11) CONSTRAINTS=scripts/constraints-py311.txt ;;
  *) CONSTRAINTS=scripts/constraints.txt ;;
esac

venv_version=$(py_version .venv/bin/python)  # "" where none runs
if [ "$venv_version" != "$PYV" ] \
    && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  err "$PY (Python $PYV) cannot create a virtual environment (no" \
      "ensurepip/venv): install it, e.g. \`apt-get install" \
      "python$PYV-venv\`, or set PYTHON to another Python"
  exit 1
fi

# --- Fashion-MNIST (Debian package) -----------------------------------------
# SETUP_DATASET_DIR: where the package puts the files (tests point it
# elsewhere).
dataset_dir=${SETUP_DATASET_DIR:-/usr/share/datasets/fashion-mnist}
dataset_problem() {
  err "$*"
  echo "[setup] without it the tests that need real Fashion-MNIST skip and" \
       "training on Fashion-MNIST says how to get it" >&2
  if on_ci; then
    err "CI=$CI: a CI run needs the dataset; stopping"
    exit 1
  fi
}
if [ ! -d "$dataset_dir" ]; then
  if ! command -v apt-get >/dev/null; then
    dataset_problem "$dataset_dir is missing and there is no apt-get here to" \
        "install the Debian package dataset-fashion-mnist"
  else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null && SUDO="sudo"
    fi
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
      dataset_problem "$dataset_dir is missing and the Debian package" \
          "dataset-fashion-mnist could not be installed: not root and no" \
          "sudo; as root run \`apt-get install dataset-fashion-mnist\`"
    else
      say "installing Debian package dataset-fashion-mnist"
      if ! $SUDO apt-get update -qq; then
        err "\`${SUDO:+$SUDO }apt-get update\` failed (above); trying the" \
            "install with the package lists there are"
      fi
      if ! $SUDO apt-get install -y -qq dataset-fashion-mnist; then
        dataset_problem "\`${SUDO:+$SUDO }apt-get install -y" \
            "dataset-fashion-mnist\` failed (above): $dataset_dir is missing"
      fi
    fi
  fi
fi

# --- .venv ------------------------------------------------------------------
if [ -e .venv ] && [ "$venv_version" != "$PYV" ]; then
  say "recreating .venv: its Python is ${venv_version:-missing or broken}," \
      "the setup uses $PYV ($PY)"
  rm -rf .venv
fi
if [ ! -e .venv ]; then
  say "creating .venv with $PY (Python $PYV)"
  "$PY" -m venv .venv
fi
stamp=.venv/.aqt_ext_installed
want=$( (echo "$PYV"; cat setup.py "$CONSTRAINTS") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing aqt_ext[train,test,serve] into .venv (pip -c $CONSTRAINTS)"
  if ! .venv/bin/python -m pip install -q --upgrade pip \
      || ! .venv/bin/python -m pip install -q -c "$CONSTRAINTS" \
        -e ".[train,test,serve]"; then
    err "pip could not install aqt_ext[train,test,serve] with $CONSTRAINTS into" \
        ".venv (Python $PYV; the error is above)"
    exit 1
  fi
  echo "$want" > "$stamp"
fi
