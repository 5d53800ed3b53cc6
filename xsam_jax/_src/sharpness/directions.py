"""Random directions normalized to the parameters' scale (Li et al. 2018), singly or as a plane."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xsam_jax._src import tree_math as tm
from xsam_jax._src.types import PyTree

NORMALIZATIONS = ("filter", "layer", "element", "unit")
"""Direction normalizations understood by :func:`normalize_direction`."""

VECTOR_LEAVES = ("zero", "normalize")
"""What :func:`normalize_direction` does with leaves of rank <= 1."""


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def normalize_direction(
  direction: PyTree, params: PyTree, *, normalization: str = "filter", vector_leaves: str = "zero"
) -> PyTree:
  r"""Rescales a direction to the scale of ``params``, as in Li et al. (2018).

  With ``d`` the direction and ``w`` the parameters, for every leaf:

  * ``"filter"``: each output filter gets the norm of ``w``'s filter,
    :math:`d_{\cdot j} \leftarrow d_{\cdot j} \|w_{\cdot j}\| / \|d_{\cdot j}\|`.
    Flax kernels keep the output features on the **last** axis (Dense
    ``(in, out)``, Conv ``(h, w, in, out)``), so filter ``j`` is the slice
    ``[..., j]``.
  * ``"layer"``: each leaf gets the norm of ``w``'s leaf.
  * ``"element"``: :math:`d_i \leftarrow d_i |w_i|` (ASAM-like scale).
  * ``"unit"``: no per-leaf scaling; the whole direction is scaled to
    global norm 1, so ``rho`` becomes an absolute radius as in SAM.

  Leaves of rank <= 1 (biases, norm scales, scalars): ``vector_leaves="zero"``
  (default, as Li et al. do) zeroes them; ``"normalize"`` treats such a leaf
  as a single filter (``"filter"``/``"layer"``), element-wise (``"element"``)
  or keeps it (``"unit"``). A zero filter of ``w`` gives a zero filter of
  ``d``; no NaN is produced.

  Args:
    direction: a pytree like ``params``.
    params: the parameters ``w``.
    normalization: one of ``"filter"``, ``"layer"``, ``"element"``, ``"unit"``.
    vector_leaves: ``"zero"`` or ``"normalize"``.

  Returns:
    The normalized direction (float32 or wider leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> w = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
    >>> d = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> out = normalize_direction(d, w)
    >>> [round(float(x), 3) for x in jnp.linalg.norm(out["kernel"], axis=0)]
    [5.0, 1.0]
    >>> float(jnp.sum(jnp.abs(out["bias"])))
    0.0

  References:
    Li, Xu, Taylor, Studer & Goldstein, Visualizing the Loss Landscape of
    Neural Nets, NeurIPS 2018, https://arxiv.org/abs/1712.09913.
  """
  _check_choice("normalization", normalization, NORMALIZATIONS)
  _check_choice("vector_leaves", vector_leaves, VECTOR_LEAVES)
  return _normalize_direction(direction, params, normalization=normalization, vector_leaves=vector_leaves)


@functools.partial(jax.jit, static_argnames=("normalization", "vector_leaves"))
def _normalize_direction(direction: PyTree, params: PyTree, *, normalization: str, vector_leaves: str) -> PyTree:
  def one(d: jax.Array, w: jax.Array) -> jax.Array:
    d = d.astype(tm.wide_dtype(jnp.result_type(d.dtype, w.dtype)))
    w = w.astype(d.dtype)
    if d.ndim <= 1 and vector_leaves == "zero":
      return jnp.zeros_like(d)
    if normalization == "element":
      return d * jnp.abs(w)
    if normalization == "unit":
      return d
    axes = tuple(range(d.ndim - 1)) if normalization == "filter" and d.ndim >= 2 else tuple(range(d.ndim))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    return d * (w_norm / (d_norm + tm.EPS))

  out = jax.tree.map(one, direction, params)
  if normalization == "unit":
    out, _ = tm.tree_normalize(out)
  return out


def random_direction(
  key: jax.Array, params: PyTree, *, normalization: str = "filter", vector_leaves: str = "zero"
) -> PyTree:
  """A Gaussian random direction, normalized by :func:`normalize_direction`.

  Deterministic given ``key`` (one Gaussian draw of all the parameters, cut
  into leaves in ``jax.tree.leaves`` order), so two models of the same
  architecture get the same raw draws.

  Args:
    key: a PRNG key.
    params: the parameters ``w`` (shapes, dtypes and scales).
    normalization: see :func:`normalize_direction`.
    vector_leaves: see :func:`normalize_direction`.

  Returns:
    A pytree like ``params`` (float32 or wider leaves).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    >>> d = random_direction(jax.random.key(0), w)
    >>> [round(float(x), 4) for x in jnp.linalg.norm(d["kernel"], axis=0)]
    [1.7321, 1.7321]

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
  """
  _check_choice("normalization", normalization, NORMALIZATIONS)
  _check_choice("vector_leaves", vector_leaves, VECTOR_LEAVES)
  return _random_direction(key, params, normalization=normalization, vector_leaves=vector_leaves)


@functools.partial(jax.jit, static_argnames=("normalization", "vector_leaves"))
def _random_direction(key: jax.Array, params: PyTree, *, normalization: str, vector_leaves: str) -> PyTree:
  return _normalize_direction(
    _gaussian_like(key, params), params, normalization=normalization, vector_leaves=vector_leaves
  )


def _gaussian_like(key: jax.Array, tree: PyTree) -> PyTree:
  """Standard normal leaves shaped like ``tree`` (wide dtypes), from one draw.

  One ``jax.random.normal`` call for all leaves, cut in ``jax.tree.leaves``
  order: a single threefry kernel compiles much faster than one per leaf.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  dtype = tm.scalar_dtype(tree)
  sizes = [int(np.prod(w.shape)) for w in leaves]
  flat = jax.random.normal(key, (sum(sizes),), dtype)
  out, start = [], 0
  for w, size in zip(leaves, sizes, strict=True):
    out.append(flat[start : start + size].reshape(w.shape).astype(tm.wide_dtype(w.dtype)))
    start += size
  return jax.tree.unflatten(treedef, out)


def random_plane(
  key: jax.Array, params: PyTree, *, normalization: str = "filter", vector_leaves: str = "zero"
) -> tuple[PyTree, PyTree]:
  """Two independent random normalized directions (Li et al.'s 2-D plots).

  Args:
    key: PRNG key (split in two).
    params: the parameters ``w``.
    normalization, vector_leaves: see :func:`normalize_direction`.

  Returns:
    ``(d1, d2)``, pytrees like ``params``. In high dimension they are nearly
    orthogonal; they are not orthogonalized.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> d1, d2 = random_plane(jax.random.key(0), {"k": jnp.ones((4, 3))})
    >>> d1["k"].shape
    (4, 3)

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
  """
  k1, k2 = jax.random.split(key)
  return (
    random_direction(k1, params, normalization=normalization, vector_leaves=vector_leaves),
    random_direction(k2, params, normalization=normalization, vector_leaves=vector_leaves),
  )
