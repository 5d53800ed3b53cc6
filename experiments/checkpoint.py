"""Orbax checkpoints of a training run: everything needed to resume exactly.

A checkpoint at step ``s`` holds two items:

- ``state``: the NNX state of ``(model, optimizer)`` as a pure dict of arrays
  (parameters, BatchNorm statistics, the optax state - XSAM's ``alpha``, the
  schedule and momentum included - and the optimizer's step counter);
- ``meta``: JSON with the step and the history logged so far.

The data order is a function of ``(seed, epoch)`` (see ``experiments.data``),
so the step alone fixes the data position; a resumed run is bitwise equal to
an uninterrupted one.

Sharded state (a data-parallel run, ``devices > 1``) is saved from its
replicated arrays and restored onto the shardings of the state passed to
:meth:`RunCheckpointer.restore` (the run's freshly initialised, replicated
state), so a resumed data-parallel run is placed exactly like a fresh one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class RunCheckpointer:
  """Saves and restores one run's checkpoints in ``directory``.

  Saving is synchronous: the train step donates its state buffers, and on
  CPU an asynchronous save could still be reading them.

  Args:
    directory: the run's checkpoint folder (created on first save).
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, max_to_keep: int = 1):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
      ),
    )

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: nnx.State, meta: dict) -> None:
    """Writes ``state`` (an NNX state pytree) and ``meta`` (JSON) at ``step``."""
    pure = nnx.to_pure_dict(state)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(pure),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )
    self._manager.wait_until_finished()

  def restore(self, state: nnx.State, step: int | None = None) -> tuple[nnx.State, dict]:
    """Restores into the structure of ``state``.

    Args:
      state: an NNX state with the structure, shapes and dtypes of the saved
        one (e.g. a freshly initialised run's); it is not modified. The
        restored arrays get the shardings of its leaves (e.g. replicated
        over a data-parallel mesh).
      step: the step to restore; None means the newest.

    Returns:
      ``(restored_state, meta)``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore(),
      ),
    )
    new_state = jax.tree.map(lambda x: x, state)  # a copy with fresh leaves
    nnx.replace_by_pure_dict(new_state, _as_arrays(restored["state"]))
    return new_state, dict(restored["meta"])

  def close(self) -> None:
    """Releases the manager's resources."""
    self._manager.close()


def _as_arrays(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x, tree)
