"""LookSAM (Liu et al. 2022): SAM's gradient every k-th step; in between, the
plain gradient plus the last SAM step's component orthogonal to it, with no
extra pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.gsam import orthogonal_part
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar

PARALLEL_ULPS = 1024
"""``g_v`` counts as zero when ``|g_v| <= PARALLEL_ULPS * eps * |g_s|`` (``eps``: the reductions' machine epsilon).

A ``g_v`` that small is the rounding of ``g_s - (its projection)`` for
parallel ``g_0`` and ``g_s``, not a direction; rescaled to ``alpha |g_0|``
it would be noise of the update's size."""


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    g_v: the component of SAM's gradient ``g_s`` orthogonal to ``g_0`` at
      the last step that perturbed, a pytree like params in wide precision
      (float32 or wider); zeros before the first (and when ``g_s`` and
      ``g_0`` are parallel to rounding). With ``m_sharpness``, the
      replicas' mean.
    cosine: float32 cosine between ``g_0`` and ``g_s`` at the last step that
      perturbed (diagnostic; ``|g_v| = |g_s| sqrt(1 - cosine^2)``); 0
      before the first.
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  g_v: PyTree
  cosine: jax.Array
  perturbed_loss: jax.Array


def looksam(
  rho: optax.ScalarOrSchedule,
  *,
  k: int = 5,
  alpha: Scalar = 0.7,
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM's gradient every ``k`` steps, reused in between at the cost of SGD.

  On every ``k``-th call (``count % k == 0``, the first call included) it
  takes SAM's step: with ``g_0`` the incoming gradient at ``w``, ``g_s =
  \nabla L(w + rho g_0 / (|g_0| + eps))`` is the output, and its component
  orthogonal to ``g_0`` is kept in the state,

  .. math::

    g_v = g_s - \|g_s\|\, \cos\theta\, \hat g_0, \qquad
    \cos\theta = \langle \hat g_s, \hat g_0 \rangle, \quad \hat g = \frac{g}{\|g\| + \epsilon} .

  On the other calls no extra pass runs (``jax.lax.cond``): the output is
  the plain gradient plus that component, rescaled to ``alpha`` times the
  gradient's norm,

  .. math::

    \text{output} = g_0 + \alpha\, \frac{\|g_0\|}{\|g_v\| + \epsilon}\, g_v .

  This is the paper's Algorithm 1: ``g_v``, the part of SAM's gradient that
  steers towards flatter regions (its Figure 3), changes slowly over
  iterations, so it is reused; the norm ratio keeps the reused part in
  proportion to the current gradient. ``k=1`` is SAM, exactly. Until the
  first step that perturbs (with ``perturb_start``), and whenever ``g_s``
  is parallel to ``g_0`` to rounding (``|g_v| <= 1024 eps |g_s|``, ``eps``
  the reductions' machine epsilon: :data:`PARALLEL_ULPS`), ``g_v = 0`` and
  the output is ``g_0``.

  Norms and the cosine are global over the (perturbed) parameters, as
  Algorithm 1 writes them; ``adaptive=True`` moves the ascent point only.

  .. seealso:: :ref:`paper-differences` (docs/methods.md): per-tensor
     versions, Look-LayerSAM, the rounding guard.

  Cost: one extra forward+backward pass on one call in ``k`` (the first of
  each period), plus a dot product and three norms over the parameters;
  on the others, two norms and one combination over the parameters. The
  state holds one parameter-sized ``g_v``.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-looksam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    k: the period of SAM's steps, an int >= 1 (the paper's headline
      setting is 5, "LookSAM-5"; 1: SAM). A Python int, or an int array
      (e.g. under ``optax.inject_hyperparams``).
    alpha: weight of the reused component relative to ``|g_0|``, a finite
      real number >= 0 (0: SAM on one step in ``k``, SGD on the others).
      The default 0.7 is the value public implementations' examples use
      with ``k = 5``; tune it with ``k``.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): the
      gradients are the replicas' mean before the decomposition, and so is
      ``g_0`` on the steps that reuse ``g_v``; with ``m_sharpness`` each
      replica ascends and decomposes its own gradients, and the outputs and
      ``g_v`` are averaged.
    adaptive, eta, adaptive_mask: ASAM's neighbourhood for the ascent step
      (:ref:`asam-options`); the decomposition stays in plain coordinates.
    perturb_mask, perturb_start: the training controls (:ref:`perturb-mask`,
      :ref:`perturb-every`): ``g_v``, its norm and the cosine are taken over
      the perturbed leaves (the others get their gradient at the perturbed
      point, or ``g_0`` on the steps that reuse ``g_v``), and the period
      starts at ``perturb_start`` (before it, the output is ``g_0``). The
      period itself is ``k`` (the factory's ``perturb_every``).
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LookSAMState`; call ``update(grads, state, params,
    loss_fn=loss_fn)`` on every step (:ref:`calling-update`; ``loss_fn`` is
    only evaluated on the steps that perturb).

  Raises:
    ValueError: ``k`` not an int >= 1, ``alpha`` not a finite real number
      >= 0, or any shared option out of its range (naming the argument).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = optax.chain(xsam_jax.looksam(0.1, k=5, alpha=0.7), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> for _ in range(3):  # call 0 perturbs (g_v kept); calls 1 and 2 reuse g_v
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> int(state[0].count), bool(jnp.any(state[0].g_v["w"] != 0))
    (3, True)

  References:
    Liu, Mai, Chen, Hsieh & You, Towards Efficient and Scalable
    Sharpness-Aware Minimization, CVPR 2022, https://arxiv.org/abs/2203.02714.
  """
  validation.check_period("k", k, allow_none=False)  # before the options: named `k` there, not `perturb_every`
  validation.check_nonnegative("alpha", alpha)
  options = base.Options.from_arguments("looksam", locals(), num_steps=1, perturb_every=k)

  def init_fn(params: optax.Params) -> LookSAMState:
    g_v = jax.tree.map(lambda w: jnp.zeros(w.shape, tm.wide_dtype(w.dtype)), params)
    # Separate buffers: a training loop that donates the state must not see one buffer twice.
    zero = lambda: jnp.zeros([], jnp.float32)
    return LookSAMState(count=base.zero_count(), g_v=g_v, cosine=zero(), perturbed_loss=zero())

  def rule(trace: AscentTrace, state: LookSAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, LookSAMState]:
    del params, loss_fn
    g_s = trace.grads[-1]
    g_v, n_s, _, cosine = orthogonal_part(g_s, trace.grads[0])
    n_v = tm.tree_norm_parts(g_v)
    # |g_v| <= tol |g_s|, compared as mantissas and a ratio of powers of two (either norm may exceed float32).
    tol = PARALLEL_ULPS * jnp.finfo(n_s.r.dtype).eps
    parallel = n_v.r * (n_v.scale / n_s.scale) <= tol * n_s.r
    g_v = jax.tree.map(lambda v: jnp.where(parallel, jnp.zeros_like(v), v), g_v)
    g_v, cosine = tm.tree_cast_like(g_v, state.g_v), cosine.astype(jnp.float32)
    g_v, cosine = options.replica_mean((g_v, cosine))  # the state: one on every replica
    return g_s, state._replace(g_v=g_v, cosine=cosine)

  def skip_rule(g_0: PyTree, state: LookSAMState, params: PyTree) -> tuple[PyTree, LookSAMState]:
    del params
    g_0 = tm.tree_wide(g_0)  # the replicas' mean with axis_name (the factory averages it)
    n_0, n_v = tm.tree_norm_parts(g_0), tm.tree_norm_parts(state.g_v)
    # alpha |g_0| g_v / (|g_v| + eps), as ((alpha r_0) (g_v / (|g_v| + eps))) scale_0: finite for any norms.
    reused = tm.tree_scale_by_norm(n_0, alpha, n_v.inverse().apply_tree(state.g_v))
    return jax.tree.map(lambda g, v: g + v.astype(g.dtype), g_0, reused), state

  return base.transform(options, init_fn=init_fn, rule=rule, skip_rule=skip_rule, carried=("g_v",))
