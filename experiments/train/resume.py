"""A run's checkpoint folder: open it, find its resume point, check it is whole.

A checkpoint holds the split state of ``(model, optimizer)`` and a ``meta``
dict (``step``, the per-epoch ``history`` so far, ``elapsed_s``); a run
resumed from it ends with the same weights, bitwise, as an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil

from flax import nnx

from experiments.core import checkpoint as ckpt_lib


def new_history() -> dict:
  """The empty per-epoch history of a run: its fields, each an empty list."""
  keys = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "time_s"]
  return {k: [] for k in keys}


def resume_point(meta: dict, saved_step: int | None, steps_per_epoch: int, total_steps: int) -> tuple[int, dict, float]:
  """``(step, history, elapsed_s)`` from a checkpoint's ``meta``; ValueError etc. if inconsistent."""
  step, history, elapsed = int(meta["step"]), meta["history"], float(meta["elapsed_s"])
  if step != saved_step or not 0 < step <= total_steps or step % steps_per_epoch:
    raise ValueError(f"meta says step {step} in the checkpoint of step {saved_step} (of {total_steps} steps)")
  if not isinstance(history, dict) or any(
    not isinstance(history.get(k), list) or len(history[k]) != step // steps_per_epoch for k in new_history()
  ):
    raise ValueError(f"the history does not hold the {step // steps_per_epoch} epochs of step {step}")
  return step, history, elapsed


def open_run(
  run_dir: str, state: nnx.State, *, resume: bool, steps_per_epoch: int, total_steps: int
) -> tuple[ckpt_lib.RunCheckpointer, nnx.State, int, dict, float]:
  """The run's checkpointer and its resume point: ``(checkpointer, state, step, history, elapsed_s)``.

  Without ``resume`` the folder is deleted first; otherwise its newest
  checkpoint, if any, is restored onto the shardings of ``state``.

  Raises:
    experiments.core.checkpoint.CheckpointError: for a damaged folder.
  """
  if not resume and os.path.isdir(run_dir):
    shutil.rmtree(run_dir)
  elif not resume and os.path.lexists(run_dir):
    os.remove(run_dir)
  checkpointer = ckpt_lib.RunCheckpointer(run_dir)
  step, history, elapsed = 0, new_history(), 0.0
  try:
    saved = checkpointer.latest_step()
    if saved is not None:
      state, meta = checkpointer.restore(state, saved)
      step, history, elapsed = resume_point(meta, saved, steps_per_epoch, total_steps)
  except ckpt_lib.CheckpointError:
    checkpointer.close()
    raise
  except (KeyError, TypeError, ValueError) as e:
    checkpointer.close()
    raise ckpt_lib.CheckpointError(checkpointer.directory, e) from e
  return checkpointer, state, step, history, elapsed
