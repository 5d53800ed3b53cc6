"""The sharpness-aware methods of the studies, by name: one builder for every study.

:func:`build` makes a method's transformation from its name and
hyperparameters, ``build("xsam", rho=0.1, rho_max=0.2, num_steps=2)``, and
:func:`chain` puts it in front of a study's base optimizer; every study (the
main job, ``experiments.toy2d``, ``experiments.sharpness_study``) builds its
optimizers with them. The main job's chain (:func:`make_optimizer`) is

    optax.chain(method_tx, optax.add_decayed_weights(wd),
                optax.sgd(cosine_schedule, momentum=0.9))

``sgd`` has no ``method_tx``. :data:`METHODS` maps a name to its
:class:`Method`: the ``xsam_jax`` factory, the hyperparameters it reads (a
run's identity includes only those, :func:`used_fields`) and fixed keyword
arguments; a new method is one line there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

import xsam_jax

if TYPE_CHECKING:
  from experiments.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Method:
  """How to build one method.

  Attributes:
    factory: the ``xsam_jax`` constructor.
    reads: the hyperparameters (of :data:`METHOD_FIELDS` or :data:`EXTRA_FIELDS`) it is passed, by keyword.
    fixed: further keyword arguments that make the variant (``plus=True``, ...).
  """

  factory: Callable[..., optax.GradientTransformationExtraArgs]
  reads: tuple[str, ...]
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


METHOD_FIELDS = ("rho", "rho_max", "num_steps", "alpha_update_period", "probe_batch_size", "alphas", "alpha_refinement")
"""The hyperparameters a method can read (:class:`~experiments.train.config.TrainConfig` fields; SGD reads none)."""

EXTRA_FIELDS = ("alpha", "gamma")
"""Hyperparameters :func:`build` also takes that are no :class:`~experiments.train.config.TrainConfig` field: the
fixed alpha of ``xsam_fixed`` and GSAM, WSAM's gamma. The main job never sets them (each method's default);
``experiments.protocol`` tunes them. They are not part of a run's id (:func:`used_fields`)."""


def _xsam_fixed(rho: Any, *, num_steps: int = 1, alpha: Any = 1.0) -> optax.GradientTransformationExtraArgs:
  """XSAM with a fixed alpha (the paper's WSAM-like baseline): ``|g_K| v(alpha)``, no probes; alpha 1 is SAM."""
  return xsam_jax.xsam(rho, rho, num_steps=num_steps, alpha_update_period=None, alpha_init=alpha)


_K = ("rho", "num_steps")

METHODS: dict[str, Method | None] = {
  "sgd": None,
  "sam": Method(xsam_jax.sam, _K),
  "xsam": Method(xsam_jax.xsam, METHOD_FIELDS),
  "asam": Method(xsam_jax.sam, _K, {"adaptive": True}),
  "msam": Method(xsam_jax.msam, _K),
  "msam_plus": Method(xsam_jax.msam, _K, {"plus": True}),
  "lsam": Method(xsam_jax.lsam, _K),
  "lsam_plus": Method(xsam_jax.lsam, _K, {"plus": True}),
  "vasso": Method(xsam_jax.vasso, ("rho",)),
  "eigen_sam": Method(xsam_jax.eigen_sam, _K),
  # The library's defaults for the rest unless `alpha` / `gamma` are given (EXTRA_FIELDS): GSAM's alpha 0.4; WSAM's
  # gamma 0.9, coupled (the chain's SGD follows); sigma 1, lmbda 0.6; LookSAM's k 5, alpha 0.7; xsam_fixed's alpha 1.
  "gsam": Method(xsam_jax.gsam, ("rho", "alpha")),
  "wsam": Method(xsam_jax.wsam, ("rho", "gamma")),
  "xsam_fixed": Method(_xsam_fixed, ("rho", "num_steps", "alpha")),  # rho_max is unused: no probes
  "friendly_sam": Method(xsam_jax.friendly_sam, ("rho",)),
  "looksam": Method(xsam_jax.looksam, ("rho",)),
}
"""Name -> how to build its sharpness-aware transformation (None: plain SGD)."""


def is_known(name: str) -> bool:
  """Whether ``name`` is a method of :data:`METHODS`."""
  return name in METHODS


def _method(name: str) -> Method | None:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
  return METHODS[name]


def build(name: str, **hyperparameters: Any) -> optax.GradientTransformationExtraArgs | None:
  """The sharpness-aware transformation of method ``name`` (None for ``sgd``).

  Args:
    name: a key of :data:`METHODS`.
    **hyperparameters: values of :data:`METHOD_FIELDS` or :data:`EXTRA_FIELDS`
      (they may be traced); each method takes those it reads and ignores the
      others, and one left out gets the ``xsam_jax`` default.

  Raises:
    ValueError: for an unknown name or hyperparameter, and for values the
      ``xsam_jax`` constructor rejects (naming the argument).
  """
  method = _method(name)
  unknown = sorted(set(hyperparameters) - set(METHOD_FIELDS) - set(EXTRA_FIELDS))
  if unknown:
    raise ValueError(f"unknown hyperparameters {unknown}; methods read {', '.join(METHOD_FIELDS + EXTRA_FIELDS)}")
  if method is None:
    return None
  return method.factory(**method.fixed, **{k: v for k, v in hyperparameters.items() if k in method.reads})


def chain(
  name: str, *base: optax.GradientTransformation, **hyperparameters: Any
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(build(name, **hyperparameters), *base)``: the method first, on the raw gradient."""
  return _chain(build(name, **hyperparameters), base)


def _chain(
  method_tx: optax.GradientTransformation | None, base: tuple[optax.GradientTransformation, ...]
) -> optax.GradientTransformationExtraArgs:
  return optax.chain(*([] if method_tx is None else [method_tx]), *base)


def sgd_base(
  learning_rate: float, momentum: float, weight_decay: float, total_steps: int, warmup_steps: int = 0
) -> tuple[optax.GradientTransformation, ...]:
  """The studies' base optimizer: decoupled weight decay, then SGD with momentum and a cosine schedule.

  The learning rate follows ``lr * (1 + cos(pi t / T)) / 2`` over ``T = total_steps``;
  with ``warmup_steps = W > 0`` it is ``lr * t / W`` for ``t < W``, then
  ``lr * (1 + cos(pi (t - W) / (T - W))) / 2`` (written here rather than
  ``optax.warmup_cosine_decay_schedule``, which rejects a traced ``lr``).
  """
  if warmup_steps < 0 or warmup_steps >= max(total_steps, 1):
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
  if not warmup_steps:
    return optax.add_decayed_weights(weight_decay), optax.sgd(
      optax.cosine_decay_schedule(learning_rate, max(total_steps, 1)), momentum=momentum
    )
  warm, decay = warmup_steps, total_steps - warmup_steps

  def schedule(count: Any) -> jax.Array:
    ramp = learning_rate * count / warm
    t = jnp.clip(count - warm, 0, decay)
    return jnp.where(count < warm, ramp, learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * t / decay)))

  return optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum)


def used_fields(name: str) -> frozenset[str]:
  """The fields of :data:`METHOD_FIELDS` that method ``name`` reads.

  A run's identity (``experiments.train.trainer.run_name``) includes only these
  of them, so e.g. changing ``rho`` never retrains SGD.

  Raises:
    ValueError: for an unknown name.
  """
  method = _method(name)
  return frozenset(() if method is None else set(method.reads) & set(METHOD_FIELDS))


def unused_fields(name: str) -> frozenset[str]:
  """The fields of :data:`METHOD_FIELDS` that method ``name`` does not read."""
  return frozenset(METHOD_FIELDS) - used_fields(name)


def method_transform(config: TrainConfig) -> optax.GradientTransformationExtraArgs | None:
  """The sharpness-aware transformation of ``config.method`` (None for SGD).

  ``config.alphas`` None is the library's default grid.

  Raises:
    ValueError: for an unknown method, an unresolved ``rho_max`` that the
      method reads, and hyperparameters the ``xsam_jax`` constructor
      rejects (naming the argument).
  """
  if config.rho_max is None and "rho_max" in used_fields(config.method):
    raise ValueError("`rho_max` is None: resolve the configuration first (experiments.train.checks.resolve).")
  hyperparameters = {f: getattr(config, f) for f in METHOD_FIELDS if f != "alphas" or config.alphas is not None}
  return build(config.method, **hyperparameters)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """The full chain for ``config``, cosine-decayed over ``total_steps``.

  Runs that differ only in fields that do not enter the optimizer (seed, data
  dir, checkpointing) get the very same transformation object, hence an equal
  NNX ``GraphDef`` and one compiled train step for all seeds.

  Args:
    config: a resolved :class:`~experiments.train.config.TrainConfig` (``rho_max`` etc. filled in).
    total_steps: number of optimizer steps of the whole run.

  Returns:
    ``optax.chain(method_tx, add_decayed_weights, sgd)``.
  """
  key = config.replace(seed=0, data_dir="", checkpoint_every=0, stop_after_epochs=None)
  return _make_optimizer(key, total_steps)


@functools.lru_cache(maxsize=32)
def _make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  base = sgd_base(config.learning_rate, config.momentum, config.weight_decay, total_steps)
  return _chain(method_transform(config), base)
