"""The normalized multi-step ascent shared by every sharpness-aware method.

docs/algorithm.md, "The ascent": with ``d_0 = 0`` and ``g_0`` the incoming gradient,

    d_{k+1} = d_k + (rho / K) * g_k / |g_k|      (0 for g_k = 0)
    g_{k+1} = grad L(w + d_{k+1}),          k = 0 .. K-1.

With ``adaptive=True`` (ASAM, Kwon et al. 2021) each step is taken in the
space rescaled by ``T = |w| + eta`` (element-wise, at the current ``w``):

    d_{k+1} = d_k + (rho / K) * T^2 g_k / |T g_k|.

A method may replace the direction of the first step: ``g_0`` above becomes
any tree ``f(g_0)`` (VaSSO steps along an average of past gradients); the
later steps always follow the gradients ``g_k``.

With a ``perturb_mask`` only the leaves it marks move: every norm above is
taken over those leaves, and ``d_k`` is zero elsewhere (docs/algorithm.md,
"Training controls").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xsam_jax._src import collectives
from xsam_jax._src import tree_math as tm
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class AscentTrace(NamedTuple):
  """What the ascent leaves behind for a direction rule.

  Attributes:
    grads: ``(g_0, g_1, ..., g_K)``; ``g_0`` is the incoming gradient and
      ``g_k`` the gradient at ``w + d_k`` (in the params' dtypes).
    displacement: ``d_K``, the final ascent displacement (float32 or wider).
    first_direction: the tree the first step was taken along: ``g_0``
      unless the method supplied its own (see :func:`ascent`).
    scale: ASAM's ``T = |w| + eta`` (1 on masked-out leaves; wide
      precision), or None when the ascent is not adaptive.
    gradient_displacement: ``c_K`` with ``d_K = T^2 c_K``: the sum of the
      steps ``(rho/K) g_k / (|T g_k| + eps)`` before ASAM's ``T^2`` factor,
      a combination of gradients (``d_K`` itself when not adaptive). It lets
      a rule work in ASAM's rescaled coordinates without dividing by ``T``:
      there the displacement is ``T c_K``.
    displacement_scale: for a one-step, non-adaptive ascent, the scalar
      ``c = rho / (|u| + eps)`` with ``d_1 = c u`` for ``u =
      first_direction``, held as ``c = displacement_scale / S`` with ``S =
      first_norm.scale`` (1 unless ``|u|`` is beyond float32's range, where
      ``c`` alone would flush to zero); None otherwise. With
      ``displacement_norm`` (``c |u|``, i.e. ``|d_1|``) it lets a rule use
      ``d_1`` through ``u`` without materializing ``d_1`` or re-reading it
      for its norm.
    displacement_norm: ``|d_1|`` when ``displacement_scale`` is set, else None.
    first_norm: ``|u|`` as a :class:`~xsam_jax._src.tree_math.Norm` when
      ``displacement_scale`` is set, else None.
    losses: ``(L(w + d_1), ..., L(w + d_K))``, the losses at the ascent
      points (taken with the gradients, at no extra cost; the replica's own
      loss under ``axis_name``).
    step: set by :func:`~xsam_jax._src.base.sharpness_aware_transform`:
      the transformation's own step count (its ``update`` calls before this
      one), the argument of its schedules. None from :func:`ascent` alone.

  With a ``perturb_mask``, ``grads`` are whole trees (the gradient of every
  leaf at the ascent points) and every other tree holds the perturbed
  leaves only (None elsewhere).
  """

  grads: tuple[PyTree, ...]
  displacement: PyTree
  first_direction: PyTree = None
  scale: PyTree | None = None
  gradient_displacement: PyTree = None
  displacement_scale: jax.Array | None = None
  displacement_norm: jax.Array | None = None
  first_norm: tm.Norm | None = None
  losses: tuple[jax.Array, ...] | None = None
  step: jax.Array | None = None


def restrict(tree: PyTree, mask: PyTree | None) -> PyTree:
  """``tree`` with the leaves where ``mask`` (static bools, params' structure) is False replaced by None."""
  if mask is None:
    return tree
  return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def merge(mask: PyTree | None, inside: PyTree, outside: PyTree) -> PyTree:
  """The leaves of ``inside`` where ``mask`` is True (``inside`` as :func:`restrict` makes it), else ``outside``'s."""
  if mask is None:
    return inside
  return jax.tree.map(lambda m, a, b: a if m else b, mask, inside, outside)


def ascent(
  loss_fn: LossFn,
  params: PyTree,
  g0: PyTree,
  *,
  rho: Scalar,
  num_steps: int,
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  first_direction: Callable[[PyTree], PyTree] | None = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree = None,
) -> AscentTrace:
  """Runs the K-step normalized ascent from ``params``.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-ascent>`.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` on the current batch.
    params: the parameters ``w``.
    g0: the gradient of ``loss_fn`` at ``params`` (reused, not recomputed).
    rho: total ascent radius; each of the K steps has length ``rho / K``.
    num_steps: K >= 1, a static Python int.
    axis_name: if set, ``g_0`` and every ascent gradient are averaged over
      this axis (a name or a tuple of names), so all replicas take the same
      ascent: each becomes the gradient of the replicas' mean loss, whatever
      form ``jax.grad`` gave it in (``pmap``/``vmap``: local; ``shard_map``
      with ``check_vma``: see :mod:`xsam_jax._src.collectives`).
    adaptive: ASAM's element-wise rescaling ``T = |w| + eta``.
    eta: ASAM's offset.
    adaptive_mask: optional pytree of Python bools with the structure of
      ``params``, or a callable ``params -> such pytree`` (as in
      ``optax.masked``): leaves marked False are not rescaled (``T = 1``).
      Default: every leaf is rescaled.
    first_direction: optional ``g_0 -> tree`` (``g_0`` already averaged over
      ``axis_name``): the first step goes along this tree instead of ``g_0``.
      Default: ``g_0``.
    m_sharpness: with ``axis_name``: no averaging; every replica ascends on
      its own shard from its own ``g_0`` (which must be the replica's own
      gradient), so the trace differs between replicas.
    perturb_mask: optional pytree of Python bools with the structure of
      ``params``: only the leaves marked True are perturbed, and norms are
      taken over them only; ``first_direction`` then receives and returns
      trees of those leaves (see :func:`restrict`). Default: every leaf.

  Returns:
    An :class:`AscentTrace` with ``(g_0, ..., g_K)`` and ``d_K``.
  """
  sync = collectives.gradient_sync(axis_name, loss_fn, params, per_replica=m_sharpness)
  g0 = sync(g0)
  value_and_grad = jax.value_and_grad(loss_fn)
  full_params = params
  params = restrict(params, perturb_mask)
  if adaptive:
    mask = adaptive_mask(full_params) if callable(adaptive_mask) else adaptive_mask
    if mask is None:
      mask = jax.tree.map(lambda _: True, full_params)
    mask = restrict(mask, perturb_mask)
    scale_t = jax.tree.map(
      lambda w, m: jnp.abs(w.astype(tm.wide_dtype(w.dtype))) + eta if m else jnp.ones(w.shape, tm.wide_dtype(w.dtype)),
      params,
      mask,
    )
  # A Python radius is divided in float64 and rounded once where it is used; an array radius (a
  # schedule's value, often float32) is widened to the params' precision first.
  step = (
    rho / num_steps if isinstance(rho, (int, float)) else jnp.asarray(rho).astype(tm.scalar_dtype(params)) / num_steps
  )
  g0_moved = restrict(g0, perturb_mask)
  first = g0_moved if first_direction is None else first_direction(g0_moved)
  zeros = lambda: jax.tree.map(lambda w: jnp.zeros(w.shape, tm.wide_dtype(w.dtype)), params)
  add_step = lambda a, u: jax.tree.map(lambda x, y: x + jnp.asarray(step).astype(x.dtype) * y, a, u)
  d = zeros()
  c = zeros() if adaptive else None
  grads = [g0]
  losses = []
  g = first
  d_scale: jax.Array | None = None
  d_norm: jax.Array | None = None
  first_norm: tm.Norm | None = None
  for _ in range(num_steps):
    if adaptive:
      tg = jax.tree.map(lambda t, x: t * x.astype(t.dtype), scale_t, g)
      unit_tg, tg_norm = tm.tree_normalize_parts(tg)
      direction = jax.tree.map(jnp.multiply, scale_t, unit_tg)
      c = add_step(c, tg_norm.inverse().apply_tree(tm.tree_wide(g)))
    else:
      direction, g_norm = tm.tree_normalize_parts(g)
      if num_steps == 1:
        # S rho / |g| (see AscentTrace) and rho |g| / |g|: finite however large or small |g| is.
        d_scale = jnp.divide(step, g_norm.guarded_r())
        d_norm = step * g_norm.guarded_ratio()
        first_norm = g_norm
    d = add_step(d, direction)
    loss, g_full = value_and_grad(merge(perturb_mask, tm.tree_add_to_params(params, d), full_params))
    g_full = sync(g_full)
    grads.append(g_full)
    losses.append(loss)
    g = restrict(g_full, perturb_mask)
  return AscentTrace(
    grads=tuple(grads),
    displacement=d,
    first_direction=first,
    scale=scale_t if adaptive else None,
    gradient_displacement=c if adaptive else d,
    displacement_scale=d_scale,
    displacement_norm=d_norm,
    first_norm=first_norm,
    losses=tuple(losses),
  )
