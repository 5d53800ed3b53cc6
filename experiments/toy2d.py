"""The 2-D test-function study (XSAM paper Sec. 5.1, Fig. 3a; Fig. 1b).

Runs plain gradient descent ("SGD": the function is deterministic, so there
is no gradient noise), SAM and XSAM, single-step and with K = 1..4 ascent
steps, from a grid of start points on :func:`xsam_jax.testfns.fisher_sam_toy`
(a sharp global minimum near (-16.8, 12.8) and a 7x flatter local minimum
near (19.8, 29.9)), over several (rho, rho_max, lr, alpha period) settings.
Each run ends either at one of the minima (the mean of its last 10% of
iterates within ``NEAR_RADIUS`` of it) or at neither: SAM and XSAM can stall at the saddle,
or at points where their update ``|g_K| * direction`` vanishes because the
ascent lands on a critical point although the gradient at the iterate does
not vanish, or keep bouncing around the ridge at large steps; those runs are
split by the plain-GD basin of their end point. The study also measures how
well each method's update direction points at the true loss maximum on the
neighbourhood circle (the question behind the paper's Fig. 1).

All start points and settings of one (method, K) pair run in one jitted
call: ``jax.vmap`` over settings and start points around a ``jax.lax.scan``
over optimizer steps. Everything is deterministic (no random numbers).

Usage::

  python -m experiments.toy2d            # full study  -> results/toy2d/
  python -m experiments.toy2d --quick    # < 1 minute  -> results/toy2d/quick/

Outputs (in the output folder): ``toy2d.json`` (deterministic: fractions
per method and setting, direction errors, trajectory end points),
``toy2d_tables.md`` (the same fractions as markdown tables),
``toy2d_timing.json`` (wall time), and PNGs ``toy2d_trajectories.png``,
``toy2d_fractions.png``, ``toy2d_outcomes.png``, ``toy2d_directions.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from xsam_jax import testfns

LOSS = testfns.fisher_sam_toy
FLAT = np.asarray(testfns.FLAT_MINIMUM.location, np.float32)
SHARP = np.asarray(testfns.SHARP_MINIMUM.location, np.float32)
OUTCOMES = ("flat", "sharp", "neither_flat_basin", "neither_sharp_basin", "other")
"""Where a run ends: within ``NEAR_RADIUS`` of the flat / sharp minimum, or
at neither (stalled at the saddle or at a point where the method's update
vanishes although the gradient does not, or still bouncing), split by the
basin of the end point; "other" is non-finite or no basin."""

# Distance from a minimum of a run's end state (mean of its last 10% of
# iterates) that counts as "reached it". SAM/XSAM keep a 2-cycle around the
# minimum at large lr (amplitude up to ~5 at lr=300), whose mean is close to
# it; runs stalled elsewhere end near the saddle or >= 3.4 from the minima.
NEAR_RADIUS = 3.0

# Plain gradient descent used to find which basin a point lies in: stable on
# both minima (lr * lambda_max = 0.49 at the sharp one); its slowest mode
# (the flat minimum's, lr * lambda_min = 0.033) contracts by e^-48 in 1500 steps.
SETTLE_LR = 100.0
SETTLE_STEPS = 1500
SETTLE_RADIUS = 1.0


class Setting(NamedTuple):
  """One hyperparameter setting (all four are traced, so settings batch)."""

  rho: float
  rho_max: float
  lr: float
  period: int

  @property
  def name(self) -> str:
    name = f"rho={self.rho:g} rho_max={self.rho_max:g} lr={self.lr:g}"
    return name if self.period == 1 else f"{name} period={self.period}"


class StudyConfig(NamedTuple):
  """What one run of the study computes."""

  mode: str
  starts_per_axis: int
  mu_range: tuple[float, float]
  s_range: tuple[float, float]
  steps: int
  ks: tuple[int, ...]
  settings: tuple[Setting, ...]
  headlines: tuple[Setting, ...]  # settings drawn in the trajectory / outcome plots (one row each)
  trajectory_starts: tuple  # fixed a priori, not picked by outcome
  direction_rhos: tuple  # rho values of the direction-quality table (rho_max = 2 rho)
  direction_point: tuple  # where the Fig. 1b-like picture is drawn
  surface_n: int  # contour / basin-boundary grid of the plots


def _grid(rhos, lrs, factor=2.0):
  return tuple(Setting(r, factor * r, lr, 1) for r in rhos for lr in lrs)


FULL = StudyConfig(
  mode="full",
  starts_per_axis=31,
  mu_range=(-40.0, 40.0),
  s_range=(12.0, 52.0),
  steps=2000,
  ks=(1, 2, 3, 4),
  settings=(
    *_grid((2.0, 5.0, 10.0, 15.0), (20.0, 50.0, 100.0, 200.0, 300.0)),
    Setting(5.0, 5.0, 100.0, 1),  # rho_max = rho
    Setting(5.0, 15.0, 100.0, 1),  # rho_max = 3 rho
    Setting(5.0, 10.0, 100.0, 20),  # alpha probed every 20 steps
  ),
  headlines=(Setting(5.0, 10.0, 100.0, 1), Setting(15.0, 30.0, 300.0, 1)),
  trajectory_starts=((-35.0, 15.0), (-30.0, 35.0), (-5.0, 14.0)),
  direction_rhos=(2.0, 5.0, 10.0),
  direction_point=(-5.0, 15.0),
  surface_n=151,
)

QUICK = StudyConfig(
  mode="quick",
  starts_per_axis=9,
  mu_range=(-40.0, 40.0),
  s_range=(12.0, 52.0),
  steps=1000,
  ks=(1, 2),
  settings=(Setting(5.0, 10.0, 100.0, 1), Setting(15.0, 30.0, 300.0, 1)),
  headlines=(Setting(5.0, 10.0, 100.0, 1), Setting(15.0, 30.0, 300.0, 1)),
  trajectory_starts=((-35.0, 15.0), (-30.0, 35.0)),
  direction_rhos=(5.0,),
  direction_point=(-5.0, 15.0),
  surface_n=61,
)


# ----------------------------------------------------------------------------
# Optimizer runs
# ----------------------------------------------------------------------------


def method_list(ks: Sequence[int]) -> list[tuple[str, str, int]]:
  """``(label, method, K)`` for SGD and for SAM / XSAM with each K."""
  return [("SGD", "sgd", 1), *((f"SAM K={k}", "sam", k) for k in ks), *((f"XSAM K={k}", "xsam", k) for k in ks)]


def make_optimizer(
  method: str,
  num_steps: int,
  rho: float | jax.Array,
  rho_max: float | jax.Array,
  lr: float | jax.Array,
  period: int | jax.Array,
) -> optax.GradientTransformationExtraArgs:
  """``chain(<sharpness-aware transform>, sgd(lr))``; rho, rho_max, lr, period may be traced."""
  if method == "sgd":
    inner = optax.identity()
  elif method == "sam":
    inner = xsam_jax.sam(rho, num_steps=num_steps)
  elif method == "xsam":
    inner = xsam_jax.xsam(rho, rho_max, num_steps=num_steps, alpha_update_period=period)
  else:
    raise ValueError(f"unknown method {method!r}")
  return optax.chain(inner, optax.sgd(lr))


def run_one(x0, rho, rho_max, lr, period, *, method, num_steps, steps, record=False):
  """Runs ``steps`` optimizer steps from ``x0`` with ``jax.lax.scan``.

  The end state of a run is summarised over its last ``max(1, steps // 10)``
  iterates: their mean (the centre of any final oscillation) and their RMS
  spread around it.

  Returns:
    dict with ``x_final`` (last iterate), ``x_end`` (mean of the last 10% of
    the iterates), ``spread`` (their RMS distance to ``x_end``), ``min_s``
    (smallest ``s`` visited), ``alpha`` (XSAM's final alpha, nan for the
    other methods) and, if ``record``, ``path`` (``(steps + 1, 2)``).
  """
  tx = make_optimizer(method, num_steps, rho, rho_max, lr, period)
  state = tx.init(x0)
  window = max(1, steps // 10)
  window_start = steps - window  # the window holds the iterates after steps > window_start

  def body(carry, i):
    x, state, min_s, x_ref, d_sum, d_sq = carry
    grads = jax.grad(LOSS)(x)
    updates, state = tx.update(grads, state, x, loss_fn=LOSS)
    x = cast(jax.Array, optax.apply_updates(x, updates))
    # Offsets from the window's first iterate keep the float32 variance exact.
    x_ref = jnp.where(i + 1 == window_start + 1, x, x_ref)
    in_window = i + 1 > window_start
    d = jnp.where(in_window, x - x_ref, jnp.zeros_like(x))
    carry = (x, state, jnp.minimum(min_s, x[1]), x_ref, d_sum + d, d_sq + jnp.sum(d * d))
    return carry, (x if record else None)

  zero = jnp.zeros((), x0.dtype)
  init = (x0, state, x0[1], x0, jnp.zeros_like(x0), zero)
  (x, state, min_s, x_ref, d_sum, d_sq), path = jax.lax.scan(body, init, jnp.arange(steps))
  mean_d = d_sum / window
  out = {
    "x_final": x,
    "x_end": x_ref + mean_d,
    "spread": jnp.sqrt(jnp.maximum(d_sq / window - jnp.sum(mean_d * mean_d), 0.0)),
    "min_s": min_s,
    "alpha": cast(tuple[xsam_jax.XSAMState, ...], state)[0].alpha
    if method == "xsam"
    else jnp.full((), jnp.nan, jnp.float32),
  }
  if record:
    out["path"] = jnp.concatenate([x0[None, :], path], axis=0)
  return out


def settle(x):
  """Gradient-descent basin of ``x``: 0 flat, 1 sharp, 2 neither (plain GD to convergence)."""

  def body(y, _):
    return y - SETTLE_LR * jax.grad(LOSS)(y), None

  y, _ = jax.lax.scan(body, x, None, length=SETTLE_STEPS)
  d_flat = jnp.linalg.norm(y - jnp.asarray(FLAT))
  d_sharp = jnp.linalg.norm(y - jnp.asarray(SHARP))
  label = jnp.where(d_flat < SETTLE_RADIUS, 0, jnp.where(d_sharp < SETTLE_RADIUS, 1, 2))
  return jnp.where(jnp.all(jnp.isfinite(y)), label, 2)


def outcome(x):
  """Index into :data:`OUTCOMES` of a run's end point ``x``."""
  near_flat = jnp.linalg.norm(x - jnp.asarray(FLAT)) < NEAR_RADIUS
  near_sharp = jnp.linalg.norm(x - jnp.asarray(SHARP)) < NEAR_RADIUS
  basin = settle(x)
  code = jnp.where(near_flat, 0, jnp.where(near_sharp, 1, jnp.where(basin == 0, 2, jnp.where(basin == 1, 3, 4))))
  return jnp.where(jnp.all(jnp.isfinite(x)), code, 4)


@functools.partial(jax.jit, static_argnames=("method", "num_steps", "steps"))
def run_grid(x0s, rhos, rho_maxs, lrs, periods, *, method, num_steps, steps):
  """All settings x all start points of one (method, K) in one call.

  Returns:
    the dict of :func:`run_one` (without ``path``) plus ``outcome`` (index
    into :data:`OUTCOMES` of ``x_end``), ``outcome_final_iterate`` (the same
    for ``x_final``) and ``loss_end``; every leaf has leading shape
    ``(num_settings, num_starts)``.
  """
  one = functools.partial(run_one, method=method, num_steps=num_steps, steps=steps)
  over_starts = jax.vmap(one, in_axes=(0, None, None, None, None))
  over_settings = jax.vmap(over_starts, in_axes=(None, 0, 0, 0, 0))
  out = over_settings(x0s, rhos, rho_maxs, lrs, periods)
  out["outcome"] = jax.vmap(jax.vmap(outcome))(out["x_end"])
  out["outcome_final_iterate"] = jax.vmap(jax.vmap(outcome))(out["x_final"])
  out["loss_end"] = LOSS(out["x_end"])
  return out


@functools.partial(jax.jit, static_argnames=("method", "num_steps", "steps"))
def run_paths(x0s, rho, rho_max, lr, period, *, method, num_steps, steps):
  """Full paths ``(num_starts, steps + 1, 2)`` from a few start points."""
  one = functools.partial(run_one, method=method, num_steps=num_steps, steps=steps, record=True)
  return jax.vmap(one, in_axes=(0, None, None, None, None))(x0s, rho, rho_max, lr, period)["path"]


def start_grid(config: StudyConfig) -> np.ndarray:
  """``(n * n, 2)`` float32 start points, mu fastest."""
  mu = np.linspace(config.mu_range[0], config.mu_range[1], config.starts_per_axis)
  s = np.linspace(config.s_range[0], config.s_range[1], config.starts_per_axis)
  mm, ss = np.meshgrid(mu, s)
  return np.stack([mm.ravel(), ss.ravel()], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------
# Direction quality (the question behind the paper's Fig. 1)
# ----------------------------------------------------------------------------

_CIRCLE = 720  # angles on the neighbourhood circle


def _unit(v):
  return v / (jnp.linalg.norm(v) + 1e-30)


def _angle_deg(u, v):
  c = jnp.clip(jnp.dot(_unit(u), _unit(v)), -1.0, 1.0)
  return jnp.degrees(jnp.arccos(c))


def true_max_direction(x, radius):
  """Unit direction of ``argmax f(x + radius * u)`` over 720 unit vectors ``u``."""
  phi = jnp.arange(_CIRCLE, dtype=jnp.float32) * (2.0 * jnp.pi / _CIRCLE)
  units = jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)
  losses = LOSS(x[None, :] + radius * units)
  return units[jnp.argmax(losses)]


def update_directions(x, rho, rho_max, num_steps):
  """The directions each method's update points away from (one step from ``x``).

  Returns:
    dict with ``sgd`` (``g_0``), ``sam`` (``g_K``), ``xsam`` (``|g_K| v(alpha*)``
    after probing at ``x``), ``alpha`` (XSAM's alpha*) and ``ascent_points``
    (``x + d_k``, k = 0..K).
  """
  g0 = jax.grad(LOSS)(x)
  sam_tx = xsam_jax.sam(rho, num_steps=num_steps)
  sam_out, _ = sam_tx.update(g0, sam_tx.init(x), x, loss_fn=LOSS)
  xsam_tx = xsam_jax.xsam(rho, rho_max, num_steps=num_steps, alpha_update_period=1)
  xsam_out, xsam_state = xsam_tx.update(g0, xsam_tx.init(x), x, loss_fn=LOSS)
  trace = xsam_jax.ascent(LOSS, x, g0, rho=rho, num_steps=num_steps)
  points = [x]
  for g in trace.grads[:-1]:
    points.append(points[-1] + (rho / num_steps) * _unit(g))
  return {
    "sgd": g0,
    "sam": sam_out,
    "xsam": xsam_out,
    "alpha": cast(xsam_jax.XSAMState, xsam_state).alpha,
    "grads": jnp.stack(trace.grads),
    "ascent_points": jnp.stack(points),
  }


@functools.partial(jax.jit, static_argnames=("num_steps",))
def direction_errors(xs, rho, rho_max, *, num_steps):
  """Angles (degrees) between each method's direction and the true maxima.

  Returns:
    dict of ``(num_points,)`` arrays: ``{method}_vs_rho`` and
    ``{method}_vs_rho_max`` for method in sgd, sam, xsam, and XSAM's alpha.
  """

  def one(x):
    dirs = update_directions(x, rho, rho_max, num_steps)
    out = {"alpha": dirs["alpha"]}
    for radius_name, radius in (("rho", rho), ("rho_max", rho_max)):
      target = true_max_direction(x, radius)
      for m in ("sgd", "sam", "xsam"):
        out[f"{m}_vs_{radius_name}"] = _angle_deg(dirs[m], target)
    return out

  return jax.vmap(one)(xs)


# ----------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------


def _fractions(labels: np.ndarray, names: Sequence[str] = OUTCOMES) -> dict[str, float]:
  n = labels.size
  return {name: round(float(np.sum(labels == i)) / n, 4) for i, name in enumerate(names)}


def run_study(config: StudyConfig, log: Callable[[str], object] = print) -> dict[str, Any]:
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


def headline_paths(config: StudyConfig, ks: Sequence[int]) -> dict:
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


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

_COLORS = {"SGD": "tab:gray", "SAM": "tab:blue", "XSAM": "tab:red"}


def _save(fig, path_png, dpi):
  """Saves ``fig`` as a 256-colour PNG (a third of the size of RGBA) and closes it."""
  import io

  import matplotlib.pyplot as plt
  from PIL import Image

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  buf.seek(0)
  with Image.open(buf) as img:
    img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path_png, optimize=True)


@functools.lru_cache(maxsize=2)
def _surface(mu_lim, s_lim, n):
  """Loss and GD-basin label (0 flat) on an ``n x n`` grid (cached between panels)."""
  mu = np.linspace(mu_lim[0], mu_lim[1], n)
  s = np.linspace(s_lim[0], s_lim[1], n)
  mm, ss = np.meshgrid(mu, s)
  pts = jnp.asarray(np.stack([mm, ss], axis=-1), jnp.float32)
  ff = np.asarray(LOSS(pts))
  lab = np.asarray(jax.jit(jax.vmap(settle))(pts.reshape(-1, 2))).reshape(mm.shape)
  return mm, ss, ff, lab


def _loss_surface(ax, n, mu_lim=(-45.0, 45.0), s_lim=(0.5, 60.0)):
  mm, ss, ff, lab = _surface(mu_lim, s_lim, n)
  levels = np.concatenate([np.linspace(0.28, 0.5, 12), np.linspace(0.55, 1.5, 8)])
  # vmin below the data keeps the fill light (no alpha: smaller PNGs).
  ax.contourf(
    mm, ss, np.minimum(ff, 1.6), levels=np.append(levels, 1.7), cmap="Greens_r", vmin=-0.6, vmax=1.7, extend="min"
  )
  ax.contour(mm, ss, ff, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
  ax.contour(mm, ss, (lab == 0).astype(float), levels=[0.5], colors="purple", linewidths=1.2, linestyles="--")
  ax.plot(*testfns.SADDLE_POINT.location, marker="x", color="k", markersize=8, zorder=5)
  ax.plot(*FLAT, marker="*", color="gold", markersize=14, markeredgecolor="k", zorder=5)
  ax.plot(*SHARP, marker="*", color="orange", markersize=14, markeredgecolor="k", zorder=5)
  ax.annotate("flat", FLAT, xytext=(4, 6), textcoords="offset points", fontsize=8)
  ax.annotate("sharp", SHARP, xytext=(4, 6), textcoords="offset points", fontsize=8)
  ax.set_xlim(*mu_lim)
  ax.set_ylim(*s_lim)
  ax.set_xlabel("mu")
  ax.set_ylabel("s")


def plot_trajectories(config, paths, path_png):
  import matplotlib.pyplot as plt

  ks = (config.ks[0], config.ks[-1])
  rows = config.headlines
  fig, axes = plt.subplots(len(rows), len(ks), figsize=(4.4 * len(ks), 3.7 * len(rows)), squeeze=False)
  for row, setting in zip(axes, rows, strict=True):
    for ax, k in zip(row, ks, strict=True):
      _loss_surface(ax, config.surface_n)
      for label, path_set in paths[setting.name].items():
        if label != "SGD" and not label.endswith(f"K={k}"):
          continue
        color = _COLORS[label.split()[0]]
        for j, path in enumerate(path_set):
          ax.plot(path[:, 0], path[:, 1], "-", color=color, lw=1.0, label=label if j == 0 else None)
          ax.plot(path[-1, 0], path[-1, 1], "o", color=color, ms=5, mec="k", mew=0.5, zorder=6)
      for x0 in config.trajectory_starts:
        ax.plot(*x0, "ks", ms=4)
      ax.set_title(f"K={k}: {setting.name}", fontsize=9)
      ax.legend(fontsize=7, loc="upper left")
  fig.suptitle(
    f"Trajectories from fixed starts (squares), {config.steps} steps; dots: end points; "
    "dashed: GD basin boundary; x: saddle",
    fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path_png, dpi=95)


def _setting_tick(setting: Setting) -> str:
  tick = f"rho={setting.rho:g}\nlr={setting.lr:g}"
  if setting.rho_max != 2.0 * setting.rho:
    tick += f"\nrho_max={setting.rho_max:g}"
  if setting.period != 1:
    tick += f"\nperiod={setting.period}"
  return tick


def plot_fractions(config, results, path_png):
  import matplotlib.pyplot as plt

  labels = [lab for lab, _, _ in method_list(config.ks)]
  names = [s.name for s in config.settings]
  table = {(r["label"], r["setting"]): r for r in results}
  fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.8 * len(names) + 2.0), 6.4), sharex=True)
  width = 0.8 / len(labels)
  cmap = {"SGD": plt.get_cmap("Greys"), "SAM": plt.get_cmap("Blues"), "XSAM": plt.get_cmap("Reds")}
  for ax, key in zip(axes, ("escape_from_sharp", "neither"), strict=True):
    for j, lab in enumerate(labels):
      fam, k = lab.split()[0], (int(lab.split("=")[1]) if "=" in lab else 1)
      shade = 0.8 if fam == "SGD" else 0.95 - 0.5 * (k - 1) / max(1, len(config.ks) - 1)
      vals = [table[(lab, n)][key] for n in names]
      ax.bar(
        np.arange(len(names)) + (j - len(labels) / 2 + 0.5) * width,
        vals,
        width,
        label=lab,
        color=cmap[fam](shade),
        edgecolor="none",
      )
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", lw=0.3)
  axes[0].set_ylabel("sharp-basin starts that end\nat the flat minimum")
  axes[1].set_ylabel("all starts that end\nat neither minimum")
  axes[0].legend(fontsize=7, ncol=3, loc="upper left")
  axes[1].set_xticks(np.arange(len(names)))
  axes[1].set_xticklabels([_setting_tick(s) for s in config.settings], fontsize=6.5)
  axes[0].set_title(
    f"Fisher-SAM test function: {results[0]['n_runs']} start points, "
    f"{config.steps} steps\n(rho_max = 2 rho unless shown)",
    fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path_png, dpi=100)


_OUTCOME_COLORS = ("gold", "darkorange", "lightskyblue", "navy", "black")


def plot_outcomes(config, study, path_png):
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  by = study["labels_by"]
  start = np.where(study["start_labels"] == 2, 4, study["start_labels"])
  n = config.starts_per_axis
  half_mu = 0.5 * (config.mu_range[1] - config.mu_range[0]) / (n - 1)
  half_s = 0.5 * (config.s_range[1] - config.s_range[0]) / (n - 1)
  extent = (
    config.mu_range[0] - half_mu,
    config.mu_range[1] + half_mu,
    config.s_range[0] - half_s,
    config.s_range[1] + half_s,
  )
  cmap = ListedColormap(list(_OUTCOME_COLORS))
  ncols = 2 + 2 * len({config.ks[0], config.ks[-1]})
  fig, axes = plt.subplots(
    len(config.headlines), ncols, figsize=(2.3 * ncols, 2.6 * len(config.headlines) + 0.6), squeeze=False
  )
  for row, setting in zip(axes, config.headlines, strict=True):
    i = list(config.settings).index(setting)
    panels = [("start: GD basin", start), ("SGD", by[("SGD", i)])]
    for k in dict.fromkeys((config.ks[0], config.ks[-1])):
      panels += [(f"SAM K={k}", by[(f"SAM K={k}", i)]), (f"XSAM K={k}", by[(f"XSAM K={k}", i)])]
    for ax, (title, lab) in zip(row, panels, strict=True):
      ax.imshow(
        lab.reshape(n, n),
        origin="lower",
        extent=extent,
        aspect="auto",
        cmap=cmap,
        vmin=-0.5,
        vmax=len(OUTCOMES) - 0.5,
        interpolation="nearest",
      )
      ax.set_title(
        f"{title}\nflat {np.mean(lab == 0):.2f}, neither {np.mean((lab == 2) | (lab == 3)):.2f}", fontsize=7.5
      )
      ax.tick_params(labelsize=6.5)
    row[0].set_ylabel(f"{setting.name}\ns (start)", fontsize=7.5)
  for ax in axes[-1]:
    ax.set_xlabel("mu (start)", fontsize=7.5)
  fig.legend(
    [Patch(color=c) for c in _OUTCOME_COLORS[:4]],
    ["ends at flat min", "ends at sharp min", "neither, in flat basin", "neither, in sharp basin"],
    loc="lower center",
    ncol=4,
    fontsize=7,
  )
  fig.suptitle(f"Where each start point ends after {config.steps} steps", fontsize=9)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  _save(fig, path_png, dpi=100)


def plot_directions(config, path_png):
  """Fig. 1b-like: the K-step ascent and the directions each method uses."""
  import matplotlib.pyplot as plt

  x = jnp.asarray(config.direction_point, jnp.float32)
  rho = config.direction_rhos[len(config.direction_rhos) // 2]
  rho_max = 2.0 * rho
  ks = config.ks
  fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 3.7), squeeze=False)
  directions_fn = jax.jit(update_directions, static_argnums=(3,))
  for ax, k in zip(axes[0], ks, strict=True):
    d = {key: np.asarray(v) for key, v in directions_fn(x, rho, rho_max, k).items()}
    lo, hi = np.asarray(x) - 1.25 * rho_max, np.asarray(x) + 1.25 * rho_max
    mu = np.linspace(lo[0], hi[0], 121)
    s = np.linspace(lo[1], hi[1], 121)
    mm, ss = np.meshgrid(mu, s)
    ff = np.asarray(LOSS(jnp.asarray(np.stack([mm, ss], -1), jnp.float32)))
    ax.contour(mm, ss, ff, levels=16, cmap="Greens_r", linewidths=0.6)
    phi = np.linspace(0, 2 * np.pi, 200)
    for r, ls in ((rho, ":"), (rho_max, "--")):
      ax.plot(x[0] + r * np.cos(phi), x[1] + r * np.sin(phi), "k", ls=ls, lw=0.8)
    pts = d["ascent_points"]
    ax.plot(pts[:, 0], pts[:, 1], "o-", color="tab:purple", ms=3, lw=1, label="ascent x+d_k")
    for name, vec, color in (
      ("g_0", d["sgd"], "tab:gray"),
      ("SAM: g_K@x", d["sam"], "tab:blue"),
      ("XSAM: v(alpha*)", d["xsam"], "tab:red"),
    ):
      u = vec / (np.linalg.norm(vec) + 1e-30) * rho_max
      ax.annotate(
        "", xy=np.asarray(x) + u, xytext=np.asarray(x), arrowprops={"arrowstyle": "->", "color": color, "lw": 1.6}
      )
      ax.plot([], [], color=color, label=name)
    for r, style, name in ((rho, "k*", "max on rho circle"), (rho_max, "r*", "max on rho_max circle")):
      u = np.asarray(jax.jit(true_max_direction)(x, r)) * r
      ax.plot(x[0] + u[0], x[1] + u[1], style, ms=11, mec="k", label=name)
    ax.set_aspect("equal")
    ax.set_title(f"K={k}, rho={rho:g}, rho_max={rho_max:g}, alpha*={float(d['alpha']):.1f}", fontsize=8)
    ax.set_xlabel("mu")
  axes[0][0].set_ylabel("s")
  handles, names = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, names, fontsize=7, loc="lower center", ncol=4)
  fig.suptitle(
    f"Update directions at x = {tuple(config.direction_point)} (the question of the paper's Fig. 1b)", fontsize=9
  )
  fig.tight_layout(rect=(0, 0.16, 1, 1))
  _save(fig, path_png, dpi=100)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study and writes JSON + PNGs; returns the JSON dict."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="small grid, < 1 minute")
  parser.add_argument("--out", default=None, help="output folder (default results/toy2d, or results/toy2d/quick)")
  args = parser.parse_args(argv)
  config = QUICK if args.quick else FULL
  out = args.out or os.path.join("results", "toy2d", *(["quick"] if args.quick else []))
  os.makedirs(out, exist_ok=True)

  t0 = time.perf_counter()
  study = run_study(config)
  paths = headline_paths(config, (config.ks[0], config.ks[-1]))
  payload = {
    "study": "toy2d: XSAM paper Sec. 5.1 / Fig. 3a on the Fisher-SAM test function",
    "mode": config.mode,
    "command": "python -m experiments.toy2d" + (" --quick" if args.quick else ""),
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
      "base_optimizer": "optax.sgd(lr), no momentum; full-batch (deterministic) gradients",
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
  plot_trajectories(config, paths, os.path.join(out, "toy2d_trajectories.png"))
  plot_fractions(config, study["results"], os.path.join(out, "toy2d_fractions.png"))
  plot_outcomes(config, study, os.path.join(out, "toy2d_outcomes.png"))
  plot_directions(config, os.path.join(out, "toy2d_directions.png"))
  wall = time.perf_counter() - t0
  with open(os.path.join(out, "toy2d_timing.json"), "w") as fh:
    json.dump(
      {
        "command": payload["command"],
        "wall_time_s": round(wall, 1),
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
      },
      fh,
      indent=1,
    )
  tables = markdown_tables(study["results"], config.ks)
  with open(os.path.join(out, "toy2d_tables.md"), "w") as fh:
    fh.write(f"<!-- written by `{payload['command']}` -->\n\n{tables}")
  print(tables)
  print(f"[toy2d] wrote {out}/ in {wall:.1f} s")
  return payload


if __name__ == "__main__":
  main(sys.argv[1:])
