"""Losses along random normalized directions, and average sharpness."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src.batching import map_batched
from xsam_jax._src.sharpness.directions import NORMALIZATIONS, VECTOR_LEAVES, _check_choice, _random_direction
from xsam_jax._src.types import LossFn, PyTree, Scalar


def perturbed_losses(
  loss_fn: LossFn,
  params: PyTree,
  key: jax.Array,
  *,
  rho: Scalar,
  num_directions: int = 32,
  normalization: str = "filter",
  vector_leaves: str = "zero",
  batch_size: int | None = None,
) -> jax.Array:
  r"""Losses :math:`L(w + \rho d_i)` along ``num_directions`` random directions.

  ``d_i = random_direction(k_i, params, ...)`` with
  ``k_i = jax.random.split(key, num_directions)[i]``. Each direction is
  drawn inside the batched call, so memory holds ``batch_size`` (or
  ``num_directions`` with ``jax.vmap``) parameter copies at a time.

  Args:
    loss_fn: ``params -> scalar``.
    params: the point ``w``.
    key: PRNG key; equal keys give equal directions.
    rho: radius; relative to the parameter scale for ``"filter"``,
      ``"layer"`` and ``"element"``, absolute for ``"unit"``.
    num_directions: number of random directions, a Python int >= 1.
    normalization, vector_leaves: see :func:`normalize_direction`.
    batch_size: None: one ``jax.vmap`` over all directions; an int:
      ``jax.lax.map(..., batch_size=)``.

  Returns:
    A ``(num_directions,)`` array of losses.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> losses = perturbed_losses(loss_fn, {"w": jnp.ones((2, 2))}, jax.random.key(0),
    ...                           rho=0.1, num_directions=4)
    >>> losses.shape
    (4,)

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
  """
  validation.check_finite("rho", rho)
  num_directions = validation.check_static_int("num_directions", num_directions)
  _check_choice("normalization", normalization, NORMALIZATIONS)
  _check_choice("vector_leaves", vector_leaves, VECTOR_LEAVES)
  if batch_size is not None:
    batch_size = validation.check_static_int("batch_size", batch_size)

  return _perturbed_losses(
    loss_fn,
    params,
    key,
    rho,
    num_directions=num_directions,
    normalization=normalization,
    vector_leaves=vector_leaves,
    batch_size=batch_size,
  )


@functools.partial(
  jax.jit, static_argnames=("loss_fn", "num_directions", "normalization", "vector_leaves", "batch_size")
)
def _perturbed_losses(
  loss_fn: LossFn,
  params: PyTree,
  key: jax.Array,
  rho: Scalar,
  *,
  num_directions: int,
  normalization: str,
  vector_leaves: str,
  batch_size: int | None,
) -> jax.Array:
  scalar = validation.scalar_loss("perturbed_losses", loss_fn)

  def one(k: jax.Array) -> jax.Array:
    d = _random_direction(k, params, normalization=normalization, vector_leaves=vector_leaves)
    return scalar(tm.tree_add_to_params(params, d, rho))

  return map_batched(one, jax.random.split(key, num_directions), batch_size)


def average_sharpness(
  loss_fn: LossFn,
  params: PyTree,
  key: jax.Array,
  *,
  rho: Scalar,
  num_directions: int = 32,
  normalization: str = "filter",
  vector_leaves: str = "zero",
  batch_size: int | None = None,
) -> jax.Array:
  r"""Average sharpness: the mean loss increase along random normalized directions.

  .. math::

    S_\rho(w) = \frac{1}{N}\sum_{i=1}^{N} L(w + \rho\, d_i) - L(w),

  with ``d_i`` Gaussian directions normalized by :func:`normalize_direction`
  (per filter by default, biases and other rank <= 1 leaves zeroed). Near a
  minimum :math:`S_\rho \approx \frac{\rho^2}{2} E[d^\top H d]`, a
  scale-invariant average curvature, complementary to :math:`\lambda_{max}`
  (the worst direction). Deterministic given ``key``; use the same key to
  compare models of one architecture on the same draws.

  Args:
    loss_fn: ``params -> scalar``.
    params: the point ``w``.
    key: PRNG key.
    rho: radius, a finite number >= 0 (relative to the filter norms for the
      default normalization; 0.05 perturbs every filter by 5% of its norm).
    num_directions: N, a Python int >= 1.
    normalization, vector_leaves: see :func:`normalize_direction`.
    batch_size: see :func:`perturbed_losses`.

  Returns:
    A scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = {"kernel": jnp.ones((3, 2))}
    >>> loss_fn = lambda p: 0.5 * jnp.sum((p["kernel"] - w["kernel"]) ** 2)
    >>> s = average_sharpness(loss_fn, w, jax.random.key(0), rho=0.1, num_directions=8)
    >>> round(float(s), 6)  # 0.5 * rho^2 * |w|^2, exactly, for every direction
    0.03

  References:
    Li, Xu, Taylor, Studer & Goldstein, Visualizing the Loss Landscape of
    Neural Nets, NeurIPS 2018, https://arxiv.org/abs/1712.09913. Keskar et
    al., On Large-Batch Training for Deep Learning, ICLR 2017.
  """
  validation.check_nonnegative("rho", rho)  # a radius (perturbed_losses also takes a signed scale)
  losses = perturbed_losses(
    loss_fn,
    params,
    key,
    rho=rho,
    num_directions=num_directions,
    normalization=normalization,
    vector_leaves=vector_leaves,
    batch_size=batch_size,
  )
  base = _loss_value(loss_fn, params)
  return jnp.mean(losses) - base.astype(losses.dtype)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _loss_value(loss_fn: LossFn, params: PyTree) -> jax.Array:
  return validation.scalar_loss("average_sharpness", loss_fn)(params)
