"""The language-model study's outputs: ``lm.json``, ``tables.md`` and ``curves.png``."""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path
from typing import Any

from experiments.core import report as core_report
from experiments.lm import runs

LABELS = {
  "adamw": "AdamW",
  "adamw_2x": "AdamW, 2x steps",
  "sam": "SAM",
  "xsam": "XSAM",
  "xsam_fixed": "fixed alpha",
  "functional_sam": "Functional SAM",
  "preconditioned_sam": "preconditioned SAM",
  "functional_preconditioned": "Functional + preconditioned",
  "momentum_sam": "Momentum-SAM",
  "rwp": "RWP",
}


def _interval(d: dict[str, float], scale: float = 1.0) -> str:
  """``+0.012 [-0.003, +0.027]`` (the paired mean difference and its 95% interval, times ``scale``)."""
  if not math.isfinite(d["low"]):
    return f"{scale * d['mean']:+.4f}"
  return f"{scale * d['mean']:+.4f} [{scale * d['low']:+.4f}, {scale * d['high']:+.4f}]"


def _verdict(d: dict[str, float]) -> str:
  """``better`` / ``worse`` when the interval of ``method - AdamW`` in test loss excludes 0, else ``tie``."""
  if d["high"] < 0:
    return "better"
  if d["low"] > 0:
    return "worse"
  return "tie"


def markdown(doc: dict[str, Any], command: str) -> str:
  """The study's tables as Markdown: selections, test losses, paired differences, XSAM's alpha."""
  c = doc["config"]
  ln2 = math.log(2.0)
  lines = [
    f"# Language-model study ({c['mode']})",
    "",
    f"{doc['date']}; {doc['machine']}. Command: `{command}`. Wall time {doc['wall_time_s'] / 60:.1f} min.",
    (
      f"Text: {doc['corpus']['source']}, {' / '.join(str(n) for n in doc['corpus']['characters'])} characters "
      "(train / validation / test, split by position). "
      f"Model: width {c['width']}, {c['depth']} blocks, {c['heads']} heads, context {c['context']}; "
      f"{c['steps']} steps of {c['batch_size']} windows; AdamW (b2 {c['b2']}, weight decay {c['weight_decay']}); "
      f"tuned on validation with {c['tune_seeds']} seeds per point, tested with {c['test_seeds']} fresh seeds."
    ),
    "",
    "## Selected on validation",
    "",
    "| method | hyperparameters | validation loss (tuning mean) |",
    "|---|---|---|",
  ]
  for method, hp in doc["selected"].items():
    val = min(p["val_loss"] for p in doc["tuning"][method]["points"])
    lines.append(f"| {LABELS[method]} | {', '.join(f'{k} {v:g}' for k, v in hp.items())} | {val:.4f} |")
  lines += [
    "",
    "## Test loss, and the paired difference to AdamW",
    "",
    "Nats per character (bits per character: divide by ln 2). A difference below 0 is better than AdamW;",
    "95% paired t intervals over the test seeds. Equal compute: against AdamW trained twice as many",
    "steps (two gradients per step for the sharpness-aware methods; Momentum-SAM takes one).",
    "",
    "| method | test loss | bits / char | - AdamW, equal steps | verdict | - AdamW 2x, equal compute | verdict |",
    "|---|---|---|---|---|---|---|",
  ]
  for method, t in doc["test"].items():
    comp = doc["comparisons"].get(method, {})
    steps = comp.get("equal_steps")
    compute = comp.get("equal_compute")
    lines.append(
      f"| {LABELS[method]} | {t['mean']:.4f} ± {t['std']:.4f} | {t['mean'] / ln2:.4f} | "
      f"{_interval(steps) if steps else ''} | {_verdict(steps) if steps else ''} | "
      f"{_interval(compute) if compute else ''} | {_verdict(compute) if compute else ''} |"
    )
  a = doc["alpha"]
  lines += [
    "",
    "## XSAM's alpha",
    "",
    (
      f"Mean alpha over the test runs' probe rounds {a['mean']:.2f}; share of rounds at the grid's top (2.0) "
      f"{a['share_at_top']:.0%}; per interval: {', '.join(f'{v:.2f}' for v in a['per_interval'])}."
    ),
    "",
  ]
  return "\n".join(lines)


def plot_curves(doc: dict[str, Any], path: Path) -> None:
  """Training and validation loss per evaluation interval (mean over the test seeds), one line per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  every = doc["config"]["eval_every"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for method, curve in doc["curves"].items():
    for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
      steps = [every * (i + 1) for i in range(len(curve[key]))]
      ax.plot(steps, curve[key], label=LABELS[method], lw=1.2, ls="--" if method == "adamw_2x" else "-")
  for ax, title in zip(axes, ("training loss (interval mean)", "validation loss"), strict=True):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("nats per character")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(doc: dict[str, Any], out: str, command: str) -> dict[str, Any]:
  """Writes ``lm.json``, ``tables.md`` and ``curves.png`` into ``out``; returns the document with date and machine."""
  import jax

  folder = Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  doc = {
    **doc,
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": (
      f"{core_report.cpu_name()} ({platform.machine()}), jax {jax.__version__}, Python {platform.python_version()}"
    ),
    "command": command,
    "gradients_per_step": runs.GRADIENTS_PER_STEP,
  }
  (folder / "lm.json").write_text(json.dumps(core_report.rounded(doc), indent=1, allow_nan=False))
  (folder / "tables.md").write_text(markdown(doc, command))
  plot_curves(doc, folder / "curves.png")
  return doc
