"""Construction-time checks of hyperparameters, with errors that name the
argument and its allowed range.

Values that are JAX tracers (e.g. hyperparameters injected with
``optax.inject_hyperparams`` and read inside ``jax.jit``) cannot be checked
at construction and are passed through.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def _concrete(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # noqa: BLE001 - any non-array is reported by the caller
    return None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def _is_number(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  return isinstance(value, (numbers.Real, np.ndarray, jax.Array))


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number > 0."""
  if not _is_number(value):
    raise ValueError(f"`{name}` must be a finite real number > 0, got {value!r}.")
  v = _concrete(value)
  if v is not None and not (math.isfinite(v) and v > 0):
    raise ValueError(f"`{name}` must be a finite real number > 0, got {v!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number >= 0."""
  if not _is_number(value):
    raise ValueError(f"`{name}` must be a finite real number >= 0, got {value!r}.")
  v = _concrete(value)
  if v is not None and not (math.isfinite(v) and v >= 0):
    raise ValueError(f"`{name}` must be a finite real number >= 0, got {v!r}.")


def check_finite(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a finite real number."""
  if not _is_number(value):
    raise ValueError(f"`{name}` must be a finite real number, got {value!r}.")
  v = _concrete(value)
  if v is not None and not math.isfinite(v):
    raise ValueError(f"`{name}` must be a finite real number, got {v!r}.")


def check_static_int(name: str, value: Any, minimum: int = 1) -> int:
  """Checks a static Python int >= minimum (not traced: it sets loop length)."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise ValueError(
      f"`{name}` must be a Python int >= {minimum}, got {value!r}. (With "
      f"optax.inject_hyperparams, list it in static_args=('{name}',).)"
    )
  if int(value) < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {int(value)}.")
  return int(value)


def check_period(name: str, value: Any) -> None:
  """Checks a probe period: None (never) or an int >= 1 (may be traced)."""
  if value is None:
    return
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value) if _is_number(value) else None
  if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")
  if int(arr) < 1:
    raise ValueError(f"`{name}` must be None or an int >= 1, got {int(arr)}.")


def check_grid(name: str, values: Any) -> np.ndarray:
  """Checks a non-empty 1-D grid of finite reals; returns it as float64 numpy."""
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`{name}` must be a non-empty 1-D sequence of finite reals, got {values!r}.") from e
  if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
    raise ValueError(f"`{name}` must be a non-empty 1-D sequence of finite reals, got {values!r}.")
  return arr


def check_call(method: str, params: Any, loss_fn: Any) -> None:
  """Raises a ValueError explaining the calling convention when args are missing."""
  missing = [n for n, v in (("params", params), ("loss_fn", loss_fn)) if v is None]
  if missing:
    raise ValueError(
      f"{method}.update needs {' and '.join(f'`{m}`' for m in missing)}: call it as "
      "`tx.update(grads, state, params, loss_fn=loss_fn)`, where `grads` is the "
      "gradient of `loss_fn` at `params` and `loss_fn(params)` returns the scalar "
      "loss on the same batch."
    )
  if not callable(loss_fn):
    raise ValueError(f"{method}.update: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
