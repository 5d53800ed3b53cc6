"""XSAM's search plane at the parameters (the paper's Fig. 1a), from XSAM's own plane code."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src import xsam as xsam_lib
from xsam_jax._src.sharpness.directions import _gaussian_like
from xsam_jax._src.types import LossFn, PyTree, Scalar


class XSAMPlane(NamedTuple):
  """XSAM's search plane at ``params``, as computed by :func:`xsam_directions`.

  The plane is spanned by ``v0`` (to the ascent point) and ``v1`` (the
  gradient there); ``e1, e2`` is its orthonormal basis with ``e1 = v0``.
  The ``*_xy`` fields are 2-vectors in that basis. XSAM's probes are at
  ``w + rho_max (a v0 + b v1)`` for the slerp coefficients ``(a, b)`` of
  ``xsam_jax.building_blocks.slerp_coefficients``, i.e. on the circle of radius ``rho_max``
  of the ``(e1, e2)`` coordinates.

  With ``adaptive=True`` the plane lives in ASAM's rescaled coordinates
  ``w / T``, ``T = |w| + eta`` (see ``xsam_jax.building_blocks.adaptive_xsam_plane``): the
  unit vectors, the angle and the coordinates are those of that space, and
  the pytrees ``e1, e2, v0, v1`` are their images ``T e`` in the parameter
  space, the displacements that :func:`loss_surface` and the probes add to
  ``w`` (orthonormal in the rescaled norm ``|T^{-1} x|``, not in the
  Euclidean one). Gradients enter the plane as ``T g`` (their rescaled form).

  Attributes:
    e1, e2: basis pytrees (float32 or wider); orthonormal unless adaptive.
    v0, v1: XSAM's spanning vectors: ``xsam_jax.building_blocks.xsam_plane``'s unit ``v0``,
      ``v1``, or the probe pair of ``xsam_jax.building_blocks.adaptive_xsam_plane`` when
      adaptive.
    theta: angle between ``v0`` and ``v1``.
    alpha: the interpolation factor used for ``xsam_xy`` (probed, or given).
    grad_norm: ``|g_K|`` (the plain norm, also when adaptive).
    probe_losses: ``L(w + rho_max v(alpha_i))`` over ``alphas`` (zeros when
      ``alpha`` was given).
    alphas: the probed grid.
    sgd_xy: unit ``g_0`` projected onto the plane (``(1, 0)`` for one
      ascent step, where ``v0`` is the ``g_0`` direction; shorter than 1 for
      ``K > 1`` when ``g_0`` leaves the plane).
    sam_xy: ``v1``, i.e. ``(cos theta, sin theta)``.
    xsam_xy: ``v(alpha)``, i.e. ``(cos(alpha theta), sin(alpha theta))``
      (``sam_xy`` on a degenerate plane): the direction of XSAM's update.
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


@functools.partial(
  jax.jit,
  static_argnames=("loss_fn", "num_steps", "probe", "refine", "adaptive", "adaptive_mask", "probe_batch_size"),
)
def _xsam_directions(
  loss_fn: LossFn,
  params: PyTree,
  g0: PyTree | None,
  key: jax.Array,
  alphas: jax.Array,
  alpha: Scalar,
  rho: Scalar,
  rho_max: Scalar,
  eta: Scalar,
  *,
  num_steps: int,
  probe: bool,
  refine: str | None,
  adaptive: bool,
  adaptive_mask: tuple[bool, ...] | None,
  probe_batch_size: int | None,
) -> XSAMPlane:
  loss_fn = validation.scalar_loss("xsam_directions", loss_fn)
  if g0 is None:
    g0 = jax.grad(loss_fn)(params)
  mask = None if adaptive_mask is None else jax.tree.unflatten(jax.tree.structure(params), adaptive_mask)
  # One probing xsam update, by xsam's own code (its rule's calls, with the state's alpha = `alpha`).
  trace = ascent_lib.ascent(
    loss_fn, params, g0, rho=rho, num_steps=num_steps, adaptive=adaptive, eta=eta, adaptive_mask=mask
  )
  bases, theta, (s0, s1), out_scale = (xsam_lib._adaptive_bases if adaptive else xsam_lib._plain_bases)(trace)
  grid = alphas.astype(theta.dtype)
  alpha = jnp.asarray(alpha, jnp.float32)
  losses = jnp.zeros(grid.shape, theta.dtype)
  if probe:
    losses = xsam_lib._plane_probe_losses(
      loss_fn, params, bases, theta, (s0, s1), grid, rho_max, batch_size=probe_batch_size
    )
    alpha, _ = xsam_lib.select_alpha(losses, grid, alpha, refine=refine)
  # The plane. T x maps the output side (T^{-1} v) and gradients to the rescaled coordinates, and
  # those to the parameter space; it is the identity unless adaptive.
  rescale: Callable[[PyTree], PyTree] = lambda tree: tree
  if trace.scale is not None:
    rescale = lambda tree: jax.tree.map(lambda t, x: t * x.astype(t.dtype), trace.scale, tree)
  v0, v1 = rescale(s0.apply_tree(bases.x0)), rescale(s1.apply_tree(bases.x1))
  # e2: v1 with its v0 component removed; a random direction on a degenerate plane. The second
  # projection ("twice is enough") keeps e2 orthogonal to e1 when v1 is nearly parallel to v0:
  # the first leaves a residual of rounding size whose own error along v0 is as large as it is,
  # and whether cos(theta) rounds to exactly 1 (the degenerate branch) depends on the compiler.
  resid = tm.tree_lincomb(1.0, v1, -jnp.cos(theta), v0)
  resid = tm.tree_lincomb(1.0, resid, -tm.tree_vdot(resid, v0), v0)
  fallback = _gaussian_like(key, v0)
  fallback = tm.tree_lincomb(1.0, fallback, -tm.tree_vdot(fallback, v0), v0)
  rounding = jnp.sqrt(jnp.finfo(theta.dtype).eps)  # |v1| = 1: a shorter residual is rounding error
  degenerate = (jnp.sin(theta) < xsam_lib.DEGENERATE_SIN) | (tm.tree_norm(resid) < rounding)
  e2, _ = tm.tree_normalize(jax.tree.map(lambda r, f: jnp.where(degenerate, f, r), resid, fallback))

  def coords(tree: PyTree) -> jax.Array:
    return jnp.stack([tm.tree_vdot(tree, v0), tm.tree_vdot(tree, e2)])

  coef_a, coef_b = xsam_lib.slerp_coefficients(alpha.astype(theta.dtype), theta)
  sam_xy = coords(v1)
  return XSAMPlane(
    e1=rescale(v0),
    e2=rescale(e2),
    v0=rescale(v0),
    v1=rescale(v1),
    theta=theta,
    alpha=alpha,
    grad_norm=tm.tree_norm(trace.grads[-1]) if adaptive else out_scale.value,  # as xsam's state.grad_norm
    probe_losses=losses,
    alphas=grid,
    sgd_xy=coords(tm.tree_normalize(rescale(g0))[0]),
    sam_xy=sam_xy,
    xsam_xy=coef_a * jnp.stack([jnp.ones_like(theta), jnp.zeros_like(theta)]) + coef_b * sam_xy,
    ascent_xy=coords(rescale(trace.gradient_displacement)),  # T^{-1} d_K = T c_K
    rho=0.0,  # placeholders: xsam_directions sets the radii as Python floats
    rho_max=0.0,
  )


def xsam_directions(
  loss_fn: LossFn,
  params: PyTree,
  *,
  rho: Scalar,
  rho_max: Scalar,
  num_steps: int = 1,
  alphas: Sequence[float] = xsam_lib.DEFAULT_ALPHAS,
  alpha: Scalar | None = None,
  alpha_refinement: str | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  grads: PyTree | None = None,
  key: jax.Array | None = None,
  probe_batch_size: int | None = None,
) -> XSAMPlane:
  r"""Recomputes XSAM's plane, ``v0``, ``v1`` and its chosen direction at ``params``.

  Runs XSAM's own code for what one probing :func:`xsam_jax.xsam` update
  with the same options does (docs/algorithm.md): the ``K``-step ascent
  (``xsam_jax.building_blocks.ascent``) to ``w + d_K``, the plane
  ``v0, v1, theta`` (``xsam_jax.building_blocks.xsam_plane``, or
  ``xsam_jax.building_blocks.adaptive_xsam_plane`` with ``adaptive=True``), and (unless
  ``alpha`` is given) the probes :math:`L(w + \rho_{max} v(\alpha_i))` and
  their first maximiser :math:`\alpha^*` (refined with
  ``alpha_refinement="parabola"``); so ``alpha`` and the direction of
  ``xsam_xy`` are those of the update. It returns an orthonormal basis of
  the plane for :func:`loss_surface`:

  .. math::

    e_1 = v_0,\quad e_2 = \frac{v_1 - \cos\theta\, v_0}{\|v_1 - \cos\theta\, v_0\|},
    \qquad v(\alpha) = \cos(\alpha\theta)\, e_1 + \sin(\alpha\theta)\, e_2 .

  On a degenerate plane ``e2`` is a random unit direction orthogonal to
  ``e1`` (from ``key``): when ``sin theta < 1e-8``, or when ``v1``'s residual
  off ``v0`` (projected twice) is shorter than ``sqrt(eps)`` of the dtype, the
  size of rounding error (in float32 ``theta`` itself cannot come out below
  about ``3.5e-4`` from ``arccos``, so near-parallel ``v0``, ``v1`` meet
  this test, not the first). With ``adaptive=True`` all
  of this happens in ASAM's rescaled coordinates (see :class:`XSAMPlane`).

  Args:
    loss_fn: ``params -> scalar``, the loss on the batch of interest.
    params: the point ``w``.
    rho: ascent radius.
    rho_max: probe radius.
    num_steps: ascent steps K.
    alphas: probe grid (default 0.0, 0.1, ..., 2.0).
    alpha: if given, use this alpha and skip the probes.
    alpha_refinement: ``None`` or ``"parabola"``, as in :func:`xsam_jax.xsam`.
    adaptive, eta, adaptive_mask: ASAM's neighbourhood, as in
      :func:`xsam_jax.xsam`.
    grads: ``g_0`` if already computed (else ``jax.grad(loss_fn)(params)``).
    key: PRNG key for the degenerate-plane fallback (default key 0).
    probe_batch_size: see :func:`xsam_jax.xsam` (None or an int).

  Returns:
    An :class:`XSAMPlane`.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: jnp.sum(p ** 4) + p[0] * p[1]
    >>> plane = xsam_directions(loss_fn, jnp.array([1.0, -0.5, 0.3]), rho=0.1, rho_max=0.2)
    >>> round(float(plane.sgd_xy[0]), 4)  # one ascent step: v0 is the g_0 direction
    1.0
    >>> asam = xsam_directions(loss_fn, jnp.array([1.0, -0.5, 0.3]), rho=0.1, rho_max=0.2, adaptive=True)
    >>> round(float(asam.sgd_xy[0]), 4)  # and T g_0's direction in ASAM's coordinates
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
  xsam_lib._check_alpha_refinement(alpha_refinement, grid, alphas)
  adaptive = validation.check_bool("adaptive", adaptive)
  validation.check_nonnegative("eta", eta)
  mask = validation.check_adaptive_mask("xsam_directions", adaptive_mask, params) if adaptive else None
  if probe_batch_size is not None:
    probe_batch_size = validation.check_static_int("probe_batch_size", probe_batch_size)
  probe = alpha is None
  if not probe:
    validation.check_finite("alpha", alpha)
  if key is None:
    key = jax.random.key(0)
  plane = _xsam_directions(
    loss_fn,
    params,
    grads,
    key,
    jnp.asarray(grid),
    1.0 if probe else alpha,  # xsam's alpha_init: kept if no probe loss is finite
    rho,
    rho_max,
    eta,
    num_steps=num_steps,
    probe=probe,
    refine=alpha_refinement,
    adaptive=adaptive,
    adaptive_mask=None if mask is None else tuple(jax.tree.leaves(mask)),
    probe_batch_size=probe_batch_size,
  )
  return plane._replace(rho=float(rho), rho_max=float(rho_max))
