"""The protocol's lean trainer: whole runs as one jitted ``lax.scan``, runs batched with ``jax.vmap``.

One call of :func:`train_runs` trains a batch of runs that share a
:class:`Static` (data regime, model, method, K, epochs, batch size): the
runs differ in their seed and in the traced hyperparameters of
:data:`TRACED` (learning rate, weight decay, rho, rho_max, the fixed alpha,
GSAM's alpha, WSAM's gamma), so one compiled program serves a whole grid.
Inside, a run is

1. the model's initial parameters (``experiments.models.make_model`` with the
   run's seed, made on the host and stacked);
2. ``epochs * steps_per_epoch`` optimizer steps in one ``lax.scan``: the batch
   is gathered on device from the training arrays by the run's index order
   (``experiments.data.epoch_order(seed, epoch)``, as the main job), the clean
   pass is ``jax.value_and_grad`` of the cross-entropy, and the optimizer is
   ``experiments.methods.chain(method, *sgd_base(lr, momentum, wd, T))``;
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

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import methods
from experiments.protocol import nets

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
    model, width: ``experiments.models.make_model``'s name and width.
    method: a key of :data:`METHOD_READS` (and of ``experiments.methods.METHODS``).
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


def init_params(static: Static, seed: int, input_shape: tuple[int, ...], num_classes: int) -> nets.Params:
  """The run's initial parameters: ``experiments.models.make_model``'s with ``seed`` (see ``nets.init``)."""
  return nets.init(static.model, input_shape, num_classes, width=static.width, seed=seed)


def data_order(seed: int, epochs: int, n: int, batch_size: int) -> np.ndarray:
  """``(epochs * (n // batch_size), batch_size)`` int32 indices: each epoch's ``epoch_order(seed, epoch, n)``."""
  steps = n // batch_size
  rows = [data_lib.epoch_order(seed, e, n)[: steps * batch_size].reshape(steps, batch_size) for e in range(epochs)]
  return np.concatenate(rows).astype(np.int32)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _method_state(opt_state: Any) -> Any:
  """The sharpness-aware method's state (the chain's first), or None for SGD."""
  first = opt_state[0]
  return first if hasattr(first, "perturbed_loss") else None


def run_fn(static: Static, steps_per_epoch: int) -> Any:
  """One run's training as a pure function ``(hp, params, order, x, y) -> (params, per-epoch metrics)``.

  Vmap it over ``hp``, ``params`` and ``order``. The per-epoch metrics are
  the means over each epoch's steps of the clean training loss and of the
  method's diagnostics: ``sharpness`` (``L(w + d_K) - L(w)``) and, for XSAM,
  ``alpha`` (constant within an epoch: one probe round per epoch) and
  ``probe_gap`` (the last probe round's highest loss minus the ascent
  point's); XSAM also returns its last round's ``probe_losses``.

  Args:
    static: the program's settings.
    steps_per_epoch: optimizer steps per epoch (XSAM probes alpha once per epoch, the paper's schedule).
  """
  total = steps_per_epoch * static.epochs
  apply = nets.forward(static.model)

  def run(
    hp: dict[str, jax.Array], params: Any, order: jax.Array, x_train: jax.Array, y_train: jax.Array
  ) -> tuple[Any, dict[str, jax.Array]]:
    warmup = static.warmup_epochs * steps_per_epoch
    base = methods.sgd_base(cast(Any, hp["lr"]), static.momentum, cast(Any, hp["wd"]), total, warmup)  # traced
    kwargs: dict[str, Any] = {k: hp[k] for k in METHOD_READS[static.method]}
    if static.method != "sgd":
      kwargs["num_steps"] = static.num_steps
    if static.method == "xsam":
      kwargs["alpha_update_period"] = steps_per_epoch
    tx = methods.chain(static.method, *base, **kwargs)
    opt_state = tx.init(params)  # made inside the vmapped function: its int counters stay unbatched

    def step(carry: tuple[Any, Any], idx: jax.Array) -> tuple[tuple[Any, Any], dict[str, jax.Array]]:
      params, opt_state = carry
      x, y = x_train[idx], y_train[idx]
      loss_fn = lambda p: _cross_entropy(apply(p, x), y)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      params = optax.apply_updates(params, updates)
      out = {"loss": loss}
      state = _method_state(opt_state)
      if state is not None:
        out["sharpness"] = state.perturbed_loss - loss
        if hasattr(state, "alpha"):
          out["alpha"] = state.alpha
          out["probe_gap"] = state.max_loss - state.perturbed_loss
      return (params, opt_state), out

    (params, opt_state), trace = jax.lax.scan(step, (params, opt_state), order)
    metrics = {f"epoch_{k}": v.reshape(static.epochs, steps_per_epoch).mean(axis=1) for k, v in trace.items()}
    state = _method_state(opt_state)
    if state is not None and hasattr(state, "probe_losses"):
      metrics["probe_losses"] = state.probe_losses
    return params, metrics

  return run


def _program(static: Static) -> Static:
  """The part of ``static`` that shapes the program: the data regime only changes the arguments."""
  return dataclasses.replace(static, label_noise=0.0, train_size=None)


@functools.lru_cache(maxsize=64)
def compiled(program: Static, steps_per_epoch: int, batched: bool) -> Any:
  """The jitted training program: ``vmap`` of :func:`run_fn` over (hp, params, order) if ``batched``."""
  run = run_fn(program, steps_per_epoch)
  if batched:
    run = jax.vmap(run, in_axes=(0, 0, 0, None, None))
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def evaluator(model: str, batched: bool) -> Any:
  """The jitted ``(params, x, y) -> (mean loss, accuracy)`` of ``model`` (vmapped over params if ``batched``)."""
  apply = nets.forward(model)

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
  orders = [data_order(s, static.epochs, n_train, static.batch_size) for s in seeds]
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
    out = finish(*train(hp, params, jnp.asarray(np.stack(orders)), problem.x_train, problem.y_train))
    return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(len(seeds))]
  results = []
  for h, params, order in zip(hps, inits, orders, strict=True):
    hp = {n: jnp.asarray(h[n], jnp.float32) for n in names}
    out = finish(*train(hp, params, jnp.asarray(order), problem.x_train, problem.y_train))
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
  single = jax.make_jaxpr(run)({n: jnp.float32(0.1) for n in names}, params, order, problem.x_train, problem.y_train)
  batched = jax.make_jaxpr(jax.vmap(run, in_axes=(0, 0, 0, None, None)))(
    {n: jnp.full((2,), 0.1, jnp.float32) for n in names},
    jax.tree.map(lambda x: jnp.stack([x, x]), params),
    jnp.stack([order, order]),
    problem.x_train,
    problem.y_train,
  )
  count = model_conds(single.jaxpr)
  return count > 0 and model_conds(batched.jaxpr) == count


def _subjaxprs(eqn: Any) -> list[Any]:
  out = []
  for value in eqn.params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
      if hasattr(inner, "eqns"):
        out.append(inner)
  return out


def primitives(jaxpr: Any) -> collections.Counter[str]:
  """How often each primitive occurs in ``jaxpr`` and in the jaxprs nested in its equations (scan, cond bodies)."""
  names: collections.Counter[str] = collections.Counter()
  for eqn in jaxpr.eqns:
    names[eqn.primitive.name] += 1
    for inner in _subjaxprs(eqn):
      names += primitives(inner)
  return names


def model_conds(jaxpr: Any) -> int:
  """The number of ``cond`` equations in ``jaxpr`` (nested ones included) whose branches contain a ``dot_general``."""
  count = 0
  for eqn in jaxpr.eqns:
    subs = _subjaxprs(eqn)
    if eqn.primitive.name == "cond" and any(primitives(b)["dot_general"] for b in subs):
      count += 1
    count += sum(model_conds(b) for b in subs)
  return count
