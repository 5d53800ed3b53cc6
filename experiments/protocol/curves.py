"""XSAM - SAM along the grids: the test curves that show what holds across rho_max and alpha, not at one pick.

For an arm with its selection done, :func:`plan` names the extra test runs: XSAM at every
``rho_max_factors`` point and the fixed-alpha baseline at every ``coarse_alphas`` point (plus the
validation-selected alpha), all with SAM's tuned lr, wd and rho. :func:`curves` pairs each with SAM
over the test seeds, and with SAM over the tuning seeds on validation (the same tuning runs the
selection used), and :func:`plot` draws both curves per arm (``curves.png``).
"""

from __future__ import annotations

from typing import Any

from experiments.core import stats
from experiments.protocol.config import ProtocolConfig
from experiments.protocol.runner import Setting

PREFIX = "curve:"
"""Test-phase labels of the curves' runs start with this (they are not the selected methods' rows)."""
PLOT_FILE = "curves.png"


def _base(selection: dict[str, Any]) -> dict[str, float]:
  sam = selection["selected"]["sam"]["setting"].values
  return {"lr": sam["lr"], "wd": sam["wd"], "rho": sam["rho"]}


def _alphas(config: ProtocolConfig, selection: dict[str, Any]) -> list[float]:
  """The coarse fixed-alpha grid, 1 (SAM) and the validation-selected alpha, sorted."""
  chosen = selection["selected"]["xsam_fixed"]["setting"].values.get("alpha", 1.0)
  return sorted({*config.coarse_alphas, 1.0, chosen})


def plan(config: ProtocolConfig, selection: dict[str, Any]) -> dict[str, Setting]:
  """``{label: setting}`` of the curves' test runs for one arm (SAM's own run is among the selected ones)."""
  base = _base(selection)
  out = {f"{PREFIX}xsam@{f:g}": Setting.make("xsam", **base, rho_max=f * base["rho"]) for f in config.rho_max_factors}
  out |= {f"{PREFIX}fixed@{a:g}": Setting.make("xsam_fixed", **base, alpha=a) for a in _alphas(config, selection)}
  return out


def _validation_row(selection: dict[str, Any], setting: Setting) -> dict[str, Any] | None:
  for rows in selection["grids"].values():
    for row in rows:
      if row["setting"] == setting:
        return row
  return None


def _pct(values: list[float]) -> list[float]:
  return [100.0 * v for v in values]


def _point(x: float, setting: Setting, label: str, selection: dict[str, Any], tests: dict[str, Any]) -> dict:
  sam_val = selection["selected"]["sam"]
  sam_test, test = tests["sam"], tests[label]
  common = [s for s in test["seeds"] if s in sam_test["seeds"]]
  acc, acc_sam = (dict(zip(t["seeds"], t["test_acc"], strict=True)) for t in (test, sam_test))
  point: dict[str, Any] = {
    "x": x,
    "setting": setting.to_dict(),
    "test": stats.paired([acc[s] for s in common], [acc_sam[s] for s in common]),
    "test_acc": test["summary"],
  }
  row = _validation_row(selection, setting)
  if row is not None:  # on validation, paired over the tuning seeds
    point["val"] = stats.paired(_pct(row["per_seed"]), _pct(sam_val["per_seed"]))
  if "alpha" in test:
    point["alpha_mean"], point["alpha_at_2"] = test["alpha"]["mean"], test["alpha"]["at_2"]
  return point


def selected_points(config: ProtocolConfig, selection: dict[str, Any]) -> dict[str, float]:
  """The validation-selected points of the two curves: ``{"rho_max": factor, "alpha": alpha}``.

  The factor is the grid's own ``f`` whose curve setting (:func:`plan`'s) is the chosen one, not the
  quotient ``rho_max / rho``, which need not round back to ``f`` (``0.15 / 0.1 != 1.5``).
  """
  labels, chosen = plan(config, selection), selection["selected"]["xsam"]["setting"]
  factor = [f for f in config.rho_max_factors if labels[f"{PREFIX}xsam@{f:g}"] == chosen]
  return {
    "rho_max": factor[0] if factor else chosen.values["rho_max"] / _base(selection)["rho"],
    "alpha": selection["selected"]["xsam_fixed"]["setting"].values.get("alpha", 1.0),
  }


def curves(config: ProtocolConfig, selection: dict[str, Any], tests: dict[str, Any]) -> dict[str, Any]:
  """One arm's curves: ``{"rho_max": [point, ...], "alpha": [...], "selected": {...}}``.

  Each point: ``x`` (rho_max / rho, or alpha), ``test`` (XSAM - SAM in points over the test seeds,
  :func:`stats.paired`), ``val`` (the same on validation over the tuning seeds), the test accuracy
  and, for XSAM, its probed alpha.
  """
  selected = selected_points(config, selection)
  labels = plan(config, selection)
  rho_max = [
    _point(f, labels[f"{PREFIX}xsam@{f:g}"], f"{PREFIX}xsam@{f:g}", selection, tests) for f in config.rho_max_factors
  ]
  alpha = [
    _point(a, labels[f"{PREFIX}fixed@{a:g}"], f"{PREFIX}fixed@{a:g}", selection, tests)
    for a in _alphas(config, selection)
  ]
  return {"rho_max": rho_max, "alpha": alpha, "selected": selected}


def table(arm: str, curve: dict[str, Any]) -> list[str]:
  """Markdown rows of one arm's curves: x, validation and test differences to SAM, wins, XSAM's alpha."""
  lines = [
    (
      f"{arm}: XSAM - SAM along rho_max / rho (validation-selected: {curve['selected']['rho_max']:g}), and the "
      f"fixed alpha - SAM along alpha (selected: {curve['selected']['alpha']:g}); points, 95% t intervals."
    ),
    "",
    "| grid | point | val: a - SAM [95% CI] | test: a - SAM [95% CI] | test wins / ties / losses | alpha (at 2.0) |",
    "|---|---|---|---|---|---|",
  ]
  for name, key in (("rho_max / rho", "rho_max"), ("fixed alpha", "alpha")):
    for p in curve[key]:
      val = _ci(p["val"]) if "val" in p else "(not on the tuning grid)"
      t = p["test"]
      alpha = f"{p['alpha_mean']:.2f} ({100 * p['alpha_at_2']:.0f}%)" if "alpha_mean" in p else ""
      mark = "**" if p["x"] == curve["selected"][key] else ""
      lines.append(
        f"| {name} | {mark}{p['x']:g}{mark} | {val} | {_ci(t)} | {t['wins']} / {t['ties']} / {t['losses']} | {alpha} |"
      )
  return lines


def _ci(c: dict[str, Any]) -> str:
  if c["n"] < 2:
    return f"{c['mean']:+.2f}"
  return f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def plot(all_curves: dict[str, dict[str, Any]], path: str) -> None:
  """``curves.png``: per arm, XSAM - SAM over rho_max / rho and the fixed alpha - SAM over alpha (test and
  validation, with their 95% intervals; the validation-selected point circled)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  arms = list(all_curves)
  fig, axes = plt.subplots(len(arms), 2, figsize=(10, 3.2 * len(arms)), squeeze=False)
  for i, arm in enumerate(arms):
    curve = all_curves[arm]
    for j, (key, xlabel) in enumerate((("rho_max", "rho_max / rho"), ("alpha", "fixed alpha"))):
      ax = axes[i][j]
      pts = curve[key]
      for which, color, shift in (("test", "C0", 0.0), ("val", "C1", 0.02)):
        got = [p for p in pts if which in p]
        if not got:
          continue
        xs = [p["x"] + shift for p in got]
        mean = [p[which]["mean"] for p in got]
        err = [
          [p[which]["mean"] - p[which]["low"] if p[which]["n"] > 1 else 0.0 for p in got],
          [p[which]["high"] - p[which]["mean"] if p[which]["n"] > 1 else 0.0 for p in got],
        ]
        label = "test (10 seeds)" if which == "test" else "validation (tuning seeds)"
        ax.errorbar(xs, mean, yerr=err, fmt="o-", color=color, capsize=3, label=label)
      chosen = [p for p in pts if p["x"] == curve["selected"][key]]
      for p in chosen:
        ax.plot([p["x"]], [p["test"]["mean"]], "o", ms=14, mfc="none", mec="k", label="selected on validation")
      ax.axhline(0.0, color="gray", lw=0.8)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(("XSAM" if key == "rho_max" else "fixed alpha") + " - SAM (points)")
      ax.set_title(arm)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
