"""The protocol's settings (one frozen dataclass) and its command line."""

from __future__ import annotations

import dataclasses
import os

from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import setting

_DATA, _TRAIN, _GRID, _STAGES = "data", "training", "grids", "stages"

PROTOCOL_METHODS = ("sgd", "sam", "xsam", "xsam_fixed", "gsam", "wsam", "msam", "msam_plus", "lsam", "lsam_plus")
MULTISTEP_METHODS = ("sam", "msam", "msam_plus", "lsam", "lsam_plus", "xsam")
REGIMES = ("noise", "small", "mlp")
"""Extra arms of the single-step protocol: ``noise`` (label noise on the CNN), ``small`` (a reduced
training split on the CNN), ``mlp`` (the MLP on clean data)."""
TIE_RULES = ("nearest_within_se", "argmax")
"""How a method's own hyperparameter is selected on validation (experiments.protocol.stages.select)."""
STAGES = ("vmap", "rho", "multistep", "regimes", "toy2d")
"""Optional stages; the single-step selection and the test phase always run."""


def _alpha_grid() -> tuple[float, ...]:
  return tuple(round(0.1 * i, 1) for i in range(21))


@dataclasses.dataclass(frozen=True)
class ProtocolConfig(config.StudyConfig):
  """What one run of the protocol computes (the full protocol; :meth:`quick` is the CI smoke run).

  Tuning is on the validation split, the mean over ``tune_seeds`` seeds per
  grid point; the selected settings are then trained with ``test_seeds``
  fresh seeds and evaluated once on the test split.
  """

  mode: str = setting("full", "the protocol's name in its outputs (full or quick)", flag=None)
  data_dir: str = setting("./data_cache", "MNIST-1D cache folder", group=_DATA)
  val_fraction: float = setting(
    0.2, "fraction of MNIST-1D's training set held out for validation", low=0, high=1, low_open=True, high_open=True
  )
  split_seed: int = setting(0, "seed of the train/validation split", low=0, group=_DATA)
  noise_seed: int = setting(0, "seed of the label noise", low=0, group=_DATA)
  train_size: int | None = setting(
    None, "use only the first N examples of the training split everywhere [none: all]", low=1, group=_DATA
  )
  model: str = setting("cnn1d", "model of the main arm", choices=("cnn1d", "mlp"), group=_TRAIN)
  width: int = setting(32, "model width (conv channels; the MLP's hidden units are 8x)", low=1, group=_TRAIN)
  epochs: int = setting(30, "training epochs of every run", low=1, group=_TRAIN)
  batch_size: int = setting(100, "training batch size", low=1, group=_TRAIN)
  momentum: float = setting(0.9, "SGD momentum (the paper's base optimizer)", low=0, high=1, high_open=True)
  warmup_epochs: int = setting(
    2, "linear lr warmup epochs before the cosine decay (0: none; docs/protocol.md says why)", low=0, group=_TRAIN
  )
  tune_seeds: int = setting(5, "seeds per grid point on validation (seeds 0..N-1)", low=1, group=_TRAIN)
  tie_rule: str = setting(
    "nearest_within_se",
    "selection of a method's own hyperparameter: nearest its baseline among the points within one paired "
    "standard error of the best validation mean, or the best mean (argmax)",
    choices=TIE_RULES,
    group=_TRAIN,
  )
  test_seeds: int = setting(10, "fresh seeds of the final test runs", low=1, group=_TRAIN)
  test_seed_offset: int = setting(1000, "the first test seed (test seeds never tune)", low=1, group=_TRAIN)
  multistep_seeds: int = setting(10, "test seeds of the multi-step stage (the first of the test seeds)", low=1)
  vmap: bool = setting(False, "train a grid's runs as one jax.vmap call (measured: see the vmap stage)", group=_TRAIN)
  vmap_chunk: int = setting(10, "runs per vmapped call", low=1, group=_TRAIN)
  lrs: tuple[float, ...] = setting((0.05, 0.1, 0.2, 0.4), "peak learning rates", low=0, low_open=True, group=_GRID)
  wds: tuple[float, ...] = setting((1e-4, 5e-4, 1e-3), "weight decays", low=0, group=_GRID)
  rhos: tuple[float, ...] = setting(
    (0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2), "SAM's rho grid", low=0, low_open=True, group=_GRID
  )
  rho_max_factors: tuple[float, ...] = setting(
    (1.0, 1.25, 1.5, 2.0, 3.0), "XSAM's rho_max grid, as multiples of rho", low=0, low_open=True, group=_GRID
  )
  fixed_alphas: tuple[float, ...] = setting(_alpha_grid(), "fixed-alpha baseline's grid (1 is SAM)", group=_GRID)
  baselines: bool = setting(True, "tune and test GSAM and WSAM on the main arm", group=_GRID)
  gsam_alphas: tuple[float, ...] = setting((0.02, 0.05, 0.1, 0.2, 0.4), "GSAM's alpha grid", low=0, group=_GRID)
  wsam_gammas: tuple[float, ...] = setting((0.6, 0.7, 0.8, 0.9), "WSAM's gamma grid", low=0, high=1, high_open=True)
  rho_factors: tuple[float, ...] = setting(
    (0.5, 1.0, 2.0, 4.0), "varying-rho stage: rho as multiples of SAM's tuned rho", low=0, low_open=True
  )
  coarse_alphas: tuple[float, ...] = setting(
    (0.0, 0.5, 1.5, 2.0), "fixed-alpha grid of the varying-rho stage and the regimes (plus 1 = SAM)", group=_GRID
  )
  ks: tuple[int, ...] = setting((1, 2, 3, 4), "ascent steps K of the multi-step stage", low=1, group=_GRID)
  multistep_methods: tuple[str, ...] = setting(
    MULTISTEP_METHODS, "methods of the multi-step stage", choices=MULTISTEP_METHODS
  )
  multistep_radius: str = setting(
    "split",
    "K > 1 radius rule: split (K steps of rho/K, total rho: the XSAM code) or per_step (K steps of rho each)",
    choices=("split", "per_step"),
  )
  regimes: tuple[str, ...] = setting(("noise", "mlp"), "extra arms of the single-step protocol", choices=REGIMES)
  label_noise: float = setting(0.25, "symmetric label noise rate of the noise arm", low=0, high=1, high_open=True)
  small_train: int = setting(800, "training examples of the small arm", low=1, group=_DATA)
  stages: tuple[str, ...] = setting(
    STAGES,
    "optional stages (the single-step protocol and the test phase always run; none or '': the main arm alone)",
    choices=STAGES,
    words={"none": (), "": ()},
    group=_STAGES,
  )

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.multistep_seeds > self.test_seeds:
      raise config.ConfigError(
        "multistep_seeds", f"must be <= test_seeds ({self.test_seeds}), got {self.multistep_seeds}"
      )
    if self.warmup_epochs >= self.epochs:
      raise config.ConfigError("warmup_epochs", f"must be < epochs ({self.epochs}), got {self.warmup_epochs}")
    if self.test_seed_offset < self.tune_seeds:
      raise config.ConfigError("test_seed_offset", f"must be >= tune_seeds ({self.tune_seeds}): test seeds are fresh")

  @classmethod
  def quick(cls) -> ProtocolConfig:
    """Every stage but the 2-D sweep on a tiny scale (width 8, 1000 examples, 4 epochs, 2 seeds, no GSAM/WSAM): CI."""
    return cls(
      mode="quick",
      train_size=1000,
      width=8,
      epochs=4,
      tune_seeds=2,
      test_seeds=2,
      multistep_seeds=2,
      lrs=(0.1, 0.2),
      wds=(5e-4,),
      rhos=(0.05, 0.1),
      rho_max_factors=(1.0, 2.0),
      fixed_alphas=(0.5, 1.5),
      baselines=False,
      rho_factors=(0.5, 1.0),
      coarse_alphas=(0.5,),
      ks=(1, 2),
      multistep_methods=("sam", "xsam"),
      regimes=("noise",),
      stages=("rho", "multistep", "regimes"),  # the 2-D sweep has its own quick test (tests/test_toy2d.py)
    )


COMMAND = command_lib.Command(
  ProtocolConfig,
  prog="python -m experiments.protocol",
  description="The XSAM paper's tuning and evaluation protocol on MNIST-1D at CPU scale.",
  quick_help="every stage on a tiny scale, < 2 minutes",
  out=(os.path.join("results", "protocol"), os.path.join("results", "protocol", "quick")),
  extra={
    "--workdir": {"default": None, "help": "folder of the resumable run store [default: runs/protocol[/quick]]"},
    "--no-progress": {"action": "store_true", "help": "no progress bars"},
  },
)
"""``python -m experiments.protocol``'s command line: ``--quick``, a flag per field, ``--out``, ``--workdir``."""
