"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
  """A fresh TFDS data dir with Fashion-MNIST built offline (about 20 s)
  from the Debian package's IDX files; skips where they are absent."""
  from aqt_ext import data  # pylint: disable=g-import-not-at-top
  if not data.LOCAL_FASHION_MNIST_DIR.is_dir():
    pytest.skip("apt-get install dataset-fashion-mnist to run this test")
  data_dir = tmp_path_factory.mktemp("tfds")
  data.ensure_prepared("fashion_mnist", data_dir)
  return data_dir
