"""The 2-D study under the paper's base optimizer: momentum x XSAM's alpha update period (issue 19, item 6).

The main sweep (:func:`~experiments.toy2d.analysis.run_study`) runs every
method on plain ``optax.sgd(lr)``. The paper's base optimizer is SGD with
momentum 0.9, and XSAM re-estimates alpha every ``alpha_update_period``
steps. :func:`axes_sweep` runs SGD, SAM and XSAM on each of the config's
``axes_settings`` (rho, rho_max, lr) for every ``momenta`` x ``periods``
cell (the period only for XSAM: SGD and SAM have no alpha), from the main
sweep's start grid (by default every other point per axis: 16 x 16 of its
31 x 31) for as many steps, and counts the starts that end at the flat
minimum. Momentum 0 runs through ``optax.sgd``'s trace with decay 0: the
same steps as plain ``optax.sgd(lr)`` (:func:`main_sweep_check`).

All cells of one (method, K) run in one jitted call (``run_grid``: ``jax.vmap``
over cells and start points around a ``jax.lax.scan``), as in the main sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.toy2d.config import Setting, Toy2dConfig
from experiments.toy2d.dynamics import method_list, run_grid, settle, start_grid

METRICS = (
  ("escape_from_sharp", "Sharp-basin starts that end at the flat minimum"),
  ("flat", "All starts that end at the flat minimum"),
  ("neither", "All starts that end at neither minimum (stalled or bouncing)"),
)
"""The axes sweep's per-cell fractions (key, title of its markdown table)."""


def _base_name(setting: Setting) -> str:
  """The setting's name without its period (the period is an axis here)."""
  return setting._replace(period=1).name


def _column(label: str, period: int | None) -> str:
  return label if period is None else f"{label} period={period}"


def axes_columns(ks: Sequence[int], periods: Sequence[int]) -> list[tuple[str, int | None]]:
  """The sweep's columns ``(method label, period)``: SGD and SAM K once (period None), XSAM K once per period."""
  cols: list[tuple[str, int | None]] = []
  for label, method, _ in method_list(ks):
    cols += [(label, p) for p in periods] if method == "xsam" else [(label, None)]
  return cols


def axes_markdown(cells: list[dict[str, Any]], config: Toy2dConfig) -> str:
  """Markdown tables of the sweep's fractions: a row per (setting, momentum), a column per method (and period)."""
  cols = axes_columns(config.axes_ks, config.periods)
  table = {(c["label"], c["period"], c["setting"], c["momentum"]): c for c in cells}
  names = list(dict.fromkeys(_base_name(s) for s in config.axes_settings))
  out = []
  for key, title in METRICS:
    out += [
      f"{title}, by momentum and XSAM's alpha update period (SGD and SAM have no alpha):",
      "",
      "| setting | momentum | " + " | ".join(_column(lab, p) for lab, p in cols) + " |",
      "|---" * (len(cols) + 2) + "|",
    ]
    for n in names:
      for m in config.momenta:
        row = [f"{table[(lab, p, n, m)][key]:.2f}" for lab, p in cols]
        out.append(f"| {n} | {m:g} | " + " | ".join(row) + " |")
    out.append("")
  return "\n".join(out)


def axes_start_indices(config: Toy2dConfig) -> np.ndarray:
  """Indices into :func:`start_grid` of the axes sweep's starts: every ``axes_stride``-th point per axis."""
  n = config.starts_per_axis
  keep = np.arange(0, n, config.axes_stride)
  return (keep[:, None] * n + keep[None, :]).ravel()  # s-major, mu fastest, like start_grid


def axes_sweep(config: Toy2dConfig, log: Callable[[str], object] = print) -> dict[str, Any]:
  """Runs the momentum x alpha-update-period sweep of ``config``; returns a JSON-serialisable dict.

  SGD, SAM K and XSAM K (K in ``config.axes_ks``) run from ``config``'s start
  grid (every ``config.axes_stride``-th point per axis) for ``config.steps``
  steps on ``methods.chain(method, optax.sgd(lr, momentum))``, at each of
  ``config.axes_settings`` (rho, rho_max, lr) and momentum in
  ``config.momenta``; XSAM also at each alpha update period in
  ``config.periods`` (SGD and SAM read no period).

  Args:
    config: the study's config (``Toy2dConfig.quick()`` runs in seconds).
    log: where progress lines go.

  Returns:
    dict with ``protocol`` (what was run), ``momenta``, ``periods``, ``ks``,
    ``settings`` (names), ``n_starts``, ``n_sharp_basin_starts``,
    ``n_flat_basin_starts``, ``cells`` (one per method x K x setting x
    momentum x period: ``label``, ``method``, ``num_steps``, ``setting``,
    ``rho``, ``rho_max``, ``lr``, ``momentum``, ``period`` (None for SGD and
    SAM), and the fractions ``escape_from_sharp`` (of the sharp-basin
    starts), ``stay_in_flat`` (of the flat-basin starts), ``flat``,
    ``neither`` and ``non_finite`` (of all starts)), ``markdown`` (the
    tables of :func:`axes_markdown`) and ``wall_time_s``.
  """
  t0 = time.perf_counter()
  x0s = jnp.asarray(start_grid(config)[axes_start_indices(config)])
  start_labels = np.asarray(jax.jit(jax.vmap(settle))(x0s))
  in_sharp, in_flat = start_labels == 1, start_labels == 0
  cells: list[dict[str, Any]] = []
  for label, method, k in method_list(config.axes_ks):
    periods: tuple[int | None, ...] = config.periods if method == "xsam" else (None,)
    grid = [(s, m, p) for s in config.axes_settings for m in config.momenta for p in periods]
    t1 = time.perf_counter()
    out = run_grid(
      x0s,
      jnp.asarray([s.rho for s, _, _ in grid], jnp.float32),
      jnp.asarray([s.rho_max for s, _, _ in grid], jnp.float32),
      jnp.asarray([s.lr for s, _, _ in grid], jnp.float32),
      jnp.asarray([1 if p is None else p for _, _, p in grid], jnp.int32),
      jnp.asarray([m for _, m, _ in grid], jnp.float32),
      method=method,
      num_steps=k,
      steps=config.steps,
    )
    labels = np.asarray(out["outcome"])
    log(f"[toy2d axes] {label:10s} {len(grid)} cells {time.perf_counter() - t1:6.1f} s")
    for (s, m, p), lab in zip(grid, labels, strict=True):
      cells.append(
        {
          "label": label,
          "method": label.split()[0],
          "num_steps": k,
          "setting": _base_name(s),
          "rho": s.rho,
          "rho_max": s.rho_max,
          "lr": s.lr,
          "momentum": m,
          "period": p,
          "escape_from_sharp": round(float(np.mean(lab[in_sharp] == 0)), 4),
          "stay_in_flat": round(float(np.mean(lab[in_flat] == 0)), 4),
          "flat": round(float(np.mean(lab == 0)), 4),
          "neither": round(float(np.mean((lab == 2) | (lab == 3))), 4),
          "non_finite": round(float(np.mean(lab == 4)), 4),
        }
      )
  return {
    "protocol": {
      "base_optimizer": (
        "optax.sgd(lr, momentum): v <- momentum v + u, x <- x - lr v, u the method's output "
        "(heavy ball, no dampening, no Nesterov; the paper's SGD at momentum 0.9); full-batch gradients"
      ),
      "period": "XSAM probes alpha (21-point grid on [0, 2], alpha_init=1) when step % period == 0, step 0 included",
      "outcomes": "as the main sweep: the mean of the last 10% of the iterates within NEAR_RADIUS of a minimum",
      "start_grid": f"every {config.axes_stride}-th point per axis of the main sweep's start grid",
      "optimizer_steps": config.steps,
    },
    "momenta": list(config.momenta),
    "periods": list(config.periods),
    "ks": list(config.axes_ks),
    "settings": [_base_name(s) for s in config.axes_settings],
    "n_starts": len(x0s),
    "n_sharp_basin_starts": int(np.sum(in_sharp)),
    "n_flat_basin_starts": int(np.sum(in_flat)),
    "cells": cells,
    "markdown": axes_markdown(cells, config),
    "wall_time_s": round(time.perf_counter() - t0, 1),
  }


def main_sweep_check(axes: dict[str, Any], study: dict[str, Any], config: Toy2dConfig) -> dict[str, Any]:
  """Compares the axes sweep's momentum-0 cells with the main sweep's same (method, K, setting, period).

  Momentum 0 through ``optax.sgd``'s trace takes the same steps as plain
  ``optax.sgd(lr)``, so on the axes sweep's starts the main sweep's runs
  (``study``: :func:`~experiments.toy2d.analysis.run_study`'s) end the same.

  Returns:
    ``{"cells_compared": n, "max_abs_diff": d}``, d over the fractions
    ``flat``, ``escape_from_sharp`` and ``neither`` (None if nothing was compared).
  """
  index = {s.name: i for i, s in enumerate(config.settings)}
  sub = axes_start_indices(config)
  start = study["start_labels"][sub]
  diffs = []
  for c in axes["cells"]:
    name = Setting(c["rho"], c["rho_max"], c["lr"], 1 if c["period"] is None else c["period"]).name
    if c["momentum"] != 0.0 or name not in index or (c["label"], index[name]) not in study["labels_by"]:
      continue
    lab = study["labels_by"][(c["label"], index[name])][sub]
    main = {
      "flat": np.mean(lab == 0),
      "escape_from_sharp": np.mean(lab[start == 1] == 0),
      "neither": np.mean((lab == 2) | (lab == 3)),
    }
    diffs += [abs(c[key] - round(float(v), 4)) for key, v in main.items()]
  return {"cells_compared": len(diffs) // 3, "max_abs_diff": round(max(diffs), 4) if diffs else None}
