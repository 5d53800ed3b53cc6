"""The training engine of every study: scanned runs on device, and the epoch loop with checkpoints.

Two ways to drive the same kind of step (clean pass, then ``tx.update(...,
loss_fn=...)``), chosen by what the model carries:

- :func:`scan_run`: a whole run as one pure function ``(hp, params, order,
  data) -> (params, metrics)``, its steps in one ``lax.scan``, for models that
  are pure functions of their parameters (``experiments.core.pure_models``).
  Vmap it over hyperparameters, initial parameters and data orders to train
  a grid of runs in one compiled program (the protocol, the language-model
  study), or call it once (the sharpness study). Per-step monitors are
  reduced per epoch inside the program; an optional evaluation runs at
  every epoch's end inside the scan, under a ``cond`` on the (unbatched)
  step counter, so it costs one pass per epoch, not per step.
- :func:`fit`: the epoch loop on the host: resume point, progress bar,
  per-epoch callback (evaluation, history), checkpoints every N epochs and
  an early stop. The main job uses it: its NNX models carry BatchNorm
  statistics, its image batches are augmented on the host and its
  data-parallel batches are placed per step, so its step is one jitted call
  per batch.

Why the optimizer's step counters stay unbatched under ``vmap``: XSAM probes
alpha under a ``lax.cond`` on its state's ``count``. A ``cond`` whose
predicate is batched becomes a ``select`` that runs both branches, i.e. the
probe forward passes on every step. :func:`scan_run` creates the optimizer
state *inside* the run from unbatched constants and only ever increments
the counters, so they stay unbatched and the ``cond`` survives;
:func:`model_conds` counts such ``cond`` equations on a jaxpr (the protocol's
tests check it).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments.core import data as data_lib

Loss = Callable[[Any, Any], jax.Array]
"""``loss(params, batch) -> scalar``: the training loss of one batch."""


def data_order(seed: int, epochs: int, n: int, batch_size: int) -> np.ndarray:
  """``(epochs * (n // batch_size), batch_size)`` int32 indices: each epoch's ``epoch_order(seed, epoch, n)``.

  The main job's batch order (:func:`experiments.core.data.epoch_order`), the
  incomplete last batch of every epoch dropped.
  """
  steps = n // batch_size
  rows = [data_lib.epoch_order(seed, e, n)[: steps * batch_size].reshape(steps, batch_size) for e in range(epochs)]
  return np.concatenate(rows).astype(np.int32)


def scan_run(
  loss: Loss | None,
  make_tx: Callable[[Mapping[str, jax.Array]], optax.GradientTransformationExtraArgs],
  *,
  steps_per_epoch: int,
  epochs: int,
  gather: Callable[[Any, jax.Array], Any],
  monitor: Callable[[jax.Array, Any], dict[str, jax.Array]] | None = None,
  last: Iterable[str] = (),
  final: Callable[[Any], dict[str, jax.Array]] | None = None,
  evaluate: Callable[[Any], dict[str, jax.Array]] | None = None,
  split: tuple[Callable[[Any, Any], Any], Callable[[Any, Any], jax.Array]] | None = None,
  eval_params: Callable[[Any, Any], Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """One run's training as a pure function ``run(hp, params, order, data) -> (params, metrics)``.

  Each step ``t`` (one ``lax.scan`` over ``order``) computes

  .. math::

     b_t = \\mathrm{gather}(\\mathrm{data}, \\mathrm{order}_t), \\quad
     (\\ell_t, g_t) = (L, \\nabla L)(w_t; b_t), \\quad
     (u_t, s_{t+1}) = \\mathrm{tx.update}(g_t, s_t, w_t, \\mathrm{loss\\_fn}=L(\\cdot; b_t)), \\quad
     w_{t+1} = w_t + u_t,

  with ``tx = make_tx(hp)`` and ``s_0 = tx.init(w_0)`` made inside the run.

  Args:
    loss: ``loss(params, batch) -> scalar``, the training loss (None when ``split`` gives it).
    make_tx: the optimizer from the run's traced hyperparameters ``hp``.
    steps_per_epoch, epochs: the run's length; ``order`` has ``steps_per_epoch
      * epochs`` rows.
    gather: ``gather(data, indices) -> batch``, run on device each step.
    monitor: ``monitor(loss, opt_state) -> {name: scalar}`` after each step;
      ``loss`` (the clean loss) is always recorded.
    last: monitor names reduced to the epoch's last value (the others: the epoch's mean).
    final: ``final(opt_state) -> {name: array}``, added to the metrics once, at the end.
    evaluate: ``evaluate(params) -> {name: scalar}`` at every epoch's end,
      inside the scan (per-epoch curves).
    split: ``(model, output_loss)``: the loss in two parts, ``output_loss(model(params, batch), batch)``;
      ``tx.update`` then also gets ``model_fn=`` and ``output_loss_fn=`` (Functional SAM needs them;
      the other methods ignore them).
    eval_params: ``eval_params(params, opt_state)``, the parameters to evaluate and return (Momentum-SAM
      trains at a perturbed point: ``xsam_jax.momentum_sam_params``); default: ``params``.

  Returns:
    ``run(hp, params, order, data) -> (params, metrics)``: the final parameters (``eval_params``') and
    ``epoch_<name>`` arrays of length ``epochs`` for every monitored scalar
    (``epoch_loss`` included) and every evaluated one, plus ``final``'s.

  Example:
    >>> run = scan_run(loss, make_tx, steps_per_epoch=10, epochs=3, gather=lambda d, i: (d[0][i], d[1][i]))
    >>> params, metrics = jax.jit(run)({"lr": 0.1}, params0, order, (x, y))  # doctest: +SKIP
  """
  kept = frozenset(last)
  if (loss is None) == (split is None):
    raise ValueError("give the loss either as `loss` or as `split=(model, output_loss)`, not both or neither")
  at = eval_params if eval_params is not None else (lambda params, opt_state: params)

  def run(hp: Mapping[str, jax.Array], params: Any, order: jax.Array, data: Any) -> tuple[Any, dict[str, jax.Array]]:
    tx = make_tx(hp)
    opt_state = tx.init(params)  # made inside the (vmapped) run: its int counters stay unbatched

    def step(carry: tuple[Any, Any, jax.Array], idx: jax.Array) -> tuple[tuple[Any, Any, jax.Array], Any]:
      params, opt_state, t = carry
      batch = gather(data, idx)
      extra: dict[str, Any] = {}
      if split is not None:
        model, output_loss = split
        extra = {"model_fn": lambda p: model(p, batch), "output_loss_fn": lambda out: output_loss(out, batch)}
        loss_fn = lambda p: output_loss(model(p, batch), batch)
      else:
        assert loss is not None
        loss_fn = lambda p: loss(p, batch)
      value, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn, **extra)
      params = optax.apply_updates(params, updates)
      out = {"loss": value, **(monitor(value, opt_state) if monitor is not None else {})}
      evals = None
      if evaluate is not None:
        # The evaluated parameters (``eval_params``) are made inside the branch: once per epoch, not per step.
        shown = lambda p, s: evaluate(at(p, s))
        shapes = jax.eval_shape(shown, params, opt_state)
        nan = lambda p, s: jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), shapes)
        evals = jax.lax.cond((t + 1) % steps_per_epoch == 0, shown, nan, params, opt_state)
      return (params, opt_state, t + 1), (out, evals)

    (params, opt_state, _), (trace, evals) = jax.lax.scan(step, (params, opt_state, jnp.int32(0)), order)
    metrics = {}
    for k, v in trace.items():
      per_epoch = v.reshape(epochs, steps_per_epoch)
      metrics[f"epoch_{k}"] = per_epoch[:, -1] if k in kept else per_epoch.mean(axis=1)
    if evals is not None:
      ends = jnp.arange(1, epochs + 1) * steps_per_epoch - 1
      metrics.update({f"epoch_{k}": v[ends] for k, v in evals.items()})
    if final is not None:
      metrics.update(final(opt_state))
    return at(params, opt_state), metrics

  return run


def method_state(opt_state: Any) -> Any:
  """The sharpness-aware method's state: the first of a chain's states (or the state itself) if it has
  ``perturbed_loss``, else None (plain AdamW or SGD, or a whole optimizer such as Momentum-SAM)."""
  first = opt_state[0] if isinstance(opt_state, tuple) and opt_state else opt_state
  return first if hasattr(first, "perturbed_loss") else None


def sharpness_monitor(loss: jax.Array, opt_state: Any) -> dict[str, jax.Array]:
  """A :func:`scan_run` monitor: the sharpness-aware method's diagnostics after a step.

  ``sharpness`` ``= L(w + d_K) - L(w)`` (its state's ``perturbed_loss`` minus the clean ``loss``); for
  XSAM also ``alpha`` and ``probe_gap`` (the last probe round's highest loss minus the ascent point's).
  Nothing for a method without ``perturbed_loss``.
  """
  state = method_state(opt_state)
  out = {}
  if state is not None:
    out["sharpness"] = state.perturbed_loss - loss
    if hasattr(state, "alpha"):
      out["alpha"] = state.alpha
      out["probe_gap"] = state.max_loss - state.perturbed_loss
  return out


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


class Progress(NamedTuple):
  """Where :func:`fit` stands: ``step`` optimizer steps done, ``elapsed_s`` seconds of training so far."""

  step: int
  elapsed_s: float


def fit(
  state: Any,
  *,
  epochs: int,
  steps_per_epoch: int,
  start: Progress,
  batches: Callable[[int], Any],
  step: Callable[[Any, Any], tuple[Any, Any]],
  evaluate: Callable[[Any], Any],
  log: Callable[[int, int, list, Any, float], dict[str, str]],
  save: Callable[[int, Any, float], None] | None = None,
  checkpoint_every: int = 0,
  stop_after_epochs: int | None = None,
  progress: bool = True,
  desc: str = "",
) -> tuple[Any, Progress, bool]:
  """The epoch loop on the host, from a resume point: steps, per-epoch callback, checkpoints, early stop.

  Args:
    state: what ``step`` carries (e.g. the split state of an NNX model and optimizer).
    epochs, steps_per_epoch: the run's length.
    start: the resume point (``Progress(0, 0.0)`` for a fresh run; a checkpoint's otherwise).
    batches: ``batches(epoch)``, the epoch's batches (``batches(epoch)[i]`` is step ``i``'s), made once per epoch.
    step: ``step(state, batch) -> (state, metrics)``, one optimizer step.
    evaluate: ``evaluate(state) -> evaluation`` after each epoch (timed with the epoch).
    log: ``log(epoch, step, step_metrics, evaluation, elapsed_s) -> postfix`` then (the history);
      ``postfix`` is shown on the progress bar.
    save: ``save(step, state, elapsed_s)`` writes a checkpoint; called at the end, at an early
      stop and every ``checkpoint_every`` epochs (0: only those two).
    stop_after_epochs: stop (resumably) after this many epochs in all; None runs to the end.
    progress: show a tqdm progress bar; ``desc`` labels it.

  Returns:
    ``(state, Progress(step, elapsed_s), completed)``; ``completed`` is False after an early stop.
  """
  total = steps_per_epoch * epochs
  current, elapsed = start
  bar = tqdm(
    total=total,
    initial=current,
    disable=not progress,
    unit="step",
    mininterval=0.5,
    desc=desc,
    dynamic_ncols=True,
  )
  completed = current >= total
  for epoch in range(current // steps_per_epoch, epochs):
    t0 = time.perf_counter()
    step_metrics = []
    epoch_batches = batches(epoch)
    for i in range(current - epoch * steps_per_epoch, steps_per_epoch):
      state, metrics = step(state, epoch_batches[i])
      step_metrics.append(metrics)
      current += 1
      bar.update(1)
    evaluation = evaluate(state)
    elapsed += time.perf_counter() - t0
    bar.set_postfix(log(epoch, current, step_metrics, evaluation, elapsed), refresh=False)
    done = epoch + 1 == epochs
    stop = stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and not done
    every = checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0
    if save is not None and (done or stop or every):
      save(current, state, elapsed)
    completed |= done
    if stop:
      break
  bar.close()
  return state, Progress(current, elapsed), completed
