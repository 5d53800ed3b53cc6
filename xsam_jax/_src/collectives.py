"""Averaging over a data-parallel axis under ``pmap``, ``vmap`` and ``shard_map``.

With ``axis_name`` every replica holds the same parameters and its own shard
of the batch; ``loss_fn`` is the replica's loss. The *global* loss is the
mean of the replicas' losses, and the gradient a sharpness-aware method
needs is the gradient of that mean.

What ``jax.grad(loss_fn)(params)`` returns on a replica depends on how the
axis is mapped:

- ``jax.pmap``, ``jax.vmap(axis_name=...)``, ``jax.shard_map(...,
  check_vma=False)``: the replica's own (local) gradient; the global one is
  its ``jax.lax.pmean``.
- ``jax.shard_map`` with its default ``check_vma=True``: JAX types every
  value as *varying* over the axis (it may differ between replicas) or
  *invariant* (the same on all). The gradient with respect to invariant
  (replicated, ``P()``) params of a varying loss is already summed over the
  replicas (measured: 8x the global gradient on 8 devices), and a ``pmean``
  of an invariant value leaves it unchanged. The gradient with respect to
  varying params (``jax.lax.pcast(params, axis, to='varying')``) is the
  local one. A loss that is itself invariant (``loss_fn`` returns
  ``jax.lax.pmean(local_loss, axis)``) is already the global loss: its
  gradient with respect to invariant params is the global gradient, and
  with respect to varying params each replica's share of it (the local
  gradient divided by the number of replicas), whose ``psum`` is global.

:func:`gradient_sync` reads these types (``jax.typeof(x)``) at trace time
and turns any of these forms into the global mean gradient, so the same
``loss_fn`` and ``g_0 = jax.grad(loss_fn)(params)`` work in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from xsam_jax._src.types import AxisName, LossFn, PyTree


def axis_tuple(axis_name: AxisName) -> tuple[Any, ...]:
  """``axis_name`` (a name or a tuple of names) as a tuple of names."""
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def varying_axes(x: Any) -> frozenset[Any]:
  """The manual mesh axes over which ``x`` may vary (empty outside ``shard_map``
  with ``check_vma=True``)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", frozenset()))
  return frozenset(getattr(aval, "vma", frozenset()))


def tracked_axes(axes: Iterable[Any]) -> frozenset[Any]:
  """The axes of ``axes`` whose varying/invariant types JAX tracks here.

  True exactly inside ``jax.shard_map`` with ``check_vma=True``: there the
  replica index ``jax.lax.axis_index`` is typed as varying over its axis;
  under ``pmap``, ``vmap`` or ``check_vma=False`` nothing is typed varying.
  """
  return frozenset(a for a in axes if a in varying_axes(jax.lax.axis_index(a)))


def _axis_size(axes: Iterable[Any]) -> int:
  return math.prod(int(jax.lax.axis_size(a)) for a in axes)


def gradient_sync(
  axis_name: AxisName | None,
  loss_fn: LossFn,
  params: PyTree,
  *,
  per_replica: bool = False,
) -> Callable[[PyTree], PyTree]:
  """Returns ``sync(g)``, mapping ``jax.grad(loss_fn)`` output to what the ascent uses.

  Args:
    axis_name: the data-parallel axis (a name or a tuple of names), or None.
    loss_fn: the replica's loss (only traced, with ``jax.eval_shape``, and
      only inside ``shard_map`` with ``check_vma=True``).
    params: the parameters ``loss_fn`` is called with.
    per_replica: m-sharpness: gradients stay local (``sync`` only checks,
      at trace time, that they are local and returns them unchanged).

  Returns:
    ``sync``. With ``axis_name=None``: the identity. Otherwise ``sync(g)``
    is the gradient of the mean over replicas of ``loss_fn`` (see the module
    docstring for the forms ``g`` may take), or, with ``per_replica``,
    ``g`` itself.

  Raises:
    ValueError: (from ``sync``, at trace time) without ``axis_name`` inside
      ``shard_map(check_vma=True)``, when a gradient leaf varies over a mesh
      axis that its parameter does not vary over, or ``loss_fn`` does (each
      replica would perturb with its own gradient: data parallelism needs
      ``axis_name``, see :func:`_check_not_per_replica`); with ``per_replica`` under
      ``shard_map(check_vma=True)``, when ``loss_fn`` is already averaged
      over the axis or ``g`` was summed over the replicas by JAX (taken with
      respect to invariant params): neither carries a replica's own gradient.
  """
  if axis_name is None:
    return _check_not_per_replica(loss_fn, params)
  axes = axis_tuple(axis_name)
  tracked = tracked_axes(axes)
  loss_varying: frozenset[Any] = frozenset()
  if tracked:
    loss_varying = varying_axes(jax.eval_shape(loss_fn, params)) & tracked

  if per_replica:

    def check(x: jax.Array) -> jax.Array:
      if tracked - loss_varying:
        raise ValueError(
          "m_sharpness=True needs `loss_fn` to return the replica's own loss; "
          f"it is averaged over {sorted(tracked - loss_varying)} already (drop "
          "the pmean/psum inside loss_fn)."
        )
      if tracked - varying_axes(x):
        raise ValueError(
          "m_sharpness=True needs each replica's own gradient as `updates`; under "
          "shard_map, jax.grad with respect to replicated params returns the sum "
          "over replicas. Differentiate with respect to "
          f"jax.lax.pcast(params, {axis_name!r}, to='varying') instead."
        )
      return x

    return lambda g: jax.tree.map(check, g)

  def leaf_sync(x: jax.Array) -> jax.Array:
    vary = varying_axes(x)
    # Untracked axes: a local gradient. Tracked: see the module docstring.
    mean_axes = tuple(a for a in axes if a not in tracked or (a in vary and a in loss_varying))
    sum_axes = tuple(a for a in axes if a in tracked and a in vary and a not in loss_varying)
    summed_by_jax = tuple(a for a in axes if a in tracked and a not in vary and a in loss_varying)
    if mean_axes:
      x = jax.lax.pmean(x, mean_axes)
    if sum_axes:
      x = jax.lax.psum(x, sum_axes)
    if summed_by_jax:
      x = x / jnp.asarray(_axis_size(summed_by_jax), x.dtype)
    return x

  return lambda g: jax.tree.map(leaf_sync, g)


def _check_not_per_replica(loss_fn: LossFn, params: PyTree) -> Callable[[PyTree], PyTree]:
  """Without ``axis_name``: ``sync(g)`` returns ``g``, raising if it is visibly a replica's own gradient.

  Under ``pmap`` (and inside ``shard_map`` with ``check_vma=False``) no
  value carries a varying type, but the mapped axes are bound: a missing
  ``axis_name`` there is a ``ValueError`` naming the axis. Inside ``shard_map`` with
  ``check_vma=True`` a gradient that varies over an axis its parameter does
  not (replicated params, per-shard gradients), or a loss that varies over a
  mesh axis (each replica's own batch), means every replica would ascend on
  its own shard: the replicas' updates would differ and their parameters
  drift apart. Model-parallel shards (params and gradients varying over the
  same axis, an invariant loss) pass. ``loss_fn`` is traced (``jax.eval_shape``)
  once, here, and only inside such a ``shard_map``.
  """
  manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)
  tracked = tracked_axes(manual)
  if manual - tracked:
    axis = sorted(manual - tracked, key=str)[0]
    raise ValueError(
      f"update is traced inside `jax.pmap` (or `jax.shard_map(..., check_vma=False)`) over the axis {axis!r}, "
      "but the transformation has no `axis_name`: each replica would perturb with its own shard's gradient "
      "and the replicas' parameters would drift apart silently (even with a pmean of `grads`). Pass "
      f"`axis_name={axis!r}` to the transformation (and `m_sharpness=True` with it for per-replica perturbations "
      "on purpose). For model-parallel shards inside shard_map, keep `check_vma=True`: its types tell a "
      "parameter shard from a replica, and such shards pass."
    )
  if not tracked:
    return lambda g: g
  loss_axes = varying_axes(jax.eval_shape(loss_fn, params)) & tracked

  def check(g: PyTree) -> PyTree:
    for (path, x), p in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(params), strict=True):
      extra = (varying_axes(x) - varying_axes(p)) & tracked
      if extra:
        raise ValueError(
          f"the gradient at {jax.tree_util.keystr(path) or 'the root'} varies over the mesh axes {sorted(extra)} "
          "but its parameter does not: each replica holds its own gradient. For data parallelism pass "
          f"`axis_name={sorted(extra)[0]!r}` to the transformation (or `m_sharpness=True` with it for per-replica "
          "perturbations on purpose)."
        )
    if loss_axes:
      raise ValueError(
        f"`loss_fn` returns a loss that varies over the mesh axes {sorted(loss_axes)}: each replica's own loss. "
        f"For data parallelism pass `axis_name={sorted(loss_axes)[0]!r}` to the transformation, or return "
        "`jax.lax.pmean(loss, axis)` from `loss_fn`."
      )
    return g

  return check


def replica_mean(tree: PyTree, axis_name: AxisName | None) -> PyTree:
  """``jax.lax.pmean`` over ``axis_name`` (identity for None).

  Under ``shard_map(check_vma=True)`` a value already invariant over the
  axis is returned unchanged, so this is safe on any mix of leaves.
  """
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_tuple(axis_name))
