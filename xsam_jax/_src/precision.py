"""What precision a loss function really computes in, read from its traced program.

A model that keeps float32 parameters, runs its matmuls and convolutions in
bfloat16 and casts the loss to float32 returns a float32 scalar whose
rounding error is bfloat16's: the dtype of the output says nothing. The
operands of the program's dot and convolution operations do: this module
traces ``loss_fn`` once (``jax.make_jaxpr``, at trace time of the step, on
shapes only) and reads them, sub-programs (``jit``, ``cond``, ``scan``,
``checkpoint``, ``custom_vjp`` bodies) included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from xsam_jax._src.types import PyTree

CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
"""The primitives whose operands carry the model's compute precision (matmuls, convolutions)."""


def _sub_jaxprs(value: Any) -> Iterator[Any]:
  """The jaxprs held by an equation's parameter (a ``Jaxpr``, a ``ClosedJaxpr``, or a sequence of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _contraction_dtypes(jaxpr: Any, seen: set[int]) -> Iterator[tuple[str, np.dtype]]:
  if id(jaxpr) in seen:
    return
  seen.add(id(jaxpr))
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in CONTRACTIONS:
      for v in eqn.invars:
        dtype = getattr(getattr(v, "aval", None), "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
          yield eqn.primitive.name, np.dtype(dtype)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        yield from _contraction_dtypes(sub, seen)


def contraction_dtypes(fn: Callable[[PyTree], Any], params: PyTree) -> dict[str, set[np.dtype]]:
  """The float dtypes of the operands of ``fn``'s dot and convolution operations, by primitive name.

  Args:
    fn: ``params -> anything``; traced once with ``jax.make_jaxpr`` on
      ``params``' shapes and dtypes (it may close over traced arrays, such
      as the batch inside a jitted step).
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{primitive name: {dtypes}}`` over every matmul and convolution of the
    program, sub-programs included; empty when it has none.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> loss = lambda w: jnp.mean(x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)
    >>> {k: sorted(map(str, v)) for k, v in contraction_dtypes(loss, jnp.ones((3, 2))).items()}
    {'dot_general': ['bfloat16']}
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
  closed = jax.make_jaxpr(fn)(shapes)
  found: dict[str, set[np.dtype]] = {}
  for name, dtype in _contraction_dtypes(closed.jaxpr, set()):
    found.setdefault(name, set()).add(dtype)
  return found


def narrowest_float(fn: Callable[[PyTree], Any], params: PyTree, *, extra: Iterable[Any] = ()) -> np.dtype:
  """The float dtype with the largest machine epsilon among ``fn``'s contraction operands and ``extra``'s dtypes.

  ``float32`` when neither holds a float (the precision every method
  computes its norms and angles in at least).
  """
  dtypes = {d for ds in contraction_dtypes(fn, params).values() for d in ds}
  dtypes |= {np.dtype(jnp.result_type(x)) for x in extra if jnp.issubdtype(jnp.result_type(x), jnp.floating)}
  dtypes.add(np.dtype(np.float32))
  return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def low_precision_contractions(fn: Callable[[PyTree], Any], params: PyTree) -> list[tuple[str, np.dtype]]:
  """``[(primitive name, dtype), ...]``: ``fn``'s contractions with an operand narrower than float32, sorted."""
  found = contraction_dtypes(fn, params)
  narrow = [(name, d) for name, ds in found.items() for d in ds if d.itemsize < 4]
  return sorted(narrow, key=lambda t: (t[0], t[1].name))
