"""Friendly SAM, F-SAM (Li et al. 2024): SAM perturbed along the batch's
stochastic gradient noise, the gradient minus a moving-average estimate of the
full gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar

FRIENDLY_SAM_INITS = ("zero", "first_gradient")
"""Allowed values of ``friendly_sam(..., init=)``."""


class FriendlySAMState(NamedTuple):
  """State of :func:`friendly_sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_1|``, the norm of the output (diagnostic).
    ema: the moving average ``m_t`` of the gradients after the last call, a
      pytree like params in wide precision (float32 or wider); zeros before
      the first call.
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  ema: PyTree
  perturbed_loss: jax.Array


def friendly_sam(
  rho: optax.ScalarOrSchedule,
  *,
  sigma: Scalar = 1.0,
  lmbda: Scalar = 0.6,
  init: str = "zero",
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int = 1,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly SAM (F-SAM): SAM perturbed along the gradient minus its moving average.

  With ``g_t`` the incoming gradient at ``w_t`` and ``m_0 = 0``,

  .. math::

    m_t = \lambda\, m_{t-1} + (1-\lambda)\, g_t, \qquad
    \text{output} = \nabla L\Big(w_t + \rho\, \frac{g_t - \sigma m_t}{\|g_t - \sigma m_t\| + \epsilon}\Big).

  ``m_t`` estimates the full-data gradient, so ``g_t - sigma m_t`` is the
  batch's stochastic gradient noise; perturbing along it (instead of SAM's
  ``g_t``) drops the full-gradient component, which the paper finds hurts
  generalization. Only the perturbation changes: the output is a plain
  gradient at the perturbed point, as SAM's. ``sigma=0`` is SAM. The average
  lives in the state; it is the shared ascent with one step whose direction
  is ``g_t - sigma m_t``.

  By default (``init="zero"``) the average includes ``g_t`` before it is
  subtracted, as the paper writes it, and starts at ``m_0 = 0``.
  ``init="first_gradient"`` is the authors' code instead: the first call
  sets ``m_1 = g_1`` and perturbs along ``g_1`` (a SAM step), and every
  later call perturbs along ``g_t - sigma m_{t-1}`` before ``g_t`` enters
  the average. The two give different directions for many steps (51
  degrees apart at step 2 with ``lmbda = 0.6``). If the direction is zero
  the perturbation is zero and the output is the plain gradient.

  .. seealso:: :ref:`paper-differences` (docs/methods.md): how far apart
     the two starts are, measured.

  Cost: one extra forward+backward pass per call (as SAM) and one
  parameter-sized average in the state.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-friendly-sam>`.

  Args:
    rho: perturbation radius, > 0, or an optax schedule of the step count (values >= 0).
    sigma: how much of the average to subtract, a finite real number >= 0
      (1 in the paper's experiments; 0: SAM).
    lmbda: decay of the moving average, a real number in ``[0, 1)``. The
      default 0.6 is the authors' example script (CIFAR, ResNet-18); their
      training script defaults to 0.95.
    init: ``"zero"`` (the paper: ``m_0 = 0``, the average updated before it
      is subtracted) or ``"first_gradient"`` (the authors' code: ``m_1 =
      g_1``, a SAM first step, the previous average subtracted).
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): with
      ``axis_name`` the gradients are averaged over the axis before they
      enter ``m_t`` or the output; with ``m_sharpness`` each replica
      perturbs along ``g_t - sigma m_t`` with its own ``g_t`` (in both
      terms), and the average kept is the replicas' mean (the average of
      their mean gradient, the same on every replica;
      :ref:`m-sharpness-states`).
    adaptive, eta, adaptive_mask: ASAM's neighbourhood for the ascent step
      (:ref:`asam-options`): ``rho T^2 u / |T u|`` with ``u = g_t - sigma
      m_t``.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); ``m_t`` is updated on the
      steps that perturb only.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state,
    :class:`FriendlySAMState`, holds the moving average ``m_t`` in ``ema``
    (:ref:`calling-update`).

  Example:
    >>> import jax, jax.numpy as jnp, xsam_jax
    >>> w = {"w": jnp.array([1.0, -2.0])}
    >>> f = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = xsam_jax.friendly_sam(0.05, sigma=1.0, lmbda=0.6)
    >>> out, state = tx.update(jax.grad(f)(w), tx.init(w), w, loss_fn=f)
    >>> bool(jnp.allclose(state.ema["w"], 0.4 * jax.grad(f)(w)["w"]))  # m_1 = (1 - lmbda) g_1
    True

  References:
    Li, Zhou, He, Cheng & Huang, Friendly Sharpness-Aware Minimization,
    CVPR 2024, https://arxiv.org/abs/2403.12350.
  """
  options = base.Options.from_arguments("friendly_sam", locals(), num_steps=1)
  validation.check_nonnegative("sigma", sigma)
  validation.check_real("lmbda", lmbda, "a real number in [0, 1)", lambda v: 0.0 <= v < 1.0)
  if init not in FRIENDLY_SAM_INITS:
    raise ValueError(f"`init` must be one of {FRIENDLY_SAM_INITS}, got {init!r}.")
  code_form = init == "first_gradient"

  def init_fn(params: optax.Params) -> FriendlySAMState:
    ema = jax.tree.map(lambda w: jnp.zeros(w.shape, tm.wide_dtype(w.dtype)), params)
    zero = jnp.zeros([], jnp.float32)
    return FriendlySAMState(count=base.zero_count(), grad_norm=zero, ema=ema, perturbed_loss=zero)

  def average(state: FriendlySAMState, g0: PyTree) -> PyTree:
    """``m_t = lmbda m_{t-1} + (1 - lmbda) g_t`` (wide precision); ``m_1 = g_1`` in the code form."""
    m_t = tm.tree_lincomb(lmbda, state.ema, 1.0 - lmbda, tm.tree_cast_like(g0, state.ema))
    if not code_form:
      return m_t
    first = state.count == 0  # the rule's count: perturbed steps so far
    return jax.tree.map(lambda g, m: jnp.where(first, g, m), tm.tree_cast_like(g0, state.ema), m_t)

  def first_direction(g0: PyTree, state: FriendlySAMState) -> PyTree:
    g_t = tm.tree_cast_like(g0, state.ema)
    if not code_form:
      return tm.tree_lincomb(1.0, g_t, -sigma, average(state, g0))
    # The authors' code: g_t - sigma m_{t-1}, and g_1 itself on the first call (m_0 is unset there).
    return tm.tree_lincomb(1.0, g_t, jnp.where(state.count == 0, 0.0, -sigma), state.ema)

  def rule(
    trace: AscentTrace, state: FriendlySAMState, params: PyTree, loss_fn: LossFn
  ) -> tuple[PyTree, FriendlySAMState]:
    del params, loss_fn
    g_1 = trace.grads[-1]
    grad_norm, ema = options.replica_mean((tm.tree_norm(g_1).astype(jnp.float32), average(state, trace.grads[0])))
    return g_1, state._replace(grad_norm=grad_norm, ema=ema)

  return base.transform(options, init_fn=init_fn, rule=rule, first_direction=first_direction, carried=("ema",))
