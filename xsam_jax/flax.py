"""Flax helpers: sharpness-aware steps for NNX modules and Linen ``TrainState``.

``import xsam_jax.flax`` needs flax (``pip install xsam_jax[flax]``);
``import xsam_jax`` does not (this is the only module that imports it). Two
pieces, each a 1-3 line change of a plain Flax training step:

- :func:`value_grad_and_loss_fn` (NNX): ``nnx.value_and_grad`` plus the
  ``loss_fn`` the optimizer needs, safe with ``nnx.BatchNorm`` and
  ``nnx.Dropout``;
- :class:`TrainState` (Linen): ``flax.training.train_state.TrainState`` whose
  ``apply_gradients`` passes ``loss_fn`` on to ``tx.update``;
- :func:`value_grad_and_model_fns` (NNX): the same clean pass with the loss
  in two parts, ``model_fn`` and ``output_loss_fn``, for
  :func:`xsam_jax.functional_sam` (Linen: ``apply_gradients(grads=...,
  model_fn=..., output_loss_fn=...)``).

.. seealso:: ``docs/flax.md``, the recipes with BatchNorm, Dropout and
   ``jax.pmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

try:
  from flax import nnx
  from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
  from flax.training import train_state
except ImportError as e:  # name the extra that provides it
  raise ImportError(f"xsam_jax.flax needs flax: pip install 'xsam_jax[flax]' ({e})") from e

__all__ = ("TrainState", "value_grad_and_loss_fn", "value_grad_and_model_fns")


def _is_model_path(path: tuple[Any, ...], value: Any) -> bool:
  """Filter: the state of the model, the first element of the ``(model, *args)`` tuple that is split."""
  del value
  return bool(path) and path[0] == 0


def value_grad_and_loss_fn(
  loss_of_model: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  wrt: nnx.filterlib.Filter = nnx.Param,
  has_aux: bool = False,
  probe_dtype: Any = None,
) -> Any:
  r"""The clean pass of an NNX step, and a pure ``loss_fn`` for the optimizer.

  Replaces ``nnx.value_and_grad`` in a training step: it returns the same
  loss and gradient, and a ``loss_fn(params)`` to pass to
  ``optimizer.update(model, grads, loss_fn=loss_fn)``, which the
  sharpness-aware transformation calls at the perturbed parameters
  ``w + e`` (the ascent and XSAM's probes):

  .. math::

    \text{loss\_fn}(p) = \ell\big(\text{model}[\text{wrt} \leftarrow p,\
      \text{other state} \leftarrow \text{other state before the step}],\ \text{args}\big).

  - The clean pass is exactly ``nnx.value_and_grad(loss_of_model,
    argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)``: it
    updates ``model`` in place (BatchNorm running statistics, RNG counters)
    as a plain step does, bit for bit.
  - ``loss_fn`` is pure. It runs ``loss_of_model`` on a copy of ``model``
    (and of every NNX object in ``args``, such as an ``nnx.Rngs`` passed as
    an argument) rebuilt with ``nnx.merge`` from the state they had before
    the clean pass, with ``params`` in place of the ``wrt`` variables, and
    returns only the loss. Every mutation of the copy (new running
    statistics, RNG counters) is discarded: the extra passes never touch
    ``model``. BatchNorm in training mode normalises with the statistics of
    the batch at ``params``, as in the clean pass; its running averages
    come from the clean pass only.
  - Dropout: the copy starts from the RNG state the clean pass started from,
    so it draws the same keys and applies the same dropout masks. The
    perturbation then measures the sharpness of the one sub-network the
    clean gradient belongs to (as SAM's reference implementations do by
    reusing the batch's masks), rather than adding the noise of a fresh mask
    to every ascent step and probe; XSAM's probes compare losses that differ
    only through the parameters.

  Running the extra passes on the live model instead fails with ``Cannot
  mutate RngCount/BatchStat from a different trace level`` (the optimizer
  calls ``loss_fn`` under ``jax.lax.cond``, ``jax.vmap`` and ``jax.grad``).

  Args:
    loss_of_model: ``loss_of_model(model, *args)``: the scalar loss of the
      batch in ``args`` (or ``(loss, aux)`` with ``has_aux=True``).
    model: the ``nnx.Module``; updated in place by the clean pass only.
    *args: passed to ``loss_of_model`` after ``model``.
    wrt: filter of the variables to differentiate and optimize, the
      ``wrt`` of ``nnx.Optimizer`` (default ``nnx.Param``).
    has_aux: ``loss_of_model`` returns ``(loss, aux)``; the first result is
      then ``(loss, aux)`` from the clean pass, as ``nnx.value_and_grad``
      returns it, and ``loss_fn`` still returns the loss alone (each extra
      pass's aux is discarded).
    probe_dtype: None, or a float dtype (``jnp.float32``) for a fourth
      result, ``probe_loss_fn``: ``loss_fn`` on a twin of the model whose
      every submodule with a ``dtype`` attribute (Flax's computation dtype,
      as on ``nnx.Linear``, ``nnx.Conv``, ``nnx.MultiHeadAttention``,
      ``nnx.LayerNorm``) computes in ``probe_dtype``, with the same
      parameters, state and dropout masks. Pass it as
      ``optimizer.update(model, grads, loss_fn=loss_fn,
      probe_loss_fn=probe_loss_fn)``: XSAM's probes compare losses that
      differ by ~1e-4 relative, below bfloat16's rounding (docs/flax.md,
      "Mixed precision"). Precision set otherwise (an ``astype`` inside
      ``__call__``) is not changed.

  Returns:
    ``(loss, grads, loss_fn)``, or ``(loss, grads, loss_fn, probe_loss_fn)``
    with ``probe_dtype``: the clean pass's loss (or ``(loss, aux)``),
    its gradient (an ``nnx.State`` of the ``wrt`` variables) and
    ``loss_fn(params) -> loss``, where ``params`` has the structure of
    ``nnx.state(model, wrt)`` (``Variable`` leaves or raw arrays, as
    ``nnx.Optimizer.update`` passes them to ``tx.update``). ``loss_fn``
    closes over ``args`` and the pre-step state: call it inside the same
    traced step.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax, xsam_jax.flax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 4, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(4, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.2, rngs=rngs)
    ...     self.out = nnx.Linear(4, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.out(self.dropout(jax.nn.relu(self.bn(self.linear(x)))))
    >>> def loss_of_model(model, x, y):
    ...   return jnp.mean((model(x)[:, 0] - y) ** 2)
    >>> model = Net(nnx.Rngs(0))
    >>> tx = optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(loss_of_model, model, x, y)
    ...   optimizer.update(model, grads, loss_fn=loss_fn)
    ...   return loss
    >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    >>> y = jnp.sin(x).sum(axis=1)
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    >>> losses[-1] < losses[0]
    True
    >>> int(model.dropout.rngs.count[...])  # one dropout key per step: the clean pass's
    20
    >>> bool(jnp.all(model.bn.mean[...] != 0))  # running statistics from the clean passes
    True

  References:
    Foret et al, Sharpness-Aware Minimization for Efficiently Improving
    Generalization, https://arxiv.org/abs/2010.01412, 2021.
  """
  # The state before the clean pass (nnx.split shares the Variables, which the clean pass mutates in
  # place: keep their values). Split with args, so NNX objects passed as arguments and references shared
  # with the model are rebuilt too; only the model's `wrt` variables are replaced by `params`.
  optimized = nnx.All(_is_model_path, wrt)
  graphdef, current, before = nnx.split((model, *args), optimized, ...)  # type: ignore[misc]  # variadic overload
  twin = None if probe_dtype is None else _with_dtype(graphdef, optimized, current, before, probe_dtype)
  before = nnx.as_pure(before)

  value, grads = nnx.value_and_grad(loss_of_model, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)

  def loss_value(module: nnx.Module, *inputs: Any) -> Any:
    out = loss_of_model(module, *inputs)
    return out[0] if has_aux else out

  def loss_in(graph: Any) -> Callable[[Any], Any]:
    return _on_copy(graph, before, loss_value)

  if twin is None:
    return value, grads, loss_in(graphdef)
  return value, grads, loss_in(graphdef), loss_in(twin)


def value_grad_and_model_fns(
  model_call: Callable[..., Any],
  output_loss: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  wrt: nnx.filterlib.Filter = nnx.Param,
  has_aux: bool = False,
) -> tuple[Any, Any, Callable[[Any], Any], Callable[[Any], Any]]:
  r"""The clean pass of an NNX step, and the pure ``model_fn`` and ``output_loss_fn`` of Functional SAM.

  :func:`value_grad_and_loss_fn` for a loss given in two parts,
  ``loss = output_loss(model_call(model, *args), *args)``: the model's
  outputs (the logits) and the loss of those outputs. It returns what
  :func:`xsam_jax.functional_sam` needs,
  ``optimizer.update(model, grads, model_fn=model_fn,
  output_loss_fn=output_loss_fn)``, with

  .. math::

    \text{model\_fn}(p) = \text{model\_call}\big(\text{model}[\text{wrt} \leftarrow p,\
      \text{other state} \leftarrow \text{other state before the step}],\ \text{args}\big), \qquad
    \text{output\_loss\_fn}(o) = \text{output\_loss}(o,\ \text{args}).

  - The clean pass is exactly ``nnx.value_and_grad(loss_of_model,
    argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)`` for
    ``loss_of_model(model, *args) = output_loss(model_call(model, *args),
    *args)``: it updates ``model`` in place (BatchNorm statistics, RNG
    counters) as a plain step does.
  - ``model_fn`` is pure, built as :func:`value_grad_and_loss_fn` builds
    ``loss_fn``: ``model_call`` on a copy of ``model`` (and of the NNX
    objects in ``args``) rebuilt from the state before the clean pass, with
    ``params`` in place of the ``wrt`` variables, every mutation of the copy
    discarded. BatchNorm in training mode normalises with the statistics of
    the batch at ``params``; Dropout draws the clean pass's keys, so the
    outputs at ``w`` and at ``w + e`` come from the same sub-network.
  - ``output_loss_fn(outputs)`` is ``output_loss(outputs, *args)``: it must
    depend on ``outputs`` and the arrays of ``args`` only (no RNG draws, no
    model state).

  Args:
    model_call: ``model_call(model, *args) -> outputs`` (any pytree, e.g.
      ``lambda m, x, y: m(x)``).
    output_loss: ``output_loss(outputs, *args) -> scalar`` (or ``(loss,
      aux)`` with ``has_aux=True``), e.g. ``lambda logits, x, y:
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()``.
    model: the ``nnx.Module``; updated in place by the clean pass only.
    *args: passed to both, after ``model`` and ``outputs``.
    wrt: filter of the variables to differentiate and optimize (default ``nnx.Param``).
    has_aux: ``output_loss`` returns ``(loss, aux)``; the first result is
      then ``(loss, aux)`` from the clean pass, and ``output_loss_fn``
      returns the pair too (the optimizer keeps the loss).

  Returns:
    ``(loss, grads, model_fn, output_loss_fn)``: the clean pass's loss (or
    ``(loss, aux)``), its gradient (an ``nnx.State`` of the ``wrt``
    variables), ``model_fn(params) -> outputs`` with ``params`` shaped as
    ``nnx.state(model, wrt)``, and ``output_loss_fn(outputs) -> loss``. Call
    them inside the same traced step.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax, xsam_jax.flax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden = nnx.Linear(3, 8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.2, rngs=rngs)
    ...     self.out = nnx.Linear(8, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.out(self.dropout(jax.nn.relu(self.hidden(x))))
    >>> model_call = lambda model, x, y: model(x)
    >>> output_loss = lambda logits, x, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> model = Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.chain(xsam_jax.functional_sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads, model_fn, output_loss_fn = xsam_jax.flax.value_grad_and_model_fns(
    ...     model_call, output_loss, model, x, y
    ...   )
    ...   optimizer.update(model, grads, model_fn=model_fn, output_loss_fn=output_loss_fn)
    ...   return loss
    >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    >>> y = (x.sum(axis=1) > 0).astype(jnp.int32)
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    >>> losses[-1] < losses[0]
    True
    >>> int(model.dropout.rngs.count[...])  # one dropout key per step: the clean pass's
    20

  References:
    Singh, Mobahi, Agarwala & Dauphin, Avoiding spurious sharpness
    minimization broadens applicability of SAM, ICML 2025,
    https://arxiv.org/abs/2502.02407.
  """
  optimized = nnx.All(_is_model_path, wrt)
  graphdef, _, before = nnx.split((model, *args), optimized, ...)  # type: ignore[misc]  # variadic overload
  before = nnx.as_pure(before)

  def loss_of_model(module: nnx.Module, *inputs: Any) -> Any:
    return output_loss(model_call(module, *inputs), *inputs)

  value, grads = nnx.value_and_grad(loss_of_model, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model, *args)

  model_fn = _on_copy(graphdef, before, model_call)

  def output_loss_fn(outputs: Any) -> Any:
    return output_loss(outputs, *args)

  return value, grads, model_fn, output_loss_fn


def _on_copy(graph: Any, before: Any, fn: Callable[..., Any]) -> Callable[[Any], Any]:
  """``params -> fn(model_copy, *args_copy)``: ``(model, *args)`` rebuilt from ``graph`` and the pre-step
  state ``before`` with ``params`` in place of the optimized variables; the copy's mutations are discarded."""

  def call(params: Any) -> Any:
    model_copy, *args_copy = nnx.merge(graph, nnx.State({0: nnx.as_pure(params)}), before)
    return fn(model_copy, *args_copy)

  return call


def _with_dtype(graphdef: Any, optimized: Any, current: Any, before: Any, dtype: Any) -> Any:
  """The graph definition of ``(model, *args)`` with every module's ``dtype`` attribute set to ``dtype``.

  Module attributes such as ``dtype`` are static: they live in the graph
  definition, so the twin shares the state (parameters, statistics, RNG
  counters) of the original and differs only in the precision it computes
  in. The twin is built from a copy (``nnx.merge``); the model is not touched.
  """
  try:
    ok = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"value_grad_and_loss_fn: `probe_dtype` must be a float dtype (jnp.float32), got {dtype!r}.")
  twin = nnx.merge(graphdef, current, before)
  changed = 0
  for _, node in nnx.iter_graph(twin):
    if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
      node.dtype = jnp.dtype(dtype)
      changed += 1
  if not changed:
    raise ValueError(
      "value_grad_and_loss_fn: `probe_dtype` found no submodule with a `dtype` attribute to set: the model's "
      "precision is set otherwise (an `astype` in `__call__`, say). Build its probe loss yourself, e.g. from a "
      "float32 copy of the model, and pass `probe_loss_fn=` to the optimizer's update."
    )
  twin_graphdef, _, _ = nnx.split(twin, optimized, ...)  # type: ignore[misc]  # variadic overload
  return twin_graphdef


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` whose ``apply_gradients`` takes ``loss_fn``.

  A drop-in replacement: ``TrainState.create(apply_fn=..., params=...,
  tx=...)`` as in Flax, and ``state.apply_gradients(grads=grads,
  loss_fn=loss_fn)`` calls ``tx.update(grads, opt_state, params,
  loss_fn=loss_fn)``. Flax's own ``apply_gradients`` sends every extra keyword
  argument to ``.replace``, so ``loss_fn`` never reaches the optimizer. Other
  keyword arguments are still ``.replace``-d (``batch_stats=...`` on a
  subclass with that field); without ``loss_fn``, a sharpness-aware ``tx``
  raises a ``ValueError`` naming ``apply_gradients``. With Flax's
  ``OVERWRITE_WITH_GRADIENT`` collection in ``params``, ``loss_fn`` receives
  ``params["params"]``, the part ``tx`` optimizes.

  ``loss_fn(params)`` is the loss on the same batch. With BatchNorm, the clean
  pass returns the new running statistics as aux and ``loss_fn`` runs the
  model in training mode with the step's old statistics, discarding the ones
  it computes (the running averages come from the clean pass only). Under
  ``jax.pmap``, build ``tx`` with the pmap's ``axis_name``
  (``xsam_jax.sam(rho, axis_name="batch")``): the ascent then uses the
  gradient of the global batch and every replica takes the same step.
  Without it each replica perturbs with its own gradient and the replicas
  drift apart silently, even with ``pmean`` of ``grads``.

  Example:
    >>> from typing import Any
    >>> import jax, jax.numpy as jnp, optax, xsam_jax, xsam_jax.flax
    >>> from flax import linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    ...     return nn.Dense(1)(nn.relu(x))[:, 0]
    >>> class State(xsam_jax.flax.TrainState):
    ...   batch_stats: Any
    >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    >>> y = jnp.sin(x).sum(axis=1)
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = State.create(
    ...   apply_fn=Net().apply,
    ...   params=variables["params"],
    ...   batch_stats=variables["batch_stats"],
    ...   tx=optax.chain(xsam_jax.xsam(0.05, 0.05, alpha_update_period=5), optax.sgd(0.1)),
    ... )
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   def loss_and_stats(params):  # the clean pass: new running statistics as aux
    ...     pred, updates = state.apply_fn(
    ...       {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    ...     )
    ...     return jnp.mean((pred - y) ** 2), updates["batch_stats"]
    ...   loss_fn = lambda params: loss_and_stats(params)[0]  # extra passes: new statistics discarded
    ...   (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
    ...   state = state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=batch_stats)
    ...   return state, loss
    >>> losses = []
    >>> for _ in range(20):
    ...   state, loss = train_step(state, x, y)
    ...   losses.append(float(loss))
    >>> int(state.step), losses[-1] < losses[0]
    (20, True)
    >>> optax.tree.get(state.opt_state, "alpha").dtype  # XSAM's alpha, wherever the state sits
    dtype('float32')

  References:
    Flax, ``flax.training.train_state.TrainState``,
    https://flax.readthedocs.io/en/latest/api_reference/flax.training.html.
  """

  def apply_gradients(
    self,
    *,
    grads: Any,
    loss_fn: Callable[[Any], Any] | None = None,
    probe_loss_fn: Callable[[Any], Any] | None = None,
    model_fn: Callable[[Any], Any] | None = None,
    output_loss_fn: Callable[[Any], Any] | None = None,
    **kwargs: Any,
  ) -> TrainState:
    """One optimizer step: ``tx.update(grads, opt_state, params, loss_fn=loss_fn)``, then apply it.

    Args:
      grads: the gradient at ``self.params`` (same structure), from the
        clean pass on the batch.
      loss_fn: ``loss_fn(params) -> scalar`` loss on the same batch, for a
        sharpness-aware ``tx``; may be left out for a plain one.
      probe_loss_fn: optional, forwarded to ``tx.update`` as
        ``probe_loss_fn=``: the same loss computed in float32 for a
        low-precision model, used for XSAM's probes (e.g. with
        ``self.apply_fn`` of ``model.clone(dtype=jnp.float32)``; docs/flax.md,
        "Mixed precision").
      model_fn, output_loss_fn: optional, forwarded to ``tx.update``: the
        loss in two parts for :func:`xsam_jax.functional_sam`,
        ``model_fn(params) -> outputs`` (e.g. ``lambda p:
        self.apply_fn({"params": p}, x)``) and ``output_loss_fn(outputs) ->
        scalar`` on the same batch.
      **kwargs: other dataclass fields to ``.replace`` (``batch_stats=``).

    Returns:
      The new state: ``step`` incremented, ``params`` and ``opt_state``
      updated, ``kwargs`` replaced.

    Raises:
      ValueError: ``tx`` needs ``loss_fn`` and none was given.
    """
    if OVERWRITE_WITH_GRADIENT in grads:
      grads_with_opt, params_with_opt = grads["params"], self.params["params"]
    else:
      grads_with_opt, params_with_opt = grads, self.params
    extra_args = {} if loss_fn is None else {"loss_fn": loss_fn}
    if probe_loss_fn is not None:
      extra_args["probe_loss_fn"] = probe_loss_fn
    if model_fn is not None:
      extra_args["model_fn"] = model_fn
    if output_loss_fn is not None:
      extra_args["output_loss_fn"] = output_loss_fn
    try:
      updates, new_opt_state = optax.with_extra_args_support(self.tx).update(
        grads_with_opt, self.opt_state, params_with_opt, **extra_args
      )
    except ValueError as e:
      if loss_fn is not None or "loss_fn" not in str(e) or "`model_fn`" in str(e):
        raise
      raise ValueError(
        "TrainState.apply_gradients: this optimizer is sharpness-aware and needs the loss on the batch: call "
        "`state.apply_gradients(grads=grads, loss_fn=loss_fn)`, where `loss_fn(params)` returns the scalar loss "
        f"on the same batch as `grads`. ({e})"
      ) from e
    new_params_with_opt = optax.apply_updates(params_with_opt, updates)
    new_params: Any = new_params_with_opt
    if OVERWRITE_WITH_GRADIENT in grads:
      new_params = {"params": new_params_with_opt, OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)
