"""The language-model study's stages: tune on validation, then fresh test seeds with paired intervals.

1. AdamW's peak learning rate: the lowest mean validation loss over ``tune_seeds`` seeds per value.
2. At that learning rate, each method's own hyperparameter, the same way: the radius of SAM,
   Functional SAM, preconditioned SAM, their combination and Momentum-SAM, RWP's noise scale.
3. XSAM at SAM's selected radius: its ``rho_max / rho``; the fixed-alpha baseline (XSAM's
   direction with alpha fixed, no probes; alpha 1 is SAM) at SAM's radius: its alpha.
4. Test: every method at its selection with ``test_seeds`` fresh seeds (the same seeds for every
   method, so differences pair by seed), the test loss at the end; AdamW also with twice the
   steps (the same number of gradient evaluations as a two-gradient method: equal compute).

Every difference is ``method - AdamW`` in test loss (nats per character; bits per character are
``/ ln 2``), paired over the seeds, with a 95% Student-t interval (``experiments.core.stats``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import xsam_jax
from experiments.core import stats, text
from experiments.lm import runs
from experiments.lm.config import LMConfig

TUNED = {
  "sam": "rho",
  "functional_sam": "rho",
  "preconditioned_sam": "rho",
  "functional_preconditioned": "rho",
  "momentum_sam": "rho",
  "rwp": "gamma",
}
"""The methods tuned in stage 2 and their hyperparameter."""

TEST_SEED_OFFSET = 1000
"""Test seeds are ``TEST_SEED_OFFSET + i``: none is a tuning seed."""


def _grid(c: LMConfig, method: str) -> tuple[float, ...]:
  return {"momentum_sam": c.momentum_rhos, "rwp": c.rwp_gammas}.get(method, c.rhos)


def _score(runs_of_point: Sequence[dict[str, Any]]) -> float:
  """Mean validation loss over a grid point's seeds; a diverged run (non-finite loss) makes it +inf."""
  values = [r["val_loss"] for r in runs_of_point]
  return float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.inf


def tune(
  method: str, points: Sequence[dict[str, float]], c: LMConfig, corpus: text.TextCorpus, log: Callable[[str], None]
) -> dict[str, Any]:
  """Trains every point of ``points`` with the tuning seeds (one vmapped call); picks the lowest mean validation loss.

  Returns:
    ``{"points": [{"hp", "val_loss" (mean), "val_losses" (per seed)}], "best": hp}``.
  """
  seeds = list(range(c.tune_seeds))
  t0 = time.perf_counter()
  trained = runs.train_runs(method, [p for p in points for _ in seeds], [s for _ in points for s in seeds], c, corpus)
  rows: list[dict[str, Any]] = []
  for i, point in enumerate(points):
    mine = trained[i * len(seeds) : (i + 1) * len(seeds)]
    rows.append({"hp": point, "val_loss": _score(mine), "val_losses": [r["val_loss"] for r in mine]})
  best = min(rows, key=lambda r: r["val_loss"])
  log(f"[lm] tune {method}: {len(trained)} runs, {time.perf_counter() - t0:.0f} s, best {best['hp']}")
  return {"points": rows, "best": best["hp"]}


def _test(
  method: str, hp: dict[str, float], c: LMConfig, corpus: text.TextCorpus, steps: int | None = None
) -> list[dict[str, Any]]:
  seeds = [TEST_SEED_OFFSET + i for i in range(c.test_seeds)]
  return runs.train_runs(method, [hp] * len(seeds), seeds, c, corpus, steps=steps, test=True)


def _curves(trained: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
  """Per-interval training and validation loss, mean over the seeds."""
  return {
    "train_loss": np.mean([r["epoch_loss"] for r in trained], axis=0).tolist(),
    "val_loss": np.mean([r["epoch_val_loss"] for r in trained], axis=0).tolist(),
  }


def alpha_summary(trained: Sequence[dict[str, Any]], top: float = max(xsam_jax.DEFAULT_ALPHAS)) -> dict[str, Any]:
  """XSAM's alpha over training (one probe round per interval): mean, share at the grid's top, per-interval mean."""
  alphas = np.asarray([r["epoch_alpha"] for r in trained], np.float64)
  return {
    "mean": float(alphas.mean()),
    "share_at_top": float(np.mean(np.isclose(alphas, top))),
    "per_interval": alphas.mean(axis=0).tolist(),
  }


def run(c: LMConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every stage; returns the study's document (``experiments.lm.report`` writes it).

  Returns:
    ``{"config", "corpus", "tuning", "selected", "test", "comparisons", "alpha", "curves", "wall_time_s"}``.
  """
  start = time.perf_counter()
  corpus = text.load_pydoc_text()
  log(
    f"[lm] {corpus.source}: {len(corpus.train)} / {len(corpus.val)} / {len(corpus.test)} characters, "
    f"vocabulary {len(corpus.vocab)}"
  )
  tuning: dict[str, Any] = {"adamw": tune("adamw", [{"lr": lr} for lr in c.lrs], c, corpus, log)}
  lr = tuning["adamw"]["best"]["lr"]
  for method, name in TUNED.items():
    tuning[method] = tune(method, [{"lr": lr, name: v} for v in _grid(c, method)], c, corpus, log)
  rho = tuning["sam"]["best"]["rho"]
  xsam_points = [{"lr": lr, "rho": rho, "rho_max": f * rho} for f in c.rho_max_factors]
  tuning["xsam"] = tune("xsam", xsam_points, c, corpus, log)
  tuning["xsam_fixed"] = tune(
    "xsam_fixed", [{"lr": lr, "rho": rho, "alpha": a} for a in c.fixed_alphas], c, corpus, log
  )
  selected = {m: tuning[m]["best"] for m in runs.READS}

  test: dict[str, list[dict[str, Any]]] = {}
  for method, hp in selected.items():
    t0 = time.perf_counter()
    test[method] = _test(method, hp, c, corpus)
    log(f"[lm] test {method}: {c.test_seeds} seeds, {time.perf_counter() - t0:.0f} s")
  test["adamw_2x"] = _test("adamw", selected["adamw"], c, corpus, steps=2 * c.steps)
  log(f"[lm] test adamw with {2 * c.steps} steps (equal compute)")

  losses = {m: [r["test_loss"] for r in trained] for m, trained in test.items()}
  comparisons = {}
  for method in runs.READS:
    if method == "adamw":
      continue
    entry = {"equal_steps": stats.paired(losses[method], losses["adamw"])}
    if runs.GRADIENTS_PER_STEP[method] == 2:
      entry["equal_compute"] = stats.paired(losses[method], losses["adamw_2x"])
    comparisons[method] = entry
  comparisons["adamw_2x"] = {"equal_steps": stats.paired(losses["adamw_2x"], losses["adamw"])}
  return {
    "config": dataclasses.asdict(c),
    "corpus": {"source": corpus.source, "characters": [len(corpus.train), len(corpus.val), len(corpus.test)]},
    "tuning": tuning,
    "selected": selected,
    "test": {m: {"test_loss": v, **stats.summary(v)} for m, v in losses.items()},
    "comparisons": comparisons,
    "alpha": alpha_summary(test["xsam"]),
    "curves": {m: _curves(trained) for m, trained in test.items()},
    "wall_time_s": time.perf_counter() - start,
  }
