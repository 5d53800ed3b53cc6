"""The NNX training loop: one jitted step, evaluation, checkpoints, resume.

The train step (one real optimizer step, compiled once per model and
optimizer) works on the split state of ``(model, optimizer)``:

1. the clean pass at ``w``: ``nnx.value_and_grad`` of the training loss in
   training mode; it updates BatchNorm running statistics (the only pass that
   does);
2. ``optimizer.update(model, grads, loss_fn=loss_fn)``: NNX hands the pure
   parameter state to ``tx.update``, and the sharpness-aware transformation
   calls ``loss_fn`` on perturbed copies of it (ascent, XSAM's probes).
   ``loss_fn`` merges those parameters into a throwaway model with the
   current non-parameter state, runs it in training mode (batch statistics)
   and discards whatever running statistics it computed.

Data parallel (``config.devices = N > 1``): the state is replicated over a
1-D mesh of the first N of ``jax.devices()`` (``NamedSharding(mesh, P())``)
and every batch is sharded along its leading axis (``P("data")``); the same
jitted step then computes the global-batch step, with the collectives
inserted by XLA (no ``axis_name``: XSAM's ascent, probes and alpha are
global). With N = 1 nothing is placed explicitly.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.core import data as data_lib
from experiments.core import engine, methods, models
from experiments.train import resume as resume_lib
from experiments.train.checks import check_devices, resolve
from experiments.train.config import TrainConfig

DIAGNOSTICS = ("alpha", "theta", "grad_norm", "perturbed_loss")
"""Scalar fields of a method's optax state logged every step when present (with ``perturbed_loss``, also
``sharpness = perturbed_loss - loss``, the sharpness the method minimizes)."""

DATA_AXIS = "data"
"""Name of the mesh axis the batch is sharded along when ``devices > 1``."""


class DataParallel(NamedTuple):
  """Shardings of a data-parallel run.

  Attributes:
    state: ``NamedSharding(mesh, P())``: parameters and optimizer state,
      replicated on every device.
    batch: ``NamedSharding(mesh, P("data"))``: batches, split along their
      leading (example) axis.
  """

  state: NamedSharding
  batch: NamedSharding


def data_parallel(config: TrainConfig) -> DataParallel | None:
  """The shardings of ``config``'s run, or None on a single device.

  Args:
    config: the run's configuration; ``config.devices`` is validated by
      :func:`check_devices`.

  Returns:
    ``None`` for ``devices == 1`` (nothing is placed explicitly), else a
    :class:`DataParallel` over a 1-D mesh of the first ``devices`` of
    ``jax.devices()``.
  """
  check_devices(config.devices, config.batch_size)
  if config.devices == 1:
    return None
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[: config.devices]), (DATA_AXIS,))
  return DataParallel(state=NamedSharding(mesh, P()), batch=NamedSharding(mesh, P(DATA_AXIS)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _diagnostics(optimizer: nnx.Optimizer) -> dict:
  opt_state = nnx.as_pure(optimizer.opt_state)
  first = opt_state[0] if isinstance(opt_state, tuple) and opt_state else opt_state
  out = {k: jnp.asarray(getattr(first, k), jnp.float32) for k in DIAGNOSTICS if hasattr(first, k)}
  if hasattr(first, "probe_losses"):
    out["probe_losses"] = jnp.asarray(first.probe_losses, jnp.float32)
  return out


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step(
  graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, y: jax.Array
) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimizer step on the batch ``(x, y)``.

  Args:
    graphdef: static graph of ``(model, optimizer)`` from ``nnx.split``.
    state: their state (donated).
    x, y: the batch.

  Returns:
    ``(new_state, metrics)``; metrics: the clean pass's ``loss`` and
    ``accuracy`` and the method's diagnostics (XSAM: ``alpha``, ``theta``,
    ``grad_norm``; every sharpness-aware method: ``perturbed_loss`` and
    ``sharpness``).
  """
  model, optimizer = nnx.merge(graphdef, state)
  model_def, _, *others = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(others[0])

  def loss_fn(params):
    # Extra passes (ascent, probes): batch statistics; the throwaway model's
    # updated running statistics are discarded with it.
    return cross_entropy(nnx.merge(model_def, params, rest)(x, train=True), y)

  def clean_loss(m):
    logits = m(x, train=True)
    return cross_entropy(logits, y), logits

  (loss, logits), grads = nnx.value_and_grad(clean_loss, has_aux=True)(model)
  optimizer.update(model, grads, loss_fn=loss_fn)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
  metrics.update(_diagnostics(optimizer))
  if "perturbed_loss" in metrics:  # L(w + d) - L(w) on this batch: free, the ascent ran that forward pass
    metrics["sharpness"] = metrics["perturbed_loss"] - loss
  return nnx.state((model, optimizer)), metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_step(
  graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, y: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed loss and number correct over the real (``mask == 1``) examples."""
  model, _ = nnx.merge(graphdef, state)
  logits = model(x, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(correct * mask)


def evaluate(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  data: data_lib.Dataset,
  batch_size: int,
  *,
  sharding: NamedSharding | None = None,
) -> dict:
  """Test loss and accuracy of the model in ``state`` over the whole test set.

  Args:
    graphdef, state: the split ``(model, optimizer)``.
    data: the data set; its test split is evaluated.
    batch_size: examples per evaluation batch (capped at the test set size;
      the last batch is padded and masked).
    sharding: if given, every batch is placed with it (data parallel); the
      batch size is then rounded up to a multiple of its device count, the
      extra rows being masked padding, so any ``batch_size`` works.

  Returns:
    ``{"test_loss": ..., "test_accuracy": ...}``.
  """
  batch_size = min(batch_size, len(data.y_test))
  if sharding is not None:
    n_dev = sharding.num_devices
    batch_size = -(-batch_size // n_dev) * n_dev
  loss_sum, correct = 0.0, 0.0
  for batch in data_lib.eval_batches(data, batch_size):
    x, y, mask = batch if sharding is None else jax.device_put(batch, sharding)
    batch_loss, batch_correct = eval_step(graphdef, state, x, y, mask)
    loss_sum += float(batch_loss)
    correct += float(batch_correct)
  n = len(data.y_test)
  return {"test_loss": loss_sum / n, "test_accuracy": correct / n}


def init_run(config: TrainConfig, data: data_lib.Dataset) -> tuple[TrainConfig, nnx.GraphDef, nnx.State]:
  """Resolves ``config`` and builds the initial model and optimizer.

  Args:
    config: the run's configuration.
    data: the data set the run trains on (already subset).

  Returns:
    ``(resolved_config, graphdef, state)`` with ``graphdef, state =
    nnx.split((model, optimizer))``, ready for :func:`train_step`; with
    ``config.devices > 1`` the state is replicated over the devices
    (:func:`data_parallel`).

  Raises:
    ValueError: for a bad ``config.devices`` (see :func:`check_devices`).
  """
  parallel = data_parallel(config)
  config = resolve(config, data)
  assert config.model is not None  # set by resolve()
  total_steps = (len(data.y_train) // config.batch_size) * config.epochs
  model = models.make_model(
    config.model,
    data.input_shape,
    data.num_classes,
    width=config.width,
    batch_norm=config.batch_norm,
    seed=config.seed,
  )
  optimizer = nnx.Optimizer(model, methods.make_optimizer(config, total_steps), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  if parallel is not None:
    state = jax.device_put(state, parallel.state)
  return config, graphdef, state


class TrainResult(NamedTuple):
  """What :func:`train_and_evaluate` returns.

  Attributes:
    config: the resolved configuration.
    graphdef: static graph of ``(model, optimizer)``.
    state: their final state (merge with ``nnx.merge(graphdef, state)``).
    history: per-epoch lists (``epoch``, ``train_loss``, ``train_accuracy``,
      ``test_loss``, ``test_accuracy``, ``learning_rate``, ``time_s``, and the
      method's diagnostics as epoch mean/min/max, e.g. ``alpha``,
      ``theta``, ``theta_min``, ``theta_max``).
    step: optimizer steps done.
    completed: False when stopped early by ``stop_after_epochs``.
  """

  config: TrainConfig
  graphdef: Any
  state: Any
  history: dict
  step: int
  completed: bool


def run_name(config: TrainConfig) -> str:
  """The checkpoint folder name of a run: method, K (if it has ascent steps), seed and config hash.

  The hash leaves out the hyperparameters the method does not read
  (:func:`experiments.core.methods.unused_fields`): SGD's runs do not depend on
  ``rho``, ``num_steps`` or XSAM's settings, SAM's not on XSAM's, so a
  study re-run with another ``rho`` reuses SGD's finished runs.
  """
  unused = methods.unused_fields(config.method)
  k = "" if "num_steps" in unused else f"_k{config.num_steps}"
  return f"{config.method}{k}_seed{config.seed}_{config.fingerprint(ignore=unused)}"


def _log_epoch(history: dict, epoch: int, step_metrics: list, test: dict, lr: float, elapsed: float) -> None:
  stacked = jax.device_get({k: jnp.stack([m[k] for m in step_metrics]) for k in step_metrics[0]})
  history["epoch"].append(epoch + 1)
  history["train_loss"].append(float(np.mean(stacked["loss"])))
  history["train_accuracy"].append(float(np.mean(stacked["accuracy"])))
  history["test_loss"].append(test["test_loss"])
  history["test_accuracy"].append(test["test_accuracy"])
  history["learning_rate"].append(lr)
  history["time_s"].append(elapsed)
  for k in (*DIAGNOSTICS, "sharpness"):
    if k in stacked:
      v = np.asarray(stacked[k], np.float64)
      history.setdefault(k, []).append(float(v.mean()))
      history.setdefault(k + "_min", []).append(float(v.min()))
      history.setdefault(k + "_max", []).append(float(v.max()))
  if "probe_losses" in stacked:  # the last probe round of the epoch (XSAM)
    history.setdefault("probe_losses", []).append([float(x) for x in stacked["probe_losses"][-1]])


def check_checkpoint(config: TrainConfig, workdir: str, *, data: data_lib.Dataset) -> None:
  """Reads the run's checkpoint, if its folder exists, and raises if it is damaged; trains nothing.

  What a study runs for every (method, seed) before it trains any: a damaged
  checkpoint of the last method is then found before the first methods have
  trained again, not after.

  Raises:
    experiments.core.checkpoint.CheckpointError: as :func:`train_and_evaluate` with ``resume``.
  """
  data = data.subset(config.train_subset, config.test_subset)
  run_dir = os.path.join(workdir, run_name(resolve(config, data)))
  if not os.path.lexists(run_dir):
    return  # nothing to read: no model is built
  config, _, state = init_run(config, data)
  steps_per_epoch = len(data.y_train) // config.batch_size
  checkpointer, *_ = resume_lib.open_run(
    run_dir, state, resume=True, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * config.epochs
  )
  checkpointer.close()


def train_and_evaluate(
  config: TrainConfig,
  workdir: str | None,
  *,
  data: data_lib.Dataset | None = None,
  progress: bool = True,
  resume: bool = True,
) -> TrainResult:
  """Trains one run (one method, one seed), evaluating after every epoch.

  If ``workdir`` holds a checkpoint of this very configuration (same
  :meth:`TrainConfig.fingerprint`), training resumes from it and ends with the
  same weights, bitwise, as an uninterrupted run. With ``config.devices > 1``
  the run is data parallel (see the module docstring); its checkpoints are
  restored onto the replicated sharding.

  Args:
    config: the run's configuration (data-dependent fields may be unset).
    workdir: folder for checkpoints (a sub-folder per run); None disables
      checkpointing.
    data: the data set, if already loaded (subsets are applied here).
    progress: show a tqdm progress bar.
    resume: continue from this run's checkpoint if there is one; False
      deletes it and starts afresh.

  Returns:
    A :class:`TrainResult`.

  Raises:
    experiments.core.checkpoint.CheckpointError: when the run's checkpoint folder
      in ``workdir`` is damaged (with ``resume``; ``resume=False`` deletes it).
  """
  parallel = data_parallel(config)  # validates devices before loading anything
  if data is None:
    data = data_lib.load_dataset(config.dataset, config.data_dir)
  data = data.subset(config.train_subset, config.test_subset)
  config, graphdef, state = init_run(config, data)
  assert config.augment is not None  # set by resolve()
  steps_per_epoch = len(data.y_train) // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))

  checkpointer = None
  step, history, elapsed = 0, resume_lib.new_history(), 0.0
  if workdir is not None:
    checkpointer, state, step, history, elapsed = resume_lib.open_run(
      os.path.join(workdir, run_name(config)),
      state,
      resume=resume,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
    )

  augment = config.augment

  def batches(epoch: int) -> data_lib.EpochBatches:
    return data_lib.EpochBatches(data, seed=config.seed, epoch=epoch, batch_size=config.batch_size, augment=augment)

  def step_fn(state: nnx.State, xy: tuple[np.ndarray, np.ndarray]) -> tuple[nnx.State, dict]:
    if parallel is not None:
      xy = jax.device_put(xy, parallel.batch)
    return train_step(graphdef, state, *xy)

  def evaluate_state(state: nnx.State) -> dict:
    return evaluate(
      graphdef, state, data, config.eval_batch_size, sharding=None if parallel is None else parallel.batch
    )

  def log(epoch: int, step: int, step_metrics: list, test: dict, elapsed: float) -> dict[str, str]:
    _log_epoch(history, epoch, step_metrics, test, float(cast(jax.Array, schedule(step - 1))), elapsed)
    postfix = {"test_acc": f"{test['test_accuracy']:.3f}", "loss": f"{history['train_loss'][-1]:.4f}"}
    if "sharpness" in history:  # L(w + d) - L(w), the epoch's mean
      postfix["sharpness"] = f"{history['sharpness'][-1]:.4f}"
    return postfix

  def save(step: int, state: nnx.State, elapsed: float) -> None:
    assert checkpointer is not None
    checkpointer.save(step, state, {"step": step, "history": history, "elapsed_s": elapsed})

  state, done, completed = engine.fit(
    state,
    epochs=config.epochs,
    steps_per_epoch=steps_per_epoch,
    start=engine.Progress(step, elapsed),
    batches=batches,
    step=step_fn,
    evaluate=evaluate_state,
    log=log,
    save=None if checkpointer is None else save,
    checkpoint_every=config.checkpoint_every,
    stop_after_epochs=config.stop_after_epochs,
    progress=progress,
    desc=f"{config.method} K={config.num_steps} seed={config.seed}",
  )
  if checkpointer is not None:
    checkpointer.close()
  return TrainResult(config, graphdef, state, history, done.step, completed)
