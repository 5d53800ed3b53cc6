"""The sharpness study's configuration and command line."""

from __future__ import annotations

import dataclasses
import os

from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import setting


@dataclasses.dataclass(frozen=True)
class SharpnessConfig(config.StudyConfig):
  """One study's settings (the full study; :meth:`quick` is the small one)."""

  dataset: str = setting(
    "mnist1d", "data set (MNIST-1D generated locally, or scikit-learn's digits)", choices=("mnist1d", "digits")
  )
  hidden: tuple[int, ...] = setting((128, 128), "hidden layer widths of the MLP", low=1)
  epochs: int = setting(40, "training epochs", low=1)
  batch_size: int = setting(128, "training batch size", low=1)
  lr: float = setting(0.05, "peak learning rate (cosine schedule)", low=0, low_open=True)
  momentum: float = setting(0.9, "SGD momentum", low=0, high=1, high_open=True)
  weight_decay: float = setting(5e-4, "decoupled weight decay", low=0)
  rho: float = setting(0.1, "SAM / XSAM ascent radius", low=0, low_open=True)
  rho_max: float | None = setting(None, "XSAM probe radius [none: 2 * rho]", low=0, low_open=True)
  seeds: int = setting(3, "seeds per method", low=1)
  num_eigs: int = setting(5, "Hessian eigenvalues computed (lambda_1 / lambda_k is reported)", low=1)
  eig_block: int = setting(8, "LOBPCG block size", low=1)
  avg_rho: float = setting(0.05, "radius of the average sharpness", low=0, low_open=True)
  avg_directions: int = setting(64, "random directions of the average sharpness", low=1)
  grid: int = setting(21, "points per axis of the plane pictures", low=2)
  measure_examples: int = setting(1000, "training examples the metrics' loss is computed on", low=1)
  max_train: int | None = setting(None, "train on the first N training examples [none: all]", low=1)
  mode: str = setting("full", "the study's name in its outputs (full or quick)", flag=None)

  @classmethod
  def quick(cls) -> SharpnessConfig:
    """Digits, a 16-unit MLP, 4 epochs, 1 seed: under a minute."""
    return cls(
      dataset="digits",
      hidden=(16,),
      epochs=4,
      seeds=1,
      avg_directions=8,
      grid=9,
      measure_examples=300,
      max_train=512,
      mode="quick",
    )

  @property
  def probe_radius(self) -> float:
    """XSAM's probe radius: ``rho_max``, or ``2 * rho`` where it is None."""
    return 2 * self.rho if self.rho_max is None else self.rho_max


COMMAND = command_lib.Command(
  SharpnessConfig,
  prog="python -m experiments.sharpness_study",
  description="Sharpness at the end of training: SGD vs SAM vs XSAM (the XSAM paper's Hessian claim).",
  quick_help="tiny settings (digits, 1 seed), < 1 minute",
  out=(os.path.join("results", "sharpness"), os.path.join("results", "sharpness", "quick")),
)
"""``python -m experiments.sharpness_study``'s command line: ``--quick``, a flag per field, ``--out``."""
