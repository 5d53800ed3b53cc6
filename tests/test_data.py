"""Tests of experiments.core.data: loaders, batch order, augmentation, tfds on mock data."""

import pathlib
import random

import numpy as np
import pytest

from experiments.core import data as data_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = str(REPO / "data_cache")


def _toy(n_train=10, n_test=7, shape=(6, 5, 3)):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
  xt = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
  y = np.arange(n_train, dtype=np.int32) % 3
  yt = np.arange(n_test, dtype=np.int32) % 3
  mean, std = data_lib._stats(x, is_image=True)
  return data_lib.Dataset("toy", x, y, xt, yt, 3, mean, std, is_image=True)


def test_mnist1d_generated_locally_cached_and_rng_untouched():
  np.random.seed(123)
  random.seed(7)
  before_np, before_py = np.random.random(), random.random()
  np.random.seed(123)
  random.seed(7)
  d = data_lib.load_mnist1d(DATA_DIR)
  assert (np.random.random(), random.random()) == (before_np, before_py)
  assert (REPO / "data_cache" / data_lib.MNIST1D_FILE).exists()
  assert d.x_train.shape == (4000, 40)
  assert d.x_test.shape == (1000, 40)
  assert d.x_train.dtype == np.float32
  assert d.y_train.dtype == np.int32
  assert set(np.unique(d.y_train)) == set(range(10))
  again = data_lib.load_mnist1d(DATA_DIR)
  np.testing.assert_array_equal(d.x_train, again.x_train)


def test_digits_split():
  d = data_lib.load_digits()
  assert d.x_train.shape == (1437, 8, 8, 1)
  assert d.x_test.shape == (360, 8, 8, 1)
  assert d.is_image
  assert d.num_classes == 10
  assert d.mean.shape == (1,)
  assert np.all(d.std > 0)


def test_epoch_order_is_a_deterministic_permutation():
  a = data_lib.epoch_order(3, 5, 100)
  np.testing.assert_array_equal(a, data_lib.epoch_order(3, 5, 100))
  np.testing.assert_array_equal(np.sort(a), np.arange(100))
  assert not np.array_equal(a, data_lib.epoch_order(3, 6, 100))
  assert not np.array_equal(a, data_lib.epoch_order(4, 5, 100))


def test_random_crop_flip_is_a_padded_crop_and_flip():
  x = _toy(n_train=32).x_train
  out = data_lib.random_crop_flip(x, np.random.default_rng(1), padding=2)
  assert out.shape == x.shape
  assert out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(len(x)):
    matches = [
      (dy, dx, f)
      for dy in range(5)
      for dx in range(5)
      for f in (False, True)
      if np.array_equal(
        out[i],
        padded[i, dy : dy + x.shape[1], dx : dx + x.shape[2]][:, :: -1 if f else 1],
      )
    ]
    assert matches, f"image {i} is not a crop of the padded image"
    flips += matches[0][2]
  assert 0 < flips < len(x)


def test_epoch_batches_deterministic_and_augmented():
  d = _toy(n_train=10)
  b1 = data_lib.EpochBatches(d, seed=0, epoch=1, batch_size=4, augment=True)
  b2 = data_lib.EpochBatches(d, seed=0, epoch=1, batch_size=4, augment=True)
  assert len(b1) == 2
  x1, y1 = b1[1]
  x2, y2 = b2[1]
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert x1.dtype == np.float32
  assert x1.shape == (4, 6, 5, 3)
  np.testing.assert_array_equal(y1, d.y_train[b1.order[4:8]])
  plain = data_lib.EpochBatches(d, seed=0, epoch=1, batch_size=4, augment=False)[1][0]
  np.testing.assert_allclose(plain, d.normalize(d.x_train[b1.order[4:8]]))
  with pytest.raises(IndexError):
    b1[2]


def test_eval_batches_pad_and_mask():
  d = _toy(n_test=7)
  batches = list(data_lib.eval_batches(d, 3))
  assert [b[0].shape[0] for b in batches] == [3, 3, 3]
  assert sum(float(m.sum()) for _, _, m in batches) == 7
  np.testing.assert_array_equal(batches[-1][2], [1, 0, 0])


def test_tfds_loader_on_mock_cifar10(tmp_path):
  """tfds.data_source under mock_data: the real builder's code path, no download."""
  tfds = pytest.importorskip("tensorflow_datasets")
  try:
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
      d = data_lib.load_tfds("cifar10", str(tmp_path))
  except ImportError as e:  # e.g. a builder that needs TensorFlow
    pytest.skip(f"tensorflow-datasets cannot mock cifar10 without TensorFlow here: {e}")
  assert d.x_train.shape == (24, 32, 32, 3)
  assert d.x_train.dtype == np.uint8
  assert d.x_test.shape[1:] == (32, 32, 3)
  assert d.num_classes == 10
  assert d.is_image
  assert d.y_train.min() >= 0
  assert d.y_train.max() < 10
  assert d.mean.shape == (3,)
  assert d.std.shape == (3,)
  x, _ = data_lib.EpochBatches(d, seed=0, epoch=0, batch_size=8, augment=True)[0]
  assert x.shape == (8, 32, 32, 3)
  assert np.all(np.isfinite(x))
