"""The study's outputs: a text table, a JSON file and PNG plots.

- ``results.json``: configuration, machine, wall time, per-method final test
  accuracies (per seed, mean and sample std) and full per-epoch histories.
- ``accuracy.png``: test accuracy and training loss per epoch, mean over
  seeds with a +-1 std band, one colour per method.
- ``<method>_alpha_theta.png`` for every method that logs ``alpha`` (XSAM):
  alpha and the angle theta between v0 = d_K/|d_K| and v1 = g_K/|g_K| over
  training (the XSAM paper's Fig. 2 analogue).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any

import numpy as np

RESULTS_FILE = "results.json"
ACCURACY_PNG = "accuracy.png"


def table(study: dict) -> str:
  """A markdown table of final test accuracy (%) per method, mean +- std over seeds."""
  lines = [
    "| method | test accuracy (%) | seeds | per seed (%) | train time / run (s) |",
    "|---|---|---|---|---|",
  ]
  for name, entry in study["methods"].items():
    s = entry["summary"]
    per_seed = ", ".join(f"{100 * a:.1f}" for a in entry["final_test_accuracy"])
    t = float(np.mean(entry["train_time_s"]))
    lines.append(f"| {name} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {s['n']} | {per_seed} | {t:.1f} |")
  return "\n".join(lines)


def paired_differences(study: dict) -> str:
  """Per-seed differences of final test accuracy between every pair of methods.

  Runs with the same seed share the initialisation and the data order, so
  the difference per seed removes much of the seed-to-seed variance.

  Returns:
    One line per pair (later method minus earlier one, in the study's order):
    mean +- std (ddof=1) of the difference in percentage points and on how
    many seeds the later method is ahead; "" for a single method.
  """
  names = list(study["methods"])
  per_seed = {
    n: dict(zip(study["methods"][n]["seeds"], study["methods"][n]["final_test_accuracy"], strict=True)) for n in names
  }
  lines = []
  for j, name in enumerate(names):
    for ref_name in names[:j]:
      common = [s for s in per_seed[name] if s in per_seed[ref_name]]
      if not common:
        continue
      diffs = np.asarray([100 * (per_seed[name][s] - per_seed[ref_name][s]) for s in common])
      std = diffs.std(ddof=1) if diffs.size > 1 else 0.0
      lines.append(
        f"{name} - {ref_name}: {diffs.mean():+.2f} ± {std:.2f} pp (paired over {diffs.size} seeds; "
        f"ahead on {int((diffs > 0).sum())}, behind on {int((diffs < 0).sum())})"
      )
  return "\n".join(lines)


def alpha_summary(study: dict, last: int = 10) -> str:
  """One line per method logging alpha: its mean and theta's over the last epochs."""
  lines = []
  for name, entry in study["methods"].items():
    hists = [h for h in entry["histories"] if "alpha" in h]
    if not hists:
      continue
    alpha_all = np.concatenate([h["alpha"] for h in hists])
    alpha_end = np.concatenate([h["alpha"][-last:] for h in hists])
    theta_end = np.degrees(np.concatenate([h["theta"][-last:] for h in hists]))
    lines.append(
      f"{name}: alpha mean {alpha_all.mean():.2f} over training (range "
      f"{alpha_all.min():.1f}-{alpha_all.max():.1f}), {alpha_end.mean():.2f} over the last "
      f"{last} epochs; theta {theta_end.mean():.1f} deg over the last {last} epochs"
    )
  return "\n".join(lines)


def _machine() -> dict:
  import jax

  return {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
  }


def write_json(study: dict, path: str, *, command: list | None = None) -> dict:
  """Writes the study (plus date, machine and command) to ``path`` as JSON.

  Returns:
    The written document.
  """
  doc = {
    "study": "classification: SGD vs sharpness-aware methods",
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": command if command is not None else sys.argv,
    "machine": _machine(),
    "wall_time_s": study["wall_time_s"],
    "completed": study["completed"],
    "table": table(study),
    "paired_differences": paired_differences(study),
    "alpha_summary": alpha_summary(study),
    "methods": study["methods"],
  }
  with open(path, "w") as f:
    json.dump(_rounded(doc), f, indent=1)
  return doc


def _rounded(obj: Any, digits: int = 6) -> Any:
  """Floats rounded to ``digits`` significant digits (keeps the JSON small)."""
  if isinstance(obj, float):
    return float(f"{obj:.{digits}g}")
  if isinstance(obj, dict):
    return {k: _rounded(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_rounded(v, digits) for v in obj]
  return obj


def _mean_std(curves):
  n = min(len(c) for c in curves)
  arr = np.asarray([c[:n] for c in curves], np.float64)
  return np.arange(1, n + 1), arr.mean(0), arr.std(0)


def plot_accuracy(study: dict, path: str) -> None:
  """Test accuracy and training loss per epoch for every method (mean +- std band)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
  for name, entry in study["methods"].items():
    hs = entry["histories"]
    x, m, s = _mean_std([h["test_accuracy"] for h in hs])
    (line,) = ax_acc.plot(x, 100 * m, label=f"{name} ({100 * entry['summary']['mean']:.1f}%)", lw=1.4)
    ax_acc.fill_between(x, 100 * (m - s), 100 * (m + s), color=line.get_color(), alpha=0.2, lw=0)
    x, m, s = _mean_std([h["train_loss"] for h in hs])
    ax_loss.plot(x, m, color=line.get_color(), lw=1.4, label=name)
    ax_loss.fill_between(x, np.maximum(m - s, 1e-6), m + s, color=line.get_color(), alpha=0.2, lw=0)
  n_seeds = max(len(e["histories"]) for e in study["methods"].values())
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy (mean ± std, {n_seeds} seeds)")
  finals = [100 * e["summary"]["mean"] for e in study["methods"].values()]
  ax_acc.set_ylim(max(0.0, min(finals) - 15), min(100.0, max(finals) + 4))
  ax_acc.legend(loc="lower right", fontsize=8)
  ax_acc.grid(alpha=0.3)
  ax_loss.set(xlabel="epoch", ylabel="training loss (clean pass)", yscale="log", title="training loss")
  ax_loss.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_alpha_theta(name: str, entry: dict, path: str) -> None:
  """Alpha and theta over training, per seed (more than 4 seeds: thin lines and their mean).

  Theta is the epoch mean of the per-step angle; with up to 4 seeds a band
  shows its per-epoch min-max.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_a, ax_t) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
  many = len(entry["histories"]) > 4
  for seed, h in zip(entry["seeds"], entry["histories"], strict=True):
    epochs = np.asarray(h["epoch"])
    theta = np.degrees(h["theta"])
    if many:
      ax_a.step(epochs, h["alpha"], where="post", lw=0.6, color="0.6", alpha=0.6)
      ax_t.plot(epochs, theta, lw=0.6, color="0.6", alpha=0.6)
      continue
    (line,) = ax_a.step(epochs, h["alpha"], where="post", lw=1.2, label=f"seed {seed}")
    ax_t.plot(epochs, theta, color=line.get_color(), lw=1.2, label=f"seed {seed}")
    ax_t.fill_between(
      epochs, np.degrees(h["theta_min"]), np.degrees(h["theta_max"]), color=line.get_color(), alpha=0.12, lw=0
    )
  if many:
    n = len(entry["histories"])
    x, m, _ = _mean_std([h["alpha"] for h in entry["histories"]])
    ax_a.plot(x, m, color="C0", lw=1.6, label=f"mean of {n} seeds")
    x, m, _ = _mean_std([np.degrees(h["theta"]) for h in entry["histories"]])
    ax_t.plot(x, m, color="C1", lw=1.6, label=f"mean of {n} seeds")
  ax_a.axhline(1.0, color="k", lw=0.8, ls="--", label="alpha = 1 (SAM)")
  ax_a.set(xlabel="epoch", ylabel="alpha", title=f"{name}: probed alpha (grid 0..2)", ylim=(-0.05, 2.1))
  ax_t.set(xlabel="epoch", ylabel="theta (degrees)", title="theta = angle(v0, v1), epoch mean")
  for ax in (ax_a, ax_t):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if ax is ax_a else "upper left")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(study: dict, output_dir: str, *, command: list | None = None) -> dict:
  """Writes ``results.json`` and the PNGs into ``output_dir``.

  Returns:
    ``{"json": path, "pngs": [paths], "table": str, "paired_differences":
    str, "alpha_summary": str}``.
  """
  os.makedirs(output_dir, exist_ok=True)
  json_path = os.path.join(output_dir, RESULTS_FILE)
  doc = write_json(study, json_path, command=command)
  pngs = [os.path.join(output_dir, ACCURACY_PNG)]
  plot_accuracy(study, pngs[0])
  for name, entry in study["methods"].items():
    if all("alpha" in h for h in entry["histories"]):
      path = os.path.join(output_dir, f"{name}_alpha_theta.png")
      plot_alpha_theta(name, entry, path)
      pngs.append(path)
  return {
    "json": json_path,
    "pngs": pngs,
    "table": doc["table"],
    "paired_differences": doc["paired_differences"],
    "alpha_summary": doc["alpha_summary"],
  }
