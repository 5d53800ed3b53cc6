"""Compile time on wide parameter trees: ``sam`` and ``xsam`` against a hand-written SAM step.

Transformers have hundreds of parameter arrays, and a transformation whose
compiled program grows faster than linearly in the number of leaves is the
first thing such a user meets. Two trees:

- ``flat``: ``n`` arrays of shape (3,), the loss a sum of one cheap term
  per array (the strictest case: the model costs little to compile, so the
  optimizer's own program dominates), for several ``n``: is compile time
  linear?
- ``transformer``: 16 residual blocks of 12 arrays each plus an embedding
  (193 leaves, width 16), the leaf structure of a small transformer.

Every step is compiled (never run) ``compile_repeats`` times, round-robin
over the variants after ``jax.clear_caches()``, and the median is kept:

- ``sgd``: the base optimizer alone (the model's own compile cost);
- ``hand_sam``: SAM written by hand with the same maths (``optax.tree.norm``,
  one ascent step) in front of the same base optimizer;
- ``sam`` and ``xsam`` (probing every step): this library's.

The issue's bar: ``sam`` at most 1.5x and ``xsam`` at most 2x ``hand_sam``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.bench import common
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core import report as core_report
from experiments.core.config import setting

RHO, RHO_MAX, LR = common.RHO, common.RHO_MAX, common.LEARNING_RATE
BLOCK_LEAVES = ("ln1", "wq", "wk", "wv", "wo", "bo", "ln2", "w1", "b1", "w2", "b2", "gate")


@dataclasses.dataclass(frozen=True)
class WideConfig(config.StudyConfig):
  """The trees compiled (the full bench; :meth:`quick` is the tests' small one)."""

  leaves: tuple[int, ...] = setting((100, 200, 300), "leaf counts of the flat trees", low=1)
  blocks: int = setting(16, "residual blocks of the transformer-shaped tree (12 leaves each)", low=1)
  compile_repeats: int = setting(3, "fresh compilations per variant", low=1)

  @classmethod
  def quick(cls) -> WideConfig:
    """Flat trees of 10 and 20 leaves, 2 blocks."""
    return cls(leaves=(10, 20), blocks=2)


def flat_problem(n: int, seed: int = 0) -> tuple[dict[str, jax.Array], Callable[[Any], jax.Array]]:
  """``n`` leaves of shape (3,) and the loss ``sum_i sum(sin(c w_i)^2)``."""
  rng = np.random.default_rng(seed)
  params = {f"w{i:03d}": jnp.asarray(1.0 + 0.1 * rng.normal(size=3), jnp.float32) for i in range(n)}
  c = jnp.asarray(rng.normal(size=3), jnp.float32)

  def loss_of(p: Any) -> jax.Array:
    return sum((jnp.sum(jnp.sin(c * p[f"w{i:03d}"]) ** 2) for i in range(n)), jnp.zeros((), jnp.float32))

  return params, loss_of


def transformer_problem(
  blocks: int = 16, width: int = 16, seed: int = 0
) -> tuple[dict[str, Any], Callable[[Any], jax.Array]]:
  """``blocks`` residual blocks of 12 leaves each and an embedding: the leaf structure of a transformer."""
  rng = np.random.default_rng(seed)
  d, f = width, 4 * width
  shapes = {
    "ln1": (d,),
    "wq": (d, d),
    "wk": (d, d),
    "wv": (d, d),
    "wo": (d, d),
    "bo": (d,),
    "ln2": (d,),
    "w1": (d, f),
    "b1": (f,),
    "w2": (f, d),
    "b2": (d,),
    "gate": (d,),
  }
  init = lambda s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]) if len(s) == 2 else np.ones(s), jnp.float32)
  params: dict[str, Any] = {
    "embed": jnp.asarray(rng.normal(size=(32, d)) / 4, jnp.float32),
    "blocks": [{k: init(s) for k, s in shapes.items()} for _ in range(blocks)],
  }
  tokens = jnp.asarray(rng.integers(0, 32, size=(8, 12)))

  def norm(h: jax.Array, s: jax.Array) -> jax.Array:
    return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * s[None, None, :]

  def loss_of(p: Any) -> jax.Array:
    h = p["embed"][tokens]
    for b in p["blocks"]:
      a = norm(h, b["ln1"])
      att = jax.nn.softmax((a @ b["wq"]) @ (a @ b["wk"]).swapaxes(1, 2) / np.sqrt(d), -1)
      h = h + (att @ (a @ b["wv"])) @ b["wo"] + b["bo"][None, None, :]
      m = jax.nn.gelu(norm(h, b["ln2"]) @ b["w1"] + b["b1"][None, None, :])
      h = h + (m @ b["w2"] + b["b2"][None, None, :]) * b["gate"][None, None, :]
    logits = h @ p["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  return params, loss_of


def _base() -> optax.GradientTransformation:
  return optax.sgd(LR, momentum=0.9)


def hand_sam_step(loss_of: Callable[[Any], jax.Array]) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """A plain SAM step written by hand: ``g_1 = grad L(w + rho g_0 / |g_0|)`` into the base optimizer.

  Like every method of the library (its state's ``perturbed_loss``), it also returns the loss at the
  ascent point, from the same ``value_and_grad``: the same maths and the same outputs.
  """
  base = _base()

  def step(params: Any, state: Any) -> Any:
    loss, g0 = jax.value_and_grad(loss_of)(params)
    scale = RHO / (optax.tree.norm(g0) + 1e-12)
    perturbed_loss, g1 = jax.value_and_grad(loss_of)(jax.tree.map(lambda w, g: w + scale * g, params, g0))
    updates, state = base.update(g1, state, params)
    return optax.apply_updates(params, updates), state, (loss, perturbed_loss)

  return base, step


def variants(loss_of: Callable[[Any], jax.Array]) -> dict[str, tuple[Any, Callable[..., Any]]]:
  """Variant name -> (transformation, step)."""
  sam = optax.chain(xsam_jax.sam(RHO), _base())
  xsam = optax.chain(xsam_jax.xsam(RHO, RHO_MAX, alpha_update_period=1, probe_batch_size=1), _base())
  sgd = optax.chain(_base())
  return {
    "sgd": (sgd, common.make_step(sgd, loss_of, lambda _: {})),
    "hand_sam": hand_sam_step(loss_of),
    "sam": (sam, common.make_step(sam, loss_of)),
    "xsam": (xsam, common.make_step(xsam, loss_of)),
  }


def compile_times(params: Any, loss_of: Callable[[Any], jax.Array], compile_repeats: int) -> dict[str, float]:
  """Median compile time (seconds) of each variant's step, compiled round-robin ``compile_repeats`` times."""
  jobs = {name: (step, tx.init(params)) for name, (tx, step) in variants(loss_of).items()}
  times: dict[str, list[float]] = {name: [] for name in jobs}
  for _ in range(compile_repeats):
    for name, (step, state) in jobs.items():
      jax.clear_caches()
      t0 = time.perf_counter()
      jax.jit(step).lower(params, state).compile()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _with_ratios(seconds: dict[str, float], leaves: int) -> dict[str, Any]:
  return {
    "leaves": leaves,
    "compile_s": seconds,
    "sam_over_hand": seconds["sam"] / seconds["hand_sam"],
    "xsam_over_hand": seconds["xsam"] / seconds["hand_sam"],
  }


def run(c: WideConfig) -> dict[str, Any]:
  """The wide-tree report: the flat tree at several leaf counts and the transformer-shaped tree."""
  counts = c.leaves
  out: dict[str, Any] = {"flat": {}}
  for n in counts:
    params, loss_of = flat_problem(n)
    print(f"[bench] wide flat tree: {n} leaves", flush=True)
    out["flat"][str(n)] = _with_ratios(compile_times(params, loss_of, c.compile_repeats), n)
  params, loss_of = transformer_problem(blocks=c.blocks)
  leaves = len(jax.tree.leaves(params))
  print(f"[bench] wide transformer: {leaves} leaves", flush=True)
  out["transformer"] = _with_ratios(compile_times(params, loss_of, c.compile_repeats), leaves)
  first, last = out["flat"][str(counts[0])], out["flat"][str(counts[-1])]
  # Growth of compile time from the fewest to the most leaves, per variant, against the leaf ratio.
  out["flat_growth"] = {name: last["compile_s"][name] / first["compile_s"][name] for name in first["compile_s"]} | {
    "leaf_ratio": counts[-1] / counts[0]
  }
  return out


def format_rows(wide: dict[str, Any]) -> list[str]:
  """Table rows for :func:`experiments.bench.format_table`."""
  rows = ["", "compile time on wide trees (s, median; ratio to a hand-written SAM step)"]
  rows.append(f"{'tree':>18} {'leaves':>6} {'sgd':>7} {'hand':>7} {'sam':>7} {'xsam':>7} {'sam/h':>6} {'xsam/h':>6}")
  entries = [(f"flat {k}", v) for k, v in wide["flat"].items()] + [("transformer", wide["transformer"])]
  for label, e in entries:
    s = e["compile_s"]
    rows.append(
      f"{label:>18} {e['leaves']:>6} {s['sgd']:7.2f} {s['hand_sam']:7.2f} {s['sam']:7.2f} {s['xsam']:7.2f} "
      f"{e['sam_over_hand']:6.2f} {e['xsam_over_hand']:6.2f}"
    )
  growth = wide["flat_growth"]
  rows.append(
    f"growth over {growth['leaf_ratio']:.0f}x the leaves: "
    + ", ".join(f"{k} {v:.1f}x" for k, v in growth.items() if k != "leaf_ratio")
  )
  return rows


COMMAND = command_lib.Command(
  WideConfig,
  prog="python -m experiments.bench_wide",
  description=__doc__ or "",
  quick_help="10 and 20 leaves, 2 blocks",
  out=("results/bench", "results/bench"),
)
"""``python -m experiments.bench_wide``'s command line: ``--quick``, a flag per :class:`WideConfig` field, ``--out``."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m experiments.bench_wide [--quick] [--compile-repeats N] [--out DIR]``: writes ``wide.json``."""
  c, args, _ = COMMAND.parse(argv)
  report = {**core_report.header(), **run(c)}
  common.write(args.out, "wide.json", report, "\n".join(format_rows(report)))
  return report
