"""One factory for every sharpness-aware transformation.

Every method is "ascent, then a rule that turns the ascent trace into the
output gradient". A method supplies its state's ``init`` and its ``rule``;
this module does the hyperparameter and calling-convention checks, the
ascent, the counter and the dtype bookkeeping once for all of them.

Un-jitted (eager) calls of ``update`` run the whole update as one
``jax.jit``-compiled function, kept per transformation and ``loss_fn`` (see
:class:`_EagerCache`): op by op, the ``jax.lax.cond`` branches, which close
over the call's arrays, would be traced and compiled anew on every call.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
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
  check_state: Callable[[Any], None] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a ``GradientTransformationExtraArgs`` from a direction rule.

  Args:
    method: the public name, used in error messages.
    rho: ascent radius, a finite real scalar > 0 (Python number or 0-d
      array; may be traced).
    num_steps: number of ascent steps K, a Python int >= 1.
    init_fn: ``params -> state``; the state is a NamedTuple with a ``count``.
    rule: ``(trace, state, params, loss_fn) -> (output, new_state)``, where
      ``loss_fn`` returns the scalar loss (a ``(loss, aux)`` pair's ``aux``
      already dropped); the output is any pytree matching params (any float
      dtype); this factory casts it to the params' dtypes and advances
      ``count``.
    axis_name: collective axis for data parallelism (see :func:`ascent`).
    adaptive, eta, adaptive_mask: ASAM options (see :func:`ascent`):
      ``adaptive`` a bool, ``eta`` a finite real scalar >= 0,
      ``adaptive_mask`` None, a pytree with params' structure holding one
      bool per leaf, or a callable ``params -> such pytree`` (checked
      against params at ``update``).
    first_direction: optional ``(g0, state) -> tree``: the direction of the
      first ascent step, from the (axis-averaged) incoming gradient and the
      state before the update; default ``g0``. The rule finds the tree it
      returned in ``trace.first_direction`` (to store it, say).
    m_sharpness: per-replica perturbation (needs ``axis_name``): the ascent
      is not averaged (see :func:`ascent`), the rule sees its replica's own
      trace, and its output is averaged over ``axis_name`` here. A rule that
      reduces anything else (probe losses, diagnostics kept in the state)
      must average it itself so that the state stays the same on every
      replica. A bool.
    check_state: optional ``state -> None`` run at ``update`` (trace time)
      before the generic check that the state has the structure and leaf
      shapes ``init_fn`` gives for these params; it may raise a
      ``ValueError`` that names the method's own cause of a mismatch.

  Returns:
    The transformation. Its ``update(updates, state, params, *, loss_fn,
    probe_loss_fn=None, **extra_args)`` ignores unknown extra args.
    ``probe_loss_fn``, if given, is what the rule receives as its
    ``loss_fn``: the loss for evaluations other than the ascent gradients
    (XSAM's probe losses, EigenSAM's Hessian-vector products), e.g. the same
    loss computed in float32 for a bfloat16 model; the ascent always uses
    ``loss_fn``. ``loss_fn(params)`` returns
    the scalar loss or a ``(loss, aux)`` pair, whose ``aux`` is ignored
    (anything else is a ``ValueError`` when the update is traced; the
    ascent, the probes and the rule all see the scalar loss). ``params`` and ``updates``
    must be trees of one structure whose leaves are real floating-point
    arrays (Python and NumPy scalars are taken as 0-d arrays); integer,
    bool, complex or otherwise non-float leaves, a state made for other
    settings or params, and a malformed ``adaptive_mask`` raise a
    ``ValueError`` at ``update`` naming the leaf. Called outside any JAX
    transformation (no tracer among its inputs), ``update`` runs as one
    ``jax.jit``-compiled function, compiled once per ``loss_fn`` and input
    shapes: pass the same ``loss_fn`` object on every call, or a
    ``jax.tree_util.Partial`` whose array arguments (the batch) change. As
    under ``jax.jit``, ``loss_fn`` must be pure: what it reads from globals
    or attributes is frozen when it is traced (``jax.disable_jit()`` runs
    the update op by op instead).

  Raises:
    ValueError: a hyperparameter out of its range or of the wrong form, or
      ``m_sharpness=True`` without ``axis_name``.
  """
  validation.check_positive("rho", rho)
  num_steps = validation.check_static_int("num_steps", num_steps)
  validation.check_nonnegative("eta", eta)
  adaptive = validation.check_bool("adaptive", adaptive)
  m_sharpness = validation.check_bool("m_sharpness", m_sharpness)
  if m_sharpness and axis_name is None:
    raise ValueError(
      f"{method}: `m_sharpness=True` needs `axis_name` (the data-parallel axis "
      "whose replicas each perturb on their own shard)."
    )

  def init(params: optax.Params) -> Any:
    params = validation.as_array_leaves(method, "params", params)
    validation.check_float_leaves(f"{method}.init", "params", params)
    return init_fn(params)

  def core(
    updates: optax.Updates, state: Any, params: optax.Params, loss_fn: LossFn, probe_loss_fn: LossFn | None
  ) -> tuple[optax.Updates, Any]:
    # Wrapped here, under the eager cache, whose key stays the caller's loss_fn.
    loss_fn = validation.scalar_loss(f"{method}.update", loss_fn)
    rule_loss_fn = loss_fn if probe_loss_fn is None else validation.scalar_loss(f"{method}.update", probe_loss_fn)
    validation.check_float_leaves(f"{method}.update", "params", params)
    validation.check_float_leaves(f"{method}.update", "updates", updates)
    validation.check_updates_match_params(method, updates, params)
    if check_state is not None:
      check_state(state)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    validation.check_state_matches(method, state, jax.eval_shape(init_fn, shapes))
    mask = validation.check_adaptive_mask(method, adaptive_mask, params) if adaptive else None
    trace = ascent_lib.ascent(
      loss_fn,
      params,
      updates,
      rho=rho,
      num_steps=num_steps,
      axis_name=axis_name,
      adaptive=adaptive,
      eta=eta,
      adaptive_mask=mask,
      first_direction=None if first_direction is None else (lambda g0: first_direction(g0, state)),
      m_sharpness=m_sharpness,
    )
    output, new_state = rule(trace, state, params, rule_loss_fn)
    if m_sharpness:
      output = collectives.replica_mean(output, axis_name)
    new_state = new_state._replace(count=optax.safe_increment(state.count))
    return tm.tree_cast_like(output, params), new_state

  eager = _EagerCache(method, core)

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    *,
    loss_fn: LossFn | None = None,
    probe_loss_fn: LossFn | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    del extra_args
    validation.check_call(method, params, loss_fn, probe_loss_fn)
    assert loss_fn is not None  # for the type checker: check_call raised otherwise
    params = validation.as_array_leaves(method, "params", params)
    updates = validation.as_array_leaves(method, "updates", updates)
    if _is_traced((updates, state, params, loss_fn, probe_loss_fn)):
      return core(updates, state, params, loss_fn, probe_loss_fn)
    return eager(updates, state, params, loss_fn, probe_loss_fn)

  return optax.GradientTransformationExtraArgs(init, update_fn)


def zero_count() -> jax.Array:
  """The int32 step counter every state starts with."""
  return jax.numpy.zeros([], jax.numpy.int32)


def _is_traced(tree: Any) -> bool:
  """Whether any leaf of ``tree`` (a ``jax.tree_util.Partial``'s arrays included) is a tracer."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class _EagerCache:
  """``core`` compiled with ``jax.jit``, one compiled function per ``loss_fn`` (and ``probe_loss_fn``).

  ``loss_fn`` is a Python callable, so it cannot be a traced argument: each
  compiled function closes over one. It is looked up by ``hash``/``==``
  (identity for functions and lambdas; bound methods of one object compare
  equal). A :class:`jax.tree_util.Partial` whose arguments are all arrays is
  looked up by its function and the arrays are passed as traced arguments,
  so ``Partial(loss, batch)`` with a new ``batch`` each call reuses the
  compilation. As with ``jax.jit``, ``loss_fn`` is traced once per entry
  and input shapes, so it must be pure. The most recent :attr:`SIZE` entries
  are kept (a new closure per call would otherwise keep every closure, and
  its batch, alive); each entry recompiles only for new input shapes or
  dtypes, as ``jax.jit`` does.
  """

  SIZE = 4

  def __init__(self, method: str, core: Callable[..., tuple[optax.Updates, Any]]) -> None:
    self._method = method
    self._core = core
    # key -> (the (loss_fn, probe_loss_fn) an id-keyed entry was made for, or Nones; the jitted update)
    self._entries: collections.OrderedDict[tuple[Any, ...], tuple[Any, Callable[..., Any]]] = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _split(loss_fn: LossFn | None) -> tuple[tuple[str, Any], list[Any], Callable[[list[Any]], LossFn | None]]:
    """``(key, traced leaves, rebuild)`` with ``rebuild(leaves)`` the loss to call."""
    if isinstance(loss_fn, jax.tree_util.Partial):
      leaves, treedef = jax.tree.flatten(loss_fn)
      if all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
        try:
          hash(treedef)
        except TypeError:
          pass
        else:
          return ("partial", treedef), leaves, lambda xs: jax.tree.unflatten(treedef, xs)
    try:
      hash(loss_fn)
    except TypeError:  # unhashable: looked up by identity (the entry keeps it alive)
      return ("id", id(loss_fn)), [], lambda _: loss_fn
    return ("callable", loss_fn), [], lambda _: loss_fn

  def __call__(
    self, updates: optax.Updates, state: Any, params: optax.Params, loss_fn: LossFn, probe_loss_fn: LossFn | None
  ) -> Any:
    fns = (loss_fn, probe_loss_fn)
    parts = [self._split(f) for f in fns]  # None (no probe_loss_fn) is hashable: its own key
    key = tuple(k for k, _, _ in parts)
    leaves = [x for _, xs, _ in parts for x in xs]
    n0 = len(parts[0][1])
    rebuild0, rebuild1 = parts[0][2], parts[1][2]
    by_id = any(k[0] == "id" for k in key)
    with self._lock:
      entry = self._entries.get(key)
      if entry is None or (by_id and any(a is not b for a, b in zip(entry[0], fns, strict=True))):
        core = self._core

        def run(updates: optax.Updates, state: Any, params: optax.Params, loss_leaves: list[Any]) -> Any:
          return core(updates, state, params, rebuild0(loss_leaves[:n0]), rebuild1(loss_leaves[n0:]))

        run.__name__ = run.__qualname__ = f"{self._method}_update"  # names it in jax.log_compiles
        entry = (fns if by_id else (None, None), jax.jit(run))
        self._entries[key] = entry
        while len(self._entries) > self.SIZE:
          self._entries.popitem(last=False)
      self._entries.move_to_end(key)
    return entry[1](updates, state, params, leaves)
