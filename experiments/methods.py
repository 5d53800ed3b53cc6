"""The optimizers of the study, by name, and the full optax chain.

Every run uses the same chain around the method's transformation:

    optax.chain(method_tx, optax.add_decayed_weights(wd),
                optax.sgd(cosine_schedule, momentum=0.9))

``sgd`` has no ``method_tx``. :data:`METHODS` maps a name to a builder
``config -> GradientTransformation``; a new method is one line there. A name
not in the table that ``xsam_jax`` exports (e.g. a multi-step relative added
later) is built generically as ``xsam_jax.<name>(rho, num_steps=K)``.
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

_FAMILY = {
  # name: (xsam_jax attribute it needs, builder)
  "asam": ("sam", lambda c: xsam_jax.sam(c.rho, num_steps=c.num_steps, adaptive=True)),
  "msam": ("msam", lambda c: xsam_jax.msam(c.rho, num_steps=c.num_steps)),
  "msam_plus": ("msam", lambda c: xsam_jax.msam(c.rho, num_steps=c.num_steps, plus=True)),
  "lsam": ("lsam", lambda c: xsam_jax.lsam(c.rho, num_steps=c.num_steps)),
  "lsam_plus": ("lsam", lambda c: xsam_jax.lsam(c.rho, num_steps=c.num_steps, plus=True)),
  "vasso": ("vasso", lambda c: xsam_jax.vasso(c.rho)),
}
METHODS.update({name: build for name, (needs, build) in _FAMILY.items() if hasattr(xsam_jax, needs)})


def _generic(name: str, c: TrainConfig) -> optax.GradientTransformation:
  factory = getattr(xsam_jax, name)
  kwargs: dict[str, Any] = {}
  params = inspect.signature(factory).parameters
  if "num_steps" in params:
    kwargs["num_steps"] = c.num_steps
  if "rho_max" in params:
    kwargs["rho_max"] = c.rho_max
  if "alpha_update_period" in params:
    kwargs["alpha_update_period"] = c.alpha_update_period
  return factory(c.rho, **kwargs)


def is_known(name: str) -> bool:
  """Whether :func:`method_transform` can build ``name``."""
  return name in METHODS or callable(getattr(xsam_jax, name, None))


def method_transform(config: TrainConfig) -> optax.GradientTransformation | None:
  """The sharpness-aware transformation of ``config.method`` (None for SGD).

  Raises:
    ValueError: for a name neither in :data:`METHODS` nor in ``xsam_jax``.
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
