"""The loss on a grid over a plane through the parameters."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src.batching import map_batched
from xsam_jax._src.types import LossFn, PyTree


class LossSurface(NamedTuple):
  """The loss on a grid over a plane through ``params``.

  Attributes:
    xs: ``(nx,)`` coordinates along the first direction.
    ys: ``(ny,)`` coordinates along the second direction.
    losses: ``(ny, nx)`` with ``losses[i, j] = L(w + xs[j] d1 + ys[i] d2)``
      (matplotlib's ``contour(xs, ys, losses)`` layout).
  """

  xs: jax.Array
  ys: jax.Array
  losses: jax.Array


def loss_surface(
  loss_fn: LossFn,
  params: PyTree,
  direction1: PyTree,
  direction2: PyTree,
  *,
  xs: jax.typing.ArrayLike | Sequence[float] | None = None,
  ys: jax.typing.ArrayLike | Sequence[float] | None = None,
  batch_size: int | None = None,
) -> LossSurface:
  r"""The loss on the grid :math:`L(w + x\, d_1 + y\, d_2)`.

  Args:
    loss_fn: ``params -> scalar``.
    params: the centre ``w``.
    direction1, direction2: pytrees like ``params`` spanning the plane
      (e.g. from :func:`random_plane` or :func:`xsam_directions`).
    xs, ys: 1-D grid coordinates (default 21 points on ``[-1, 1]``).
    batch_size: None: one ``jax.vmap`` over all grid points; an int:
      ``jax.lax.map(..., batch_size=)`` to bound memory.

  Returns:
    A :class:`LossSurface`.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: p[0] ** 2 + 3.0 * p[1] ** 2
    >>> s = loss_surface(loss_fn, jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
    ...                  xs=[-1.0, 0.0, 1.0], ys=[0.0, 1.0])
    >>> s.losses.tolist()
    [[1.0, 0.0, 1.0], [4.0, 3.0, 4.0]]

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
  """
  if batch_size is not None:
    batch_size = validation.check_static_int("batch_size", batch_size)
  dtype = tm.wide_dtype(jnp.result_type(*jax.tree.leaves(params)))
  coords_x = jnp.linspace(-1.0, 1.0, 21, dtype=dtype) if xs is None else jnp.asarray(xs, dtype)
  coords_y = jnp.linspace(-1.0, 1.0, 21, dtype=dtype) if ys is None else jnp.asarray(ys, dtype)
  if coords_x.ndim != 1 or coords_y.ndim != 1 or coords_x.size == 0 or coords_y.size == 0:
    raise ValueError("`xs` and `ys` must be non-empty 1-D coordinate arrays.")
  for name, coords in (("xs", coords_x), ("ys", coords_y)):
    if not isinstance(coords, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(coords))):
      raise ValueError(f"`{name}` must hold finite coordinates, got {np.asarray(coords).tolist()}.")
  validation.check_like_params("loss_surface", "direction1", direction1, params)
  validation.check_like_params("loss_surface", "direction2", direction2, params)
  grid_x, grid_y = jnp.meshgrid(coords_x, coords_y)
  points = jnp.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
  losses = _surface_losses(loss_fn, params, direction1, direction2, points, batch_size=batch_size)
  return LossSurface(xs=coords_x, ys=coords_y, losses=losses.reshape(grid_x.shape))


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size"))
def _surface_losses(
  loss_fn: LossFn, params: PyTree, direction1: PyTree, direction2: PyTree, points: jax.Array, *, batch_size: int | None
) -> jax.Array:
  d1, d2 = tm.tree_wide(direction1), tm.tree_wide(direction2)
  scalar = validation.scalar_loss("loss_surface", loss_fn)

  def one(xy: jax.Array) -> jax.Array:
    return scalar(tm.tree_add_to_params(params, tm.tree_lincomb(xy[0], d1, xy[1], d2)))

  return map_batched(one, points, batch_size)
