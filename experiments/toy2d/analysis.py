"""The 2-D study's measurements: outcome fractions per method and setting, direction errors, the outputs."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.toy2d import plots
from experiments.toy2d.axes import axes_sweep, main_sweep_check
from experiments.toy2d.config import Toy2dConfig
from experiments.toy2d.dynamics import (
  NEAR_RADIUS,
  OUTCOMES,
  SETTLE_LR,
  SETTLE_RADIUS,
  SETTLE_STEPS,
  direction_errors,
  method_list,
  run_grid,
  run_paths,
  settle,
  start_grid,
)
from xsam_jax import testfns


def _fractions(labels: np.ndarray, names: Sequence[str] = OUTCOMES) -> dict[str, float]:
  n = labels.size
  return {name: round(float(np.sum(labels == i)) / n, 4) for i, name in enumerate(names)}


def run_study(config: Toy2dConfig, log: Callable[[str], object] = print) -> dict[str, Any]:
  """Runs every method on every setting; returns the JSON-ready results."""
  x0s = start_grid(config)
  settings = config.settings
  arrays = [
    jnp.asarray([getattr(s, f) for s in settings], dt)
    for f, dt in (("rho", jnp.float32), ("rho_max", jnp.float32), ("lr", jnp.float32), ("period", jnp.int32))
  ]
  start_labels = np.asarray(jax.jit(jax.vmap(settle))(jnp.asarray(x0s)))
  in_sharp, in_flat = start_labels == 1, start_labels == 0
  log(
    f"[toy2d] {len(x0s)} start points: {in_flat.mean():.3f} in the flat basin, {in_sharp.mean():.3f} in the sharp basin"
  )

  results, labels_by = [], {}
  floor = testfns.DEFAULT_S_FLOOR
  for label, method, k in method_list(config.ks):
    t0 = time.perf_counter()
    out = run_grid(jnp.asarray(x0s), *arrays, method=method, num_steps=k, steps=config.steps)
    out = {key: np.asarray(v) for key, v in out.items()}
    labels, x_end, min_s = out["outcome"], out["x_end"], out["min_s"]
    log(f"[toy2d] {label:10s} {time.perf_counter() - t0:6.1f} s")
    for i, setting in enumerate(settings):
      lab = labels[i]
      labels_by[(label, i)] = lab
      row = {
        "method": label.split()[0],
        "num_steps": k,
        "label": label,
        "setting": setting.name,
        **setting._asdict(),
        "n_runs": int(lab.size),
        "fractions": _fractions(lab),
        "escape_from_sharp": round(float(np.mean(lab[in_sharp] == 0)), 4),
        "stay_in_flat": round(float(np.mean(lab[in_flat] == 0)), 4),
        "neither": round(float(np.mean((lab == 2) | (lab == 3))), 4),
        # Weaker criterion: the end point lies in the flat minimum's GD basin
        # (reached it, or stuck / bouncing on its side of the ridge).
        "sharp_starts_ending_in_flat_basin": round(float(np.mean((lab[in_sharp] == 0) | (lab[in_sharp] == 2))), 4),
        "median_end_loss": round(float(np.median(out["loss_end"][i])), 6),
        # Runs still oscillating / bouncing at the end (RMS spread of the last
        # 10% of the iterates), and runs that the last iterate alone would
        # put in another category than the mean of the last 10%.
        "frac_end_spread_over_1": round(float(np.mean(out["spread"][i] > 1.0)), 4),
        "frac_final_iterate_outcome_differs": round(float(np.mean(out["outcome_final_iterate"][i] != lab)), 4),
        # Domain check: the ascent point lies within rho of the iterate, the
        # probes within rho_max; below s_floor the function is the documented
        # linear continuation, not the published one.
        "frac_iterate_below_s_floor": round(float(np.mean(min_s[i] < floor)), 4),
        "frac_ascent_may_cross_s_floor": round(
          float(np.mean(min_s[i] - (0.0 if method == "sgd" else setting.rho) < floor)), 4
        ),
      }
      neither = (lab == 2) | (lab == 3)
      if np.any(neither):
        pts = np.round(x_end[i][neither]).astype(int)
        uniq, counts = np.unique(pts, axis=0, return_counts=True)
        row["neither_median_dist_to_saddle"] = round(
          float(np.median(np.linalg.norm(x_end[i][neither] - np.asarray(testfns.SADDLE_POINT.location), axis=-1))), 3
        )
        row["neither_most_common_end_point"] = [int(v) for v in uniq[np.argmax(counts)]]
        row["neither_most_common_end_point_count"] = int(np.max(counts))
        row["neither_frac_spread_over_1"] = round(float(np.mean(out["spread"][i][neither] > 1.0)), 4)
      if method == "xsam":
        row["mean_final_alpha"] = round(float(np.mean(out["alpha"][i])), 4)
        row["frac_probes_may_cross_s_floor"] = round(float(np.mean(min_s[i] - setting.rho_max < floor)), 4)
      results.append(row)

  paired = []
  for i, setting in enumerate(settings):
    for k in config.ks:
      sam_lab, xsam_lab = labels_by[(f"SAM K={k}", i)], labels_by[(f"XSAM K={k}", i)]
      paired.append(
        {
          "setting": setting.name,
          "num_steps": k,
          "n_starts": int(sam_lab.size),
          "xsam_flat_sam_not": int(np.sum((xsam_lab == 0) & (sam_lab != 0))),
          "sam_flat_xsam_not": int(np.sum((sam_lab == 0) & (xsam_lab != 0))),
          "xsam_flat_sam_sharp_sgd_sharp": int(np.sum((xsam_lab == 0) & (sam_lab == 1) & (labels_by[("SGD", i)] == 1))),
        }
      )

  directions = []
  for rho in config.direction_rhos:
    for k in config.ks:
      errs = {key: np.asarray(v) for key, v in direction_errors(jnp.asarray(x0s), rho, 2.0 * rho, num_steps=k).items()}
      directions.append(
        {
          "rho": rho,
          "rho_max": 2.0 * rho,
          "num_steps": k,
          "mean_xsam_alpha": round(float(np.mean(errs.pop("alpha"))), 4),
          **{f"mean_angle_{key}": round(float(np.mean(v)), 3) for key, v in sorted(errs.items())},
        }
      )

  return {
    "start_labels": start_labels,
    "labels_by": labels_by,
    "x0s": x0s,
    "results": results,
    "paired": paired,
    "directions": directions,
  }


def headline_paths(config: Toy2dConfig, ks: Sequence[int]) -> dict:
  """``{setting name: {method label: (num_starts, steps + 1, 2) paths}}`` from
  the fixed trajectory starts at each headline setting."""
  starts = jnp.asarray(config.trajectory_starts, jnp.float32)
  paths: dict[str, dict[str, np.ndarray]] = {}
  for s in config.headlines:
    paths[s.name] = {}
    for label, method, k in method_list(ks):
      paths[s.name][label] = np.asarray(
        run_paths(starts, s.rho, s.rho_max, s.lr, s.period, method=method, num_steps=k, steps=config.steps)
      )
  return paths


def markdown_tables(results: list[dict[str, Any]], ks: Sequence[int]) -> str:
  """Markdown tables of the headline numbers per method and setting."""
  labels = [lab for lab, _, _ in method_list(ks)]
  names = list(dict.fromkeys(r["setting"] for r in results))
  table = {(r["label"], r["setting"]): r for r in results}
  out = []
  for key, title in (
    ("escape_from_sharp", "Sharp-basin starts that end at the flat minimum"),
    ("flat", "All starts that end at the flat minimum"),
    ("neither", "All starts that end at neither minimum (stalled or bouncing)"),
  ):
    out += [f"{title}:", "", "| setting | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for n in names:
      cells = []
      for lab in labels:
        r = table[(lab, n)]
        cells.append(f"{(r['fractions']['flat'] if key == 'flat' else r[key]):.2f}")
      out.append(f"| {n} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def run(config: Toy2dConfig, out: str, command: str = "python -m experiments.toy2d") -> dict[str, Any]:
  """Runs the study, writes its JSON, tables and PNGs into the folder ``out``; returns the JSON dict.

  Args:
    config: the study (``Toy2dConfig.default()`` or ``.quick()``, or changed).
    out: the output folder (made if missing).
    command: the command line recorded in the outputs.
  """
  os.makedirs(out, exist_ok=True)

  t0 = time.perf_counter()
  study = run_study(config)
  axes = axes_sweep(config)
  axes_wall = axes.pop("wall_time_s")
  axes["main_sweep_check"] = main_sweep_check(axes, study, config)
  paths = headline_paths(config, (config.ks[0], config.ks[-1]))
  payload = {
    "study": "toy2d: XSAM paper Sec. 5.1 / Fig. 3a on the Fisher-SAM test function",
    "mode": config.mode,
    "command": command,
    "function": {
      "name": "xsam_jax.testfns.fisher_sam_toy",
      "flat_minimum": testfns.FLAT_MINIMUM._asdict(),
      "sharp_minimum": testfns.SHARP_MINIMUM._asdict(),
      "saddle": testfns.SADDLE_POINT._asdict(),
    },
    "protocol": {
      "start_grid": {
        "mu": list(config.mu_range),
        "s": list(config.s_range),
        "per_axis": config.starts_per_axis,
        "n": len(study["x0s"]),
      },
      "optimizer_steps": config.steps,
      "base_optimizer": (
        "optax.sgd(lr), no momentum; full-batch (deterministic) gradients (`axes`: with momentum, "
        "by alpha update period)"
      ),
      "xsam": "default 21-point alpha grid on [0, 2], alpha_init=1; probes every `period` steps",
      "end_state": "mean of the last 10% of the iterates (centre of any final oscillation)",
      "outcomes": (
        f"'flat'/'sharp': end state within {NEAR_RADIUS:g} of that minimum; "
        "'neither_*_basin': elsewhere (stalled at the saddle or where the "
        "update vanishes, or bouncing), split by the plain-GD basin of the end state "
        f"(GD lr={SETTLE_LR:g}, {SETTLE_STEPS} steps, within {SETTLE_RADIUS:g} of a "
        "minimum); 'other': non-finite"
      ),
      "start_basins": "plain-GD basin of each start point (same GD as above)",
      "escape_from_sharp": ("fraction of sharp-basin starts whose end state is near the flat minimum"),
      "stay_in_flat": "fraction of flat-basin starts whose end state is near the flat minimum",
      "sharp_starts_ending_in_flat_basin": (
        "fraction of sharp-basin starts ending near the flat minimum or elsewhere in its basin"
      ),
      "direction_errors": (
        "angle (deg) between each method's update direction at a start "
        "point and the argmax of f on the circle of radius rho / rho_max "
        "around it (720 angles), mean over the start grid"
      ),
    },
    "start_fractions": _fractions(study["start_labels"], ("flat", "sharp", "other")),
    "settings": [dict(s._asdict(), name=s.name) for s in config.settings],
    "results": study["results"],
    "paired": study["paired"],
    "direction_errors": study["directions"],
    "axes": axes,
    "trajectories": {
      "starts": [list(x) for x in config.trajectory_starts],
      "final_points": {
        name: {lab: np.round(p[:, -1, :].astype(np.float64), 3).tolist() for lab, p in by_label.items()}
        for name, by_label in paths.items()
      },
    },
    "versions": {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "xsam_jax": xsam_jax.__version__,
      "python": platform.python_version(),
    },
  }
  with open(os.path.join(out, "toy2d.json"), "w") as fh:
    json.dump(payload, fh, indent=1, sort_keys=False)
  plots.plot_trajectories(config, paths, os.path.join(out, "toy2d_trajectories.png"))
  plots.plot_fractions(config, study["results"], os.path.join(out, "toy2d_fractions.png"))
  plots.plot_outcomes(config, study, os.path.join(out, "toy2d_outcomes.png"))
  plots.plot_directions(config, os.path.join(out, "toy2d_directions.png"))
  plots.plot_axes(config, axes, os.path.join(out, "toy2d_axes.png"))
  wall = time.perf_counter() - t0
  with open(os.path.join(out, "toy2d_timing.json"), "w") as fh:
    json.dump(
      {
        "command": payload["command"],
        "wall_time_s": round(wall, 1),
        "axes_sweep_wall_time_s": axes_wall,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
      },
      fh,
      indent=1,
    )
  tables = markdown_tables(study["results"], config.ks) + "\n" + axes["markdown"]
  with open(os.path.join(out, "toy2d_tables.md"), "w") as fh:
    fh.write(f"<!-- written by `{payload['command']}` -->\n\n{tables}")
  print(tables)
  print(f"[toy2d] wrote {out}/ in {wall:.1f} s")
  return payload
