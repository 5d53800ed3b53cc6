"""Random weight perturbation, m-RWP (Li et al. 2024): the clean gradient mixed with the gradient at a
Gaussian perturbation whose scale follows each filter's norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import base, collectives, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class RWPState(NamedTuple):
  """State of :func:`rwp`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    key: the PRNG key of the next perturbation (at ``init``:
      ``jax.random.PRNGKey(seed)``, or the ``key`` given to :func:`rwp`, typed
      or raw as given); each step that perturbs splits it in two, draws
      its noise from one half and keeps the other here. A step whose output
      is not finite keeps the key (:ref:`non-finite-steps`), so a skipped bad
      batch does not change the later draws.
    perturbed_loss: float32 ``L(w + eps)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  key: jax.Array
  perturbed_loss: jax.Array


def _filter_norm_parts(w: jax.Array, filter_axis: int) -> tuple[jax.Array, jax.Array]:
  """``(r, e)`` with the filter norms of ``w`` equal to ``r 2^e``, broadcastable to ``w`` (see :func:`filter_norms`).

  Each filter is scaled by the power of two ``2^-e`` of its largest entry
  (exact), so no square overflows or flushes to zero and no reciprocal of
  a huge entry (subnormal, flushed to zero by XLA on CPU) is formed.
  """
  wide = w.astype(tm.wide_dtype(w.dtype))
  if w.ndim < 2:
    axes: tuple[int, ...] = tuple(range(w.ndim))
  else:
    keep = filter_axis % w.ndim
    axes = tuple(a for a in range(w.ndim) if a != keep)
  _, e = jnp.frexp(jnp.max(jnp.abs(wide), axis=axes, keepdims=True))
  r = jnp.sqrt(jnp.sum(jnp.square(jnp.ldexp(wide, -e)), axis=axes, keepdims=True))
  return r, e


def filter_norms(w: jax.Array, filter_axis: int = -1) -> jax.Array:
  """The norm of each filter of ``w``, broadcastable to ``w`` (wide precision).

  A leaf with two or more axes has one filter per index of ``filter_axis``
  (its output units: the last axis of a Flax ``Dense`` or ``Conv`` kernel,
  the first of a PyTorch weight); the norm runs over all its other axes.
  A leaf with fewer axes (a bias, a scale, a scalar) is one filter. Each
  filter is scaled by a power of two before squaring: exact for entries
  near float32's largest value (the norm is inf only where it exceeds that
  value), and exactly 0, not NaN, for a zero filter.

  Args:
    w: a real floating-point array.
    filter_axis: 0 or -1 (a Python int).

  Returns:
    An array with ``w``'s number of axes (size 1 on all but ``filter_axis``)
    in ``w``'s wide dtype (float32 or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> filter_norms(jnp.array([[3.0, 0.0], [4.0, 0.0]])).tolist()  # two output units (columns)
    [[5.0, 0.0]]
    >>> filter_norms(jnp.array([3.0, 4.0])).tolist()  # a bias: one filter
    [5.0]
  """
  r, e = _filter_norm_parts(w, filter_axis)
  return jnp.ldexp(r, e)


def _where(cond: Any, a: jax.Array, b: jax.Array) -> jax.Array:
  """``a`` where ``cond`` else ``b``: decided in Python for a Python bool, else ``jnp.where``."""
  if isinstance(cond, bool):
    return a if cond else b
  return jnp.where(cond, a, b)


def _equals(value: Any, target: float) -> Any:
  """``value == target``: a Python bool for a Python number, else a (possibly traced) bool array."""
  if isinstance(value, (int, float)):
    return value == target
  return jnp.asarray(value) == target


def _either(a: Any, b: Any) -> Any:
  """``a or b`` for Python bools, ``jnp.logical_or`` once either is an array."""
  if isinstance(a, bool) and isinstance(b, bool):
    return a or b
  if a is True or b is True:
    return True
  if a is False:
    return b
  if b is False:
    return a
  return jnp.logical_or(a, b)


def _check_key(key: Any, seed: int) -> None:
  """Raises ValueError unless ``key`` is one PRNG key (typed, shape ``()``, or raw, ``PRNGKey(0)``'s shape and
  dtype) and ``seed`` is left at 0."""
  if seed != 0:
    raise ValueError(f"rwp: pass `seed` or `key`, not both (got seed={seed} and a key).")
  raw = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if (
    not isinstance(key, (jax.Array, np.ndarray))
    or (typed and shape != ())
    or (not typed and (shape != raw.shape or dtype != raw.dtype))
  ):
    described = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(key)
    raise ValueError(
      f"`key` must be one PRNG key: jax.random.key(n) (shape ()) or jax.random.PRNGKey(n) (shape "
      f"{raw.shape}, {raw.dtype}), got {described}. For an int, pass `seed=` instead."
    )


def rwp(
  gamma: optax.ScalarOrSchedule,
  *,
  alpha: Scalar = 0.5,
  seed: int = 0,
  key: jax.Array | None = None,
  filter_axis: int = -1,
  axis_name: AxisName | None = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int = 1,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Random weight perturbation (m-RWP): the clean gradient mixed with the gradient at a filter-wise Gaussian point.

  With ``g_0`` the incoming gradient at ``w`` and, for every filter ``f``
  (see :func:`filter_norms`; a whole leaf for biases and scalars), noise
  drawn afresh on every step,

  .. math::

    \epsilon_f \sim \mathcal{N}\big(0,\ \gamma^2 \|w_f\|^2 I\big), \qquad
    g_\epsilon = \nabla L(w + \epsilon), \qquad
    \text{output} = (1 - \alpha)\, g_0 + \alpha\, g_\epsilon,

  the gradient of :math:`(1-\alpha) L(w) + \alpha L(w + \epsilon)`, an
  unbiased one-sample estimate of the gradient of the paper's mixed loss
  :math:`(1-\alpha) L(w) + \alpha\, \mathbb{E}_\epsilon L(w + \epsilon)`.
  ``alpha`` weights the *perturbed* gradient, as in the authors' code
  (their ``--alpha``): ``alpha=1`` is plain RWP (``g_eps`` alone, the
  incoming gradient unused), ``alpha=0`` or ``gamma=0`` gives exactly
  ``g_0`` (bitwise: the output is selected, not mixed). The output is a
  gradient for the base optimizer that follows in an ``optax.chain``.
  There is no ascent and no normalization: the perturbation is random and
  its size is relative to the weights (``gamma=0.01``: each entry of a
  filter moves by about 1% of the filter's norm), so no ``rho``.

  The noise: a step that perturbs splits ``state.key`` into ``(next,
  draw)``, keeps ``next`` and draws the ``i``-th perturbed leaf (in
  ``jax.tree.leaves`` order) as ``jax.random.normal(jax.random.fold_in(draw,
  i), shape)`` in the leaf's wide dtype (float32 or wider), times ``gamma``
  times its filter norms at ``w``. The same ``seed`` (or ``key``) gives the
  same run bitwise; steps that do not perturb leave the key alone.

  Cost: one extra forward+backward pass per call, ``g_eps`` (as SAM), so
  two gradient evaluations per step counting the loop's ``g_0``, plus one
  Gaussian draw per perturbed parameter (JAX's counter-based PRNG: a
  per-parameter cost that does not grow with the batch, small beside a
  gradient except for tiny models and batches on CPU). The
  authors' point is that the two are independent (``g_eps`` needs nothing
  from ``g_0``, unlike SAM's ascent): they compute them in parallel on two
  devices, each on its own half of the data, which costs one gradient's
  time. Here they run one after the other on one device; the ways to pay
  less:

  * **Two halves of the batch**, the authors' usage: take ``grads`` on one
    half and pass the loss of the other half as ``loss_fn``
    (``tx.update(jax.grad(loss)(params, batch_a), state, params,
    loss_fn=lambda p: loss(p, batch_b))``); the step then costs two
    half-batch gradients, about one full-batch gradient, SGD's cost, and
    uses the whole batch. This departs from the library's convention that
    ``grads`` and ``loss_fn`` share a batch, so leave ``check_updates``
    off.
  * **One gradient per step**, ``alpha=1``: the incoming gradient is not
    used, so the loop may pass zeros
    (``jax.tree.map(jnp.zeros_like, params)``) instead of computing ``g_0``;
    the step costs one gradient, at ``w + eps``, and ``state.perturbed_loss``
    reports its loss.

  Departures from the authors' code (github.com/nblt/RWP, commit cb0acb0,
  ``train_rwp_parallel.py``, ``train_rwp_imagenet.py``):

  * The two gradients are taken in one process, one after the other; the
    authors take them on two sets of GPUs (odd ranks perturbed, even ranks
    clean) and let DDP's gradient average mix them, with the losses scaled
    by ``2 alpha`` and ``2 (1 - alpha)``. The mix is the same; which data
    each gradient sees is the caller's choice (above).
  * Filters: PyTorch keeps output filters on a weight's first axis and the
    authors take norms over the others (``filter_axis=0`` here); Flax and
    Haiku kernels keep them last, hence the default ``filter_axis=-1``.
    Leaves with fewer than two axes use their whole norm, as the authors do
    for biases and BatchNorm parameters.
  * A zero filter gets no noise; the authors add ``1e-16`` to the norm of
    1-D leaves (noise of about ``gamma * 1e-16``, negligible), and their
    ``torch.normal`` with a zero standard deviation gives zero too.
  * The noise comes from JAX's counter-based PRNG (reproducible from
    ``seed``), not from PyTorch's global generator; its distribution is the
    same.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-rwp>`.

  Args:
    gamma: the noise scale relative to the filter norms, a finite real
      number >= 0 (the authors use 0.01 on CIFAR, 0.005 on ImageNet;
      0: the output is ``g_0``), or an optax schedule of the step count
      whose values are >= 0 (its value at step 0 is checked).
    alpha: the weight of the perturbed gradient, a real number in
      ``[0, 1]`` (the authors use 0.5; 1: plain RWP; 0: ``g_0``).
    seed: a Python int in ``[0, 2**63 - 1]``, the seed of the noise
      (``init`` starts from ``jax.random.PRNGKey(seed)``).
    key: instead of ``seed``, the noise's PRNG key itself: a typed key
      (``jax.random.key``, shape ``()``) or a raw one
      (``jax.random.PRNGKey``, ``uint32``), possibly traced. Runs ``vmap``-ed
      over seeds build one optimizer; pass each run's key (say
      ``jax.random.fold_in(base_key, run_seed)``) so that each draws its own
      noise, as it has its own initialisation. ``init`` stores it as given.
    filter_axis: the axis that indexes a weight's filters (output units),
      ``-1`` (Flax, Haiku: kernels ``(..., in, out)``) or ``0`` (PyTorch
      layouts: ``(out, in, ...)``); used for leaves with two or more axes.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): the
      key is in the state, so every replica draws the same noise; ``g_0``
      and ``g_eps`` are averaged over ``axis_name`` (with ``m_sharpness``
      each replica mixes its own two gradients, and the outputs are
      averaged).
    perturb_mask, perturb_every, perturb_start: which parameters and which
      steps perturb (:ref:`perturb-mask`, :ref:`perturb-every`); leaves
      left out get no noise, and their output is the same mix of their
      gradients at ``w`` and at ``w + eps`` (the gradient of the mixed
      loss); a step that does not perturb outputs ``g_0`` with no extra
      pass.
    check_updates: a first-step check of the chain order (:ref:`check-updates`);
      it fails by design with the two-halves usage.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`RWPState`; call its ``update`` as ``update(grads, state, params,
    loss_fn=loss_fn)`` (:ref:`calling-update`). With
    ``optax.inject_hyperparams`` list ``seed``, ``key`` and ``filter_axis`` in
    ``static_args``.

  Raises:
    ValueError: ``gamma`` negative or not finite, ``alpha`` outside
      ``[0, 1]``, ``seed`` outside ``[0, 2**63 - 1]``, ``key`` not a PRNG key
      (or given with a ``seed`` other than 0), ``filter_axis`` not 0 or -1,
      or a shared option out of its range.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(xsam_jax.rwp(0.01, alpha=0.5, seed=0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> int(state[0].count), bool(abs(float(state[0].perturbed_loss) - 14.25) < 0.5)  # L(w) = 14.25
    (1, True)
    >>> params = optax.apply_updates(params, updates)
    >>> same = xsam_jax.rwp(0.0)  # gamma = 0: exactly the incoming gradient
    >>> g = jax.grad(loss_fn)(params)
    >>> out, _ = same.update(g, same.init(params), params, loss_fn=loss_fn)
    >>> bool(jnp.array_equal(out["w"], g["w"]))
    True

  References:
    Li, Tao, Yan, Lei, Wu, Fang, He & Huang, Revisiting Random Weight
    Perturbation for Efficiently Improving Generalization, TMLR 2024,
    https://openreview.net/forum?id=VcuScWOJfl (earlier: Efficient
    Generalization Improvement Guided by Random Weight Perturbation,
    https://arxiv.org/abs/2211.11489; code: https://github.com/nblt/RWP).
  """
  # No ascent, so no rho or ASAM: the fixed values are unused (the perturbation below replaces the ascent).
  options = base.Options.from_arguments(
    "rwp", locals(), rho=1.0, num_steps=1, adaptive=False, eta=0.01, adaptive_mask=None
  )
  if callable(gamma):
    validation.check_rho("gamma", gamma)
  else:
    validation.check_nonnegative("gamma", gamma)
  validation.check_real("alpha", alpha, "a real number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
  seed = validation.check_seed(seed)
  if key is not None:
    _check_key(key, seed)
  if isinstance(filter_axis, bool) or filter_axis not in (0, -1):
    raise ValueError(
      f"`filter_axis` must be -1 (Flax/Haiku kernels, output units last) or 0 (PyTorch layouts, output "
      f"filters first), got {filter_axis!r}."
    )
  axis = int(filter_axis)

  def init_fn(params: optax.Params) -> RWPState:
    del params
    zero = jnp.zeros([], jnp.float32)
    start = jax.random.PRNGKey(seed) if key is None else key
    return RWPState(count=base.zero_count(), key=start, perturbed_loss=zero)

  def perturbation(
    options: base.Options, loss_fn: LossFn, params: PyTree, g0: PyTree, state: RWPState, count: jax.Array
  ) -> AscentTrace:
    where = options.perturb_mask
    sync = collectives.gradient_sync(options.axis_name, loss_fn, params, per_replica=options.m_sharpness)
    g0 = sync(g0)
    scale = gamma(count) if callable(gamma) else gamma
    _, draw = jax.random.split(state.key)
    moved = ascent_lib.restrict(params, where)
    leaves, treedef = jax.tree.flatten(moved)
    noise = []
    for i, w in enumerate(leaves):
      wide = tm.wide_dtype(w.dtype)
      z = jax.random.normal(jax.random.fold_in(draw, i), w.shape, wide)
      r, e = _filter_norm_parts(w, axis)
      noise.append(jnp.ldexp((jnp.asarray(scale).astype(wide) * r) * z, e))  # gamma |w_f| z, no overflow
    eps = jax.tree.unflatten(treedef, noise)
    point = ascent_lib.merge(where, tm.tree_add_to_params(moved, eps), params)
    loss, g_eps = jax.value_and_grad(loss_fn)(point)
    g_eps = sync(g_eps)
    plain = _either(_equals(scale, 0), _equals(alpha, 0))  # output g_0 exactly
    whole = _equals(alpha, 1)  # output g_eps exactly

    def mix(a0: jax.Array, a1: jax.Array) -> jax.Array:
      wide = tm.wide_dtype(a0.dtype)
      x0, x1 = a0.astype(wide), a1.astype(wide)
      a = jnp.asarray(alpha).astype(wide)
      # Behind a barrier, XLA cannot fold alpha = 0.5 into one constant c and rewrite c x0 + c x1 as
      # c (x0 + x1), whose sum overflows for gradients near float32's largest value.
      c0, c1 = jax.lax.optimization_barrier((1 - a, a))
      mixed = _where(whole, x1, c0 * x0 + c1 * x1)
      return _where(plain, x0, mixed)

    output = jax.tree.map(mix, g0, g_eps)
    # The trace's last gradient is the output: the gradient of the mixed loss, which base merges into the
    # leaves outside perturb_mask too.
    return AscentTrace(grads=(g0, output), displacement=eps, first_direction=eps, losses=(loss,))

  def rule(trace: AscentTrace, state: RWPState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, RWPState]:
    del params, loss_fn
    key, _ = jax.random.split(state.key)
    return trace.grads[-1], state._replace(key=key)

  return base.transform(options, init_fn=init_fn, rule=rule, carried=("key",), perturbation=perturbation)
