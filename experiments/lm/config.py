"""The language-model study's configuration and command line."""

from __future__ import annotations

import dataclasses

from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import setting

METHODS = (
  "adamw",
  "sam",
  "xsam",
  "xsam_fixed",
  "functional_sam",
  "preconditioned_sam",
  "functional_preconditioned",
  "momentum_sam",
  "rwp",
)
"""The compared methods, each on AdamW (``momentum_sam`` is Momentum-SAM's AdamW, a whole optimizer)."""


@dataclasses.dataclass(frozen=True)
class LMConfig(config.StudyConfig):
  """One study's settings (the full study; :meth:`quick` is the smoke test).

  The model is :func:`experiments.core.pure_models.transformer_init`'s; a run is ``steps`` AdamW
  steps on random windows of ``context + 1`` characters of the training text, evaluated on the
  validation text every ``eval_every`` steps (XSAM probes alpha then too).
  """

  width: int = setting(64, "model width", low=8)
  depth: int = setting(2, "transformer blocks", low=1)
  heads: int = setting(4, "attention heads (dividing the width)", low=1)
  context: int = setting(32, "characters of context", low=2)
  batch_size: int = setting(32, "windows per step", low=1)
  steps: int = setting(400, "optimizer steps per run (the equal-compute AdamW run: twice as many)", low=2)
  eval_every: int = setting(50, "steps between validation evaluations and XSAM's probe rounds", low=1)
  warmup: float = setting(0.1, "share of the steps with a linear learning-rate warmup", low=0, high=1, high_open=True)
  weight_decay: float = setting(0.1, "AdamW's decoupled weight decay (on the matrices)", low=0)
  b2: float = setting(0.99, "AdamW's second-moment decay", low=0, high=1, high_open=True)
  lrs: tuple[float, ...] = setting((1e-3, 3e-3, 1e-2), "AdamW's peak learning rates tried", low=0, low_open=True)
  rhos: tuple[float, ...] = setting(
    (0.003, 0.01, 0.03), "radii tried for SAM, Functional SAM, preconditioned SAM and their combination", low=0
  )
  momentum_rhos: tuple[float, ...] = setting((0.03, 0.1, 0.3), "radii tried for Momentum-SAM", low=0)
  rwp_gammas: tuple[float, ...] = setting((0.003, 0.01, 0.03), "noise scales tried for RWP", low=0)
  rho_max_factors: tuple[float, ...] = setting((1.0, 1.5, 2.0), "XSAM's rho_max / rho tried (at SAM's rho)", low=0)
  fixed_alphas: tuple[float, ...] = setting((0.5, 1.5, 2.0), "fixed alphas tried (at SAM's rho)", low=0, high=2)
  tune_seeds: int = setting(2, "seeds per grid point while tuning on validation", low=1)
  test_seeds: int = setting(6, "fresh seeds of the test phase", low=2)
  mode: str = setting("full", "the study's name in its outputs (full or quick)", flag=None)

  @classmethod
  def quick(cls) -> LMConfig:
    """A tiny model, 12 steps, one grid point, two seeds: the smoke test (every method, every stage)."""
    return cls(
      width=16,
      depth=1,
      heads=2,
      context=8,
      batch_size=8,
      steps=12,
      eval_every=4,
      lrs=(3e-3,),
      rhos=(0.03,),
      momentum_rhos=(0.1,),
      rwp_gammas=(0.01,),
      rho_max_factors=(2.0,),
      fixed_alphas=(1.5,),
      tune_seeds=2,
      test_seeds=2,
      mode="quick",
    )

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.width % self.heads:
      raise config.ConfigError("heads", f"must divide the width {self.width}, got {self.heads}")
    if self.steps % self.eval_every:
      raise config.ConfigError("eval_every", f"must divide the steps {self.steps}, got {self.eval_every}")


COMMAND = command_lib.Command(
  LMConfig,
  prog="python -m experiments.lm",
  description="Does sharpness-awareness help a small character-level transformer (AdamW), and does XSAM?",
  quick_help="a tiny model and grid, < 2 minutes",
  out=("results/lm", "results/lm/quick"),
  extra={"--no-progress": {"action": "store_true", "help": "no progress output"}},
)
