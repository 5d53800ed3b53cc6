"""The protocol's lean trainer: whole runs as one jitted ``lax.scan``, runs batched with ``jax.vmap``.

One call of :func:`train_runs` trains a batch of runs that share a
:class:`Static` (data regime, model, method, K, epochs, batch size): the
runs differ in their seed and in the traced hyperparameters of
:data:`TRACED` (learning rate, weight decay, rho, rho_max, the fixed alpha,
GSAM's alpha, WSAM's gamma), so one compiled program serves a whole grid.
Inside, a run is

1. the model's initial parameters (``experiments.core.models.make_model`` with the
   run's seed, made on the host and stacked);
2. ``epochs * steps_per_epoch`` optimizer steps in one ``lax.scan``: the batch
   is gathered on device from the training arrays by the run's index order
   (``experiments.core.data.epoch_order(seed, epoch)``, as the main job), the clean
   pass is ``jax.value_and_grad`` of the cross-entropy, and the optimizer is
   ``experiments.core.methods.chain(method, *sgd_base(lr, momentum, wd, T))``;
3. the loss and accuracy on the evaluation split (validation while tuning,
   test in the final stage: the caller passes one, never both) and on the
   training split.

Why the optimizer's step counters stay unbatched: XSAM probes alpha under a
``lax.cond`` on its state's ``count``. Under ``vmap`` a ``cond`` whose
predicate is batched becomes a ``select`` that runs both branches, i.e. the
21 probe forward passes on every step. Here the optimizer state is created
*inside* the vmapped function from unbatched constants, and the counters
are only ever incremented, so they stay unbatched through the scan and the
``cond`` survives: :func:`cond_survives` checks it on the jaxpr (a test does too).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.core import engine, methods, pure_models

TRACED = ("lr", "wd", "rho", "rho_max", "alpha", "gamma")
"""The hyperparameters passed to the compiled program as (batched) arrays."""

METHOD_READS = {
  "sgd": (),
  "sam": ("rho",),
  "xsam": ("rho", "rho_max"),
  "xsam_fixed": ("rho", "alpha"),
  "gsam": ("rho", "alpha"),
  "wsam": ("rho", "gamma"),
  "msam": ("rho",),
  "msam_plus": ("rho",),
  "lsam": ("rho",),
  "lsam_plus": ("rho",),
}
"""The traced hyperparameters (beyond lr and wd) each protocol method reads; the others are left out of its identity."""


@dataclasses.dataclass(frozen=True)
class Static:
  """What fixes the compiled program: runs sharing it batch together.

  Attributes:
    model, width: ``experiments.core.models.make_model``'s name and width.
    method: a key of :data:`METHOD_READS` (and of ``experiments.core.methods.METHODS``).
    num_steps: ascent steps K (1 for methods without an ascent).
    epochs, batch_size: training length; steps per epoch = train size // batch size.
    momentum: SGD momentum of the base optimizer.
    label_noise, train_size: the data regime (see ``experiments.protocol.splits``).
    warmup_epochs: linear learning-rate warmup before the cosine decay (``methods.sgd_base``).
  """

  model: str
  width: int
  method: str
  num_steps: int
  epochs: int
  batch_size: int
  momentum: float
  label_noise: float
  train_size: int | None
  warmup_epochs: int = 0


class Problem(NamedTuple):
  """The arrays of one regime, on device: training split and one evaluation split (normalized inputs)."""

  x_train: jax.Array
  y_train: jax.Array
  x_eval: jax.Array
  y_eval: jax.Array


def hyperparameters(method: str, values: dict[str, float]) -> dict[str, float]:
  """The traced hyperparameters a run of ``method`` reads: lr, wd and those of :data:`METHOD_READS`."""
  if method not in METHOD_READS:
    raise ValueError(f"unknown protocol method {method!r}; choose one of {', '.join(METHOD_READS)}")
  names = ("lr", "wd", *METHOD_READS[method])
  missing = [n for n in names if values.get(n) is None]
  if missing:
    raise ValueError(f"{method} needs {missing}")
  return {n: float(values[n]) for n in names}


def init_params(static: Static, seed: int, input_shape: tuple[int, ...], num_classes: int) -> pure_models.Params:
  """The run's initial parameters: ``experiments.core.models.make_model``'s with ``seed`` (see ``pure_models.init``)."""
  return pure_models.init(static.model, input_shape, num_classes, width=static.width, seed=seed)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _final(opt_state: Any) -> dict[str, jax.Array]:
  state = engine.method_state(opt_state)
  return {"probe_losses": state.probe_losses} if state is not None and hasattr(state, "probe_losses") else {}


def run_fn(static: Static, steps_per_epoch: int) -> Any:
  """One run's training as a pure function ``(hp, params, order, (x, y)) -> (params, per-epoch metrics)``.

  :func:`experiments.core.engine.scan_run` with the cross-entropy of the
  model, SGD (``methods.sgd_base``) after the method, and the batch gathered
  on device from the training arrays. Vmap it over ``hp``, ``params`` and
  ``order``. The per-epoch metrics are the means over each epoch's steps of
  the clean training loss and of the method's diagnostics: ``sharpness``
  (``L(w + d_K) - L(w)``) and, for XSAM, ``alpha`` (constant within an epoch:
  one probe round per epoch) and ``probe_gap`` (the last probe round's
  highest loss minus the ascent point's); XSAM also returns its last
  round's ``probe_losses``.

  Args:
    static: the program's settings.
    steps_per_epoch: optimizer steps per epoch (XSAM probes alpha once per epoch, the paper's schedule).
  """
  total = steps_per_epoch * static.epochs
  apply = pure_models.forward(static.model)

  def make_tx(hp: Any) -> optax.GradientTransformationExtraArgs:
    warmup = static.warmup_epochs * steps_per_epoch
    base = methods.sgd_base(cast(Any, hp["lr"]), static.momentum, cast(Any, hp["wd"]), total, warmup)  # traced
    kwargs: dict[str, Any] = {k: hp[k] for k in METHOD_READS[static.method]}
    if static.method != "sgd":
      kwargs["num_steps"] = static.num_steps
    if static.method == "xsam":
      kwargs["alpha_update_period"] = steps_per_epoch
    return methods.chain(static.method, *base, **kwargs)

  return engine.scan_run(
    lambda params, batch: _cross_entropy(apply(params, batch[0]), batch[1]),
    make_tx,
    steps_per_epoch=steps_per_epoch,
    epochs=static.epochs,
    gather=lambda data, idx: (data[0][idx], data[1][idx]),
    monitor=engine.sharpness_monitor,
    final=_final,
  )


def _program(static: Static) -> Static:
  """The part of ``static`` that shapes the program: the data regime only changes the arguments."""
  return dataclasses.replace(static, label_noise=0.0, train_size=None)


@functools.lru_cache(maxsize=64)
def compiled(program: Static, steps_per_epoch: int, batched: bool) -> Any:
  """The jitted training program: ``vmap`` of :func:`run_fn` over (hp, params, order) if ``batched``."""
  run = run_fn(program, steps_per_epoch)
  if batched:
    run = jax.vmap(run, in_axes=(0, 0, 0, None))
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def evaluator(model: str, batched: bool) -> Any:
  """The jitted ``(params, x, y) -> (mean loss, accuracy)`` of ``model`` (vmapped over params if ``batched``)."""
  apply = pure_models.forward(model)

  def evaluate(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = apply(params, x)
    return _cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

  return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)) if batched else evaluate)


def train_runs(
  static: Static,
  hps: Sequence[dict[str, float]],
  seeds: Sequence[int],
  problem: Problem,
  *,
  input_shape: tuple[int, ...],
  num_classes: int,
  batched: bool = True,
) -> list[dict[str, Any]]:
  """Trains one run per ``(hps[i], seeds[i])`` and returns their metrics (numpy arrays), in order.

  Each run's metrics: ``eval_loss`` and ``eval_acc`` on the problem's
  evaluation split, ``train_loss_final`` and ``train_acc_final`` on its
  training split, and :func:`run_fn`'s per-epoch metrics.

  Args:
    static: the settings the runs share.
    hps: each run's traced hyperparameters (:func:`hyperparameters`).
    seeds: each run's seed (initialisation and data order).
    problem: the regime's arrays; its evaluation split is what ``eval_*`` measure.
    input_shape, num_classes: of the data set.
    batched: one vmapped call for all runs (True) or a Python loop of single runs.
  """
  if len(hps) != len(seeds):
    raise ValueError(f"{len(hps)} hyperparameter sets for {len(seeds)} seeds")
  n_train = int(problem.x_train.shape[0])
  steps_per_epoch = n_train // static.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n_train} training examples make no batch of {static.batch_size}")
  inits = [init_params(static, s, input_shape, num_classes) for s in seeds]
  names = sorted(hps[0])
  orders = [engine.data_order(s, static.epochs, n_train, static.batch_size) for s in seeds]
  train = compiled(_program(static), steps_per_epoch, batched)
  evaluate = evaluator(static.model, batched)

  def finish(params: Any, metrics: dict[str, jax.Array]) -> dict[str, Any]:
    eval_loss, eval_acc = evaluate(params, problem.x_eval, problem.y_eval)
    train_loss, train_acc = evaluate(params, problem.x_train, problem.y_train)
    extra = {"eval_loss": eval_loss, "eval_acc": eval_acc, "train_loss_final": train_loss, "train_acc_final": train_acc}
    return jax.device_get({**extra, **metrics})

  if batched:
    hp = {n: jnp.asarray([h[n] for h in hps], jnp.float32) for n in names}
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
    out = finish(*train(hp, params, jnp.asarray(np.stack(orders)), (problem.x_train, problem.y_train)))
    return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(len(seeds))]
  results = []
  for h, params, order in zip(hps, inits, orders, strict=True):
    hp = {n: jnp.asarray(h[n], jnp.float32) for n in names}
    out = finish(*train(hp, params, jnp.asarray(order), (problem.x_train, problem.y_train)))
    results.append({k: np.asarray(v) for k, v in out.items()})
  return results


def cond_survives(static: Static, problem: Problem, *, input_shape: tuple[int, ...], num_classes: int) -> bool:
  """Whether vmapping the run of ``static`` keeps its ``cond`` that runs the model (XSAM's probe round).

  Traces one run and the vmapped run over two seeds and counts the ``cond``
  equations whose branches contain a ``dot_general`` (the probes' forward
  passes; the library's other ``cond``, in its norms, has none and may become
  a cheap ``select_n``). A batched predicate would have turned the probe
  ``cond`` into a ``select_n`` running both branches on every step, so its
  batched count would be lower.
  """
  params = init_params(static, 0, input_shape, num_classes)
  n_train = int(problem.x_train.shape[0])
  spe = n_train // static.batch_size
  names = ("lr", "wd", *METHOD_READS[static.method])
  order = jnp.zeros((spe * static.epochs, static.batch_size), jnp.int32)
  run = run_fn(static, spe)
  data = (problem.x_train, problem.y_train)
  single = jax.make_jaxpr(run)({n: jnp.float32(0.1) for n in names}, params, order, data)
  batched = jax.make_jaxpr(jax.vmap(run, in_axes=(0, 0, 0, None)))(
    {n: jnp.full((2,), 0.1, jnp.float32) for n in names},
    jax.tree.map(lambda x: jnp.stack([x, x]), params),
    jnp.stack([order, order]),
    data,
  )
  count = engine.model_conds(single.jaxpr)
  return count > 0 and engine.model_conds(batched.jaxpr) == count
