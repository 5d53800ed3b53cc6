"""Sharpness at the end of training: SGD vs SAM vs XSAM (the XSAM paper's Hessian claim).

Trains a small MLP with SGD, SAM and XSAM (same data order, initialization
and base optimizer per seed), then measures on the final parameters, with
``xsam_jax.sharpness``:

* the five largest Hessian eigenvalues of the training loss (the full
  training set, no weight decay term): ``lambda_max`` and
  ``lambda_1 / lambda_5``, as the paper reports them;
* average sharpness: the mean of ``L(w + rho d) - L(w)`` over random
  filter-normalized directions ``d`` (Li et al. 2018; biases not perturbed),
  the same directions for every model;
* XSAM's search plane at the final parameters (the paper's Fig. 1a): theta,
  the probed alpha*, and a contour picture with the SGD, SAM and XSAM
  directions; and a random filter-normalized plane per model.

The paper's claim checked here: "Hessian top eigenvalue at the end of
training: SGD > SAM > XSAM".

The training loop is self-contained (pure-function MLP, optax, one
``jax.lax.scan`` per epoch) so the Hessian is that of a plain function of the
parameters (no BatchNorm state).

Usage::

  python -m experiments.sharpness           # full study (MNIST-1D) -> results/sharpness/
  python -m experiments.sharpness --quick   # < 1 minute (digits)   -> results/sharpness/quick/

Outputs: ``sharpness.json`` (config, per-seed metrics, summary, timing),
``sharpness.md`` (the table), ``plane_xsam.png`` (Fig. 1a style, one panel
per optimizer) and ``plane_random.png`` (random filter-normalized planes).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments import data as data_lib
from xsam_jax import sharpness

METHODS = ("SGD", "SAM", "XSAM")


class Config(NamedTuple):
  """One study's settings."""

  dataset: str = "mnist1d"
  hidden: tuple = (128, 128)
  epochs: int = 40
  batch_size: int = 128
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  rho: float = 0.1
  rho_max: float = 0.2
  seeds: int = 3
  num_eigs: int = 5
  eig_block: int = 8
  avg_rho: float = 0.05
  avg_directions: int = 64
  grid: int = 21
  measure_examples: int = 1000
  max_train: int | None = None
  mode: str = "full"


FULL = Config()
QUICK = Config(
  dataset="digits",
  hidden=(16,),
  epochs=4,
  seeds=1,
  avg_directions=8,
  grid=9,
  measure_examples=300,
  max_train=512,
  mode="quick",
)


# ------------------------------------------------------------------ data


def load_data(name: str, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train, y_train, x_test, y_test)`` as standardized float32 / int32 numpy arrays.

  The arrays come from :func:`experiments.data.load_dataset` (MNIST-1D
  generated locally and cached, never downloaded; scikit-learn's digits with
  its fixed 80/20 split), flattened to vectors for the MLP.
  """
  if name not in ("mnist1d", "digits"):
    raise ValueError(f"unknown dataset {name!r} (mnist1d or digits)")
  ds = data_lib.load_dataset(name, None)
  flat = lambda a: a.reshape(len(a), -1)
  x, y, xt, yt = flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test
  if max_train is not None:
    x, y = x[:max_train], y[:max_train]
  x, xt = np.asarray(x, np.float32), np.asarray(xt, np.float32)
  mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-6
  return (x - mean) / std, np.asarray(y, np.int32), (xt - mean) / std, np.asarray(yt, np.int32)


# ----------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> dict[str, dict[str, jax.Array]]:
  """He-initialized MLP params in Flax layout (``kernel: (in, out)``, ``bias: (out,)``)."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
      "bias": jnp.zeros((fan_out,)),
    }
  return params


def apply_mlp(params: Any, x: jax.Array) -> jax.Array:
  """ReLU MLP forward pass; returns logits."""
  n = len(params)
  for i in range(n):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"] + layer["bias"][None, :]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def make_loss_fn(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> Callable[[Any], jax.Array]:
  """Mean cross-entropy on ``(x, y)`` as a function of the params."""
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss_fn(params: Any) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()

  return loss_fn


def accuracy(params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> float:
  return float(jnp.mean(jnp.argmax(apply_mlp(params, jnp.asarray(x)), -1) == jnp.asarray(y)))


# -------------------------------------------------------------- training


def make_optimizer(method: str, c: Config, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
  """SGD (momentum, cosine lr, decoupled weight decay), optionally after SAM or XSAM."""
  schedule = optax.cosine_decay_schedule(c.lr, c.epochs * steps_per_epoch)
  base = [optax.add_decayed_weights(c.weight_decay), optax.sgd(schedule, momentum=c.momentum)]
  if method == "SGD":
    return optax.chain(*base)
  if method == "SAM":
    return optax.chain(xsam_jax.sam(rho=c.rho), *base)
  if method == "XSAM":
    return optax.chain(xsam_jax.xsam(rho=c.rho, rho_max=c.rho_max, alpha_update_period=steps_per_epoch), *base)
  raise ValueError(method)


def train(
  method: str, seed: int, c: Config, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> tuple[Any, dict[str, Any]]:
  """Trains one model; returns ``(params, history)``."""
  x, y, xt, yt = data
  steps = len(y) // c.batch_size
  tx = make_optimizer(method, c, steps)
  params = init_mlp(jax.random.key(seed), (x.shape[1], *c.hidden, 10))
  opt_state = tx.init(params)

  @jax.jit
  def run_epoch(params, opt_state, xb, yb):
    def step(carry, batch):
      params, opt_state = carry
      loss_fn = make_loss_fn(*batch)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xb, yb))
    return params, opt_state, jnp.mean(losses)

  history: dict[str, Any] = {"train_loss": [], "alpha": []}
  rng = np.random.default_rng(seed)
  for _ in range(c.epochs):
    order = rng.permutation(len(y))[: steps * c.batch_size].reshape(steps, c.batch_size)
    params, opt_state, loss = run_epoch(params, opt_state, x[order], y[order])
    history["train_loss"].append(round(float(loss), 5))
    if method == "XSAM":
      history["alpha"].append(round(float(opt_state[0].alpha), 2))
  history["test_acc"] = accuracy(params, xt, yt)
  return params, history


# -------------------------------------------------------------- measuring


def measure(
  params: Any, c: Config, subset: Any, loss_fn: Callable[[Any], jax.Array], avg_key: jax.Array
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
  plane = sharpness.xsam_directions(loss_fn, params, rho=c.rho, rho_max=c.rho_max)
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


# ----------------------------------------------------------------- pictures


def plot_planes(models: dict[str, Any], c: Config, loss_fn: Callable[[Any], jax.Array], out: str) -> dict[str, str]:
  """Writes plane_xsam.png (Fig. 1a style) and plane_random.png for seed 0's models."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = {"xsam": os.path.join(out, "plane_xsam.png"), "random": os.path.join(out, "plane_random.png")}
  span = 2.0 * c.rho_max
  coords = np.linspace(-span, span, c.grid)
  fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.9))
  for ax, (method, (params, plane)) in zip(np.atleast_1d(axes), models.items(), strict=True):
    surf = sharpness.loss_surface(loss_fn, params, plane.e1, plane.e2, xs=coords, ys=coords, batch_size=64)
    sharpness.plot_xsam_plane(
      plane,
      surf,
      ax=ax,
      title=f"{method} model: " + rf"$\theta$={float(plane.theta):.2f}, "
      rf"$\alpha^*$={float(plane.alpha):.1f}",
      levels=20,
    )
  fig.suptitle(f"Training loss on XSAM's plane at the end of training (rho={c.rho}, rho_max={c.rho_max})", fontsize=10)
  fig.tight_layout()
  fig.savefig(paths["xsam"], dpi=80)
  plt.close(fig)

  coords = np.linspace(-0.6, 0.6, c.grid)
  fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.9))
  for ax, (method, (params, _)) in zip(np.atleast_1d(axes), models.items(), strict=True):
    d1, d2 = sharpness.random_plane(jax.random.key(1234), params)
    surf = sharpness.loss_surface(loss_fn, params, d1, d2, xs=coords, ys=coords, batch_size=64)
    clipped = surf._replace(losses=jnp.minimum(surf.losses, 3.0))
    sharpness.plot_loss_surface(
      clipped,
      ax=ax,
      levels=np.linspace(0.0, 3.0, 21),
      title=f"{method} model",
      xlabel="filter-normalized $d_1$",
      ylabel="$d_2$",
    )
  fig.suptitle(
    "Training loss on a random filter-normalized plane (same draws; shared colour scale, clipped at 3)", fontsize=10
  )
  fig.tight_layout()
  fig.savefig(paths["random"], dpi=80)
  plt.close(fig)
  return paths


# --------------------------------------------------------------------- main


def run(c: Config, out: str, command: str, log: Callable[[str], object] = print) -> dict[str, Any]:
  """Trains, measures, plots and writes the JSON + markdown; returns the JSON dict."""
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
    "config": c._asdict(),
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


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny settings (digits, 1 seed), < 1 minute")
  parser.add_argument("--out", default=None, help="output folder (default results/sharpness[/quick])")
  parser.add_argument("--dataset", choices=("mnist1d", "digits"), default=None)
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--rho", type=float, default=None, help="SAM/XSAM rho (rho_max = 2 rho)")
  args = parser.parse_args(argv)
  c = QUICK if args.quick else FULL
  if args.dataset:
    c = c._replace(dataset=args.dataset)
  if args.seeds:
    c = c._replace(seeds=args.seeds)
  if args.epochs:
    c = c._replace(epochs=args.epochs)
  if args.rho:
    c = c._replace(rho=args.rho, rho_max=2 * args.rho)
  out = args.out or os.path.join("results", "sharpness", *(["quick"] if args.quick else []))
  command = "python -m experiments.sharpness" + (" " + " ".join(argv) if argv else "")
  return run(c, out, command)


if __name__ == "__main__":
  main(sys.argv[1:])
