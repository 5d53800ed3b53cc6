r"""Peak memory of XSAM's probe step against SAM's step, for several probe memory budgets.

``xsam(..., probe_batch_size="auto")`` runs the probes in chunks of ``c``
parameter copies, the largest ``c`` with ``c * P <= budget`` (``P``: the
parameters' bytes; ``None``, one ``vmap``, when all ``n`` probes fit; ``1``
when not even one does). This bench forces the budget
(``probe_memory_budget=``, which also applies on CPU), compiles one training
step (gradient, transformation, ``optax.sgd``) of an MLP for ``sam`` and for
``xsam`` probing every step, and reads XLA's own estimate of each compiled
step's temporaries (``compiled.memory_analysis().temp_size_in_bytes``: the
arguments and outputs are the same for both). The bound it checks:

.. math::

  \mathrm{temp}_{xsam} \le \mathrm{temp}_{sam} + c P + 2 P + c F,

with ``c = n`` for one ``vmap``. The slack: ``2 P`` for the plane's two
trees, ``g_0``'s direction and ``g_K``, which XSAM keeps alive through the
probes (SAM computes both too, but frees ``g_0`` before its own peak, the
backward pass at the ascent point); ``c F`` for the activations of ``c``
probes' forward passes, with ``F`` the temporaries of one compiled forward
pass of the loss (the budget counts parameter copies only).
Nothing is run, only compiled, so any backend measures its own programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import xsam_jax
from experiments.bench import common
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core import report as core_report
from experiments.core.config import setting
from xsam_jax._src.xsam import resolve_probe_batch_size, tree_bytes

RHO, RHO_MAX, LR = 0.05, 0.1, 0.1


@dataclasses.dataclass(frozen=True)
class ProbeMemoryConfig(config.StudyConfig):
  """The MLP and the budgets (the full bench; :meth:`quick` is a smaller one)."""

  inputs: int = setting(256, "input features of the MLP", low=1)
  width: int = setting(1024, "hidden width of the MLP", low=1)
  depth: int = setting(2, "hidden layers of the MLP", low=1)
  batch: int = setting(32, "examples in the batch", low=1)
  budgets: tuple[float, ...] = setting(
    (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 21.0), "probe memory budgets, in multiples of the params' bytes", low=0.0
  )

  @classmethod
  def quick(cls) -> ProbeMemoryConfig:
    """A 0.1M-parameter MLP (one hidden layer), three budgets: a sequential scan, a chunk of 4, one vmap."""
    return cls(inputs=256, width=384, depth=1, budgets=(0.5, 4.0, 21.0))


def mlp_problem(
  inputs: int, width: int, depth: int, batch: int, classes: int = 10, seed: int = 0
) -> tuple[list[dict[str, jax.Array]], Callable[[Any], jax.Array]]:
  """A tanh MLP's params (``depth`` hidden layers of ``width``) and its cross-entropy on a fixed random batch."""
  dims = [inputs] + [width] * depth + [classes]
  keys = jax.random.split(jax.random.key(seed), len(dims) + 1)
  layers = zip(keys[:-2], dims[:-1], dims[1:], strict=True)
  params = [{"w": jax.random.normal(k, (a, b)) / a**0.5, "b": jnp.zeros(b)} for k, a, b in layers]
  x = jax.random.normal(keys[-2], (batch, inputs))
  y = jax.random.randint(keys[-1], (batch,), 0, classes)

  def loss_of(p: Any) -> jax.Array:
    h = x
    for layer in p[:-1]:
      h = jnp.tanh(h @ layer["w"] + layer["b"][None, :])
    logits = h @ p[-1]["w"] + p[-1]["b"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss_of


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """XLA's estimate of the temporaries of ``jax.jit(fn)`` compiled for ``args`` (0 where the backend gives none)."""
  mem = jax.jit(fn).lower(*args).compile().memory_analysis()
  return 0 if mem is None else int(mem.temp_size_in_bytes)


def step_temp_bytes(tx: optax.GradientTransformationExtraArgs, params: Any, loss_of: Callable[[Any], jax.Array]) -> int:
  """Temporaries of one compiled training step: ``g_0``, ``tx`` then ``optax.sgd``, the params updated."""
  chain = optax.chain(tx, optax.sgd(LR))

  def step(p: Any, state: Any) -> Any:
    updates, state = chain.update(jax.grad(loss_of)(p), state, p, loss_fn=loss_of)
    return optax.apply_updates(p, updates), state

  return temp_bytes(step, params, chain.init(params))


def measure(
  params: Any,
  loss_of: Callable[[Any], jax.Array],
  budgets: Sequence[int],
  alphas: Sequence[float] = xsam_jax.DEFAULT_ALPHAS,
) -> dict[str, Any]:
  """XSAM's probe step against SAM's step, one row per budget (bytes); see the module docstring for the bound."""
  n, param_bytes = len(alphas), tree_bytes(params)
  sam = step_temp_bytes(xsam_jax.sam(RHO), params, loss_of)
  forward = temp_bytes(loss_of, params)
  rows: list[dict[str, Any]] = []
  for budget in budgets:
    chunk = resolve_probe_batch_size("auto", params, n, memory_budget=budget)
    tx = xsam_jax.xsam(RHO, RHO_MAX, alphas=alphas, alpha_update_period=1, probe_memory_budget=budget)
    xsam = step_temp_bytes(tx, params, loss_of)
    copies = n if chunk is None else chunk
    bound = sam + copies * param_bytes + 2 * param_bytes + copies * forward
    rows.append({"budget_bytes": budget, "chunk": chunk, "xsam_temp_bytes": xsam, "bound_bytes": bound})
  return {
    "param_bytes": param_bytes,
    "num_probes": n,
    "sam_temp_bytes": sam,
    "forward_temp_bytes": forward,
    "rows": rows,
    "all_within_bound": all(r["xsam_temp_bytes"] <= r["bound_bytes"] for r in rows),
  }


def run(c: ProbeMemoryConfig) -> dict[str, Any]:
  """The report: the MLP's sizes and one row per budget of ``c.budgets`` (multiples of the params' bytes)."""
  params, loss_of = mlp_problem(c.inputs, c.width, c.depth, c.batch)
  param_bytes = tree_bytes(params)
  print(f"[bench] probe memory: MLP of {param_bytes // 4} float32 params, {len(c.budgets)} budgets", flush=True)
  budgets = [max(int(m * param_bytes), 1) for m in c.budgets]
  device = jax.local_devices()[0]
  return {
    "config": dataclasses.asdict(c),
    "device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
    **measure(params, loss_of, budgets),
  }


def format_rows(report: dict[str, Any]) -> list[str]:
  """The table: budget, chosen chunk, temporaries of xsam and sam, the bound (MB and multiples of P)."""
  p, mb = report["param_bytes"], 2**20
  title = (
    f"probe memory (P = {p / mb:.2f} MB of params, {report['num_probes']} probes, "
    f"one forward F = {report['forward_temp_bytes'] / mb:.2f} MB; temporaries of one compiled step)"
  )
  rows = [
    title,
    f"{'budget MB':>10} {'budget/P':>8} {'chunk':>6} {'xsam MB':>9} {'sam MB':>8} {'bound MB':>9} {'excess/P':>9} ok",
  ]
  sam = report["sam_temp_bytes"]
  for r in report["rows"]:
    chunk = "vmap" if r["chunk"] is None else str(r["chunk"])
    ok = "yes" if r["xsam_temp_bytes"] <= r["bound_bytes"] else "NO"
    rows.append(
      f"{r['budget_bytes'] / mb:10.2f} {r['budget_bytes'] / p:8.2f} {chunk:>6} {r['xsam_temp_bytes'] / mb:9.2f} "
      f"{sam / mb:8.2f} {r['bound_bytes'] / mb:9.2f} {(r['xsam_temp_bytes'] - sam) / p:9.2f} {ok}"
    )
  rows.append("bound: sam + c P + 2 P + c F (c = the chunk, all probes for vmap); excess: xsam - sam")
  return rows


COMMAND = command_lib.Command(
  ProbeMemoryConfig,
  prog="python -m experiments.bench_probe_memory",
  description=__doc__ or "",
  quick_help="a 0.1M-parameter MLP, three budgets",
  out=("results/bench", "results/bench"),
)
"""``python -m experiments.bench_probe_memory``'s command line: ``--quick``, a flag per config field, ``--out``."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m experiments.bench_probe_memory [--quick] [--budgets B,...] [--out DIR]``: ``probe_memory.json``."""
  c, args, _ = COMMAND.parse(argv)
  report = {**core_report.header(), **run(c)}
  common.write(args.out, "probe_memory.json", report, "\n".join(format_rows(report)))
  return report
