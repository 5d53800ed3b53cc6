"""GSAM (Zhuang et al. 2022): SAM's gradient plus an ascent step, orthogonal
to it, that lowers the surrogate gap ``L(w + d) - L(w)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class GSAMState(NamedTuple):
  """State of :func:`gsam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_1|``, the norm of SAM's gradient (diagnostic).
    cosine: float32 cosine between ``g_0`` and ``g_1``; the orthogonal part
      the update uses has norm ``|g_0| sqrt(1 - cosine^2)`` (diagnostic).
      With ``m_sharpness`` both diagnostics are the replicas' means.
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  cosine: jax.Array
  perturbed_loss: jax.Array


def orthogonal_part(x: PyTree, y: PyTree) -> tuple[PyTree, tm.Norm, tm.Norm, jax.Array]:
  """``(x_perp, |x|, |y|, c)``: the part of ``x`` orthogonal to ``y``, in wide precision.

  ``x_perp = x - |x| c u_y`` with ``u_y = y / (|y| + eps)`` and ``c = <x / (|x|
  + eps), u_y>``, the cosine of ``x`` and ``y``. Norms are held as
  :class:`~xsam_jax._src.tree_math.Norm` and the projection is formed as
  ``((c r_x) u_y) scale_x``, so gradients whose norm exceeds float32's range
  still give a finite result. If ``y = 0`` the whole of ``x`` is orthogonal.
  GSAM takes the part of ``g_0`` orthogonal to ``g_1``, LookSAM the part of
  ``g_1`` orthogonal to ``g_0``.
  """
  x, y = tm.tree_wide(x), tm.tree_wide(y)
  n_x, n_y = tm.tree_norm_parts(x), tm.tree_norm_parts(y)
  cosine = tm.tree_scaled_vdot(n_x.inverse(), x, n_y.inverse(), y)
  parallel = tm.tree_scale_by_norm(n_x, cosine, n_y.inverse().apply_tree(y))
  return jax.tree.map(jnp.subtract, x, parallel), n_x, n_y, cosine


def _orthogonal_correction(g_0: PyTree, g_1: PyTree, alpha: Scalar) -> tuple[PyTree, jax.Array, jax.Array]:
  """``(g_1 - alpha g_0_perp, |g_1|, cos(g_0, g_1))`` in wide precision (:func:`orthogonal_part`)."""
  perpendicular, _, n_1, cosine = orthogonal_part(g_0, g_1)
  return tm.tree_lincomb(1.0, tm.tree_wide(g_1), -jnp.asarray(alpha), perpendicular), n_1.value, cosine


def gsam(
  rho: optax.ScalarOrSchedule,
  alpha: Scalar = 0.4,
  *,
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
  r"""GSAM: SAM's gradient minus ``alpha`` times the part of ``g_0`` orthogonal to it.

  With ``g_0`` the incoming gradient at ``w`` and ``g_1`` the gradient at
  SAM's ascent point ``w + rho g_0 / (|g_0| + eps)``, ``g_0`` is split into
  a part parallel to ``g_1`` and a part orthogonal to it,

  .. math::

    g_0^\perp = g_0 - \|g_0\|\, c\, \hat g_1, \qquad
    c = \langle \hat g_0, \hat g_1\rangle, \quad \hat g = \frac{g}{\|g\| + \epsilon}, \qquad
    \text{output} = g_1 - \alpha\, g_0^\perp .

  A descent step along the output lowers the perturbed loss ``L(w + d)`` as
  SAM does, and moves up ``L(w)`` along ``g_0^\perp`` (the paper's Figure 2:
  ``\nabla h_\perp = -\nabla f_\perp``), which lowers the surrogate gap
  ``h(w) = L(w + d) - L(w)`` without changing the perturbed loss to first
  order (``g_0^\perp \perp g_1``). ``alpha=0`` is SAM. If ``g_1 = 0`` the
  whole of ``g_0`` counts as orthogonal (eps-guarded, finite).

  .. seealso:: :ref:`paper-differences` (docs/methods.md): how this differs
     from the paper's Algorithm 1 and the authors' code (``rho``'s schedule,
     the adaptive step, the cosine's guard).

  Cost: one extra forward+backward pass per call (as SAM) and two norms and
  a dot product over the parameters.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-gsam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    alpha: weight of the orthogonal correction, a finite real number >= 0
      (0: SAM). The default 0.4 is the authors' PyTorch example's and the
      paper's value for ViT-S/32 and ViT-B/16; its Table 4 ranges from
      0.005-0.01 (ResNets, SGD, ``rho`` 0.02-0.04) to 1.0 (ViT-S/16, AdamW,
      ``rho`` up to 0.6).
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): the
      gradients are averaged over the axis before the decomposition; with
      ``m_sharpness`` each replica decomposes its own and the outputs (and
      diagnostics) are averaged, as the authors' code does across workers.
    adaptive, eta, adaptive_mask: ASAM's neighbourhood for the ascent step
      (:ref:`asam-options`); the decomposition stays in plain coordinates.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`).
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`GSAMState` (its ``cosine``: of ``g_0`` and ``g_1``;
    :ref:`calling-update`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = optax.chain(xsam_jax.gsam(0.1, alpha=0.4), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    >>> bool(0.99 < state[0].cosine <= 1.0)  # g_0 and g_1 nearly parallel here
    True
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware
    Training, ICLR 2022, https://arxiv.org/abs/2203.08065.
  """
  options = base.Options.from_arguments("gsam", locals(), num_steps=1)
  validation.check_nonnegative("alpha", alpha)

  def init_fn(params: optax.Params) -> GSAMState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return GSAMState(count=base.zero_count(), grad_norm=zero, cosine=zero, perturbed_loss=zero)

  def rule(trace: AscentTrace, state: GSAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, GSAMState]:
    del params, loss_fn
    output, g1_norm, cosine = _orthogonal_correction(trace.grads[0], trace.grads[-1], alpha)
    diagnostics = options.replica_mean(jnp.stack([g1_norm.astype(jnp.float32), cosine.astype(jnp.float32)]))
    return output, state._replace(grad_norm=diagnostics[0], cosine=diagnostics[1])

  return base.transform(options, init_fn=init_fn, rule=rule, carried=())  # diagnostics only
