"""What the training controls save: time per epoch of SGD, SAM, SAM every 2 and 5 steps, LookSAM, RWP,
Momentum-SAM, Preconditioned SAM and Functional SAM (plain and preconditioned).

    python -m experiments.bench_controls            # small CNN on scikit-learn's digits, batch 128
    python -m experiments.bench_controls --quick    # narrow model, a short epoch, few repeats (the tests)

One process, one problem, every variant compiled first and then timed
round-robin (``--repeats`` rounds; the machine may be shared, so compare the
medians and their ratios, which come from the same rounds):

- ``epoch``: one training epoch (``jax.lax.scan`` over the epoch's batches,
  from the same initial state every time) of ``optax`` SGD alone, ``sam``,
  ``sam(perturb_every=2)``, ``sam(perturb_every=5)``, ``looksam(k=5)`` and
  ``rwp(0.01, alpha=0.5)`` (the authors' CIFAR setting; its extra pass, the
  gradient at the random point, on the same batch), each in front of the
  same base optimizer (decayed weights, SGD with
  momentum), and ``momentum_sam`` (a whole optimizer: the same decayed
  weights and SGD with momentum, perturbed along the momentum, no extra
  pass; its bar is 1.05x SGD's epoch), ``preconditioned_sam``,
  ``functional_sam`` and ``functional_sam(precondition=True)`` (called with
  ``model_fn`` = the logits and ``output_loss_fn`` = the cross-entropy; its
  extra pass adds a forward at ``w`` to SAM's). ``perturbed_steps`` counts the epoch's steps that run the
  extra pass; ``expected_ratio`` is ``1 + perturbed_steps / steps``, the
  cost relative to SGD if the extra pass costs one forward+backward and
  nothing else does.
- ``step``: the same scan with the method's step counter pinned, so every
  step is of one kind: LookSAM's steps that reuse ``g_v`` (and SAM's skipped
  steps under ``perturb_every``) against an SGD step, which they should
  match, and LookSAM's perturbing steps against SAM's.

Writes ``<out>/controls.json`` and prints a table.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import xsam_jax
from experiments.bench import common
from experiments.core import command as command_lib
from experiments.core import config, data, models
from experiments.core import report as core_report
from experiments.core.config import setting

EPOCH_VARIANTS = (
  "sgd",
  "sam",
  "sam_every2",
  "sam_every5",
  "looksam_k5",
  "rwp",
  "preconditioned_sam",
  "functional_sam",
  "functional_sam_precond",
  "momentum_sam",
)
"""The methods timed per epoch (``looksam_k5`` takes ``--k``)."""

PLAIN_VARIANTS = ("sgd", "momentum_sam")
"""The epoch variants that are plain optimizers: ``update`` without ``loss_fn``."""

SPLIT_VARIANTS = ("functional_sam", "functional_sam_precond")
"""The epoch variants called with the loss in two parts: ``update(..., model_fn=, output_loss_fn=)``."""

STEP_VARIANTS = ("sgd", "sam", "looksam_reuse", "looksam_sam", "sam_every5_skip")
"""The step kinds timed with the counter pinned."""


@dataclasses.dataclass(frozen=True)
class ControlsConfig(config.StudyConfig):
  """What :func:`main` times (:meth:`quick` is the tests' tiny run)."""

  model: str = setting("cnn2d", "model of experiments.core.models", choices=("mlp", "cnn2d"))
  width: int = setting(16, "the model's base width (MLP: hidden units 8 x width)", low=1)
  batch: int = setting(128, "batch size", low=1)
  steps: int | None = setting(None, "steps of a timed epoch [none: all full batches of digits' training set]", low=1)
  rho: float = setting(0.05, "ascent radius", low=0, low_open=True)
  k: int = setting(5, "LookSAM's period", low=1)
  alpha: float = setting(0.7, "LookSAM's alpha", low=0)
  learning_rate: float = setting(0.05, "learning rate of the base SGD (momentum 0.9)", flag="lr", low=0, low_open=True)
  weight_decay: float = setting(5e-4, "decoupled weight decay of the base optimizer", low=0)
  repeats: int = setting(15, "timed round-robin rounds", low=1)
  seed: int = setting(0, "model initialisation and batch order", low=0)

  @classmethod
  def quick(cls) -> ControlsConfig:
    """A narrow MLP, 10-step epochs of batch 32, 3 rounds."""
    return cls(model="mlp", width=2, batch=32, steps=10, repeats=3)


def problem(c: ControlsConfig) -> tuple[Any, Callable[[Any, Any], jax.Array], tuple[jax.Array, jax.Array]]:
  """``(params, loss, (xs, ys))``: the model's parameters, ``loss(params, (x, y))`` and one epoch's batches.

  The batches are :class:`experiments.core.data.EpochBatches` of digits (epoch 0,
  no augmentation), stacked as ``(steps, batch, ...)``. BatchNorm runs in
  training mode; its running statistics are dropped (they do not change the
  cost of a step).
  """
  params, logits_of, output_loss, batches = split_problem(c)
  return params, lambda p, batch: output_loss(logits_of(p, batch[0]), batch[1]), batches


def split_problem(
  c: ControlsConfig,
) -> tuple[Any, Callable[[Any, jax.Array], jax.Array], Callable[[jax.Array, jax.Array], jax.Array], Any]:
  """:func:`problem` with the loss in two parts: ``(params, logits_of(params, x), output_loss(logits, y),
  (xs, ys))``, for Functional SAM's ``model_fn`` and ``output_loss_fn``."""
  ds = data.load_digits()
  batches = data.EpochBatches(ds, seed=c.seed, epoch=0, batch_size=c.batch, augment=False)
  steps = len(batches) if c.steps is None else c.steps
  if not 1 <= steps <= len(batches):
    raise config.ConfigError("steps", f"must be at most {len(batches)} at batch {c.batch}, got {steps}")
  xs, ys = zip(*(batches[i] for i in range(steps)), strict=True)
  model = models.make_model(c.model, ds.input_shape, ds.num_classes, width=c.width, seed=c.seed)
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

  def logits_of(p: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, p, *rest, copy=True)(x, train=True)

  def output_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, logits_of, output_loss, (jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))


def optimizers(c: ControlsConfig) -> dict[str, optax.GradientTransformationExtraArgs]:
  """Every variant's whole optimizer: the method (none for SGD), then decayed weights and SGD with momentum."""
  base = (optax.add_decayed_weights(c.weight_decay), optax.sgd(c.learning_rate, momentum=0.9))
  methods = {
    "sam": xsam_jax.sam(c.rho),
    "sam_every2": xsam_jax.sam(c.rho, perturb_every=2),
    "sam_every5": xsam_jax.sam(c.rho, perturb_every=5),
    "looksam_k5": xsam_jax.looksam(c.rho, k=c.k, alpha=c.alpha),
    "rwp": xsam_jax.rwp(0.01, alpha=0.5),
    "preconditioned_sam": xsam_jax.preconditioned_sam(c.rho),
    "functional_sam": xsam_jax.functional_sam(c.rho),
    "functional_sam_precond": xsam_jax.functional_sam(c.rho, precondition=True),
  }
  # Momentum-SAM is a whole optimizer (the same decayed weights and SGD with momentum inside; no extra pass):
  # its cost does not depend on rho, so it takes SAM's.
  whole = xsam_jax.momentum_sam(c.rho, learning_rate=c.learning_rate, momentum=0.9, weight_decay=c.weight_decay)
  return {
    "sgd": optax.chain(*base),
    **{name: optax.chain(tx, *base) for name, tx in methods.items()},
    "momentum_sam": whole,
  }


def epoch_fn(
  tx: optax.GradientTransformationExtraArgs,
  loss: Callable[[Any, Any], jax.Array],
  *,
  plain: bool = False,
  split: tuple[Callable[[Any, jax.Array], jax.Array], Callable[[jax.Array, jax.Array], jax.Array]] | None = None,
) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """``(params, state, xs, ys, counts=None) -> (params, state, mean loss)``: a ``jax.lax.scan`` of training steps.

  ``counts``: None, or an int32 array ``(steps,)``: the method's step
  counter (``state[0].count``) is set to ``counts[i]`` before step ``i``
  (pinned, so that every step is of one kind). It is an argument, not a
  constant, so that XLA cannot fold the method's ``jax.lax.cond`` away.
  ``plain``: ``tx`` is a plain optimizer (no ``loss_fn`` passed).
  ``split``: ``(logits_of, output_loss)`` (:func:`split_problem`): ``tx``
  takes ``model_fn`` and ``output_loss_fn`` (Functional SAM) instead of ``loss_fn``.
  """

  def body(carry: tuple[Any, Any], batch: tuple[jax.Array, ...]) -> tuple[tuple[Any, Any], jax.Array]:
    params, state = carry
    if len(batch) == 3:
      state = (state[0]._replace(count=batch[2]), *state[1:])
    extra: Callable[[Any], dict[str, Any]] | None = (lambda lo: {}) if plain else None
    if split is not None:
      logits_of, output_loss = split
      extra = lambda lo: {
        "model_fn": lambda p: logits_of(p, batch[0]),
        "output_loss_fn": lambda z: output_loss(z, batch[1]),
      }
    step = common.make_step(tx, lambda p: loss(p, batch[:2]), extra)
    params, state, value = step(params, state)
    return (params, state), value

  def run(
    params: Any, state: Any, xs: jax.Array, ys: jax.Array, counts: jax.Array | None = None
  ) -> tuple[Any, Any, jax.Array]:
    scanned = (xs, ys) if counts is None else (xs, ys, counts)
    (params, state), values = jax.lax.scan(body, (params, state), scanned)
    return params, state, values.mean()

  return run


def perturbed_steps(name: str, steps: int, k: int) -> int:
  """How many of an epoch's ``steps`` (counted from 0) run the extra pass under variant ``name``."""
  every = {
    "sgd": None,
    "sam": 1,
    "sam_every2": 2,
    "sam_every5": 5,
    "looksam_k5": k,
    "rwp": 1,
    "momentum_sam": None,
    "preconditioned_sam": 1,
    "functional_sam": 1,  # its extra pass: a forward+backward at w + e and a forward at w
    "functional_sam_precond": 1,
  }[name]
  return 0 if every is None else len(range(0, steps, every))


def _prepare(
  jobs: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]], dict[str, Any]]:
  """Compiles every job and runs it once (warm-up).

  Returns ``(calls, entries, outputs)``: the compiled calls with their
  arguments bound, ``{name: {"compile_s": ...}}`` and the warm-up outputs.
  """
  calls: dict[str, Callable[[], Any]] = {}
  entries: dict[str, dict[str, Any]] = {}
  outputs: dict[str, Any] = {}
  for name, (fn, args) in jobs.items():
    compiled, seconds, _ = common.compile_timed(fn, *args)
    outputs[name] = jax.block_until_ready(compiled(*args))
    calls[name] = functools.partial(compiled, *args)
    entries[name] = {"compile_s": seconds}
  return calls, entries, outputs


def run(c: ControlsConfig) -> dict[str, Any]:
  """Times every epoch and step variant of ``c`` in one round-robin; returns the report (see the module docstring)."""
  params, logits_of, output_loss, (xs, ys) = split_problem(c)
  loss = lambda p, batch: output_loss(logits_of(p, batch[0]), batch[1])
  steps = int(xs.shape[0])
  txs = optimizers(c)
  states = {name: tx.init(params) for name, tx in txs.items()}
  jobs = {
    name: (
      epoch_fn(
        tx, loss, plain=name in PLAIN_VARIANTS, split=(logits_of, output_loss) if name in SPLIT_VARIANTS else None
      ),
      (params, states[name], xs, ys),
    )
    for name, tx in txs.items()
  }
  calls, epoch, outputs = _prepare(jobs)

  # Pinned counters. LookSAM's reuse steps start from a g_v: the state after an epoch. SGD's and SAM's
  # epochs already hold one kind of step each: their per-step times are the epoch's.
  look, look_state = txs["looksam_k5"], outputs["looksam_k5"][1]
  pinned = {
    "looksam_reuse": (look, look_state, 1),
    "looksam_sam": (look, look_state, 0),
    "sam_every5_skip": (txs["sam_every5"], states["sam_every5"], 1),
  }
  pin = lambda count: jnp.full([steps], count, jnp.int32)
  pinned_calls, pinned_entries, _ = _prepare(
    {name: (epoch_fn(tx, loss), (params, s, xs, ys, pin(count))) for name, (tx, s, count) in pinned.items()}
  )
  medians = common.time_round_robin(calls | pinned_calls, c.repeats)  # one round-robin: the same load for all
  for name, entry in epoch.items():
    entry["median_s"] = medians[name]
    entry["perturbed_steps"] = perturbed_steps(name, steps, c.k)
    entry["expected_ratio"] = 1.0 + entry["perturbed_steps"] / steps
  compile_s = {name: entry["compile_s"] for name, entry in (epoch | pinned_entries).items()}
  step = {name: {"median_s": medians[name] / steps, "compile_s": compile_s[name]} for name in STEP_VARIANTS}

  sgd_epoch, sgd_step = epoch["sgd"]["median_s"], step["sgd"]["median_s"]
  ratios = {f"epoch {name}/sgd": epoch[name]["median_s"] / sgd_epoch for name in EPOCH_VARIANTS[1:]}
  ratios["epoch looksam_k5/sam_every5"] = epoch["looksam_k5"]["median_s"] / epoch["sam_every5"]["median_s"]
  for name in ("preconditioned_sam", "functional_sam", "functional_sam_precond"):
    ratios[f"epoch {name}/sam"] = epoch[name]["median_s"] / epoch["sam"]["median_s"]
  ratios |= {f"step {name}/sgd": step[name]["median_s"] / sgd_step for name in STEP_VARIANTS[1:]}
  ratios["step looksam_sam/sam"] = step["looksam_sam"]["median_s"] / step["sam"]["median_s"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {
    "config": dataclasses.asdict(c),  # the bench's report nests this dict whole: it carries its own config
    "problem": {"dataset": "digits", "model": c.model, "params": n_params, "batch": c.batch, "steps": steps},
    "epoch": epoch,
    "step": step,
    "ratios": ratios,
  }


COMMAND = command_lib.Command(
  ControlsConfig,
  prog="python -m experiments.bench_controls",
  description=__doc__ or "",
  quick_help="a narrow MLP, 10-step epochs, 3 rounds",
  out=("results/bench", "results/bench"),
)
"""``python -m experiments.bench_controls``'s command line: ``--quick``, a flag per field, ``--out``."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
  c, args, command = COMMAND.parse(argv)
  report: dict[str, Any] = {**core_report.header(), "command": command, **run(c)}
  common.write(args.out, "controls.json", report, format_table(report))
  return report


def format_table(report: dict[str, Any]) -> str:
  """The report as text: per-epoch and per-step medians, then the ratios."""
  p = report["problem"]
  lines = [
    f"device: {report['device']} ({report['cpu']}; {report['host']}), jax {report['jax']}, {report['date']}",
    (
      f"{p['model']} on {p['dataset']} ({p['params']} params), batch {p['batch']}, {p['steps']} steps an epoch, "
      f"medians of {report['config']['repeats']} round-robin rounds"
    ),
    f"  {'epoch':<24}{'median ms':>12}{'extra passes':>14}{'expected x':>12}{'measured x':>12}{'compile s':>11}",
  ]
  sgd = report["epoch"]["sgd"]["median_s"]
  for name, v in report["epoch"].items():
    lines.append(
      f"  {name:<24}{1e3 * v['median_s']:>12.2f}{v['perturbed_steps']:>14}{v['expected_ratio']:>12.2f}"
      f"{v['median_s'] / sgd:>12.2f}{v['compile_s']:>11.2f}"
    )
  lines.append(f"  {'step (pinned)':<24}{'median ms':>12}{'x sgd':>14}")
  sgd = report["step"]["sgd"]["median_s"]
  for name, v in report["step"].items():
    lines.append(f"  {name:<24}{1e3 * v['median_s']:>12.3f}{v['median_s'] / sgd:>14.2f}")
  lines.extend(f"  ratio {name}: {r:.3f}" for name, r in report["ratios"].items())
  return "\n".join(lines)
