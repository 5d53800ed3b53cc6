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
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import methods, models
from experiments.configs import TrainConfig

DIAGNOSTICS = ("alpha", "theta", "grad_norm")
"""Scalar fields of a method's optax state logged every step when present."""

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


class ConfigError(ValueError):
  """A configuration value the study cannot run with, found before training.

  Attributes:
    field: the offending :class:`TrainConfig` field (``"method"`` for a
      method name or a method's other complaint, ``"dataset"`` for the data
      set's name).
    detail: what is wrong with it, without the field's name (so a command
      line can prefix its own flag name).
  """

  def __init__(self, field: str, detail: str) -> None:
    super().__init__(f"{field} {detail}")
    self.field = field
    self.detail = detail


class DeviceCountError(ConfigError):
  """A data-parallel device count this machine or batch size cannot take.

  Attributes:
    field: the offending setting, ``"devices"`` or ``"batch_size"``.
    detail: what is wrong with it, without the setting's name (so a command
      line can prefix its own flag name).
  """


def check_devices(devices: int, batch_size: int) -> None:
  """Validates a data-parallel device count against the machine and the batch.

  Args:
    devices: the requested number of devices.
    batch_size: the training batch size, split evenly across the devices.

  Raises:
    DeviceCountError: (a ``ValueError``) if ``devices`` is not an integer in
      ``[1, len(jax.devices())]`` (field ``"devices"``) or does not divide
      ``batch_size`` (field ``"batch_size"``).
  """
  available = len(jax.devices())
  if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or not 1 <= devices <= available:
    hint = ""
    if isinstance(devices, (int, np.integer)) and devices > available and jax.default_backend() == "cpu":
      hint = "; on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting"
    raise DeviceCountError(
      "devices",
      f"must be an integer between 1 and {available} (the number of jax.devices() on this "
      f"{jax.default_backend()} backend), got {devices!r}{hint}",
    )
  if batch_size % devices:
    raise DeviceCountError(
      "batch_size",
      f"{batch_size} is not divisible by the device count {devices}: every device gets "
      f"batch_size / devices examples; use a multiple of {devices}",
    )


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


def check_model(model: str | None, is_image: bool, dataset: str) -> None:
  """Checks that ``model`` (None: the data set's default) can take ``dataset``'s inputs.

  Raises:
    ConfigError: (field ``"model"``) for an unknown model, a 1-D CNN on
      images or a 2-D network on 1-D series.
  """
  if model is None or model == "mlp":
    return
  if model not in models.MODELS:
    raise ConfigError("model", f"must be one of {', '.join(models.MODELS)} (or None: by data set), got {model!r}")
  if model == "cnn1d" and is_image:
    raise ConfigError("model", f"cnn1d takes 1-D series, but {dataset} holds images: use mlp, cnn2d or resnet18")
  if model != "cnn1d" and not is_image:
    raise ConfigError("model", f"{model} takes images, but {dataset} holds 1-D series: use mlp or cnn1d")


def _check_batch_size(batch_size: int, n_train: int, subset: int | None) -> None:
  if batch_size > n_train:
    where = f" (train_subset {subset})" if subset is not None and subset <= n_train else ""
    raise ConfigError(
      "batch_size", f"{batch_size} exceeds the {n_train} training examples{where}: at most {n_train} allowed"
    )


def check_method(config: TrainConfig) -> None:
  """Builds ``config.method``'s transformation, so that the library validates its hyperparameters.

  Fields left to :func:`resolve` get stand-ins (``rho_max = 2 rho``, a
  probe period of 1 step, ``probe_batch_size`` 1): the checks of the values
  the user set are those of the real run.

  Raises:
    ConfigError: field ``"method"`` for a name that is not a method, else
      the field the ``xsam_jax`` constructor rejected (``rho``,
      ``num_steps``, ``alphas``, ...).
  """
  name = config.method
  if not methods.is_known(name):
    known = ", ".join(sorted(methods.METHODS))
    raise ConfigError("method", f"unknown method {name!r}: choose one of {known} or an xsam_jax transformation")
  trial = config.replace(
    rho_max=2 * config.rho if config.rho_max is None else config.rho_max,
    alpha_update_period=1 if config.alpha_update_period is None else config.alpha_update_period,
    probe_batch_size=1 if config.probe_batch_size == "auto" else config.probe_batch_size,
  )
  try:
    methods.method_transform(trial)
  except (ValueError, TypeError) as e:
    message = str(e)
    named = re.match(r"`(\w+)` (.*)", message, re.S)
    if named and named.group(1) in methods.METHOD_FIELDS:
      raise ConfigError(named.group(1), f"{named.group(2).rstrip('.')} (rejected by {name})") from e
    raise ConfigError("method", message if name in message else f"{name}: {message}") from e


def check_study(config: TrainConfig, method_names: Sequence[str]) -> None:
  """Checks a study before it loads any data or trains any run.

  The device count, the data set's name (a tensorflow-datasets name is
  looked up, not loaded), the model against the data set's kind, the batch
  size against the training examples where their number is known (built-in
  data sets, ``train_subset``) and every method's hyperparameters (by
  building its transformation, :func:`check_method`).

  Args:
    config: the configuration shared by the study's runs.
    method_names: the methods to train.

  Raises:
    ConfigError: naming the offending field (``DeviceCountError`` for the
      device count).
  """
  check_devices(config.devices, config.batch_size)
  try:
    data_lib.check_dataset_name(config.dataset)
  except data_lib.DatasetError as e:
    raise ConfigError("dataset", str(e)) from e
  info = data_lib.BUILTIN_DATASETS.get(config.dataset)
  check_model(config.model, True if info is None else info.is_image, config.dataset)
  sizes = [n for n in (None if info is None else info.train_size, config.train_subset) if n is not None]
  if sizes:
    _check_batch_size(config.batch_size, min(sizes), config.train_subset)
  if not method_names:
    raise ConfigError("method", "no method to train: name at least one")
  seen: set[str] = set()
  for name in method_names:
    if name in seen:
      raise ConfigError("method", f"{name!r} is listed twice")
    seen.add(name)
    check_method(config.replace(method=name))


def resolve(config: TrainConfig, data: data_lib.Dataset) -> TrainConfig:
  """Fills the configuration's data-dependent defaults.

  ``model`` from the input shape, ``rho_max = 2 rho``, the probe period = one
  epoch, ``probe_batch_size`` (None for the MLP: one vmap; 1 for conv nets:
  a loop, which XLA on CPU runs about 10x faster), ``augment`` for
  tensorflow-datasets images.

  Args:
    config: the requested configuration.
    data: the loaded (and subset) data set.

  Returns:
    A configuration with no ``None`` / ``"auto"`` left among those fields.

  Raises:
    ConfigError: for a model that cannot take the data, or a batch size
      above the number of training examples.
  """
  check_model(config.model, data.is_image, data.name)
  model = config.model or models.default_model(data.input_shape, data.is_image)
  n_train = len(data.y_train)
  _check_batch_size(config.batch_size, n_train, config.train_subset)
  steps_per_epoch = n_train // config.batch_size
  probe = config.probe_batch_size
  if probe == "auto":
    probe = None if model == "mlp" else 1
  augment = config.augment
  if augment is None:
    augment = data.is_image and data.name != "digits"
  return config.replace(
    model=model,
    rho_max=2 * config.rho if config.rho_max is None else config.rho_max,
    alpha_update_period=steps_per_epoch if config.alpha_update_period is None else config.alpha_update_period,
    probe_batch_size=probe,
    augment=augment,
  )


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
    ``grad_norm``).
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
  (:func:`experiments.methods.unused_fields`): SGD's runs do not depend on
  ``rho``, ``num_steps`` or XSAM's settings, SAM's not on XSAM's, so a
  study re-run with another ``rho`` reuses SGD's finished runs.
  """
  unused = methods.unused_fields(config.method)
  k = "" if "num_steps" in unused else f"_k{config.num_steps}"
  return f"{config.method}{k}_seed{config.seed}_{config.fingerprint(ignore=unused)}"


def _new_history() -> dict:
  keys = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "time_s"]
  return {k: [] for k in keys}


def _log_epoch(history: dict, epoch: int, step_metrics: list, test: dict, lr: float, elapsed: float) -> None:
  stacked = jax.device_get({k: jnp.stack([m[k] for m in step_metrics]) for k in step_metrics[0]})
  history["epoch"].append(epoch + 1)
  history["train_loss"].append(float(np.mean(stacked["loss"])))
  history["train_accuracy"].append(float(np.mean(stacked["accuracy"])))
  history["test_loss"].append(test["test_loss"])
  history["test_accuracy"].append(test["test_accuracy"])
  history["learning_rate"].append(lr)
  history["time_s"].append(elapsed)
  for k in DIAGNOSTICS:
    if k in stacked:
      v = np.asarray(stacked[k], np.float64)
      history.setdefault(k, []).append(float(v.mean()))
      history.setdefault(k + "_min", []).append(float(v.min()))
      history.setdefault(k + "_max", []).append(float(v.max()))
  if "probe_losses" in stacked:  # the last probe round of the epoch (XSAM)
    history.setdefault("probe_losses", []).append([float(x) for x in stacked["probe_losses"][-1]])


def _resume_point(
  meta: dict, saved_step: int | None, steps_per_epoch: int, total_steps: int
) -> tuple[int, dict, float]:
  """``(step, history, elapsed_s)`` from a checkpoint's ``meta``; ValueError etc. if inconsistent."""
  step, history, elapsed = int(meta["step"]), meta["history"], float(meta["elapsed_s"])
  if step != saved_step or not 0 < step <= total_steps or step % steps_per_epoch:
    raise ValueError(f"meta says step {step} in the checkpoint of step {saved_step} (of {total_steps} steps)")
  if not isinstance(history, dict) or any(
    not isinstance(history.get(k), list) or len(history[k]) != step // steps_per_epoch for k in _new_history()
  ):
    raise ValueError(f"the history does not hold the {step // steps_per_epoch} epochs of step {step}")
  return step, history, elapsed


def _open_run(
  run_dir: str, state: nnx.State, *, resume: bool, steps_per_epoch: int, total_steps: int
) -> tuple[ckpt_lib.RunCheckpointer, nnx.State, int, dict, float]:
  """The run's checkpointer and its resume point: ``(checkpointer, state, step, history, elapsed_s)``.

  Without ``resume`` the folder is deleted first; otherwise its newest
  checkpoint, if any, is restored onto the shardings of ``state``.

  Raises:
    experiments.checkpoint.CheckpointError: for a damaged folder.
  """
  if not resume and os.path.isdir(run_dir):
    shutil.rmtree(run_dir)
  elif not resume and os.path.lexists(run_dir):
    os.remove(run_dir)
  checkpointer = ckpt_lib.RunCheckpointer(run_dir)
  step, history, elapsed = 0, _new_history(), 0.0
  try:
    saved = checkpointer.latest_step()
    if saved is not None:
      state, meta = checkpointer.restore(state, saved)
      step, history, elapsed = _resume_point(meta, saved, steps_per_epoch, total_steps)
  except ckpt_lib.CheckpointError:
    checkpointer.close()
    raise
  except (KeyError, TypeError, ValueError) as e:
    checkpointer.close()
    raise ckpt_lib.CheckpointError(checkpointer.directory, e) from e
  return checkpointer, state, step, history, elapsed


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
    experiments.checkpoint.CheckpointError: when the run's checkpoint folder
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
  step, history, elapsed = 0, _new_history(), 0.0
  if workdir is not None:
    checkpointer, state, step, history, elapsed = _open_run(
      os.path.join(workdir, run_name(config)),
      state,
      resume=resume,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
    )

  bar = tqdm(
    total=total_steps,
    initial=step,
    disable=not progress,
    unit="step",
    mininterval=0.5,
    desc=f"{config.method} K={config.num_steps} seed={config.seed}",
    dynamic_ncols=True,
  )
  completed = step >= total_steps
  start_epoch = step // steps_per_epoch
  for epoch in range(start_epoch, config.epochs):
    t0 = time.perf_counter()
    batches = data_lib.EpochBatches(
      data, seed=config.seed, epoch=epoch, batch_size=config.batch_size, augment=config.augment
    )
    step_metrics = []
    for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
      x, y = batches[i]
      if parallel is not None:
        x, y = jax.device_put((x, y), parallel.batch)
      state, metrics = train_step(graphdef, state, x, y)
      step_metrics.append(metrics)
      step += 1
      bar.update(1)
    test = evaluate(
      graphdef, state, data, config.eval_batch_size, sharding=None if parallel is None else parallel.batch
    )
    elapsed += time.perf_counter() - t0
    _log_epoch(history, epoch, step_metrics, test, float(cast(jax.Array, schedule(step - 1))), elapsed)
    bar.set_postfix(test_acc=f"{test['test_accuracy']:.3f}", refresh=False)
    done = epoch + 1 == config.epochs
    stop = config.stop_after_epochs is not None and epoch + 1 >= config.stop_after_epochs and not done
    every = config.checkpoint_every
    if checkpointer is not None and (done or stop or (every > 0 and (epoch + 1) % every == 0)):
      checkpointer.save(step, state, {"step": step, "history": history, "elapsed_s": elapsed})
    if done:
      completed = True
    if stop:
      break
  bar.close()
  if checkpointer is not None:
    checkpointer.close()
  return TrainResult(config, graphdef, state, history, step, completed)
