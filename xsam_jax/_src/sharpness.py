"""Sharpness toolkit: Hessian spectra, average sharpness and loss surfaces.

Three ways to look at how sharp a minimum is, all working on pytrees of
parameters and a scalar ``loss_fn(params)`` (or a ``(loss, aux)`` pair, whose
``aux`` is ignored):

* the top eigenvalues (and eigenvectors) of the Hessian, from
  forward-over-reverse Hessian-vector products and JAX's maintained LOBPCG
  solver (``jax.experimental.sparse.linalg.lobpcg_standard``);
* average sharpness (Li et al. 2018 style): the mean loss increase along
  random filter-normalized directions;
* loss surfaces on a plane through ``params``: random filter-normalized
  planes, or XSAM's own search plane with the SGD, SAM and XSAM directions
  (the XSAM paper's Fig. 1a), and a matplotlib helper that draws them.

matplotlib is imported lazily inside the plotting helpers only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse import linalg as sparse_linalg
from jax.flatten_util import ravel_pytree

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src import xsam as xsam_lib
from xsam_jax._src.batching import map_batched
from xsam_jax._src.types import LossFn, PyTree, Scalar

if TYPE_CHECKING:
  from matplotlib.axes import Axes

FlatOperator = Callable[[jax.Array], jax.Array]
"""A linear map on ``(n, m)`` matrices whose columns are flat (raveled) vectors."""

NORMALIZATIONS = ("filter", "layer", "element", "unit")
"""Direction normalizations understood by :func:`normalize_direction`."""

VECTOR_LEAVES = ("zero", "normalize")
"""What :func:`normalize_direction` does with leaves of rank <= 1."""


# ---------------------------------------------------------------------------
# Hessian-vector products and the top of the Hessian spectrum.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Random normalized directions and average sharpness.
# ---------------------------------------------------------------------------


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
    rho: radius (relative to the filter norms for the default
      normalization; 0.05 perturbs every filter by 5% of its norm).
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


# ---------------------------------------------------------------------------
# Loss surfaces on a plane.
# ---------------------------------------------------------------------------


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


class XSAMPlane(NamedTuple):
  """XSAM's search plane at ``params``, as computed by :func:`xsam_directions`.

  The plane is spanned by ``v0`` (to the ascent point) and ``v1`` (the
  gradient there); ``e1, e2`` is its orthonormal basis with ``e1 = v0``.
  The ``*_xy`` fields are 2-vectors in that basis.

  Attributes:
    e1, e2: orthonormal basis pytrees (float32 or wider).
    v0, v1: XSAM's unit spanning vectors (``xsam_jax.xsam_plane``).
    theta: angle between ``v0`` and ``v1``.
    alpha: the interpolation factor used for ``xsam_xy`` (probed, or given).
    grad_norm: ``|g_K|``.
    probe_losses: ``L(w + rho_max v(alpha_i))`` over ``alphas`` (zeros when
      ``alpha`` was given).
    alphas: the probed grid.
    sgd_xy: unit ``g_0`` projected onto the plane (``(1, 0)`` for one
      ascent step, where ``v0`` is the ``g_0`` direction; shorter than 1 for
      ``K > 1`` when ``g_0`` leaves the plane).
    sam_xy: ``v1``, i.e. ``(cos theta, sin theta)``.
    xsam_xy: ``v(alpha)``, i.e. ``(cos(alpha theta), sin(alpha theta))``
      (``sam_xy`` on a degenerate plane).
    ascent_xy: the ascent point ``d_K``, i.e. ``(|d_K|, 0)``.
    rho, rho_max: the radii used.
  """

  e1: PyTree
  e2: PyTree
  v0: PyTree
  v1: PyTree
  theta: jax.Array
  alpha: jax.Array
  grad_norm: jax.Array
  probe_losses: jax.Array
  alphas: jax.Array
  sgd_xy: jax.Array
  sam_xy: jax.Array
  xsam_xy: jax.Array
  ascent_xy: jax.Array
  rho: float
  rho_max: float


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "probe", "probe_batch_size"))
def _xsam_directions(
  loss_fn: LossFn,
  params: PyTree,
  g0: PyTree | None,
  key: jax.Array,
  alphas: jax.Array,
  alpha: Scalar,
  rho: Scalar,
  rho_max: Scalar,
  *,
  num_steps: int,
  probe: bool,
  probe_batch_size: int | None,
) -> tuple[Any, ...]:
  loss_fn = validation.scalar_loss("xsam_directions", loss_fn)
  if g0 is None:
    g0 = jax.grad(loss_fn)(params)
  trace = ascent_lib.ascent(loss_fn, params, g0, rho=rho, num_steps=num_steps)
  v0, v1, theta, g_norm = xsam_lib.xsam_plane(trace.displacement, trace.grads[-1])
  grid = alphas.astype(theta.dtype)
  if probe:
    losses = xsam_lib.probe_losses(loss_fn, params, v0, v1, theta, grid, rho_max, batch_size=probe_batch_size)
    alpha, _ = xsam_lib.select_alpha(losses, grid, jnp.asarray(1.0, jnp.float32))
  else:
    losses = jnp.zeros(grid.shape, theta.dtype)
  alpha = jnp.asarray(alpha, jnp.float32)
  cos_t = jnp.cos(theta)
  # e2: v1 with its v0 component removed; a random direction on a degenerate plane.
  resid = tm.tree_lincomb(1.0, v1, -cos_t, v0)
  fallback = _gaussian_like(key, v0)
  fallback = tm.tree_lincomb(1.0, fallback, -tm.tree_vdot(fallback, v0), v0)
  degenerate = jnp.sin(theta) < xsam_lib.DEGENERATE_SIN
  e2_raw = jax.tree.map(lambda r, f: jnp.where(degenerate, f, r), resid, fallback)
  e2, _ = tm.tree_normalize(e2_raw)
  e1 = v0

  def coords(tree: PyTree) -> jax.Array:
    return jnp.stack([tm.tree_vdot(tree, e1), tm.tree_vdot(tree, e2)])

  g0_unit, _ = tm.tree_normalize(g0)
  coef_a, coef_b = xsam_lib.slerp_coefficients(alpha.astype(theta.dtype), theta)
  sam_xy = coords(v1)
  xsam_xy = coef_a * jnp.stack([jnp.ones_like(theta), jnp.zeros_like(theta)]) + coef_b * sam_xy
  ascent_xy = coords(trace.displacement)
  return (e1, e2, v0, v1, theta, alpha, g_norm, losses, grid, coords(g0_unit), sam_xy, xsam_xy, ascent_xy)


def xsam_directions(
  loss_fn: LossFn,
  params: PyTree,
  *,
  rho: Scalar,
  rho_max: Scalar,
  num_steps: int = 1,
  alphas: Sequence[float] = xsam_lib.DEFAULT_ALPHAS,
  alpha: Scalar | None = None,
  grads: PyTree | None = None,
  key: jax.Array | None = None,
  probe_batch_size: int | None = None,
) -> XSAMPlane:
  r"""Recomputes XSAM's plane, ``v0``, ``v1`` and its chosen direction at ``params``.

  Runs exactly what one :func:`xsam_jax.xsam` update does (docs/algorithm.md):
  the ``K``-step ascent (``xsam_jax.ascent``) to ``w + d_K``,
  ``v0, v1, theta = xsam_jax.xsam_plane(d_K, g_K)``, and (unless ``alpha``
  is given) the probes :math:`L(w + \rho_{max} v(\alpha_i))` and their first
  maximiser :math:`\alpha^*`; and returns an orthonormal basis of the plane
  for :func:`loss_surface`:

  .. math::

    e_1 = v_0,\quad e_2 = \frac{v_1 - \cos\theta\, v_0}{\|v_1 - \cos\theta\, v_0\|},
    \qquad v(\alpha) = \cos(\alpha\theta)\, e_1 + \sin(\alpha\theta)\, e_2 .

  On a degenerate plane (``sin theta < 1e-8``) ``e2`` is a random unit
  direction orthogonal to ``e1`` (from ``key``).

  Args:
    loss_fn: ``params -> scalar``, the loss on the batch of interest.
    params: the point ``w``.
    rho: ascent radius.
    rho_max: probe radius.
    num_steps: ascent steps K.
    alphas: probe grid (default 0.0, 0.1, ..., 2.0).
    alpha: if given, use this alpha and skip the probes.
    grads: ``g_0`` if already computed (else ``jax.grad(loss_fn)(params)``).
    key: PRNG key for the degenerate-plane fallback (default key 0).
    probe_batch_size: see :func:`xsam_jax.xsam`.

  Returns:
    An :class:`XSAMPlane`.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: jnp.sum(p ** 4) + p[0] * p[1]
    >>> plane = xsam_directions(loss_fn, jnp.array([1.0, -0.5, 0.3]), rho=0.1, rho_max=0.2)
    >>> round(float(plane.sgd_xy[0]), 4)  # one ascent step: v0 is the g_0 direction
    1.0

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026, https://arxiv.org/abs/2603.10048
    (Fig. 1a).
  """
  validation.check_positive("rho", rho)
  validation.check_positive("rho_max", rho_max)
  num_steps = validation.check_static_int("num_steps", num_steps)
  grid = validation.check_grid("alphas", alphas)
  if probe_batch_size is not None:
    probe_batch_size = validation.check_static_int("probe_batch_size", probe_batch_size)
  probe = alpha is None
  if not probe:
    validation.check_finite("alpha", alpha)
  if key is None:
    key = jax.random.key(0)
  fields = _xsam_directions(
    loss_fn,
    params,
    grads,
    key,
    jnp.asarray(grid),
    1.0 if probe else alpha,
    rho,
    rho_max,
    num_steps=num_steps,
    probe=probe,
    probe_batch_size=probe_batch_size,
  )
  return XSAMPlane._make((*fields, float(rho), float(rho_max)))


def xsam_arrows(plane: XSAMPlane) -> dict[str, np.ndarray]:
  """The labelled in-plane unit directions of the paper's Fig. 1a.

  Args:
    plane: from :func:`xsam_directions`.

  Returns:
    ``{label: (x, y)}`` for SGD (``g_0``), SAM (``g_K``) and XSAM
    (``v(alpha*)``), as numpy 2-vectors in the ``(e1, e2)`` basis.

  Example:
    >>> import jax.numpy as jnp
    >>> plane = xsam_directions(lambda p: jnp.sum(p ** 4), jnp.array([1.0, 2.0, 3.0]),
    ...                         rho=0.1, rho_max=0.2)
    >>> sorted(xsam_arrows(plane))
    ['SAM $g_K$', 'SGD $g_0$', 'XSAM $v(\\\\alpha^*)$']

  References:
    Chen & Zhou, ICLR 2026 (Fig. 1a).
  """
  return {
    "SGD $g_0$": np.asarray(plane.sgd_xy, np.float64),
    "SAM $g_K$": np.asarray(plane.sam_xy, np.float64),
    r"XSAM $v(\alpha^*)$": np.asarray(plane.xsam_xy, np.float64),
  }


def plot_loss_surface(
  surface: LossSurface,
  *,
  arrows: Mapping[str, Any] | None = None,
  radius: float | None = None,
  ax: Axes | None = None,
  levels: int | Sequence[float] | np.ndarray = 30,
  title: str | None = None,
  xlabel: str = "$d_1$",
  ylabel: str = "$d_2$",
  colorbar: bool = True,
) -> Axes:
  """Draws a :class:`LossSurface` as filled contours, with optional arrows.

  matplotlib is imported here, not when the library is imported.

  Args:
    surface: from :func:`loss_surface`.
    arrows: ``{label: (x, y)}`` directions drawn from the origin, scaled by
      ``radius`` (e.g. :func:`xsam_arrows`).
    radius: arrow length and the radius of a dashed circle (the
      neighbourhood); default: 0.8 of the smaller half-extent of the grid,
      with no circle.
    ax: a matplotlib Axes (default: a new figure).
    levels: number of contour levels, or the increasing level values (to
      share one colour scale between panels).
    title, xlabel, ylabel: labels.
    colorbar: draw a colour bar.

  Returns:
    The matplotlib Axes.

  Example:
    >>> import jax.numpy as jnp
    >>> s = loss_surface(lambda p: jnp.sum(p ** 2), jnp.zeros(2), jnp.array([1.0, 0.0]),
    ...                  jnp.array([0.0, 1.0]))
    >>> ax = plot_loss_surface(s, arrows={"e1": (1.0, 0.0)}, radius=0.5)
    >>> ax.get_legend_handles_labels()[1]
    ['e1']
    >>> import matplotlib.pyplot as plt
    >>> plt.close(ax.figure)

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018;
    Chen & Zhou, ICLR 2026 (Fig. 1a).
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  xs, ys = np.asarray(surface.xs), np.asarray(surface.ys)
  losses = np.asarray(surface.losses, np.float64)
  if ax is None:
    _, ax = plt.subplots(figsize=(4.5, 4))
  finite = np.where(np.isfinite(losses), losses, np.nanmax(np.where(np.isfinite(losses), losses, np.nan)))
  cs = ax.contourf(xs, ys, finite, levels=levels, cmap="viridis")
  ax.contour(xs, ys, finite, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
  if colorbar:
    ax.figure.colorbar(cs, ax=ax, shrink=0.85, label="loss")
  ax.plot([0.0], [0.0], "w+", markersize=8)
  if radius is None:
    length = 0.8 * min(xs.max() - xs.min(), ys.max() - ys.min()) / 2
  else:
    length = float(radius)
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(length * np.cos(t), length * np.sin(t), "w--", linewidth=0.8)
  colors = ["#ff4040", "#ffa500", "#ffffff", "#40c0ff", "#ff80ff"]
  for i, (label, arrow) in enumerate((arrows or {}).items()):
    xy = np.asarray(arrow, np.float64)
    ax.annotate(
      "",
      xy=(length * xy[0], length * xy[1]),
      xytext=(0.0, 0.0),
      arrowprops=dict(arrowstyle="-|>", color=colors[i % len(colors)], lw=1.8),
    )
    ax.plot([], [], color=colors[i % len(colors)], lw=2, label=label)
  if arrows:
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
  ax.set_aspect("equal")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=9)
  return ax


def plot_xsam_plane(
  plane: XSAMPlane, surface: LossSurface, *, ax: Axes | None = None, title: str | None = None, **kwargs: Any
) -> Axes:
  """The paper's Fig. 1a: loss contours on XSAM's plane with the three directions.

  Draws ``surface`` (computed with ``plane.e1, plane.e2``), the circle of
  radius ``rho_max`` that the probes search, arrows of length ``rho_max``
  for SGD (``g_0``), SAM (``g_K``) and XSAM (``v(alpha*)``), and the ascent
  point ``w + d_K``.

  Args:
    plane: from :func:`xsam_directions`.
    surface: ``loss_surface(loss_fn, params, plane.e1, plane.e2, ...)``.
    ax: a matplotlib Axes (default: a new figure).
    title: plot title (default shows theta and alpha*).
    **kwargs: forwarded to :func:`plot_loss_surface`.

  Returns:
    The matplotlib Axes.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: jnp.sum(p ** 4) + p[0] * p[1]
    >>> w = jnp.array([1.0, -0.5, 0.3])
    >>> plane = xsam_directions(loss_fn, w, rho=0.1, rho_max=0.5)
    >>> s = loss_surface(loss_fn, w, plane.e1, plane.e2)
    >>> ax = plot_xsam_plane(plane, s)
    >>> print(ax.get_title())
    $\\theta$=0.01 rad, $\\alpha^*$=2.0
    >>> import matplotlib.pyplot as plt
    >>> plt.close(ax.figure)

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026 (Fig. 1a).
  """
  if title is None:
    title = rf"$\theta$={float(plane.theta):.2f} rad, $\alpha^*$={float(plane.alpha):.1f}"
  ax = plot_loss_surface(
    surface,
    arrows=xsam_arrows(plane),
    radius=plane.rho_max,
    ax=ax,
    title=title,
    xlabel="$e_1 = v_0$",
    ylabel="$e_2$ ($v_1$ orthogonalized)",
    **kwargs,
  )
  ascent = np.asarray(plane.ascent_xy, np.float64)
  ax.plot(
    [ascent[0]], [ascent[1]], "o", color="#ffa500", markeredgecolor="k", markersize=5, label="ascent point $w + d_K$"
  )
  ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
  return ax
