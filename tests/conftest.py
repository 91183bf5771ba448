"""Shared fixtures, and one persistent XLA compilation cache for the session.

Many tests compile the same tiny training step, in this process and in the
subprocesses they start (``aqt_ext.main``, sweep workers); the cache, set
through the environment before JAX is imported, lets all but the first
load it instead of compiling again.
"""

import atexit
import os
import shutil
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="aqt_ext_test_xla_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def on_ci() -> bool:
  """Whether this run is CI's: the environment variable CI is 'true' (as CI
  services and `.ci/run` set it) or '1'."""
  return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_local_fashion_mnist() -> None:
  """Checks that the Debian package's Fashion-MNIST files are present; where
  they are absent, fails the calling test under CI (`on_ci`: a CI run must
  not pass without the real data) and skips it elsewhere, naming the
  package."""
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  if data.LOCAL_FASHION_MNIST_DIR.is_dir():
    return
  hint = (f"{data.LOCAL_FASHION_MNIST_DIR} is missing: run `apt-get install "
          "dataset-fashion-mnist` (or `bash scripts/setup.sh`) to run the "
          "tests on real Fashion-MNIST")
  if on_ci():
    pytest.fail(f"CI={os.environ['CI']}: {hint}", pytrace=False)
  pytest.skip(hint)


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
  """A fresh TFDS data dir with Fashion-MNIST built offline (about 20 s)
  from the Debian package's IDX files (`require_local_fashion_mnist`: where
  they are absent, fails under CI and skips elsewhere). Built once per test
  run: pytest-xdist workers share it and call `ensure_prepared` at the same
  time, so this also checks its lock (the first builds, the others wait and
  find it prepared); read-only from then on."""
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  require_local_fashion_mnist()
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's directory, above each worker's own
  data_dir = root / "tfds_shared"
  data.ensure_prepared("fashion_mnist", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
  """A real single-node SLURM cluster (`slurm_cluster.LocalSlurm`: Debian's
  packages, installed when missing; 2 CPUs), stopped at the end. Where it
  cannot run (not root, no apt) it fails under CI and skips elsewhere."""
  import slurm_cluster as lib  # pylint: disable=g-import-not-at-top
  why = lib.unavailable()
  if why:
    if on_ci():
      pytest.fail(f"CI={os.environ['CI']}: {why}", pytrace=False)
    pytest.skip(why)
  # A short path: slurmd's and munged's sockets live under it.
  root = tempfile.mkdtemp(prefix="aqt_slurm_")
  cluster = lib.LocalSlurm(root, cpus=2)
  try:
    yield cluster.start()
  finally:
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
