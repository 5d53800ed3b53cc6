"""The main job: ``python -m experiments.train`` (= ``python3 tasks.py run``).

Trains NNX classifiers with several methods times several seeds and writes
the summary table, JSON and plots. The path of a configuration:

1. :mod:`~experiments.train.cli`: flags -> :class:`~experiments.train.config.TrainConfig`,
   every check of :func:`~experiments.train.checks.check_study` before any data is loaded;
2. :mod:`~experiments.train.study`: the data, then one run per (method, seed);
3. :mod:`~experiments.train.trainer`: the NNX step, run by the engine's epoch loop
   (:mod:`experiments.core.engine`) with checkpoints;
4. :mod:`~experiments.train.report`: the table, JSON and plots.
"""

from experiments.train.cli import (
  DEFAULT_METHODS,
  MAX_SEEDS,
  build_parser,
  check_folder,
  check_study,
  config_from_args,
  main,
  method_names,
  parse_args,
  seeds_from_args,
)

__all__ = [
  "DEFAULT_METHODS",
  "MAX_SEEDS",
  "build_parser",
  "check_folder",
  "check_study",
  "config_from_args",
  "main",
  "method_names",
  "parse_args",
  "seeds_from_args",
]
