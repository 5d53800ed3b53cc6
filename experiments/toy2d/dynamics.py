"""The runs of the 2-D study: the optimizers on the test function, batched; where runs end; update directions.

All start points and settings of one (method, K) pair run in one jitted
call: ``jax.vmap`` over settings and start points around a ``jax.lax.scan``
over optimizer steps. The optimizers come from :func:`experiments.core.methods.chain`
(the method, then plain ``optax.sgd(lr)``). Everything is deterministic.

Why not :mod:`experiments.core.engine`: there is no data here (no batches,
epochs or evaluation split; the loss is one fixed function of two
coordinates), runs are vmapped over start points as well as settings, and
the study keeps every step's position (the trajectories it plots), not
per-epoch means. The step itself is the engine's: the clean gradient, then
``tx.update(..., loss_fn=...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.core import methods
from experiments.toy2d.config import Toy2dConfig
from xsam_jax import testfns

LOSS = testfns.fisher_sam_toy
FLAT = np.asarray(testfns.FLAT_MINIMUM.location, np.float32)
SHARP = np.asarray(testfns.SHARP_MINIMUM.location, np.float32)
OUTCOMES = ("flat", "sharp", "neither_flat_basin", "neither_sharp_basin", "other")
"""Where a run ends: within ``NEAR_RADIUS`` of the flat / sharp minimum, or
at neither (stalled at the saddle or at a point where the method's update
vanishes although the gradient does not, or still bouncing), split by the
basin of the end point; "other" is non-finite or no basin."""

# Distance from a minimum of a run's end state (mean of its last 10% of
# iterates) that counts as "reached it". SAM/XSAM keep a 2-cycle around the
# minimum at large lr (amplitude up to ~5 at lr=300), whose mean is close to
# it; runs stalled elsewhere end near the saddle or >= 3.4 from the minima.
NEAR_RADIUS = 3.0

# Plain gradient descent used to find which basin a point lies in: stable on
# both minima (lr * lambda_max = 0.49 at the sharp one); its slowest mode
# (the flat minimum's, lr * lambda_min = 0.033) contracts by e^-48 in 1500 steps.
SETTLE_LR = 100.0
SETTLE_STEPS = 1500
SETTLE_RADIUS = 1.0


def method_list(ks: Sequence[int]) -> list[tuple[str, str, int]]:
  """``(label, method, K)`` for SGD and for SAM / XSAM with each K."""
  return [("SGD", "sgd", 1), *((f"SAM K={k}", "sam", k) for k in ks), *((f"XSAM K={k}", "xsam", k) for k in ks)]


def base_optimizer(lr: float | jax.Array, momentum: float | jax.Array | None = None) -> optax.GradientTransformation:
  """The study's base optimizer: ``optax.sgd(lr)``, with heavy-ball ``momentum`` unless it is None.

  With momentum ``beta`` the step is ``v <- beta v + u``, ``x <- x - lr v``
  (``u``: the method's output; optax's ``trace``, PyTorch's SGD without
  dampening), the paper's base optimizer at ``beta = 0.9``. ``momentum`` may
  be traced (it batches like the other hyperparameters); None is plain
  ``optax.sgd(lr)``, the main sweep's optimizer.
  """
  return optax.sgd(lr) if momentum is None else optax.sgd(lr, momentum=momentum)


def run_one(x0, rho, rho_max, lr, period, momentum=None, *, method, num_steps, steps, record=False):
  """Runs ``steps`` optimizer steps from ``x0`` with ``jax.lax.scan``.

  The optimizer is ``methods.chain(method, base_optimizer(lr, momentum))``.
  The end state of a run is summarised over its last ``max(1, steps // 10)``
  iterates: their mean (the centre of any final oscillation) and their RMS
  spread around it.

  Returns:
    dict with ``x_final`` (last iterate), ``x_end`` (mean of the last 10% of
    the iterates), ``spread`` (their RMS distance to ``x_end``), ``min_s``
    (smallest ``s`` visited), ``alpha`` (XSAM's final alpha, nan for the
    other methods) and, if ``record``, ``path`` (``(steps + 1, 2)``) and
    ``alpha_path`` (``(steps,)``: XSAM's alpha after each step, nan for the
    other methods).
  """
  tx = methods.chain(
    method,
    base_optimizer(lr, momentum),
    rho=rho,
    rho_max=rho_max,
    num_steps=num_steps,
    alpha_update_period=period,
  )
  state = tx.init(x0)
  window = max(1, steps // 10)
  window_start = steps - window  # the window holds the iterates after steps > window_start

  def alpha_of(state):
    if method == "xsam":
      return cast(tuple[xsam_jax.XSAMState, ...], state)[0].alpha
    return jnp.full((), jnp.nan, jnp.float32)

  def body(carry, i):
    x, state, min_s, x_ref, d_sum, d_sq = carry
    grads = jax.grad(LOSS)(x)
    updates, state = tx.update(grads, state, x, loss_fn=LOSS)
    x = cast(jax.Array, optax.apply_updates(x, updates))
    # Offsets from the window's first iterate keep the float32 variance exact.
    x_ref = jnp.where(i + 1 == window_start + 1, x, x_ref)
    in_window = i + 1 > window_start
    d = jnp.where(in_window, x - x_ref, jnp.zeros_like(x))
    carry = (x, state, jnp.minimum(min_s, x[1]), x_ref, d_sum + d, d_sq + jnp.sum(d * d))
    return carry, ((x, alpha_of(state)) if record else None)

  zero = jnp.zeros((), x0.dtype)
  init = (x0, state, x0[1], x0, jnp.zeros_like(x0), zero)
  (x, state, min_s, x_ref, d_sum, d_sq), recorded = jax.lax.scan(body, init, jnp.arange(steps))
  mean_d = d_sum / window
  out = {
    "x_final": x,
    "x_end": x_ref + mean_d,
    "spread": jnp.sqrt(jnp.maximum(d_sq / window - jnp.sum(mean_d * mean_d), 0.0)),
    "min_s": min_s,
    "alpha": alpha_of(state),
  }
  if record:
    path, alphas = recorded
    out["path"] = jnp.concatenate([x0[None, :], path], axis=0)
    out["alpha_path"] = alphas
  return out


def settle(x):
  """Gradient-descent basin of ``x``: 0 flat, 1 sharp, 2 neither (plain GD to convergence)."""

  def body(y, _):
    return y - SETTLE_LR * jax.grad(LOSS)(y), None

  y, _ = jax.lax.scan(body, x, None, length=SETTLE_STEPS)
  d_flat = jnp.linalg.norm(y - jnp.asarray(FLAT))
  d_sharp = jnp.linalg.norm(y - jnp.asarray(SHARP))
  label = jnp.where(d_flat < SETTLE_RADIUS, 0, jnp.where(d_sharp < SETTLE_RADIUS, 1, 2))
  return jnp.where(jnp.all(jnp.isfinite(y)), label, 2)


def outcome(x):
  """Index into :data:`OUTCOMES` of a run's end point ``x``."""
  near_flat = jnp.linalg.norm(x - jnp.asarray(FLAT)) < NEAR_RADIUS
  near_sharp = jnp.linalg.norm(x - jnp.asarray(SHARP)) < NEAR_RADIUS
  basin = settle(x)
  code = jnp.where(near_flat, 0, jnp.where(near_sharp, 1, jnp.where(basin == 0, 2, jnp.where(basin == 1, 3, 4))))
  return jnp.where(jnp.all(jnp.isfinite(x)), code, 4)


@functools.partial(jax.jit, static_argnames=("method", "num_steps", "steps"))
def run_grid(x0s, rhos, rho_maxs, lrs, periods, momenta=None, *, method, num_steps, steps):
  """All settings x all start points of one (method, K) in one call.

  ``rhos``, ``rho_maxs``, ``lrs``, ``periods`` and (unless None: plain
  ``optax.sgd(lr)``) ``momenta`` are ``(num_settings,)`` arrays, one entry
  per setting; ``x0s`` is ``(num_starts, 2)``.

  Returns:
    the dict of :func:`run_one` (without ``path``) plus ``outcome`` (index
    into :data:`OUTCOMES` of ``x_end``), ``outcome_final_iterate`` (the same
    for ``x_final``) and ``loss_end``; every leaf has leading shape
    ``(num_settings, num_starts)``.
  """
  one = functools.partial(run_one, method=method, num_steps=num_steps, steps=steps)
  over_starts = jax.vmap(one, in_axes=(0, None, None, None, None, None))
  over_settings = jax.vmap(over_starts, in_axes=(None, 0, 0, 0, 0, None if momenta is None else 0))
  out = over_settings(x0s, rhos, rho_maxs, lrs, periods, momenta)
  out["outcome"] = jax.vmap(jax.vmap(outcome))(out["x_end"])
  out["outcome_final_iterate"] = jax.vmap(jax.vmap(outcome))(out["x_final"])
  out["loss_end"] = LOSS(out["x_end"])
  return out


@functools.partial(jax.jit, static_argnames=("method", "num_steps", "steps"))
def run_paths(x0s, rho, rho_max, lr, period, momentum=None, *, method, num_steps, steps):
  """Full paths ``(num_starts, steps + 1, 2)`` from a few start points (``momentum``: as in :func:`run_one`)."""
  one = functools.partial(run_one, method=method, num_steps=num_steps, steps=steps, record=True)
  return jax.vmap(one, in_axes=(0, None, None, None, None, None))(x0s, rho, rho_max, lr, period, momentum)["path"]


def start_grid(config: Toy2dConfig) -> np.ndarray:
  """``(n * n, 2)`` float32 start points, mu fastest."""
  mu = np.linspace(config.mu_range[0], config.mu_range[1], config.starts_per_axis)
  s = np.linspace(config.s_range[0], config.s_range[1], config.starts_per_axis)
  mm, ss = np.meshgrid(mu, s)
  return np.stack([mm.ravel(), ss.ravel()], axis=-1).astype(np.float32)


# Direction quality (the question behind the paper's Fig. 1)

_CIRCLE = 720  # angles on the neighbourhood circle


def _unit(v):
  return v / (jnp.linalg.norm(v) + 1e-30)


def _angle_deg(u, v):
  c = jnp.clip(jnp.dot(_unit(u), _unit(v)), -1.0, 1.0)
  return jnp.degrees(jnp.arccos(c))


def true_max_direction(x, radius):
  """Unit direction of ``argmax f(x + radius * u)`` over 720 unit vectors ``u``."""
  phi = jnp.arange(_CIRCLE, dtype=jnp.float32) * (2.0 * jnp.pi / _CIRCLE)
  units = jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)
  losses = LOSS(x[None, :] + radius * units)
  return units[jnp.argmax(losses)]


def update_directions(x, rho, rho_max, num_steps):
  """The directions each method's update points away from (one step from ``x``).

  Returns:
    dict with ``sgd`` (``g_0``), ``sam`` (``g_K``), ``xsam`` (``|g_K| v(alpha*)``
    after probing at ``x``), ``alpha`` (XSAM's alpha*) and ``ascent_points``
    (``x + d_k``, k = 0..K).
  """
  g0 = jax.grad(LOSS)(x)
  sam_tx = methods.chain("sam", rho=rho, num_steps=num_steps)
  sam_out, _ = sam_tx.update(g0, sam_tx.init(x), x, loss_fn=LOSS)
  xsam_tx = methods.chain("xsam", rho=rho, rho_max=rho_max, num_steps=num_steps, alpha_update_period=1)
  xsam_out, xsam_state = xsam_tx.update(g0, xsam_tx.init(x), x, loss_fn=LOSS)
  trace = xsam_jax.building_blocks.ascent(LOSS, x, g0, rho=rho, num_steps=num_steps)
  points = [x]
  for g in trace.grads[:-1]:
    points.append(points[-1] + (rho / num_steps) * _unit(g))
  return {
    "sgd": g0,
    "sam": sam_out,
    "xsam": xsam_out,
    "alpha": cast(tuple[xsam_jax.XSAMState], xsam_state)[0].alpha,
    "grads": jnp.stack(trace.grads),
    "ascent_points": jnp.stack(points),
  }


@functools.partial(jax.jit, static_argnames=("num_steps",))
def direction_errors(xs, rho, rho_max, *, num_steps):
  """Angles (degrees) between each method's direction and the true maxima.

  Returns:
    dict of ``(num_points,)`` arrays: ``{method}_vs_rho`` and
    ``{method}_vs_rho_max`` for method in sgd, sam, xsam, and XSAM's alpha.
  """

  def one(x):
    dirs = update_directions(x, rho, rho_max, num_steps)
    out = {"alpha": dirs["alpha"]}
    for radius_name, radius in (("rho", rho), ("rho_max", rho_max)):
      target = true_max_direction(x, radius)
      for m in ("sgd", "sam", "xsam"):
        out[f"{m}_vs_{radius_name}"] = _angle_deg(dirs[m], target)
    return out

  return jax.vmap(one)(xs)
