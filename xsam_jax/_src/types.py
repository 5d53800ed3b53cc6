"""Type aliases for the signatures of xsam_jax (for readers and type checkers).

A pytree here is any nesting of dicts, lists, tuples, NamedTuples, ... whose
leaves are arrays: parameters, gradients, directions, optimizer states.
Static checkers cannot express "a pytree with the structure of ``params``",
so :data:`PyTree` is ``Any``; the docstrings say which structure is meant.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

import jax

PyTree: TypeAlias = Any
"""A pytree of arrays (params, gradients, directions, states)."""

LossFn: TypeAlias = Callable[[Any], jax.Array]
"""``loss_fn(params) -> scalar``: the loss on the current batch."""

Scalar: TypeAlias = float | jax.Array
"""A real hyperparameter: a Python number or a 0-d array (a tracer under
``optax.inject_hyperparams``)."""

AxisName: TypeAlias = Hashable
"""A ``jax.lax`` collective axis: a name, or a tuple of names."""
