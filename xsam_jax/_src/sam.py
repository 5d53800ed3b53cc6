"""SAM (Foret et al. 2021) and multi-step SAM on the shared ascent core."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class SAMState(NamedTuple):
  """State of :func:`sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_K|``, the norm of the output gradient (diagnostic;
      with ``m_sharpness``, the replicas' mean of their own ``|g_K|``).
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  perturbed_loss: jax.Array


def sam(
  rho: optax.ScalarOrSchedule,
  *,
  num_steps: int = 1,
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
  r"""Sharpness-Aware Minimization: the gradient at the (multi-step) ascent point.

  With ``g_0`` the incoming gradient at ``w`` and K ascent steps of length
  ``rho / K`` each,

  .. math::

    d_{k+1} = d_k + \frac{\rho}{K} \frac{g_k}{\|g_k\| + \epsilon}, \quad
    g_{k+1} = \nabla L(w + d_{k+1}), \qquad \text{output} = g_K .

  ``num_steps=1`` is standard SAM; ``num_steps > 1`` is multi-step SAM. Each
  call costs K extra forward+backward passes. The output is meant to be fed
  to a base optimizer later in an ``optax.chain``.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-sam>`.

  Args:
    rho: total ascent radius, > 0, or an optax schedule of the step count
      (values >= 0; see :func:`xsam_jax.rho_schedule_from_lr`).
    num_steps: number of ascent steps K (a Python int >= 1).
    axis_name, m_sharpness: data parallelism (:ref:`common-options`); with
      ``m_sharpness`` each replica takes its own ascent and the outputs
      ``g_K`` are averaged (``grad_norm``: the replicas' mean of their own).
    adaptive, eta, adaptive_mask: ASAM's neighbourhood (:ref:`asam-options`);
      the output is then ASAM's, the plain gradient at ASAM's ascent point.
    perturb_mask, perturb_every, perturb_start: which parameters and which
      steps perturb (:ref:`perturb-mask`, :ref:`perturb-every`).
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SAMState`;
    call its ``update`` as ``update(grads, state, params, loss_fn=loss_fn)``
    (:ref:`calling-update`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4)
    >>> tx = optax.chain(xsam_jax.sam(rho=0.1), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> [round(float(u), 4) for u in updates["w"]]  # -0.01 g_1, g_1 = grad at w + 0.1 g_0/|g_0|
    [-0.0415, 0.37]
    >>> round(float(state[0].grad_norm), 3)  # |g_1|
    37.235
    >>> params = optax.apply_updates(params, updates)

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, https://arxiv.org/abs/2010.01412, 2021.
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization,
    https://arxiv.org/abs/2102.11600, 2021.
  """
  options = base.Options.from_arguments("sam", locals())

  def init_fn(params: optax.Params) -> SAMState:
    del params
    return SAMState(
      count=base.zero_count(), grad_norm=jnp.zeros([], jnp.float32), perturbed_loss=jnp.zeros([], jnp.float32)
    )

  def rule(trace: AscentTrace, state: SAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, SAMState]:
    del params, loss_fn
    g_k = trace.grads[-1]
    return g_k, state._replace(grad_norm=options.replica_mean(tm.tree_norm(g_k).astype(jnp.float32)))

  return base.transform(options, init_fn=init_fn, rule=rule, carried=())  # diagnostics only
