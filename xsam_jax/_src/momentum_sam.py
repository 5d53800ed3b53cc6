"""Momentum-SAM (Becker, Altrock and Risse 2024): SAM's perturbation taken along the negative normalised
momentum, so the one gradient a training loop computes per step is already the gradient at the perturbed
point. A whole optimizer (SGD with momentum, or AdamW), not a stage in front of one: it needs the base
optimizer's momentum and learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xsam_jax._src import base, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.types import PyTree, Scalar


class MomentumSAMState(NamedTuple):
  """State of :func:`momentum_sam` and :func:`momentum_sam_adamw`.

  Attributes:
    count: int32 number of ``update`` calls so far (saturating); the
      argument of a ``rho`` schedule.
    base_state: the state of the base optimizer, the optax chain
      ``add_decayed_weights, sgd`` (:func:`momentum_sam`) or
      ``optax.adamw`` (:func:`momentum_sam_adamw`); it holds the momentum
      ``m_t`` (``optax.TraceState.trace`` or ``optax.ScaleByAdamState.mu``).
    ascent_scale: the factor ``rho_t / |m_t|`` of the perturbation
      ``e_t = (rho_t / |m_t|) m_t`` that the held params carry
      (``params = w_t - e_t``), as a power of two and a mantissa
      (``(m * pow2) * mant``, finite at any scale of ``m_t``); ``mant`` is
      0 before the first step, and a zero ``m_t`` gives a zero perturbation
      whatever the factor.
    momentum_norm: float32 ``|m_t|`` after the last step (diagnostic;
      ``inf`` if it exceeds float32's range).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for the step counter; shadows tuple.count
  base_state: Any
  ascent_scale: tm.Inverse
  momentum_norm: jax.Array


_MOMENTUM_STATES = (optax.TraceState, optax.ScaleByAdamState)


def _momentum(method: str, base_state: Any) -> PyTree:
  """The momentum ``m_t`` inside the base optimizer's state (its one ``TraceState`` or ``ScaleByAdamState``)."""
  found = [
    s
    for s in jax.tree.leaves(base_state, is_leaf=lambda x: isinstance(x, _MOMENTUM_STATES))
    if isinstance(s, _MOMENTUM_STATES)
  ]
  if len(found) != 1:
    raise ValueError(
      f"{method}: the base optimizer's state must hold exactly one optax.TraceState or optax.ScaleByAdamState "
      f"(the momentum), found {len(found)}: was the state made by another optimizer?"
    )
  s = found[0]
  return s.trace if isinstance(s, optax.TraceState) else s.mu


def _check_nonnegative_or_schedule(name: str, value: Any) -> None:
  """A finite real scalar >= 0, or an optax schedule (checked at step 0: finite and >= 0)."""
  if callable(value):
    validation.check_rho(name, value)  # its schedule branch: value(0) finite and >= 0
  else:
    validation.check_nonnegative(name, value)


def _check_unit_interval(name: str, value: Any) -> None:
  validation.check_real(name, value, "a real number in [0, 1)", lambda v: 0.0 <= v < 1.0)


def _check_shared(rho: Any, learning_rate: Any, weight_decay: Any) -> None:
  _check_nonnegative_or_schedule("rho", rho)
  validation.check_rho("learning_rate", learning_rate)  # a number > 0, or a schedule (value at 0 finite, >= 0)
  _check_nonnegative_or_schedule("weight_decay", weight_decay)


def momentum_sam(
  rho: optax.ScalarOrSchedule,
  *,
  learning_rate: optax.ScalarOrSchedule,
  momentum: Scalar = 0.9,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: PyTree | Callable[[PyTree], PyTree] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM with SGD: SAM's perturbation along the negative normalised momentum, at no extra pass.

  The training loop holds the *perturbed* parameters :math:`p_t` and
  computes its ordinary gradient there, :math:`g_t = \nabla L(p_t)` (with
  :math:`m_{-1} = 0`, so :math:`p_0 = w_0`, the initial weights); one
  ``update`` is, with :math:`\hat m = m / \|m\|` (and :math:`\hat m = 0`
  for :math:`m = 0`),

  .. math::

    w_t &= p_t + \rho_{t-1}\, \hat m_{t-1}
      && \text{(the unperturbed weights)} \\
    m_t &= \mu\, m_{t-1} + g_t + \lambda\, p_t \\
    w_{t+1} &= w_t - \eta_t\, m_t \\
    p_{t+1} &= w_{t+1} - \rho_t\, \hat m_t ,

  and its output is the update :math:`p_{t+1} - p_t = \rho_{t-1} \hat
  m_{t-1} - \eta_t m_t - \rho_t \hat m_t`, to apply with
  ``optax.apply_updates``. The perturbation :math:`-\rho \hat m` replaces
  SAM's :math:`+\rho\, g / \|g\|`, so SAM's second forward and backward
  pass is gone: the cost of a step is SGD's plus a norm of the momentum.
  At ``rho=0`` it is ``optax.chain(optax.add_decayed_weights(weight_decay,
  mask), optax.sgd(learning_rate, momentum=momentum))`` (bitwise op by op;
  jitted, within XLA's fusion rounding).

  Call ``update`` as a plain optimizer's, ``tx.update(grads, state,
  params)`` with ``grads`` the gradient at ``params`` (no ``loss_fn``;
  extra keyword arguments are ignored). It is a whole optimizer: put
  gradient transformations (``optax.clip_by_global_norm``, as the authors'
  ``--grad_clip_norm``) before it in an ``optax.chain`` and nothing after
  it. **The params the loop holds are the perturbed** :math:`p_t`: evaluate,
  export or average the unperturbed :math:`w_t` from
  :func:`momentum_sam_params` ``(params, opt_state)`` (the authors'
  ``move_back_from_momentumAscent``); checkpoint the loop's params and
  state to resume.

  Departures from the authors' code (``optimizer/msam.py``), each at most a
  rounding in float32 unless stated:

  - The normalisation divides by :math:`\|m\|` exactly (a zero momentum
    gives no perturbation) instead of by :math:`\|m\| + 10^{-12}`; the two
    agree in float32 wherever :math:`\|m\| > 2 \cdot 10^{-5}`. The first
    step starts unperturbed as theirs does (their inverse norm starts at
    0), so a zero momentum never divides by zero.
  - The state keeps :math:`\rho_t / \|m_t\|` of the step that made the
    perturbation; the authors keep :math:`1 / \|m_t\|` and multiply by the
    *current* ``rho`` when moving back, which differs only when ``rho``
    changes between steps (a rho schedule): then their :math:`w` drifts by
    :math:`(\rho_t - \rho_{t-1}) \hat m`, ours does not.
  - One update :math:`p_{t+1} - p_t` is returned and added once, where the
    authors add the three terms to the params in turn (rounding only).
  - No ``nesterov`` (the authors' class takes the flag and ignores it).
  - The weight decay is theirs: L2, added to the gradient at the held
    (perturbed) params :math:`p_t`, inside the momentum.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-momentum-sam>`.

  Args:
    rho: perturbation radius, a finite real number >= 0 (0: plain SGD), or
      an optax schedule of this state's ``count`` (values >= 0; checked at
      step 0). The authors' examples use ``rho=3`` (their README), far
      larger than SAM's because :math:`\hat m` is a unit vector along the
      accumulated momentum.
    learning_rate: the SGD learning rate :math:`\eta`, a finite number > 0
      or an optax schedule (called with the base optimizer's own count,
      which advances once per ``update`` as this state's does).
    momentum: :math:`\mu`, a real number in ``[0, 1)`` (0: the buffer is
      the last gradient).
    weight_decay: :math:`\lambda`, a finite number >= 0 or an optax
      schedule, added as ``optax.add_decayed_weights`` does.
    mask: which params decay, as ``optax.add_decayed_weights``'s ``mask``
      (None: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`MomentumSAMState`; its output is the update (not a gradient).

  Raises:
    ValueError: a hyperparameter out of its range (naming it and the
      range); at ``update``, no ``params``, or params and updates of
      different structures or non-float leaves.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> params = {"w": jnp.array([1.0, -2.0])}  # the loop's params: perturbed after the first step
    >>> tx = xsam_jax.momentum_sam(rho=0.1, learning_rate=0.01, momentum=0.9)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)  # no loss_fn
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in params["w"]]  # perturbed by 0.1 along -m / |m|
    [0.8725, -0.7204]
    >>> eval_params = xsam_jax.momentum_sam_params(params, state)  # unperturbed, for evaluation
    >>> [round(float(x), 4) for x in eval_params["w"]]
    [0.8851, -0.8196]

  References:
    Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead, https://arxiv.org/abs/2401.12033, 2024;
    code: https://github.com/MarlonBecker/MSAM.
  """
  _check_shared(rho, learning_rate, weight_decay)
  _check_unit_interval("momentum", momentum)
  base_optimizer = optax.chain(
    optax.add_decayed_weights(weight_decay, mask), optax.sgd(learning_rate, momentum=momentum)
  )
  return _momentum_sam_transform("momentum_sam", rho, base_optimizer, decay_unperturbed=False)


def momentum_sam_adamw(
  rho: optax.ScalarOrSchedule,
  *,
  learning_rate: optax.ScalarOrSchedule,
  b1: Scalar = 0.9,
  b2: Scalar = 0.999,
  eps: Scalar = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: PyTree | Callable[[PyTree], PyTree] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM with AdamW: the perturbation along the negative normalised first moment.

  As :func:`momentum_sam`, with ``optax.adamw`` (same arguments, same
  defaults) as the base optimizer and its first moment :math:`\mu_t` as the
  momentum: with :math:`g_t = \nabla L(p_t)` at the held (perturbed) params,

  .. math::

    w_t &= p_t + \rho_{t-1}\, \hat\mu_{t-1} \\
    \mu_t &= \beta_1 \mu_{t-1} + (1 - \beta_1)\, g_t, \qquad
      \nu_t = \beta_2 \nu_{t-1} + (1 - \beta_2)\, g_t^2 \\
    w_{t+1} &= w_t - \eta_t \Big( \frac{\mu_t / (1 - \beta_1^{t+1})}
      {\sqrt{\nu_t / (1 - \beta_2^{t+1})} + \epsilon} + \lambda\, w_t \Big) \\
    p_{t+1} &= w_{t+1} - \rho_t\, \hat\mu_t ,

  with :math:`\hat\mu = \mu / \|\mu\|` (0 for :math:`\mu = 0`). The output
  is the update :math:`p_{t+1} - p_t`; at ``rho=0`` it is ``optax.adamw``'s
  (bitwise op by op; jitted, within XLA's fusion rounding). Get the unperturbed :math:`w_t` with
  :func:`momentum_sam_params`.

  A separate factory, not a ``base=`` option of :func:`momentum_sam`: each
  takes exactly its optax counterpart's hyperparameters and defaults
  (``optax.sgd``'s ``momentum``, ``optax.adamw``'s ``b1, b2, eps,
  weight_decay=1e-4, mask``), so ``optax.inject_hyperparams`` and the
  validation see no argument that the chosen base ignores.

  Departures from the authors' code (``optimizer/adamW_msam.py``), besides
  the exact normalisation and the single added update of
  :func:`momentum_sam`:

  - The weight decay is optax's (and PyTorch's ``AdamW``):
    :math:`w_{t+1} = w_t - \eta_t (\text{adam}_t + \lambda w_t)`; the
    authors multiply after the Adam step, :math:`(w_t - \eta_t
    \text{adam}_t)(1 - \eta_t \lambda)`, which differs by
    :math:`\eta_t^2 \lambda\, \text{adam}_t` per step. As theirs, it decays
    the unperturbed :math:`w_t`.
  - The bias correction is optax's :math:`\sqrt{\nu_t / (1 -
    \beta_2^{t+1})}`, theirs :math:`\sqrt{\nu_t} / \sqrt{1 - \beta_2^{t+1}}`
    (rounding only). Their default ``weight_decay`` is 1e-2 (PyTorch's);
    this factory keeps ``optax.adamw``'s 1e-4.

  The rule with its edge cases, in one place: :ref:`the algorithm page <alg-momentum-sam>`.

  Args:
    rho: perturbation radius, a finite real number >= 0 (0: plain AdamW),
      or an optax schedule of this state's ``count`` (values >= 0). The
      authors' README uses ``rho=3`` for a ViT with AdamW.
    learning_rate: :math:`\eta`, a finite number > 0 or an optax schedule.
    b1, b2: the moments' decay rates, real numbers in ``[0, 1)``.
    eps: :math:`\epsilon`, a finite number >= 0.
    weight_decay: :math:`\lambda`, a finite number >= 0 or an optax schedule.
    mask: which params decay, as ``optax.adamw``'s ``mask`` (None: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`MomentumSAMState`; its output is the update.

  Raises:
    ValueError: a hyperparameter out of its range (naming it and the
      range); at ``update``, as :func:`momentum_sam`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), xsam_jax.momentum_sam_adamw(0.1, learning_rate=0.01))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 4) for x in xsam_jax.momentum_sam_params(params, state)["w"]]
    [0.97, -1.97]

  References:
    Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead, https://arxiv.org/abs/2401.12033, 2024;
    code: https://github.com/MarlonBecker/MSAM.
    Loshchilov and Hutter, Decoupled Weight Decay Regularization,
    https://arxiv.org/abs/1711.05101, 2019.
  """
  _check_shared(rho, learning_rate, weight_decay)
  _check_unit_interval("b1", b1)
  _check_unit_interval("b2", b2)
  validation.check_nonnegative("eps", eps)
  base_optimizer = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  return _momentum_sam_transform("momentum_sam_adamw", rho, base_optimizer, decay_unperturbed=True)


def _momentum_sam_transform(
  method: str, rho: optax.ScalarOrSchedule, base_optimizer: optax.GradientTransformation, *, decay_unperturbed: bool
) -> optax.GradientTransformationExtraArgs:
  """Momentum-SAM around ``base_optimizer``, whose state holds the momentum (see :func:`_momentum`).

  ``decay_unperturbed``: the base optimizer gets the unperturbed ``w_t``
  as its params (AdamW's decoupled decay); else the held ``p_t`` (SGD's L2
  term, part of the gradient at ``p_t``).
  """

  def init_fn(params: optax.Params) -> MomentumSAMState:
    base_state = base_optimizer.init(params)
    dtype = tm.scalar_dtype(_momentum(method, base_state))
    return MomentumSAMState(
      count=base.zero_count(),
      base_state=base_state,
      ascent_scale=tm.Inverse(jnp.ones([], dtype), jnp.zeros([], dtype)),  # no perturbation before the first step
      momentum_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
  ) -> tuple[optax.Updates, MomentumSAMState]:
    del extra_args
    if params is None:
      raise ValueError(
        f"{method}.update needs `params` (the perturbed params the training loop holds, where `updates` is the "
        f"gradient): call it as `tx.update(grads, state, params)`."
      )
    params = validation.as_array_leaves(method, "params", params)
    updates = validation.as_array_leaves(method, "updates", updates)
    validation.check_float_leaves(f"{method}.update", "params", params)
    validation.check_float_leaves(f"{method}.update", "updates", updates)
    validation.check_updates_match_params(method, updates, params)
    # e_{t-1} = (rho_{t-1} / |m_{t-1}|) m_{t-1}, in wide precision: the held params are w_t - e_{t-1}.
    e_old = state.ascent_scale.apply_tree(tm.tree_wide(_momentum(method, state.base_state)))
    w = tm.tree_add_to_params(params, e_old) if decay_unperturbed else params
    step, base_state = base_optimizer.update(updates, state.base_state, w)  # w_{t+1} - w_t
    m = tm.tree_wide(_momentum(method, base_state))
    norm = tm.tree_norm_parts(m)
    inverse = norm.inverse()  # 1 / |m|, exact at any scale; 1 for m = 0 (which stays 0)
    rho_t = jnp.asarray(rho(state.count) if callable(rho) else rho)
    ascent_scale = tm.Inverse(inverse.pow2, rho_t.astype(inverse.mant.dtype) * inverse.mant)
    e_new = ascent_scale.apply_tree(m)
    # p_{t+1} - p_t = e_{t-1} + (w_{t+1} - w_t) - e_t; at rho = 0 both e are zeros and the output is `step`.
    output = jax.tree.map(lambda s, a, b, p: ((s.astype(a.dtype) + a) - b).astype(p.dtype), step, e_old, e_new, params)
    dtype = state.ascent_scale.mant.dtype
    new_state = MomentumSAMState(
      count=jnp.asarray(optax.safe_increment(state.count)),
      base_state=base_state,
      ascent_scale=tm.Inverse(ascent_scale.pow2.astype(dtype), ascent_scale.mant.astype(dtype)),
      momentum_norm=norm.value.astype(jnp.float32),
    )
    return output, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum_sam_params(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  r"""The unperturbed weights :math:`w_t = p_t + \rho_{t-1} \hat m_{t-1}` of a Momentum-SAM run.

  The params a :func:`momentum_sam` (or :func:`momentum_sam_adamw`)
  training loop holds are the perturbed :math:`p_t`; evaluate, export,
  average or report the model at :math:`w_t`, which this returns (the
  authors' ``move_back_from_momentumAscent``, without changing the loop's
  params). To resume training, checkpoint the loop's ``params`` and
  ``opt_state`` as they are. Before the first step (and at ``rho=0``) it
  returns ``params``' values.

  Args:
    params: the params the training loop holds (the perturbed ones).
    opt_state: the whole optimizer state: the state of ``momentum_sam``
      itself, or of anything holding exactly one such state (an
      ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
      ...), which is found by its type.

  Returns:
    The unperturbed params, with ``params``' structure and dtypes (the sum
    is formed in float32 or wider). Works under ``jax.jit``.

  Raises:
    ValueError: ``opt_state`` holds no :class:`MomentumSAMState` or
      several, or its momentum does not have the structure and shapes of
      ``params`` (a state of a ``momentum_sam`` inside ``optax.masked`` or
      ``optax.partition``: call this on the matching part of the params).

  Example:
    >>> import jax.numpy as jnp, optax, xsam_jax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), xsam_jax.momentum_sam(0.5, learning_rate=0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> params = optax.apply_updates(params, updates)  # w - 0.1 m - 0.5 m / |m|, m = (0.6, 0.8) after the clip
    >>> [round(float(x), 3) for x in params["w"]]
    [0.64, -2.48]
    >>> [round(float(x), 3) for x in xsam_jax.momentum_sam_params(params, state)["w"]]
    [0.94, -2.08]
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MomentumSAMState))
    if isinstance(s, MomentumSAMState)
  ]
  if len(found) != 1:
    raise ValueError(
      "momentum_sam_params: `opt_state` must hold exactly one MomentumSAMState (the state of "
      f"xsam_jax.momentum_sam or momentum_sam_adamw, possibly inside a chain or wrapper), found {len(found)}."
    )
  state = found[0]
  m = _momentum("momentum_sam_params", state.base_state)
  params = validation.as_array_leaves("momentum_sam_params", "params", params)
  validation.check_like_params("momentum_sam_params", "the momentum in opt_state", m, params)
  return tm.tree_add_to_params(params, state.ascent_scale.apply_tree(tm.tree_wide(m)))
