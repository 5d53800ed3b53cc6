"""MSAM and LSAM: multi-step relatives of SAM that combine the gradients of
the whole ascent trajectory (as the XSAM paper defines them), each rescaled
to SAM's gradient norm ``|g_K|`` so that only the direction differs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class MultiStepSAMState(NamedTuple):
  """State of :func:`msam` and :func:`lsam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_K|``, the norm of the output (diagnostic).
    cosine: float32 cosine between the output and ``g_K`` (1 means the
      method stepped exactly as SAM would; diagnostic).
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  cosine: jax.Array
  perturbed_loss: jax.Array


def _sum_trees(trees: Sequence[PyTree]) -> PyTree:
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def rescaled_combination(
  grads: Sequence[PyTree], g_k: PyTree, *, normalize_each: bool
) -> tuple[PyTree, jax.Array, jax.Array]:
  r"""``|g_K|`` times the unit vector of a sum of (optionally normalized) gradients.

  .. math::

    s = \sum_i h_i,\quad h_i = g_i \text{ or } \frac{g_i}{\|g_i\|+\epsilon},
    \qquad \text{output} = \|g_K\| \frac{s}{\|s\|+\epsilon}.

  A sum and a mean have the same direction, so MSAM's mean is this sum. If
  the gradients cancel (``s = 0``) the output is zero and finite: no
  direction agrees with the trajectory, and the step is skipped rather than
  guessed.

  Args:
    grads: a sequence of gradient pytrees (one structure).
    g_k: the gradient whose norm the output takes.
    normalize_each: normalize every gradient before summing (LSAM).

  Returns:
    ``(output, |g_K|, cosine)``: the output (wide precision), ``|g_K|`` and
    the cosine between the output and ``g_K``.

  Example:
    >>> import jax.numpy as jnp
    >>> g1, g2 = {"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}
    >>> out, norm, cos = rescaled_combination([g1, g2], g2, normalize_each=True)
    >>> [round(float(x), 4) for x in out["w"]], float(norm)
    ([2.8284, 2.8284], 4.0)
  """
  # Each raw gradient is divided by the number of terms (a mean: same direction as the sum),
  # so that adding gradients near float32's largest value cannot overflow.
  inv_count = 1.0 / len(grads)
  terms = [tm.tree_normalize(g)[0] if normalize_each else tm.tree_scale(inv_count, tm.tree_wide(g)) for g in grads]
  unit, _ = tm.tree_normalize(_sum_trees(terms))
  g_unit, g_norm = tm.tree_normalize_parts(g_k)
  # Without the barrier XLA may pull 1/|s| and 1/|g_K| out of the dot
  # product, which then overflows in float32 for gradients near 1e30.
  cosine = tm.tree_vdot(*jax.lax.optimization_barrier((unit, g_unit)))
  return tm.tree_scale_by_norm(g_norm, 1.0, unit), g_norm.value, cosine


def _multistep_sam(
  options: base.Options, *, first: int, last: int, normalize_each: bool
) -> optax.GradientTransformationExtraArgs:
  """The transformation that combines ``grads[first : len(grads) + last]`` of the ascent trace."""

  def init_fn(params: optax.Params) -> MultiStepSAMState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return MultiStepSAMState(count=base.zero_count(), grad_norm=zero, cosine=zero, perturbed_loss=zero)

  def rule(
    trace: AscentTrace, state: MultiStepSAMState, params: PyTree, loss_fn: LossFn
  ) -> tuple[PyTree, MultiStepSAMState]:
    del params, loss_fn
    grads = trace.grads[first : len(trace.grads) + last]
    output, g_norm, cosine = rescaled_combination(grads, trace.grads[-1], normalize_each=normalize_each)
    diagnostics = options.replica_mean(jnp.stack([g_norm.astype(jnp.float32), cosine.astype(jnp.float32)]))
    return output, state._replace(grad_norm=diagnostics[0], cosine=diagnostics[1])

  return base.transform(options, init_fn=init_fn, rule=rule, carried=())  # diagnostics only


def msam(
  rho: optax.ScalarOrSchedule,
  *,
  num_steps: int,
  plus: bool = False,
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
  r"""MSAM: the mean of the ascent gradients, at SAM's gradient scale.

  After the K-step normalized ascent of :func:`sam` (``g_0`` the incoming
  gradient, ``g_k`` the gradient at ``w + d_k``),

  .. math::

    \text{MSAM:}\ m = \frac{1}{K}\sum_{k=1}^{K} g_k, \qquad
    \text{MSAM+:}\ m = \frac{1}{K+1}\sum_{k=0}^{K} g_k, \qquad
    \text{output} = \|g_K\| \frac{m}{\|m\| + \epsilon}.

  With ``num_steps=1`` MSAM is SAM. If the gradients cancel (``m = 0``) the
  output is zero (finite; see :func:`rescaled_combination`).

  Cost: K extra forward+backward passes per call, as multi-step SAM.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-relatives>`.

  Args:
    rho: total ascent radius, > 0 (K steps of length ``rho / K``), or an optax
      schedule of the step count (values >= 0).
    num_steps: number of ascent steps K (a Python int >= 1).
    plus: MSAM+ (also average the incoming gradient ``g_0``); a bool.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`); with
      ``m_sharpness`` each replica combines its own ascent's gradients and
      the outputs are averaged (the diagnostics too).
    adaptive, eta, adaptive_mask: ASAM's neighbourhood for the ascent
      (:ref:`asam-options`). It changes where the gradients are taken, not
      how they are combined: the rule still sums the plain gradients and
      rescales to ``|g_K|``, as ASAM's own output is the plain ``g_K``.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`).
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state,
    :class:`MultiStepSAMState`, reports in ``cosine`` how far the output
    turned from SAM's (:ref:`calling-update`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> tx = optax.chain(xsam_jax.msam(0.1, num_steps=3), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    >>> bool(0.9 < state[0].cosine < 1.001)
    True

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026, https://arxiv.org/abs/2603.10048
    (MSAM and MSAM+ as compared there).
    Kim et al., Exploring the Effect of Multi-step Ascent in Sharpness-Aware
    Minimization, https://arxiv.org/abs/2302.10181, 2023.
  """
  options = base.Options.from_arguments("msam", locals())
  plus = validation.check_bool("plus", plus)
  return _multistep_sam(options, first=0 if plus else 1, last=0, normalize_each=False)


def lsam(
  rho: optax.ScalarOrSchedule,
  *,
  num_steps: int,
  plus: bool = False,
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
  r"""LSAM: the sum of the normalized ascent gradients, at SAM's gradient scale.

  After the K-step normalized ascent of :func:`sam`,

  .. math::

    \text{LSAM:}\ s = \sum_{k=1}^{K} \frac{g_k}{\|g_k\|+\epsilon}, \qquad
    \text{LSAM+:}\ s = \sum_{k=0}^{K-1} \frac{g_k}{\|g_k\|+\epsilon}, \qquad
    \text{output} = \|g_K\| \frac{s}{\|s\| + \epsilon}.

  LSAM+ is the direction of the ascent displacement ``d_K`` (it moves
  straight away from the ascent point; with ``num_steps=1`` it is the
  ``g_0`` direction, like :func:`xsam` with a fixed ``alpha=0``). With
  ``adaptive=True`` it stays the sum of the normalized gradients, which is
  no longer parallel to the ``T^2``-warped ``d_K``. With ``num_steps=1``
  LSAM is SAM. If the terms cancel (``s = 0``) the output is zero (finite;
  see :func:`rescaled_combination`).

  Cost: K extra forward+backward passes per call, as multi-step SAM.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-relatives>`.

  Args:
    rho, num_steps: as in :func:`msam`.
    plus: LSAM+ (sum ``g_0 .. g_{K-1}``: the direction of ``d_K``); a bool.
    axis_name, m_sharpness: as in :func:`msam`.
    adaptive, eta, adaptive_mask: as in :func:`msam` (ASAM changes where
      the gradients are taken; they are still normalized in the plain norm).
    perturb_mask, perturb_every, perturb_start: as in :func:`msam`.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`MultiStepSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> grads = jax.grad(loss_fn)(params)
    >>> lsam_plus = xsam_jax.lsam(0.1, num_steps=1, plus=True)  # K = 1: the g_0 direction
    >>> out, state = lsam_plus.update(grads, lsam_plus.init(params), params, loss_fn=loss_fn)
    >>> bool(jnp.allclose(out["w"] / jnp.linalg.norm(out["w"]), grads["w"] / jnp.linalg.norm(grads["w"])))
    True

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026, https://arxiv.org/abs/2603.10048
    (LSAM and LSAM+ as written there).
  """
  options = base.Options.from_arguments("lsam", locals())
  plus = validation.check_bool("plus", plus)
  return _multistep_sam(options, first=0 if plus else 1, last=-1 if plus else 0, normalize_each=True)
