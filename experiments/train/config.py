"""Training configuration for the classification study.

One frozen dataclass holds every hyperparameter of one run (one method, one
seed); the study in ``experiments.train`` varies ``method`` and ``seed``.
Fields left as ``None`` (or ``"auto"``) are resolved from the data set and
model by ``experiments.train.checks.resolve``, so a configuration printed into the results JSON is
always the complete one that ran. Its fields, their ranges and flags are declared with
``experiments.core.config.setting``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable

from experiments.core.config import StudyConfig, setting
from experiments.core.models import MODELS

MAX_SEED = 2**32 - 1
"""Seeds above it would repeat others' initialisations (JAX keys take 32 bits)."""

_DATA, _OPT, _RUN = "data and model", "optimization", "training run"


@dataclasses.dataclass(frozen=True)
class TrainConfig(StudyConfig):
  """Hyperparameters of one training run.

  Each field's ``help`` (``python -m experiments.train --help``) says what it
  is and the range :class:`~experiments.core.config.StudyConfig` checks it against.
  ``method`` and ``seed`` have no flag: the study sets them per run.
  ``devices`` is checked against the machine by
  ``experiments.train.checks.check_devices``: a 1-D mesh over the first N of
  ``jax.devices()``, the batch sharded along its leading axis, parameters and
  optimizer state replicated, the same jitted step (global semantics: equal to
  one device up to the order of float reductions); 1 places nothing explicitly.
  """

  dataset: str = setting(
    "mnist1d",
    "mnist1d (generated locally), digits (scikit-learn), or a tensorflow-datasets name (cifar10, ...)",
    group=_DATA,
  )
  data_dir: str = setting("./data_cache", "MNIST-1D cache / tensorflow-datasets data_dir", group=_DATA)
  model: str | None = setting(
    None, "mlp, cnn1d, cnn2d, resnet18 or auto [by data set]", words={"auto": None}, choices=MODELS, group=_DATA
  )
  width: int = setting(32, "base width (channels or hidden units) of the small models", low=1, group=_DATA)
  batch_norm: bool = setting(False, "BatchNorm in the MLP / 1-D CNN (the others always have it)", group=_DATA)
  method: str = setting("sgd", "optimizer name in experiments.core.methods.METHODS", flag=None)
  seed: int = setting(0, "initialisation and data-order seed", flag=None, low=0, high=MAX_SEED)
  epochs: int = setting(60, "training epochs", low=1, group=_OPT)
  batch_size: int = setting(100, "training batch size, at most the training examples", low=1, group=_OPT)
  eval_batch_size: int = setting(
    1000,
    "evaluation batch size (the last batch is padded; with --devices N rounded up to a multiple of N)",
    low=1,
    group=_RUN,
  )
  learning_rate: float = setting(
    0.05, "peak learning rate (cosine schedule)", flag="lr", low=0, low_open=True, group=_OPT
  )
  momentum: float = setting(0.9, "SGD momentum", low=0, high=1, high_open=True, group=_OPT)
  weight_decay: float = setting(5e-4, "decoupled weight decay (optax.add_decayed_weights)", low=0, group=_OPT)
  rho: float = setting(0.1, "ascent radius", low=0, low_open=True, group=_OPT)
  rho_max: float | None = setting(None, "XSAM probe radius [none: 2 * rho]", low=0, low_open=True, group=_OPT)
  num_steps: int = setting(1, "ascent steps K", low=1, group=_OPT)
  alpha_update_period: int | None = setting(
    None, "XSAM probe period in steps [none: one epoch, the paper's schedule]", low=1, group=_OPT
  )
  probe_batch_size: int | str | None = setting(
    "auto",
    "XSAM probes at a time (jax.lax.map); none: one jax.vmap; auto: none for the MLP, 1 for conv nets",
    low=1,
    words={"auto": "auto"},
    group=_OPT,
  )
  train_subset: int | None = setting(None, "use the first N training examples [none: all]", low=1, group=_DATA)
  test_subset: int | None = setting(None, "use the first N test examples [none: all]", low=1, group=_DATA)
  augment: bool | None = setting(
    None, "random crop (padding 4) + horizontal flip [none: on for tensorflow-datasets images]", group=_DATA
  )
  checkpoint_every: int = setting(
    10, "epochs between checkpoints (one is always saved after the last epoch; 0: only then)", low=0, group=_RUN
  )
  stop_after_epochs: int | None = setting(
    None, "stop after this many epochs in total (simulated preemption; re-run to resume)", low=1, group=_RUN
  )
  devices: int = setting(
    1,
    "data parallel over the first N of jax.devices(): batch sharded, params replicated "
    "(N must divide --batch-size; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    group=_RUN,
  )
  alphas: tuple[float, ...] | None = setting(
    None, "XSAM's alpha grid [none: 0.0, 0.1, ..., 2.0, xsam_jax.DEFAULT_ALPHAS]", group=_OPT
  )
  alpha_refinement: str | None = setting(
    None, "XSAM's sub-grid alpha refinement (see xsam_jax.xsam)", choices=("parabola",), group=_OPT
  )

  @classmethod
  def default(cls) -> TrainConfig:
    """The default study: 1-D CNN on MNIST-1D, 60 epochs, batch 100.

    Scaled-down paper settings (docs/algorithm.md): SGD momentum 0.9, lr 0.05 with a
    cosine schedule, weight decay 5e-4, rho 0.1, rho_max = 2 rho, alpha
    probed once per epoch (40 steps).
    """
    return cls()

  @classmethod
  def quick(cls) -> TrainConfig:
    """A smoke-test configuration that runs in seconds (tiny subset, 1 epoch)."""
    return cls(epochs=1, width=8, batch_size=32, train_subset=512, test_subset=256, checkpoint_every=1)

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
        run's method does not use (``experiments.core.methods.unused_fields``:
        SGD's runs do not depend on ``rho``).
    """
    skip = {"stop_after_epochs", "checkpoint_every", "data_dir", *ignore}
    ident = {k: v for k, v in self.to_dict().items() if k not in skip}
    for key, default in (("devices", 1), ("alphas", None), ("alpha_refinement", None)):
      if key in ident and ident[key] == default:  # options added later count only when set
        del ident[key]
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
