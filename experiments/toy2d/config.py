"""The 2-D study's configuration and command line."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import NamedTuple

from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import setting


class Setting(NamedTuple):
  """One hyperparameter setting (all four are traced, so settings batch)."""

  rho: float
  rho_max: float
  lr: float
  period: int

  @property
  def name(self) -> str:
    name = f"rho={self.rho:g} rho_max={self.rho_max:g} lr={self.lr:g}"
    return name if self.period == 1 else f"{name} period={self.period}"


def _grid(rhos: Sequence[float], lrs: Sequence[float], factor: float = 2.0) -> tuple[Setting, ...]:
  return tuple(Setting(r, factor * r, lr, 1) for r in rhos for lr in lrs)


HEADLINES = (Setting(5.0, 10.0, 100.0, 1), Setting(15.0, 30.0, 300.0, 1))
"""The settings drawn in the trajectory and outcome plots (one row each), in the full and the quick study."""

AXES_SETTINGS = _grid((5.0, 10.0, 15.0), (20.0, 100.0, 300.0))
"""The (rho, rho_max = 2 rho, lr) settings of the momentum x alpha-update-period sweep (:func:`axes_sweep`)."""


@dataclasses.dataclass(frozen=True)
class Toy2dConfig(config.StudyConfig):
  """What one run of the study computes (the full study; :meth:`quick` is the small one)."""

  mode: str = setting("full", "the study's name in its JSON (full or quick)", flag=None)
  starts_per_axis: int = setting(31, "start points per axis of the start grid", low=2)
  mu_range: tuple[float, float] = setting((-40.0, 40.0), "mu range of the start grid")
  s_range: tuple[float, float] = setting((12.0, 52.0), "s range of the start grid")
  steps: int = setting(2000, "optimizer steps of every run", low=1)
  ks: tuple[int, ...] = setting((1, 2, 3, 4), "ascent steps K of SAM and XSAM", low=1)
  settings: tuple[Setting, ...] = setting(
    (
      *_grid((2.0, 5.0, 10.0, 15.0), (20.0, 50.0, 100.0, 200.0, 300.0)),
      Setting(5.0, 5.0, 100.0, 1),  # rho_max = rho
      Setting(5.0, 15.0, 100.0, 1),  # rho_max = 3 rho
      Setting(5.0, 10.0, 100.0, 20),  # alpha probed every 20 steps
    ),
    "the (rho, rho_max, lr, alpha period) settings",
    flag=None,
  )
  headlines: tuple[Setting, ...] = setting(HEADLINES, "settings drawn in the plots, among `settings`", flag=None)
  trajectory_starts: tuple[tuple[float, float], ...] = setting(
    ((-35.0, 15.0), (-30.0, 35.0), (-5.0, 14.0)), "start points of the drawn trajectories (fixed a priori)", flag=None
  )
  direction_rhos: tuple[float, ...] = setting(
    (2.0, 5.0, 10.0), "rho values of the direction-quality table (rho_max = 2 rho)", low=0, low_open=True
  )
  direction_point: tuple[float, float] = setting((-5.0, 15.0), "where the Fig. 1b-like picture is drawn")
  surface_n: int = setting(151, "contour / basin-boundary grid of the plots, per axis", low=2)
  momenta: tuple[float, ...] = setting(
    (0.0, 0.9),
    "heavy-ball momentum of the base optimizer, optax.sgd(lr, momentum), in the axes sweep",
    low=0,
    high=1,
    high_open=True,
  )
  periods: tuple[int, ...] = setting(
    (1, 5, 20), "XSAM's alpha update periods (steps between probes) in the axes sweep", low=1
  )
  axes_ks: tuple[int, ...] = setting((1,), "ascent steps K of SAM and XSAM in the axes sweep", low=1)
  axes_stride: int = setting(
    2, "the axes sweep starts from every axes_stride-th point of the start grid per axis (1: all of them)", low=1
  )
  axes_settings: tuple[Setting, ...] = setting(
    AXES_SETTINGS,
    "the (rho, rho_max, lr) settings of the axes sweep (each setting's period is replaced by the period axis)",
    flag=None,
  )

  @classmethod
  def quick(cls) -> Toy2dConfig:
    """A small grid, two settings, K = 1 and 2 (the axes sweep: the two settings, K = 1): under a minute."""
    return cls(
      mode="quick",
      starts_per_axis=9,
      steps=1000,
      ks=(1, 2),
      settings=HEADLINES,
      trajectory_starts=((-35.0, 15.0), (-30.0, 35.0)),
      direction_rhos=(5.0,),
      surface_n=61,
      axes_settings=HEADLINES,
      axes_stride=1,
    )


COMMAND = command_lib.Command(
  Toy2dConfig,
  prog="python -m experiments.toy2d",
  description="The 2-D test-function study (XSAM paper Sec. 5.1, Fig. 3a; Fig. 1b).",
  quick_help="small grid, < 1 minute",
  out=(os.path.join("results", "toy2d"), os.path.join("results", "toy2d", "quick")),
)
"""``python -m experiments.toy2d``'s command line: ``--quick``, a flag per :class:`Toy2dConfig` field, ``--out``."""
