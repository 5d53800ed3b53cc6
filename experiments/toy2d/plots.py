"""The 2-D study's pictures (matplotlib, imported by each function): trajectories, fractions, outcomes, directions."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.toy2d.config import Setting
from experiments.toy2d.dynamics import (
  FLAT,
  LOSS,
  OUTCOMES,
  SHARP,
  method_list,
  settle,
  true_max_direction,
  update_directions,
)
from xsam_jax import testfns

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


def plot_axes(config, axes, path_png):
  """The axes sweep: fractions that reach the flat minimum per setting, a panel per metric x momentum."""
  import matplotlib.pyplot as plt

  from experiments.toy2d.axes import axes_columns

  cols = axes_columns(config.axes_ks, config.periods)
  names = axes["settings"]
  table = {(c["label"], c["period"], c["setting"], c["momentum"]): c for c in axes["cells"]}
  metrics = (
    ("escape_from_sharp", "sharp-basin starts that end\nat the flat minimum"),
    ("flat", "all starts that end\nat the flat minimum"),
  )
  momenta = config.momenta
  fig, axs = plt.subplots(
    len(metrics),
    len(momenta),
    figsize=(max(5.0, 0.55 * len(names) + 1.5) * len(momenta), 5.6),
    squeeze=False,
    sharey=True,
  )
  width = 0.8 / len(cols)
  periods = list(config.periods)
  for row, (key, ylabel) in zip(axs, metrics, strict=True):
    for ax, m in zip(row, momenta, strict=True):
      for j, (lab, p) in enumerate(cols):
        fam = lab.split()[0]
        color: Any
        if fam == "XSAM":
          color = plt.get_cmap("Reds")(0.9 - 0.5 * periods.index(p) / max(1, len(periods) - 1))
        else:
          color = _COLORS[fam]
        vals = [table[(lab, p, n, m)][key] for n in names]
        name = lab if p is None else f"{lab} period={p}"
        ax.bar(np.arange(len(names)) + (j - len(cols) / 2 + 0.5) * width, vals, width, label=name, color=color)
      ax.set_ylim(0, 1.05)
      ax.grid(axis="y", lw=0.3)
      ax.set_title(f"momentum {m:g}", fontsize=9)
      ax.set_xticks(np.arange(len(names)))
      ax.set_xticklabels([n.replace(" rho_max", "\nrho_max").replace(" lr", "\nlr") for n in names], fontsize=6)
    row[0].set_ylabel(ylabel, fontsize=8)
  axs[0][0].legend(fontsize=7, ncol=2, loc="upper left")
  fig.suptitle(
    f"Base optimizer optax.sgd(lr, momentum), {axes['n_starts']} start points, {config.steps} steps",
    fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path_png, dpi=100)
