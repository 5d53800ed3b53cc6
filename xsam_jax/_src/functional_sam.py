"""Functional SAM (Singh, Mobahi, Agarwala & Dauphin 2025): the network's Jacobian at SAM's ascent point
times the loss derivative at the unperturbed outputs, which drops SAM's "logit path"."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import base, collectives, validation
from xsam_jax._src import preconditioned_sam as psam
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class FunctionalSAMState(NamedTuple):
  """State of :func:`functional_sam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 norm of the output (diagnostic; with ``m_sharpness``,
      the replicas' mean of their own).
    nu: with ``precondition=True``, the mantissas of the second moment (see
      :class:`~xsam_jax._src.preconditioned_sam.PreconditionedSAMState`);
      else None.
    nu_exp: with ``precondition=True``, the int32 exponent of ``nu``; else None.
    perturbed_loss: float32 loss at the ascent point,
      ``output_loss_fn(model_fn(w + e))``, of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  nu: PyTree
  nu_exp: PyTree
  perturbed_loss: jax.Array


def functional_sam(
  rho: optax.ScalarOrSchedule,
  *,
  precondition: bool = False,
  b2: Scalar = 0.999,
  eps: Scalar = 1e-8,
  axis_name: AxisName | None = None,
  m_sharpness: bool = False,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int = 1,
  perturb_start: int = 0,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Functional SAM: the model's Jacobian at SAM's ascent point, times the loss derivative at ``w``.

  With the loss split as ``L(w) = l(f(w))``, ``f = model_fn`` (the
  outputs, e.g. the logits, any pytree) and ``l = output_loss_fn``, and
  ``g_0 = J_f(w)^T \nabla l(f(w))`` the incoming gradient,

  .. math::

    e = \rho \frac{g_0}{\|g_0\|}, \qquad
    \text{output} = J_f(w + e)^\top\, \nabla l\big(f(w)\big),

  computed as ``jax.vjp(model_fn, w + e)`` with the cotangent
  ``grad(output_loss_fn)(model_fn(w))``. SAM's output
  ``J_f(w+e)^T \nabla l(f(w+e))`` also moves the loss derivative (the
  "logit path"); Functional SAM keeps only the change of the Jacobian (the
  "functional path"). With a loss linear in the outputs the two are equal;
  a ``rho`` schedule at 0 outputs ``g_0`` itself.

  ``precondition=True`` is the paper's preconditioned Functional SAM: the
  ascent goes along ``u = g_0 / (sqrt(v_t / (1 - b2^t)) + eps)`` instead of
  ``g_0``, ``e = rho u / |u|``, with the second moment ``v_t`` of
  :func:`xsam_jax.preconditioned_sam` in the state. It is an option here
  rather than a ``functional=`` option of :func:`xsam_jax.preconditioned_sam`
  because the calling convention (``model_fn``, ``output_loss_fn``) then
  belongs to one factory, never to a flag.

  Calling convention: ``update(grads, state, params, model_fn=model_fn,
  output_loss_fn=output_loss_fn)``, where ``model_fn(params)`` returns the
  outputs on the batch and ``output_loss_fn(outputs)`` the scalar loss (or
  ``(loss, aux)``), so that ``grads`` is the gradient of
  ``output_loss_fn(model_fn(params))``. ``loss_fn``, if passed too, is not
  used; a missing ``model_fn`` or ``output_loss_fn`` is a ``ValueError``.
  With Flax: :func:`xsam_jax.flax.value_grad_and_model_fns` (NNX) and
  :meth:`xsam_jax.flax.TrainState.apply_gradients` (Linen).

  Cost: a forward pass at ``w`` (the cotangent; the loop's gradient does
  not hand its outputs over) and a forward+backward pass at ``w + e``: SAM's
  cost plus one forward pass.

  Departures from the paper (:ref:`paper-differences`): the paper's code
  takes the cotangent from the clean pass's own ``vjp`` (no extra forward);
  here the clean pass is the caller's, so ``model_fn(w)`` is evaluated
  again. The preconditioner is this transformation's own second moment of
  ``g_0`` (the paper reuses AdamW's), as in
  :func:`xsam_jax.preconditioned_sam`. No multi-step ascent and no ASAM.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-functional-sam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    precondition: a bool; ascend along Adam's preconditioned gradient (see above).
    b2, eps: the second moment's decay in ``[0, 1)`` and Adam's ``eps``
      (finite, >= 0), used with ``precondition=True`` only (see
      :func:`xsam_jax.preconditioned_sam`).
    axis_name, m_sharpness: data parallelism (:ref:`common-options`): each
      replica's ``model_fn`` and ``output_loss_fn`` are its shard's, the
      cotangent is its own outputs', and the gradients (``g_0`` and the
      output) are averaged over the axis; with ``m_sharpness`` each replica
      ascends along its own ``g_0`` and the outputs are averaged.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); leaves left out are not
      moved, and their output is their part of the same vector-Jacobian
      product. A step that does not perturb outputs ``g_0`` with no extra pass.
    check_updates: a first-step check of the chain order (:ref:`check-updates`),
      against the gradient of ``output_loss_fn(model_fn(params))``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`FunctionalSAMState`.

  Raises:
    ValueError: ``precondition`` not a bool, ``b2`` outside ``[0, 1)``,
      ``eps`` negative or not finite, or a shared option out of its range;
      at ``update``, ``model_fn`` or ``output_loss_fn`` missing.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> x, y = jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([1, 0])
    >>> params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.4]])}
    >>> model_fn = lambda p: jnp.tanh(x @ p["w"])  # the outputs
    >>> output_loss_fn = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    >>> loss_fn = lambda p: output_loss_fn(model_fn(p))
    >>> tx = optax.chain(xsam_jax.functional_sam(0.05), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, model_fn=model_fn, output_loss_fn=output_loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> linear = lambda p: x @ p["w"]  # a model linear in w: J_f does not move, the output is g_0
    >>> fsam = xsam_jax.functional_sam(0.05)
    >>> g = jax.grad(lambda p: output_loss_fn(linear(p)))(params)
    >>> out, _ = fsam.update(g, fsam.init(params), params, model_fn=linear, output_loss_fn=output_loss_fn)
    >>> bool(jnp.allclose(out["w"], g["w"]))
    True
    >>> fsam.update(g, fsam.init(params), params, loss_fn=loss_fn)
    Traceback (most recent call last):
    ...
    ValueError: functional_sam.update needs `model_fn` and `output_loss_fn` (`loss_fn` alone is not enough: ...

  References:
    Singh, Mobahi, Agarwala & Dauphin, Avoiding spurious sharpness
    minimization broadens applicability of SAM, ICML 2025,
    https://arxiv.org/abs/2502.02407.
  """
  # One ascent step (the perturbation below replaces the shared ascent), no ASAM.
  options = base.Options.from_arguments(
    "functional_sam", locals(), num_steps=1, adaptive=False, eta=0.01, adaptive_mask=None
  )
  precondition = validation.check_bool("precondition", precondition)
  psam.check_moment_hyperparameters(b2, eps)
  moment_axis = axis_name if m_sharpness else None

  def init_fn(params: optax.Params) -> FunctionalSAMState:
    nu, nu_exp = psam.init_second_moment(params) if precondition else (None, None)
    zero = jnp.zeros([], jnp.float32)
    return FunctionalSAMState(
      count=base.zero_count(), grad_norm=zero, nu=nu, nu_exp=nu_exp, perturbed_loss=jnp.zeros([], jnp.float32)
    )

  def direction(g0: PyTree, state: FunctionalSAMState) -> PyTree:
    if not precondition:
      return g0
    nu, e, h = psam.second_moment(state.nu, state.nu_exp, g0, b2, moment_axis)
    return psam.preconditioned_direction(nu, e, h, b2, eps, state.count + 1)

  def perturbation(
    options: base.Options, loss_fn: LossFn, params: PyTree, g0: PyTree, state: FunctionalSAMState, count: jax.Array
  ) -> AscentTrace:
    assert isinstance(loss_fn, base.SplitLoss)  # transform(split_loss=True) makes it one
    where = options.perturb_mask
    sync = collectives.gradient_sync(options.axis_name, loss_fn, params, per_replica=options.m_sharpness)  # type: ignore[arg-type]  # a SplitLoss is callable
    g0 = sync(g0)
    moved = ascent_lib.restrict(params, where)
    u = direction(ascent_lib.restrict(g0, where), state)
    unit, _ = tm.tree_normalize_parts(u)
    rho = options.rho(count) if callable(options.rho) else options.rho
    # As the shared ascent forms e: a Python radius is rounded once where it is used.
    step = rho if isinstance(rho, (int, float)) else jnp.asarray(rho).astype(tm.scalar_dtype(moved))
    e = jax.tree.map(lambda x: jnp.asarray(step).astype(x.dtype) * x, unit)
    point = ascent_lib.merge(where, tm.tree_add_to_params(moved, e), params)
    model_fn, output_loss_fn = loss_fn.model_fn, loss_fn.output_loss_fn
    loss_0, pull_loss = jax.vjp(output_loss_fn, model_fn(params))
    (cotangent,) = pull_loss(jnp.ones_like(loss_0))  # dl/df at the unperturbed outputs
    outputs, pull_model = jax.vjp(model_fn, point)
    (g_f,) = pull_model(cotangent)  # J_f(w + e)^T dl/df(w)
    output = sync(g_f)
    output = psam.at_zero_radius(rho, g0, output)  # a schedule's or an injected radius may be 0: g_0 itself
    return AscentTrace(grads=(g0, output), displacement=e, first_direction=u, losses=(output_loss_fn(outputs),))

  def rule(
    trace: AscentTrace, state: FunctionalSAMState, params: PyTree, loss_fn: LossFn
  ) -> tuple[PyTree, FunctionalSAMState]:
    del params, loss_fn
    output = trace.grads[-1]
    grad_norm = tm.tree_norm(output).astype(jnp.float32)
    if not precondition:
      return output, state._replace(grad_norm=options.replica_mean(grad_norm))
    nu, e, _ = psam.second_moment(state.nu, state.nu_exp, trace.grads[0], b2, moment_axis)
    grad_norm, nu = options.replica_mean((grad_norm, nu))
    return output, state._replace(grad_norm=grad_norm, nu=tm.tree_cast_like(nu, state.nu), nu_exp=e)

  return base.transform(
    options,
    init_fn=init_fn,
    rule=rule,
    carried=("nu", "nu_exp") if precondition else (),
    perturbation=perturbation,
    split_loss=True,
  )
