"""Eigenvector-corrected SAM (Duan, Chen & Guan 2026, called "X-SAM" there;
not the XSAM of Chen & Zhou that :func:`xsam_jax.xsam` implements): the SAM
gradient with its component along the Hessian's dominant eigenvector
suppressed."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, collectives, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.hvp import hessian_vector_product
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class EigenSAMState(NamedTuple):
  """State of :func:`eigen_sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating). A call
      refreshes the eigenvector when ``count % eig_update_period == 0``.
    eigvec: the current estimate ``v`` of the dominant Hessian eigenvector,
      a pytree like params in wide precision (float32 or wider), global
      norm 1; the deterministic start vector until the first refresh.
    eigenvalue: float32 Rayleigh quotient ``<v, H v>`` of the last refresh.
    has_eigvec: bool, True once a refresh produced a finite, nonzero
      ``H v``; until then the output is plain SAM.
    grad_norm: float32 ``|g_adv|``, the norm of the output (diagnostic).
    cosine: float32 ``<u, v>`` between the unit SAM gradient and ``v`` at
      the last call (the paper's measure; diagnostic).
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  eigvec: PyTree
  eigenvalue: jax.Array
  has_eigvec: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  perturbed_loss: jax.Array


def _unit_or(tree: PyTree, fallback: PyTree) -> tuple[PyTree, jax.Array]:
  """``(tree / |tree|, True)``, or ``(fallback, False)`` if ``|tree|`` is 0 or not finite.

  No eps here: :func:`tree_math.tree_norm_parts` is exact at any scale, and
  the tree is divided by it as a power of two and a mantissa, so the result
  is a unit vector whenever the norm is positive, from 1e-38 up to trees
  whose norm exceeds float32's largest value.
  """
  wide = tm.tree_wide(tree)
  norm = tm.tree_norm_parts(wide)  # |tree| = scale * r: no overflow to inf for a finite tree near float32's max
  ok = (norm.r > 0) & jnp.isfinite(norm.r)
  inverse = tm.Inverse(norm.inv_scale, 1.0 / jnp.where(ok, norm.r, jnp.ones_like(norm.r)))
  unit = jax.tree.map(lambda x, f: jnp.where(ok, inverse.apply(x), f.astype(x.dtype)), wide, fallback)
  return unit, ok


def initial_eigvec(params: PyTree, seed: int = 0) -> PyTree:
  """The deterministic start of the power iteration: a unit Gaussian vector.

  Each leaf is drawn from ``jax.random.normal`` with a key folded from
  ``seed`` and the leaf's position, then the whole tree is normalized to
  global norm 1. A random start (unlike, say, normalized ones) is almost
  surely not orthogonal to the dominant eigenvector, so the power iteration
  can find it.

  Args:
    params: the parameters (only the structure, shapes and dtypes are used).
    seed: a Python int >= 0.

  Returns:
    A pytree like ``params`` in wide precision with global norm 1.

  Example:
    >>> import jax.numpy as jnp
    >>> v = initial_eigvec({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    >>> round(float(jnp.sqrt(jnp.sum(v["a"] ** 2) + jnp.sum(v["b"] ** 2))), 5)
    1.0
  """
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.PRNGKey(seed)
  draws = [jax.random.normal(jax.random.fold_in(key, i), x.shape, tm.wide_dtype(x.dtype)) for i, x in enumerate(leaves)]
  unit, _ = _unit_or(jax.tree.unflatten(treedef, draws), jax.tree.unflatten(treedef, draws))
  return unit


def power_iteration(
  matvec: Callable[[PyTree], PyTree], v0: PyTree, num_iterations: int
) -> tuple[PyTree, jax.Array, jax.Array]:
  r"""Dominant eigenvector of a symmetric operator by power iteration.

  .. math::

    \lambda_i = \langle v_i, A v_i \rangle, \qquad
    v_{i+1} = \frac{A v_i}{\|A v_i\|}, \qquad i = 0 .. n-1,

  run in a ``jax.lax.fori_loop``. It converges to the eigenvector of the
  eigenvalue of largest magnitude (for a Hessian near a minimum, the top
  one), at the rate ``|lambda_2 / lambda_1|`` per iteration, so a warm start
  from the previous estimate needs few iterations. An iteration whose
  ``A v`` is zero or non-finite keeps ``v`` (and reports it).

  Args:
    matvec: ``v -> A v`` on pytrees (e.g. a Hessian-vector product).
    v0: the start, a unit pytree (float32 or wider).
    num_iterations: n >= 1, a static Python int.

  Returns:
    ``(v_n, lambda_{n-1}, ok)``: the estimate, the Rayleigh quotient of the
    last iteration, and whether every ``A v_i`` was finite and nonzero.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.diag(jnp.array([1.0, 4.0, 2.0]))
    >>> v, lam, ok = power_iteration(lambda v: a @ v, jnp.ones(3) / jnp.sqrt(3.0), 40)
    >>> round(float(lam), 4), [round(abs(float(x)), 4) for x in v], bool(ok)
    (4.0, [0.0, 1.0, 0.0], True)
  """
  lam0 = jnp.zeros([], tm.tree_vdot(v0, v0).dtype)

  def body(_: int, carry: tuple[PyTree, jax.Array, jax.Array]) -> tuple[PyTree, jax.Array, jax.Array]:
    v, lam, ok = carry
    av = matvec(v)
    new_lam = tm.tree_vdot(v, av).astype(lam.dtype)
    new_v, ok_i = _unit_or(av, v)
    new_v = tm.tree_cast_like(new_v, v)
    return new_v, jnp.where(ok_i, new_lam, lam), ok & ok_i

  return jax.lax.fori_loop(0, num_iterations, body, (v0, lam0, jnp.array(True)))


def eigen_sam(
  rho: optax.ScalarOrSchedule,
  *,
  alpha: Scalar = 0.2,
  eig_update_period: int | jax.Array = 100,
  power_iterations: int = 5,
  num_steps: int = 1,
  seed: int = 0,
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
  r"""Eigenvector-corrected SAM: SAM's gradient, turned away from the sharpest direction.

  This is the method of Duan, Chen & Guan (2026), which they call "X-SAM";
  it is *not* XSAM (Chen & Zhou 2026, :func:`xsam_jax.xsam`). With
  ``g_adv`` the SAM gradient (:func:`sam` with ``num_steps`` ascent steps),
  ``u = g_adv / (|g_adv| + eps)`` and ``v`` a unit estimate of the Hessian's
  dominant eigenvector at ``w``,

  .. math::

    \tilde u = u - \alpha\, |\langle u, v\rangle|\, v, \qquad
    \text{output} = \|g_{adv}\| \frac{\tilde u}{\|\tilde u\| + \epsilon}.

  The correction always lowers the component along ``v`` (it increases the
  angle between the step and ``v``), by ``alpha`` times its size; the
  output keeps SAM's norm ``|g_adv|`` and ``alpha=0`` is exactly SAM. ``v``
  keeps the sign the power iteration gives it from its deterministic start
  (:func:`initial_eigvec`, ``seed``), carried by the warm start.

  .. seealso:: :ref:`paper-differences` (docs/methods.md): why SAM's norm,
     and why the sign of ``v`` matters.

  The eigenvector: on the calls where ``count % eig_update_period == 0``
  (the first call included) ``power_iterations`` steps of
  :func:`power_iteration` on Hessian-vector products at ``w``
  (``jax.jvp`` of ``jax.grad(loss_fn)``), warm-started from the previous
  ``v``, refresh it; other calls skip this entirely (``jax.lax.cond``). The
  output is plain SAM until a refresh has produced a finite nonzero ``H v``
  (``state.has_eigvec``; e.g. a loss with zero curvature stays SAM).

  Cost: K extra forward+backward passes per call (as SAM), plus
  ``power_iterations`` Hessian-vector products (each about two
  forward+backward passes) on refresh calls.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-eigen-sam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    alpha: correction strength, finite (the paper uses values in [0, 2];
      0 is SAM, 1 removes the component along ``v``, 2 reflects it).
    eig_update_period: refresh ``v`` every this many calls (int >= 1).
    power_iterations: Hessian-vector products per refresh (Python int >= 1).
    num_steps: ascent steps K of the SAM gradient (Python int >= 1).
    seed: Python int in ``[0, 2**63 - 1]`` choosing the start vector of the first refresh.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): the
      Hessian-vector products are always those of the replicas' mean loss,
      so every replica holds the same ``v``; with ``m_sharpness`` each
      replica corrects its own SAM gradient with that ``v`` and the outputs
      (and diagnostics) are averaged (:ref:`m-sharpness-states`).
    adaptive, eta, adaptive_mask: ASAM's neighbourhood (:ref:`asam-options`)
      for the ascent: ``g_adv`` is ASAM's gradient; ``v`` and the correction
      stay in plain coordinates (the Hessian's eigenvector at ``w``).
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); refreshes count the steps
      that perturb.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`EigenSAMState` (:ref:`calling-update`). With
    ``optax.inject_hyperparams`` list ``power_iterations``, ``num_steps``
    and ``seed`` in ``static_args``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * p["w"] ** 2)
    >>> tx = optax.chain(xsam_jax.eigen_sam(0.05, eig_update_period=10), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> round(float(state[0].eigenvalue), 3), bool(state[0].has_eigvec)
    (20.0, True)

  References:
    Duan, Chen & Guan, X-SAM: Boosting Sharpness-Aware Minimization with
    Dominant-Eigenvector Gradient Correction, https://arxiv.org/abs/2601.10251,
    2026.
  """
  options = base.Options.from_arguments("eigen_sam", locals())
  validation.check_finite("alpha", alpha)
  validation.check_period("eig_update_period", eig_update_period, allow_none=False)
  power_iterations = validation.check_static_int("power_iterations", power_iterations)
  seed = validation.check_seed(seed)

  def init_fn(params: optax.Params) -> EigenSAMState:
    zero = jnp.zeros([], jnp.float32)
    return EigenSAMState(
      count=base.zero_count(),
      eigvec=initial_eigvec(params, seed),
      eigenvalue=zero,
      has_eigvec=jnp.array(False),
      grad_norm=zero,
      cosine=zero,
      perturbed_loss=zero,
    )

  def rule(trace: AscentTrace, state: EigenSAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, EigenSAMState]:
    def refresh(_: None) -> tuple[PyTree, jax.Array, jax.Array]:
      # An HVP is a derivative of the gradient: averaged over the replicas
      # exactly as the ascent gradients are (see collectives.gradient_sync).
      sync = collectives.gradient_sync(options.axis_name, loss_fn, params)  # global, with m_sharpness too
      matvec = lambda v: sync(hessian_vector_product(loss_fn, params, v))
      v, lam, ok = power_iteration(matvec, state.eigvec, power_iterations)
      return v, lam.astype(jnp.float32), state.has_eigvec | ok

    def keep(_: None) -> tuple[PyTree, jax.Array, jax.Array]:
      return state.eigvec, state.eigenvalue, state.has_eigvec

    refresh_now = state.count % eig_update_period == 0
    v, lam, has_v = jax.lax.cond(refresh_now, refresh, keep, None)
    g_adv = trace.grads[-1]
    u, g_norm_parts = tm.tree_normalize_parts(g_adv)
    g_norm = g_norm_parts.value
    cosine = tm.tree_vdot(u, v)
    corrected, _ = tm.tree_normalize(tm.tree_lincomb(1.0, u, -alpha * jnp.abs(cosine), v))
    eig_out = tm.tree_scale_by_norm(g_norm_parts, 1.0, corrected)
    output = jax.tree.map(lambda e, g: jnp.where(has_v, e, g.astype(e.dtype)), eig_out, g_adv)
    g_norm, cosine = options.replica_mean((g_norm.astype(jnp.float32), cosine.astype(jnp.float32)))
    new_state = state._replace(eigvec=v, eigenvalue=lam, has_eigvec=has_v, grad_norm=g_norm, cosine=cosine)
    return output, new_state

  return base.transform(options, init_fn=init_fn, rule=rule, carried=("eigvec", "eigenvalue", "has_eigvec"))
