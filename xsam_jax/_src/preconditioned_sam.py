"""Preconditioned SAM (Singh, Mobahi, Agarwala & Dauphin 2025): SAM whose ascent is scaled, coordinate by
coordinate, by the inverse of Adam's preconditioner, a running mean of squared gradients kept in the state.

The second moment is kept as ``nu * 4^nu_exp``: a tree of mantissas (float32 or wider) and one shared int32
exponent, a power of two chosen each step from the largest gradient and the largest stored moment, so
squares of gradients near float32's largest value (or below its smallest normal number) neither overflow
nor flush to zero, and the ascent direction is exactly invariant to a power-of-two scale of the loss.
:func:`second_moment` and :func:`preconditioned_direction` are shared with :func:`xsam_jax.functional_sam`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class PreconditionedSAMState(NamedTuple):
  """State of :func:`preconditioned_sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_1|``, the norm of the output (diagnostic; with
      ``m_sharpness``, the replicas' mean of their own).
    nu: the mantissas of the second moment, a pytree like params in wide
      precision (float32 or wider): the running mean of squared gradients
      is ``nu * 4**nu_exp`` (zeros before the first step that perturbs).
    nu_exp: int32 scalar, the shared exponent of ``nu``.
    perturbed_loss: float32 ``L(w + e)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  nu: PyTree
  nu_exp: jax.Array
  perturbed_loss: jax.Array


def check_moment_hyperparameters(b2: Any, eps: Any) -> None:
  """``b2`` in ``[0, 1)`` and ``eps`` finite and >= 0 (a ValueError naming the argument and the range)."""
  validation.check_real("b2", b2, "a real number in [0, 1)", lambda v: 0.0 <= v < 1.0)
  validation.check_real("eps", eps, "a finite real number >= 0", lambda v: np.isfinite(v) and v >= 0.0)


def init_second_moment(params: PyTree) -> tuple[PyTree, jax.Array]:
  """``(nu, nu_exp)`` before the first step: zeros like ``params`` in wide precision, exponent 0."""
  nu = jax.tree.map(lambda w: jnp.zeros(w.shape, tm.wide_dtype(w.dtype)), params)
  return nu, jnp.zeros([], jnp.int32)


def _max_abs(tree: PyTree) -> jax.Array:
  """``max |x|`` over every leaf (0 for an empty tree), in the tree's scalar dtype."""
  dtype = tm.scalar_dtype(tree)
  leaves = [jnp.max(jnp.abs(x.astype(dtype)), initial=0.0) for x in jax.tree.leaves(tree)]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([], dtype)


def _exponent_range(tree: PyTree) -> int:
  """The largest ``E`` with ``2^E`` and ``2^-E`` normal numbers in every leaf's wide dtype (126 for float32)."""
  dtypes = [tm.wide_dtype(x.dtype) for x in jax.tree.leaves(tree)] or [jnp.dtype(jnp.float32)]
  return min(-int(jnp.finfo(d).minexp) for d in dtypes)


def _pow2(exponent: jax.Array, dtype: Any) -> jax.Array:
  """``2^exponent`` in ``dtype`` (exact; ``exponent`` within the dtype's normal range)."""
  return jnp.ldexp(jnp.ones([], dtype), exponent)


def second_moment(
  nu: PyTree, nu_exp: jax.Array, g0: PyTree, b2: Scalar, axis_name: AxisName | None = None
) -> tuple[PyTree, jax.Array, PyTree]:
  """One step of the running mean of squares, ``v <- b2 v + (1 - b2) g0^2``, on ``v = nu * 4^nu_exp``.

  The new exponent ``e`` is that of the largest of ``max |g0|`` and ``sqrt(max v)`` (clipped so that ``2^e``
  and ``4^-e`` are normal numbers); with ``axis_name`` (m-sharpness, each replica's own ``g0``) it is the
  replicas' largest, so their mantissas share one exponent and can be averaged. Powers of two are exact:
  in float64 this is ``b2 v + (1 - b2) g0^2`` to rounding, at any scale.

  Returns:
    ``(nu, e, h)``: the new mantissas and exponent, and ``h = g0 * 2^-e`` (wide precision, ``|h| <= 1``
    unless clipped).
  """
  g = tm.tree_wide(g0)
  dtype = tm.scalar_dtype(nu)
  top = _exponent_range(nu)
  _, e_g = jnp.frexp(_max_abs(g).astype(dtype))  # max|g| < 2^e_g (0 for g = 0)
  m_nu = _max_abs(nu).astype(dtype)
  _, e_nu = jnp.frexp(jnp.sqrt(m_nu))  # sqrt(max nu) < 2^e_nu
  low = jnp.int32(-(top // 2))  # 2^-e and its square 4^-e stay finite (XLA may fold (h c)(h c) into h h c^2)
  e = jnp.maximum(
    jnp.where(jnp.any(_max_abs(g) > 0), e_g.astype(jnp.int32), low),
    jnp.where(m_nu > 0, e_nu.astype(jnp.int32) + nu_exp, low),
  )
  e = jnp.clip(e, -(top // 2), top)
  if axis_name is not None:
    e = jax.lax.pmax(e, axis_name)
  shift = 2 * (nu_exp - e)  # old mantissas in units of 4^e: a factor 4^(nu_exp - e) <= 1, 0 below the range
  decay = jnp.where(shift < -top, 0.0, _pow2(jnp.clip(shift, -top, top), dtype))
  down = _pow2(-e, dtype)
  # Behind a barrier: on constant-folded inputs XLA may otherwise reorder h * h = (g 2^-e)^2 into g^2 4^-e.
  h = jax.lax.optimization_barrier(jax.tree.map(lambda x: x * down.astype(x.dtype), g))
  new = jax.tree.map(
    lambda v, x: (
      jnp.asarray(b2).astype(v.dtype) * (v * decay.astype(v.dtype)) + (1 - jnp.asarray(b2).astype(v.dtype)) * x * x
    ),
    nu,
    h,
  )
  return new, e, h


def preconditioned_direction(nu: PyTree, e: jax.Array, h: PyTree, b2: Scalar, eps: Scalar, t: jax.Array) -> PyTree:
  """``u = g0 / (sqrt(v / (1 - b2^t)) + eps)`` from :func:`second_moment`'s ``(nu, e, h)``, in wide precision.

  Formed as ``h / (sqrt(nu / (1 - b2^t)) + eps 2^-e)`` (the same number: numerator and denominator are both
  divided by ``2^e``). A coordinate whose gradient and moment are both 0 gets ``u = 0``. ``t`` is the
  number of moment updates so far, this one included (>= 1).
  """
  dtype = tm.scalar_dtype(nu)
  correction = 1 - jnp.asarray(b2).astype(dtype) ** t.astype(dtype)
  eps_scaled = jnp.asarray(eps).astype(dtype) * _pow2(-e, dtype)

  def one(v: jax.Array, x: jax.Array) -> jax.Array:
    den = jnp.sqrt(v / correction.astype(v.dtype)) + eps_scaled.astype(v.dtype)
    return x / jnp.where(den == 0, jnp.ones_like(den), den)

  return jax.tree.map(one, nu, h)


def preconditioned_sam(
  rho: optax.ScalarOrSchedule,
  *,
  b2: Scalar = 0.999,
  eps: Scalar = 1e-8,
  axis_name: AxisName | None = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int = 1,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditioned SAM: the gradient at an ascent point scaled by Adam's inverse preconditioner.

  With ``g_0`` the incoming gradient at ``w_t`` and ``t`` the number of
  steps that perturbed so far, this one included,

  .. math::

    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_0^2, \quad
    u = \frac{g_0}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}, \qquad
    \text{output} = \nabla L\Big(w_t + \rho \frac{u}{\|u\|}\Big),

  element-wise, ``v_0 = 0``: Adam's bias-corrected second moment as a
  diagonal preconditioner ``P``, and the ascent along ``P^{-1} g_0`` with
  SAM's Euclidean radius ``rho``. A constant ``P`` gives SAM; on the first
  step ``u`` is ``g_0 / (|g_0| + eps)``, about ``sign(g_0)``. The output is a
  plain gradient, for the base optimizer (AdamW in the paper) later in the
  ``optax.chain``. A ``rho`` schedule at 0 outputs ``g_0`` itself.

  Cost: one extra forward+backward pass per call (as SAM), one
  parameter-sized second moment in the state, and a few element-wise
  passes over the parameters.

  Departures from the paper (:ref:`paper-differences`):

  * The preconditioner is this transformation's own second moment of the
    incoming gradients, updated before the ascent (Adam's order: ``v_t``
    includes ``g_0``); the paper reuses the base optimizer's (AdamW's)
    second moment, which costs no memory but is not visible to a
    transformation placed before it in a chain. With the same ``b2`` and
    ``eps`` the two differ by one step (AdamW's holds the previous
    gradients, not the current one) and by AdamW seeing the
    sharpness-aware gradients rather than ``g_0``.
  * The normalization is Euclidean, ``|e| = rho`` (SAM's radius, so
    ``rho`` is comparable with SAM's), as we read the paper's
    ``rho P^{-1} g / |P^{-1} g|``; the ``P``-norm form would be
    ``rho P^{-1} g / sqrt(g^T P^{-1} g)``.
  * ``v`` is updated only on the steps that perturb (with
    ``perturb_every``), and held as mantissas times a shared power of two
    (:class:`PreconditionedSAMState`), so no square overflows.
  * No ASAM (``adaptive``): the preconditioner already rescales the ascent
    per coordinate.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-preconditioned-sam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    b2: decay of the second moment, a real number in ``[0, 1)`` (Adam's
      ``b2``; 0.999 by default, 0.95 or 0.98 for the paper's language models).
    eps: Adam's ``eps``, a finite real number >= 0, added to the square
      root of the bias-corrected moment (below it the preconditioner is the
      identity times ``eps``: gradients much smaller than ``eps`` are
      ascended along as by SAM). ``eps=0`` makes the direction invariant to
      the scale of the loss.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): the
      gradients are averaged over the axis before they enter ``v`` or the
      ascent; with ``m_sharpness`` each replica preconditions its own
      ``g_0`` and the moment kept is the replicas' mean
      (:ref:`m-sharpness-states`).
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); ``v`` covers the
      perturbed leaves and is updated only on the steps that perturb.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`PreconditionedSAMState`; call its ``update`` as ``update(grads,
    state, params, loss_fn=loss_fn)`` (:ref:`calling-update`).

  Raises:
    ValueError: ``b2`` outside ``[0, 1)``, ``eps`` negative or not finite,
      or a shared option out of its range.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0, 0.01])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = optax.chain(xsam_jax.preconditioned_sam(0.1), optax.adamw(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> u = jax.grad(loss_fn)(params)["w"] / jnp.abs(jax.grad(loss_fn)(params)["w"])  # step 1: about sign(g_0)
    >>> point = params["w"] + 0.1 * u / jnp.linalg.norm(u)
    >>> bool(jnp.allclose(state[0].grad_norm, jnp.linalg.norm(jax.grad(loss_fn)({"w": point})["w"]), rtol=1e-5))
    True
    >>> params = optax.apply_updates(params, updates)

  References:
    Singh, Mobahi, Agarwala & Dauphin, Avoiding spurious sharpness
    minimization broadens applicability of SAM, ICML 2025,
    https://arxiv.org/abs/2502.02407.
  """
  # One ascent step, no ASAM: the fixed values are those of a plain one-step ascent.
  options = base.Options.from_arguments(
    "preconditioned_sam", locals(), num_steps=1, adaptive=False, eta=0.01, adaptive_mask=None
  )
  check_moment_hyperparameters(b2, eps)
  moment_axis = axis_name if m_sharpness else None

  def init_fn(params: optax.Params) -> PreconditionedSAMState:
    nu, nu_exp = init_second_moment(params)
    zero = jnp.zeros([], jnp.float32)
    return PreconditionedSAMState(
      count=base.zero_count(), grad_norm=zero, nu=nu, nu_exp=nu_exp, perturbed_loss=jnp.zeros([], jnp.float32)
    )

  def first_direction(g0: PyTree, state: PreconditionedSAMState) -> PyTree:
    nu, e, h = second_moment(state.nu, state.nu_exp, g0, b2, moment_axis)
    return preconditioned_direction(nu, e, h, b2, eps, state.count + 1)

  def rule(
    trace: AscentTrace, state: PreconditionedSAMState, params: PyTree, loss_fn: LossFn
  ) -> tuple[PyTree, PreconditionedSAMState]:
    del params, loss_fn
    g_0, g_1 = trace.grads[0], trace.grads[-1]
    nu, e, _ = second_moment(state.nu, state.nu_exp, g_0, b2, moment_axis)
    output = at_zero_radius(base.at_step(options.rho, trace), g_0, g_1)
    grad_norm, nu = options.replica_mean((tm.tree_norm(output).astype(jnp.float32), nu))
    return output, state._replace(grad_norm=grad_norm, nu=tm.tree_cast_like(nu, state.nu), nu_exp=e)

  return base.transform(options, init_fn=init_fn, rule=rule, first_direction=first_direction, carried=("nu", "nu_exp"))


def at_zero_radius(rho: Any, g_0: PyTree, output: PyTree) -> PyTree:
  """``output``, or ``g_0`` itself (bitwise, in ``output``'s dtypes) where ``rho``, this step's radius, is 0.

  ``rho`` is the radius's value at this step: a Python number (a constant, or a schedule's Python value)
  is decided statically, with no select; a traced one (a schedule's or an injected value) by a select.
  """
  if isinstance(rho, (int, float)):
    return jax.tree.map(lambda a, b: a.astype(b.dtype), g_0, output) if rho == 0 else output
  zero = jnp.asarray(rho) == 0
  return jax.tree.map(lambda a, b: jnp.where(zero, a.astype(b.dtype), b), g_0, output)
