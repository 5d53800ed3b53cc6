"""The protocol's data: MNIST-1D's training set split into train and validation, label noise, smaller train sets.

MNIST-1D (``experiments.core.data.load_mnist1d``: generated locally, 4000 training
and 1000 test series) is split once, by a fixed permutation
(``split_seed``), into a validation split (the first ``val_fraction`` of the
permuted training set) and a training split (the rest). Hyperparameters are
selected on the validation split only; the test split is read by
:func:`problem` with ``which="test"``, which only the protocol's final
stages call.

Regimes (a :class:`Regime`):

- ``label_noise = p``: symmetric label noise on the *whole* training set
  (training and validation splits: a user holds out part of the noisy labels
  they have), made before the split: exactly ``round(p * n)`` examples, drawn
  without replacement with ``noise_seed``, get a label drawn uniformly from the
  *other* classes (:func:`symmetric_noise`). Test labels stay clean.
- ``train_size = m``: only the first ``m`` examples of the training split
  (the validation split is unchanged).

Inputs are normalized with the mean and standard deviation of the training
split (no statistics from validation or test).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from experiments.core import data as data_lib
from experiments.protocol.programs import Problem


@dataclasses.dataclass(frozen=True)
class Regime:
  """A data regime: label noise rate and training-set size (None: the whole training split)."""

  label_noise: float = 0.0
  train_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Splits:
  """Normalized float32 inputs and int32 labels of the three splits, and the indices they came from.

  Attributes:
    x_train, y_train: the training split (noisy labels under label noise).
    x_val, y_val: the validation split (held out of MNIST-1D's training set; noisy like the training split).
    x_test, y_test: MNIST-1D's test set (clean labels).
    train_index, val_index: positions in MNIST-1D's training set (disjoint).
    flipped: per training-set example (MNIST-1D order), whether label noise changed its label.
    num_classes: number of classes.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  train_index: np.ndarray
  val_index: np.ndarray
  flipped: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example."""
    return tuple(self.x_train.shape[1:])


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric label noise: ``(noisy_labels, flipped)``.

  Exactly ``round(rate * n)`` examples, chosen uniformly without replacement,
  get a new label drawn uniformly from the ``num_classes - 1`` classes other
  than their own, so every flipped label is wrong and the wrong labels are
  spread evenly over the classes.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate must be in [0, 1], got {rate}")
  rng = np.random.default_rng([seed, 7])
  n = len(labels)
  flipped = np.zeros(n, bool)
  flipped[rng.choice(n, size=round(rate * n), replace=False)] = True
  shift = rng.integers(1, num_classes, size=n)  # 1 .. C-1: a uniformly random other class
  noisy = np.where(flipped, (labels + shift) % num_classes, labels).astype(labels.dtype)
  return noisy, flipped


@functools.lru_cache(maxsize=8)
def _mnist1d(data_dir: str) -> data_lib.Dataset:
  return data_lib.load_mnist1d(data_dir)


def make_splits(
  data_dir: str,
  regime: Regime,
  *,
  val_fraction: float,
  split_seed: int,
  noise_seed: int,
) -> Splits:
  """The regime's splits of MNIST-1D (see the module docstring)."""
  ds = _mnist1d(data_dir)
  n = len(ds.y_train)
  labels, flipped = ds.y_train, np.zeros(n, bool)
  if regime.label_noise > 0:
    labels, flipped = symmetric_noise(ds.y_train, regime.label_noise, ds.num_classes, noise_seed)
  perm = np.random.default_rng([split_seed, 3]).permutation(n)
  n_val = round(val_fraction * n)
  val_index, train_index = perm[:n_val], perm[n_val:]
  if regime.train_size is not None:
    train_index = train_index[: regime.train_size]
  x_train = ds.x_train[train_index].astype(np.float64)
  mean, std = x_train.mean(), max(x_train.std(), 1e-6)

  def norm(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)

  return Splits(
    x_train=norm(ds.x_train[train_index]),
    y_train=labels[train_index].astype(np.int32),
    x_val=norm(ds.x_train[val_index]),
    y_val=labels[val_index].astype(np.int32),
    x_test=norm(ds.x_test),
    y_test=ds.y_test.astype(np.int32),
    train_index=train_index,
    val_index=val_index,
    flipped=flipped,
    num_classes=ds.num_classes,
  )


def problem(splits: Splits, which: str) -> Problem:
  """The device arrays of the training split and the evaluation split ``which`` (``"val"`` or ``"test"``)."""
  if which not in ("val", "test"):
    raise ValueError(f"which must be 'val' or 'test', got {which!r}")
  x_eval, y_eval = (splits.x_val, splits.y_val) if which == "val" else (splits.x_test, splits.y_test)
  return Problem(jnp.asarray(splits.x_train), jnp.asarray(splits.y_train), jnp.asarray(x_eval), jnp.asarray(y_eval))
