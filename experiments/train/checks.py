"""Checks of the main job's configuration before any data is loaded or any run trained.

The ranges of single fields are checked by :class:`~experiments.train.config.TrainConfig`
itself (``experiments.core.config``); these checks need more: the machine (the
device count), the data set (its name, kind and size) and the library (every
method's transformation is built, so ``xsam_jax`` validates its
hyperparameters). Each raises a :class:`ConfigError` naming the config field,
which ``experiments.train`` turns into a usage error naming the flag.
:func:`resolve` fills the fields left to the data set and model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np

from experiments.core import data as data_lib
from experiments.core import methods, models
from experiments.core.config import ConfigError
from experiments.train.config import TrainConfig


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
