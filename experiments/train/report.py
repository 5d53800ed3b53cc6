"""The study's outputs: a text table, a JSON file and PNG plots.

- ``results.json``: configuration, machine, wall time, per-method final test
  accuracies (per seed, mean and sample std) and full per-epoch histories.
- ``accuracy.png``: test accuracy and training loss per epoch, mean over
  seeds with a +-1 std band, one colour per method.
- ``<method>_alpha_theta.png`` for every method that logs ``alpha`` (XSAM):
  alpha and the angle theta between v0 = d_K/|d_K| and v1 = g_K/|g_K| over
  training (the XSAM paper's Fig. 2 analogue).
- ``sharpness.png`` when sharpness-aware methods ran: per method, the clean
  training loss L(w) and the loss at the ascent point L(w + d_K) (every
  method's state keeps it as ``perturbed_loss``, at no extra cost) per
  epoch, and their difference, the sharpness the method minimizes.

A diverged run (a non-finite loss at its last epoch, :func:`diverged`) is a
result, not an error: the table says "diverged" for it and leaves it out of
the means and paired differences, the plots show what is finite (no log
scale where nothing positive is left), and the JSON stays strict (NaN and
infinities written as null; each method lists ``diverged`` per seed).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import warnings
from typing import Any

import numpy as np

from experiments.core import report as core_report

RESULTS_FILE = "results.json"
ACCURACY_PNG = "accuracy.png"
SHARPNESS_PNG = "sharpness.png"


def diverged(history: dict) -> bool:
  """Whether a run diverged: its last epoch's training or test loss is not finite (or null in JSON)."""
  last = [history[k][-1] for k in ("train_loss", "test_loss") if history.get(k)]
  return any(v is None or not math.isfinite(v) for v in last)


def _finite(values: Any) -> np.ndarray:
  """``values`` as float64 with None (JSON null) as NaN."""
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def table(study: dict) -> str:
  """A markdown table of final test accuracy (%) per method, mean +- std over seeds.

  Diverged runs read "diverged" and are left out of the mean (the accuracy
  of a network with NaN weights means nothing); the count says how many.
  """
  lines = [
    "| method | test accuracy (%) | seeds | per seed (%) | train time / run (s) |",
    "|---|---|---|---|---|",
  ]
  for name, entry in study["methods"].items():
    flags = [diverged(h) for h in entry["histories"]]
    accs = entry["final_test_accuracy"]
    ok = [a for a, bad in zip(accs, flags, strict=True) if not bad]
    per_seed = ", ".join("diverged" if bad else f"{100 * a:.1f}" for a, bad in zip(accs, flags, strict=True))
    t = float(np.mean(entry["train_time_s"]))
    if not ok:
      cell = "diverged"
    else:
      std = float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0
      cell = f"{100 * float(np.mean(ok)):.2f} ± {100 * std:.2f}"
      if len(ok) < len(accs):
        cell += f" ({len(accs) - len(ok)} of {len(accs)} diverged)"
    lines.append(f"| {name} | {cell} | {len(accs)} | {per_seed} | {t:.1f} |")
  return "\n".join(lines)


def paired_differences(study: dict) -> str:
  """Per-seed differences of final test accuracy between every pair of methods.

  Runs with the same seed share the initialisation and the data order, so
  the difference per seed removes much of the seed-to-seed variance.

  Returns:
    One line per pair (later method minus earlier one, in the study's order):
    mean +- std (ddof=1) of the difference in percentage points and on how
    many seeds the later method is ahead, over the seeds on which neither
    run diverged; "" for a single method.
  """
  names = list(study["methods"])
  per_seed: dict[str, dict[int, float]] = {}  # the converged runs' accuracies
  for n in names:
    entry = study["methods"][n]
    runs = zip(entry["seeds"], entry["final_test_accuracy"], entry["histories"], strict=True)
    per_seed[n] = {s: a for s, a, h in runs if not diverged(h)}
  lines = []
  for j, name in enumerate(names):
    for ref_name in names[:j]:
      common = [s for s in study["methods"][name]["seeds"] if s in study["methods"][ref_name]["seeds"]]
      if not common:
        continue
      both = [s for s in common if s in per_seed[name] and s in per_seed[ref_name]]
      skipped = f"; {len(common) - len(both)} seeds left out: diverged" if len(both) < len(common) else ""
      if not both:
        lines.append(f"{name} - {ref_name}: n/a (on each of the {len(common)} seeds, one of them diverged)")
        continue
      diffs = np.asarray([100 * (per_seed[name][s] - per_seed[ref_name][s]) for s in both])
      std = diffs.std(ddof=1) if diffs.size > 1 else 0.0
      lines.append(
        f"{name} - {ref_name}: {diffs.mean():+.2f} ± {std:.2f} pp (paired over {diffs.size} seeds; "
        f"ahead on {int((diffs > 0).sum())}, behind on {int((diffs < 0).sum())}{skipped})"
      )
  return "\n".join(lines)


def alpha_summary(study: dict, last: int = 10) -> str:
  """One line per method logging alpha: its mean and theta's over the last epochs (finite values only)."""
  lines = []
  for name, entry in study["methods"].items():
    hists = [h for h in entry["histories"] if "alpha" in h]
    if not hists:
      continue
    alpha_all = np.concatenate([_finite(h["alpha"]) for h in hists])
    alpha_end = np.concatenate([_finite(h["alpha"][-last:]) for h in hists])
    theta_end = np.degrees(np.concatenate([_finite(h["theta"][-last:]) for h in hists]))
    alpha_all, alpha_end, theta_end = (a[np.isfinite(a)] for a in (alpha_all, alpha_end, theta_end))
    if not alpha_all.size:
      lines.append(f"{name}: no finite alpha (diverged)")
      continue
    theta = f"{theta_end.mean():.1f} deg" if theta_end.size else "not finite (diverged)"
    end = f"{alpha_end.mean():.2f}" if alpha_end.size else "n/a"
    lines.append(
      f"{name}: alpha mean {alpha_all.mean():.2f} over training (range "
      f"{alpha_all.min():.1f}-{alpha_all.max():.1f}), {end} over the last "
      f"{last} epochs; theta {theta} over the last {last} epochs"
    )
  return "\n".join(lines)


def _finite_mean(values: Any) -> float:
  """The mean of the finite values (NaN if there are none)."""
  v = _finite(values)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else math.nan


def sharpness_summary(study: dict) -> str:
  """One line per method logging ``sharpness`` (L(w + d_K) - L(w), epoch means): first and last epoch, seed mean."""
  lines = []
  for name, entry in study["methods"].items():
    hists = [h for h in entry["histories"] if h.get("sharpness")]
    if not hists:
      continue
    first, last = (_finite_mean([h["sharpness"][i] for h in hists]) for i in (0, -1))
    loss = _finite_mean([h["train_loss"][-1] for h in hists])
    lines.append(
      f"{name}: L(w + d) - L(w) {first:.4f} in the first epoch, {last:.4f} in the last "
      f"(clean training loss {loss:.4f} there)"
    )
  return "\n".join(lines)


def write_json(study: dict, path: str, *, command: list | None = None) -> dict:
  """Writes the study (plus date, machine and command) to ``path`` as JSON.

  Returns:
    The written document.
  """
  doc = {
    "study": "classification: SGD vs sharpness-aware methods",
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": command if command is not None else sys.argv,
    "machine": core_report.machine(),
    "wall_time_s": study["wall_time_s"],
    "completed": study["completed"],
    "table": table(study),
    "paired_differences": paired_differences(study),
    "alpha_summary": alpha_summary(study),
    "sharpness_summary": sharpness_summary(study),
    "methods": {
      name: {**entry, "diverged": [diverged(h) for h in entry["histories"]]} for name, entry in study["methods"].items()
    },
  }
  text = json.dumps(core_report.rounded(doc), indent=1, allow_nan=False)
  with open(path, "w") as f:
    f.write(text)
  return doc


def _mean_std(curves):
  """Epochs, mean and std over the curves (cut to the shortest); non-finite points drop out, all-NaN gives NaN."""
  n = min(len(c) for c in curves)
  arr = np.asarray([_finite(c[:n]) for c in curves], np.float64)
  arr = np.where(np.isfinite(arr), arr, np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # epochs where every curve is NaN
    return np.arange(1, n + 1), np.nanmean(arr, 0), np.nanstd(arr, 0)


def plot_accuracy(study: dict, path: str) -> None:
  """Test accuracy and training loss per epoch for every method (mean +- std band)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
  finals, positive_loss = [], False
  for name, entry in study["methods"].items():
    flags = [diverged(h) for h in entry["histories"]]
    hs = [h for h, bad in zip(entry["histories"], flags, strict=True) if not bad] or entry["histories"]
    accs = [a for a, bad in zip(entry["final_test_accuracy"], flags, strict=True) if not bad]
    label = "diverged" if not accs else f"{100 * float(np.mean(accs)):.1f}%"
    if accs and len(accs) < len(flags):
      label += f", {len(flags) - len(accs)} diverged"
    finals += [100 * a for a in accs]
    x, m, s = _mean_std([h["test_accuracy"] for h in hs])
    (line,) = ax_acc.plot(x, 100 * m, label=f"{name} ({label})", lw=1.4, ls="-" if accs else ":")
    ax_acc.fill_between(x, 100 * (m - s), 100 * (m + s), color=line.get_color(), alpha=0.2, lw=0)
    x, m, s = _mean_std([h["train_loss"] for h in hs])
    positive_loss |= bool(np.any(m > 0))
    ax_loss.plot(x, m, color=line.get_color(), lw=1.4, label=name)
    ax_loss.fill_between(x, np.maximum(m - s, 1e-6), m + s, color=line.get_color(), alpha=0.2, lw=0)
  n_seeds = max(len(e["histories"]) for e in study["methods"].values())
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy (mean ± std, {n_seeds} seeds)")
  if finals:
    ax_acc.set_ylim(max(0.0, min(finals) - 15), min(100.0, max(finals) + 4))
  else:
    ax_acc.set_ylim(0.0, 100.0)
  ax_acc.legend(loc="lower right", fontsize=8)
  ax_acc.grid(alpha=0.3)
  ax_loss.set(xlabel="epoch", ylabel="training loss (clean pass)", title="training loss")
  if positive_loss:
    ax_loss.set_yscale("log")
  else:
    ax_loss.text(0.5, 0.5, "no finite training loss (diverged)", ha="center", va="center", transform=ax_loss.transAxes)
  ax_loss.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_sharpness(study: dict, path: str) -> None:
  """Clean and perturbed training loss per epoch (left) and their difference (right), mean over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
  for name, entry in study["methods"].items():
    hs = [h for h in entry["histories"] if h.get("sharpness")]
    if not hs:
      continue
    x, clean, _ = _mean_std([h["train_loss"] for h in hs])
    (line,) = ax_loss.plot(x, clean, lw=1.2, label=f"{name}: L(w)")
    _, perturbed, _ = _mean_std([h["perturbed_loss"] for h in hs])
    ax_loss.plot(x, perturbed, lw=1.2, ls="--", color=line.get_color(), label=f"{name}: L(w + d)")
    x, gap, s = _mean_std([h["sharpness"] for h in hs])
    ax_gap.plot(x, gap, lw=1.2, color=line.get_color(), label=name)
    ax_gap.fill_between(x, gap - s, gap + s, color=line.get_color(), alpha=0.2, lw=0)
  if any(line.get_ydata().size and np.nanmin(line.get_ydata()) > 0 for line in ax_loss.get_lines()):
    ax_loss.set_yscale("log")
  ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="clean and perturbed loss")
  ax_gap.set(xlabel="epoch", ylabel="L(w + d) - L(w)", title="sharpness being minimized (perturbed_loss - loss)")
  for ax in (ax_loss, ax_gap):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
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
    alpha, theta = _finite(h["alpha"]), np.degrees(_finite(h["theta"]))  # NaN (diverged) leaves gaps
    if many:
      ax_a.step(epochs, alpha, where="post", lw=0.6, color="0.6", alpha=0.6)
      ax_t.plot(epochs, theta, lw=0.6, color="0.6", alpha=0.6)
      continue
    label = f"seed {seed}" + (" (diverged)" if diverged(h) else "")
    (line,) = ax_a.step(epochs, alpha, where="post", lw=1.2, label=label)
    ax_t.plot(epochs, theta, color=line.get_color(), lw=1.2, label=label)
    band = np.degrees(_finite(h["theta_min"])), np.degrees(_finite(h["theta_max"]))
    ax_t.fill_between(epochs, *band, color=line.get_color(), alpha=0.12, lw=0)
  if many:
    n = len(entry["histories"])
    x, m, _ = _mean_std([h["alpha"] for h in entry["histories"]])
    ax_a.plot(x, m, color="C0", lw=1.6, label=f"mean of {n} seeds")
    x, m, _ = _mean_std([np.degrees(_finite(h["theta"])) for h in entry["histories"]])
    ax_t.plot(x, m, color="C1", lw=1.6, label=f"mean of {n} seeds")
  if not any(np.isfinite(_finite(h["theta"])).any() for h in entry["histories"]):
    ax_t.text(0.5, 0.5, "no finite theta (diverged)", ha="center", va="center", transform=ax_t.transAxes)
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
  if any(h.get("sharpness") for entry in study["methods"].values() for h in entry["histories"]):
    pngs.append(os.path.join(output_dir, SHARPNESS_PNG))
    plot_sharpness(study, pngs[-1])
  return {
    "json": json_path,
    "pngs": pngs,
    "table": doc["table"],
    "paired_differences": doc["paired_differences"],
    "alpha_summary": doc["alpha_summary"],
    "sharpness_summary": doc["sharpness_summary"],
  }
