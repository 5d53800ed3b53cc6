"""Can a coarse alpha grid plus parabola refinement stand in for the paper's 21-point grid?

    python -m experiments.alpha_refine            # MNIST-1D main-job config, 3 seeds (~3 min on 2 CPU cores)
    python -m experiments.alpha_refine --quick    # tiny subset, 2 epochs, 1 seed (used by the tests)

Two measurements on real XSAM training runs (the main job's configuration,
``TrainConfig.default()``; alpha probed once per epoch):

1. Alpha error, offline. XSAM is trained with the paper's grid
   (0.0, 0.1, ..., 2.0); at every probe round the 21 probe losses are
   logged. For sub-grids of it (every 2nd, 4th and 5th point: 11, 6 and 5
   points) the alpha each rule would have picked from the *same* losses is
   compared with the 21-point choice: the plain grid maximum, and the
   maximum refined by ``xsam_jax``'s parabola rule (the library's own
   ``select_alpha``). Also the 21-point grid refined, against itself.
2. Final accuracy, online. XSAM trained end to end with the 21-point grid,
   the 5-point grid (0, 0.5, ..., 2) and the 5-point grid with
   ``alpha_refinement="parabola"`` (and the 21-point grid refined), same
   seeds.

Writes ``<output-dir>/alpha_refine.json`` and prints two Markdown tables.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import xsam_jax
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import setting
from experiments.train import study
from experiments.train.config import TrainConfig
from xsam_jax._src.xsam import select_alpha

GRID21 = tuple(xsam_jax.DEFAULT_ALPHAS)
SUBGRID_STRIDES = (2, 4, 5)
"""Sub-grids of the 21-point grid: every 2nd (11 points), 4th (6) and 5th (5) point."""

TRAINED = {
  "grid21": (None, None),
  "grid21+parabola": (None, "parabola"),
  "grid5": (GRID21[::5], None),
  "grid5+parabola": (GRID21[::5], "parabola"),
}
"""Variants trained end to end: name -> (alphas, alpha_refinement)."""


@dataclasses.dataclass(frozen=True)
class AlphaRefineConfig(config.StudyConfig):
  """The study's settings: the main job's training runs, some seeds."""

  seeds: int = setting(3, "seeds per trained variant", low=1)
  train: TrainConfig = setting(  # noqa: RUF009  (a frozen dataclass: immutable)
    TrainConfig.default(), "the training runs' configuration (method: xsam)", flag=None
  )

  @classmethod
  def quick(cls) -> AlphaRefineConfig:
    """The main job's quick configuration for 2 epochs (2 probe rounds), 1 seed."""
    return cls(seeds=1, train=TrainConfig.quick().replace(epochs=2))


def choose(losses: np.ndarray, grid: Sequence[float], refine: str | None) -> float:
  """The alpha ``xsam_jax`` picks from ``losses`` on ``grid`` (with its own rule)."""
  alpha, _ = select_alpha(jnp.asarray(losses, jnp.float32), jnp.asarray(grid, jnp.float32), 1.0, refine=refine)
  return float(alpha)


def alpha_errors(rounds: Sequence[Sequence[float]]) -> dict:
  """Errors of coarse / refined choices against the 21-point choice, over probe rounds.

  Args:
    rounds: the 21 probe losses of each probe round.

  Returns:
    Per rule: mean and max absolute error against the 21-point grid's alpha,
    and the fraction of rounds where it differs by more than half a step of
    the fine grid (0.05); plus the fraction of rounds whose 21-point maximum
    lies at an end of the grid (where no refinement can help).
  """
  losses = [np.asarray(r, np.float64) for r in rounds]
  ref = np.array([choose(r, GRID21, None) for r in losses])
  rules: dict[str, tuple[slice, str | None]] = {"grid21+parabola": (slice(None), "parabola")}
  for k in SUBGRID_STRIDES:
    n = len(GRID21[::k])
    rules[f"grid{n}"] = (slice(None, None, k), None)
    rules[f"grid{n}+parabola"] = (slice(None, None, k), "parabola")
  out: dict[str, Any] = {"rounds": len(losses), "at_grid_end": float(np.mean((ref == GRID21[0]) | (ref == GRID21[-1])))}
  for name, (sl, refine) in rules.items():
    got = np.array([choose(r[sl], GRID21[sl], refine) for r in losses])
    err = np.abs(got - ref)
    out[name] = {
      "mean_abs": float(err.mean()),
      "max_abs": float(err.max()),
      "frac_over_0.05": float(np.mean(err > 0.05 + 1e-6)),
    }
  return out


def run(c: AlphaRefineConfig, progress: bool) -> dict:
  """Trains every variant of :data:`TRAINED` (seeds ``0 .. c.seeds - 1``) and measures the alpha errors."""
  results = {}
  for name, (alphas, refine) in TRAINED.items():
    cfg = c.train.replace(alphas=alphas, alpha_refinement=refine)
    res = study.run_study(cfg, ["xsam"], range(c.seeds), workdir=None, progress=progress)["methods"]["xsam"]
    alpha_hist = [h["alpha"] for h in res["histories"]]
    results[name] = {
      "alphas": list(alphas or GRID21),
      "alpha_refinement": refine,
      "final_test_accuracy": res["final_test_accuracy"],
      "summary": res["summary"],
      "final_train_loss": [h["train_loss"][-1] for h in res["histories"]],
      "mean_alpha": float(np.mean(alpha_hist)),
      "train_time_s": res["train_time_s"],
    }
    if name == "grid21":
      rounds = [r for h in res["histories"] for r in h["probe_losses"]]
  return {"trained": results, "alpha_error": alpha_errors(rounds)}


def format_tables(report: dict) -> str:
  err = report["alpha_error"]
  lines = [
    (
      f"Alpha error against the 21-point grid's choice, {err['rounds']} probe rounds "
      f"({100 * err['at_grid_end']:.0f}% of them with the maximum at an end of the grid):"
    ),
    "",
    "| rule | mean abs error | max abs error | rounds off by > 0.05 |",
    "|---|---|---|---|",
  ]
  for name, v in err.items():
    if isinstance(v, dict):
      lines.append(f"| {name} | {v['mean_abs']:.3f} | {v['max_abs']:.3f} | {100 * v['frac_over_0.05']:.0f}% |")
  lines += [
    "",
    "| trained with | test accuracy (%) | per seed (%) | final train loss | mean alpha |",
    "|---|---|---|---|---|",
  ]
  for name, v in report["trained"].items():
    s = v["summary"]
    per = ", ".join(f"{100 * a:.1f}" for a in v["final_test_accuracy"])
    lines.append(
      f"| {name} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {per} | "
      f"{np.mean(v['final_train_loss']):.4f} | {v['mean_alpha']:.2f} |"
    )
  return "\n".join(lines)


COMMAND = command_lib.Command(
  AlphaRefineConfig,
  prog="python -m experiments.alpha_refine",
  description=__doc__.splitlines()[0],
  quick_help="tiny subset, 2 epochs, 1 seed",
  out=("results/alpha_refine", "runs/alpha_refine_quick"),
  out_flag="--output-dir",
  extra={"--no-progress": {"action": "store_true", "help": "hide progress bars"}},
)
"""The command line: ``--quick``, a flag per :class:`AlphaRefineConfig` field, ``--output-dir``, ``--no-progress``."""


def main(argv: Sequence[str] | None = None) -> int:
  c, args, command = COMMAND.parse(argv)
  out_dir = Path(args.output_dir)
  t0 = time.perf_counter()
  report = run(c, progress=not args.no_progress)
  report.update(
    date=datetime.date.today().isoformat(),
    command=command,
    machine=f"{platform.machine()}, {jax.default_backend()}, {jax.device_count()} device(s)",
    seeds=list(range(c.seeds)),
    wall_time_s=time.perf_counter() - t0,
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "alpha_refine.json").write_text(json.dumps(report, indent=1))
  print(format_tables(report))
  print(f"\nwall time {report['wall_time_s']:.0f} s; wrote {out_dir / 'alpha_refine.json'}")
  return 0
