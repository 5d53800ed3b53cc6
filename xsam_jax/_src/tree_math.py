"""Global (whole-pytree) vector maths used by every sharpness-aware rule.

All reductions run in ``wide`` precision: the leaf dtype promoted with
float32 (so bf16/f16 leaves reduce in float32, float64 leaves in float64).
Norms are computed with a max-abs rescaling so that gradients at 1e-30 or
1e30 scale neither underflow to zero nor overflow to infinity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xsam_jax._src.types import PyTree, Scalar

EPS = 1e-12
"""Guard added to every norm that divides (ALGORITHM.md: ``eps = 1e-12``).

Kept exactly as in the authors' code, so results agree with it to rounding.
A consequence: for gradients whose global norm is far below 1e-12 the guard
dominates, the ascent shrinks towards zero (SAM tends to the plain gradient)
and XSAM's unit vectors shrink too (its output tends to zero). Rescale such
a loss before using these optimizers."""


def wide_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype reductions over a leaf of ``dtype`` use (at least float32)."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_wide(tree: PyTree) -> PyTree:
  """Casts every leaf to its wide dtype (float32 or wider)."""
  return jax.tree.map(lambda x: x.astype(wide_dtype(x.dtype)), tree)


def tree_cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def _scalar_dtype(tree: PyTree) -> jnp.dtype:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  dtype = jnp.dtype(jnp.float32)
  for leaf in leaves:
    dtype = jnp.promote_types(dtype, wide_dtype(leaf.dtype))
  return dtype


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Global dot product ``<a, b>`` summed over all leaves, in wide precision."""
  dtype = _scalar_dtype(a)
  parts = [
    jnp.vdot(x.astype(dtype).ravel(), y.astype(dtype).ravel())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return sum(parts, jnp.zeros((), dtype))


def tree_scaled_vdot(s: Scalar, a: PyTree, t: Scalar, b: PyTree) -> jax.Array:
  """``<s a, t b>`` for scalars ``s``, ``t``, as one fused reduction in wide precision.

  Each element is scaled before the product, ``sum_i (s a_i)(t b_i)``, so
  with ``s = 1/|a|`` and ``t = 1/|b|`` (a cosine) nothing overflows even for
  vectors near 1e30 in float32, and neither scaled tree is materialized.
  """
  dtype = _scalar_dtype(a)
  s, t = jnp.asarray(s).astype(dtype), jnp.asarray(t).astype(dtype)
  parts = [
    jnp.sum((x.astype(dtype) * s) * (y.astype(dtype) * t))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return sum(parts, jnp.zeros((), dtype))


def tree_norm(tree: PyTree) -> jax.Array:
  """Global L2 norm, robust to under/overflow.

  The fast path is ``sqrt(sum(x^2))``. When that sum is not finite, or so
  small that squares of tiny elements may have underflowed (below
  ``n * tiny * 1e8``), it is recomputed (under ``jax.lax.cond``, so only then)
  as ``m * sqrt(sum((x / m)^2))`` with ``m = max |x|``. So
  ``tree_norm(1e-30 * g)`` and ``tree_norm(1e30 * g)`` are finite and exact to
  rounding in float32. Returns 0 for an all-zero or empty tree.
  """
  dtype = _scalar_dtype(tree)
  leaves = [x.astype(dtype) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), dtype)
  ssq = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros((), dtype))
  size = sum(x.size for x in leaves)
  in_range = jnp.isfinite(ssq) & (ssq > jnp.finfo(dtype).tiny * max(size, 1) * 1e8)

  def rescaled(_: None) -> jax.Array:
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    safe_m = jnp.where(m > 0, m, jnp.ones_like(m))
    scaled = sum((jnp.sum(jnp.square(x / safe_m)) for x in leaves), jnp.zeros((), dtype))
    return jnp.where(m > 0, safe_m * jnp.sqrt(scaled), jnp.zeros_like(m))

  return jax.lax.cond(in_range, lambda _: jnp.sqrt(ssq), rescaled, None)


def tree_normalize(tree: PyTree, norm: jax.Array | None = None) -> tuple[PyTree, jax.Array]:
  """Returns ``(tree / (|tree| + EPS), |tree|)`` in wide precision."""
  wide = tree_wide(tree)
  if norm is None:
    norm = tree_norm(wide)
  inv = 1.0 / (norm + EPS)
  return jax.tree.map(lambda x: x * inv.astype(x.dtype), wide), norm


def tree_scale(scalar: Scalar, tree: PyTree) -> PyTree:
  """``scalar * tree`` leaf by leaf (scalar cast to each leaf's dtype)."""
  return jax.tree.map(lambda x: jnp.asarray(scalar).astype(x.dtype) * x, tree)


def tree_lincomb(a: Scalar, x: PyTree, b: Scalar, y: PyTree) -> PyTree:
  """``a * x + b * y`` for scalars a, b and pytrees x, y of one structure."""
  return jax.tree.map(
    lambda u, v: jnp.asarray(a).astype(u.dtype) * u + jnp.asarray(b).astype(v.dtype) * v,
    x,
    y,
  )


def tree_add_to_params(params: PyTree, delta: PyTree, scale: Scalar = 1.0) -> PyTree:
  """``params + scale * delta`` computed in wide precision, cast to params' dtypes."""
  return jax.tree.map(
    lambda w, d: (
      w.astype(wide_dtype(w.dtype)) + jnp.asarray(scale).astype(wide_dtype(w.dtype)) * d.astype(wide_dtype(w.dtype))
    ).astype(w.dtype),
    params,
    delta,
  )


def tree_all_finite(tree: PyTree) -> jax.Array:
  """True iff every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))
