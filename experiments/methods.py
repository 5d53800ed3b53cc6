"""The optimizers of the study, by name, and the full optax chain.

Every run uses the same chain around the method's transformation:

    optax.chain(method_tx, optax.add_decayed_weights(wd),
                optax.sgd(cosine_schedule, momentum=0.9))

``sgd`` has no ``method_tx``. :data:`METHODS` maps a name to a builder
``config -> GradientTransformation``; a new method is one line there, plus
the hyperparameters it reads in ``_USES`` (:func:`used_fields`: a run's
identity includes only those). A name not in the table that ``xsam_jax``
exports (e.g. a multi-step relative added later) is built generically as
``xsam_jax.<name>(rho, num_steps=K)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import optax

import xsam_jax
from experiments.configs import TrainConfig


def _xsam(c: TrainConfig) -> optax.GradientTransformationExtraArgs:
  if c.rho_max is None:
    raise ValueError("`rho_max` is None: resolve the configuration first (trainer.resolve).")
  return xsam_jax.xsam(
    c.rho,
    c.rho_max,
    num_steps=c.num_steps,
    alpha_update_period=c.alpha_update_period,
    probe_batch_size=c.probe_batch_size,
    alphas=xsam_jax.DEFAULT_ALPHAS if c.alphas is None else c.alphas,
    alpha_refinement=c.alpha_refinement,
  )


METHODS: dict[str, Callable[[TrainConfig], optax.GradientTransformation] | None] = {
  "sgd": None,
  "sam": lambda c: xsam_jax.sam(c.rho, num_steps=c.num_steps),
  "xsam": _xsam,
}
"""Name -> builder of the sharpness-aware transformation (None: plain SGD)."""

METHOD_FIELDS = ("rho", "rho_max", "num_steps", "alpha_update_period", "probe_batch_size", "alphas", "alpha_refinement")
"""The :class:`TrainConfig` fields read only by a method's transformation (plain SGD reads none)."""

_USES: dict[str, tuple[str, ...]] = {"sgd": (), "sam": ("rho", "num_steps"), "xsam": METHOD_FIELDS}

_K = ("rho", "num_steps")
_FAMILY = {
  # name: (xsam_jax attribute it needs, the fields it reads, builder)
  "asam": ("sam", _K, lambda c: xsam_jax.sam(c.rho, num_steps=c.num_steps, adaptive=True)),
  "msam": ("msam", _K, lambda c: xsam_jax.msam(c.rho, num_steps=c.num_steps)),
  "msam_plus": ("msam", _K, lambda c: xsam_jax.msam(c.rho, num_steps=c.num_steps, plus=True)),
  "lsam": ("lsam", _K, lambda c: xsam_jax.lsam(c.rho, num_steps=c.num_steps)),
  "lsam_plus": ("lsam", _K, lambda c: xsam_jax.lsam(c.rho, num_steps=c.num_steps, plus=True)),
  "vasso": ("vasso", ("rho",), lambda c: xsam_jax.vasso(c.rho)),
}
for _name, (_needs, _fields, _build) in _FAMILY.items():
  if hasattr(xsam_jax, _needs):
    METHODS[_name] = _build
    _USES[_name] = _fields

# Of METHOD_FIELDS, those the generic builder passes on when the factory takes them (rho always).
_GENERIC_FIELDS = ("num_steps", "rho_max", "alpha_update_period")


def _generic(name: str, c: TrainConfig) -> optax.GradientTransformation:
  factory = getattr(xsam_jax, name)
  kwargs: dict[str, Any] = {}
  params = inspect.signature(factory).parameters
  for field in _GENERIC_FIELDS:
    if field in params:
      kwargs[field] = getattr(c, field)
  try:
    tx = factory(c.rho, **kwargs)
  except TypeError as e:
    raise ValueError(f"xsam_jax.{name} is not an optax transformation factory taking rho: {e}") from e
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"xsam_jax.{name}(rho) returned a {type(tx).__name__}, not an optax transformation")
  return tx


def is_known(name: str) -> bool:
  """Whether :func:`method_transform` can try to build ``name``."""
  return name in METHODS or callable(getattr(xsam_jax, name, None))


def used_fields(name: str) -> frozenset[str]:
  """The fields of :data:`METHOD_FIELDS` that method ``name`` reads.

  A run's identity (``experiments.trainer.run_name``) includes only these
  of them, so e.g. changing ``rho`` never retrains SGD.

  Raises:
    ValueError: for a name :func:`is_known` does not know.
  """
  if name in _USES:
    return frozenset(_USES[name])
  if not is_known(name):
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} or an xsam_jax transformation")
  try:
    params = inspect.signature(getattr(xsam_jax, name)).parameters
  except (TypeError, ValueError):
    params = {}  # type: ignore[assignment]
  return frozenset(("rho", *(f for f in _GENERIC_FIELDS if f in params)))


def unused_fields(name: str) -> frozenset[str]:
  """The fields of :data:`METHOD_FIELDS` that method ``name`` does not read."""
  return frozenset(METHOD_FIELDS) - used_fields(name)


def method_transform(config: TrainConfig) -> optax.GradientTransformation | None:
  """The sharpness-aware transformation of ``config.method`` (None for SGD).

  The ``xsam_jax`` constructors validate their hyperparameters, so building
  the transformation checks them (``ValueError`` naming the argument).

  Raises:
    ValueError: for a name neither in :data:`METHODS` nor in ``xsam_jax``,
      for a name in ``xsam_jax`` that does not build an optax
      transformation, and for hyperparameters the constructor rejects.
  """
  name = config.method
  if name in METHODS:
    builder = METHODS[name]
    return None if builder is None else builder(config)
  if is_known(name):
    return _generic(name, config)
  raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} or an xsam_jax transformation")


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """The full chain for ``config``, cosine-decayed over ``total_steps``.

  The learning rate follows ``lr * (1 + cos(pi t / T)) / 2``. Runs that differ
  only in fields that do not enter the optimizer (seed, data dir,
  checkpointing) get the very same transformation object, hence an equal
  NNX ``GraphDef`` and one compiled train step for all seeds.

  Args:
    config: a resolved :class:`TrainConfig` (``rho_max`` etc. filled in).
    total_steps: number of optimizer steps of the whole run.

  Returns:
    ``optax.chain(method_tx, add_decayed_weights, sgd)``.
  """
  key = config.replace(seed=0, data_dir="", checkpoint_every=0, stop_after_epochs=None)
  return _make_optimizer(key, total_steps)


@functools.lru_cache(maxsize=32)
def _make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  method_tx = method_transform(config)
  parts = [] if method_tx is None else [method_tx]
  parts += [
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  ]
  return optax.chain(*parts)
