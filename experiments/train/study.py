"""A comparison study: several methods times several seeds, one data set.

Runs :func:`experiments.train.trainer.train_and_evaluate` for every (method, seed)
pair on one shared in-memory data set and collects the histories; the
report (table, JSON, plots) is written by ``experiments.train.report``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.core import data as data_lib
from experiments.train import checks, trainer
from experiments.train.config import TrainConfig


def summarize(values: Sequence[float]) -> dict:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  arr = np.asarray(values, np.float64)
  std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
  return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


class Plan(NamedTuple):
  """A checked study: made only by :func:`plan`, which runs every check of the configuration once."""

  base: TrainConfig
  method_names: tuple[str, ...]
  seeds: tuple[int, ...]


def plan(base: TrainConfig, method_names: Sequence[str], seeds: Sequence[int]) -> Plan:
  """Checks the study (:func:`experiments.train.checks.check_study`, before any data is loaded) and returns it.

  Raises:
    experiments.core.config.ConfigError: as :func:`run_study`.
  """
  checks.check_study(base, method_names)
  return Plan(base, tuple(method_names), tuple(seeds))


def run_study(
  base: TrainConfig | Plan,
  method_names: Sequence[str] = (),
  seeds: Sequence[int] = (),
  *,
  workdir: str | None,
  resume: bool = True,
  progress: bool = True,
  download: bool = False,
) -> dict:
  """Trains every method with every seed and gathers the results.

  Args:
    base: the configuration shared by all runs (``method`` and ``seed`` are
      overridden per run), or a :class:`Plan` already checked (then
      ``method_names`` and ``seeds`` come from it); ``base.devices > 1`` trains every run data
      parallel (see ``experiments.train.trainer``).
    method_names: names understood by ``experiments.core.methods``.
    seeds: the seeds; each run's initialisation and data order.
    workdir: checkpoint folder (None: no checkpoints).
    resume: continue runs found in ``workdir``; False starts them afresh.
    progress: show progress bars.
    download: let tensorflow-datasets download and prepare a missing data
      set (needs TensorFlow).

  Returns:
    ``{"methods": {name: {...}}, "wall_time_s": ..., "completed": bool}``;
    per method: the resolved ``config`` (of its first seed), ``seeds``,
    ``final_test_accuracy`` per seed with its ``summary`` (mean, std),
    ``train_time_s`` per seed and the per-seed ``histories``. The device
    count is recorded in every ``config`` (``devices``).

  Raises:
    experiments.core.checkpoint.CheckpointError: a run's checkpoint folder in
      ``workdir`` is damaged (with ``resume``), found before any run trains.
    experiments.core.config.ConfigError: (a ``ValueError``) for anything
      :func:`experiments.train.checks.check_study` rejects: an unknown or repeated
      method, hyperparameters a method's constructor rejects, a data set,
      model, batch size or ``base.devices`` the study cannot take (before any
      data is loaded).
  """
  checked = base if isinstance(base, Plan) else plan(base, method_names, seeds)
  base, method_names, seeds = checked
  start = time.perf_counter()
  data = data_lib.load_dataset(base.dataset, base.data_dir, download=download)
  if workdir is not None and resume:  # every run's checkpoint is readable, before any run trains
    for name in method_names:
      for seed in seeds:
        trainer.check_checkpoint(base.replace(method=name, seed=seed), workdir, data=data)
  results, completed = {}, True
  for name in method_names:
    entry: dict[str, Any] = {"seeds": [], "final_test_accuracy": [], "train_time_s": [], "histories": []}
    for seed in seeds:
      result = trainer.train_and_evaluate(
        base.replace(method=name, seed=seed), workdir, data=data, progress=progress, resume=resume
      )
      completed &= result.completed
      entry.setdefault("config", result.config.to_dict())
      entry["seeds"].append(seed)
      entry["final_test_accuracy"].append(result.history["test_accuracy"][-1])
      entry["train_time_s"].append(result.history["time_s"][-1])
      entry["histories"].append(result.history)
    entry["summary"] = summarize(entry["final_test_accuracy"])
    results[name] = entry
  return {"methods": results, "wall_time_s": time.perf_counter() - start, "completed": completed}
