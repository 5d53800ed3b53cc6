"""Side-by-side step-time benchmark of SGD, SAM, XSAM and optax.contrib.sam.

    python -m experiments.bench            # MLP + small CNN (+ ResNet-18 off CPU), batch 128 of 32x32x3
    python -m experiments.bench --quick    # tiny shapes, a few repeats (used by the tests)
    python -m experiments.bench --models resnet18   # any subset of mlp, cnn, resnet18

All variants are compiled first, then timed round-robin in one process
(``--repeats`` rounds), and medians and ratios are computed from the same run.
Writes ``<out>/bench.json`` and prints a table. Peak memory is XLA's own
estimate of each compiled step (``compiled.memory_analysis()``: arguments +
outputs + temporaries), which, unlike a process's RSS, is per executable.
Each model's ``microbatched`` entry compares, compiled but not run, the
memory of the full batch's ``value_and_grad`` (and SAM step) with
``xsam_jax.microbatched(loss, 8)``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.bench import common
from experiments.bench import controls as bench_controls
from experiments.bench import probe_memory as bench_probe_memory
from experiments.bench import wide as bench_wide
from experiments.bench.problems import MODELS, default_models, problems
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core import report as core_report
from experiments.core.config import setting
from xsam_jax._src import base as base_lib
from xsam_jax._src import tree_math as tm
from xsam_jax._src.xsam import resolve_probe_batch_size

MICROBATCHES = 8
"""``k`` of :func:`bench_microbatched`."""


@dataclasses.dataclass(frozen=True)
class BenchConfig(config.StudyConfig):
  """What the bench times (the full bench; :meth:`quick` is the tests' tiny one)."""

  rho: float = setting(common.RHO, "SAM / XSAM ascent radius", low=0, low_open=True)
  rho_max: float = setting(common.RHO_MAX, "XSAM probe radius", low=0, low_open=True)
  learning_rate: float = setting(
    common.LEARNING_RATE, "learning rate of the base SGD (momentum 0.9)", flag="lr", low=0, low_open=True
  )
  weight_decay: float = setting(5e-4, "decoupled weight decay of the base optimizer", low=0)
  batch: int = setting(128, f"batch size (a multiple of {MICROBATCHES} for the microbatched entry)", low=1)
  image: int = setting(32, "image side: the inputs are image x image x 3", low=1)
  mlp_width: int = setting(256, "hidden width of the MLP", low=1)
  cnn_width: int = setting(32, "channels of the small CNN's first layer", low=1)
  models: tuple[str, ...] | None = setting(None, "models to bench [none: mlp,cnn; +resnet18 off CPU]", choices=MODELS)
  repeats: int = setting(15, "timed round-robin rounds", low=1)
  compile_repeats: int = setting(3, "fresh compilations per step variant", low=1)
  probe_chunks: tuple[int, ...] = setting((1, 3, 7), "lax.map batch sizes of the probe strategies", low=1)
  wide: bool = setting(True, "compile times on wide trees (experiments.bench.wide)")
  controls: bool = setting(True, "epoch times of cheap SAM and LookSAM (experiments.bench.controls)")
  probe_memory: bool = setting(True, "peak memory of memory-aware probes (experiments.bench.probe_memory)")

  @classmethod
  def quick(cls) -> BenchConfig:
    """Tiny shapes (batch 16 of 8x8x3, narrow models) and few repeats."""
    return cls(batch=16, image=8, mlp_width=64, cnn_width=8, repeats=3, compile_repeats=1)


def _base(c: BenchConfig) -> list[optax.GradientTransformation]:
  return [optax.add_decayed_weights(c.weight_decay), optax.sgd(c.learning_rate, momentum=0.9)]


class _FloorState(NamedTuple):
  count: jax.Array  # type: ignore[assignment]  # optax's counter name; shadows tuple.count
  grad_norm: jax.Array
  zero: jax.Array  # a runtime 0.0, so XLA cannot fold the g_0 term away


def plane_floor(rho: float) -> optax.GradientTransformationExtraArgs:
  """SAM plus the data movement any XSAM rule must add on a non-probe step (a yardstick, not an optimizer).

  XSAM's output ``|g_1| v(alpha)`` is a combination of ``g_0`` and ``g_1``
  whose coefficients depend on their cosine, so beyond SAM (which already
  computes ``|g_1|``) it needs one pass over ``g_0`` and ``g_1`` for
  ``<g_0, g_1>`` and ``g_0`` read again where the output is formed. This
  transform does exactly that: it outputs ``g_1 + 0 * <g_0, g_1> g_0`` with
  the 0 read from its state. ``xsam_nonprobe / plane_floor`` is then the
  cost of XSAM's rule above the least it could cost.
  """

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return _FloorState(base_lib.zero_count(), zero, zero)

  def rule(trace, state, params, loss_fn):
    del params, loss_fn
    g0, g1 = trace.grads
    grad_norm = tm.tree_norm(g1).astype(jnp.float32)
    out = tm.tree_lincomb(1.0, g1, state.zero * tm.tree_vdot(g0, g1), g0)
    return out, state._replace(grad_norm=grad_norm)

  return base_lib.sharpness_aware_transform("plane_floor", rho=rho, num_steps=1, init_fn=init_fn, rule=rule)


def _variants(
  loss_of: Callable[[Any], jax.Array], c: BenchConfig, probe_batch_size: int | str | None
) -> dict[str, tuple[Any, Callable[..., Any]]]:
  base = _base(c)
  sam = optax.chain(xsam_jax.sam(c.rho), *base)
  floor = optax.chain(plane_floor(c.rho), *base)
  xs_probe = optax.chain(
    xsam_jax.xsam(c.rho, c.rho_max, alpha_update_period=1, probe_batch_size=probe_batch_size), *base
  )
  xs_never = optax.chain(
    xsam_jax.xsam(c.rho, c.rho_max, alpha_update_period=10**9, probe_batch_size=probe_batch_size), *base
  )
  contrib = optax.contrib.sam(
    optax.chain(*base), optax.chain(optax.contrib.normalize(), optax.sgd(c.rho)), sync_period=2, opaque_mode=True
  )
  grad_fn = lambda lo: {"grad_fn": jax.grad(lambda p, _: lo(p))}
  return {
    "sgd": (optax.chain(*base), common.make_step(optax.chain(*base), loss_of, lambda lo: {})),
    "sam": (sam, common.make_step(sam, loss_of)),
    "plane_floor": (floor, common.make_step(floor, loss_of)),
    "xsam_nonprobe": (xs_never, common.make_step(xs_never, loss_of)),
    "xsam_probe": (xs_probe, common.make_step(xs_probe, loss_of)),
    "optax_contrib_sam": (contrib, common.make_step(contrib, loss_of, grad_fn)),
  }


def bench_microbatched(
  params: Any, loss_of: Any, c: BenchConfig, num_microbatches: int = MICROBATCHES
) -> dict[str, dict[str, Any]]:
  """Memory of the full batch against ``xsam_jax.microbatched(loss, k)``: compiled, never run.

  For ``k = 1`` (the plain full-batch call) and ``k = num_microbatches``,
  XLA's memory estimate (:func:`experiments.bench.common.memory`) and the compile time of two
  jitted functions: ``value_and_grad`` of the loss, and a whole SAM step
  (``value_and_grad``, then ``sam`` with the micro-batched ``loss_fn``, then
  the base optimizer). ``temp_bytes`` holds the activations.

  Args:
    params: the model's parameters.
    loss_of: ``functools.partial(loss, batch=batch)`` (see :func:`_classification`).
    num_microbatches: ``k``, dividing the batch size.

  Returns:
    ``{"value_and_grad": {"k=1": {...}, "k=8": {...}, "temp_ratio": t8 / t1}, "sam_step": {...}}``.
  """
  loss, batch = loss_of.func, loss_of.keywords["batch"]
  tx = optax.chain(xsam_jax.sam(c.rho), *_base(c))
  state = tx.init(params)

  def sam_step(loss_mb):
    def step(params, state, batch):
      value, grads = jax.value_and_grad(loss_mb)(params, batch)
      updates, state = tx.update(grads, state, params, loss_fn=functools.partial(loss_mb, batch=batch))
      return optax.apply_updates(params, updates), state, value

    return step, (params, state, batch)

  cases = {
    "value_and_grad": lambda loss_mb: (jax.value_and_grad(loss_mb), (params, batch)),
    "sam_step": sam_step,
  }
  out: dict[str, dict[str, Any]] = {}
  for name, make in cases.items():
    rows: dict[str, Any] = {}
    for k in (1, num_microbatches):
      fn, args = make(xsam_jax.microbatched(loss, k))
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(*args).compile()
      rows[f"k={k}"] = {"compile_s": time.perf_counter() - t0, **(common.memory(compiled) or {})}
    full, micro = rows["k=1"], rows[f"k={num_microbatches}"]
    if "temp_bytes" in full and "temp_bytes" in micro:
      rows["temp_ratio"] = micro["temp_bytes"] / max(full["temp_bytes"], 1)
      rows["peak_ratio"] = micro["peak_bytes"] / max(full["peak_bytes"], 1)
    out[name] = rows
  return out


def bench_steps(
  params: Any, loss_of: Callable[[Any], jax.Array], c: BenchConfig, probe_batch_size: int | str | None = "auto"
) -> dict[str, dict[str, Any]]:
  """Step times (medians over ``c.repeats`` round-robin rounds) and compile times.

  Compile times are medians over ``c.compile_repeats`` fresh compilations per
  variant, also taken round-robin, so that XLA's one-off warm-up and the
  machine's load do not fall on one variant.
  """
  out: dict[str, dict[str, Any]] = {}
  calls: dict[str, Callable[..., Any]] = {}
  jobs = {}
  for name, (tx, step) in _variants(loss_of, c, probe_batch_size).items():
    state = tx.init(params)
    if name == "xsam_nonprobe":  # count=1: the call does not probe
      state = (state[0]._replace(count=jnp.ones([], jnp.int32)), *state[1:])
    jobs[name] = (step, state)
  compile_s: dict[str, list[float]] = {name: [] for name in jobs}
  for _ in range(c.compile_repeats):
    for name, (step, state) in jobs.items():
      jax.clear_caches()  # else the repeat is a cache hit, not a compilation
      compiled, secs, peak = common.compile_timed(step, params, state)
      compile_s[name].append(secs)
      out[name] = {"peak_bytes": peak}
      calls[name] = lambda c=compiled, s=state: c(params, s)
  for name, call in calls.items():
    jax.block_until_ready(call())  # warm-up run
    out[name]["compile_s"] = statistics.median(compile_s[name])
  medians = common.time_round_robin(calls, c.repeats)
  for name, entry in out.items():
    entry["median_s"] = medians[name]
  return out


def bench_probes(params: Any, loss_of: Callable[[Any], jax.Array], c: BenchConfig) -> dict[str, dict[str, Any]]:
  """One probe round (21 forwards) with every strategy (full vmap, ``lax.map`` of ``c.probe_chunks``, a loop)."""
  g0 = jax.grad(loss_of)(params)
  trace = xsam_jax.building_blocks.ascent(loss_of, params, g0, rho=c.rho, num_steps=1)
  v0, v1, theta, _ = xsam_jax.building_blocks.xsam_plane(trace.displacement, trace.grads[-1])
  alphas = jnp.asarray(xsam_jax.DEFAULT_ALPHAS, jnp.float32)
  out: dict[str, dict[str, Any]] = {}
  calls: dict[str, Callable[..., Any]] = {}
  strategies = {"vmap": None, **{f"lax.map(batch_size={b})": b for b in c.probe_chunks}}
  for name, bs in strategies.items():
    fn = lambda p, bs=bs: xsam_jax.building_blocks.probe_losses(
      loss_of, p, v0, v1, theta, alphas, c.rho_max, batch_size=bs
    )
    compiled, secs, peak = common.compile_timed(fn, params)
    jax.block_until_ready(compiled(params))
    calls[name] = lambda c=compiled: c(params)
    out[name] = {"compile_s": secs, "peak_bytes": peak}

  def one_probe(p, a, b):
    return loss_of(jax.tree.map(lambda w, x, y: w + c.rho_max * (a * x + b * y), p, v0, v1))

  compiled, secs, peak = common.compile_timed(one_probe, params, jnp.float32(0), jnp.float32(1))
  coefs = [xsam_jax.building_blocks.slerp_coefficients(a, theta) for a in alphas]

  def loop():
    return [compiled(params, a, b) for a, b in coefs]

  jax.block_until_ready(loop())
  calls["python loop"] = loop
  out["python loop"] = {"compile_s": secs, "peak_bytes": peak}
  medians = common.time_round_robin(calls, c.repeats)
  for name, entry in out.items():
    entry["median_s"] = medians[name]
  return out


def _auto_strategy() -> str:
  """The name of the probe strategy ``probe_batch_size="auto"`` picks on this backend."""
  size = resolve_probe_batch_size("auto")
  return "vmap" if size is None else f"lax.map(batch_size={size})"


def ratios(steps, probes, period=100):
  loop = probes["python loop"]["median_s"]
  default = probes["vmap"]["median_s"]
  best = min(v["median_s"] for k, v in probes.items() if k != "python loop")
  sam, xs_np, xs_p = (steps[k]["median_s"] for k in ("sam", "xsam_nonprobe", "xsam_probe"))
  return {
    "sam/sgd": sam / steps["sgd"]["median_s"],
    "sam/optax_contrib_sam": sam / steps["optax_contrib_sam"]["median_s"],
    "xsam_nonprobe/sam": xs_np / sam,
    "plane_floor/sam": steps["plane_floor"]["median_s"] / sam,
    "xsam_nonprobe/plane_floor": xs_np / steps["plane_floor"]["median_s"],
    "xsam_probe/sam": xs_p / sam,
    "probe_vmap/loop": default / loop,
    "probe_auto/loop": probes[_auto_strategy()]["median_s"] / loop,
    "probe_best_batched/loop": best / loop,
    f"xsam_epoch/sam_epoch (1 probe round per {period} steps)": ((period - 1) * xs_np + xs_p) / (period * sam),
    "xsam_compile/sam_compile": steps["xsam_probe"]["compile_s"] / steps["sam"]["compile_s"],
  }


COMMAND = command_lib.Command(
  BenchConfig,
  prog="python -m experiments.bench",
  description=__doc__ or "",
  quick_help="tiny shapes and few repeats",
  out=("results/bench", "results/bench"),
)
"""``python -m experiments.bench``'s command line: ``--quick``, a flag per :class:`BenchConfig` field, ``--out``."""


def main(argv=None):
  c, args, _ = COMMAND.parse(argv)
  builders = problems(c.mlp_width, c.cnn_width)
  report: dict[str, Any] = {
    **core_report.header(),
    "batch": c.batch,
    "image": f"{c.image}x{c.image}x3",
    "repeats": c.repeats,
    "compile_repeats": c.compile_repeats,
    "models": {},
  }
  for key in c.models or default_models():
    params, loss_of = builders[key](c.batch, c.image)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"[bench] {key}: {n_params} params, batch {c.batch} of {c.image}x{c.image}x3", flush=True)
    probes = bench_probes(params, loss_of, c)
    steps = bench_steps(params, loss_of, c)
    report["models"][key] = {
      "params": n_params,
      "steps": steps,
      "probes": probes,
      "ratios": ratios(steps, probes),
      "microbatched": bench_microbatched(params, loss_of, c),
    }
  if c.wide:
    wide = bench_wide.WideConfig.quick() if args.quick else bench_wide.WideConfig.default()
    report["wide"] = bench_wide.run(wide.replace(compile_repeats=c.compile_repeats))
  if c.controls:
    report["controls"] = bench_controls.run(
      bench_controls.ControlsConfig.quick() if args.quick else bench_controls.ControlsConfig.default()
    )
  if c.probe_memory:
    report["probe_memory"] = bench_probe_memory.run(
      bench_probe_memory.ProbeMemoryConfig.quick() if args.quick else bench_probe_memory.ProbeMemoryConfig.default()
    )
  common.write(args.out, "bench.json", report, format_table(report))
  return report


def format_table(report: dict[str, Any]) -> str:
  lines = [f"device: {report['device']} ({report['host']}), jax {report['jax']}, {report['date']}"]
  for key, m in report["models"].items():
    lines.append(f"\n{key} ({m['params']} params)")
    lines.append(f"  {'variant':<28}{'median ms':>12}{'compile s':>12}{'peak MB':>10}")
    for group in ("steps", "probes"):
      for name, v in m[group].items():
        peak = "-" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.1f}"
        lines.append(f"  {name:<28}{1e3 * v['median_s']:>12.2f}{v['compile_s']:>12.2f}{peak:>10}")
    for name, r in m["ratios"].items():
      lines.append(f"  ratio {name}: {r:.3f}")
    for name, rows in m.get("microbatched", {}).items():
      for k, v in rows.items():
        if isinstance(v, dict) and "temp_bytes" in v:
          lines.append(
            f"  microbatched {name} {k}: temp {v['temp_bytes'] / 2**20:.1f} MB, "
            f"peak {v['peak_bytes'] / 2**20:.1f} MB, compile {v['compile_s']:.2f} s"
          )
      if "temp_ratio" in rows:
        lines.append(f"  microbatched {name} temp ratio k={MICROBATCHES}/k=1: {rows['temp_ratio']:.3f}")
  if "wide" in report:
    lines.extend(bench_wide.format_rows(report["wide"]))
  if "controls" in report:
    lines.extend(["", bench_controls.format_table({**report, **report["controls"]})])
  if "probe_memory" in report:
    lines.extend(["", *bench_probe_memory.format_rows(report["probe_memory"])])
  return "\n".join(lines)
