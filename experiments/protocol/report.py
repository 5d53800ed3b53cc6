"""The protocol's tables: test accuracy per method, paired differences with 95% t intervals, the selections.

:func:`summarize_test` turns the test phase's records into per-method
summaries; :func:`comparisons` pairs methods over the shared test seeds
(same seed: same initialisation and data order); :func:`markdown` writes
``tables.md``. Accuracies are in percent, differences in percentage points.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from experiments.core import report as core_report
from experiments.core import stats

SINGLE_PAIRS = (
  ("sam", "sgd"),
  ("xsam", "sgd"),
  ("xsam", "sam"),
  ("xsam", "xsam_fixed"),
  ("xsam_fixed", "sam"),
  ("gsam", "sam"),
  ("wsam", "sam"),
  ("xsam", "gsam"),
  ("xsam", "wsam"),
)
"""The single-step comparisons ``(a, b)``: ``a - b`` per seed (those whose methods ran)."""


def _version(name: str) -> str | None:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def machine() -> dict[str, Any]:
  """CPU model, core count, platform and the versions of the packages that shape the numbers."""
  import jax

  versions = {name: _version(name) for name in ("jax", "jaxlib", "optax", "flax", "numpy", "mnist1d")}
  return {
    "cpu": core_report.cpu_name(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax_backend": jax.default_backend(),
    "versions": versions,
  }


def _pct(x: float) -> float:
  return 100.0 * x


def run_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Test accuracy per seed and its summary, the final training loss and, for XSAM, alpha's diagnostics."""
  res = [r["result"] for r in records]
  accs = [_pct(float(r["eval_acc"])) for r in res]
  out: dict[str, Any] = {
    "test_acc": accs,
    "summary": stats.summary(accs),
    "train_loss": stats.summary([float(r["train_loss_final"]) for r in res]),
    "train_acc": stats.summary([_pct(float(r["train_acc_final"])) for r in res]),
    "time_s": float(np.mean([r["time_s"] for r in records])),
  }
  if "epoch_sharpness" in res[0]:
    out["sharpness_last_epoch"] = stats.summary([float(r["epoch_sharpness"][-1]) for r in res])
  if "epoch_alpha" in res[0]:
    alphas = np.asarray([r["epoch_alpha"] for r in res], np.float64)  # one probe round per epoch
    grid_top = float(np.max(alphas)) if alphas.size else math.nan
    out["alpha"] = {
      "mean": float(alphas.mean()),
      "last_epoch_mean": float(alphas[:, -1].mean()),
      "at_2": float(np.mean(alphas >= 1.95)),
      "at_0": float(np.mean(alphas <= 0.05)),
      "max": grid_top,
      "probe_gap_last_epoch": float(np.mean([r["epoch_probe_gap"][-1] for r in res])),
    }
  return out


def comparisons(tests: dict[str, dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
  """Paired differences ``a - b`` (pp) over the shared seeds, for each pair whose methods are in ``tests``."""
  out = []
  for a, b in pairs:
    if a not in tests or b not in tests:
      continue
    ra, rb = tests[a], tests[b]
    common = [s for s in ra["seeds"] if s in rb["seeds"]]
    acc_a = dict(zip(ra["seeds"], ra["test_acc"], strict=True))
    acc_b = dict(zip(rb["seeds"], rb["test_acc"], strict=True))
    out.append({"a": a, "b": b, **stats.paired([acc_a[s] for s in common], [acc_b[s] for s in common])})
  return out


def fmt_ci(c: dict[str, Any]) -> str:
  """``+0.42 [-0.10, +0.94]``."""
  if math.isnan(c["low"]):
    return f"{c['mean']:+.2f}"
  return f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def verdict(c: dict[str, Any]) -> str:
  """``a > b``, ``a < b`` or ``no difference resolved`` from the 95% interval."""
  if math.isnan(c["low"]) or c["low"] <= 0 <= c["high"]:
    return "no difference resolved (CI contains 0)"
  return f"{c['a']} > {c['b']}" if c["low"] > 0 else f"{c['a']} < {c['b']}"


def mean_std(s: dict[str, Any], digits: int = 2) -> str:
  """``mean ± std`` of a :func:`stats.summary`."""
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def setting_label(setting: dict[str, Any], name: str | None = None) -> str:
  """``K=2 lr=0.05, wd=0.0005, rho=0.1``-like text of a setting dict.

  ``name`` is the row's method: when the fixed-alpha baseline selected
  alpha = 1 (its run is SAM's), the label says so.
  """
  keys = [k for k in ("lr", "wd", "rho", "rho_max", "alpha", "gamma") if k in setting]
  k = f"K={setting['num_steps']} " if setting.get("num_steps", 1) > 1 else ""
  text = k + ", ".join(f"{n}={setting[n]:g}" for n in keys)
  if name == "xsam_fixed" and setting.get("method") == "sam":
    text += ", alpha=1 (SAM's run)"
  return text


def method_table(tests: dict[str, dict[str, Any]]) -> list[str]:
  """Markdown rows: method, settings, test accuracy, final training loss/accuracy, alpha diagnostics."""
  lines = [
    "| method | settings | test acc (%) | n | train loss | train acc (%) | alpha mean (at 2.0) | s / run |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, t in tests.items():
    alpha = f"{t['alpha']['mean']:.2f} ({100 * t['alpha']['at_2']:.0f}%)" if "alpha" in t else ""
    lines.append(
      f"| {name} | {setting_label(t['setting'], name)} | {mean_std(t['summary'])} | {t['summary']['n']} | "
      f"{mean_std(t['train_loss'], 4)} | {mean_std(t['train_acc'])} | {alpha} | {t['time_s']:.1f} |"
    )
  return lines


def comparison_table(comps: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown rows: pair, mean difference with its 95% t interval, wins/ties/losses, verdict."""
  lines = ["| a - b | mean diff (pp) [95% CI] | wins / ties / losses of a | verdict |", "|---|---|---|---|"]
  lines += [
    f"| {c['a']} - {c['b']} | {fmt_ci(c)} | {c['wins']} / {c['ties']} / {c['losses']} | {verdict(c)} |" for c in comps
  ]
  return lines


def selection_table(selection: dict[str, Any]) -> list[str]:
  """Markdown rows: method, the selected settings, their validation accuracy."""
  lines = ["| method | selected on validation | val acc (%) |", "|---|---|---|"]
  for name, row in selection["selected"].items():
    acc = f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}"
    lines.append(f"| {name} | {setting_label(row['setting'], name)} | {acc} |")
  return lines


def grid_tables(selection: dict[str, Any]) -> list[str]:
  """Every tuned grid: setting, validation accuracy (and XSAM's alpha), the selected one in bold."""
  lines: list[str] = []
  for name, rows in selection["grids"].items():
    chosen = selection["selected"][name]["setting"]
    lines += ["", f"{name}:", "", "| setting | val acc (%) | alpha mean (at 2.0) |", "|---|---|---|"]
    for r in rows:
      text = f"{setting_label(r['setting'])} ({r['setting']['method']})"
      cell = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
      alpha = f"{r['alpha_mean']:.2f} ({100 * r['alpha_at_2']:.0f}%)" if "alpha_mean" in r else ""
      bold = r["setting"] == chosen
      lines.append(f"| **{text}** | **{cell}** | {alpha} |" if bold else f"| {text} | {cell} | {alpha} |")
  return lines
