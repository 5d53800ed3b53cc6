"""One factory for every sharpness-aware transformation.

Every method is "ascent, then a rule that turns the ascent trace into the
output gradient". A method supplies its state's ``init`` and its ``rule``;
this module does the calling-convention checks, the ascent, the counter and
the dtype bookkeeping once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import collectives, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar

Rule = Callable[[ascent_lib.AscentTrace, Any, PyTree, LossFn], tuple[PyTree, Any]]
"""``rule(trace, state, params, loss_fn) -> (output_tree, new_state)``."""


def sharpness_aware_transform(
  method: str,
  *,
  rho: Scalar,
  num_steps: int,
  init_fn: optax.TransformInitFn,
  rule: Rule,
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  first_direction: Callable[[PyTree, Any], PyTree] | None = None,
  m_sharpness: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a ``GradientTransformationExtraArgs`` from a direction rule.

  Args:
    method: the public name, used in error messages.
    rho: ascent radius (validated by the caller).
    num_steps: number of ascent steps K (validated by the caller).
    init_fn: ``params -> state``; the state is a NamedTuple with a ``count``.
    rule: ``(trace, state, params, loss_fn) -> (output, new_state)``; the
      output is any pytree matching params (any float dtype); this factory
      casts it to the params' dtypes and advances ``count``.
    axis_name: collective axis for data parallelism (see :func:`ascent`).
    adaptive, eta, adaptive_mask: ASAM options (see :func:`ascent`).
    first_direction: optional ``(g0, state) -> tree``: the direction of the
      first ascent step, from the (axis-averaged) incoming gradient and the
      state before the update; default ``g0``. The rule finds the tree it
      returned in ``trace.first_direction`` (to store it, say).
    m_sharpness: per-replica perturbation (needs ``axis_name``): the ascent
      is not averaged (see :func:`ascent`), the rule sees its replica's own
      trace, and its output is averaged over ``axis_name`` here. A rule that
      reduces anything else (probe losses, diagnostics kept in the state)
      must average it itself so that the state stays the same on every
      replica.

  Returns:
    The transformation. Its ``update(updates, state, params, *, loss_fn,
    **extra_args)`` ignores unknown extra args.

  Raises:
    ValueError: ``m_sharpness=True`` without ``axis_name``.
  """
  if m_sharpness and axis_name is None:
    raise ValueError(
      f"{method}: `m_sharpness=True` needs `axis_name` (the data-parallel axis "
      "whose replicas each perturb on their own shard)."
    )

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    *,
    loss_fn: LossFn | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    del extra_args
    validation.check_call(method, params, loss_fn)
    assert loss_fn is not None  # for the type checker: check_call raised otherwise
    trace = ascent_lib.ascent(
      loss_fn,
      params,
      updates,
      rho=rho,
      num_steps=num_steps,
      axis_name=axis_name,
      adaptive=adaptive,
      eta=eta,
      adaptive_mask=adaptive_mask,
      first_direction=None if first_direction is None else (lambda g0: first_direction(g0, state)),
      m_sharpness=m_sharpness,
    )
    output, new_state = rule(trace, state, params, loss_fn)
    if m_sharpness:
      output = collectives.replica_mean(output, axis_name)
    new_state = new_state._replace(count=optax.safe_increment(state.count))
    return tm.tree_cast_like(output, params), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def zero_count() -> jax.Array:
  """The int32 step counter every state starts with."""
  return jax.numpy.zeros([], jax.numpy.int32)
