"""A comparison study: several methods times several seeds, one data set.

Runs :func:`experiments.trainer.train_and_evaluate` for every (method, seed)
pair on one shared in-memory data set and collects the histories; the
report (table, JSON, plots) is written by ``experiments.report``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import checks, trainer
from experiments import data as data_lib
from experiments.configs import TrainConfig


def summarize(values: Sequence[float]) -> dict:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  arr = np.asarray(values, np.float64)
  std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
  return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def run_study(
  base: TrainConfig,
  method_names: Sequence[str],
  seeds: Sequence[int],
  *,
  workdir: str | None,
  resume: bool = True,
  progress: bool = True,
  download: bool = False,
) -> dict:
  """Trains every method with every seed and gathers the results.

  Args:
    base: the configuration shared by all runs (``method`` and ``seed`` are
      overridden per run); ``base.devices > 1`` trains every run data
      parallel (see ``experiments.trainer``).
    method_names: names understood by ``experiments.methods``.
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
    experiments.checkpoint.CheckpointError: a run's checkpoint folder in
      ``workdir`` is damaged (with ``resume``), found before any run trains.
    experiments.config.ConfigError: (a ``ValueError``) for anything
      :func:`experiments.checks.check_study` rejects: an unknown or repeated
      method, hyperparameters a method's constructor rejects, a data set,
      model, batch size or ``base.devices`` the study cannot take (before any
      data is loaded).
  """
  checks.check_study(base, method_names)
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
