"""Data sets, deterministic batch order and image augmentation.

Three sources, all returned as in-memory numpy arrays in a :class:`Dataset`:

- ``mnist1d``: MNIST-1D (Greydanus 2020), generated locally and
  deterministically with ``mnist1d.data.make_dataset`` (no download), cached
  as an ``.npz`` under ``data_dir``. 4000 train / 1000 test, length 40.
- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 images shipped in the
  wheel), split 80/20 with a fixed permutation.
- any other name: a tensorflow-datasets image data set read through
  ``tfds.data_source`` (array_record files under ``data_dir``; decoding uses
  PIL, so no TensorFlow is needed once the data are prepared).

Batch order is a pure function of ``(seed, epoch)`` and augmentation of
``(seed, epoch, batch index)``, so a run resumed at step ``s`` sees exactly the
batches an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

MNIST1D_FILE = "mnist1d.npz"


class BuiltinInfo(NamedTuple):
  """What is known of a built-in data set before loading it."""

  train_size: int
  is_image: bool


BUILTIN_DATASETS = {"mnist1d": BuiltinInfo(4000, False), "digits": BuiltinInfo(1437, True)}
"""The data sets made locally (no tensorflow-datasets): name -> :class:`BuiltinInfo`."""

TFDS_CATALOG = "https://www.tensorflow.org/datasets/catalog/overview"


class DatasetError(ValueError):
  """A data set name that is unknown, or a data set that cannot be loaded."""


def _unknown_dataset(name: str, why: str) -> DatasetError:
  builtins = ", ".join(BUILTIN_DATASETS)
  return DatasetError(
    f"{name!r} is not a built-in data set ({builtins}), and other names are read with "
    f"tensorflow-datasets, {why} (its names: {TFDS_CATALOG})"
  )


def check_dataset_name(name: str) -> None:
  """Checks that ``name`` is a built-in data set or one tensorflow-datasets knows.

  Cheap: looks the name up in the tensorflow-datasets registry, loads nothing.

  Raises:
    DatasetError: naming the built-in data sets, for any other name that
      tensorflow-datasets does not know (or when it is not installed).
  """
  if name in BUILTIN_DATASETS:
    return
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise _unknown_dataset(name, "which is not installed (pip install tensorflow-datasets)") from None
  base = re.split("[:/]", name, maxsplit=1)[0]  # name[/config][:version]
  try:
    tfds.builder_cls(base)
  except ValueError:  # DatasetNotFoundError (a ValueError), or a malformed name
    raise _unknown_dataset(name, "which does not know this one") from None


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory classification data set.

  Attributes:
    name: the data set's name.
    x_train, y_train, x_test, y_test: inputs (float32, or uint8 images) and
      int32 labels.
    num_classes: number of classes.
    mean, std: per-channel statistics used by :meth:`normalize` (broadcast
      against the trailing input axis).
    is_image: inputs are ``(H, W, C)`` images (augmentation applies).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  is_image: bool

  @property
  def input_shape(self) -> tuple:
    """Shape of one example."""
    return tuple(self.x_train.shape[1:])

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` as float32."""
    return ((x.astype(np.float32) - self.mean) / self.std).astype(np.float32)

  def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
    """The first ``train`` / ``test`` examples (None keeps all)."""
    return dataclasses.replace(
      self,
      x_train=self.x_train[:train],
      y_train=self.y_train[:train],
      x_test=self.x_test[:test],
      y_test=self.y_test[:test],
    )


def _stats(x: np.ndarray, is_image: bool) -> tuple[np.ndarray, np.ndarray]:
  axes = tuple(range(x.ndim - 1)) if is_image else None
  mean = np.asarray(x.astype(np.float64).mean(axis=axes), np.float32)
  std = np.asarray(x.astype(np.float64).std(axis=axes), np.float32)
  return mean, np.maximum(std, np.float32(1e-6))


def load_mnist1d(data_dir: str) -> Dataset:
  """MNIST-1D generated locally (never downloaded), cached in ``data_dir``.

  Uses ``mnist1d.data.make_dataset(get_dataset_args())``: the reference
  generator with its default seed (42), so the data equal the published set's
  recipe. ``make_dataset`` reseeds numpy's and Python's global RNGs; their
  states are restored afterwards.

  Args:
    data_dir: folder for the ``mnist1d.npz`` cache (created if missing).

  Returns:
    A :class:`Dataset` with 4000 train and 1000 test series of length 40.
  """
  path = os.path.join(data_dir, MNIST1D_FILE)
  if not os.path.exists(path):
    import random

    from mnist1d import data as mnist1d_data

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
      raw = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    finally:
      np.random.set_state(np_state)
      random.setstate(py_state)
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, x=raw["x"], y=raw["y"], x_test=raw["x_test"], y_test=raw["y_test"])
    os.replace(tmp, path)
  try:
    with np.load(path) as f:
      x, y, x_test, y_test = f["x"], f["y"], f["x_test"], f["y_test"]
  except Exception as e:  # a truncated or foreign file: any of numpy's errors
    raise DatasetError(f"the MNIST-1D cache {path} is unreadable ({type(e).__name__}: {e}); delete it") from e
  x, x_test = x.astype(np.float32), x_test.astype(np.float32)
  mean, std = _stats(x, is_image=False)
  return Dataset(
    name="mnist1d",
    x_train=x,
    y_train=y.astype(np.int32),
    x_test=x_test,
    y_test=y_test.astype(np.int32),
    num_classes=10,
    mean=np.float32(mean),
    std=np.float32(std),
    is_image=False,
  )


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits as ``(8, 8, 1)`` images, 80/20 fixed split."""
  from sklearn import datasets as sk_datasets

  raw = sk_datasets.load_digits()
  x = raw.images.astype(np.float32)[..., None]
  y = raw.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  n_train = int(0.8 * len(y))
  tr, te = order[:n_train], order[n_train:]
  mean, std = _stats(x[tr], is_image=True)
  return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, mean, std, is_image=True)


def _read_tfds_split(source: Any, image_key: str, label_key: str, desc: str) -> tuple[np.ndarray, np.ndarray]:
  from tqdm.auto import tqdm

  n = len(source)
  images: np.ndarray | None = None
  labels = np.zeros([n], np.int32)
  for i in tqdm(range(n), desc=desc, leave=False, mininterval=1.0):
    example = source[i]
    image = np.asarray(example[image_key])
    if images is None:
      images = np.zeros((n, *image.shape), image.dtype)
    images[i] = image
    labels[i] = int(example[label_key])
  if images is None:
    raise ValueError(f"{desc}: the split is empty.")
  return images, labels


def load_tfds(
  name: str,
  data_dir: str | None,
  *,
  image_key: str = "image",
  label_key: str = "label",
  download: bool = False,
) -> Dataset:
  """An image classification set from tensorflow-datasets, into memory.

  Reads the ``train`` split and the ``test`` split (``validation`` when there
  is no ``test``) through ``tfds.data_source``, which needs no TensorFlow to
  read prepared array_record files. Preparing (downloading and encoding) a
  data set does need TensorFlow; pass ``download=True`` on a machine that has
  it, or point ``data_dir`` at already prepared files.

  Args:
    name: tensorflow-datasets name, e.g. ``cifar10`` or ``cifar100``.
    data_dir: the tensorflow-datasets data dir (None: its default).
    image_key, label_key: feature names of the image and the label.
    download: let tensorflow-datasets download and prepare the data.

  Returns:
    A :class:`Dataset` with uint8 images and per-channel statistics of the
    training split.
  """
  import tensorflow_datasets as tfds

  try:
    train = tfds.data_source(name, split="train", data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_dataset(name, "which does not know this one") from None
  except Exception as e:  # not prepared, wrong format, no network: tfds raises many types
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    hint = "" if download else "; pass download=True (--download, needs TensorFlow) to prepare it"
    raise DatasetError(
      f"the tensorflow-datasets set {name!r} could not be loaded from data_dir {data_dir!r} "
      f"({type(e).__name__}: {first}){hint}, or point data_dir at prepared array_record files"
    ) from e
  try:
    test = tfds.data_source(name, split="test", data_dir=data_dir, download=download)
  except (KeyError, ValueError):
    test = tfds.data_source(name, split="validation", data_dir=data_dir, download=download)
  num_classes = int(train.dataset_info.features[label_key].num_classes)
  x, y = _read_tfds_split(train, image_key, label_key, f"reading {name} train")
  x_test, y_test = _read_tfds_split(test, image_key, label_key, f"reading {name} test")
  mean, std = _stats(x, is_image=True)
  return Dataset(name, x, y, x_test, y_test, num_classes, mean, std, is_image=True)


def load_dataset(name: str, data_dir: str | None, *, download: bool = False) -> Dataset:
  """Loads ``mnist1d``, ``digits`` or a tensorflow-datasets set by name.

  Raises:
    DatasetError: for a name that is neither built in nor known to
      tensorflow-datasets, or a data set that cannot be loaded.
  """
  if name == "mnist1d":
    return load_mnist1d(data_dir or "./data_cache")
  if name == "digits":
    return load_digits()
  return load_tfds(name, data_dir, download=download)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of ``range(n)`` used in ``epoch``: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
  """Random crop after zero padding, then a random horizontal flip.

  Each image of the ``(B, H, W, C)`` batch is zero-padded by ``padding``
  pixels on every side, cropped back to ``H x W`` at a uniformly random
  offset in ``[0, 2 * padding]^2`` and mirrored left-right with probability
  1/2 (the standard CIFAR augmentation).

  Args:
    images: ``(B, H, W, C)`` array (any dtype; padding uses zeros).
    rng: numpy generator drawing the offsets and flips.
    padding: pixels of zero padding.

  Returns:
    The augmented batch, same shape and dtype.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy = rng.integers(0, 2 * padding + 1, size=(b,))
  dx = rng.integers(0, 2 * padding + 1, size=(b,))
  flip = rng.random((b,)) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class EpochBatches:
  """The training batches of one epoch, in the deterministic order.

  ``batches[i]`` is ``(x, y)`` for batch ``i`` of ``epoch``: examples
  ``epoch_order(seed, epoch)[i*B:(i+1)*B]``, augmented (if enabled) with a
  generator seeded by ``(seed, epoch, i)``, then normalized.
  """

  def __init__(self, data: Dataset, *, seed: int, epoch: int, batch_size: int, augment: bool):
    self.data = data
    self.seed = seed
    self.epoch = epoch
    self.batch_size = batch_size
    self.augment = augment
    self.order = epoch_order(seed, epoch, len(data.y_train))

  def __len__(self) -> int:
    return len(self.order) // self.batch_size

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
    x = self.data.x_train[idx]
    if self.augment:
      x = random_crop_flip(x, np.random.default_rng([self.seed, self.epoch, i, 1]))
    return self.data.normalize(x), self.data.y_train[idx]


def eval_batches(data: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields ``(x, y, mask)`` over the test set in fixed-size batches.

  The last batch is padded with zeros and ``mask`` marks the real examples,
  so an evaluation step compiled once serves every batch.
  """
  n = len(data.y_test)
  for start in range(0, n, batch_size):
    x = data.normalize(data.x_test[start : start + batch_size])
    y = data.y_test[start : start + batch_size]
    real = len(y)
    mask = np.zeros([batch_size], np.float32)
    mask[:real] = 1.0
    if real < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros([batch_size - real], y.dtype)])
    yield x, y, mask
