"""Orbax checkpoints of a training run: everything needed to resume exactly.

A checkpoint at step ``s`` holds two items:

- ``state``: the NNX state of ``(model, optimizer)`` as a pure dict of arrays
  (parameters, BatchNorm statistics, the optax state - XSAM's ``alpha``, the
  schedule and momentum included - and the optimizer's step counter);
- ``meta``: JSON with the step and the history logged so far.

The data order is a function of ``(seed, epoch)`` (see ``experiments.core.data``),
so the step alone fixes the data position; a resumed run is bitwise equal to
an uninterrupted one.

Sharded state (a data-parallel run, ``devices > 1``) is saved from its
replicated arrays and restored onto the shardings of the state passed to
:meth:`RunCheckpointer.restore` (the run's freshly initialised, replicated
state), so a resumed data-parallel run is placed exactly like a fresh one.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
  """A run's checkpoint folder that cannot be read (or used).

  Attributes:
    directory: the run's checkpoint folder.
  """

  def __init__(self, directory: str, cause: BaseException | str) -> None:
    if isinstance(cause, BaseException):
      text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
      cause = f"{type(cause).__name__}: {text[:300]}"
    super().__init__(
      f"the checkpoint folder {directory} is unreadable ({cause}). Delete that folder to train "
      "this run again from the start, or run with --fresh (resume=False), which retrains every run."
    )
    self.directory = directory


class RunCheckpointer:
  """Saves and restores one run's checkpoints in ``directory``.

  Saving is synchronous: the train step donates its state buffers, and on
  CPU an asynchronous save could still be reading them.

  Args:
    directory: the run's checkpoint folder (created on first save).
    max_to_keep: how many of the newest checkpoints to keep.

  Raises:
    CheckpointError: when ``directory`` exists but is not a readable folder
      of checkpoints (also raised by :meth:`latest_step` and
      :meth:`restore`, for any damage found there).
  """

  def __init__(self, directory: str, max_to_keep: int = 1):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(self.directory, "it is a file, not a folder")
    try:
      self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          create=True,
          enable_async_checkpointing=False,
        ),
      )
    except Exception as e:  # orbax raises many types for a damaged folder
      raise CheckpointError(self.directory, e) from e

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    try:
      return self._manager.latest_step()
    except Exception as e:
      raise CheckpointError(self.directory, e) from e

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

    Raises:
      FileNotFoundError: when there is no checkpoint.
      CheckpointError: when the checkpoint cannot be read: damaged files
        (bad bytes, truncated JSON, missing items, unreadable arrays), a
        ``meta`` that is not a JSON object, or arrays that do not fit
        ``state``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    _drop_closed_loop_noise()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          meta=ocp.args.JsonRestore(),
        ),
      )
      meta = restored["meta"]
      if not isinstance(meta, dict):
        raise TypeError(f"meta is a {type(meta).__name__}, not a JSON object")
      new_state = jax.tree.map(lambda x: x, state)  # a copy with fresh leaves
      nnx.replace_by_pure_dict(new_state, _as_arrays(restored["state"]))
    except Exception as e:  # orbax / tensorstore / json raise many types
      raise CheckpointError(self.directory, e) from e
    return new_state, dict(meta)

  def close(self) -> None:
    """Releases the manager's resources."""
    self._manager.close()


def _drop_closed_loop_noise() -> None:
  """Silences tensorstore's "Event loop is closed" after a failed restore (once per process).

  When one array of a damaged checkpoint cannot be read, orbax closes its
  event loop while tensorstore's other reads are still in flight; their
  completions then fail on the closed loop and Python prints each as an
  unraisable exception (dozens of tracebacks around the real error). This
  wraps ``sys.unraisablehook`` to drop exactly those; everything else goes
  on to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _as_arrays(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x, tree)
