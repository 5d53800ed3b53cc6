"""Global (whole-pytree) vector maths used by every sharpness-aware rule.

All reductions run in ``wide`` precision: the leaf dtype promoted with
float32 (so bf16/f16 leaves reduce in float32, float64 leaves in float64).
Norms are computed with a max-abs rescaling so that gradients at 1e-30 or
1e30 scale neither underflow to zero nor overflow to infinity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xsam_jax._src.types import PyTree, Scalar

EPS = 1e-12
"""The authors' guard added to every norm that divides (docs/algorithm.md, "Notation").

The library divides by norms exactly instead (:meth:`Norm.inverse`): a zero
vector stays zero, and any other becomes a unit vector at every scale, so
an update is proportional to the gradient down to float32's smallest normal
numbers (with ``|g| + 1e-12`` the ascent and every unit vector shrank for
gradients below ~1e-12). In float32 the two agree bitwise wherever
``|g| > 2e-5`` (adding 1e-12 to such a norm rounds to the norm). Only the
sharpness toolkit's filter normalization keeps it."""


def wide_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype reductions over a leaf of ``dtype`` use (at least float32)."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_wide(tree: PyTree) -> PyTree:
  """Casts every leaf to its wide dtype (float32 or wider)."""
  return jax.tree.map(lambda x: x.astype(wide_dtype(x.dtype)), tree)


def tree_cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def scalar_dtype(tree: PyTree) -> jnp.dtype:
  """The widest of float32 and the leaves' wide dtypes: the dtype of a reduction over ``tree``."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  dtype = jnp.dtype(jnp.float32)
  for leaf in leaves:
    dtype = jnp.promote_types(dtype, wide_dtype(leaf.dtype))
  return dtype


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Global dot product ``<a, b>`` summed over all leaves, in wide precision."""
  dtype = scalar_dtype(a)
  xs, ys = (_packed([x.astype(dtype) for x in jax.tree.leaves(t)]) for t in (a, b))
  parts = [jnp.vdot(x, y) for x, y in zip(xs, ys, strict=True)]
  return sum(parts, jnp.zeros((), dtype))


def tree_scaled_vdot(s: Inverse, a: PyTree, t: Inverse, b: PyTree) -> jax.Array:
  """``<s a, t b>`` for inverse norms ``s``, ``t`` (:class:`Inverse`), as one fused reduction.

  Each element is scaled before the product, ``sum_i s(a_i) t(b_i)``, so with
  ``s = 1/|a|`` and ``t = 1/|b|`` (a cosine) nothing overflows or flushes to
  zero, even for vectors whose norm exceeds float32's range, and neither
  scaled tree is materialized.
  """
  dtype = scalar_dtype(a)
  xs, ys = (_packed([x.astype(dtype) for x in jax.tree.leaves(tree)]) for tree in (a, b))
  parts = [jnp.sum(s.apply(x) * t.apply(y)) for x, y in zip(xs, ys, strict=True)]
  return sum(parts, jnp.zeros((), dtype))


class Inverse(NamedTuple):
  """A factor ``pow2 * mant`` applied to an element as ``(x * pow2) * mant``.

  ``1 / (|x| + EPS)`` for ``|x|`` beyond ``2^126`` is below float32's
  smallest normal number, which XLA on CPU flushes to zero; held as a power
  of two and a moderate mantissa, and applied in that order, it scales
  ``x`` to a unit vector without ever forming that number.

  Attributes:
    pow2: a power of two (exactly 1 unless the norm is out of range).
    mant: the rest of the factor.
  """

  pow2: jax.Array
  mant: jax.Array

  def apply(self, x: jax.Array) -> jax.Array:
    """``(x * pow2) * mant`` (for one array)."""
    return (x * self.pow2.astype(x.dtype)) * self.mant.astype(x.dtype)

  def apply_tree(self, tree: PyTree) -> PyTree:
    """:meth:`apply` to every leaf."""
    return jax.tree.map(self.apply, tree)


class Norm(NamedTuple):
  """A global norm held as ``|x| = scale * r``, so that it survives float overflow.

  ``scale`` is a power of two, exactly 1 unless ``|x|`` is out of the
  dtype's comfortable range (then ``r = |x / scale|`` lies in ``[1, 2 sqrt(n)]``).
  Products with a norm are formed as ``(t * r) * scale``, and ratios of
  norms as ratios of ``r`` times a ratio of powers of two, so a gradient
  whose norm exceeds float32's largest value (four elements of 3e38, say)
  still gives finite unit vectors and finite outputs wherever the exact
  result is representable.

  Attributes:
    scale: a power of two (wide dtype scalar).
    r: ``|x| / scale`` (wide dtype scalar).
  """

  scale: jax.Array
  r: jax.Array

  @property
  def value(self) -> jax.Array:
    """``|x|`` as one number (``inf`` if it exceeds the dtype's range)."""
    return self.scale * self.r

  @property
  def inv_scale(self) -> jax.Array:
    """``1 / scale`` (exact: a power of two in the normal range)."""
    return 1.0 / self.scale

  def inverse(self) -> Inverse:
    """``1 / |x|`` as an :class:`Inverse` (``pow2 = 1 / scale``), and 1 for ``x = 0`` (which it leaves 0).

    Exact at any scale (see :data:`EPS`); the division is the last
    operation, so XLA forms the factor once instead of copying a chain of
    scalar ops into every leaf's kernel.
    """
    return Inverse(self.inv_scale, 1.0 / self.guarded_r())

  def guarded_r(self) -> jax.Array:
    """``r``, or 1 when ``r = 0`` (a divisor that leaves a zero vector zero)."""
    return self.r + (self.r == 0).astype(self.r.dtype)

  def guarded_ratio(self) -> jax.Array:
    """``|x| / |x|``: 1, or 0 for ``x = 0``."""
    return self.r / self.guarded_r()


_TINY = 1 << 12
"""Leaves of at most this many elements are packed together by :func:`_packed`."""
_PACK = 1 << 16
"""Most elements in one pack of tiny leaves."""


def _packed(leaves: list[jax.Array]) -> list[jax.Array]:
  """The leaves as flat vectors, with tiny leaves (biases, norm scales) concatenated into packs.

  A reduction over a tree is then one kernel per large leaf plus one per
  pack, instead of one per leaf: compile time stays linear, and small, in
  the number of leaves. Only tiny leaves are copied, at most ``_PACK``
  elements a pack; large leaves are reshaped (no copy).
  """
  out: list[jax.Array] = []
  pack: list[jax.Array] = []
  size = 0

  def flush() -> None:
    nonlocal pack, size
    if pack:
      out.append(jnp.concatenate(pack) if len(pack) > 1 else pack[0])
    pack, size = [], 0

  for x in leaves:
    v = x.ravel()
    if v.size > _TINY:
      out.append(v)
      continue
    if size + v.size > _PACK:
      flush()
    pack.append(v)
    size += v.size
  flush()
  return out


def tree_norm_parts(tree: PyTree) -> Norm:
  """Global L2 norm as a :class:`Norm`, robust to under- and overflow.

  The fast path is ``sqrt(sum(x^2))`` with ``scale = 1``. When that sum is
  not finite, or so small that squares of tiny elements may have
  underflowed (below ``n * tiny * 1e8``), it is recomputed (under
  ``jax.lax.cond``, so only then) with ``scale = 2^e`` for the exponent
  ``e`` of ``max |x|`` (clamped to the normal range) and
  ``r = sqrt(sum((x / scale)^2))``: exact to rounding for gradients at
  1e-30 or near float32's largest value. An all-zero or empty tree has
  ``r = 0``.

  Every scalar that fans out to all the leaves is the result of a division
  or a square root: XLA copies a chain of cheap scalar ops into each
  consumer's fusion, which made compile time quadratic in the leaf count.
  """
  dtype = scalar_dtype(tree)
  leaves = _packed([x.astype(dtype) for x in jax.tree.leaves(tree)])
  one = jnp.ones((), dtype)
  if not leaves:
    return Norm(one, jnp.zeros((), dtype))
  ssq = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros((), dtype))
  size = sum(x.size for x in leaves)
  info = jnp.finfo(dtype)
  in_range = jnp.isfinite(ssq) & (ssq > info.tiny * max(size, 1) * 1e8)

  def fast(_: None) -> Norm:
    # 1 exactly (ssq is finite here), typed like ssq: under shard_map both branches must agree
    # on whether the result varies across devices.
    return Norm(one + 0.0 * ssq, jnp.sqrt(ssq))

  def rescaled(_: None) -> Norm:
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(v), initial=0.0) for v in leaves]))
    _mantissa, exponent = jnp.frexp(m)  # m = f 2^e, f in [0.5, 1): m / 2^(e-1) in [1, 2)
    # 1/scale must stay a normal number (XLA on CPU flushes subnormals to zero).
    scale = jnp.ldexp(one, jnp.clip(exponent - 1, int(info.minexp), -int(info.minexp)))
    inv_scale = one / scale  # exact (a power of two); a division, so XLA does not copy it per leaf
    # Each scaled vector goes through a barrier: on concrete (constant-folded) inputs XLA
    # otherwise evaluates sum((v s)^2) in a form that under- and overflows (NaN at 1e-30).
    ssq_scaled = (jnp.sum(jnp.square(jax.lax.optimization_barrier(v * inv_scale))) for v in leaves)
    r = jnp.sqrt(sum(ssq_scaled, jnp.zeros((), dtype)))
    return Norm(scale, r)

  return jax.lax.cond(in_range, fast, rescaled, None)


def tree_norm(tree: PyTree) -> jax.Array:
  """Global L2 norm, robust to under/overflow (see :func:`tree_norm_parts`).

  ``tree_norm(1e-30 * g)`` and ``tree_norm(1e30 * g)`` are finite and exact
  to rounding in float32; a norm beyond the dtype's largest value is
  ``inf`` (use :func:`tree_norm_parts` to keep it). Returns 0 for an
  all-zero or empty tree.
  """
  return tree_norm_parts(tree).value


def tree_normalize_parts(tree: PyTree) -> tuple[PyTree, Norm]:
  """Returns ``(tree / |tree|, |tree|)`` in wide precision (0 for a zero tree), the norm as a :class:`Norm`.

  The unit vector is finite even when ``|tree|`` overflows the dtype.
  """
  wide = tree_wide(tree)
  norm = tree_norm_parts(wide)
  return norm.inverse().apply_tree(wide), norm


def tree_normalize(tree: PyTree) -> tuple[PyTree, jax.Array]:
  """Returns ``(tree / |tree|, |tree|)`` in wide precision (see :func:`tree_normalize_parts`)."""
  unit, norm = tree_normalize_parts(tree)
  return unit, norm.value


def tree_scale_by_norm(norm: Norm, coef: Scalar, tree: PyTree) -> PyTree:
  """``(coef * |y|) * tree`` formed as ``((coef * r) * x) * scale`` per element.

  For ``norm = |y|`` as a :class:`Norm`: finite wherever the exact product
  is representable, even when ``|y|`` alone is not.
  """
  a = jnp.asarray(coef) * norm.r
  return jax.tree.map(lambda x: (a.astype(x.dtype) * x) * norm.scale.astype(x.dtype), tree)


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
