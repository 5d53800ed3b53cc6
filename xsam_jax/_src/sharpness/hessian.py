"""The top of the Hessian spectrum: eigenpairs from LOBPCG over Hessian-vector products."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse import linalg as sparse_linalg
from jax.flatten_util import ravel_pytree

from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src.types import LossFn, PyTree, Scalar

FlatOperator = Callable[[jax.Array], jax.Array]
"""A linear map on ``(n, m)`` matrices whose columns are flat (raveled) vectors."""


class HessianEigenpairs(NamedTuple):
  """Top of the Hessian spectrum, as returned by :func:`hessian_eigenpairs`.

  Attributes:
    eigenvalues: ``(k,)`` largest (algebraic) eigenvalues, descending.
    eigenvectors: a pytree like ``params`` whose leaves have a leading axis
      of size ``k``: ``jax.tree.map(lambda x: x[i], eigenvectors)`` is the
      unit eigenvector of ``eigenvalues[i]`` (global norm 1, float32 or
      wider).
    num_iterations: LOBPCG iterations run (0 when the dense path was used).
  """

  eigenvalues: jax.Array
  eigenvectors: PyTree
  num_iterations: jax.Array


def _flat_hessian(loss_fn: LossFn, params: PyTree) -> tuple[FlatOperator, jax.Array, Callable[[jax.Array], PyTree]]:
  """The Hessian as a map on ``(n, m)`` matrices of flat (raveled) vectors.

  Forward-over-reverse: ``jax.linearize`` of ``jax.grad`` evaluates the
  gradient once and keeps its linearization, so every product afterwards
  costs only the tangent passes.

  Returns:
    ``(matmat, flat_params, unravel)``; ``matmat`` works in the wide dtype of
    ``flat_params``.
  """
  flat, unravel = ravel_pytree(tm.tree_wide(params))
  _, grad_lin = jax.linearize(jax.grad(validation.scalar_loss("hessian_eigenpairs", loss_fn)), params)

  def matvec(x: jax.Array) -> jax.Array:
    hv = grad_lin(tm.tree_cast_like(unravel(x), params))
    return ravel_pytree(tm.tree_wide(hv))[0].astype(flat.dtype)

  def matmat(xs: jax.Array) -> jax.Array:
    return jax.vmap(matvec, in_axes=1, out_axes=1)(xs)

  return matmat, flat, unravel


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "block_size", "max_iters", "auto_shift", "dense"))
def _top_eigenpairs(
  loss_fn: LossFn,
  params: PyTree,
  key: jax.Array,
  rel_tol: float,
  shift: Scalar,
  *,
  k: int,
  block_size: int,
  max_iters: int,
  auto_shift: bool,
  dense: bool,
) -> HessianEigenpairs:
  matmat, flat, unravel = _flat_hessian(loss_fn, params)
  n, dtype = flat.size, flat.dtype
  if dense:
    hess = matmat(jnp.eye(n, dtype=dtype))
    vals, vecs = jnp.linalg.eigh(0.5 * (hess + hess.T))
    vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    iters = jnp.zeros([], jnp.int32)
  else:
    x0 = jax.random.normal(key, (n, block_size), dtype)
    if auto_shift:
      # |H x| / |x| over the start block: if the k-th eigenvalue is negative,
      # nearly every eigenvalue is at most that, so this exceeds its magnitude.
      ratio = jnp.linalg.norm(matmat(x0), axis=0) / jnp.linalg.norm(x0, axis=0)
      sigma = 2.0 * jnp.max(ratio)
      sigma = jnp.where(sigma > 0, sigma, 1.0)  # H x = 0: keep LOBPCG away from a zero operator
    else:
      sigma = jnp.asarray(shift, dtype)
    sigma = sigma.astype(dtype)

    def shifted(xs: jax.Array) -> jax.Array:
      return matmat(xs) + sigma * xs

    # lobpcg stops when |r| < tol * 10 * n * (|A v| + theta): undo its n scaling.
    tol = jnp.asarray(rel_tol, dtype) / (10.0 * n)
    vals, vecs, iters = sparse_linalg.lobpcg_standard(shifted, x0, m=max_iters, tol=tol)
    vals = vals - sigma
    order = jnp.argsort(-vals)[:k]
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs / jnp.linalg.norm(vecs, axis=0, keepdims=True)
    iters = jnp.asarray(iters, jnp.int32)
  eigvecs = jax.vmap(unravel, in_axes=1)(vecs)
  return HessianEigenpairs(eigenvalues=vals, eigenvectors=eigvecs, num_iterations=iters)


def hessian_eigenpairs(
  loss_fn: LossFn,
  params: PyTree,
  k: int = 1,
  *,
  key: jax.Array | None = None,
  block_size: int | None = None,
  max_iters: int = 200,
  tol: float = 1e-5,
  shift: float | None = None,
) -> HessianEigenpairs:
  r"""The ``k`` largest eigenvalues of the Hessian of ``loss_fn``, with eigenvectors.

  "Largest" is algebraic, :math:`\lambda_1 \ge \lambda_2 \ge \dots`, which is
  what sharpness studies (and the XSAM paper's :math:`\lambda_{max}` and
  :math:`\lambda_1/\lambda_5`) report; on an indefinite Hessian a large
  negative eigenvalue is *not* returned ahead of a small positive one.

  The Hessian is never formed: the parameters are flattened with
  ``jax.flatten_util.ravel_pytree`` and the operator :math:`X \mapsto H X`
  (forward-over-reverse products, see :func:`~xsam_jax.sharpness.hessian_vector_product`,
  ``jax.vmap`` over the columns of ``X``) is handed to JAX's maintained
  LOBPCG, ``jax.experimental.sparse.linalg.lobpcg_standard``. That solver
  needs only a symmetric operator and returns the largest algebraic Ritz
  values, but its stopping test compares the residual with
  ``|A v| + lambda``, which never passes when ``lambda < 0``; the operator is
  therefore shifted to :math:`H + \sigma I` (eigenvectors unchanged,
  :math:`\sigma` subtracted afterwards), with :math:`\sigma = 2 \max_j
  \|H x_j\| / \|x_j\|` over the random start block by default. The shift
  only decides when to stop, never which eigenvalues are found.

  LOBPCG requires ``5 * block_size < n`` (``n``: number of parameters); for
  smaller problems the dense Hessian (``n`` products) is diagonalized with
  ``jnp.linalg.eigh`` instead.

  Cost: about ``4 * block_size`` Hessian-vector products per iteration.
  The products run in the params' own dtypes and the solver in float32 or
  wider; for bf16/f16 params, pass a float32 copy for accurate eigenvalues.

  Args:
    loss_fn: ``params -> scalar``, e.g. the training loss on a fixed batch.
    params: the point ``w``, any pytree of float arrays.
    k: number of eigenpairs, a Python int >= 1.
    key: PRNG key for the random start block (default ``jax.random.key(0)``,
      so results are deterministic).
    block_size: LOBPCG block size ``>= k`` (default ``k``). A few extra
      vectors speed up convergence of the ``k``-th eigenvalue when the
      spectrum is clustered.
    max_iters: LOBPCG iteration limit.
    tol: relative residual at which an eigenpair counts as converged:
      LOBPCG stops when every :math:`\|(H+\sigma) v - \theta v\| <`
      ``tol`` :math:`(\|(H+\sigma) v\| + \theta)` (``lobpcg_standard``'s own
      ``tol`` is this divided by ``10 n``). The eigenvalue error is about
      the residual squared over the gap. In float32, 1e-6 is about the
      floor; below it LOBPCG runs ``max_iters`` iterations.
    shift: the shift :math:`\sigma`; None for the automatic choice above.

  Returns:
    A :class:`HessianEigenpairs`; eigenvalues in the wide dtype of
    ``params`` (float32, or float64 for float64 params).

  Example:
    >>> import jax.numpy as jnp
    >>> spectrum = jnp.array([3.0, -5.0, 2.0, 1.0, 0.5, 0.0, -1.0, 0.2])
    >>> loss_fn = lambda p: 0.5 * jnp.sum(spectrum * p["w"] ** 2)
    >>> out = hessian_eigenpairs(loss_fn, {"w": jnp.ones(8)}, k=1)
    >>> round(float(out.eigenvalues[0]), 4)
    3.0

  References:
    Knyazev, Toward the optimal preconditioned eigensolver: LOBPCG, SIAM J.
    Sci. Comput. 2001. Ghorbani, Krishnan & Xiao, An investigation into
    neural net optimization via Hessian eigenvalue density, ICML 2019.
  """
  k = validation.check_static_int("k", k)
  block_size = k if block_size is None else validation.check_static_int("block_size", block_size)
  if block_size < k:
    raise ValueError(f"`block_size` must be >= k={k}, got {block_size}.")
  max_iters = validation.check_static_int("max_iters", max_iters)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  if k > n:
    raise ValueError(f"`k` must be <= the number of parameters ({n}), got {k}.")
  validation.check_positive("tol", tol)
  if shift is not None:
    validation.check_finite("shift", shift)
  if key is None:
    key = jax.random.key(0)
  dense = 5 * block_size >= n
  return _top_eigenpairs(
    loss_fn,
    params,
    key,
    tol,
    0.0 if shift is None else shift,
    k=k,
    block_size=block_size,
    max_iters=max_iters,
    auto_shift=shift is None,
    dense=dense,
  )


def hessian_eigenvalues(loss_fn: LossFn, params: PyTree, k: int = 1, **kwargs: Any) -> jax.Array:
  r"""The ``k`` largest (algebraic) Hessian eigenvalues, descending.

  :math:`\lambda_{max}` is ``hessian_eigenvalues(loss_fn, params)[0]``; the
  XSAM paper's ratio is ``lam[0] / lam[4]`` with ``k=5``. See
  :func:`hessian_eigenpairs` for the method and the options (``key``,
  ``block_size``, ``max_iters``, ``tol``, ``shift``).

  Args:
    loss_fn: ``params -> scalar``.
    params: the point ``w``.
    k: number of eigenvalues.
    **kwargs: forwarded to :func:`hessian_eigenpairs`.

  Returns:
    A ``(k,)`` array, descending.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: 0.5 * jnp.sum(jnp.arange(12.0) * p ** 2)
    >>> [round(float(x), 3) for x in hessian_eigenvalues(loss_fn, jnp.ones(12), k=2)]
    [11.0, 10.0]

  References:
    Knyazev, SIAM J. Sci. Comput. 2001 (LOBPCG).
  """
  return hessian_eigenpairs(loss_fn, params, k, **kwargs).eigenvalues
