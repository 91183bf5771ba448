"""Deterministic, resumable image-classification input pipelines.

Datasets are addressed by TFDS catalog name: ``fashion_mnist``, ``mnist``,
``cifar10``, ``cifar100`` and ``imagenet2012``.

* Small datasets are decoded once into memory as uint8 numpy arrays; each
  training batch is then gathered, augmented (random crop after zero padding,
  optional horizontal flip) and normalised with vectorised numpy. The batch for
  global step ``s`` is a pure function of ``(seed, s)``: epoch ``e`` visits the
  examples in a permutation drawn from ``(seed, e)`` and the augmentation draws
  from ``(seed, s)``, so training resumes at any step with identical data.
* ``imagenet2012`` does not fit in memory and is streamed with ``tf.data``:
  per-epoch file order and shuffle buffer are seeded from ``(seed, epoch)`` and
  every example's augmentation from ``(seed, epoch, position in epoch)``, so
  resuming at step ``s`` skips the encoded records of earlier batches without
  decoding them and yields the same batches as an uninterrupted run.

TensorFlow and TFDS are imported lazily, only when data is actually loaded.

Fashion-MNIST can be prepared offline from the Debian package
``dataset-fashion-mnist`` (see :func:`ensure_prepared`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import gzip
import io
import json
import logging
import os
import pathlib
import queue
import re
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from aqt_ext import fileio

Batch = dict[str, np.ndarray]

DATA_DIR_ENV = "AQT_EXT_DATA_DIR"
LOCAL_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

_PREFETCH_BATCHES = 4
_LOAD_CHUNK = 8192  # Examples per tf.data batch when loading into memory.
_IMAGENET_SHUFFLE_BUFFER = 10_000
_IMAGENET_EVAL_RESIZE = 256
# Tags that separate the random streams derived from one user seed.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1
_EPOCH_STREAM = 2
# IDX magic numbers (big endian) of unsigned-byte label / image files.
_IDX_LABELS_MAGIC = 2049
_IDX_IMAGES_MAGIC = 2051


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a classification dataset."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the model input.
  num_train: int
  num_eval: int


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Per-dataset pipeline constants."""

  info: DatasetInfo
  mean: tuple[float, ...]  # Per channel, on the [0, 1] pixel scale.
  std: tuple[float, ...]
  eval_split: str
  crop_padding: int  # Zero padding before the random crop (in-memory sets).
  flip: bool  # Random horizontal flip during training augmentation.
  streamed: bool  # Streamed with tf.data instead of loaded into memory.


_SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec(
        DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60_000, 10_000),
        mean=(0.2860,), std=(0.3530,), eval_split="test",
        crop_padding=2, flip=True, streamed=False),
    "mnist": _Spec(
        DatasetInfo("mnist", 10, (28, 28, 1), 60_000, 10_000),
        mean=(0.1307,), std=(0.3081,), eval_split="test",
        crop_padding=2, flip=False, streamed=False),
    "cifar10": _Spec(
        DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        eval_split="test", crop_padding=4, flip=True, streamed=False),
    "cifar100": _Spec(
        DatasetInfo("cifar100", 100, (32, 32, 3), 50_000, 10_000),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        eval_split="test", crop_padding=4, flip=True, streamed=False),
    "imagenet2012": _Spec(
        DatasetInfo("imagenet2012", 1000, (224, 224, 3), 1_281_167, 50_000),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        eval_split="validation", crop_padding=0, flip=True, streamed=True),
}


DATASETS = tuple(_SPECS)


class DataNotFoundError(FileNotFoundError):
  """The dataset is not prepared in the data directory."""


# --------------------------------------------------------------------------
# Catalogue and data directory.
# --------------------------------------------------------------------------


def _spec(name: str) -> _Spec:
  """Returns the constants of dataset `name` or raises a ValueError."""
  if name not in _SPECS:
    raise ValueError(
        f"dataset={name!r} is not allowed; allowed values: "
        f"{', '.join(repr(n) for n in _SPECS)}")
  return _SPECS[name]


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """`data_dir`, else $AQT_EXT_DATA_DIR, else ~/tensorflow_datasets."""
  chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return os.path.expanduser(os.fspath(chosen))


def _prepared_version_dir(name: str, data_dir: str) -> pathlib.Path | None:
  """The newest version folder TFDS finished preparing (its
  dataset_info.json is written last; unfinished builds are named
  ``incomplete.*``), or None."""
  info_files = sorted(
      pathlib.Path(data_dir, name).glob("[0-9]*.[0-9]*.[0-9]*/"
                                        "dataset_info.json"),
      key=lambda p: tuple(int(part) for part in p.parent.name.split(".")))
  return info_files[-1].parent if info_files else None


def _prepared_split_sizes(name: str, data_dir: str) -> dict[str, int]:
  """Split sizes recorded by TFDS for the newest prepared version, or {}."""
  version_dir = _prepared_version_dir(name, data_dir)
  if version_dir is None:
    return {}
  splits = json.loads((version_dir / "dataset_info.json").read_text())[
      "splits"]
  return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in splits}


def get_info(name: str, data_dir: str | os.PathLike[str] | None = None
             ) -> DatasetInfo:
  """Returns the static description of dataset `name`.

  Split sizes come from the TFDS metadata when the dataset is prepared in
  `data_dir` and from the standard catalogue sizes otherwise. Never imports
  TensorFlow.
  """
  spec = _spec(name)
  sizes = _prepared_split_sizes(name, _resolve_data_dir(data_dir))
  return dataclasses.replace(
      spec.info,
      num_train=sizes.get("train", spec.info.num_train),
      num_eval=sizes.get(spec.eval_split, spec.info.num_eval))


# --------------------------------------------------------------------------
# Preparation (TFDS), including the offline Fashion-MNIST build.
# --------------------------------------------------------------------------


@functools.cache
def _tfds() -> Any:
  """Imports TFDS, hiding GPUs from TensorFlow so that JAX keeps them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tfds


def _missing_data_message(name: str, data_dir: str) -> str:
  """Explains how to obtain dataset `name` under `data_dir`."""
  build = f"`tfds build {name} --data_dir={data_dir}`"
  if name == "fashion_mnist":
    return (
        f"fashion_mnist is not prepared in {data_dir} and the offline copy "
        f"{LOCAL_FASHION_MNIST_DIR} is missing. Either run "
        "`apt-get install dataset-fashion-mnist` (it is then built offline "
        f"automatically), or, with network access, run {build}.")
  if name == "imagenet2012":
    return (
        f"imagenet2012 is not prepared in {data_dir}. Download "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (registration "
        "at https://image-net.org/download-images) into "
        f"{data_dir}/downloads/manual, then run {build}.")
  return (f"{name} is not prepared in {data_dir}. With network access, run "
          f"{build}.")


def _check_idx_file(path: pathlib.Path) -> None:
  """Checks a gzipped Fashion-MNIST IDX file whole: it decompresses, its
  header has the magic number and the 60000/10000 example count, and its
  length is the header's (28 x 28 images, or labels)."""
  remedy = ("Reinstall the package: `apt-get install --reinstall "
            "dataset-fashion-mnist`.")
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise ValueError(
        f"{path} is damaged: it does not decompress ({type(e).__name__}: "
        f"{e}). {remedy}") from None
  is_labels = "labels" in path.name
  header = 8 if is_labels else 16
  if len(data) < header:
    raise ValueError(f"{path} is damaged: {len(data)} bytes after "
                     f"decompression, shorter than the IDX header. {remedy}")
  magic, count = (int(v) for v in np.frombuffer(data[:8], dtype=">u4"))
  expected_magic = _IDX_LABELS_MAGIC if is_labels else _IDX_IMAGES_MAGIC
  expected_count = 60_000 if path.name.startswith("train") else 10_000
  if (magic, count) != (expected_magic, expected_count):
    raise ValueError(
        f"{path} is not a Fashion-MNIST IDX file: header (magic, count) is "
        f"{(magic, count)}, expected {(expected_magic, expected_count)}. "
        f"{remedy}")
  expected = header + count * (1 if is_labels else 28 * 28)
  if len(data) != expected:
    raise ValueError(
        f"{path} is damaged: {len(data)} bytes after decompression, expected "
        f"{expected} (header and {count} "
        f"{'labels' if is_labels else '28 x 28 images'}). {remedy}")


def _build_from_local_files(builder: Any, source_dir: pathlib.Path) -> None:
  """Prepares a TFDS builder from already-downloaded files, without network.

  TFDS names a cached download `get_dl_fname(url, sha256)` and trusts a file
  with that name and an `.INFO` sidecar without re-hashing it. We link the
  local files under those names in a temporary download dir and let the
  builder prepare itself as usual. The registered sha256 cannot match: the
  Debian files have a different gzip header (no original-file-name field,
  which is exactly their size difference, and another mtime). Each file is
  checked whole instead (`_check_idx_file`), so a damaged one is named with
  what to do before TFDS reads it.
  """
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.core.download import resource
  with tempfile.TemporaryDirectory() as download_dir:
    for url, url_info in builder.url_infos.items():
      source = source_dir / url_info.filename
      _check_idx_file(source)
      cached = pathlib.Path(download_dir,
                            resource.get_dl_fname(url, url_info.checksum))
      cached.symlink_to(source)
      resource.write_info_file(
          url=url, path=cached, dataset_name=builder.name,
          original_fname=url_info.filename, url_info=url_info)
    builder.download_and_prepare(download_dir=download_dir)


def ensure_prepared(name: str, data_dir: str | os.PathLike[str] | None = None
                    ) -> None:
  """Makes sure dataset `name` is prepared in TFDS format under `data_dir`.

  Fashion-MNIST is built offline from the IDX files of the Debian package
  `dataset-fashion-mnist` when it is not prepared yet (about 20 s). For the
  other datasets nothing is downloaded; a DataNotFoundError explains how to
  prepare them.
  """
  _spec(name)
  resolved = _resolve_data_dir(data_dir)
  # Without importing TensorFlow where a finished build is on disk.
  if (_prepared_version_dir(name, resolved) is not None
      or _tfds().builder(name, data_dir=resolved).is_prepared()):
    return
  if not (name == "fashion_mnist" and LOCAL_FASHION_MNIST_DIR.is_dir()):
    raise DataNotFoundError(_missing_data_message(name, resolved))
  # Several processes (sweep workers, test workers) may start on a machine
  # where the dataset is not prepared yet: one builds it, under an exclusive
  # flock, and the others wait and then find it prepared (TFDS's own final
  # rename fails when two builds race).
  os.makedirs(resolved, exist_ok=True)
  with open(os.path.join(resolved, f".{name}.prepare.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = _tfds().builder(name, data_dir=resolved)
    if not builder.is_prepared():
      _build_from_local_files(builder, LOCAL_FASHION_MNIST_DIR)


def _prepared_builder(name: str, data_dir: str) -> Any:
  """Returns the TFDS builder of `name`, preparing it offline if possible."""
  ensure_prepared(name, data_dir)
  return _tfds().builder(name, data_dir=data_dir)


def _split(split: str, num_examples: int | None) -> str:
  """TFDS split string restricted to the first `num_examples` examples."""
  return split if num_examples is None else f"{split}[:{num_examples}]"


# --------------------------------------------------------------------------
# Argument validation and shared numpy helpers.
# --------------------------------------------------------------------------


def _check_positive(field: str, value: int | None, optional: bool = False
                    ) -> None:
  """Raises a ValueError naming `field` unless `value` is a positive int."""
  if optional and value is None:
    return
  if not isinstance(value, (int, np.integer)) or value <= 0:
    allowed = "positive integers" + (" or None" if optional else "")
    raise ValueError(f"{field}={value!r} is out of range; allowed: {allowed}")


def _check_non_negative(field: str, value: int) -> None:
  """Raises a ValueError naming `field` unless `value` is an int >= 0."""
  if not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(
        f"{field}={value!r} is out of range; allowed: integers >= 0")


def _normalise(images: np.ndarray, spec: _Spec) -> np.ndarray:
  """uint8 [..., C] -> float32 `(x / 255 - mean) / std` per channel."""
  std = np.asarray(spec.std, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(spec.mean, np.float32) / std
  out = np.multiply(images, scale, dtype=np.float32)
  out += offset
  return out


def _pad_batch(image: np.ndarray, label: np.ndarray, batch_size: int) -> Batch:
  """Zero-pads a (possibly short) batch to `batch_size` and adds its mask."""
  missing = batch_size - len(label)
  mask = np.concatenate([np.ones(len(label), np.float32),
                         np.zeros(missing, np.float32)])
  return {
      "image": np.pad(image, [(0, missing)] + [(0, 0)] * (image.ndim - 1)),
      "label": np.pad(label.astype(np.int32), (0, missing)),
      "mask": mask,
  }


def _random_crop_flip(images: np.ndarray, padding: int, flip: bool,
                      rng: np.random.Generator) -> np.ndarray:
  """Zero-pads by `padding`, crops back at random offsets, maybe mirrors.

  One fancy-indexing gather does crop and flip for the whole batch.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding),
                           (0, 0)])
  rows = rng.integers(0, 2 * padding + 1, batch)[:, None] + np.arange(height)
  cols = rng.integers(0, 2 * padding + 1, batch)[:, None] + np.arange(width)
  if flip:
    mirrored = rng.random(batch) < 0.5
    cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


# --------------------------------------------------------------------------
# In-memory datasets.
# --------------------------------------------------------------------------


ARRAY_CACHE_DIR = "aqt_ext_arrays"  # in a prepared TFDS version folder
_SLICE_RE = re.compile(r"^(?P<split>[a-z]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def _decode(name: str, split: str, data_dir: str
            ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a TFDS split (string) into uint8 images and int32 labels."""
  ds = _prepared_builder(name, data_dir).as_dataset(split=split)
  chunks = list(_tfds().as_numpy(ds.batch(_LOAD_CHUNK)))
  images = np.concatenate([chunk["image"] for chunk in chunks])
  labels = np.concatenate([chunk["label"] for chunk in chunks]).astype(np.int32)
  return images, labels


@functools.lru_cache(maxsize=4)
def _whole_split(name: str, split: str, data_dir: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split's arrays, decoded once and then kept as ``.npy`` files
  in the prepared version folder (``aqt_ext_arrays/``, written atomically),
  which later processes read without importing TensorFlow (the decode and
  that import cost 5-10 s per process; a read, a fraction of a second)."""
  version_dir = _prepared_version_dir(name, data_dir)
  cache = version_dir / ARRAY_CACHE_DIR
  paths = [cache / f"{split}-{part}.npy" for part in ("images", "labels")]
  if all(p.exists() for p in paths):
    return np.load(paths[0]), np.load(paths[1])
  images, labels = _decode(name, split, data_dir)
  try:
    cache.mkdir(exist_ok=True)
    for path, array in zip(paths, (images, labels)):
      buffer = io.BytesIO()
      np.save(buffer, array)
      fileio.write_bytes_atomic(str(path), buffer.getvalue())
  except OSError as e:  # a read-only data dir: decode in every process
    logging.warning("cannot keep the decoded %s %s split in %s (%s); it "
                    "will be decoded again by the next process", name, split,
                    cache, e)
  return images, labels


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, split: str, data_dir: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Read-only uint8 images and int32 labels of a TFDS split string. The
  forms the loaders use (``train``, ``train[:N]``, ``train[A:B]``) are
  slices of the whole split's cached arrays (`_whole_split`): TFDS reads an
  unshuffled split in one fixed order, and its slices index that order;
  other forms are decoded by TFDS."""
  m = _SLICE_RE.match(split)
  if m is None or _prepared_version_dir(name, data_dir) is None:
    images, labels = _decode(name, split, data_dir)
  else:
    images, labels = _whole_split(name, m.group("split"), data_dir)
    start, stop = (int(v) if v else None for v in m.group("start", "stop"))
    images, labels = images[start:stop], labels[start:stop]
  images, labels = images.view(), labels.view()
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


class _Source(Protocol):
  """What TrainStream needs from a dataset backend."""

  steps_per_epoch: int

  def batch(self, step: int) -> Batch:
    ...

  def iterate(self, start_step: int) -> Iterator[Batch]:
    ...


class _ArraySource:
  """Training batches gathered from in-memory arrays, random access."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, spec: _Spec,
               batch_size: int, seed: int, augment: bool):
    self.steps_per_epoch = len(labels) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"batch_size={batch_size} is out of range; allowed: 1.."
          f"{len(labels)} (the number of training examples)")
    self._images, self._labels, self._spec = images, labels, spec
    self._batch_size, self._seed, self._augment = batch_size, seed, augment
    self._cached_permutation: tuple[int, np.ndarray] = (-1, np.empty(0))

  def _permutation(self, epoch: int) -> np.ndarray:
    """Example order of `epoch`, memoised for the current epoch."""
    cached_epoch, permutation = self._cached_permutation
    if cached_epoch != epoch:
      rng = np.random.default_rng([self._seed, _PERMUTATION_STREAM, epoch])
      permutation = rng.permutation(len(self._labels))
      self._cached_permutation = (epoch, permutation)
    return permutation

  def batch(self, step: int) -> Batch:
    """The batch of global step `step`."""
    epoch, index = divmod(step, self.steps_per_epoch)
    start = index * self._batch_size
    indices = self._permutation(epoch)[start:start + self._batch_size]
    images = self._images[indices]
    if self._augment:
      rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, step])
      images = _random_crop_flip(images, self._spec.crop_padding,
                                 self._spec.flip, rng)
    return {"image": _normalise(images, self._spec),
            "label": self._labels[indices]}

  def iterate(self, start_step: int) -> Iterator[Batch]:
    """Batches `start_step`, `start_step + 1`, ... forever."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


# --------------------------------------------------------------------------
# ImageNet (streamed with tf.data).
# --------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit TensorFlow seed derived from `(seed, epoch)`."""
  state = np.random.SeedSequence([seed, _EPOCH_STREAM, epoch]).generate_state(1)
  return int(state[0] >> 1)


def _imagenet_normalise(image: Any, spec: _Spec) -> Any:
  """float image in [0, 255] -> normalised float32 (TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  mean = tf.constant(spec.mean, tf.float32) * 255.0
  std = tf.constant(spec.std, tf.float32) * 255.0
  return (tf.cast(image, tf.float32) - mean) / std


def _imagenet_train_example(encoded: Any, label: Any, seed: Any, spec: _Spec,
                            augment: bool) -> tuple[Any, Any]:
  """Inception-style random resized crop to 224 and random flip.

  Without `augment`, the eval preprocessing (resize, center crop).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not augment:
    return _imagenet_eval_example(encoded, label, spec)
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(encoded),
      bounding_boxes=tf.zeros([1, 0, 4]), seed=crop_seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, spec.info.image_shape[:2], antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _imagenet_normalise(image, spec), label


def _imagenet_eval_example(encoded: Any, label: Any, spec: _Spec
                           ) -> tuple[Any, Any]:
  """Resize the shorter side to 256, then take the central 224x224 crop."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width = spec.info.image_shape[:2]
  image = tf.image.decode_jpeg(encoded, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = _IMAGENET_EVAL_RESIZE / tf.reduce_min(shape)
  image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32),
                          antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, height, width)
  return _imagenet_normalise(image, spec), label


def _imagenet_dataset(builder: Any, split: str, shuffle_seed: int | None
                      ) -> Any:
  """Encoded (image, label) records; file order shuffled if a seed is given."""
  tfds = _tfds()
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  ds = builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: (ex["image"], ex["label"]))


class _ImageNetSource:
  """Streamed ImageNet training batches; resuming skips encoded records."""

  def __init__(self, builder: Any, split: str, spec: _Spec, batch_size: int,
               seed: int, augment: bool):
    num_examples = int(_imagenet_dataset(builder, split, None).cardinality())
    self.steps_per_epoch = num_examples // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"batch_size={batch_size} is out of range; allowed: 1.."
          f"{num_examples} (the number of training examples)")
    self._builder, self._split, self._spec = builder, split, spec
    self._batch_size, self._seed, self._augment = batch_size, seed, augment

  def _epoch(self, epoch: int, first_batch: int) -> Iterator[Batch]:
    """Batches `first_batch`.. of `epoch`, as numpy."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    seed = _epoch_seed(self._seed, epoch)
    ds = _imagenet_dataset(self._builder, self._split, seed)
    ds = ds.shuffle(_IMAGENET_SHUFFLE_BUFFER, seed=seed).enumerate()
    ds = ds.skip(first_batch * self._batch_size)
    ds = ds.map(
        lambda i, example: _imagenet_train_example(
            *example, tf.stack([tf.constant(seed, tf.int64), i]),
            self._spec, self._augment),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self._batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    for image, label in _tfds().as_numpy(ds):
      yield {"image": image, "label": label.astype(np.int32)}

  def iterate(self, start_step: int) -> Iterator[Batch]:
    """Batches `start_step`, `start_step + 1`, ... forever."""
    epoch, first_batch = divmod(start_step, self.steps_per_epoch)
    while True:
      yield from self._epoch(epoch, first_batch)
      epoch, first_batch = epoch + 1, 0

  def batch(self, step: int) -> Batch:
    """The batch of global step `step` (cost grows with its epoch offset)."""
    return next(self.iterate(step))


# --------------------------------------------------------------------------
# Public pipelines.
# --------------------------------------------------------------------------


class _Failure:
  """Wraps an exception raised by the prefetch thread."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _prefetch(make_iterator: Callable[[], Iterator[Batch]], size: int
              ) -> Iterator[Batch]:
  """Runs `make_iterator()` in a thread, `size` items ahead of the consumer.

  Errors of the producer are re-raised in the consumer; closing the returned
  generator stops the thread.
  """
  q: queue.Queue[Any] = queue.Queue(maxsize=size)
  stop = threading.Event()

  def produce() -> None:
    try:
      for item in make_iterator():
        if not _put(q, item, stop):
          return
      _put(q, _END, stop)
    except BaseException as error:  # pylint: disable=broad-except
      _put(q, _Failure(error), stop)

  threading.Thread(target=produce, daemon=True).start()
  try:
    while (item := q.get()) is not _END:
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()


class TrainStream:
  """Infinite, resumable stream of training batches.

  `batch(step)` is a pure function of `(seed, step)`. Each epoch visits the
  (first `num_examples`) training examples in a new order; the last partial
  batch of an epoch is dropped.
  """

  def __init__(self, source: _Source, prefetch: int = _PREFETCH_BATCHES):
    self._source = source
    self._prefetch = prefetch

  @property
  def steps_per_epoch(self) -> int:
    """Number of full batches per epoch."""
    return self._source.steps_per_epoch

  def batch(self, step: int) -> Batch:
    """Returns dict(image=float32 [B,H,W,C], label=int32 [B]) of `step`."""
    _check_non_negative("step", step)
    return self._source.batch(step)

  def iterate(self, start_step: int = 0) -> Iterator[Batch]:
    """Yields the batches of steps `start_step`, `start_step + 1`, ...

    Batches are produced a few steps ahead in a background thread.
    """
    _check_non_negative("start_step", start_step)
    return _prefetch(lambda: self._source.iterate(start_step), self._prefetch)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterate(0)


EVAL_SPLITS = ("test", "validation")


def train_split(name: str, data_dir: str | os.PathLike[str] | None,
                num_examples: int | None, validation_examples: int = 0) -> str:
  """The TFDS split training reads: the first `num_examples` training
  examples (all if None) of those before the last `validation_examples`,
  which are held out as the validation split (`validation_split`)."""
  _check_positive("num_examples", num_examples, optional=True)
  _check_non_negative("validation_examples", validation_examples)
  if not validation_examples:
    return _split("train", num_examples)
  total = get_info(name, data_dir).num_train
  kept = total - validation_examples
  if kept < 1:
    raise ValueError(
        f"validation_examples={validation_examples} leaves no training "
        f"example: allowed values are 0..{total - 1} ({name} has {total} "
        "training examples)")
  if num_examples is not None and num_examples > kept:
    raise ValueError(
        f"num_train_examples={num_examples} overlaps the validation split: "
        f"allowed values are 1..{kept} ({total} training examples, the last "
        f"validation_examples={validation_examples} held out)")
  return f"train[:{kept if num_examples is None else num_examples}]"


def validation_split(name: str, data_dir: str | os.PathLike[str] | None,
                     validation_examples: int,
                     num_examples: int | None = None) -> str:
  """The last `validation_examples` training examples (their first
  `num_examples`), held out from training by `train_split`."""
  _check_positive("validation_examples", validation_examples)
  _check_positive("num_examples", num_examples, optional=True)
  total = get_info(name, data_dir).num_train
  if validation_examples >= total:
    raise ValueError(
        f"validation_examples={validation_examples}: allowed values are "
        f"1..{total - 1} ({name} has {total} training examples)")
  start = total - validation_examples
  stop = total if num_examples is None else min(total, start + num_examples)
  return f"train[{start}:{stop}]"


def make_train_stream(name: str, batch_size: int, seed: int,
                      data_dir: str | os.PathLike[str] | None = None,
                      augment: bool = True,
                      num_examples: int | None = None,
                      validation_examples: int = 0) -> TrainStream:
  """Creates the training stream of dataset `name`.

  Args:
    name: TFDS catalog name, one of `fashion_mnist`, `mnist`, `cifar10`,
      `cifar100`, `imagenet2012`.
    batch_size: Examples per batch.
    seed: Non-negative seed of the example order and the augmentation.
    data_dir: TFDS data directory (default $AQT_EXT_DATA_DIR or
      ~/tensorflow_datasets).
    augment: Whether to apply the training augmentation.
    num_examples: Use only the first `num_examples` training examples.
    validation_examples: Hold out the last `validation_examples` training
      examples (the validation split; `train_split`).
  """
  spec = _spec(name)
  _check_positive("batch_size", batch_size)
  _check_non_negative("seed", seed)
  resolved = _resolve_data_dir(data_dir)
  split = train_split(name, resolved, num_examples, validation_examples)
  if spec.streamed:
    source: _Source = _ImageNetSource(
        _prepared_builder(name, resolved), split, spec, batch_size, seed,
        augment)
  else:
    images, labels = _load_arrays(name, split, resolved)
    source = _ArraySource(images, labels, spec, batch_size, seed, augment)
  return TrainStream(source)


def _array_eval_batches(images: np.ndarray, labels: np.ndarray, spec: _Spec,
                        batch_size: int) -> Iterator[Batch]:
  """Consecutive padded, normalised batches of in-memory arrays."""
  for start in range(0, len(labels), batch_size):
    batch = _pad_batch(images[start:start + batch_size],
                       labels[start:start + batch_size], batch_size)
    batch["image"] = _normalise(batch["image"], spec)
    yield batch


def _imagenet_eval_batches(builder: Any, split: str, spec: _Spec,
                           batch_size: int) -> Iterator[Batch]:
  """Consecutive padded, preprocessed ImageNet validation batches."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = _imagenet_dataset(builder, split, None)
  ds = ds.map(lambda image, label: _imagenet_eval_example(image, label, spec),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for image, label in _tfds().as_numpy(ds):
    yield _pad_batch(image, label, batch_size)


def eval_batches(name: str, batch_size: int,
                 data_dir: str | os.PathLike[str] | None = None,
                 num_examples: int | None = None, split: str = "test",
                 validation_examples: int = 0) -> Iterator[Batch]:
  """Yields dict(image, label, mask) covering an eval split exactly once.

  ``split='test'``: the dataset's evaluation split (its test set; ImageNet's
  validation set). ``'validation'``: the last `validation_examples`
  training examples, which `make_train_stream` holds out with the same
  `validation_examples`. The last batch is zero-padded to `batch_size`;
  `mask` (float32) is 1 for real examples and 0 for padding, so masked sums
  give exact metrics. `num_examples` restricts evaluation to the first
  examples of the split.
  """
  spec = _spec(name)
  _check_positive("batch_size", batch_size)
  _check_positive("num_examples", num_examples, optional=True)
  if split not in EVAL_SPLITS:
    raise ValueError(f"split={split!r}: allowed values are {EVAL_SPLITS}")
  resolved = _resolve_data_dir(data_dir)
  if split == "validation":
    split = validation_split(name, resolved, validation_examples,
                             num_examples)
  else:
    split = _split(spec.eval_split, num_examples)
  if spec.streamed:
    return _imagenet_eval_batches(_prepared_builder(name, resolved), split,
                                  spec, batch_size)
  images, labels = _load_arrays(name, split, resolved)
  return _array_eval_batches(images, labels, spec, batch_size)
