"""The setup's checks: scripts/setup.sh refuses a Python it cannot use and
reports a dataset it could not install (failing under CI=true), and a
missing dataset fails a CI test run instead of skipping its tests.

scripts/setup.sh runs on a copy of the scripts in a temporary directory with
stub commands (python, apt-get, id) first on PATH, then the system's commands
without sudo and Python; no case makes a real virtual environment.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1200  # a hang guard, not a speed limit: each run takes ~1 s


def _stub(path, body):
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return path


@pytest.fixture()
def sandbox(tmp_path):
  """(repo copy, stub bin dir, PATH: the stubs, then the system's commands
  without sudo and Python, apt-get call log)."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  for name in ("scripts/setup.sh", "scripts/constraints.txt",
               "scripts/constraints-py311.txt", "setup.py"):
    shutil.copy(ROOT / name, repo / name)
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  apt_log = tmp_path / "apt_calls"
  _stub(stubs / "apt-get", f'echo "$*" >> {apt_log}; exit 100\n')
  system = tmp_path / "system"
  system.mkdir()
  for d in ("/usr/bin", "/bin"):
    for name in os.listdir(d):
      if (name != "sudo" and not name.startswith("python")
          and not (system / name).exists()):
        (system / name).symlink_to(os.path.join(d, name))
  return repo, stubs, f"{stubs}:{system}", apt_log


def run_setup(repo, path, **env):
  environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTHON")}
  environ.update(PATH=path, PYENV_ROOT=str(repo / "no_pyenv"), **env)
  return subprocess.run(["bash", str(repo / "scripts" / "setup.sh")],
                        env=environ, capture_output=True, text=True,
                        timeout=HANG_GUARD_S)


def test_python_older_than_3_11_is_refused_before_any_work(sandbox):
  repo, stubs, path, apt_log = sandbox
  old = _stub(stubs / "python_old",
              'case "$*" in *version_info*) echo 3.10 ;; *) exit 1 ;; esac\n')
  run = run_setup(repo, path, PYTHON=str(old),
                  SETUP_DATASET_DIR=str(repo / "missing"))
  assert run.returncode == 1
  assert "is Python 3.10; aqt_ext needs Python >= 3.11" in run.stderr
  assert "apt-get install python3.12" in run.stderr
  assert not apt_log.exists() and not (repo / ".venv").exists()


def test_python_without_venv_is_refused_naming_the_package(sandbox):
  repo, stubs, path, apt_log = sandbox
  # Debian's python3.12 without python3.12-venv: no ensurepip.
  no_venv = _stub(stubs / "python_no_venv",
                  'case "$*" in *version_info*) echo 3.12 ;; *) exit 1 ;; '
                  'esac\n')
  run = run_setup(repo, path, PYTHON=str(no_venv),
                  SETUP_DATASET_DIR=str(repo / "missing"))
  assert run.returncode == 1
  assert "cannot create a virtual environment" in run.stderr
  assert "apt-get install python3.12-venv" in run.stderr
  assert not apt_log.exists() and not (repo / ".venv").exists()


def test_failed_dataset_install_is_reported_and_fails_under_ci(sandbox):
  repo, stubs, path, apt_log = sandbox
  _stub(stubs / "id", "echo 0\n")  # root: apt-get without sudo
  run = run_setup(repo, path, PYTHON=sys.executable, CI="true",
                  SETUP_DATASET_DIR=str(repo / "missing"))
  assert run.returncode == 1, run.stderr
  assert apt_log.read_text().splitlines() == [
      "update -qq", "install -y -qq dataset-fashion-mnist"]
  assert "`apt-get update` failed" in run.stderr
  assert "`apt-get install -y dataset-fashion-mnist` failed" in run.stderr
  assert "CI=true: a CI run needs the dataset; stopping" in run.stderr
  assert not (repo / ".venv").exists()


def test_no_root_and_no_sudo_is_reported_and_fails_under_ci(sandbox):
  repo, stubs, path, apt_log = sandbox
  _stub(stubs / "id", "echo 1000\n")
  run = run_setup(repo, path, PYTHON=sys.executable, CI="true",
                  SETUP_DATASET_DIR=str(repo / "missing"))
  assert run.returncode == 1, run.stderr
  assert "not root and no sudo" in run.stderr
  assert "as root run `apt-get install dataset-fashion-mnist`" in run.stderr
  assert not apt_log.exists() and not (repo / ".venv").exists()


def _stub_python(path, version, log):
  """A Python `version` that logs its calls; ``-m venv .venv`` copies it to
  .venv/bin/python, pip does nothing."""
  return _stub(path, f"""echo "$0 $*" >> {log}
case "$*" in
  *version_info*) echo {version} ;;
  "-c import ensurepip, venv") ;;
  "-m venv .venv") mkdir -p .venv/bin && cp "$0" .venv/bin/python ;;
  "-m pip "*) ;;
  *) exit 1 ;;
esac
""")


def test_newest_python_that_runs_is_used_and_a_venv_of_another_is_remade(
    sandbox):
  repo, stubs, path, _ = sandbox
  calls = repo / "python_calls"
  _stub(stubs / "python3.13", "exit 1\n")  # e.g. a pyenv shim not selected
  _stub_python(stubs / "python3.12", "3.12", calls)
  _stub_python(stubs / "python3.11", "3.11", calls)
  (repo / "data").mkdir()
  run = run_setup(repo, path, SETUP_DATASET_DIR=str(repo / "data"))
  assert run.returncode == 0, run.stderr
  assert f"creating .venv with {stubs}/python3.12 (Python 3.12)" in run.stdout
  assert ("-m pip install -q -c scripts/constraints.txt -e .[train,test,serve]"
          in calls.read_text())
  (repo / ".venv" / "marker").touch()
  rerun = run_setup(repo, path, SETUP_DATASET_DIR=str(repo / "data"))
  assert rerun.returncode == 0 and rerun.stdout == "", rerun.stdout
  (stubs / "python3.12").unlink()  # only 3.11 left: its pins
  calls.unlink()
  rerun = run_setup(repo, path, SETUP_DATASET_DIR=str(repo / "data"))
  assert rerun.returncode == 0, rerun.stderr
  assert ("recreating .venv: its Python is 3.12, the setup uses 3.11"
          in rerun.stdout)
  assert not (repo / ".venv" / "marker").exists()
  assert ("-m pip install -q -c scripts/constraints-py311.txt -e "
          ".[train,test,serve]" in calls.read_text())
  (stubs / "python3.11").unlink()
  none = run_setup(repo, path, SETUP_DATASET_DIR=str(repo / "data"))
  assert none.returncode == 1
  assert "no Python 3.11, 3.12 or 3.13 runs here" in none.stderr


INNER_TEST = '''
import pathlib

from aqt_ext import data

data.LOCAL_FASHION_MNIST_DIR = pathlib.Path(__file__).parent / "no_such_dir"


def test_needs_data(fashion_mnist_dir):
  del fashion_mnist_dir
'''


@pytest.mark.parametrize("ci", [None, "true"])
def test_missing_dataset_fails_under_ci_and_skips_elsewhere(tmp_path, ci):
  (tmp_path / "conftest.py").write_text(
      (ROOT / "tests" / "conftest.py").read_text())
  (tmp_path / "test_inner.py").write_text(INNER_TEST)
  env = {k: v for k, v in os.environ.items()
         if k not in ("CI", "PYTEST_ADDOPTS")}
  env["PYTHONPATH"] = str(ROOT)
  if ci:
    env["CI"] = ci
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
       "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=HANG_GUARD_S)
  assert "apt-get install dataset-fashion-mnist" in run.stdout, run.stdout
  if ci:
    assert run.returncode == 1 and "1 error" in run.stdout, run.stdout
    assert "CI=true: " in run.stdout
  else:
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout
