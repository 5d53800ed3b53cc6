"""Exact large-batch losses in the memory of one micro-batch.

A mean over a batch is the mean of the means over equal-size micro-batches,
so a loss can be evaluated, and differentiated, one micro-batch at a time:
:func:`microbatched` scans over the micro-batches with the body under
``jax.checkpoint``, and ``jax.value_and_grad`` of the result holds one
micro-batch's activations. Given as ``loss_fn`` to a sharpness-aware
transformation, it makes the ascent, XSAM's probes and eigen_sam's
Hessian-vector products micro-batched too: exact large-batch SAM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xsam_jax._src import validation
from xsam_jax._src.types import PyTree

WHERE = "microbatched"


def microbatched(
  loss: Callable[[PyTree, PyTree], Any], num_microbatches: int, *, weighted: bool = False
) -> Callable[[PyTree, PyTree], Any]:
  r"""``loss(params, batch)`` evaluated one micro-batch at a time, with the full batch's value and gradient.

  With the batch's ``N`` examples split into ``k = num_microbatches``
  micro-batches ``B_i`` of ``m = N / k`` examples each,

  .. math::

    L_{mb}(w, B) = \frac{1}{k} \sum_{i=0}^{k-1} L(w, B_i), \qquad
    B_i = \{x_{i + jk} : j = 0, \dots, m - 1\},

  which equals the full batch's ``L(w, B)`` (and so does its gradient, and
  every higher derivative) when ``loss`` is a mean over the examples of its
  batch: the mean of equal-size micro-batch means is the full mean. The
  micro-batches are strided (``B_i`` holds examples ``i, i + k, i + 2k,
  ...``), so a batch sharded over devices along its leading axis gives
  every micro-batch a slice on every device.

  The sum runs in ``jax.lax.scan`` with the call of ``loss`` under
  ``jax.checkpoint``: under ``jax.value_and_grad`` (or ``jax.jvp``, or both,
  as in a Hessian-vector product) the activations of one micro-batch are
  live at a time, and each micro-batch's forward pass runs twice (again in
  the backward pass, instead of being stored). The per-micro-batch losses
  are summed in float32, or in the loss's dtype if it is wider.

  A loss that is a *weighted* mean, such as a language model's mean over
  its non-padding tokens, is not the mean of the micro-batch means when the
  micro-batches hold different numbers of tokens. With ``weighted=True``,
  ``loss`` returns the pair ``(weighted_sum, weight_sum)`` of its batch
  (for example ``(jnp.sum(token_loss * mask), jnp.sum(mask))``) and the
  result is the full batch's ratio

  .. math::

    L_{mb}(w, B) = \frac{\sum_i S(w, B_i)}{\sum_i W(B_i)},

  exact to rounding with any padding (a micro-batch with no tokens at all
  adds 0 to both sums).

  Passing ``loss_fn=lambda p: loss_mb(p, batch)`` to a sharpness-aware
  transformation runs its ascent gradients, XSAM's probe losses and
  eigen_sam's Hessian-vector products micro-batched as well, so the update
  is the full-batch update. ``optax.MultiSteps`` around the chain is not a
  substitute (it would hand the transformation the mean gradient with only
  the last micro-batch's ``loss_fn``, and is an error); inside the chain,
  around the base optimizer, it averages per-micro-batch sharpness-aware
  gradients.

  .. seealso:: :doc:`/accumulation`: the measured memory, token-weighted
     losses, and the two places ``optax.MultiSteps`` can take.

  Args:
    loss: ``loss(params, batch)``, the mean loss over the examples of
      ``batch``: a 0-d floating-point array, or a ``(loss, aux)`` pair
      whose first element is one. ``batch`` is a pytree of arrays whose
      leading axis is the example axis.
    num_microbatches: ``k``, a Python int >= 1 dividing the batch size.
      ``1`` calls ``loss`` on the whole batch, without a scan.
    weighted: ``loss`` returns ``(weighted_sum, weight_sum)`` (two 0-d
      real arrays; ``weight_sum`` may be an integer count), or
      ``((weighted_sum, weight_sum), aux)``; the result is
      ``sum / sum`` over the micro-batches (above), in ``weighted_sum``'s
      dtype, and ``(ratio, aux)`` with ``aux`` stacked as below.

  Returns:
    ``loss_mb(params, batch)``. For a scalar ``loss``, the scalar mean of
    the micro-batch losses, in the loss's dtype. For a ``(loss, aux)``
    ``loss``, the pair ``(mean, aux)`` where every leaf of ``aux`` is
    stacked over the micro-batches (a new leading axis of length ``k``,
    entry ``i`` from ``B_i``; also for ``k = 1``), so
    ``jax.value_and_grad(loss_mb, has_aux=True)`` works as on ``loss``.
    It raises a ``ValueError`` (when traced) if a leaf of ``batch`` has no
    leading axis, leaves differ in it, it is not divisible by ``k``, or
    ``loss`` returns neither a scalar nor a ``(loss, aux)`` pair.

  Raises:
    ValueError: ``num_microbatches`` is not an int >= 1, or ``loss`` is not
      callable.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> def loss(params, batch):
    ...   return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    >>> batch = {"x": jnp.arange(16.0).reshape(8, 2) / 8, "y": jnp.arange(8.0) / 8}
    >>> params = {"w": jnp.array([0.5, -0.25])}
    >>> loss_mb = xsam_jax.microbatched(loss, 4)  # 4 micro-batches of 2 examples
    >>> value, grads = jax.value_and_grad(loss_mb)(params, batch)
    >>> full_value, full_grads = jax.value_and_grad(loss)(params, batch)
    >>> bool(jnp.allclose(value, full_value)), bool(jnp.allclose(grads["w"], full_grads["w"]))
    (True, True)

    Full-batch SAM whose ascent also runs micro-batch by micro-batch:

    >>> tx = optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1))
    >>> updates, state = tx.update(grads, tx.init(params), params, loss_fn=lambda p: loss_mb(p, batch))
  """
  k = validation.check_static_int("num_microbatches", num_microbatches, inject_hint=False)
  if not callable(loss):
    raise ValueError(f"{WHERE}: `loss` must be callable as loss(params, batch), got {type(loss).__name__}.")
  if validation.check_bool("weighted", weighted):
    return _weighted(loss, k)

  @functools.wraps(loss)
  def loss_mb(params: PyTree, batch: PyTree) -> Any:
    outs = _per_microbatch(lambda p, b: _checked(loss(p, b)), params, batch, k)
    losses = outs[0] if isinstance(outs, tuple) else outs
    mean = jnp.mean(losses, dtype=jnp.promote_types(losses.dtype, jnp.float32)).astype(losses.dtype)
    return (mean, outs[1]) if isinstance(outs, tuple) else mean

  return loss_mb


def _weighted(loss: Callable[[PyTree, PyTree], Any], k: int) -> Callable[[PyTree, PyTree], Any]:
  """:func:`microbatched` with ``weighted=True``: ``sum_i S_i / sum_i W_i``."""

  @functools.wraps(loss)
  def loss_mb(params: PyTree, batch: PyTree) -> Any:
    (totals, weights), aux = _per_microbatch(lambda p, b: _checked_weighted(loss(p, b)), params, batch, k)
    wide = jnp.promote_types(totals.dtype, jnp.float32)
    ratio = (jnp.sum(totals, dtype=wide) / jnp.sum(weights.astype(wide))).astype(totals.dtype)
    return ratio if aux is None else (ratio, aux)

  return loss_mb


def _per_microbatch(fn: Callable[[PyTree, PyTree], Any], params: PyTree, batch: PyTree, k: int) -> Any:
  """``fn(params, B_i)`` for the ``k`` micro-batches, every leaf stacked on a new leading axis.

  A ``jax.lax.scan`` with ``fn`` under ``jax.checkpoint`` (one micro-batch's
  activations live at a time); ``k = 1`` calls ``fn`` on the whole batch,
  without a scan.
  """
  if k == 1:
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), fn(params, batch))
  one = jax.checkpoint(fn)
  return jax.lax.scan(lambda carry, b: (carry, one(params, b)), None, split_batch(batch, k))[1]


def _is_real_scalar(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and tuple(x.shape) == () and validation.is_real_dtype(x.dtype)


def _checked_weighted(out: Any) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """``loss``'s output with ``weighted=True`` as ``((weighted_sum, weight_sum), aux or None)``, or a ValueError."""
  pair, aux = out, None
  if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (tuple, list)):
    pair, aux = out
  if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_real_scalar(x) for x in pair):
    total, weight = pair
    if jnp.issubdtype(total.dtype, jnp.floating):
      return (total, weight), aux
  raise ValueError(
    f"{WHERE}: with `weighted=True`, `loss` must return `(weighted_sum, weight_sum)` (two 0-d real arrays, e.g. "
    "`(jnp.sum(token_loss * mask), jnp.sum(mask))`, the first floating-point) or `((weighted_sum, weight_sum), "
    f"aux)`; it returned {validation.describe_output(out)}."
  )


def _checked(out: Any) -> Any:
  """``loss``'s output as ``loss`` or ``(loss, aux)`` (a tuple), after :func:`validation.check_loss_output`."""
  return (out[0], out[1]) if validation.check_loss_output(WHERE, "loss", out) else out


def split_batch(batch: PyTree, num_microbatches: int) -> PyTree:
  """Every leaf ``x`` of ``batch`` as ``(k, N/k, ...)`` with ``[i, j] = x[i + j k]`` (strided micro-batches).

  Args:
    batch: a pytree of arrays sharing their leading (example) axis ``N``.
    num_microbatches: ``k``, dividing ``N``.

  Returns:
    The batch with each leaf reshaped; entry ``i`` of the new leading axis
    is micro-batch ``i``.

  Raises:
    ValueError: ``batch`` has no leaves, a leaf has no leading axis, the
      leaves' leading axes differ, or ``N`` is not divisible by ``k``
      (naming the leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> split_batch({"x": jnp.arange(6)}, 2)["x"].tolist()
    [[0, 2, 4], [1, 3, 5]]
  """
  k = num_microbatches
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  if not leaves:
    raise ValueError(f"{WHERE}: `batch` has no array leaves to split into `num_microbatches`={k} micro-batches.")
  size, first = None, None
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path) or "(the batch itself)"
    shape = tuple(jnp.shape(leaf))
    if not shape:
      raise ValueError(
        f"{WHERE}: batch leaf {name} has shape (): every leaf of `batch` needs a leading example axis to "
        f"split into `num_microbatches`={k} micro-batches (close over constants in `loss` instead)."
      )
    if size is None:
      size, first = shape[0], name
    elif shape[0] != size:
      raise ValueError(
        f"{WHERE}: batch leaf {name} has leading axis {shape[0]}, but leaf {first} has {size}: every leaf "
        "of `batch` needs the same leading example axis."
      )
    if shape[0] % k:
      raise ValueError(
        f"{WHERE}: batch leaf {name} has leading axis {shape[0]}, not divisible by `num_microbatches`={k}: "
        "the micro-batches must have equal sizes for their mean to be the batch's mean."
      )

  def split(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)
