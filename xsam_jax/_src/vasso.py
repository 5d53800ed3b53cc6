"""VaSSO (Li & Giannakis 2023): SAM whose ascent follows an exponential
moving average of the gradients, to suppress the variance of the
stochastic perturbation."""

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


class VaSSOState(NamedTuple):
  """State of :func:`vasso`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_1|``, the norm of the output (diagnostic).
    ema: the gradient average ``d_t`` of the last call, a pytree like params
      in wide precision (float32 or wider); zeros before the first call.
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  ema: PyTree
  perturbed_loss: jax.Array


def vasso(
  rho: optax.ScalarOrSchedule,
  *,
  theta: Scalar = 0.9,
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
  r"""VaSSO: SAM perturbed along an average of gradients (variance suppression).

  With ``g_t`` the incoming gradient at ``w_t``,

  .. math::

    d_t = (1-\theta)\, d_{t-1} + \theta\, g_t \quad (d_0 = g_0), \qquad
    \text{output} = \nabla L\Big(w_t + \rho \frac{d_t}{\|d_t\| + \epsilon}\Big).

  The average ``d_t`` lives in the state; only the perturbation changes, so
  the output is a plain gradient at the perturbed point, as SAM's. The first
  call starts the average at ``g_0`` (a plain SAM step); ``theta=1`` is SAM
  on every call. If ``d_t = 0`` the perturbation is zero (eps-guarded) and
  the output is the plain gradient. It is the shared ascent with one step
  whose direction is ``d_t`` instead of ``g_t``.

  Cost: one extra forward+backward pass per call (as SAM) and one
  parameter-sized average in the state.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-vasso>`.

  Args:
    rho: perturbation radius, > 0, or an optax schedule of the step count (values >= 0).
    theta: weight of the new gradient in the average, in ``(0, 1]``
      (``1``: SAM). VaSSO's runs use values such as 0.4 and 0.9.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): with
      ``axis_name`` the gradients are averaged over the axis before they
      enter ``d_t`` or the output; with ``m_sharpness`` each replica
      perturbs along ``(1 - theta) d_{t-1} + theta g_t`` with its own
      ``g_t``, and the average kept is the replicas' mean (the average of
      their mean gradient, the same on every replica;
      :ref:`m-sharpness-states`).
    adaptive, eta, adaptive_mask: ASAM's neighbourhood (:ref:`asam-options`):
      the perturbation is ``rho T^2 d_t / |T d_t|``, ``T = |w| + eta``.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); only a step that
      perturbs updates ``d_t``.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; :class:`VaSSOState` keeps
    ``d_t`` (:ref:`calling-update`).

  Example:
    >>> import jax, jax.numpy as jnp, xsam_jax
    >>> w = {"w": jnp.array([1.0, -2.0])}
    >>> f = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> vasso_tx, sam_tx = xsam_jax.vasso(0.05, theta=0.4), xsam_jax.sam(0.05)
    >>> out, s = vasso_tx.update(jax.grad(f)(w), vasso_tx.init(w), w, loss_fn=f)
    >>> sam_out, _ = sam_tx.update(jax.grad(f)(w), sam_tx.init(w), w, loss_fn=f)
    >>> bool(jnp.allclose(out["w"], sam_out["w"]))  # the first call is a SAM step
    True

  References:
    Li & Giannakis, Enhancing Sharpness-Aware Optimization Through Variance
    Suppression, NeurIPS 2023, https://arxiv.org/abs/2309.15639.
  """
  options = base.Options.from_arguments("vasso", locals(), num_steps=1)
  t = validation.check_positive("theta", theta)
  if t is not None and t > 1.0:
    raise ValueError(f"`theta` must be a finite real number in (0, 1], got {t!r}.")

  def init_fn(params: optax.Params) -> VaSSOState:
    ema = jax.tree.map(lambda w: jnp.zeros(w.shape, tm.wide_dtype(w.dtype)), params)
    return VaSSOState(
      count=base.zero_count(), grad_norm=jnp.zeros([], jnp.float32), ema=ema, perturbed_loss=jnp.zeros([], jnp.float32)
    )

  def first_direction(g0: PyTree, state: VaSSOState) -> PyTree:
    def average(d: jax.Array, g: jax.Array) -> jax.Array:
      g = g.astype(d.dtype)
      new = jnp.asarray(1.0 - theta, d.dtype) * d + jnp.asarray(theta, d.dtype) * g
      return jnp.where(state.count == 0, g, new)

    return jax.tree.map(average, state.ema, g0)

  def rule(trace: AscentTrace, state: VaSSOState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, VaSSOState]:
    del params, loss_fn
    g_1 = trace.grads[-1]
    grad_norm, ema = options.replica_mean((tm.tree_norm(g_1).astype(jnp.float32), trace.first_direction))
    return g_1, state._replace(grad_norm=grad_norm, ema=tm.tree_cast_like(ema, state.ema))

  return base.transform(options, init_fn=init_fn, rule=rule, first_direction=first_direction, carried=("ema",))
