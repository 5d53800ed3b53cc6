"""The sharpness study's measurements (Hessian eigenvalues, average sharpness, XSAM's plane) and outputs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import xsam_jax
from experiments.sharpness_study.config import SharpnessConfig
from experiments.sharpness_study.dynamics import METHODS, load_data, make_loss_fn, train
from experiments.sharpness_study.plots import plot_planes
from xsam_jax import sharpness


def measure(
  params: Any, c: SharpnessConfig, subset: Any, loss_fn: Callable[[Any], jax.Array], avg_key: jax.Array
) -> tuple[dict[str, Any], sharpness.XSAMPlane]:
  """The sharpness metrics of one trained model on a fixed training subset.

  ``loss_fn`` is the loss on ``subset = (x, y)``, one object for all models
  so the compiled solvers are reused.
  """
  del subset  # loss_fn is the loss on it already
  t0 = time.perf_counter()
  eig = sharpness.hessian_eigenpairs(loss_fn, params, c.num_eigs, block_size=c.eig_block)
  lam = np.asarray(eig.eigenvalues, np.float64)
  t_eig = time.perf_counter() - t0
  avg = float(
    sharpness.average_sharpness(loss_fn, params, avg_key, rho=c.avg_rho, num_directions=c.avg_directions, batch_size=16)
  )
  plane = sharpness.xsam_directions(loss_fn, params, rho=c.rho, rho_max=c.probe_radius)
  return {
    "train_loss": float(loss_fn(params)),
    "eigenvalues": [float(v) for v in lam],
    "lambda_max": float(lam[0]),
    "lambda1_over_lambda5": float(lam[0] / lam[-1]),
    "lobpcg_iterations": int(eig.num_iterations),
    "eig_seconds": round(t_eig, 2),
    "avg_sharpness": avg,
    "xsam_theta": float(plane.theta),
    "xsam_alpha_star": float(plane.alpha),
  }, plane


def _summary(values):
  a = np.asarray(values, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


METRICS = (
  ("test_acc", "test acc", "{:.3f}"),
  ("train_loss", "train loss", "{:.4f}"),
  ("lambda_max", "lambda_max", "{:.3f}"),
  ("lambda1_over_lambda5", "lambda_1/lambda_5", "{:.2f}"),
  ("avg_sharpness", "avg sharpness", "{:.4f}"),
  ("xsam_theta", "theta (rad)", "{:.3f}"),
)


def markdown_table(summary: dict) -> str:
  head = "| method | " + " | ".join(label for _, label, _ in METRICS) + " |"
  rule = "|---|" + "---|" * len(METRICS)
  rows = [head, rule]
  for method in METHODS:
    cells = []
    for key, _, fmt in METRICS:
      s = summary[method][key]
      cells.append(fmt.format(s["mean"]) + (" ± " + fmt.format(s["std"]) if s["std"] else ""))
    rows.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def claim_check(runs: dict, key: str) -> dict:
  """How often ``SGD > SAM > XSAM`` holds for metric ``key`` (per seed and on the means)."""
  seeds = len(runs["SGD"])
  per_seed = [runs["SGD"][s][key] > runs["SAM"][s][key] > runs["XSAM"][s][key] for s in range(seeds)]
  means = {m: float(np.mean([r[key] for r in runs[m]])) for m in METHODS}
  return {
    "holds_on_seeds": int(sum(per_seed)),
    "seeds": seeds,
    "holds_on_means": bool(means["SGD"] > means["SAM"] > means["XSAM"]),
    "order_of_means": sorted(METHODS, key=lambda m: -means[m]),
  }


def run(c: SharpnessConfig, out: str, command: str, log: Callable[[str], object] = print) -> dict[str, Any]:
  """Trains, measures, plots and writes the JSON + markdown; returns the JSON dict."""
  c = c.replace(rho_max=c.probe_radius)  # recorded as the number it is
  t_start = time.perf_counter()
  os.makedirs(out, exist_ok=True)
  data = load_data(c.dataset, c.max_train)
  log(
    f"[sharpness] {c.dataset}: {len(data[1])} train / {len(data[3])} test, MLP {c.hidden}, "
    f"{c.epochs} epochs x {len(data[1]) // c.batch_size} steps, {c.seeds} seed(s)"
  )
  # One loss object (a fixed training subset) for all models: the compiled
  # solvers are reused, and HVPs / surfaces stay cheap.
  subset = (data[0][: c.measure_examples], data[1][: c.measure_examples])
  train_loss_fn = make_loss_fn(*subset)
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
  picture_models = {}
  avg_key = jax.random.key(2026)
  for seed in range(c.seeds):
    for method in METHODS:
      t0 = time.perf_counter()
      params, history = train(method, seed, c, data)
      t_train = time.perf_counter() - t0
      metrics, plane = measure(params, c, subset, train_loss_fn, avg_key)
      metrics.update(
        seed=seed,
        test_acc=history["test_acc"],
        train_seconds=round(t_train, 2),
        final_epoch_loss=history["train_loss"][-1],
      )
      if method == "XSAM":
        metrics["alpha_per_epoch"] = history["alpha"]
      runs[method].append(metrics)
      if seed == 0:
        picture_models[method] = (params, plane)
      log(
        f"  seed {seed} {method:4s}: test acc {metrics['test_acc']:.3f}  train loss "
        f"{metrics['train_loss']:.4f}  lambda_1..5 {np.round(metrics['eigenvalues'], 3).tolist()}  "
        f"avg sharpness {metrics['avg_sharpness']:.4f}  ({t_train:.1f} s train, "
        f"{metrics['eig_seconds']:.1f} s eig, {metrics['lobpcg_iterations']} it)"
      )
  summary = {m: {key: _summary([r[key] for r in runs[m]]) for key, _, _ in METRICS} for m in METHODS}
  claims = {key: claim_check(runs, key) for key in ("lambda_max", "lambda1_over_lambda5", "avg_sharpness")}
  paths = plot_planes(picture_models, c, train_loss_fn, out)
  wall = time.perf_counter() - t_start
  payload = {
    "study": "sharpness at the end of training: SGD vs SAM vs XSAM (XSAM paper: SGD > SAM > XSAM)",
    "command": command,
    "date": datetime.date.today().isoformat(),
    "wall_time_s": round(wall, 1),
    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "backend": jax.default_backend()},
    "versions": {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "xsam_jax": xsam_jax.__version__,
      "python": platform.python_version(),
    },
    "config": dataclasses.asdict(c),
    "protocol": {
      "loss": (
        f"mean cross-entropy on the first {c.measure_examples} training examples "
        "(no weight-decay term); every metric below uses this loss"
      ),
      "eigenvalues": (
        f"xsam_jax.sharpness.hessian_eigenpairs(k={c.num_eigs}, block_size={c.eig_block}): "
        "LOBPCG on forward-over-reverse HVPs, largest algebraic, float32"
      ),
      "avg_sharpness": (
        f"mean over {c.avg_directions} filter-normalized Gaussian directions of "
        f"L(w + {c.avg_rho} d) - L(w); biases not perturbed; same directions for all models"
      ),
      "xsam_plane": f"xsam_directions(rho={c.rho}, rho_max={c.rho_max}) on that loss",
      "optimizers": (
        f"SGD momentum {c.momentum}, lr {c.lr} cosine, weight decay {c.weight_decay} "
        f"(decoupled, optax.add_decayed_weights), batch {c.batch_size}; SAM rho={c.rho}; "
        f"XSAM rho={c.rho}, rho_max={c.rho_max}, alpha probed once per epoch"
      ),
    },
    "summary": summary,
    "claim_sgd_gt_sam_gt_xsam": claims,
    "runs": runs,
    "pictures": {k: os.path.basename(v) for k, v in paths.items()},
  }
  with open(os.path.join(out, "sharpness.json"), "w") as fh:
    json.dump(payload, fh, indent=1)
  lines = [
    f"# Sharpness at the end of training ({c.dataset}, MLP {list(c.hidden)}, {c.seeds} seed(s), {c.mode})",
    "",
    f"Command: `{command}`; {payload['date']}; wall time {wall:.0f} s on {os.cpu_count()} CPU core(s).",
    "",
    (
      f"Mean ± std over seeds. lambda: Hessian eigenvalues of the loss on {c.measure_examples} training examples; "
      f"avg sharpness: rho={c.avg_rho}, {c.avg_directions} filter-normalized directions; "
      "theta: angle of XSAM's plane at the final weights."
    ),
    "",
    markdown_table(summary),
    "",
    "Paper's claim SGD > SAM > XSAM:",
    "",
  ]
  for key, res in claims.items():
    lines.append(
      f"- {key}: holds on {res['holds_on_seeds']}/{res['seeds']} seeds; order of the means: "
      f"{' > '.join(res['order_of_means'])}"
    )
  lines += ["", "![XSAM plane](plane_xsam.png)", "", "![random plane](plane_random.png)", ""]
  with open(os.path.join(out, "sharpness.md"), "w") as fh:
    fh.write("\n".join(lines))
  log(markdown_table(summary))
  for key, res in claims.items():
    log(
      f"  SGD > SAM > XSAM on {key}: {res['holds_on_seeds']}/{res['seeds']} seeds, means: "
      f"{' > '.join(res['order_of_means'])}"
    )
  log(f"[sharpness] wrote {out}/ in {wall:.1f} s")
  return payload
