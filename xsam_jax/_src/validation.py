"""Checks with errors that name the argument and its allowed range or form.

Hyperparameters are checked at construction. Scalars must be Python numbers
or 0-d arrays; a value that is a JAX tracer (e.g. a hyperparameter injected
with ``optax.inject_hyperparams`` and read inside ``jax.jit``) has no value to
check, but its shape and dtype are still checked. The params, updates, state
and ``adaptive_mask`` reaching ``update`` are checked there, once per trace.
"""

from __future__ import annotations

import math
import numbers
import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._src.types import PyTree


def is_real_dtype(dtype: Any) -> bool:
  return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))


def _scalar(name: str, value: Any, requirement: str) -> float | None:
  """``value`` as a Python float (None when traced), or a ValueError naming ``name``.

  Accepted: Python ints and floats, NumPy integer and floating scalars, and
  0-d arrays of an integer or floating dtype (tracers included). Rejected:
  bools, complex numbers, strings and arrays of any other shape.
  """
  form = f"`{name}` must be {requirement} (a Python number or a 0-d array)"
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{form}, got the bool {value!r}.")
  if isinstance(value, numbers.Real) and not isinstance(value, (np.ndarray, jax.Array)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)):  # tracers included
    shape, dtype = value.shape, value.dtype
    if shape != ():
      raise ValueError(f"{form}, got an array of shape {shape}.")
    if not is_real_dtype(dtype):
      raise ValueError(f"{form}, got a 0-d array of dtype {dtype}.")
    if isinstance(value, jax.core.Tracer):
      return None
    return float(np.asarray(value))
  raise ValueError(f"{form}, got {value!r}.")


def check_real(name: str, value: Any, requirement: str, ok: Callable[[float], bool]) -> float | None:
  """Checks a real scalar hyperparameter.

  Args:
    name: the argument's name, for the message.
    value: the value given.
    requirement: what it must be, e.g. ``"a finite real number > 0"``.
    ok: the range check on the value as a float (not run when traced).

  Returns:
    The value as a Python float, or None when it is a tracer.

  Raises:
    ValueError: ``value`` is not a real scalar or ``ok`` rejects it.
  """
  v = _scalar(name, value, requirement)
  if v is not None and not ok(v):
    raise ValueError(f"`{name}` must be {requirement}, got {v!r}.")
  return v


def check_positive(name: str, value: Any) -> float | None:
  """Raises ValueError unless ``value`` is a finite real scalar > 0."""
  return check_real(name, value, "a finite real number > 0", lambda v: math.isfinite(v) and v > 0)


def check_nonnegative(name: str, value: Any) -> float | None:
  """Raises ValueError unless ``value`` is a finite real scalar >= 0."""
  return check_real(name, value, "a finite real number >= 0", lambda v: math.isfinite(v) and v >= 0)


def check_finite(name: str, value: Any) -> float | None:
  """Raises ValueError unless ``value`` is a finite real scalar."""
  return check_real(name, value, "a finite real number", math.isfinite)


def check_rho(name: str, value: Any) -> None:
  """A radius: a finite real scalar > 0, or an optax schedule (a callable of the step count).

  A schedule is checked at step 0 only (finite and >= 0: warm-up schedules
  start at 0); its later values are the caller's responsibility.
  """
  if not callable(value):
    check_positive(name, value)
    return
  try:
    first = value(jnp.zeros([], jnp.int32))
  except Exception as e:  # the schedule's own error, with the argument named
    raise ValueError(f"`{name}` is a callable but not a schedule of the step count: `{name}(0)` raised {e!r}.") from e
  check_real(
    f"{name}(0)", first, "a finite real number >= 0 (a schedule's value)", lambda v: math.isfinite(v) and v >= 0
  )


def check_start(name: str, value: Any) -> None:
  """A first step: an int >= 0 (a 0-d integer array, possibly traced, too)."""
  _check_int(name, value, 0, "an int >= 0")


def check_bool(name: str, value: Any) -> bool:
  """Checks a flag: a Python or NumPy bool (not a truthy string, int or array)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a bool (True or False), got {value!r}.")
  return bool(value)


def check_static_int(name: str, value: Any, minimum: int = 1, *, inject_hint: bool = True) -> int:
  """Checks a static Python int >= minimum (not traced: it sets loop length).

  ``inject_hint``: the message for a non-int says how to keep the argument
  static under ``optax.inject_hyperparams`` (for a transformation's
  arguments; off for other functions).
  """
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    hint = f" (With optax.inject_hyperparams, list it in static_args=('{name}',).)" if inject_hint else ""
    raise ValueError(f"`{name}` must be a Python int >= {minimum}, got {value!r}.{hint}")
  if int(value) < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {int(value)}.")
  return int(value)


MAX_SEED = 2**63 - 1
"""The largest seed ``jax.random.PRNGKey`` takes (a signed 64-bit integer)."""


def check_seed(value: Any) -> int:
  """Checks ``seed``, a PRNG seed: a static Python int in ``[0, MAX_SEED]``; returns it as an int."""
  seed = check_static_int("seed", value, minimum=0)
  if seed > MAX_SEED:
    raise ValueError(f"`seed` must be an int in [0, {MAX_SEED}] (a PRNG seed: a signed 64-bit int), got {seed}.")
  return seed


def check_period(name: str, value: Any, *, allow_none: bool = True) -> None:
  """Checks a period: an int >= 1 (a 0-d integer array, possibly traced, too), or None if allowed."""
  if value is None and allow_none:
    return
  _check_int(name, value, 1, "None or an int >= 1" if allow_none else "an int >= 1")


def _check_int(name: str, value: Any, minimum: int, requirement: str) -> None:
  """Raises ValueError unless ``value`` is an int >= ``minimum``: a Python or NumPy int (not a bool), or a
  0-d integer array (a tracer passes unchecked); ``requirement`` words the message."""
  if isinstance(value, (np.ndarray, jax.Array)):  # tracers included
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"`{name}` must be {requirement}, got an array of shape {value.shape} and dtype {value.dtype}.")
    if isinstance(value, jax.core.Tracer):
      return
    v = int(np.asarray(value))
  elif isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
    v = int(value)
  else:
    raise ValueError(f"`{name}` must be {requirement}, got {value!r}.")
  if v < minimum:
    raise ValueError(f"`{name}` must be {requirement}, got {v}.")


def check_grid(name: str, values: Any) -> np.ndarray:
  """Checks a non-empty 1-D grid of finite reals; returns it as float64 numpy."""
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`{name}` must be a non-empty 1-D sequence of finite reals, got {values!r}.") from e
  if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
    raise ValueError(f"`{name}` must be a non-empty 1-D sequence of finite reals, got {values!r}.")
  return arr


def check_call(method: str, params: Any, loss_fn: Any, probe_loss_fn: Any = None) -> None:
  """Raises a ValueError explaining the calling convention when args are missing or not callable."""
  missing = [n for n, v in (("params", params), ("loss_fn", loss_fn)) if v is None]
  if missing:
    raise ValueError(
      f"{method}.update needs {' and '.join(f'`{m}`' for m in missing)}: call it as "
      "`tx.update(grads, state, params, loss_fn=loss_fn)`, where `grads` is the "
      "gradient of `loss_fn` at `params` and `loss_fn(params)` returns the scalar "
      "loss on the same batch. If you did pass them, a wrapper between you and "
      f"{method}.update dropped them: flax.training.train_state.TrainState.apply_gradients "
      "does (use xsam_jax.flax.TrainState, whose apply_gradients forwards `loss_fn`), and so does "
      "optax.with_extra_args_support around a plain GradientTransformation holding the chain."
    )
  if not callable(loss_fn):
    raise ValueError(f"{method}.update: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
  if probe_loss_fn is not None and not callable(probe_loss_fn):
    got = type(probe_loss_fn).__name__
    raise ValueError(f"{method}.update: `probe_loss_fn` must be callable or None, got {got}.")


def check_not_in_multisteps(method: str) -> None:
  """Raises a ValueError when ``update`` is called by ``optax.MultiSteps`` (found on the Python call stack).

  ``optax.MultiSteps`` around a chain that holds a sharpness-aware
  transformation hands it the mean of the accumulated micro-batch gradients
  as ``updates`` but only the last micro-batch's ``loss_fn``: the ascent
  starts from one batch's gradient direction and climbs another batch's
  loss (measured 12-38% off full-batch SAM), with no error. Checked when
  ``update`` is called (at trace time under ``jax.jit``; a walk up the
  Python stack, microseconds).
  """
  code = optax.MultiSteps.update.__code__
  frame: types.FrameType | None = sys._getframe(1)
  for _ in range(64):
    if frame is None:
      return
    if frame.f_code is code:
      raise ValueError(
        f"{method}.update is called by optax.MultiSteps, which accumulates gradients over micro-batches and "
        f"then hands {method} their mean with only the last micro-batch's `loss_fn`: the ascent would mix two "
        "batches (12-38% off full-batch SAM in our measurements). Use one of: (1) exact large-batch SAM, "
        f"`loss_fn = lambda p: xsam_jax.microbatched(loss, k)(p, batch)` with one {method} step per full batch; "
        f"(2) for a loop that calls the optimizer once per micro-batch, put MultiSteps inside the chain, "
        f"around the base optimizer only: optax.chain({method}(...), optax.MultiSteps(base_optimizer, k)), "
        "which averages the per-micro-batch sharpness-aware gradients (m-sharpness over micro-batches). "
        "See docs/accumulation.md."
      )
    frame = frame.f_back


def describe_output(out: Any) -> str:
  """What a loss function returned, for an error message."""
  if hasattr(out, "shape") and hasattr(out, "dtype"):
    return f"an array of shape {tuple(out.shape)} and dtype {out.dtype}"
  if isinstance(out, (tuple, list)):
    kind = type(out).__name__
    if len(out) == 2:
      return f"a {kind} whose first element is {describe_output(out[0])}"
    return f"a {kind} of length {len(out)}"
  return f"a {type(out).__name__}"


def _is_scalar_loss(out: Any) -> bool:
  return (
    hasattr(out, "shape")
    and hasattr(out, "dtype")
    and tuple(out.shape) == ()
    and bool(jnp.issubdtype(out.dtype, jnp.floating))
  )


def check_loss_output(where: str, name: str, out: Any) -> bool:
  """Checks what a loss function returned: a scalar, or a ``(loss, aux)`` pair.

  A trace-time check (on shapes and dtypes only; ``jax.eval_shape`` output
  works too), so it costs nothing when the compiled step runs.

  Args:
    where: the call, for the message (e.g. ``"sam.update"``).
    name: the loss function's argument name, for the message (``"loss_fn"``).
    out: what it returned.

  Returns:
    False for a 0-d real floating-point array, True for a tuple or list of
    length 2 whose first element is one (``aux``, the second, is anything).

  Raises:
    ValueError: anything else (a vector, an integer loss, a dict, ...),
      naming ``name`` and the shape and dtype it returned.
  """
  if _is_scalar_loss(out):
    return False
  if isinstance(out, (tuple, list)) and len(out) == 2 and _is_scalar_loss(out[0]):
    return True
  raise ValueError(
    f"{where}: `{name}` must return the scalar loss (a 0-d floating-point array, e.g. the mean over "
    f"the batch) or a `(loss, aux)` pair whose first element is one; it returned "
    f"{describe_output(out)}."
  )


def scalar_loss(where: str, loss_fn: Callable[[Any], Any], name: str = "loss_fn") -> Callable[[Any], jax.Array]:
  """``loss_fn`` made to return only its scalar loss: a ``(loss, aux)`` pair's ``aux`` is dropped.

  Args:
    where: the call, for the message (e.g. ``"sam.update"``).
    loss_fn: ``params -> scalar`` or ``params -> (scalar, aux)``.
    name: the argument's name, for the message (``"probe_loss_fn"``).

  Returns:
    ``params -> scalar``; each call checks (at trace time) what ``loss_fn``
    returned with :func:`check_loss_output`, raising its ``ValueError``.
  """

  def scalar(params: Any) -> jax.Array:
    out = loss_fn(params)
    return out[0] if check_loss_output(where, name, out) else out

  return scalar


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _same_structure(a: PyTree, b: PyTree) -> bool:
  return bool(jax.tree.structure(a) == jax.tree.structure(b))  # type: ignore[operator]  # PyTreeDef stubs lack __eq__


def _path_list(paths: Any, limit: int = 5) -> str:
  paths = sorted(paths)
  shown = ", ".join(paths[:limit])
  return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def as_array_leaves(method: str, what: str, tree: PyTree) -> PyTree:
  """Python and NumPy scalar leaves become 0-d arrays (``jnp.asarray``); arrays are kept.

  Raises:
    ValueError: a leaf is not a number or an array (naming the leaf's path).
  """

  def convert(path: Any, leaf: Any) -> Any:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      return leaf
    try:
      return jnp.asarray(leaf)
    except TypeError as e:
      raise ValueError(
        f"{method}: {what} leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
        f"{what} leaves must be floating-point arrays."
      ) from e

  return jax.tree_util.tree_map_with_path(convert, tree)


def check_float_leaves(where: str, what: str, tree: PyTree) -> None:
  """Raises a ValueError naming the first leaf of ``tree`` that is not a real floating array.

  Args:
    where: the call, for the message (e.g. ``"sam.update"``).
    what: the tree's name, ``"params"`` or ``"updates"``.
    tree: the tree.
  """
  for path, leaf in _leaves_with_paths(tree):
    dtype = leaf.dtype
    if jnp.issubdtype(dtype, jnp.floating):
      continue
    if jnp.issubdtype(dtype, jnp.complexfloating):
      why = (
        "complex parameters are not supported (the ascent's norms, cosines and "
        "probes are real); optimize the real and imaginary parts as two real leaves"
      )
    else:
      why = (
        "params and updates must be real floating-point arrays (float16, bfloat16, "
        "float32 or float64); keep integer, bool and other non-trainable leaves out of "
        "the optimized tree (e.g. with optax.masked or optax.partition)"
      )
    raise ValueError(f"{where}: {what} leaf {path} has dtype {dtype}: {why}.")


def _mismatch_detail(
  leaves: list[tuple[str, Any]],
  p_leaves: list[tuple[str, Any]],
  missing_label: str,
  is_label: str,
  tree: Any,
  params: Any,
) -> str:
  """What differs between a tree's leaf paths and params': missing and extra paths, else both structures."""
  missing = {p for p, _ in p_leaves} - {p for p, _ in leaves}
  extra = {p for p, _ in leaves} - {p for p, _ in p_leaves}
  parts = [
    f"{missing_label}: {_path_list(missing)}" if missing else "",
    f"not in params: {_path_list(extra)}" if extra else "",
  ]
  return (
    "; ".join(p for p in parts if p)
    or f"{is_label} {jax.tree.structure(tree)}, params are {jax.tree.structure(params)}"
  )


def check_updates_match_params(method: str, updates: PyTree, params: PyTree) -> None:
  """Raises a ValueError unless ``updates`` has the structure and leaf shapes of ``params``."""
  check_like_params(f"{method}.update", "updates", updates, params)


def check_like_params(where: str, name: str, tree: PyTree, params: PyTree) -> None:
  """Raises a ValueError naming ``name`` unless ``tree`` has the structure and leaf shapes of ``params``.

  Args:
    where: the call, for the message (e.g. ``"loss_surface"``).
    name: the argument's name (``"direction1"``, ``"vector"``).
    tree: the tree to check (its leaves need a ``shape``, or are taken as arrays).
    params: the parameters it must match.
  """
  t_leaves, p_leaves = _leaves_with_paths(tree), _leaves_with_paths(params)
  if not _same_structure(tree, params):
    detail = _mismatch_detail(t_leaves, p_leaves, f"missing from {name}", f"{name} is", tree, params)
    raise ValueError(f"{where}: `{name}` must have the tree structure of `params` ({detail}).")
  for (path, t), (_, p) in zip(t_leaves, p_leaves, strict=True):
    if np.shape(t) != np.shape(p):
      raise ValueError(f"{where}: {name} leaf {path} has shape {np.shape(t)}, but the params leaf has {np.shape(p)}.")


def check_adaptive_mask(method: str, adaptive_mask: Any, params: PyTree) -> PyTree:
  """Resolves ``adaptive_mask`` against ``params`` (see :func:`check_mask`); None: every leaf is rescaled."""
  if adaptive_mask is None:
    return None
  return check_mask(method, "adaptive_mask", adaptive_mask, params, meaning="True: rescale that leaf, False: leave it")


def check_mask(
  method: str, name: str, mask_arg: Any, params: PyTree, *, meaning: str = "True: perturb that leaf, False: leave it"
) -> PyTree:
  """Resolves a leaf mask (a pytree of bools, or a callable on params) against ``params``.

  Returns:
    A pytree with the structure of ``params`` holding one Python bool per leaf.

  Raises:
    ValueError: the mask (or what the callable returned) does not have the
      structure of ``params``, or a leaf of it is not a single static bool.
  """
  source = f"`{name}`"
  mask = mask_arg
  if callable(mask_arg):
    source, mask = f"`{name}(params)`", mask_arg(params)
  expected = (
    f"{source} must be a pytree with the structure of params holding one bool per leaf ({meaning}), as in optax.masked"
  )
  if mask is None:
    raise ValueError(f"{method}: {expected}, got None.")
  m_leaves, p_leaves = _leaves_with_paths(mask), _leaves_with_paths(params)
  if not _same_structure(mask, params):
    detail = _mismatch_detail(m_leaves, p_leaves, "missing", "the mask is", mask, params)
    raise ValueError(f"{method}: {expected} ({detail}).")
  flags = []
  for path, m in m_leaves:
    if isinstance(m, (bool, np.bool_)):
      flags.append(bool(m))
      continue
    if isinstance(m, jax.core.Tracer):
      got = "a traced value (the mask must be static: compute it from shapes, ndim or names, not from values)"
    elif isinstance(m, (np.ndarray, jax.Array)) and m.shape == () and m.dtype == np.bool_:
      flags.append(bool(m))
      continue
    elif isinstance(m, (np.ndarray, jax.Array)):
      got = f"an array of shape {m.shape} and dtype {m.dtype} (element-wise masks are not supported)"
    else:
      got = repr(m)
    raise ValueError(f"{method}: {expected}; leaf {path} is {got}.")
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def check_state_matches(method: str, state: Any, expected: Any) -> None:
  """Raises a ValueError unless ``state`` has the structure and leaf shapes of ``expected``.

  Args:
    method: the public name, for the message.
    state: the state passed to ``update``.
    expected: ``jax.eval_shape`` of the transformation's ``init`` on params.
  """
  hint = (
    f"Was it made by `{method}(...).init` with other settings, or for other "
    "params? Re-create it with `tx.init(params)`."
  )
  if not _same_structure(state, expected):
    raise ValueError(
      f"{method}.update: the state does not match this transformation and params: its tree is "
      f"{jax.tree.structure(state)}, expected {jax.tree.structure(expected)}. {hint}"
    )
  for (path, got), (_, want) in zip(_leaves_with_paths(state), _leaves_with_paths(expected), strict=True):
    if np.shape(got) != want.shape:
      raise ValueError(
        f"{method}.update: the state does not match this transformation and params: state leaf "
        f"{path} has shape {np.shape(got)}, expected {want.shape}. {hint}"
      )
