"""Schedules for the ascent radius (docs/algorithm.md, "Training controls")."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src import validation

PEAK_SEARCH_STEPS = 1 << 20
"""Without ``lr_max``, the learning rate's peak is searched over this many first steps."""


def rho_schedule_from_lr(
  lr_schedule: optax.ScalarOrSchedule,
  *,
  rho_max: float,
  rho_min: float = 0.0,
  lr_max: float | None = None,
  lr_min: float = 0.0,
) -> optax.Schedule:
  r"""A radius that follows the learning rate (GSAM's rho schedule), clamped to ``[rho_min, rho_max]``.

  .. math::

    \rho_t = \mathrm{clip}\Big(\rho_{\min} + (\rho_{\max} - \rho_{\min})
      \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}},\ \rho_{\min},\ \rho_{\max}\Big)

  for the learning rate ``eta_t``. With the defaults (``rho_min = lr_min =
  0``) this is ``rho_max * eta_t / eta_max``: proportional to the learning
  rate, ``rho_max`` at its peak. The clamp keeps the radius in range where
  the learning rate leaves ``[lr_min, lr_max]``; in particular it is never
  negative during a warm-up that starts below ``lr_min`` (the formula alone
  would be).

  Args:
    lr_schedule: the learning-rate schedule (an optax schedule of the step
      count), or a constant learning rate (then the radius is ``rho_max``).
    rho_max: the radius at the learning rate's peak, a finite number > 0.
    rho_min: the radius at ``lr_min``, in ``[0, rho_max]``.
    lr_max: the learning rate's peak; default: the largest value of
      ``lr_schedule`` over its first ``2^20`` steps (pass it for a longer
      warm-up, or to skip that evaluation).
    lr_min: the learning rate mapped to ``rho_min``, below ``lr_max``.

  Returns:
    An optax schedule ``step -> rho`` for the ``rho`` (or ``rho_max``)
    argument of any method; the transformation calls it with its own step
    count, which matches the learning-rate schedule's when both count the
    same ``update`` calls (one optimizer step each).

  Raises:
    ValueError: an argument out of its range.

  Example:
    >>> import optax, xsam_jax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=10, decay_steps=100)
    >>> rho = xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05)
    >>> [round(float(rho(t)), 4) for t in (0, 5, 10, 100)]
    [0.0, 0.025, 0.05, 0.0]
    >>> tx = optax.chain(xsam_jax.sam(rho), optax.sgd(lr))

  References:
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization
    (GSAM), https://arxiv.org/abs/2203.08065, 2022 (rho tied to the
    learning rate).
  """
  validation.check_positive("rho_max", rho_max)
  validation.check_real(
    "rho_min", rho_min, f"a finite real number in [0, rho_max={rho_max}]", lambda v: 0 <= v <= rho_max
  )
  validation.check_finite("lr_min", lr_min)
  if not callable(lr_schedule):
    validation.check_finite("lr_schedule", lr_schedule)
    return lambda step: jnp.full(jnp.shape(step), rho_max, jnp.float32)
  if lr_max is None:
    steps = jnp.arange(PEAK_SEARCH_STEPS, dtype=jnp.int32)
    lr_max = float(np.max(np.asarray(jax.jit(jax.vmap(lr_schedule))(steps))))
    if not math.isfinite(lr_max):
      raise ValueError(f"`lr_schedule` is not finite over its first {PEAK_SEARCH_STEPS} steps (max {lr_max}).")
  lr_hi = validation.check_finite("lr_max", lr_max)
  if lr_hi is not None and lr_hi <= lr_min:
    raise ValueError(f"`lr_max` must be greater than `lr_min`={lr_min}, got {lr_hi} (a schedule that never rises?).")

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    frac = jnp.clip((jnp.asarray(lr_schedule(step), jnp.float32) - lr_min) / (lr_max - lr_min), 0.0, 1.0)
    return rho_min * (1.0 - frac) + rho_max * frac  # exactly rho_min and rho_max at the ends

  return schedule
