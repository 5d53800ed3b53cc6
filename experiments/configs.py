"""Training configuration for the classification study.

One frozen dataclass holds every hyperparameter of one run (one method, one
seed); the study in ``experiments.train`` varies ``method`` and ``seed``.
Fields left as ``None`` (or ``"auto"``) are resolved from the data set and
model by ``experiments.trainer.resolve``, so a configuration printed into the results JSON is always
the complete one that ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of one training run.

  Attributes:
    dataset: ``mnist1d`` (generated locally, the default), ``digits``
      (scikit-learn) or a tensorflow-datasets name such as ``cifar10``.
    data_dir: cache for MNIST-1D and the tensorflow-datasets ``data_dir``.
    model: ``mlp``, ``cnn1d``, ``cnn2d`` or ``resnet18``; None picks the
      data set's default (``cnn1d`` for MNIST-1D, ``cnn2d`` for images).
    width: base width (channels or hidden units) of the small models.
    batch_norm: add BatchNorm to the MLP / 1-D CNN (the 2-D CNN and
      ResNet-18 always have it).
    method: optimizer name in ``experiments.methods.METHODS`` (``sgd``,
      ``sam``, ``xsam``, ...).
    seed: initialisation and data-order seed.
    epochs: training epochs.
    batch_size: training batch size (the last partial batch is dropped).
    eval_batch_size: evaluation batch size (the last batch is padded; with
      ``devices > 1`` rounded up to a multiple of ``devices``, the extra
      rows being padding, so it need not divide).
    learning_rate: peak learning rate of the cosine schedule.
    momentum: SGD momentum.
    weight_decay: decoupled from the loss, applied by
      ``optax.add_decayed_weights`` before the SGD step.
    rho: ascent radius of SAM / XSAM.
    rho_max: XSAM's probe radius; None means ``2 * rho``.
    num_steps: ascent steps K.
    alpha_update_period: XSAM's probe period in steps; None means one
      epoch (the paper's schedule).
    probe_batch_size: XSAM probes evaluated at a time (``jax.lax.map``);
      None evaluates all in one ``jax.vmap``. The string ``"auto"`` picks
      None for the MLP and 1 for conv nets (vmap of convs is slow on CPU).
    train_subset: if set, train on only the first this many examples.
    test_subset: if set, evaluate on only the first this many examples.
    augment: random crop (padding 4) and horizontal flip; None means on for
      image data sets from tensorflow-datasets.
    checkpoint_every: save a checkpoint every this many epochs; one is
      always saved after the last epoch and when stopping early (0: only
      then). Checkpoints need a workdir.
    stop_after_epochs: stop this invocation after this many epochs have
      been completed in total (simulates a preemption; resume by running
      again). Not part of the run's identity.
    devices: train data-parallel over the first this many of
      ``jax.devices()``: a 1-D mesh, the batch sharded along its leading
      axis, parameters and optimizer state replicated, the same jitted step
      (global semantics: equal to one device up to the order of float
      reductions). ``batch_size`` must be divisible by it. 1 (the default)
      places nothing explicitly, exactly as before the option existed.
    alphas: XSAM's alpha grid as a tuple of floats; None is the paper's
      0.0, 0.1, ..., 2.0 (``xsam_jax.DEFAULT_ALPHAS``).
    alpha_refinement: XSAM's sub-grid refinement (``None`` or
      ``"parabola"``, see ``xsam_jax.xsam``).
  """

  dataset: str = "mnist1d"
  data_dir: str = "./data_cache"
  model: str | None = None
  width: int = 32
  batch_norm: bool = False
  method: str = "sgd"
  seed: int = 0
  epochs: int = 60
  batch_size: int = 100
  eval_batch_size: int = 1000
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  rho: float = 0.1
  rho_max: float | None = None
  num_steps: int = 1
  alpha_update_period: int | None = None
  probe_batch_size: int | str | None = "auto"
  train_subset: int | None = None
  test_subset: int | None = None
  augment: bool | None = None
  checkpoint_every: int = 10
  stop_after_epochs: int | None = None
  devices: int = 1
  alphas: tuple | None = None
  alpha_refinement: str | None = None

  def replace(self, **changes: Any) -> TrainConfig:
    """A copy with ``changes`` applied."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """The fields as a JSON-serialisable dict."""
    return dataclasses.asdict(self)

  def fingerprint(self, ignore: Iterable[str] = ()) -> str:
    """A short hash of everything that determines the trained weights.

    Excludes ``stop_after_epochs`` and ``checkpoint_every`` (they do not change
    the result), so an interrupted run and its resumption share a checkpoint
    directory while a run with other hyperparameters never reuses it.
    ``devices`` (and ``alphas``, ``alpha_refinement``) count only when not
    at their defaults (fingerprints of earlier runs stay valid): a run on N devices
    equals the single-device one only up to float reduction order, so it
    keeps its own checkpoints.

    Args:
      ignore: further fields to leave out, e.g. the hyperparameters that the
        run's method does not use (``experiments.methods.unused_fields``:
        SGD's runs do not depend on ``rho``).
    """
    skip = {"stop_after_epochs", "checkpoint_every", "data_dir", *ignore}
    ident = {k: v for k, v in self.to_dict().items() if k not in skip}
    for key, default in (("devices", 1), ("alphas", None), ("alpha_refinement", None)):
      if key in ident and ident[key] == default:  # options added later count only when set
        del ident[key]
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def default_config() -> TrainConfig:
  """The default study: 1-D CNN on MNIST-1D, 60 epochs, batch 100.

  Scaled-down paper settings (docs/algorithm.md): SGD momentum 0.9, lr 0.05 with a
  cosine schedule, weight decay 5e-4, rho 0.1, rho_max = 2 rho, alpha
  probed once per epoch (40 steps).
  """
  return TrainConfig()


def quick_config() -> TrainConfig:
  """A smoke-test configuration that runs in seconds (tiny subset, 1 epoch)."""
  return TrainConfig(
    epochs=1,
    width=8,
    batch_size=32,
    train_subset=512,
    test_subset=256,
    checkpoint_every=1,
  )
