"""Does ``jax.vmap`` over seeds pay? Batched runs against a loop of single runs, side by side in one process.

For SGD, SAM and XSAM on the main arm, ``n`` seeds are trained as one
vmapped call and as a Python loop of single-run calls of the same (compiled)
program, alternating, after a warm-up call that compiles both; the best of
``rounds`` per mode counts (the machine is shared, so the minimum is the
least disturbed). The XSAM probe check: the batched program must keep its
``cond`` (:func:`experiments.protocol.programs.cond_survives`), and XSAM's
cost relative to SAM must be about the same batched as looped (if the
probes ran on every step, batched XSAM would cost several times SAM).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from experiments.protocol import programs
from experiments.protocol.runner import Arm, Runner, Setting


def measure_vmap(runner: Runner, arm: Arm, *, n: int = 4, epochs: int = 4, rounds: int = 3) -> dict[str, Any]:
  """The measurement of the module docstring; returns a JSON-ready dict (``speedup`` = loop time / vmap time)."""
  c = runner.config
  epochs = min(epochs, c.epochs)
  lr, wd, rho = c.lrs[len(c.lrs) // 2], c.wds[len(c.wds) // 2], c.rhos[len(c.rhos) // 2]
  problem = runner.problem(arm, "val")
  data = runner.splits(arm.regime)
  kw: dict[str, Any] = {"input_shape": data.input_shape, "num_classes": data.num_classes}
  seeds = list(range(n))
  out: dict[str, Any] = {"n_runs": n, "epochs": epochs, "rounds": rounds, "methods": {}}
  for method in ("sgd", "sam", "xsam"):
    setting = Setting.make(method, lr=lr, wd=wd, rho=rho, rho_max=2 * rho)
    static = dataclasses.replace(runner.static(arm, setting), epochs=epochs)
    hps = [dict(setting.hp)] * n
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    for r in range(rounds + 1):
      for mode in ("loop", "vmap"):
        t0 = time.perf_counter()
        programs.train_runs(static, hps, seeds, problem, batched=mode == "vmap", **kw)
        if r:  # round 0 compiles
          times[mode].append((time.perf_counter() - t0) / n)
    loop, vmap = min(times["loop"]), min(times["vmap"])
    out["methods"][method] = {"loop_s_per_run": loop, "vmap_s_per_run": vmap, "speedup": loop / vmap}
    runner.log(f"[protocol] vmap {method}: loop {loop:.2f} s/run, vmap {vmap:.2f} s/run ({loop / vmap:.2f}x)")
  m = out["methods"]
  out["xsam_over_sam"] = {
    mode: m["xsam"][f"{mode}_s_per_run"] / m["sam"][f"{mode}_s_per_run"] for mode in ("loop", "vmap")
  }
  xsam_static = dataclasses.replace(
    runner.static(arm, Setting.make("xsam", lr=lr, wd=wd, rho=rho, rho_max=2 * rho)), epochs=epochs
  )
  out["xsam_cond_kept_under_vmap"] = programs.cond_survives(xsam_static, problem, **kw)
  speedups = [v["speedup"] for v in m.values()]
  out["verdict"] = (
    f"vmap pays ({min(speedups):.2f}-{max(speedups):.2f}x)"
    if min(speedups) > 1.1
    else f"vmap does not pay on this machine (loop / vmap {min(speedups):.2f}-{max(speedups):.2f}x)"
  )
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """``python -m experiments.protocol.timing [--out DIR]``: the measurement for both models, into ``DIR/vmap.json``."""
  import argparse
  import json

  from experiments.protocol import report, stages
  from experiments.protocol.config import ProtocolConfig
  from experiments.protocol.store import Store

  parser = argparse.ArgumentParser(prog="python -m experiments.protocol.timing", description=__doc__)
  parser.add_argument("--out", default=os.path.join("results", "protocol"), help="output folder")
  parser.add_argument("--n", type=int, default=4, help="runs per mode")
  parser.add_argument("--epochs", type=int, default=4, help="epochs per run")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (the best counts)")
  args = parser.parse_args(argv)
  doc: dict[str, Any] = {
    "machine": report.machine(),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": "python -m experiments.protocol.timing " + " ".join(argv if argv is not None else sys.argv[1:]),
    "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }
  for model in ("cnn1d", "mlp"):
    config = ProtocolConfig.default().replace(model=model)
    with tempfile.TemporaryDirectory() as work:
      runner = Runner(config, Store(work), progress=False)
      doc[model] = measure_vmap(runner, stages.main_arm(config), n=args.n, epochs=args.epochs, rounds=args.rounds)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "vmap.json"), "w") as f:
    json.dump(doc, f, indent=1)
  return doc


if __name__ == "__main__":
  main(sys.argv[1:])
