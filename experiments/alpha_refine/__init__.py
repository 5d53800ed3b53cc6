"""``python -m experiments.alpha_refine``: can a coarse alpha grid stand in for the paper's 21 points?

See :mod:`experiments.alpha_refine.refine`.
"""

from experiments.alpha_refine.refine import (
  COMMAND,
  SUBGRID_STRIDES,
  TRAINED,
  AlphaRefineConfig,
  alpha_errors,
  choose,
  format_tables,
  main,
  run,
)

__all__ = [
  "COMMAND",
  "SUBGRID_STRIDES",
  "TRAINED",
  "AlphaRefineConfig",
  "alpha_errors",
  "choose",
  "format_tables",
  "main",
  "run",
]
