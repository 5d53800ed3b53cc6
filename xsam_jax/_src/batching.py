"""One batched evaluation of a function over a stacked argument, with a memory bound."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def map_batched(fn: Callable[[Any], jax.Array], xs: Any, batch_size: int | None) -> jax.Array:
  """``fn`` over the leading axis of ``xs``: one ``jax.vmap``, or ``jax.lax.map`` in chunks.

  Args:
    fn: the function of one slice of ``xs``.
    xs: a pytree of arrays sharing their leading axis.
    batch_size: None for one ``jax.vmap`` over the whole axis; an int for
      ``jax.lax.map(fn, xs, batch_size=batch_size)``, which holds only that
      many evaluations' intermediates at a time. ``1`` is a sequential scan,
      ``jax.lax.map(fn, xs)``: ``fn`` itself in the loop body, with no
      size-1 ``vmap`` around it (a little less to compile).

  Returns:
    The stacked results.

  Example:
    >>> import jax.numpy as jnp
    >>> [float(x) for x in map_batched(jnp.sum, jnp.ones((3, 2)), 2)]
    [2.0, 2.0, 2.0]
  """
  if batch_size is None:
    return jax.vmap(fn)(xs)
  if batch_size == 1:
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)
