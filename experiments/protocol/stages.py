"""The protocol's stages: selection on validation (single step, varying rho, regimes), then the test phase.

Selection (validation split only, mean over the tuning seeds per point).
With the default ``tie_rule="nearest_within_se"``, each method's own
hyperparameter (SAM's rho; XSAM's rho_max / rho; the fixed alpha; GSAM's
alpha; WSAM's gamma) is chosen by :func:`select`: among the grid points whose
validation mean is within one paired standard error of the best one's, the
point nearest the method's baseline (SAM for SAM's relatives, SGD for SAM);
learning rate and weight decay take the best mean. ``tie_rule="argmax"``
takes the best mean everywhere. Remaining ties go to the earlier grid point.

- :func:`tune_single` (paper Sec. 5.2): SGD on the full ``lrs x wds`` grid;
  SAM by one round of coordinate search from SGD's (lr, wd): rho over
  ``rhos``, then lr over ``lrs``, then wd over ``wds``, then rho once more if
  lr or wd moved. With SAM's (lr, wd, rho) fixed: XSAM's rho_max over
  ``rho_max_factors x rho``, the fixed alpha over its grid (alpha = 1 is
  SAM), and (main arm) GSAM's alpha and WSAM's gamma over their grids.
- :func:`tune_rho` (Fig. 3b): at each ``rho_factors x rho``, with SAM's lr
  and wd, XSAM's rho_max and the fixed alpha are tuned again
  (``coarse_alphas`` plus 1 = SAM).
- :func:`multistep_settings` (Sec. 5.3): K in ``ks`` for each multi-step
  method with SAM's lr, wd and rho (``multistep_radius`` says how rho is
  split over the K steps) and XSAM's tuned rho_max factor; no tuning, as in
  the paper.

The test phase (:func:`test_phase`) trains every selected setting with the
fresh test seeds and reads the test split: nothing else does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from experiments.protocol import splits
from experiments.protocol.config import ProtocolConfig
from experiments.protocol.runner import Arm, Runner, Setting


def main_arm(config: ProtocolConfig) -> Arm:
  """The main arm: the configured model on clean MNIST-1D."""
  return Arm("main", config.model, config.width, splits.Regime(0.0, config.train_size))


def regime_arm(config: ProtocolConfig, name: str) -> Arm:
  """The extra arm ``name`` (``noise``, ``small`` or ``mlp``; see ``config.REGIMES``)."""
  if name == "noise":
    return Arm("noise", config.model, config.width, splits.Regime(config.label_noise, config.train_size))
  if name == "small":
    size = config.small_train if config.train_size is None else min(config.small_train, config.train_size)
    return Arm("small", config.model, config.width, splits.Regime(0.0, size))
  if name == "mlp":
    return Arm("mlp", "mlp", config.width, splits.Regime(0.0, config.train_size))
  raise ValueError(f"unknown regime {name!r}")


def _best(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The row with the highest validation mean (the first of equals)."""
  return max(rows, key=lambda r: r["mean"])


def near_tie(best: dict[str, Any], row: dict[str, Any]) -> bool:
  """Whether ``row``'s validation mean is within one paired standard error of ``best``'s.

  The tuning seeds are shared, so the difference is paired: with ``d`` the per-seed differences
  best - row, ``mean(d) <= std(d) / sqrt(n)`` (``std`` with ddof 1). One seed: only equal means tie.
  """
  d = [a - b for a, b in zip(best["per_seed"], row["per_seed"], strict=True)]
  mean = sum(d) / len(d)
  if len(d) < 2:
    return mean <= 0.0
  std = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
  return mean <= std / len(d) ** 0.5


def distance_to_baseline(setting: Setting, grid: str) -> float:
  """How far a setting of ``grid`` (the method whose hyperparameter the grid varies) is from its baseline.

  SAM's rho grid: rho (SGD at 0); XSAM: ``|rho_max / rho - 1|`` (the ascent radius, nearest SAM); the
  fixed alpha: ``|alpha - 1|`` (1 is SAM); GSAM: alpha (0 is SAM); WSAM: ``|gamma - 1/2|`` (1/2 is SAM).
  In a relative's grid, a row that canonicalised to SAM's run (``Setting.make``) is the baseline itself: 0.
  """
  v = setting.values
  if grid == "sam":
    return v["rho"]
  if setting.method == "sam":
    return 0.0
  if setting.method == "xsam":
    return abs(v["rho_max"] / v["rho"] - 1.0)
  if setting.method == "xsam_fixed":
    return abs(v["alpha"] - 1.0)
  if setting.method == "gsam":
    return v["alpha"]
  if setting.method == "wsam":
    return abs(v["gamma"] - 0.5)
  raise ValueError(f"no baseline distance for {setting.method!r}")


def select(rows: Sequence[dict[str, Any]], rule: str, grid: str | None) -> dict[str, Any]:
  """The selected row of one grid under the tie rule (see the module docstring).

  Args:
    rows: the grid's validation rows (``{"setting", "mean", "per_seed", ...}``), in grid order.
    rule: ``"nearest_within_se"`` or ``"argmax"``.
    grid: the method whose own hyperparameter the rows vary (the rule applies: see
      :func:`distance_to_baseline`), or None for a learning-rate / weight-decay grid (the best mean).
  """
  best = _best(rows)
  if rule == "argmax" or grid is None:
    return best
  near = [r for r in rows if near_tie(best, r)]
  return min(near, key=lambda r: distance_to_baseline(r["setting"], grid))  # min keeps the first of equals


def _unique(settings: Sequence[Setting]) -> list[Setting]:
  return list(dict.fromkeys(settings))


def tune_single(runner: Runner, arm: Arm, *, alphas: Sequence[float], baselines: bool) -> dict[str, Any]:
  """The single-step protocol's selection on ``arm`` (see the module docstring).

  Returns:
    ``{"selected": {method: row}, "grids": {method: [row, ...]}}``, a row
    being ``{"setting", "mean", "std", "per_seed"}`` (validation accuracy).
  """
  c = runner.config
  grids: dict[str, list[dict[str, Any]]] = {}
  grids["sgd"] = runner.scores(arm, [Setting.make("sgd", lr=lr, wd=wd) for lr in c.lrs for wd in c.wds], "SGD lr x wd")
  lr, wd = (_best(grids["sgd"])["setting"].values[k] for k in ("lr", "wd"))

  def sam(lr: float, wd: float, rho: float) -> Setting:
    return Setting.make("sam", lr=lr, wd=wd, rho=rho)

  seen: dict[Setting, dict[str, Any]] = {}

  def coordinate(settings: list[Setting], desc: str, grid: str | None = None) -> dict[str, float]:
    rows = runner.scores(arm, settings, desc)
    seen.update({r["setting"]: r for r in rows})
    return select(rows, c.tie_rule, grid)["setting"].values

  rho = coordinate([sam(lr, wd, r) for r in c.rhos], "SAM rho", "sam")["rho"]
  best_lr = coordinate([sam(x, wd, rho) for x in c.lrs], "SAM lr")["lr"]
  best_wd = coordinate([sam(best_lr, x, rho) for x in c.wds], "SAM wd")["wd"]
  if (best_lr, best_wd) != (lr, wd):
    rho = coordinate([sam(best_lr, best_wd, r) for r in c.rhos], "SAM rho again", "sam")["rho"]
  lr, wd = best_lr, best_wd
  grids["sam"] = list(seen.values())
  base = {"lr": lr, "wd": wd, "rho": rho}
  candidates = {
    "xsam": [Setting.make("xsam", **base, rho_max=f * rho) for f in c.rho_max_factors],
    "xsam_fixed": [Setting.make("xsam_fixed", **base, alpha=a) for a in _with_sam(alphas)],
  }
  if baselines:
    candidates["gsam"] = [Setting.make("gsam", **base, alpha=a) for a in c.gsam_alphas]
    candidates["wsam"] = [Setting.make("wsam", **base, gamma=g) for g in c.wsam_gammas]
  for name, settings in candidates.items():
    grids[name] = runner.scores(arm, _unique(settings), name)
  selected = {name: select(rows, c.tie_rule, None if name in ("sgd", "sam") else name) for name, rows in grids.items()}
  selected["sam"] = seen[sam(lr, wd, rho)]
  return {"selected": selected, "grids": grids}


def _with_sam(alphas: Sequence[float]) -> list[float]:
  """The fixed-alpha grid with 1 (SAM) in it, sorted."""
  return sorted({*alphas, 1.0})


def tune_rho(runner: Runner, arm: Arm, single: dict[str, Any]) -> list[dict[str, Any]]:
  """The varying-rho stage's selection: per rho, SAM and the tuned XSAM and fixed alpha (validation)."""
  c = runner.config
  sam = single["selected"]["sam"]["setting"].values
  out = []
  for factor in c.rho_factors:
    rho = factor * sam["rho"]
    base = {"lr": sam["lr"], "wd": sam["wd"], "rho": rho}
    xsam = runner.scores(arm, [Setting.make("xsam", **base, rho_max=f * rho) for f in c.rho_max_factors], "rho: XSAM")
    fixed = runner.scores(
      arm, _unique([Setting.make("xsam_fixed", **base, alpha=a) for a in _with_sam(c.coarse_alphas)]), "rho: alpha"
    )
    sam_row = next(r for r in fixed if r["setting"] == Setting.make("sam", **base))
    out.append(
      {
        "factor": factor,
        "rho": rho,
        "sam": sam_row,
        "xsam": select(xsam, c.tie_rule, "xsam"),
        "xsam_fixed": select(fixed, c.tie_rule, "xsam_fixed"),
        "grids": [*xsam, *fixed],
      }
    )
  return out


def lib_rho(config: ProtocolConfig, rho: float, k: int) -> float:
  """The ``rho`` given to the library for K steps (which steps ``rho / K``): ``rho`` (split) or ``K rho`` (per_step)."""
  return rho if config.multistep_radius == "split" else k * rho


def multistep_settings(config: ProtocolConfig, single: dict[str, Any]) -> dict[tuple[str, int], Setting]:
  """``(method, K) -> Setting`` of the multi-step stage, with SAM's and XSAM's tuned settings."""
  sam = single["selected"]["sam"]["setting"].values
  factor = single["selected"]["xsam"]["setting"].values["rho_max"] / sam["rho"]
  out = {}
  for k in config.ks:
    rho = lib_rho(config, sam["rho"], k)
    for m in config.multistep_methods:
      extra = {"rho_max": factor * rho} if m == "xsam" else {}
      out[(m, k)] = Setting.make(m, k, lr=sam["lr"], wd=sam["wd"], rho=rho, **extra)
  return out


def fresh_seeds(config: ProtocolConfig, n: int | None = None) -> list[int]:
  """The first ``n`` (default ``test_seeds``) fresh test seeds."""
  return [config.test_seed_offset + i for i in range(config.test_seeds if n is None else n)]


def test_phase(runner: Runner, plan: Sequence[tuple[Arm, str, Setting, int]]) -> dict[str, dict[str, Any]]:
  """Trains each planned ``(arm, label, setting, n_seeds)`` on the test seeds and reads the test split.

  Returns:
    ``{arm name: {label: {"setting", "seeds", "records"}}}``.
  """
  out: dict[str, dict[str, Any]] = {}
  groups: dict[tuple[str, int], list[tuple[Arm, str, Setting]]] = {}
  for arm, label, setting, n in plan:
    groups.setdefault((arm.name, n), []).append((arm, label, setting))
  for (_, n), items in groups.items():
    arm = items[0][0]
    seeds = fresh_seeds(runner.config, n)
    settings = _unique([s for _, _, s in items])
    rows = dict(zip(settings, runner.records(arm, settings, seeds, "test", f"test ({n} seeds)"), strict=True))
    for _, label, setting in items:
      out.setdefault(arm.name, {})[label] = {"setting": setting, "seeds": seeds, "records": rows[setting]}
  return out


def toy2d_stage(config: ProtocolConfig, log: Any = print) -> dict[str, Any]:
  """The 2-D study's momentum x alpha-period axes (``experiments.toy2d.axes_sweep``), if that function exists."""
  from experiments import toy2d

  sweep = getattr(toy2d, "axes_sweep", None)
  toy_config = getattr(toy2d, "Toy2dConfig", None)
  if sweep is None or toy_config is None:
    return {"status": "hook only: experiments.toy2d.axes_sweep does not exist"}
  t0 = time.perf_counter()
  result = sweep(toy_config.quick() if config.mode == "quick" else toy_config.default(), log=log)
  return {"status": "done", "wall_time_s": time.perf_counter() - t0, **result}
