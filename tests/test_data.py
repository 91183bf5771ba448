"""Tests of aqt_ext.data: mocked TFDS datasets and the local Fashion-MNIST."""

import contextlib
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from aqt_ext import data

tfds = pytest.importorskip("tensorflow_datasets")


# Label offset of each mocked split: the same example index has a different
# label in every split (mod the number of classes, at least 10).
SPLIT_LABEL_OFFSET = {"train": 0, "test": 1, "validation": 2}


@contextlib.contextmanager
def mock_tfds(num_examples):
  """TFDS serving `num_examples` random examples for every split, with
  distinguishable splits and slices honoured.

  `tfds.testing.mock_data` serves the same examples for every split and
  ignores slices (``test[:n]``); here a split's labels are shifted by
  `SPLIT_LABEL_OFFSET` (so reading the wrong split changes every label)
  and ``split[:n]`` yields the first n examples. `mock_data` does not mock
  `is_prepared`, which `ensure_prepared` consults before loading.
  """
  with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    reader = tfds.core.dataset_builder.FileReaderBuilder
    mocked = reader._as_dataset  # mock_data's random examples

    def as_dataset(self, split, **kwargs):
      m = re.fullmatch(r"(\w+)(?:\[:(\d+)\])?", str(split))
      if not m or m.group(1) not in SPLIT_LABEL_OFFSET:
        raise ValueError(f"mock_tfds: split {split!r} is not supported")
      offset = SPLIT_LABEL_OFFSET[m.group(1)]
      classes = self.info.features["label"].num_classes
      ds = mocked(self, m.group(1), **kwargs).map(
          lambda ex: {**ex, "label": (ex["label"] + offset) % classes})
      return ds.take(int(m.group(2))) if m.group(2) else ds

    with mock.patch.object(reader, "_as_dataset", as_dataset):
      yield


def raw_split(name, split):
  """The (mocked) split as loaded by plain TFDS: uint8 images, labels.

  Not `batch_size=-1`: mocked splits have no size, so TFDS would batch by
  sys.maxsize and abort.
  """
  examples = list(tfds.as_numpy(tfds.load(name, split=split)))
  return (np.stack([ex["image"] for ex in examples]),
          np.array([ex["label"] for ex in examples]))


def raw_labels(name, split):
  """The labels of the (mocked) split, images left encoded."""
  ds = tfds.load(name, split=split,
                 decoders={"image": tfds.decode.SkipDecoding()})
  return np.array([ex["label"] for ex in tfds.as_numpy(ds)])


def to_uint8(name, images):
  """Inverts the per-channel normalisation."""
  spec = data._SPECS[name]
  pixels = (images * np.asarray(spec.std) + np.asarray(spec.mean)) * 255
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  return np.round(pixels).astype(np.uint8)


def test_core_import_does_not_load_tensorflow():
  code = ("import sys, aqt_ext.data; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_get_info_catalogue():
  info = data.get_info("cifar100")
  assert info == data.DatasetInfo("cifar100", 100, (32, 32, 3), 50_000,
                                  10_000)
  assert data.get_info("imagenet2012").image_shape == (224, 224, 3)


@pytest.mark.parametrize("call, message", [
    (lambda: data.get_info("svhn"),
     r"dataset='svhn' is not allowed; allowed values: 'fashion_mnist', "
     r"'mnist', 'cifar10', 'cifar100', 'imagenet2012'"),
    (lambda: data.make_train_stream("mnist", 0, seed=0), r"batch_size=0"),
    (lambda: data.make_train_stream("mnist", 8, seed=-1), r"seed=-1"),
    (lambda: data.make_train_stream("mnist", 8, 0, num_examples=0),
     r"num_examples=0 .* positive integers or None"),
    (lambda: list(data.eval_batches("mnist", -2)), r"batch_size=-2"),
])
def test_invalid_arguments_name_the_field(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_missing_data_explains_how_to_get_it(tmp_path, monkeypatch):
  with pytest.raises(data.DataNotFoundError,
                     match=f"tfds build cifar10 --data_dir={tmp_path}"):
    data.ensure_prepared("cifar10", tmp_path)
  monkeypatch.setattr(data, "LOCAL_FASHION_MNIST_DIR", tmp_path / "absent")
  with pytest.raises(data.DataNotFoundError,
                     match="apt-get install dataset-fashion-mnist"):
    data.make_train_stream("fashion_mnist", 8, seed=0, data_dir=tmp_path)


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(data.DataNotFoundError, match=str(tmp_path)):
    data.ensure_prepared("mnist")


def test_train_batch_shapes_dtypes_and_normalisation(tmp_path):
  with mock_tfds(num_examples=40):
    stream = data.make_train_stream("fashion_mnist", 16, seed=0,
                                    data_dir=tmp_path)
  batch = stream.batch(0)
  assert stream.steps_per_epoch == 2
  assert batch["image"].dtype == np.float32
  assert batch["image"].shape == (16, 28, 28, 1)
  assert batch["label"].dtype == np.int32
  assert batch["label"].shape == (16,)
  assert np.all((0 <= batch["label"]) & (batch["label"] < 10))
  # Normalised with the Fashion-MNIST constants: maps back onto uint8 pixels.
  assert to_uint8("fashion_mnist", batch["image"]).max() > 200


def test_every_example_once_per_epoch(tmp_path):
  with mock_tfds(num_examples=50):
    stream = data.make_train_stream("cifar10", 10, seed=3, data_dir=tmp_path,
                                    augment=False)
    images, labels = raw_split("cifar10", "train")
  expected = sorted((im.tobytes(), int(lb)) for im, lb in zip(images, labels))
  epoch_labels = []
  for steps in (range(0, 5), range(5, 10)):  # 50 examples / 10 = 5 steps.
    batches = [stream.batch(step) for step in steps]
    seen = [(im.tobytes(), int(lb)) for b in batches
            for im, lb in zip(to_uint8("cifar10", b["image"]), b["label"])]
    assert sorted(seen) == expected
    epoch_labels.append(np.concatenate([b["label"] for b in batches]))
  assert not np.array_equal(*epoch_labels)  # Reshuffled every epoch.


def test_drops_the_remainder_of_an_epoch(tmp_path):
  with mock_tfds(num_examples=30):
    stream = data.make_train_stream("mnist", 8, seed=0, data_dir=tmp_path)
  assert stream.steps_per_epoch == 3


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
  with mock_tfds(num_examples=36):
    make = lambda seed: data.make_train_stream("cifar10", 8, seed=seed,
                                               data_dir=tmp_path)
    stream, same, other = make(1), make(1), make(2)
  for step in (0, 3, 4, 11):
    for key in ("image", "label"):
      np.testing.assert_array_equal(stream.batch(step)[key],
                                    same.batch(step)[key])
  assert not np.array_equal(stream.batch(0)["image"], other.batch(0)["image"])
  assert not np.array_equal(stream.batch(0)["image"], stream.batch(1)["image"])


def test_iterate_resumes_at_any_step(tmp_path):
  with mock_tfds(num_examples=36):
    stream = data.make_train_stream("fashion_mnist", 8, seed=5,
                                    data_dir=tmp_path)
  start = stream.steps_per_epoch - 1  # Crosses an epoch boundary.
  resumed = stream.iterate(start_step=start)
  for step in range(start, start + 4):
    batch = next(resumed)
    expected = stream.batch(step)
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["label"], expected["label"])
  resumed.close()
  first = next(iter(stream))
  np.testing.assert_array_equal(first["image"], stream.batch(0)["image"])


def test_prefetch_reraises_producer_errors():
  def failing():
    yield {"x": np.zeros(1)}
    raise RuntimeError("broken pipeline")

  batches = data._prefetch(failing, size=2)
  next(batches)
  with pytest.raises(RuntimeError, match="broken pipeline"):
    next(batches)


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_takes_windows_of_the_padded_image(flip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 6, 5, 2), dtype=np.uint8)
  out = data._random_crop_flip(images, 2, flip, np.random.default_rng(1))
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
  mirrored = 0
  for image, crop in zip(padded, out):
    windows = [image[dy:dy + 6, dx:dx + 5] for dy in range(5)
               for dx in range(5)]
    plain = any(np.array_equal(crop, w) for w in windows)
    flipped = any(np.array_equal(crop, w[:, ::-1]) for w in windows)
    assert plain or (flip and flipped)
    mirrored += flipped and not plain
  assert (mirrored > 10) == flip


def test_mock_splits_are_distinguishable():
  with mock_tfds(num_examples=12):
    train_labels = raw_labels("cifar100", "train")
    test_images, test_labels = raw_split("cifar100", "test")
    np.testing.assert_array_equal(raw_labels("cifar100", "test[:5]"),
                                  test_labels[:5])
  assert len(train_labels) == len(test_labels) == len(test_images) == 12
  assert np.all(train_labels != test_labels)


def test_eval_covers_every_example_once_with_mask(tmp_path):
  with mock_tfds(num_examples=23):
    batches = list(data.eval_batches("cifar100", 8, data_dir=tmp_path))
    images, labels = raw_split("cifar100", "test")
    train_labels = raw_labels("cifar100", "train")
    first = list(data.eval_batches("cifar100", 8, data_dir=tmp_path,
                                   num_examples=10))
  assert [b["image"].shape for b in batches] == [(8, 32, 32, 3)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 23 + [0])
  got_images = np.concatenate([to_uint8("cifar100", b["image"])
                               for b in batches])
  got_labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(got_images[:23], images)
  np.testing.assert_array_equal(got_labels[:23], labels)
  assert np.all(got_labels[:23] != train_labels)  # the test split, not train
  assert got_labels.dtype == np.int32 and got_labels[23] == 0
  # num_examples: the first examples of the test split.
  np.testing.assert_array_equal(
      np.concatenate([b["mask"] for b in first]), [1] * 10 + [0] * 6)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in first])[:10], labels[:10])


def test_imagenet_streaming_is_resumable_and_padded(tmp_path):
  with mock_tfds(num_examples=10):
    stream = data.make_train_stream("imagenet2012", 4, seed=0,
                                    data_dir=tmp_path)
    assert stream.steps_per_epoch == 2
    from_start = stream.iterate(0)
    batches = [next(from_start) for _ in range(3)]
    from_start.close()
    resumed = stream.batch(2)  # First batch of the second epoch.
    evaluated = list(data.eval_batches("imagenet2012", 4, data_dir=tmp_path))
    val_labels = raw_labels("imagenet2012", "validation")
    train_labels = raw_labels("imagenet2012", "train")
  assert batches[0]["image"].shape == (4, 224, 224, 3)
  assert batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  np.testing.assert_array_equal(resumed["label"], batches[2]["label"])
  assert not np.array_equal(batches[0]["image"], batches[2]["image"])
  np.testing.assert_array_equal(
      np.concatenate([b["mask"] for b in evaluated]), [1] * 10 + [0] * 2)
  # Evaluation reads the validation split, in order.
  eval_labels = np.concatenate([b["label"] for b in evaluated])[:10]
  np.testing.assert_array_equal(eval_labels, val_labels)
  assert np.all(eval_labels != train_labels)


# --------------------------------------------------------------------------
# Real Fashion-MNIST, built offline from the Debian package.
# --------------------------------------------------------------------------


def test_local_fashion_mnist(fashion_mnist_dir):
  info = data.get_info("fashion_mnist", fashion_mnist_dir)
  assert (info.num_train, info.num_eval, info.num_classes) == (60_000, 10_000,
                                                               10)
  stream = data.make_train_stream("fashion_mnist", 10_000, seed=0,
                                  data_dir=fashion_mnist_dir, augment=False)
  assert stream.steps_per_epoch == 6
  train_labels = np.concatenate([stream.batch(s)["label"] for s in range(6)])
  np.testing.assert_array_equal(np.bincount(train_labels), [6000] * 10)
  evaluated = list(data.eval_batches("fashion_mnist", 4096,
                                     data_dir=fashion_mnist_dir))
  mask = np.concatenate([b["mask"] for b in evaluated])
  test_labels = np.concatenate([b["label"] for b in evaluated])[mask == 1]
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
  assert abs(stream.batch(0)["image"].mean()) < 0.05  # Normalised.


def test_validation_split_is_held_out_from_training(fashion_mnist_dir):
  """validation_examples=5000: training reads the first 55,000 training
  images, the validation split is the last 5,000 (the same images as the
  raw split's tail), and the two never overlap."""
  name, d = "fashion_mnist", fashion_mnist_dir
  assert data.train_split(name, d, None, 5000) == "train[:55000]"
  assert data.train_split(name, d, 1000, 5000) == "train[:1000]"
  assert data.train_split(name, d, None) == "train"
  assert data.validation_split(name, d, 5000, 100) == "train[55000:55100]"
  stream = data.make_train_stream(name, 5000, 0, d, augment=False,
                                  validation_examples=5000)
  assert stream.steps_per_epoch == 11
  val = list(data.eval_batches(name, 2048, d, split="validation",
                               validation_examples=5000))
  mask = np.concatenate([b["mask"] for b in val])
  assert mask.sum() == 5000 and len(mask) == 3 * 2048
  images = to_uint8(name, np.concatenate([b["image"] for b in val]))[:5000]
  labels = np.concatenate([b["label"] for b in val])[:5000]
  raw_images, raw_labels_ = data._load_arrays(name, "train", str(d))
  np.testing.assert_array_equal(images, raw_images[55000:])
  np.testing.assert_array_equal(labels, raw_labels_[55000:])
  trained = np.concatenate([to_uint8(name, stream.batch(s)["image"])
                            for s in range(11)])
  # Training sees exactly the first 55,000 images (one epoch, each once).
  assert sorted(im.tobytes() for im in trained) == sorted(
      im.tobytes() for im in raw_images[:55000])
  with pytest.raises(ValueError, match=r"num_train_examples=56000 overlaps "
                     r"the validation split: allowed values are 1\.\.55000"):
    data.train_split(name, d, 56000, 5000)
  with pytest.raises(ValueError, match=r"split='val': allowed values"):
    next(data.eval_batches(name, 8, d, split="val"))


def test_cached_arrays_equal_what_tfds_decodes(fashion_mnist_dir):
  """The loaders' splits are slices of the whole split's arrays, decoded
  once and kept as .npy files (read without TensorFlow by later
  processes); they equal TFDS's own decode of each split string."""
  name, d = "fashion_mnist", str(fashion_mnist_dir)
  data._load_arrays(name, "train[:10]", d)  # the whole split is cached
  version = data._prepared_version_dir(name, d)
  cache = sorted(p.name for p in (version / data.ARRAY_CACHE_DIR).iterdir())
  assert {"train-images.npy", "train-labels.npy"} <= set(cache)
  for split in ("train[:512]", "train[55000:60000]", "train[100:]",
                "test[:500]", "test"):
    images, labels = data._load_arrays(name, split, d)
    want_images, want_labels = data._decode(name, split, d)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert not images.flags.writeable
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  # A new process reads them without importing TensorFlow.
  code = ("import sys; from aqt_ext import data; "
          f"x, y = data._load_arrays({name!r}, 'train[:512]', {d!r}); "
          "print(x.shape, 'tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], check=True, text=True,
                       capture_output=True).stdout
  assert out.split("\n")[0] == "(512, 28, 28, 1) False"
