"""SAM (Foret et al. 2021) and multi-step SAM on the shared ascent core."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, collectives
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class SAMState(NamedTuple):
  """State of :func:`sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_K|``, the norm of the output gradient (diagnostic;
      with ``m_sharpness``, the replicas' mean of their own ``|g_K|``).
    perturbed_loss: float32 ``L(w + d_K)``, the loss at the ascent point of
      the last step that perturbed (0 before the first; the replicas' mean
      with ``axis_name``). Minus the clean loss, it is the sharpness the
      method minimizes; it comes with the ascent's gradient, at no extra
      cost. Find it anywhere in a chain with ``optax.tree.get(state,
      "perturbed_loss")``.
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

  Args:
    rho: total ascent radius, > 0, or an optax schedule of the step count
      (values >= 0; see :func:`xsam_jax.rho_schedule_from_lr`).
    num_steps: number of ascent steps K (a Python int >= 1).
    axis_name: for data parallelism inside ``jax.shard_map``, ``jax.pmap``
      or ``jax.vmap``: the name of the batch axis; ``loss_fn`` is then the
      replica's loss on its shard. The incoming and ascent gradients are
      turned into gradients of the replicas' mean loss, so every replica
      takes the same ascent and returns the same output, equal to the
      single-device result on the global batch. Pass ``updates =
      jax.grad(loss_fn)(params)`` as JAX returns it: the replica's own
      gradient, or, under ``shard_map`` with replicated params and
      ``check_vma=True``, the sum JAX makes of them (read from the types).
      Not needed under ``jax.jit`` over sharded arrays (already global).
    m_sharpness: with ``axis_name``: per-replica perturbation, as in the
      original SAM code ("m-sharpness", m = the per-replica batch): each
      replica ascends on its own shard from its own gradient (no averaging
      of ``g_0`` or the ascent gradients) and the outputs ``g_K`` are
      averaged over the axis. Results then depend on the number of
      replicas. Under ``shard_map`` with replicated params, pass the
      replica's own gradient, ``jax.grad(loss_fn)(jax.lax.pcast(params,
      axis_name, to='varying'))``; a summed one is a ``ValueError``.
    adaptive: use ASAM's adaptive neighbourhood (Kwon et al. 2021): each
      ascent step is ``rho/K * T^2 g / |T g|`` with ``T = |w| + eta``.
    eta: ASAM's offset, >= 0.
    adaptive_mask: which leaves get ``T`` (pytree of bools or callable on
      params); default all. The official ASAM adapts weights only.
    perturb_mask, perturb_every, perturb_start: training controls, as for
      every method (docs/controls.md): perturb only the leaves the mask
      marks (a pytree of bools or a callable on params, as in
      ``optax.masked``; the others get their gradient at the perturbed
      point), and only on the steps ``count >= perturb_start`` with
      ``(count - perturb_start) % perturb_every == 0`` (the others output
      ``g_0`` with no extra pass).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call its ``update`` as
    ``update(grads, state, params, loss_fn=loss_fn)``.
    ``params`` and ``grads`` need real floating-point leaves (a Python
    float is taken as a 0-d array); integer, bool or complex leaves raise a
    ``ValueError`` naming the leaf.

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

  def init_fn(params: optax.Params) -> SAMState:
    del params
    return SAMState(
      count=base.zero_count(), grad_norm=jnp.zeros([], jnp.float32), perturbed_loss=jnp.zeros([], jnp.float32)
    )

  def rule(trace: AscentTrace, state: SAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, SAMState]:
    del params, loss_fn
    g_k = trace.grads[-1]
    grad_norm = tm.tree_norm(g_k).astype(jnp.float32)
    if m_sharpness:
      grad_norm = collectives.replica_mean(grad_norm, axis_name)
    return g_k, state._replace(grad_norm=grad_norm)

  return base.sharpness_aware_transform(
    "sam",
    rho=rho,
    num_steps=num_steps,
    init_fn=init_fn,
    rule=rule,
    axis_name=axis_name,
    adaptive=adaptive,
    eta=eta,
    adaptive_mask=adaptive_mask,
    m_sharpness=m_sharpness,
    perturb_mask=perturb_mask,
    perturb_every=perturb_every,
    perturb_start=perturb_start,
  )
