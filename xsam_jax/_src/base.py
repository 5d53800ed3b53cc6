"""One factory for every sharpness-aware transformation.

Every method is "ascent, then a rule that turns the ascent trace into the
output gradient". A method supplies its state's ``init`` and its ``rule``;
this module does the hyperparameter and calling-convention checks, the
ascent, the counter and the dtype bookkeeping once for all of them.

The options every method shares (the radius, the ascent's steps, data
parallelism, ASAM, the training controls) are one :class:`Options` record,
built and checked once by :meth:`Options.from_arguments`; a method's factory
keeps its public keyword arguments flat (so ``optax.inject_hyperparams``
sees them) and passes its own arguments in (docs/controls.md, "Options
every method takes").

Un-jitted (eager) calls of ``update`` run the whole update as one
``jax.jit``-compiled function, kept per transformation and ``loss_fn`` (see
:class:`_EagerCache`): op by op, the ``jax.lax.cond`` branches, which close
over the call's arrays, would be traced and compiled anew on every call.
"""

from __future__ import annotations

import collections
import functools
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src import ascent as ascent_lib
from xsam_jax._src import collectives, precision, validation
from xsam_jax._src import tree_math as tm
from xsam_jax._src.types import AxisName, LossFn, PyTree, Scalar

Rule = Callable[[ascent_lib.AscentTrace, Any, PyTree, LossFn], tuple[PyTree, Any]]
"""``rule(trace, state, params, loss_fn) -> (output_tree, new_state)``."""

SkipRule = Callable[[PyTree, Any, PyTree], tuple[PyTree, Any]]
"""``skip_rule(g0, state, params) -> (output_tree, new_state)``: the output of a step that does not perturb."""

Perturbation = Callable[["Options", LossFn, PyTree, PyTree, Any, jax.Array], ascent_lib.AscentTrace]
"""``perturbation(options, loss_fn, params, g0, state, count) -> trace``: a method's own perturbation in place of
the shared ascent (random weight perturbation), returning what :func:`~xsam_jax._src.ascent.ascent` returns."""


class SplitLoss(NamedTuple):
  """A loss given in two parts, ``output_loss_fn(model_fn(params))``, for a method that needs both (Functional SAM).

  What ``update`` builds from its ``model_fn=`` and ``output_loss_fn=``
  keyword arguments when the method's factory passes ``split_loss=True``
  to :func:`transform`; the ascent, the checks and the perturbation see it
  as the loss (it is callable), and a ``perturbation`` reads its two parts.
  A NamedTuple: equal parts give equal keys in the eager cache, and
  ``jax.tree_util.Partial`` parts whose arguments are arrays are passed as
  traced arguments (:class:`_EagerCache`).

  Attributes:
    model_fn: ``model_fn(params) -> outputs``, any pytree (the logits).
    output_loss_fn: ``output_loss_fn(outputs) -> scalar`` (or ``(scalar,
      aux)``), the loss of the outputs on the batch.
  """

  model_fn: Callable[[PyTree], PyTree]
  output_loss_fn: Callable[[PyTree], Any]

  def __call__(self, params: PyTree) -> jax.Array:
    """The loss ``output_loss_fn(model_fn(params))``."""
    return self.output_loss_fn(self.model_fn(params))


def split_loss_from(method: str, loss_fn: Any, extra_args: Mapping[str, Any]) -> SplitLoss:
  """The :class:`SplitLoss` of an ``update`` call's ``model_fn=`` and ``output_loss_fn=`` (``loss_fn`` unused).

  Raises:
    ValueError: either is missing or not callable, naming what to pass.
  """
  model_fn, output_loss_fn = extra_args.get("model_fn"), extra_args.get("output_loss_fn")
  missing = [n for n, v in (("model_fn", model_fn), ("output_loss_fn", output_loss_fn)) if v is None]
  if missing:
    given = " (`loss_fn` alone is not enough: the method needs the model and the loss of its outputs apart)"
    raise ValueError(
      f"{method}.update needs {' and '.join(f'`{m}`' for m in missing)}"
      f"{given if loss_fn is not None else ''}: call it as `tx.update(grads, state, params, model_fn=model_fn, "
      "output_loss_fn=output_loss_fn)`, where `model_fn(params)` returns the model's outputs on the batch (any "
      "pytree, e.g. the logits), `output_loss_fn(outputs)` the scalar loss of those outputs, and `grads` the "
      "gradient of `output_loss_fn(model_fn(params))` at `params`. With Flax: "
      "`xsam_jax.flax.value_grad_and_model_fns` (NNX) gives all four; "
      "`xsam_jax.flax.TrainState.apply_gradients(grads=..., model_fn=..., output_loss_fn=...)` (Linen) forwards them."
    )
  for name, fn in (("model_fn", model_fn), ("output_loss_fn", output_loss_fn)):
    if not callable(fn):
      raise ValueError(f"{method}.update: `{name}` must be callable, got {type(fn).__name__}.")
  return SplitLoss(model_fn, output_loss_fn)  # type: ignore[arg-type]  # checked callable above


class Options(NamedTuple):
  """The options every method shares, checked once (docs/controls.md, "Options every method takes").

  Built by :meth:`from_arguments` (which checks it), never field by field;
  :func:`transform` runs a method with it. The fields are the keyword
  arguments of :func:`sharpness_aware_transform` of the same names, with
  ``num_steps``, ``adaptive`` and ``m_sharpness`` as checked Python values.
  Inside :func:`transform` the two masks are replaced by the static bool
  trees resolved for the params at hand (``perturb_mask`` None: all leaves).

  Attributes:
    method: the public name, used in error messages.
    rho: the ascent radius, a scalar or an optax schedule.
    num_steps: the ascent's K, a Python int >= 1.
    axis_name: the data-parallel axis, or None.
    adaptive: ASAM's rescaled ascent, a Python bool.
    eta: ASAM's offset.
    adaptive_mask: which leaves ASAM rescales (None: all).
    m_sharpness: per-replica perturbation (with ``axis_name``), a Python bool.
    perturb_mask: which leaves are perturbed (None: all).
    perturb_every: the period of the perturbed steps.
    perturb_start: the first perturbed step.
    check_updates: the first-step check of the incoming updates against
      ``grad(loss_fn)`` (:func:`check_incoming_updates`), a Python bool.
  """

  method: str
  rho: optax.ScalarOrSchedule
  num_steps: int
  axis_name: AxisName | None
  adaptive: bool
  eta: Scalar
  adaptive_mask: PyTree | Callable[[PyTree], PyTree]
  m_sharpness: bool
  perturb_mask: PyTree | Callable[[PyTree], PyTree]
  perturb_every: int | jax.Array
  perturb_start: int | jax.Array
  check_updates: bool

  @classmethod
  def from_arguments(cls, method: str, arguments: Mapping[str, Any], **fixed: Any) -> Options:
    """The checked options of a factory call, picked by name from its arguments.

    A factory passes ``locals()`` as its first statement (its arguments,
    nothing else yet), so its public keyword arguments stay flat and the
    forwarding is written once, here. The names a method does not take
    (``num_steps`` of a one-step method, ``perturb_every`` of LookSAM, which
    is its ``k``) are given in ``fixed``.

    Args:
      method: the public name, used in error messages.
      arguments: the factory's arguments by name; names that are not
        options (the method's own hyperparameters) are ignored.
      **fixed: the options the factory does not take as arguments.

    Returns:
      The options, checked: ``num_steps``, ``adaptive`` and ``m_sharpness``
      as Python values.

    Raises:
      ValueError: an option out of its range or of the wrong form, or
        ``m_sharpness=True`` without ``axis_name``.
      TypeError: (a bug in the factory) an option neither among
        ``arguments`` nor in ``fixed``, or in both.
    """
    names = cls._fields[1:]
    given = {name: arguments[name] for name in names if name in arguments}
    twice, unknown = given.keys() & fixed.keys(), fixed.keys() - set(names)
    wrong = sorted(twice | unknown | (set(names) - given.keys() - fixed.keys()))
    if wrong:
      raise TypeError(f"{method}: the shared options {wrong} must each come once, from the arguments or `fixed`.")
    options = cls(method, **given, **fixed)
    validation.check_rho("rho", options.rho)
    num_steps = validation.check_static_int("num_steps", options.num_steps)
    validation.check_period("perturb_every", options.perturb_every, allow_none=False)
    validation.check_start("perturb_start", options.perturb_start)
    validation.check_nonnegative("eta", options.eta)
    options = options._replace(
      num_steps=num_steps,
      adaptive=validation.check_bool("adaptive", options.adaptive),
      m_sharpness=validation.check_bool("m_sharpness", options.m_sharpness),
      check_updates=validation.check_bool("check_updates", options.check_updates),
    )
    if options.m_sharpness and options.axis_name is None:
      raise ValueError(
        f"{method}: `m_sharpness=True` needs `axis_name` (the data-parallel axis "
        "whose replicas each perturb on their own shard)."
      )
    return options

  def replica_mean(self, tree: PyTree) -> PyTree:
    """``tree`` averaged over ``axis_name`` with ``m_sharpness``, else ``tree`` itself.

    What a rule applies to anything it keeps in the state or reports
    (diagnostics, averages), so that the state stays the same on every
    replica; without ``m_sharpness`` the trace is the same on every replica
    already.
    """
    return collectives.replica_mean(tree, self.axis_name) if self.m_sharpness else tree


def sharpness_aware_transform(
  method: str,
  *,
  rho: optax.ScalarOrSchedule,
  num_steps: int,
  init_fn: optax.TransformInitFn,
  rule: Rule,
  axis_name: AxisName | None = None,
  adaptive: bool = False,
  eta: Scalar = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] = None,
  first_direction: Callable[[PyTree, Any], PyTree] | None = None,
  m_sharpness: bool = False,
  check_state: Callable[[Any], None] | None = None,
  perturb_mask: PyTree | Callable[[PyTree], PyTree] = None,
  perturb_every: int | jax.Array = 1,
  perturb_start: int | jax.Array = 0,
  skip_rule: SkipRule | None = None,
  check_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a ``GradientTransformationExtraArgs`` from a direction rule.

  .. seealso:: :ref:`common-options` (docs/controls.md), the options every
     method takes, described once.

  Args:
    method: the public name, used in error messages.
    rho: ascent radius, a finite real scalar > 0 (Python number or 0-d
      array; may be traced), or an optax schedule: a callable of the
      transformation's own step count (its ``update`` calls so far) whose
      value must be finite and >= 0; only its value at step 0 is checked
      (at construction), the rest is the caller's promise.
    num_steps: number of ascent steps K, a Python int >= 1.
    init_fn: ``params -> state``; the state is a NamedTuple with a
      ``count`` and a ``perturbed_loss`` (float32 scalar), which this
      factory keeps: ``L(w + d_K)`` at the last step that perturbed (0
      before the first), averaged over ``axis_name``. With a
      ``perturb_mask``, ``init_fn`` receives the perturbed leaves only (see
      :func:`~xsam_jax._src.ascent.restrict`), and so do ``rule`` and
      ``first_direction``.
    rule: ``(trace, state, params, loss_fn) -> (output, new_state)``, where
      ``loss_fn`` returns the scalar loss (a ``(loss, aux)`` pair's ``aux``
      already dropped); the output is any pytree matching params (any float
      dtype); this factory casts it to the params' dtypes and advances
      ``count``. The rule (and ``first_direction``) sees ``state.count`` as
      the number of earlier steps that perturbed (``count`` itself unless
      ``perturb_every``/``perturb_start`` skip steps): periods inside a
      method count perturbed steps. ``trace.step`` is the true count (the
      argument of schedules).
    axis_name: collective axis for data parallelism (see :func:`ascent`).
    adaptive, eta, adaptive_mask: ASAM options (see :func:`ascent`):
      ``adaptive`` a bool, ``eta`` a finite real scalar >= 0,
      ``adaptive_mask`` None, a pytree with params' structure holding one
      bool per leaf, or a callable ``params -> such pytree`` (checked
      against params at ``update``).
    first_direction: optional ``(g0, state) -> tree``: the direction of the
      first ascent step, from the (axis-averaged) incoming gradient and the
      state before the update; default ``g0``. The rule finds the tree it
      returned in ``trace.first_direction`` (to store it, say).
    m_sharpness: per-replica perturbation (needs ``axis_name``): the ascent
      is not averaged (see :func:`ascent`), the rule sees its replica's own
      trace, and its output is averaged over ``axis_name`` here. A rule that
      reduces anything else (probe losses, diagnostics kept in the state)
      must average it itself so that the state stays the same on every
      replica. A bool.
    check_state: optional ``state -> None`` run at ``update`` (trace time)
      before the generic check that the state has the structure and leaf
      shapes ``init_fn`` gives for these params; it may raise a
      ``ValueError`` that names the method's own cause of a mismatch.
    perturb_mask: which leaves are perturbed: None (all), a pytree with
      params' structure holding one Python bool per leaf, or a callable
      ``params -> such pytree`` (as in ``optax.masked``). The ascent and the
      rule see only the marked leaves (norms, angles and probes are taken
      over them); the output's other leaves are ``g_K``, their gradient at
      the perturbed point. No marked leaf: the output is ``g_0``, with no
      extra pass.
    perturb_every, perturb_start: perturb on the steps ``count >=
      perturb_start`` with ``(count - perturb_start) % perturb_every == 0``
      (ints >= 1 and >= 0); on the others ``skip_rule`` gives the output
      and no extra pass runs (``jax.lax.cond``). The defaults perturb on
      every step (no ``cond`` in the program).
    skip_rule: ``(g0, state, params) -> (output, new_state)`` for the steps
      that do not perturb (``state.count`` as the rule sees it: the number
      of earlier perturbed steps); default ``(g0, state)``.
    check_updates: on the first call (``count == 0``), compare the incoming
      ``updates`` with ``jax.grad(loss_fn)(params)`` and raise when they
      differ beyond rounding, naming the chain order as the likely cause
      (:func:`check_incoming_updates`). A bool; it adds one gradient
      evaluation to the first step (under ``jax.lax.cond``: the later steps
      skip it).

  Returns:
    The transformation. Its ``update(updates, state, params, *, loss_fn,
    probe_loss_fn=None, **extra_args)`` ignores unknown extra args. A step
    whose output is not finite keeps every state field but ``count``
    (:func:`keep_state_if_nonfinite`).
    ``probe_loss_fn``, if given, is what the rule receives as its
    ``loss_fn``: the loss for evaluations other than the ascent gradients
    (XSAM's probe losses, EigenSAM's Hessian-vector products), e.g. the same
    loss computed in float32 for a bfloat16 model; the ascent always uses
    ``loss_fn``. ``loss_fn(params)`` returns
    the scalar loss or a ``(loss, aux)`` pair, whose ``aux`` is ignored
    (anything else is a ``ValueError`` when the update is traced; the
    ascent, the probes and the rule all see the scalar loss). ``params`` and ``updates``
    must be trees of one structure whose leaves are real floating-point
    arrays (Python and NumPy scalars are taken as 0-d arrays); integer,
    bool, complex or otherwise non-float leaves, a state made for other
    settings or params, and a malformed ``adaptive_mask`` raise a
    ``ValueError`` at ``update`` naming the leaf. Called outside any JAX
    transformation (no tracer among its inputs), ``update`` runs as one
    ``jax.jit``-compiled function, compiled once per ``loss_fn`` and input
    shapes: pass the same ``loss_fn`` object on every call, or a
    ``jax.tree_util.Partial`` whose array arguments (the batch) change. As
    under ``jax.jit``, ``loss_fn`` must be pure: what it reads from globals
    or attributes is frozen when it is traced (``jax.disable_jit()`` runs
    the update op by op instead).

  Raises:
    ValueError: a hyperparameter out of its range or of the wrong form, or
      ``m_sharpness=True`` without ``axis_name``.
  """
  options = Options.from_arguments(method, locals())
  return transform(
    options, init_fn=init_fn, rule=rule, first_direction=first_direction, check_state=check_state, skip_rule=skip_rule
  )


def transform(
  options: Options,
  *,
  init_fn: optax.TransformInitFn,
  rule: Rule,
  first_direction: Callable[[PyTree, Any], PyTree] | None = None,
  check_state: Callable[[Any], None] | None = None,
  skip_rule: SkipRule | None = None,
  carried: tuple[str, ...] | None = None,
  perturbation: Perturbation | None = None,
  split_loss: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """:func:`sharpness_aware_transform` with the shared options already checked (:meth:`Options.from_arguments`).

  What every method's factory returns; the other arguments are those of
  :func:`sharpness_aware_transform`, and ``carried`` names the state fields
  that feed later outputs, kept on a non-finite step
  (:func:`keep_state_if_nonfinite`): None for every field but ``count``;
  ``()`` when there are none (only diagnostics), which skips the check and
  its pass over the output. ``perturbation``, if given, replaces the shared
  ascent on the steps that perturb: ``perturbation(options, loss_fn,
  params, g0, state, count)`` (the options with the masks resolved, the
  state as the rule sees it, the true step count) returns the trace the
  rule receives, with whole-tree gradients as :func:`ascent_lib.ascent`
  gives them (a method that does not climb: :func:`xsam_jax.rwp`).
  ``split_loss=True`` (Functional SAM) makes ``update`` take the loss in
  two parts, ``update(updates, state, params, *, model_fn, output_loss_fn,
  **extra_args)`` (a ``ValueError`` naming them when either is missing;
  ``loss_fn``, if passed, is not used): everything that takes a loss
  receives the :class:`SplitLoss` ``output_loss_fn(model_fn(params))``, whose
  parts the ``perturbation`` reads.
  """
  method, perturb_every, perturb_start = options.method, options.perturb_every, options.perturb_start
  always = _is_int(perturb_every, 1) and _is_int(perturb_start, 0)  # static: no cond in the program

  def moved(params: PyTree) -> PyTree:
    """The static bool tree of the perturbed leaves, or None (all of them)."""
    mask = options.perturb_mask
    return None if mask is None else validation.check_mask(method, "perturb_mask", mask, params)

  def init(params: optax.Params) -> Any:
    params = validation.as_array_leaves(method, "params", params)
    validation.check_float_leaves(f"{method}.init", "params", params)
    state = init_fn(ascent_lib.restrict(params, moved(params)))
    # One buffer per leaf: a state whose fields share an array (one `zero` for several scalars) cannot be
    # donated to a jitted step, and a step that passes fields through unchanged would alias them.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

  def core(
    updates: optax.Updates, state: Any, params: optax.Params, loss_fn: LossFn, probe_loss_fn: LossFn | None
  ) -> tuple[optax.Updates, Any]:
    # Wrapped here, under the eager cache, whose key stays the caller's loss_fn.
    loss_fn = _scalar_loss(method, loss_fn)
    rule_loss_fn = (
      loss_fn if probe_loss_fn is None else validation.scalar_loss(f"{method}.update", probe_loss_fn, "probe_loss_fn")
    )
    validation.check_float_leaves(f"{method}.update", "params", params)
    validation.check_float_leaves(f"{method}.update", "updates", updates)
    validation.check_updates_match_params(method, updates, params)
    if check_state is not None:
      check_state(state)
    where = moved(params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ascent_lib.restrict(params, where))
    validation.check_state_matches(method, state, jax.eval_shape(init_fn, shapes))
    mask = validation.check_adaptive_mask(method, options.adaptive_mask, params) if options.adaptive else None
    count = state.count
    always_skip = where is not None and not any(jax.tree.leaves(where))  # nothing to perturb: g_0, no extra pass
    # The rule counts perturbed steps: it sees state.count as their number so far.
    index = count if always else _perturbed_before(count, perturb_every, perturb_start)
    inner = state._replace(count=index)

    spec = options._replace(adaptive_mask=mask, perturb_mask=where)  # the masks resolved for these params
    if options.check_updates:
      check_incoming_updates(method, updates, params, loss_fn, count, axis_name=options.axis_name)
    perturb = lambda _: _perturbed(
      spec, rule, first_direction, updates, inner, params, loss_fn, rule_loss_fn, count, perturbation
    )
    skip = lambda _: _skipped(spec, skip_rule, updates, inner, params, loss_fn)
    if always_skip:
      output, new_state = skip(None)
    elif always:
      output, new_state = perturb(None)
    else:
      output, new_state = jax.lax.cond(_perturbs(count, perturb_every, perturb_start), perturb, skip, None)
    new_state = new_state._replace(count=optax.safe_increment(count))
    if carried is None or carried:
      new_state = keep_state_if_nonfinite(output, new_state, state, carried)
    return output, new_state

  eager = _EagerCache(method, core)

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    *,
    loss_fn: LossFn | None = None,
    probe_loss_fn: LossFn | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    loss_fn = cast(LossFn, split_loss_from(method, loss_fn, extra_args)) if split_loss else loss_fn
    del extra_args
    validation.check_not_in_multisteps(method)
    validation.check_call(method, params, loss_fn, probe_loss_fn)
    assert loss_fn is not None  # for the type checker: check_call raised otherwise
    params = validation.as_array_leaves(method, "params", params)
    updates = validation.as_array_leaves(method, "updates", updates)
    if _is_traced((updates, state, params, loss_fn, probe_loss_fn)):
      return core(updates, state, params, loss_fn, probe_loss_fn)
    return eager(updates, state, params, loss_fn, probe_loss_fn)

  return optax.GradientTransformationExtraArgs(init, update_fn)


def keep_state_if_nonfinite(output: PyTree, new_state: Any, state: Any, fields: tuple[str, ...] | None = None) -> Any:
  """``new_state`` with ``fields`` (None: all but ``count``) from ``state`` when ``output`` is not all finite.

  One bad batch (a NaN loss, a float16 overflow at the ascent point) then
  costs one step and nothing more: a moving average or a stored direction
  made from it would otherwise stay NaN for the rest of the run
  (``optax.apply_if_finite`` after the transformation skips the base
  optimizer's step but cannot repair this transformation's state). The
  count still advances, as on every call (the contract: one call is one
  step, and a ``count`` that depended on the data would turn every
  ``jax.lax.cond`` on it into a select under ``jax.vmap``); diagnostics not
  in ``fields`` report the bad step. The output itself is returned
  unchanged (non-finite), for ``apply_if_finite`` to see.
  """
  ok = tm.tree_all_finite(output)
  names = [f for f in new_state._fields if f != "count"] if fields is None else list(fields)
  return new_state._replace(
    **{
      f: jax.tree.map(lambda new, old: jnp.where(ok, new, old), getattr(new_state, f), getattr(state, f)) for f in names
    }
  )


def check_incoming_updates(
  method: str,
  updates: PyTree,
  params: PyTree,
  loss_fn: LossFn,
  count: jax.Array,
  *,
  axis_name: AxisName | None = None,
) -> None:
  r"""On the first call (``count == 0``), raise unless ``updates`` is ``jax.grad(loss_fn)(params)`` within rounding.

  The incoming ``updates`` must be the plain gradient of ``loss_fn`` at
  ``params``. A transformation placed before the sharpness-aware one in the
  chain (``optax.clip_by_global_norm``, ``optax.add_decayed_weights``,
  ``optax.scale_by_adam``) changes them, and the sharpness-aware output,
  made from fresh gradients of ``loss_fn``, silently drops that change. The
  check computes ``g = jax.grad(loss_fn)(params)`` (under ``jax.lax.cond``:
  later steps pay nothing) and compares

  .. math::

    r = \frac{\|u - g\|}{\|g\|} \quad \text{with the tolerance} \quad
    \tau = \max\big(10^{-3}, \min(0.25,\ 32\, \epsilon_{\min})\big),

  where :math:`\epsilon_{\min}` is the machine epsilon of the narrowest float
  among params, updates and the dot/conv operands of ``loss_fn`` (so
  :math:`\tau = 10^{-3}` for a float32 model, 0.031 for float16 and 0.25
  for bfloat16 compute: two programs computing one gradient differ by a few
  roundings of each operand, well below these; a clip, a weight decay or a
  scale before the transformation moves it by far more). A non-finite ``u`` or ``g`` is not checked (a
  bad batch is :func:`keep_state_if_nonfinite`'s case). With ``axis_name``
  both sides are first made the global gradient, as the ascent makes them
  (:func:`~xsam_jax._src.collectives.gradient_sync`).

  The comparison runs on the device; a mismatch raises a ``ValueError``
  from a ``jax.debug.callback`` (under ``jax.jit`` it arrives wrapped in
  JAX's runtime error, with this message).
  """
  narrow = precision.narrowest_float(loss_fn, params, extra=(*jax.tree.leaves(updates), *jax.tree.leaves(params)))
  tol = max(1e-3, min(0.25, 32.0 * float(jnp.finfo(narrow).eps)))

  sync = collectives.gradient_sync(axis_name, loss_fn, params)  # any form of a replica's gradient -> the global one

  def check(_: None) -> None:
    u, g = sync(updates), sync(jax.grad(loss_fn)(params))
    diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), u, g)
    jax.debug.callback(
      functools.partial(_report_mismatch, method, tol),
      tm.tree_norm(diff).astype(jnp.float32),
      tm.tree_norm(g).astype(jnp.float32),
      tm.tree_norm(u).astype(jnp.float32),
    )

  jax.lax.cond(count == 0, check, lambda _: None, None)


def _report_mismatch(method: str, tol: float, diff: Any, ref: Any, got: Any) -> None:
  """The host side of :func:`check_incoming_updates`: raises when ``diff / ref > tol`` (all finite)."""
  diff, ref, got = (float(np.max(np.asarray(x))) for x in (diff, ref, got))
  if not all(np.isfinite(x) for x in (diff, ref, got)):
    return
  if diff <= tol * ref:
    return
  raise ValueError(
    f"{method}: check_updates=True: the `updates` reaching {method}.update are not the gradient of `loss_fn` "
    f"at `params`: |updates - grad(loss_fn)| = {diff:.4g} against |grad(loss_fn)| = {ref:.4g} "
    f"(|updates| = {got:.4g}; tolerance {tol:.1g} relative). The likely cause is the chain order: a "
    f"transformation before {method} in optax.chain (clip_by_global_norm, add_decayed_weights, a scale) "
    f"changed the gradient, and {method}'s output, made from fresh gradients of `loss_fn`, drops that change. "
    f"Put {method} first: optax.chain({method}(...), optax.clip_by_global_norm(...), "
    "optax.add_decayed_weights(...), base_optimizer). Other causes: `grads` taken on another batch, "
    "another loss, or other parameters than `loss_fn` and `params`."
  )


def _perturbed(
  options: Options,
  rule: Rule,
  first_direction: Callable[[PyTree, Any], PyTree] | None,
  updates: PyTree,
  state: Any,
  params: PyTree,
  loss_fn: LossFn,
  rule_loss_fn: LossFn,
  count: jax.Array,
  perturbation: Perturbation | None = None,
) -> tuple[PyTree, Any]:
  """A step that perturbs: the ascent (or the method's ``perturbation``), the rule on the perturbed leaves,
  ``g_K`` on the others.

  ``options`` holds the masks resolved for ``params`` (see :func:`transform`).
  """
  where = options.perturb_mask
  if perturbation is not None:
    trace = perturbation(options, loss_fn, params, updates, state, count)
  else:
    trace = ascent_lib.ascent(
      loss_fn,
      params,
      updates,
      rho=options.rho(count) if callable(options.rho) else options.rho,  # type: ignore[arg-type]  # a scalar either way
      num_steps=options.num_steps,
      axis_name=options.axis_name,
      adaptive=options.adaptive,
      eta=options.eta,
      adaptive_mask=options.adaptive_mask,
      first_direction=None if first_direction is None else (lambda g0: first_direction(g0, state)),
      m_sharpness=options.m_sharpness,
      perturb_mask=where,
    )
  g_k = trace.grads[-1]
  trace = trace._replace(grads=tuple(ascent_lib.restrict(g, where) for g in trace.grads), step=count)
  moved_params = ascent_lib.restrict(params, where)
  moved_out, new_state = rule(trace, state, moved_params, _restricted_loss(rule_loss_fn, where, params))
  output = options.replica_mean(ascent_lib.merge(where, moved_out, g_k))
  if "perturbed_loss" in getattr(new_state, "_fields", ()):  # every method's state; a custom one may lack it
    assert trace.losses  # K >= 1
    loss = collectives.replica_mean(trace.losses[-1], options.axis_name)
    new_state = new_state._replace(perturbed_loss=loss.astype(jnp.float32))
  return tm.tree_cast_like(output, params), new_state


def _skipped(
  options: Options, skip_rule: SkipRule | None, updates: PyTree, state: Any, params: PyTree, loss_fn: LossFn
) -> tuple[PyTree, Any]:
  """A step that does not perturb: ``skip_rule`` on the perturbed leaves (default ``g_0``), ``g_0`` on the others.

  With ``axis_name``, ``g_0`` is the replicas' mean gradient, as on a perturbed step (each replica's own
  ``g_0`` would let the replicas drift apart).
  """
  sync = collectives.gradient_sync(options.axis_name, loss_fn, params, per_replica=options.m_sharpness)
  g0 = options.replica_mean(sync(updates))
  if skip_rule is None:
    return tm.tree_cast_like(g0, params), state
  where = options.perturb_mask
  moved_out, new_state = skip_rule(ascent_lib.restrict(g0, where), state, ascent_lib.restrict(params, where))
  return tm.tree_cast_like(ascent_lib.merge(where, moved_out, g0), params), new_state


def at_step(value: optax.ScalarOrSchedule, trace: ascent_lib.AscentTrace) -> Any:
  """A hyperparameter's value at this step: ``value(trace.step)`` for a schedule, else ``value`` itself."""
  if not callable(value):
    return value
  assert trace.step is not None, "a schedule needs the trace of sharpness_aware_transform (trace.step)"
  return value(trace.step)


def zero_count() -> jax.Array:
  """The int32 step counter every state starts with."""
  return jax.numpy.zeros([], jax.numpy.int32)


def _is_int(value: Any, target: int) -> bool:
  """Whether ``value`` is the static int ``target`` (a traced value never is)."""
  return (
    not isinstance(value, jax.core.Tracer)
    and isinstance(value, (int, np.integer, np.ndarray, jax.Array))
    and int(np.asarray(value)) == target
  )


def _perturbs(count: jax.Array, every: int | jax.Array, start: int | jax.Array) -> jax.Array:
  """Whether step ``count`` perturbs: ``count >= start`` and ``(count - start) % every == 0``."""
  return (count >= start) & ((count - start) % every == 0)


def _perturbed_before(count: jax.Array, every: int | jax.Array, start: int | jax.Array) -> jax.Array:
  """The number of steps before ``count`` that perturbed: ``ceil((count - start) / every)``, at least 0."""
  past = jnp.maximum(count - start, 0)
  return ((past + every - 1) // every).astype(count.dtype)


def _restricted_loss(loss_fn: LossFn, where: PyTree, params: PyTree) -> LossFn:
  """``loss_fn`` as a function of the perturbed leaves, the others fixed at ``params``."""
  if where is None:
    return loss_fn
  return lambda moved: loss_fn(ascent_lib.merge(where, moved, params))


def _is_traced(tree: Any) -> bool:
  """Whether any leaf of ``tree`` (a ``jax.tree_util.Partial``'s arrays included) is a tracer."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class _EagerCache:
  """``core`` compiled with ``jax.jit``, one compiled function per ``loss_fn`` (and ``probe_loss_fn``).

  ``loss_fn`` is a Python callable, so it cannot be a traced argument: each
  compiled function closes over one. It is looked up by ``hash``/``==``
  (identity for functions and lambdas; bound methods of one object compare
  equal). A :class:`jax.tree_util.Partial` whose arguments are all arrays is
  looked up by its function and the arrays are passed as traced arguments,
  so ``Partial(loss, batch)`` with a new ``batch`` each call reuses the
  compilation. As with ``jax.jit``, ``loss_fn`` is traced once per entry
  and input shapes, so it must be pure. The most recent :attr:`SIZE` entries
  are kept (a new closure per call would otherwise keep every closure, and
  its batch, alive); each entry recompiles only for new input shapes or
  dtypes, as ``jax.jit`` does.
  """

  SIZE = 4
  WARN_AFTER = 5
  """New compilations for one loss function's code after which a warning says the cache is defeated."""

  def __init__(self, method: str, core: Callable[..., tuple[optax.Updates, Any]]) -> None:
    self._method = method
    self._core = core
    self._compiles: collections.Counter[Any] = collections.Counter()
    self._warned = False
    # key -> (the (loss_fn, probe_loss_fn) an id-keyed entry was made for, or Nones; the jitted update)
    self._entries: collections.OrderedDict[tuple[Any, ...], tuple[Any, Callable[..., Any]]] = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _split(loss_fn: LossFn | None) -> tuple[tuple[str, Any], list[Any], Callable[[list[Any]], LossFn | None]]:
    """``(key, traced leaves, rebuild)`` with ``rebuild(leaves)`` the loss to call."""
    if isinstance(loss_fn, SplitLoss):  # each part looked up as a loss is
      (k0, xs0, r0), (k1, xs1, r1) = _EagerCache._split(loss_fn.model_fn), _EagerCache._split(loss_fn.output_loss_fn)
      n = len(xs0)
      kind = "id" if "id" in (k0[0], k1[0]) else "split"  # "id": the entry is checked against the parts' identity
      rebuild = lambda xs: cast(LossFn, SplitLoss(r0(xs[:n]), r1(xs[n:])))  # type: ignore[arg-type]  # parts are not None
      return (kind, (k0, k1)), [*xs0, *xs1], rebuild
    if isinstance(loss_fn, jax.tree_util.Partial):
      leaves, treedef = jax.tree.flatten(loss_fn)
      if all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
        try:
          hash(treedef)
        except TypeError:
          pass
        else:
          return ("partial", treedef), leaves, lambda xs: jax.tree.unflatten(treedef, xs)
    try:
      hash(loss_fn)
    except TypeError:  # unhashable: looked up by identity (the entry keeps it alive)
      return ("id", id(loss_fn)), [], lambda _: loss_fn
    return ("callable", loss_fn), [], lambda _: loss_fn

  def __call__(
    self, updates: optax.Updates, state: Any, params: optax.Params, loss_fn: LossFn, probe_loss_fn: LossFn | None
  ) -> Any:
    fns = (loss_fn, probe_loss_fn)
    parts = [self._split(f) for f in fns]  # None (no probe_loss_fn) is hashable: its own key
    key = tuple(k for k, _, _ in parts)
    leaves = [x for _, xs, _ in parts for x in xs]
    n0 = len(parts[0][1])
    rebuild0, rebuild1 = parts[0][2], parts[1][2]
    by_id = any(k[0] == "id" for k in key)
    with self._lock:
      entry = self._entries.get(key)
      if entry is None or (by_id and any(not _same_fn(a, b) for a, b in zip(entry[0], fns, strict=True))):
        core = self._core

        def run(updates: optax.Updates, state: Any, params: optax.Params, loss_leaves: list[Any]) -> Any:
          return core(updates, state, params, rebuild0(loss_leaves[:n0]), rebuild1(loss_leaves[n0:]))

        run.__name__ = run.__qualname__ = f"{self._method}_update"  # names it in jax.log_compiles
        entry = (fns if by_id else (None, None), jax.jit(run))
        self._note_new_entry(loss_fn)
        self._entries[key] = entry
        while len(self._entries) > self.SIZE:
          self._entries.popitem(last=False)
      self._entries.move_to_end(key)
    return entry[1](updates, state, params, leaves)

  def _note_new_entry(self, loss_fn: LossFn) -> None:
    """Warns once when the same loss function's code keeps making new entries (a recompilation each)."""
    origin = _origin(loss_fn)
    if origin is None:
      return
    self._compiles[origin] += 1
    if self._compiles[origin] >= self.WARN_AFTER and not self._warned:
      self._warned = True
      warnings.warn(
        f"{self._method}.update: called outside jax.jit with a new `loss_fn` object on every call (a new "
        "closure or functools.partial of the same function), so each call compiles the update again "
        f"({self._compiles[origin]} compilations so far). Pass `jax.tree_util.Partial(loss, batch)` with the "
        "changing values as array arguments, or put the whole step under `jax.jit`.",
        stacklevel=4,
      )


def _scalar_loss(method: str, loss_fn: LossFn) -> LossFn:
  """``loss_fn`` returning the scalar loss alone (:func:`validation.scalar_loss`); a :class:`SplitLoss` stays one
  (its parts readable), with its output loss so wrapped."""
  if isinstance(loss_fn, SplitLoss):
    wrapped = validation.scalar_loss(f"{method}.update", loss_fn.output_loss_fn, "output_loss_fn")
    return cast(LossFn, SplitLoss(loss_fn.model_fn, wrapped))  # callable: mypy does not see a NamedTuple's __call__
  return validation.scalar_loss(f"{method}.update", loss_fn)


def _same_fn(a: Any, b: Any) -> bool:
  """Whether ``a`` is ``b``, or both are :class:`SplitLoss` of the same parts (each ``is`` the other's)."""
  if isinstance(a, SplitLoss) and isinstance(b, SplitLoss):
    return a.model_fn is b.model_fn and a.output_loss_fn is b.output_loss_fn
  return a is b


def _origin(loss_fn: Any) -> Any:
  """The code object behind ``loss_fn`` (through ``functools.partial`` and ``jax.tree_util.Partial``), if any."""
  while isinstance(loss_fn, functools.partial):
    loss_fn = loss_fn.func
  return getattr(loss_fn, "__code__", None)
