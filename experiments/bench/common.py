"""The benches' shared plumbing: how a report is written, the default hyperparameters, a training step,
compiling with XLA's memory estimate, and round-robin timing (the header: :func:`experiments.core.report.header`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

RHO, RHO_MAX, LEARNING_RATE = 0.05, 0.1, 0.05
"""The benches' default ascent radius, XSAM probe radius and base learning rate."""


def write(out_dir: str, filename: str, report: dict[str, Any], text: str) -> None:
  """Writes ``report`` as ``out_dir/filename`` (JSON) and prints ``text`` and where it went."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / filename).write_text(json.dumps(report, indent=2))
  print(text)
  print(f"[bench] wrote {out / filename}")


def make_step(
  tx: optax.GradientTransformationExtraArgs,
  loss_of: Callable[[Any], jax.Array],
  extra: Callable[[Callable[[Any], jax.Array]], dict[str, Any]] | None = None,
) -> Callable[[Any, Any], tuple[Any, Any, jax.Array]]:
  """A training step ``(params, state) -> (params, state, loss)``: ``tx.update`` with ``loss_fn=loss_of``,
  or with the keyword arguments ``extra(loss_of)`` returns (``{}`` for a plain optimizer)."""

  def step(params, state):
    loss, g = jax.value_and_grad(loss_of)(params)
    kwargs = extra(loss_of) if extra else {"loss_fn": loss_of}
    u, state = tx.update(g, state, params, **kwargs)
    return optax.apply_updates(params, u), state, loss

  return step


def memory(compiled: Any) -> dict[str, int] | None:
  """XLA's memory estimate of a compiled executable, in bytes (None where the backend gives none).

  ``peak_bytes`` is arguments + outputs + temporaries.
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  sizes = {
    f"{name}_bytes": int(getattr(mem, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")
  }
  sizes["peak_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"]
  return sizes


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int | None]:
  """``(compiled, seconds, peak bytes or None)``: ``jax.jit(fn)`` lowered and compiled for ``args``, timed."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = memory(compiled)
  return compiled, seconds, None if mem is None else mem["peak_bytes"]


def time_round_robin(calls: dict, repeats: int) -> dict:
  """The median seconds of each call, timed in turn for ``repeats`` rounds (the same load for all)."""
  times: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}
