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

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from xsam_jax._src import base as base_lib
from xsam_jax._src import tree_math as tm
from xsam_jax._src.xsam import resolve_probe_batch_size

RHO, RHO_MAX, LR, WD = 0.05, 0.1, 0.05, 5e-4


class MLP(nn.Module):
  width: int = 256

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class SmallCNN(nn.Module):
  """Four 3x3 convs (one at full resolution, three with stride 2), ~0.39M params."""

  width: int = 32

  @nn.compact
  def __call__(self, x):
    w = self.width
    x = nn.relu(nn.Conv(w, (3, 3))(x))
    for mult in (2, 4, 8):
      x = nn.relu(nn.Conv(w * mult, (3, 3), strides=(2, 2))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def _classification(batch, image, seed, init, apply):
  """``(params, loss_of)`` for a random batch of ``batch`` images ``image x image x 3`` with 10 labels.

  ``init(x) -> params`` and ``apply(params, x) -> logits`` adapt the model's API.
  ``loss_of`` is ``functools.partial(loss, batch={"x": x, "y": y})`` for
  ``loss(params, batch)``, the mean cross-entropy (:func:`bench_microbatched`
  reads ``loss_of.func`` and ``loss_of.keywords["batch"]``).
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch))
  params = init(x)

  def loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, batch["x"]), batch["y"]).mean()

  return params, functools.partial(loss, batch={"x": x, "y": y})


def _problem(model, batch, image, seed=0):
  """A Linen model's ``(params, loss_of)``."""
  return _classification(
    batch,
    image,
    seed,
    lambda x: model.init(jax.random.key(seed), x)["params"],
    lambda p, x: model.apply({"params": p}, x),
  )


def _resnet18_problem(batch, image, seed=0):
  """ResNet-18 (``experiments.models``, Flax NNX, BatchNorm in training mode) as ``(params, loss_of)``."""
  from flax import nnx

  from experiments import models

  graphdef, params, *rest = nnx.split(models.ResNet18(3, 10, rngs=nnx.Rngs(seed)), nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, *rest, copy=True)(x, train=True)  # batch statistics; their update is dropped

  return _classification(batch, image, seed, lambda x: params, apply)


def problems(quick: bool) -> dict[str, Callable[[int, int], tuple[Any, Callable[[Any], jax.Array]]]]:
  """Model name -> ``(batch, image) -> (params, loss_of)``."""
  return {
    "mlp": lambda b, i: _problem(MLP(64 if quick else 256), b, i),
    "cnn": lambda b, i: _problem(SmallCNN(8 if quick else 32), b, i),
    "resnet18": _resnet18_problem,
  }


def default_models() -> str:
  """``mlp,cnn``, plus ``resnet18`` on an accelerator (too slow to time on a CPU)."""
  return "mlp,cnn" if jax.default_backend() == "cpu" else "mlp,cnn,resnet18"


def _base():
  return [optax.add_decayed_weights(WD), optax.sgd(LR, momentum=0.9)]


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


def _variants(loss_of, probe_batch_size):
  sam = optax.chain(xsam_jax.sam(RHO), *_base())
  floor = optax.chain(plane_floor(RHO), *_base())
  xs_probe = optax.chain(
    xsam_jax.xsam(RHO, RHO_MAX, alpha_update_period=1, probe_batch_size=probe_batch_size), *_base()
  )
  xs_never = optax.chain(
    xsam_jax.xsam(RHO, RHO_MAX, alpha_update_period=10**9, probe_batch_size=probe_batch_size), *_base()
  )
  contrib = optax.contrib.sam(
    optax.chain(*_base()), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), sync_period=2, opaque_mode=True
  )
  grad_fn = lambda lo: {"grad_fn": jax.grad(lambda p, _: lo(p))}
  return {
    "sgd": (optax.chain(*_base()), make_step(optax.chain(*_base()), loss_of, lambda lo: {})),
    "sam": (sam, make_step(sam, loss_of)),
    "plane_floor": (floor, make_step(floor, loss_of)),
    "xsam_nonprobe": (xs_never, make_step(xs_never, loss_of)),
    "xsam_probe": (xs_probe, make_step(xs_probe, loss_of)),
    "optax_contrib_sam": (contrib, make_step(contrib, loss_of, grad_fn)),
  }


def _memory(compiled: Any) -> dict[str, int] | None:
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


def _compile(fn, *args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = _memory(compiled)
  return compiled, seconds, None if mem is None else mem["peak_bytes"]


MICROBATCHES = 8
"""``k`` of :func:`bench_microbatched`."""


def bench_microbatched(params, loss_of, num_microbatches=MICROBATCHES):
  """Memory of the full batch against ``xsam_jax.microbatched(loss, k)``: compiled, never run.

  For ``k = 1`` (the plain full-batch call) and ``k = num_microbatches``,
  XLA's memory estimate (:func:`_memory`) and the compile time of two
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
  tx = optax.chain(xsam_jax.sam(RHO), *_base())
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
      rows[f"k={k}"] = {"compile_s": time.perf_counter() - t0, **(_memory(compiled) or {})}
    full, micro = rows["k=1"], rows[f"k={num_microbatches}"]
    if "temp_bytes" in full and "temp_bytes" in micro:
      rows["temp_ratio"] = micro["temp_bytes"] / max(full["temp_bytes"], 1)
      rows["peak_ratio"] = micro["peak_bytes"] / max(full["peak_bytes"], 1)
    out[name] = rows
  return out


def _time_round_robin(calls: dict, repeats: int) -> dict:
  times: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def bench_steps(params, loss_of, repeats, probe_batch_size, compile_repeats=3):
  """Step times (medians over ``repeats`` round-robin rounds) and compile times.

  Compile times are medians over ``compile_repeats`` fresh compilations per
  variant, also taken round-robin, so that XLA's one-off warm-up and the
  machine's load do not fall on one variant.
  """
  out: dict[str, dict[str, Any]] = {}
  calls: dict[str, Callable[..., Any]] = {}
  jobs = {}
  for name, (tx, step) in _variants(loss_of, probe_batch_size).items():
    state = tx.init(params)
    if name == "xsam_nonprobe":  # count=1: the call does not probe
      state = (state[0]._replace(count=jnp.ones([], jnp.int32)), *state[1:])
    jobs[name] = (step, state)
  compile_s: dict[str, list[float]] = {name: [] for name in jobs}
  for _ in range(compile_repeats):
    for name, (step, state) in jobs.items():
      jax.clear_caches()  # else the repeat is a cache hit, not a compilation
      compiled, secs, peak = _compile(step, params, state)
      compile_s[name].append(secs)
      out[name] = {"peak_bytes": peak}
      calls[name] = lambda c=compiled, s=state: c(params, s)
  for name, call in calls.items():
    jax.block_until_ready(call())  # warm-up run
    out[name]["compile_s"] = statistics.median(compile_s[name])
  medians = _time_round_robin(calls, repeats)
  for name, entry in out.items():
    entry["median_s"] = medians[name]
  return out


def bench_probes(params, loss_of, repeats, chunk_sizes):
  """One probe round (21 forwards) with every strategy, timed side by side."""
  g0 = jax.grad(loss_of)(params)
  trace = xsam_jax.ascent(loss_of, params, g0, rho=RHO, num_steps=1)
  v0, v1, theta, _ = xsam_jax.xsam_plane(trace.displacement, trace.grads[-1])
  alphas = jnp.asarray(xsam_jax.DEFAULT_ALPHAS, jnp.float32)
  out: dict[str, dict[str, Any]] = {}
  calls: dict[str, Callable[..., Any]] = {}
  strategies = {"vmap": None, **{f"lax.map(batch_size={b})": b for b in chunk_sizes}}
  for name, bs in strategies.items():
    fn = lambda p, bs=bs: xsam_jax.probe_losses(loss_of, p, v0, v1, theta, alphas, RHO_MAX, batch_size=bs)
    compiled, secs, peak = _compile(fn, params)
    jax.block_until_ready(compiled(params))
    calls[name] = lambda c=compiled: c(params)
    out[name] = {"compile_s": secs, "peak_bytes": peak}

  def one_probe(p, a, b):
    return loss_of(jax.tree.map(lambda w, x, y: w + RHO_MAX * (a * x + b * y), p, v0, v1))

  compiled, secs, peak = _compile(one_probe, params, jnp.float32(0), jnp.float32(1))
  coefs = [xsam_jax.slerp_coefficients(a, theta) for a in alphas]

  def loop():
    return [compiled(params, a, b) for a, b in coefs]

  jax.block_until_ready(loop())
  calls["python loop"] = loop
  out["python loop"] = {"compile_s": secs, "peak_bytes": peak}
  medians = _time_round_robin(calls, repeats)
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats")
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds [15, or 3 with --quick]")
  ap.add_argument(
    "--compile-repeats", type=int, default=None, help="fresh compilations per step variant [3, or 1 with --quick]"
  )
  ap.add_argument(
    "--wide", action=argparse.BooleanOptionalAction, default=True, help="compile times on wide trees [on]"
  )
  ap.add_argument("--out", default="results/bench")
  ap.add_argument(
    "--models", default=None, help="comma-separated subset of mlp, cnn, resnet18 [mlp,cnn; +resnet18 off CPU]"
  )
  args = ap.parse_args(argv)
  batch, image = (16, 8) if args.quick else (128, 32)
  repeats = args.repeats or (3 if args.quick else 15)
  compile_repeats = args.compile_repeats or (1 if args.quick else 3)
  builders = problems(args.quick)
  names = (args.models or default_models()).split(",")
  unknown = sorted(set(names) - set(builders))
  if unknown:
    ap.error(f"argument --models: unknown {unknown}; choose from {sorted(builders)}")
  device = jax.devices()[0]
  report: dict[str, Any] = {
    "date": time.strftime("%Y-%m-%d"),
    "device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
    "host": f"{platform.machine()}, {jax.device_count()} device(s), {__import__('os').cpu_count()} CPU cores",
    "jax": jax.__version__,
    "optax": optax.__version__,
    "batch": batch,
    "image": f"{image}x{image}x3",
    "repeats": repeats,
    "compile_repeats": compile_repeats,
    "models": {},
  }
  for key in names:
    params, loss_of = builders[key](batch, image)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"[bench] {key}: {n_params} params, batch {batch} of {image}x{image}x3", flush=True)
    probes = bench_probes(params, loss_of, repeats, chunk_sizes=(1, 3, 7))
    steps = bench_steps(params, loss_of, repeats, probe_batch_size="auto", compile_repeats=compile_repeats)
    report["models"][key] = {
      "params": n_params,
      "steps": steps,
      "probes": probes,
      "ratios": ratios(steps, probes),
      "microbatched": bench_microbatched(params, loss_of),
    }
  if args.wide:
    from experiments import bench_wide  # imports this module's make_step

    report["wide"] = bench_wide.run(args.quick, compile_repeats)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench.json").write_text(json.dumps(report, indent=2))
  print(format_table(report))
  print(f"[bench] wrote {out / 'bench.json'}")
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
    from experiments import bench_wide

    lines.extend(bench_wide.format_rows(report["wide"]))
  return "\n".join(lines)


if __name__ == "__main__":
  main()
