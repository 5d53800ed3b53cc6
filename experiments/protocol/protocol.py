"""The whole protocol: selection on validation, then one test phase, then the reports.

:func:`run` is what ``python -m experiments.protocol`` calls. Order: (vmap
measurement), the single-step selection on the main arm, the varying-rho
selection, the regimes' selections, then the test phase (every selected
setting, the multi-step stage's settings), then the 2-D axes sweep, then
``protocol.json`` and ``tables.md`` in the output folder. Every run is
stored in ``<workdir>/runs.jsonl`` as soon as it finishes (resumable).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable
from typing import Any

from experiments.core.report import rounded
from experiments.protocol import curves, report, stages
from experiments.protocol.config import ProtocolConfig
from experiments.protocol.runner import Arm, Runner, Setting
from experiments.protocol.store import Store
from experiments.protocol.tables import markdown

JSON_FILE = "protocol.json"
TABLES_FILE = "tables.md"
VMAP_FILE = "vmap.json"
REGIME_PAIRS = (("sam", "sgd"), ("xsam", "sgd"), ("xsam", "sam"), ("xsam", "xsam_fixed"), ("xsam_fixed", "sam"))
RHO_PAIRS = (("xsam", "sam"), ("xsam", "xsam_fixed"), ("xsam_fixed", "sam"))


def _row(row: dict[str, Any]) -> dict[str, Any]:
  return {**row, "setting": row["setting"].to_dict()}


def _selection_json(sel: dict[str, Any]) -> dict[str, Any]:
  return {
    "selected": {k: _row(v) for k, v in sel["selected"].items()},
    "grids": {k: [_row(r) for r in rows] for k, rows in sel["grids"].items()},
  }


def _tests_json(entries: dict[str, Any]) -> dict[str, Any]:
  return {
    label: {"setting": e["setting"].to_dict(), "seeds": e["seeds"], **report.run_summary(e["records"])}
    for label, e in entries.items()
  }


def _write(out: str, name: str, doc: Any) -> None:
  with open(os.path.join(out, name), "w") as f:
    f.write(json.dumps(rounded(doc), indent=1, allow_nan=False) + "\n")


def run(
  config: ProtocolConfig,
  out: str,
  *,
  workdir: str | None = None,
  command: str = "",
  progress: bool = True,
  log: Callable[[str], Any] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the protocol of ``config``; writes ``protocol.json`` and ``tables.md`` into ``out``.

  Args:
    config: the protocol's settings.
    out: output folder.
    workdir: folder of the run store (default ``runs/protocol``, ``runs/protocol/quick`` for the quick mode).
    command: the command line, recorded in the outputs.
    progress: show progress bars.
    log: where progress lines go.

  Returns:
    The JSON document written (with ``runs_trained``: the runs this call trained).
  """
  t_start = time.perf_counter()
  workdir = workdir or os.path.join("runs", "protocol", *(["quick"] if config.mode == "quick" else []))
  os.makedirs(out, exist_ok=True)
  store = Store(workdir)
  runner = Runner(config, store, progress=progress, log=log)
  wall: dict[str, float] = {}
  trained: dict[str, int] = {}

  def timed(name: str, fn: Callable[[], Any]) -> Any:
    t0, n0 = time.perf_counter(), store.trained
    result = fn()
    wall[name], trained[name] = time.perf_counter() - t0, store.trained - n0
    log(f"[protocol] {name}: {wall[name]:.0f} s, {trained[name]} runs trained")
    return result

  main = stages.main_arm(config)
  doc: dict[str, Any] = {"study": "the XSAM paper's protocol on MNIST-1D", "mode": config.mode}
  if "vmap" in config.stages:
    from experiments.protocol import timing  # not at the top: `python -m experiments.protocol.timing` runs it

    doc["vmap"] = timed("vmap", lambda: timing.measure_vmap(runner, main))
    _write(out, VMAP_FILE, {"machine": report.machine(), **doc["vmap"]})
  single = timed(
    "select: single step",
    lambda: stages.tune_single(runner, main, alphas=config.fixed_alphas, baselines=config.baselines),
  )
  rho = timed("select: rho", lambda: stages.tune_rho(runner, main, single)) if "rho" in config.stages else []
  arms = [stages.regime_arm(config, name) for name in config.regimes] if "regimes" in config.stages else []
  regimes: dict[str, dict[str, Any]] = {}
  for arm in arms:

    def select(arm: Arm = arm) -> dict[str, Any]:
      return stages.tune_single(runner, arm, alphas=config.coarse_alphas, baselines=False)

    regimes[arm.name] = timed(f"select: {arm.name}", select)

  # The test phase: the only reads of the test split.
  n = config.test_seeds
  plan: list[tuple[Arm, str, Setting, int]] = [(main, m, r["setting"], n) for m, r in single["selected"].items()]
  for entry in rho:
    plan += [(main, f"{m}@rho={entry['rho']:g}", entry[m]["setting"], n) for m in ("sam", "xsam", "xsam_fixed")]
  multistep = stages.multistep_settings(config, single) if "multistep" in config.stages else {}
  plan += [(main, f"{m}@K={k}", s, config.multistep_seeds) for (m, k), s in multistep.items()]
  for arm in arms:
    plan += [(arm, m, r["setting"], n) for m, r in regimes[arm.name]["selected"].items()]
  selections = {"main": single, **regimes}
  for arm in [main, *arms]:
    plan += [(arm, label, s, n) for label, s in curves.plan(config, selections[arm.name]).items()]
  tests = timed("test phase", lambda: stages.test_phase(runner, plan))

  main_tests = {k: v for k, v in _tests_json(tests.get("main", {})).items() if not k.startswith(curves.PREFIX)}
  single_tests = {m: main_tests[m] for m in single["selected"]}
  doc |= {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": command,
    "machine": report.machine(),
    "config": dataclasses.asdict(config),
    "rules": rules(config),
    "selection": {"main": _selection_json(single), **{k: _selection_json(v) for k, v in regimes.items()}},
    "single_step": {"tests": single_tests, "comparisons": report.comparisons(single_tests, report.SINGLE_PAIRS)},
    "rho": [_rho_json(entry, main_tests) for entry in rho],
    "multistep": _multistep_json(config, multistep, main_tests),
    "regimes": {},
  }
  doc["regimes"], doc["curves"] = _regimes_and_curves(config, [main, *arms], selections, tests)
  doc["toy2d"] = timed("toy2d axes", lambda: stages.toy2d_stage(config, log)) if "toy2d" in config.stages else {}
  doc["test_reads"] = sorted(set(runner.test_reads))
  doc["runs_trained"] = store.trained
  doc["runs_stored"] = len(store.records)
  doc["stage_wall_time_s"] = wall
  doc["stage_runs_trained"] = trained
  doc["wall_time_s"] = time.perf_counter() - t_start
  _write(out, JSON_FILE, doc)
  with open(os.path.join(out, TABLES_FILE), "w") as f:
    f.write(markdown(doc))
  curves.plot(doc["curves"], os.path.join(out, curves.PLOT_FILE))
  log(
    f"[protocol] wrote {out}/{JSON_FILE} and {TABLES_FILE} ({doc['wall_time_s']:.0f} s, {store.trained} runs trained)"
  )
  return doc


def _regimes_and_curves(
  config: ProtocolConfig, arms: list[Arm], selections: dict[str, Any], tests: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The regimes' sections (``arms[1:]``) and every arm's test curves (:mod:`experiments.protocol.curves`)."""
  regimes, arm_curves = {}, {}
  for i, arm in enumerate(arms):
    t = _tests_json(tests[arm.name])
    if i:
      regimes[arm.name] = {
        "arm": dataclasses.asdict(arm),
        "tests": {k: v for k, v in t.items() if not k.startswith(curves.PREFIX)},
        "comparisons": report.comparisons(t, REGIME_PAIRS),
      }
    arm_curves[arm.name] = curves.curves(config, selections[arm.name], t)
  return regimes, arm_curves


def rules(config: ProtocolConfig) -> dict[str, str]:
  """The protocol's rules, in words (recorded with the results)."""
  radius = (
    "K ascent steps of length rho/K each (total displacement at most rho): the rule of Kim et al. 2023 as the XSAM "
    "authors' code implements it (docs/algorithm.md)"
    if config.multistep_radius == "split"
    else "K ascent steps of length rho each (the library is given K * rho)"
  )
  seeds = f"seeds 0..{config.tune_seeds - 1}"
  ties = (
    "each method's own hyperparameter (SAM's rho, XSAM's rho_max / rho, the fixed alpha, GSAM's alpha, WSAM's "
    "gamma): among the grid points within one paired standard error of the best validation mean, the one nearest "
    "the method's baseline (SGD for SAM, SAM for the others); lr and wd: the best mean"
    if config.tie_rule == "nearest_within_se"
    else "the best validation mean everywhere"
  )
  return {
    "split": f"{config.val_fraction:g} of MNIST-1D's 4000 training series held out (split seed "
    f"{config.split_seed}); test (1000 series) read only in the test phase",
    "tuning": f"validation accuracy at the last epoch, mean over {seeds}; SGD full lr x wd grid; SAM coordinate "
    "search rho -> lr -> wd (-> rho) from SGD's lr, wd; XSAM rho_max, fixed alpha, GSAM alpha, WSAM gamma with "
    "SAM's lr, wd, rho",
    "near_ties": ties,
    "test": f"{config.test_seeds} fresh seeds from {config.test_seed_offset}; paired by seed (same init and data "
    "order); 95% t intervals of the mean difference",
    "curves": "besides the selected settings, every rho_max factor of the grid and every fixed alpha of the coarse "
    "grid on test, paired with SAM (XSAM - SAM along the grid, next to the same difference on validation)",
    "multistep_radius": radius,
    "multistep_tuning": "none: SAM's lr, wd, rho and XSAM's rho_max / rho factor from K = 1, as in the paper",
    "xsam_probes": "alpha probed on the grid 0, 0.1, ..., 2 once per epoch (the paper's schedule)",
  }


def _rho_json(entry: dict[str, Any], tests: dict[str, Any]) -> dict[str, Any]:
  label = f"@rho={entry['rho']:g}"
  t = {m: tests[m + label] for m in ("sam", "xsam", "xsam_fixed")}
  return {
    "factor": entry["factor"],
    "rho": entry["rho"],
    "selected": {m: _row(entry[m]) for m in ("sam", "xsam", "xsam_fixed")},
    "grids": [_row(r) for r in entry["grids"]],
    "tests": t,
    "comparisons": report.comparisons(t, RHO_PAIRS),
  }


def _multistep_json(config: ProtocolConfig, settings: dict[tuple[str, int], Setting], tests: dict[str, Any]) -> dict:
  if not settings:
    return {}
  table = {f"{m}@K={k}": tests[f"{m}@K={k}"] for m, k in settings}
  comps = []
  for k in config.ks:
    at_k = {m: table[f"{m}@K={k}"] for m in config.multistep_methods}
    comps += [
      {**c, "K": k} for c in report.comparisons(at_k, [(m, "sam") for m in config.multistep_methods if m != "sam"])
    ]
  trend = []
  for m in config.multistep_methods:
    for k in config.ks[1:]:
      pair = {f"K={k}": table[f"{m}@K={k}"], f"K={config.ks[0]}": table[f"{m}@K={config.ks[0]}"]}
      trend += [{**c, "method": m} for c in report.comparisons(pair, [(f"K={k}", f"K={config.ks[0]}")])]
  return {"radius_rule": config.multistep_radius, "tests": table, "vs_sam": comps, "vs_first_k": trend}
