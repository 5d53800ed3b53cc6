"""The language-model study's runs: the zoo's transformer, AdamW after each method, on the shared engine.

A batch of runs of one method (its grid points times seeds) is one call of
:func:`train_runs`: :func:`experiments.core.engine.scan_run` vmapped over the
traced hyperparameters, the initial parameters and the data orders. The
training text is cut into non-overlapping windows of ``context + 1``
characters; each evaluation interval (``eval_every`` steps, the engine's
"epoch") draws its batches from a fresh permutation of the windows
(:func:`experiments.core.engine.data_order`), so a run sees different windows
at every step while it lasts less than a pass. Validation loss is computed
on every validation window at each interval's end, inside the scan.

The optimizer of every method but Momentum-SAM is ``optax.chain(method,
adamw)``; Momentum-SAM is its own AdamW (``xsam_jax.momentum_sam_adamw``)
and is evaluated at its unperturbed weights (``xsam_jax.momentum_sam_params``).
RWP's noise key is seed 0's folded with each run's traced seed, passed as
``xsam_jax.rwp``'s ``key`` (its ``seed`` is a Python integer fixed when the
optimizer is built), so every run draws its own noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.core import engine, methods, pure_models
from experiments.core.text import TextCorpus
from experiments.lm.config import LMConfig

READS = {
  "adamw": ("lr",),
  "sam": ("lr", "rho"),
  "xsam": ("lr", "rho", "rho_max"),
  "xsam_fixed": ("lr", "rho", "alpha"),
  "functional_sam": ("lr", "rho"),
  "preconditioned_sam": ("lr", "rho"),
  "functional_preconditioned": ("lr", "rho"),
  "momentum_sam": ("lr", "rho"),
  "rwp": ("lr", "gamma"),
}
"""The traced hyperparameters of each method."""

GRADIENTS_PER_STEP = dict.fromkeys(READS, 2) | {"adamw": 1, "momentum_sam": 1}
"""Gradient evaluations per step (XSAM's probe forward passes, once per interval, are not counted)."""

SPLIT = ("functional_sam", "functional_preconditioned")
"""The methods that take the loss in two parts (``model_fn``, ``output_loss_fn``)."""


class Windows(NamedTuple):
  """One split as ``(n, context + 1)`` int32 windows on device."""

  windows: jax.Array

  @classmethod
  def of(cls, ids: np.ndarray, context: int) -> Windows:
    n = len(ids) // (context + 1)
    return cls(jnp.asarray(ids[: n * (context + 1)].reshape(n, context + 1), jnp.int32))


def _cross_entropy(logits: jax.Array, windows: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats) of ``logits`` for ``windows[:, :-1]`` against ``windows[:, 1:]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def _decay_mask(params: Any) -> Any:
  """Weight decay on the matrices only (not on biases, LayerNorm parameters or position embeddings)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, p: p.ndim == 2 and "pos" not in jax.tree_util.keystr(path), params
  )


def schedule(lr: Any, steps: int, warmup: float) -> Any:
  """Linear warmup over ``warmup * steps`` steps to ``lr``, then cosine decay to 0 at ``steps``."""
  warm = max(1, round(warmup * steps))

  def at(count: jax.Array) -> jax.Array:  # optax's warmup_cosine_decay_schedule rejects a traced peak
    t = jnp.asarray(count, jnp.float32)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((t - warm) / max(steps - warm, 1), 0.0, 1.0)))
    return lr * jnp.where(t < warm, t / warm, cosine)

  return at


def make_tx(method: str, hp: Any, c: LMConfig, steps: int) -> optax.GradientTransformationExtraArgs:
  """The optimizer of ``method`` with the traced hyperparameters ``hp``, over ``steps`` steps."""
  lr = schedule(hp["lr"], steps, c.warmup)
  if method == "momentum_sam":
    return xsam_jax.momentum_sam_adamw(
      hp["rho"], learning_rate=lr, b2=c.b2, weight_decay=c.weight_decay, mask=_decay_mask
    )
  adamw = optax.adamw(lr, b2=c.b2, weight_decay=c.weight_decay, mask=_decay_mask)
  if method == "adamw":
    return optax.with_extra_args_support(adamw)
  if method in ("sam", "xsam", "xsam_fixed"):
    kw: dict[str, Any] = {k: hp[k] for k in READS[method] if k != "lr"}
    if method == "xsam":
      kw["alpha_update_period"] = c.eval_every
    return methods.chain(method, adamw, **kw)
  factory = {
    "functional_sam": lambda: xsam_jax.functional_sam(hp["rho"], b2=c.b2),
    "preconditioned_sam": lambda: xsam_jax.preconditioned_sam(hp["rho"], b2=c.b2),
    "functional_preconditioned": lambda: xsam_jax.functional_sam(hp["rho"], precondition=True, b2=c.b2),
    # Each run's own noise, as it has its own initialisation and data order: the runs of one vmapped call
    # share this build, so the key (seed 0's, folded with the run's traced seed) is given, not a seed.
    "rwp": lambda: xsam_jax.rwp(hp["gamma"], key=jax.random.fold_in(jax.random.PRNGKey(0), hp["seed"])),
  }[method]
  return optax.chain(factory(), adamw)


def _forward(params: Any, windows: jax.Array, *, heads: int) -> jax.Array:
  """The model's logits for ``windows[:, :-1]`` (each window's characters but its last)."""
  return pure_models.transformer_forward(params, windows[:, :-1], heads=heads)


def _window_loss(params: Any, windows: jax.Array, *, heads: int) -> jax.Array:
  """The training, validation and test loss: mean next-character cross-entropy over ``windows``."""
  return _cross_entropy(_forward(params, windows, heads=heads), windows)


@functools.lru_cache(maxsize=32)
def program(method: str, c: LMConfig, steps: int) -> Any:
  """The jitted ``run(hp, params, order, (train, val)) -> (params, metrics)`` of ``method``, vmapped over runs."""
  window_loss = functools.partial(_window_loss, heads=c.heads)
  loss = split = None
  if method in SPLIT:
    split = (functools.partial(_forward, heads=c.heads), _cross_entropy)
  else:
    loss = window_loss

  def run(hp: Any, params: Any, order: jax.Array, data: tuple[jax.Array, jax.Array]) -> Any:
    train, val = data
    inner = engine.scan_run(
      loss,
      lambda hp: make_tx(method, hp, c, steps),
      steps_per_epoch=c.eval_every,
      epochs=steps // c.eval_every,
      gather=lambda windows, idx: windows[idx],
      monitor=engine.sharpness_monitor,
      last=("alpha",),
      evaluate=lambda p: {"val_loss": window_loss(p, val)},
      split=split,
      eval_params=xsam_jax.momentum_sam_params if method == "momentum_sam" else None,
    )
    return inner(hp, params, order, train)

  return jax.jit(jax.vmap(run, in_axes=(0, 0, 0, None)))


@functools.lru_cache(maxsize=4)
def _test_loss(heads: int) -> Any:
  return jax.jit(jax.vmap(functools.partial(_window_loss, heads=heads), in_axes=(0, None)))


def train_runs(
  method: str,
  hps: Sequence[dict[str, float]],
  seeds: Sequence[int],
  c: LMConfig,
  corpus: TextCorpus,
  *,
  steps: int | None = None,
  test: bool = False,
) -> list[dict[str, Any]]:
  """Trains one run per ``(hps[i], seeds[i])`` of ``method`` in one vmapped call; returns their metrics.

  Args:
    method: a key of :data:`READS`.
    hps: each run's hyperparameters (the names of ``READS[method]``).
    seeds: each run's seed: its initialisation (``jax.random.key(seed)``) and its data order.
    c: the study's settings; corpus: the text.
    steps: optimizer steps (default ``c.steps``; the equal-compute AdamW runs take more).
    test: also compute the loss on the test split (the test phase only).

  Returns:
    Per run: ``epoch_loss`` (training loss, mean over each interval), ``epoch_val_loss`` (at each
    interval's end), ``val_loss`` (the last), ``epoch_alpha`` (XSAM), ``epoch_sharpness`` (the
    sharpness-aware methods), and with ``test`` the ``test_loss``; numpy arrays and floats.
  """
  steps = c.steps if steps is None else steps
  names = READS[method]
  train, val = Windows.of(corpus.train, c.context), Windows.of(corpus.val, c.context)
  inits = [
    pure_models.transformer_init(
      jax.random.key(s), vocab=len(corpus.vocab), context=c.context, width=c.width, depth=c.depth, heads=c.heads
    )
    for s in seeds
  ]
  epochs = steps // c.eval_every
  n = int(train.windows.shape[0])
  if n < c.batch_size * c.eval_every:
    raise ValueError(f"{n} training windows are fewer than one interval's {c.batch_size} x {c.eval_every}")
  orders = [_order(s, epochs, n, c.batch_size, c.eval_every) for s in seeds]
  hp = {k: jnp.asarray([h[k] for h in hps], jnp.float32) for k in names}
  if method == "rwp":
    hp["seed"] = jnp.asarray(seeds, jnp.int32)  # each run's RWP noise key (see make_tx)
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
  final, metrics = program(method, c, steps)(hp, params, jnp.asarray(np.stack(orders)), (train.windows, val.windows))
  out = jax.device_get(metrics)
  if test:
    out["test_loss"] = jax.device_get(_test_loss(c.heads)(final, Windows.of(corpus.test, c.context).windows))
  runs = []
  for i in range(len(seeds)):
    run: dict[str, Any] = {k: np.asarray(v[i]) for k, v in out.items()}
    run["val_loss"] = float(run["epoch_val_loss"][-1])
    if "test_loss" in run:
      run["test_loss"] = float(run["test_loss"])
    runs.append(run)
  return runs


def _order(seed: int, epochs: int, n: int, batch_size: int, steps_per_epoch: int) -> np.ndarray:
  """``(epochs * steps_per_epoch, batch_size)`` window indices: each interval's first windows of a fresh permutation."""
  full = engine.data_order(seed, epochs, n, batch_size)  # (epochs * (n // batch_size), batch_size)
  per_epoch = full.reshape(epochs, n // batch_size, batch_size)[:, :steps_per_epoch]
  return per_epoch.reshape(epochs * steps_per_epoch, batch_size)


def bits_per_character(loss: float) -> float:
  """Nats per character -> bits per character."""
  return loss / math.log(2.0)
