"""WSAM (Yue et al. 2023): the sharpness ``L(w + d) - L(w)`` as a regularization
term of weight ``gamma / (1 - gamma)``, coupled into the gradient or, as the
paper does, decoupled from the base optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.ascent import AscentTrace
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar


class WSAMState(NamedTuple):
  """State of :func:`wsam`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating).
    grad_norm: float32 ``|g_1|``, the norm of the gradient at the ascent
      point (diagnostic; with ``m_sharpness``, the replicas' mean).
    base_state: the state of ``base_optimizer`` in the decoupled form;
      ``optax.EmptyState()`` otherwise.
    perturbed_loss: float32 ``L(w + d_K)`` of the last step that perturbed
      (:ref:`perturbed-loss`).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  grad_norm: jax.Array
  base_state: Any
  perturbed_loss: jax.Array


def _check_gamma(gamma: Any) -> None:
  validation.check_real("gamma", gamma, "a real number in [0, 1)", lambda v: 0.0 <= v < 1.0)


def wsam(
  rho: optax.ScalarOrSchedule,
  gamma: Scalar = 0.9,
  *,
  base_optimizer: optax.GradientTransformation | None = None,
  learning_rate: optax.ScalarOrSchedule | None = None,
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
  r"""WSAM: the loss plus a weighted sharpness, ``L + gamma/(1-gamma) (L_SAM - L)``.

  WSAM minimizes

  .. math::

    L^{WSAM}(w) = L(w) + \frac{\gamma}{1-\gamma}\Big(\max_{\|\delta\| \le \rho} L(w+\delta) - L(w)\Big),

  with the maximum taken at SAM's ascent point ``w + d``, ``d = rho g_0 /
  (|g_0| + eps)``, so its gradient is, with ``g_1 = \nabla L(w + d)``,

  .. math::

    \text{output} = g_0 + \frac{\gamma}{1-\gamma}\,(g_1 - g_0)
    = \frac{1-2\gamma}{1-\gamma}\, g_0 + \frac{\gamma}{1-\gamma}\, g_1 .

  ``gamma=0`` is the plain gradient ``g_0`` and ``gamma=1/2`` is SAM
  (``g_1``); ``gamma -> 1`` weighs the sharpness ever more. This *coupled*
  form (``base_optimizer=None``) hands that gradient to the base optimizer
  that follows in the ``optax.chain``; with plain SGD it is the paper's
  method.

  **Decoupled form (the authors' default).** The paper's "weight decouple"
  feeds the base optimizer the plain gradient ``g_0`` only and adds the
  sharpness term outside it, scaled by the learning rate, like AdamW's
  weight decay:

  .. math::

    \text{update} = u(g_0) - \eta_t\, \frac{\gamma}{1-\gamma}\,(g_1 - g_0),

  where ``u`` is the base optimizer's update and ``eta_t`` its learning
  rate. An optax chain cannot send ``g_0`` to one stage and ``g_1 - g_0``
  around it, so this form takes the base optimizer inside: pass
  ``base_optimizer`` (e.g. ``optax.chain(optax.add_decayed_weights(wd),
  optax.sgd(lr, momentum=0.9))``) and the same ``learning_rate``; the output
  is then the *update* (apply it with ``optax.apply_updates``), not a
  gradient, and nothing should follow in the chain. With momentum (or Adam)
  the two forms differ: coupled, the sharpness term also enters the
  momentum; with plain SGD they coincide. ``base_optimizer.update`` gets
  ``(g_0, its state, params)`` and no extra args.

  Cost: one extra forward+backward pass per call (as SAM); the decoupled
  form also keeps the base optimizer's state.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-wsam>`.

  Args:
    rho: ascent radius, > 0, or an optax schedule of the step count (values >= 0).
    gamma: weight of the sharpness, a real number in ``[0, 1)`` (the
      regularization weight is ``gamma / (1 - gamma)``). The default 0.9 is
      the authors' usage example (their code's default is 0.88).
    base_optimizer: None (coupled form) or the base optimizer, an
      ``optax.GradientTransformation`` (decoupled form).
    learning_rate: with ``base_optimizer`` (and only then): its learning
      rate, a number > 0 or an optax schedule of the step count (called
      with this state's ``count``, which advances as an optax schedule's
      does), scaling the decoupled sharpness term.
    axis_name, m_sharpness: data parallelism (:ref:`common-options`); with
      ``m_sharpness`` each replica ascends from its own gradient (the
      authors' code perturbs per worker), and the coupled output, or in the
      decoupled form ``g_0`` and ``g_1 - g_0``, are averaged over the axis.
    adaptive, eta, adaptive_mask: ASAM's neighbourhood for the ascent step
      (:ref:`asam-options`), as the authors' code offers.
    perturb_mask, perturb_every, perturb_start: the training controls
      (:ref:`perturb-mask`, :ref:`perturb-every`); the decoupled form takes
      no ``perturb_mask``, and its steps that do not perturb return the base
      optimizer's update of ``g_0``.
    check_updates: a first-step check of the chain order (:ref:`check-updates`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`WSAMState` (:ref:`calling-update`).

  Raises:
    ValueError: ``gamma`` outside ``[0, 1)``; ``learning_rate`` without
      ``base_optimizer`` or the reverse; ``base_optimizer`` not an optax
      transformation; ``learning_rate`` not a number > 0 or a schedule
      whose value at step 0 is finite and >= 0.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> grads = jax.grad(loss_fn)(params)
    >>> coupled = optax.chain(xsam_jax.wsam(0.05, gamma=0.9), optax.sgd(0.01, momentum=0.9))
    >>> updates, state = coupled.update(grads, coupled.init(params), params, loss_fn=loss_fn)
    >>> decoupled = xsam_jax.wsam(
    ...   0.05, gamma=0.9, base_optimizer=optax.sgd(0.01, momentum=0.9), learning_rate=0.01
    ... )
    >>> updates, state = decoupled.update(grads, decoupled.init(params), params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)  # the decoupled output is the update itself

  References:
    Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term, KDD 2023, https://arxiv.org/abs/2305.15817.
  """
  options = base.Options.from_arguments("wsam", locals(), num_steps=1)
  _check_gamma(gamma)
  decoupled = base_optimizer is not None
  if decoupled != (learning_rate is not None):
    raise ValueError(
      "wsam: `base_optimizer` and `learning_rate` go together (the decoupled form); "
      f"got base_optimizer={base_optimizer!r} and learning_rate={learning_rate!r}."
    )
  if base_optimizer is not None and not isinstance(base_optimizer, optax.GradientTransformation):
    raise ValueError(
      f"`base_optimizer` must be an optax GradientTransformation or None, got {type(base_optimizer).__name__}."
    )
  if learning_rate is not None:  # a number > 0, or a schedule checked at step 0 (finite, >= 0), as rho is
    validation.check_rho("learning_rate", learning_rate)
  if decoupled and perturb_mask is not None:
    raise ValueError(
      "wsam: `perturb_mask` is not supported with `base_optimizer` (the decoupled form returns the final "
      "update, and the leaves outside the mask would get a raw gradient): use the coupled form, or "
      "optax.masked around the whole optimizer."
    )
  weight = gamma / (1.0 - gamma)  # the sharpness term's weight (traced under inject_hyperparams)

  def init_fn(params: optax.Params) -> WSAMState:
    base_state = base_optimizer.init(params) if base_optimizer is not None else optax.EmptyState()
    zero = jnp.zeros([], jnp.float32)
    return WSAMState(count=base.zero_count(), grad_norm=zero, base_state=base_state, perturbed_loss=zero)

  def rule(trace: AscentTrace, state: WSAMState, params: PyTree, loss_fn: LossFn) -> tuple[PyTree, WSAMState]:
    del loss_fn
    g_0, g_1 = trace.grads[0], trace.grads[-1]
    grad_norm = options.replica_mean(tm.tree_norm(g_1).astype(jnp.float32))
    sharpness = jax.tree.map(jnp.subtract, tm.tree_wide(g_1), tm.tree_wide(g_0))  # g_1 - g_0
    if base_optimizer is None:
      output = tm.tree_lincomb(1.0, tm.tree_wide(g_0), weight, sharpness)
      return output, state._replace(grad_norm=grad_norm)
    g_0, sharpness = options.replica_mean((g_0, sharpness))  # the base optimizer's state: one on every replica
    updates, base_state = base_optimizer.update(g_0, state.base_state, params)
    assert learning_rate is not None  # set with base_optimizer
    lr = jnp.asarray(base.at_step(learning_rate, trace))
    # lr and the weight each cast to the leaf's wide dtype (a float32 schedule value must not round the weight).
    output = jax.tree.map(
      lambda u, s: u.astype(s.dtype) - lr.astype(s.dtype) * (jnp.asarray(weight).astype(s.dtype) * s),
      updates,
      sharpness,
    )
    return output, state._replace(grad_norm=grad_norm, base_state=base_state)

  def skip_rule(g_0: PyTree, state: WSAMState, params: PyTree) -> tuple[PyTree, WSAMState]:
    # A step that does not perturb has no sharpness term: the decoupled form's update is the base optimizer's.
    assert base_optimizer is not None
    updates, base_state = base_optimizer.update(options.replica_mean(g_0), state.base_state, params)
    return updates, state._replace(base_state=base_state)

  carried = ("base_state",) if decoupled else ()  # the decoupled base optimizer's momentum feeds later steps
  return base.transform(
    options, init_fn=init_fn, rule=rule, skip_rule=skip_rule if decoupled else None, carried=carried
  )
