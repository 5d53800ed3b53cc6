"""XSAM (Chen & Zhou, ICLR 2026): SAM's gradient scale, the direction to the
probed loss maximum on a great circle of the (d_K, g_K) plane."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src import base, precision, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.batching import map_batched
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar

DEFAULT_ALPHAS: tuple = tuple(float(np.round(0.1 * i, 10)) for i in range(21))
"""The paper's alpha grid: 0.0, 0.1, ..., 2.0 (21 points)."""

DEGENERATE_SIN = 1e-8
"""Below this ``sin(theta)`` the plane is degenerate and XSAM uses ``v1``."""


class XSAMState(NamedTuple):
  """State of :func:`xsam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating). A call
      probes alpha when ``count % alpha_update_period == 0``.
    alpha: float32 interpolation factor in use (carried between probes).
    theta: float32 angle between ``v0`` and ``v1`` at the last call.
    grad_norm: float32 ``|g_K|``, the output's norm at the last call.
      (With ``m_sharpness``, ``theta`` and ``grad_norm`` are the replicas'
      means of their own values.)
    probe_losses: float32 ``(n,)`` losses of the last probe round, one per
      alpha of the grid (zeros before the first probe).
    max_loss: float32 loss at the probed maximum of the last probe round;
      NaN if every probe loss of that round was non-finite (alpha was then
      kept unchanged).
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  alpha: jax.Array
  theta: jax.Array
  grad_norm: jax.Array
  probe_losses: jax.Array
  max_loss: jax.Array
  perturbed_loss: jax.Array


def slerp_coefficients(alpha: jax.typing.ArrayLike, theta: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""Coefficients ``(a, b)`` with ``v(alpha) = a v0 + b v1`` on the great circle.

  .. math::

    a = \frac{\sin((1-\alpha)\theta)}{\sin\theta}, \quad
    b = \frac{\sin(\alpha\theta)}{\sin\theta},

  valid for any real ``alpha`` (``alpha > 1`` rotates past ``v1``). When
  ``sin(theta) < 1e-8`` ((anti)parallel ``v0``, ``v1``) it returns ``(0, 1)``,
  i.e. ``v1``, the SAM direction; no NaN is produced.

  Args:
    alpha: scalar or array of interpolation factors.
    theta: the angle between unit vectors ``v0`` and ``v1``, in ``[0, pi]``.

  Returns:
    ``(a, b)``, arrays broadcast from ``alpha`` and ``theta``.

  Example:
    >>> import jax.numpy as jnp
    >>> a, b = slerp_coefficients(0.5, jnp.pi / 2)
    >>> bool(jnp.allclose(a, b))
    True
  """
  return scaled_slerp_coefficients(alpha, theta, 1.0, 1.0)


def scaled_slerp_coefficients(
  alpha: jax.typing.ArrayLike, theta: jax.typing.ArrayLike, ka: jax.typing.ArrayLike, kb: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """``(ka a, kb b)`` for :func:`slerp_coefficients`' ``(a, b)``, each formed with its division last.

  A division is the one cheap scalar op XLA on CPU does not copy into every
  consumer: with the products before it, the coefficients reach each
  parameter leaf's kernel as one ready number, not as a chain of sines,
  selects and products recomputed per leaf (a third of the output kernel on
  a tree of small leaves). ``ka = kb = 1`` gives :func:`slerp_coefficients`
  bitwise.
  """
  num_a, num_b, den = _slerp_parts(alpha, theta, ka, kb)
  return num_a / den, num_b / den


def _slerp_parts(
  alpha: jax.typing.ArrayLike, theta: jax.typing.ArrayLike, ka: jax.typing.ArrayLike, kb: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(ka a sin(theta), kb b sin(theta), sin(theta))`` for :func:`slerp_coefficients`' ``(a, b)``,
  the last broadcast like ``alpha`` (1 where the plane is degenerate)."""
  theta = jnp.asarray(theta)
  alpha = jnp.asarray(alpha, dtype=theta.dtype) if jnp.issubdtype(theta.dtype, jnp.floating) else jnp.asarray(alpha)
  sin_t = jnp.sin(theta)
  degenerate = sin_t < DEGENERATE_SIN
  safe_sin = jnp.where(degenerate, jnp.ones_like(sin_t), sin_t)
  num_a = jnp.where(degenerate, 0.0, jnp.sin((1.0 - alpha) * theta)) * ka
  num_b = jnp.where(degenerate, 1.0, jnp.sin(alpha * theta)) * kb
  return num_a, num_b, jnp.broadcast_to(safe_sin, jnp.shape(num_a))


def plane_scalars(
  x0: PyTree, x1: PyTree, *, s0: tm.Inverse | None = None
) -> tuple[jax.Array, tm.Inverse, tm.Inverse, tm.Norm]:
  r"""The scalars of XSAM's plane spanned by ``x0`` and ``x1``, without forming it.

  With ``v0 = s0 x0`` and ``v1 = s1 x1`` for
  ``s0 = 1/|x0|``, ``s1 = 1/|x1|`` (a zero vector stays zero):

  .. math::

    \theta = \arccos \mathrm{clip}\Big(\textstyle\sum_i (s_0 x_{0,i})(s_1 x_{1,i}), -1, 1\Big),

  and ``theta = 0`` when ``v0`` vanishes (``x0 = 0``, or a given ``s0`` of
  0: no displacement), the degenerate plane whose ``v(alpha)`` is ``v1``.

  The unit vectors are never materialized: the cosine is one fused reduction
  over ``x0`` and ``x1`` (each element scaled before the product, so
  gradients near float32's largest value neither overflow nor flush to
  zero), and XSAM's rule folds ``s0``, ``s1`` into the scalar coefficients
  of its probes and output. This is what makes a non-probe XSAM step cost
  about a SAM step. ``s0`` and ``s1`` are
  :class:`~xsam_jax._src.tree_math.Inverse` pairs (a power of two and a
  mantissa, applied in that order).

  Args:
    x0, x1: pytrees of one structure (wide precision, see
      ``tree_math.tree_wide``).
    s0: ``v0``'s scale when the caller knows it without reading ``x0``
      (XSAM with K = 1: ``d_1 = c g_0``, so ``v0 = c / |d_1| g_0``);
      default ``1/|x0|``.

  Returns:
    ``(theta, s0, s1, |x1|)``: scalars in the trees' wide dtype, ``|x1|`` as
    a :class:`~xsam_jax._src.tree_math.Norm` (it may exceed the dtype's
    range when ``x1`` is near float32's largest value).

  Example:
    >>> import jax.numpy as jnp
    >>> theta, s0, s1, n1 = plane_scalars({"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 3.0])})
    >>> [round(float(x), 4) for x in (theta, s0.pow2 * s0.mant, s1.pow2 * s1.mant, n1.value)]
    [1.5708, 0.5, 0.3333, 3.0]
  """
  if s0 is None:
    n0 = tm.tree_norm_parts(x0)
    s0, vanishes = n0.inverse(), n0.r == 0
  else:
    vanishes = s0.mant == 0
  n1 = tm.tree_norm_parts(x1)
  s1 = n1.inverse()
  cos = tm.tree_scaled_vdot(s0, x0, s1, x1)
  # v0 = 0 (no displacement: a radius of 0, as on a warm-up's first step) spans no plane: theta = 0, the
  # degenerate plane's v(alpha) = v1, so the output is SAM's g_K = g_0 and the probes tie (alpha is kept).
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  return jnp.where(vanishes, jnp.zeros_like(theta), theta), s0, s1, n1


def xsam_plane(displacement: PyTree, g_k: PyTree) -> tuple[PyTree, PyTree, jax.Array, jax.Array]:
  """Unit spanning vectors and angle of XSAM's search plane.

  Args:
    displacement: ``d_K``, the ascent displacement.
    g_k: the gradient at the final ascent point.

  Returns:
    ``(v0, v1, theta, |g_K|)`` with ``v0 = d_K/(|d_K|+eps)``,
    ``v1 = g_K/(|g_K|+eps)`` (wide precision) and
    ``theta = arccos(clip(<v0, v1>, -1, 1))`` (see :func:`plane_scalars`).

  Example:
    >>> import jax.numpy as jnp
    >>> v0, v1, theta, g_norm = xsam_plane({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])})
    >>> round(float(theta), 4), round(float(g_norm), 4)  # pi/4, sqrt(2)
    (0.7854, 1.4142)
  """
  x0, x1 = tm.tree_wide(displacement), tm.tree_wide(g_k)
  theta, s0, s1, g_norm = plane_scalars(x0, x1)
  return s0.apply_tree(x0), s1.apply_tree(x1), theta, g_norm.value


def adaptive_xsam_plane(
  trace: AscentTrace,
) -> tuple[tuple[PyTree, PyTree], tuple[PyTree, PyTree], jax.Array, jax.Array]:
  r"""XSAM's plane in ASAM's rescaled coordinates (``xsam(..., adaptive=True)``).

  ASAM (Kwon et al. 2021) is SAM in the coordinates ``u = w / T`` with
  ``T = |w| + eta`` held fixed for the step: there the gradient is ``T g``,
  the ascent displacement is ``e_K = T^{-1} d_K = T c_K`` and the ball
  ``|e| <= rho`` is ASAM's neighbourhood. XSAM+ASAM is XSAM run in those
  coordinates and mapped back:

  .. math::

    v_0 = \frac{T c_K}{\|T c_K\|+\epsilon},\quad
    v_1 = \frac{T g_K}{\|T g_K\|+\epsilon},\quad
    \theta = \arccos \mathrm{clip}(\langle v_0, v_1\rangle, -1, 1),

  probes at ``w + rho_max T v(alpha)`` (on ASAM's neighbourhood of radius
  ``rho_max``), output ``|T g_K| T^{-1} v(alpha)`` (the pull-back of XSAM's
  output ``|T g_K| v(alpha)``, a gradient in the rescaled coordinates).
  ``T^{-1}`` is never formed: ``T^{-1} v_0 = c_K / (|T c_K| + eps)`` and
  ``T^{-1} v_1 = g_K / (|T g_K| + eps)``. With ``T = 1`` this is
  :func:`xsam_plane`.

  Args:
    trace: an adaptive :class:`~xsam_jax.building_blocks.AscentTrace` (``trace.scale`` set).

  Returns:
    ``((p0, p1), (o0, o1), theta, |T g_K|)``: probes are at
    ``w + rho_max (a p0 + b p1)`` and the output is
    ``|T g_K| (a o0 + b o1)`` for the slerp coefficients ``(a, b)`` of
    :func:`slerp_coefficients`; ``p = T v`` and ``o = T^{-1} v``.
  """
  bases, theta, (s0, s1), tg_norm = _adaptive_bases(trace)
  p0, p1 = bases.probe()
  probe_pair = (s0.apply_tree(p0), s1.apply_tree(p1))
  output_pair = (s0.apply_tree(bases.x0), s1.apply_tree(bases.x1))
  return probe_pair, output_pair, theta, tg_norm.value


class _Bases(NamedTuple):
  """The plane as unscaled trees: ``v0 = s0 x0``, ``v1 = s1 x1`` (output side),
  and a thunk building the probe side's trees (only inside the probe branch)."""

  x0: PyTree
  x1: PyTree
  probe: Callable[[], tuple[PyTree, PyTree]]


_BasesResult = tuple[_Bases, jax.Array, tuple[tm.Inverse, tm.Inverse], tm.Norm]
"""``(bases, theta, (s0, s1), output scale)``."""


def _plain_bases(trace: AscentTrace) -> _BasesResult:
  x1 = tm.tree_wide(trace.grads[-1])
  if trace.displacement_scale is None or trace.displacement_norm is None:  # set together, for K = 1
    x0 = tm.tree_wide(trace.displacement)
    theta, s0, s1, g_norm = plane_scalars(x0, x1)
  else:  # K = 1: d_1 = c u, so v0 = (c / (|d_1| + eps)) u; d_1 is never formed.
    x0 = tm.tree_wide(trace.first_direction)
    assert trace.first_norm is not None  # set with displacement_scale; c = displacement_scale / first_norm.scale
    d_norm = trace.displacement_norm
    guarded = d_norm + (d_norm == 0).astype(d_norm.dtype)  # |d_1|, or 1 for d_1 = 0 (v0 = 0)
    s0 = tm.Inverse(trace.first_norm.inv_scale, trace.displacement_scale / guarded)
    theta, s0, s1, g_norm = plane_scalars(x0, x1, s0=s0)
  return _Bases(x0, x1, lambda: (x0, x1)), theta, (s0, s1), g_norm


def _adaptive_bases(trace: AscentTrace) -> _BasesResult:
  scale = trace.scale
  times_t = lambda tree: jax.tree.map(lambda t, x: t * x.astype(t.dtype), scale, tree)
  c_k, g_k = trace.gradient_displacement, tm.tree_wide(trace.grads[-1])
  theta, s0, s1, tg_norm = plane_scalars(times_t(c_k), times_t(g_k))
  # Probes at w + rho_max T v: T v0 = s0 T^2 c_K, T v1 = s1 T^2 g_K.
  probe = lambda: (times_t(times_t(c_k)), times_t(times_t(g_k)))
  return _Bases(c_k, g_k, probe), theta, (s0, s1), tg_norm


def _combine(
  x0: PyTree,
  x1: PyTree,
  a: jax.Array,
  b: jax.Array,
  pow2: tuple[jax.Array, jax.Array] | None = None,
  out: jax.Array | None = None,
) -> PyTree:
  """``out * ((x0 p0) a + (x1 p1) b)`` leaf by leaf, in that order.

  ``p0``, ``p1`` (``pow2``) and ``out`` are powers of two, 1 unless a norm
  is beyond float32's range: applied in this order no intermediate
  overflows or flushes to zero wherever the result is representable. When
  they are omitted this is ``a x0 + b x1``.
  """

  def leaf(u: jax.Array, v: jax.Array) -> jax.Array:
    if pow2 is not None:
      u, v = u * pow2[0].astype(u.dtype), v * pow2[1].astype(v.dtype)
    r = a.astype(u.dtype) * u + b.astype(v.dtype) * v
    return r if out is None else r * out.astype(r.dtype)

  return jax.tree.map(leaf, x0, x1)


def probe_losses(
  loss_fn: LossFn,
  params: PyTree,
  v0: PyTree,
  v1: PyTree,
  theta: jax.typing.ArrayLike,
  alphas: jax.typing.ArrayLike,
  rho_max: Scalar,
  *,
  batch_size: int | None = None,
  axis_name: AxisName | None = None,
) -> jax.Array:
  """Losses ``L(w + rho_max * v(alpha_i))`` for every alpha of the grid, in one batched call.

  The perturbed parameters are built inside a ``jax.vmap`` over the grid
  (``batch_size=None``), or inside ``jax.lax.map(..., batch_size=)`` to bound
  memory to ``batch_size`` parameter copies.

  Args:
    loss_fn: ``params -> scalar`` on the current batch.
    params: the parameters ``w``.
    v0, v1, theta: the plane (see :func:`xsam_plane`).
    alphas: 1-D array of alphas.
    rho_max: probe radius.
    batch_size: None for one full ``vmap``; an int for chunked ``lax.map``.
    axis_name: if set, the losses are averaged over this axis.

  Returns:
    A 1-D array of losses, one per alpha.
  """
  return _probe_combinations(
    loss_fn, params, v0, v1, _slerp_parts(alphas, theta, 1.0, 1.0), rho_max, batch_size=batch_size, axis_name=axis_name
  )


def _probe_combinations(
  loss_fn: LossFn,
  params: PyTree,
  x0: PyTree,
  x1: PyTree,
  parts: tuple[jax.Array, jax.Array, jax.Array],
  rho_max: Scalar,
  *,
  batch_size: int | None,
  axis_name: AxisName | None,
  pow2: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Losses ``L(w + rho_max (a_i p0 x0 + b_i p1 x1))`` with ``a_i = num_a_i / den_i``, ``b_i = num_b_i / den_i``,
  batched over the probes (``parts = (num_a, num_b, den)`` from :func:`_slerp_parts`; ``pow2 = (p0, p1)``,
  default ``(1, 1)``; see :func:`_combine`)."""

  def one(data: tuple[jax.Array, ...]) -> jax.Array:
    # Each scalar of this probe comes out of a division, so XLA forms it once per probe instead of
    # copying a slice of the coefficient arrays into every parameter leaf's kernel (1 / (1 / p) = p
    # exactly for a power of two p).
    num_a, num_b, den, *inv_p = data
    p = (1.0 / inv_p[0], 1.0 / inv_p[1]) if inv_p else None
    return loss_fn(tm.tree_add_to_params(params, _combine(x0, x1, num_a / den, num_b / den, p), rho_max))

  # The powers of two travel with each probe's coefficients: a product with a loop-invariant
  # scalar would be hoisted out of jax.lax.map's loop by XLA, one kernel and one params-sized
  # buffer per leaf and vector.
  per_probe = () if pow2 is None else tuple(jnp.broadcast_to(1.0 / q, parts[0].shape) for q in pow2)
  losses = map_batched(one, (*parts, *per_probe), batch_size)
  if axis_name is not None:
    losses = jax.lax.pmean(losses, axis_name)
  return losses


def _plane_probe_losses(
  loss_fn: LossFn,
  params: PyTree,
  bases: _Bases,
  theta: jax.Array,
  scales: tuple[tm.Inverse, tm.Inverse],
  alphas: jax.Array,
  rho_max: Scalar,
  *,
  batch_size: int | None,
  axis_name: AxisName | None = None,
) -> jax.Array:
  """XSAM's probe losses ``L(w + rho_max v(alpha_i))`` on a plane from :func:`_plain_bases` or
  :func:`_adaptive_bases` (``scales = (s0, s1)``): ``v0``, ``v1`` are never formed."""
  (s0, s1), (p0, p1) = scales, bases.probe()
  return _probe_combinations(
    loss_fn,
    params,
    p0,
    p1,
    _slerp_parts(alphas, theta, s0.mant, s1.mant),
    rho_max,
    pow2=(s0.pow2, s1.pow2),
    batch_size=batch_size,
    axis_name=axis_name,
  )


def _warn_if_low_precision(loss_fn: LossFn, params: PyTree, dtype: Any) -> None:
  """Warns (at trace time) when the probe losses are computed in a float narrower than float32.

  Either the losses themselves are (``dtype``, the probes' output), or the
  program of ``loss_fn`` runs its matmuls or convolutions on narrower
  operands (bfloat16 activations under a float32 loss: the usual
  mixed-precision transformer), read from its traced program
  (:func:`~xsam_jax._src.precision.low_precision_contractions`).
  """
  narrow = [f"the probe losses are {jnp.dtype(dtype).name}"] if jnp.dtype(dtype).itemsize < 4 else []
  ops = precision.low_precision_contractions(loss_fn, params)
  if ops:
    shown = ", ".join(f"{name} in {d.name}" for name, d in ops)
    narrow.append(f"the loss computes its matmuls/convolutions in low precision ({shown})")
  if not narrow:
    return
  eps = max(float(jnp.finfo(d).eps) for d in [jnp.dtype(dtype), *(d for _, d in ops)])
  warnings.warn(
    f"xsam: {' and '.join(narrow)}, whose rounding (~{eps:.0e} relative) is as large as the differences "
    "between probes: alpha would follow rounding noise. Pass `probe_loss_fn=` to `update` (or to "
    "xsam_jax.flax.TrainState.apply_gradients): the same loss with the model run in float32 (a Linen model's "
    "`model.clone(dtype=jnp.float32)`, an NNX model through `xsam_jax.flax.value_grad_and_loss_fn(..., "
    'probe_dtype=jnp.float32)`); see docs/flax.md, "Mixed precision".',
    stacklevel=2,
  )


PROBE_MEMORY_FRACTION = 0.5
"""Share of the device's free memory that ``probe_batch_size="auto"`` lets the probes' parameter copies use."""


def tree_bytes(tree: PyTree) -> int:
  """Bytes of the arrays of ``tree``: the sum of ``leaf.size * itemsize`` (static shapes: tracers too)."""
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def free_memory_budget(device: jax.Device | None = None) -> int | None:
  """The probes' default memory budget: ``PROBE_MEMORY_FRACTION * (bytes_limit - bytes_in_use)``.

  Read from ``device.memory_stats()`` (default: the first local device of
  the default backend) when the step is traced. ``None`` where the device
  reports no ``bytes_limit`` (XLA's CPU client, some plugins).
  """
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):  # backends without statistics return None or raise (XLA: RuntimeError)
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return max(int(PROBE_MEMORY_FRACTION * free), 0)


def probe_chunk_for_budget(num_probes: int, param_bytes: int, budget: int) -> int | None:
  r"""The largest probe chunk ``c`` with ``c * param_bytes <= budget``, as a ``probe_batch_size``.

  .. math::

    c = \lfloor \mathrm{budget} / \mathrm{param\_bytes} \rfloor;
    \quad c \ge n \Rightarrow \mathrm{None}\ \text{(one vmap)};
    \quad c < 1 \Rightarrow 1\ \text{(a sequential scan)}.

  Example:
    >>> [probe_chunk_for_budget(21, 1000, budget) for budget in (5500, 10**6, 10)]
    [5, None, 1]
  """
  chunk = budget // max(param_bytes, 1)
  if chunk >= num_probes:
    return None
  return max(chunk, 1)


def resolve_probe_batch_size(
  probe_batch_size: int | str | None,
  params: PyTree = None,
  num_probes: int | None = None,
  *,
  memory_budget: int | None = None,
) -> int | None:
  """Resolves ``probe_batch_size="auto"`` when the step is traced; other values pass through.

  ``"auto"`` is the largest chunk whose parameter copies fit the budget
  (:func:`probe_chunk_for_budget`, with the bytes of ``params``:
  :func:`tree_bytes`): ``memory_budget`` if given, else, off CPU, the
  device's free memory (:func:`free_memory_budget`; ``1`` where the device
  does not report it). On CPU without ``memory_budget`` it is ``1``.
  Without ``params`` (no size to check: a label for the backend's
  strategy) it is ``1`` on CPU and ``None`` elsewhere.
  """
  if not isinstance(probe_batch_size, str):
    return probe_batch_size
  on_cpu = jax.default_backend() == "cpu"
  if params is None or num_probes is None:
    return 1 if on_cpu else None
  if memory_budget is None:
    memory_budget = None if on_cpu else free_memory_budget()
    if memory_budget is None:
      return 1
  return probe_chunk_for_budget(num_probes, tree_bytes(params), memory_budget)


ALPHA_REFINEMENTS = (None, "parabola")
"""Allowed values of ``xsam(..., alpha_refinement=)``."""


def _check_alpha_refinement(alpha_refinement: str | None, alpha_grid: np.ndarray, alphas: Sequence[float]) -> None:
  """Raises ``ValueError`` unless ``alpha_refinement`` suits the checked grid ``alpha_grid`` (of ``alphas``)."""
  if alpha_refinement not in ALPHA_REFINEMENTS:
    raise ValueError(f"`alpha_refinement` must be one of {ALPHA_REFINEMENTS}, got {alpha_refinement!r}.")
  if alpha_refinement is not None and not np.all(np.diff(alpha_grid) > 0):
    raise ValueError(
      f"`alphas` must be strictly increasing with `alpha_refinement={alpha_refinement!r}`, got {alphas!r}."
    )


def parabola_vertex(
  xm: jax.Array | float,
  x0: jax.Array | float,
  xp: jax.Array | float,
  ym: jax.Array | float,
  y0: jax.Array | float,
  yp: jax.Array | float,
) -> jax.Array:
  r"""Abscissa of the vertex of the parabola through three points, clipped to ``[xm, xp]``.

  For ``xm < x0 < xp`` and ``y0 >= ym, yp`` (``x0`` a grid maximum):

  .. math::

    x^* = x_0 - \frac{1}{2}\,
      \frac{(x_0-x_m)^2 (y_0-y_p) - (x_0-x_p)^2 (y_0-y_m)}
           {(x_0-x_m)(y_0-y_p) - (x_0-x_p)(y_0-y_m)},

  which lies in ``[xm, xp]`` (within half a step of ``x0`` on a uniform
  grid). A flat triple (zero denominator) returns ``x0``.

  Example:
    >>> round(float(parabola_vertex(0.0, 1.0, 2.0, 0.0, 1.0, 0.5)), 4)  # -(x-1.25)^2 fits
    1.1667
  """
  num = (x0 - xm) ** 2 * (y0 - yp) - (x0 - xp) ** 2 * (y0 - ym)
  den = (x0 - xm) * (y0 - yp) - (x0 - xp) * (y0 - ym)
  ok = den > 0
  vertex = x0 - 0.5 * num / jnp.where(ok, den, jnp.ones_like(den))
  return jnp.where(ok, jnp.clip(vertex, xm, xp), x0)


def select_alpha(
  losses: jax.Array, alphas: jax.Array, alpha_old: jax.typing.ArrayLike, *, refine: str | None = None
) -> tuple[jax.Array, jax.Array]:
  """The alpha of the first maximal finite loss; ``alpha_old`` if none is finite or all finite ones are equal.

  A round whose finite probe losses are all equal (a probe radius of 0, as
  at the start of a ``rho_max`` warm-up; a loss flat around ``w``) shows no
  direction of ascent: alpha is kept rather than set to the first grid
  point by the tie.

  With ``refine="parabola"`` (``alphas`` strictly increasing), an interior
  maximum whose two neighbours are finite is refined to the vertex of the
  parabola through the three points (:func:`parabola_vertex`); a maximum at
  either end of the grid is kept. ``max_loss`` is always the probed
  (grid) maximum.

  Returns:
    ``(alpha, max_loss)``; non-finite losses never win.

  Example:
    >>> import jax.numpy as jnp
    >>> grid = jnp.array([0.0, 0.5, 1.0, 1.5, 2.0])
    >>> losses = -(grid - 1.2) ** 2
    >>> [round(float(x), 4) for x in select_alpha(losses, grid, 1.0)]
    [1.0, -0.04]
    >>> round(float(select_alpha(losses, grid, 1.0, refine="parabola")[0]), 4)
    1.2
  """
  finite = jnp.isfinite(losses)
  masked = jnp.where(finite, losses, -jnp.inf)
  idx = jnp.argmax(masked)
  # All finite losses equal (a probe radius of 0, say, at the start of a warm-up): no direction leads.
  tied = jnp.all(jnp.where(finite, losses == masked[idx], True))
  any_finite = jnp.any(finite) & ~tied
  best = alphas[idx]
  if refine == "parabola" and alphas.shape[0] >= 3:
    lo, hi = jnp.maximum(idx - 1, 0), jnp.minimum(idx + 1, alphas.shape[0] - 1)
    interior = (idx > 0) & (idx < alphas.shape[0] - 1) & finite[lo] & finite[hi]
    safe = lambda y: jnp.where(interior, y, jnp.zeros_like(y))
    vertex = parabola_vertex(alphas[lo], best, alphas[hi], safe(losses[lo]), safe(losses[idx]), safe(losses[hi]))
    best = jnp.where(interior, vertex, best)
  alpha = jnp.where(any_finite, best.astype(jnp.float32), alpha_old)
  max_loss = jnp.where(jnp.any(finite), masked[idx], jnp.nan)
  return alpha, max_loss


def xsam(
  rho: optax.ScalarOrSchedule,
  rho_max: optax.ScalarOrSchedule,
  *,
  num_steps: int = 1,
  alphas: Sequence[float] = DEFAULT_ALPHAS,
  alpha_init: Scalar = 1.0,
  alpha_update_period: int | jax.Array | None = 100,
  alpha_refinement: str | None = None,
  probe_batch_size: int | str | None = "auto",
  probe_memory_budget: int | None = None,
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int = 1,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""XSAM: SAM's gradient scale along the probed direction of the loss maximum.

  After the K-step ascent (as in :func:`sam`) to ``w + d_K`` with gradient
  ``g_K`` there, XSAM spans a plane with

  .. math::

    v_0 = \frac{d_K}{\|d_K\|+\epsilon},\quad v_1 = \frac{g_K}{\|g_K\|+\epsilon},
    \quad \theta = \arccos \mathrm{clip}(\langle v_0, v_1\rangle, -1, 1),

    v(\alpha) = \frac{\sin((1-\alpha)\theta)\, v_0 + \sin(\alpha\theta)\, v_1}{\sin\theta},

  and outputs ``|g_K| v(alpha)``. On the calls where
  ``count % alpha_update_period == 0`` (the first call included) it probes
  ``L(w + rho_max v(alpha_i))`` for every ``alpha_i`` of the grid in one
  batched call and sets ``alpha`` to the first maximiser, used from that very
  call on. Other calls skip the probes entirely (``jax.lax.cond``). If
  ``sin(theta) < 1e-8`` the direction is ``v1`` (SAM's).

  Cost: K extra forward+backward passes per call (as multi-step SAM), plus
  ``len(alphas)`` forward passes on probe calls.

  Fixed-alpha relatives (the paper's baselines; no probes, so no
  ``len(alphas)`` forwards): ``alpha_update_period=None`` never probes and
  keeps ``alpha_init``; ``alpha_init=1.0`` is SAM; a tuned fixed alpha is a
  WSAM-like interpolation between the ascent direction and SAM's;
  ``alpha_init=0.0`` with ``num_steps=1`` is "SGD+", the plain gradient
  ``g_0``'s direction at SAM's scale ``|g_1|`` (see the examples).

  Adaptive neighbourhoods (ASAM, Kwon et al. 2021; the paper's best
  CIFAR-100 result is XSAM+ASAM): with ``adaptive=True`` the ascent steps
  are ``rho/K * T^2 g / |T g|`` with ``T = |w| + eta`` element-wise, and the
  plane, the probes and the output live in ASAM's rescaled coordinates
  ``w / T`` (see :func:`adaptive_xsam_plane`): ``v0`` and ``v1`` are the
  unit rescaled displacement ``T^{-1} d_K`` and rescaled gradient
  ``T g_K``, the probes are at ``w + rho_max T v(alpha)`` and the output is
  ``|T g_K| T^{-1} v(alpha)``; ``alpha = 1`` is exactly ASAM's output.
  ``state.theta`` is then the angle in the rescaled coordinates;
  ``state.grad_norm`` stays the plain ``|g_K|``.

  .. seealso:: :ref:`xsam-asam` (docs/methods.md), why the rescaled
     coordinates; :ref:`memory-aware-probes` (docs/performance.md), how
     ``probe_batch_size="auto"`` chooses and what each strategy costs.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-xsam>`.

  Args:
    rho: ascent radius, > 0 (the paper: 0.15 on CIFAR with ResNet-18), or an
      optax schedule of the step count (values >= 0; see
      :func:`xsam_jax.rho_schedule_from_lr`).
    rho_max: probe radius, > 0 (the paper: about ``2 * rho``), or a schedule.
    num_steps: ascent steps K, a Python int >= 1.
    alphas: non-empty 1-D grid of finite alphas to probe (default 0.0, 0.1,
      ..., 2.0). Ties go to the first.
    alpha_init: alpha before the first probe, finite (stored as float32).
    alpha_update_period: probe every this many calls (int >= 1); set it to
      the steps per epoch for the paper's schedule. ``None``: never probe.
    alpha_refinement: ``None`` (default, the paper): alpha is the best grid
      point. ``"parabola"`` (beyond the paper): the best interior grid point
      is refined to the vertex of the parabola through it and its two
      neighbours' probe losses (no extra forward passes; see
      :func:`select_alpha`), so a coarse grid can stand in for a fine one.
      Needs strictly increasing ``alphas``.
    probe_batch_size: how the probes run. ``"auto"`` (default): decided
      when the step is traced, from static shapes: off CPU, the largest
      chunk whose parameter copies fit the memory budget (``None`` if all
      ``len(alphas)`` probes fit, ``1`` if not even one does); on CPU,
      ``1`` unless ``probe_memory_budget`` is given (then the same rule).
      ``None``: all probes in one ``jax.vmap`` (``len(alphas)`` copies of
      the parameters in memory). An int: ``jax.lax.map(..., batch_size=)``
      with that many copies at a time; ``1`` is a sequential scan.
    probe_memory_budget: bytes that ``probe_batch_size="auto"`` may give
      the probes' parameter copies, an int >= 1; only with ``"auto"``.
      Default ``None``: off CPU, ``PROBE_MEMORY_FRACTION`` (0.5) of the
      first local device's free memory, read when the step is traced
      (``1`` where the device reports none); on CPU, a sequential scan. It
      counts parameter copies, not the probes' activations: lower it for a
      model whose activations dwarf its parameters.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): with
      ``axis_name`` the probe losses are averaged over the axis too, so
      every replica picks the same alpha; with ``m_sharpness`` each replica
      spans its own plane and probes along its own ``v(alpha)``, the probe
      losses are averaged for each alpha (one alpha on every replica), and
      the outputs ``|g_K| v(alpha)`` are averaged.
    adaptive, eta, adaptive_mask: ASAM's neighbourhood (:ref:`asam-options`),
      with the plane, the probes and the output in its rescaled coordinates
      (above); masked-out leaves have ``T = 1``.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); ``alpha_update_period``
      counts the steps that perturb.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`XSAMState` (:ref:`calling-update`). Mixed precision: probes
    compare losses that differ by ~1e-4 relative, below bfloat16's
    rounding; ``update(..., probe_loss_fn=f)`` evaluates the probes with
    ``f`` (e.g. the model run in float32 on the same batch) while the
    ascent uses ``loss_fn``. A probe loss computed below float32 (its
    output, or the operands of its matmuls and convolutions, read once from
    its traced program) triggers a warning when the step is traced.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = optax.chain(
    ...     xsam_jax.xsam(rho=0.05, rho_max=0.05, alpha_update_period=10),
    ...     optax.sgd(0.01, momentum=0.9))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> round(float(state[0].alpha), 6) in xsam_jax.DEFAULT_ALPHAS  # stored as float32
    True

    The fixed-alpha baselines never probe. A WSAM-like fixed alpha, and
    "SGD+" (alpha = 0, K = 1), whose output is ``g_0`` rescaled to ``|g_1|``:

    >>> wsam_like = xsam_jax.xsam(0.05, 0.05, alpha_update_period=None, alpha_init=0.5)
    >>> sgd_plus = xsam_jax.xsam(0.05, 0.05, alpha_update_period=None, alpha_init=0.0)
    >>> out, s = sgd_plus.update(grads, sgd_plus.init(params), params, loss_fn=loss_fn)
    >>> ratio = out["w"] / grads["w"]
    >>> bool(jnp.allclose(ratio, ratio[0])), bool(jnp.allclose(jnp.linalg.norm(out["w"]), s.grad_norm))
    (True, True)

    XSAM with ASAM's adaptive neighbourhood on the weights only:

    >>> xsam_asam = xsam_jax.xsam(0.5, 0.5, alpha_update_period=10, adaptive=True,
    ...                           adaptive_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026, https://arxiv.org/abs/2603.10048.
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks, https://arxiv.org/abs/2102.11600, 2021.
  """
  options = base.Options.from_arguments("xsam", locals())
  validation.check_rho("rho_max", rho_max)
  alpha_grid = validation.check_grid("alphas", alphas)
  validation.check_finite("alpha_init", alpha_init)
  validation.check_period("alpha_update_period", alpha_update_period)
  _check_alpha_refinement(alpha_refinement, alpha_grid, alphas)
  if isinstance(probe_batch_size, str) and probe_batch_size != "auto":
    raise ValueError(f'`probe_batch_size` must be "auto", None or an int >= 1, got {probe_batch_size!r}.')
  if probe_batch_size is not None and probe_batch_size != "auto":
    probe_batch_size = validation.check_static_int("probe_batch_size", probe_batch_size)
  if probe_memory_budget is not None:
    probe_memory_budget = validation.check_static_int("probe_memory_budget", probe_memory_budget)
    if probe_batch_size != "auto":
      raise ValueError(
        f'`probe_memory_budget` applies to `probe_batch_size="auto"` only, got probe_batch_size={probe_batch_size!r}.'
      )
  n = alpha_grid.size

  def init_fn(params: optax.Params) -> XSAMState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return XSAMState(
      count=base.zero_count(),
      alpha=jnp.asarray(alpha_init, jnp.float32),
      theta=zero,
      grad_norm=zero,
      probe_losses=jnp.zeros([n], jnp.float32),
      max_loss=zero,
      perturbed_loss=zero,
    )

  def check_state(state: XSAMState) -> None:
    if isinstance(state, XSAMState) and state.probe_losses.shape != (n,):
      raise ValueError(
        f"xsam.update: the state's probe_losses has shape {state.probe_losses.shape}, but this "
        f"xsam's `alphas` grid has {n} points: the state was made by an xsam with a different "
        "`alphas` grid. Build xsam with that grid, or re-create the state with `tx.init(params)`."
      )

  def rule(trace: AscentTrace, state: XSAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, XSAMState]:
    # v0 = s0 x0, v1 = s1 x1 are never formed: s0, s1 go into the scalar
    # coefficients, so a non-probe step reads x0 and x1 twice (cosine, output).
    bases, theta, (s0, s1), out_scale = (_adaptive_bases if adaptive else _plain_bases)(trace)
    g_norm = tm.tree_norm(trace.grads[-1]) if adaptive else out_scale.value
    alpha, losses, max_loss = state.alpha, state.probe_losses, state.max_loss
    if alpha_update_period is not None:
      grid = jnp.asarray(alpha_grid, theta.dtype)

      def do_probe(_: None) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch_size = resolve_probe_batch_size(probe_batch_size, params, n, memory_budget=probe_memory_budget)
        rho_max_now = base.at_step(rho_max, trace)
        new = _plane_probe_losses(
          loss_fn, params, bases, theta, (s0, s1), grid, rho_max_now, batch_size=batch_size, axis_name=axis_name
        )
        _warn_if_low_precision(loss_fn, params, new.dtype)
        new_alpha, new_max = select_alpha(new, grid, state.alpha, refine=alpha_refinement)
        return new_alpha, new.astype(jnp.float32), new_max.astype(jnp.float32)

      def keep(_: None) -> tuple[jax.Array, jax.Array, jax.Array]:
        return state.alpha, state.probe_losses, state.max_loss

      probe_now = state.count % alpha_update_period == 0
      alpha, losses, max_loss = jax.lax.cond(probe_now, do_probe, keep, None)
    # |g_K| (a v0 + b v1) = scale * ((r a s0) x0 + (r b s1) x1) for |g_K| = scale * r: finite
    # whenever the output is, even if |g_K| itself exceeds float32 (scale is 1 unless it does).
    a, b = scaled_slerp_coefficients(alpha.astype(theta.dtype), theta, out_scale.r * s0.mant, out_scale.r * s1.mant)
    output = _combine(bases.x0, bases.x1, a, b, (s0.pow2, s1.pow2), out_scale.scale)
    theta_f32, g_norm_f32 = options.replica_mean((theta.astype(jnp.float32), g_norm.astype(jnp.float32)))
    new_state = state._replace(
      alpha=alpha,
      theta=theta_f32,
      grad_norm=g_norm_f32,
      probe_losses=losses,
      max_loss=max_loss,
    )
    return output, new_state

  # carried=(): alpha needs no guard, select_alpha keeps it when a round's probes are all non-finite (as they are
  # whenever the ascent or the plane is), and the rest of the state is diagnostics.
  return base.transform(options, init_fn=init_fn, rule=rule, check_state=check_state, carried=())
