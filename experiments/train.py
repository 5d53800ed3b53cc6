"""The main job: compare SGD, SAM and XSAM on a classification task.

    python -m experiments.train                      # SGD vs SAM vs XSAM, 3 seeds, MNIST-1D
    python -m experiments.train --quick              # smoke test, < 1 minute
    python -m experiments.train --method xsam --num-steps 3
    python -m experiments.train --methods sam,xsam --dataset cifar10 \\
        --data-dir ~/tensorflow_datasets --model resnet18 --epochs 200 \\
        --batch-size 125 --rho 0.15                  # the paper's setting, GPU
    python -m experiments.train --devices 8          # data parallel over 8 devices

Prints a table of final test accuracy (mean ± std over seeds) and writes
``results.json``, ``accuracy.png`` and ``xsam_alpha_theta.png`` into
``--output-dir``. Checkpoints go to ``--workdir``; re-running the same
command resumes interrupted runs (and reuses finished ones).

``--devices N`` trains data parallel over the first N of ``jax.devices()``
(the batch sharded, parameters and optimizer state replicated, one jitted
global step: the single-device result up to float reduction order). On a
CPU, make N devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before starting.
Flags given on the command line always win over ``--quick``'s settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax

from experiments import configs, report, trainer
from experiments import study as study_lib

DEFAULT_METHODS = "sgd,sam,xsam"


def _optional_int(text: str) -> int | None:
  return None if text.lower() == "none" else int(text)


def _probe_batch_size(text: str) -> int | str | None:
  if text.lower() == "auto":
    return "auto"
  return _optional_int(text)


def _alphas(text: str) -> tuple | None:
  if text.lower() in ("none", "default", ""):
    return None
  try:
    return tuple(float(x) for x in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated floats, got {text!r}") from e


def _refinement(text: str) -> str | None:
  return None if text.lower() == "none" else text


def build_parser() -> argparse.ArgumentParser:
  """The command line; defaults of training fields come from ``configs``."""
  d = configs.default_config()
  p = argparse.ArgumentParser(
    prog="python -m experiments.train",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  g = p.add_argument_group("study")
  g.add_argument("--method", help="train a single method (sgd, sam, xsam, or any xsam_jax transformation)")
  g.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods to compare")
  g.add_argument("--seeds", type=int, default=3, help="number of seeds per method")
  g.add_argument("--seed0", type=int, default=0, help="first seed")
  g.add_argument(
    "--quick", action="store_true", help="tiny subset, 1 epoch, 1 seed (smoke test); flags given explicitly override it"
  )
  g.add_argument("--workdir", default=None, help="checkpoint folder [runs/train, or runs/quick with --quick]")
  g.add_argument("--output-dir", default=None, help="results folder [results/train, or runs/quick with --quick]")
  g.add_argument("--fresh", action="store_true", help="ignore and overwrite existing checkpoints")
  g.add_argument("--no-checkpoints", action="store_true", help="do not write checkpoints")
  g.add_argument("--no-progress", action="store_true", help="hide progress bars")
  g.add_argument(
    "--devices",
    type=int,
    default=d.devices,
    help="data parallel over the first N of jax.devices(): batch sharded, params replicated "
    "(N must divide --batch-size; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)",
  )

  g = p.add_argument_group("data and model")
  g.add_argument("--dataset", default=d.dataset, help="mnist1d, digits, or a tensorflow-datasets name (cifar10, ...)")
  g.add_argument("--data-dir", default=d.data_dir, help="MNIST-1D cache / tensorflow-datasets data_dir")
  g.add_argument(
    "--download",
    action="store_true",
    help="let tensorflow-datasets download and prepare the data set (needs TensorFlow)",
  )
  g.add_argument("--model", default=d.model, help="mlp, cnn1d, cnn2d, resnet18 [by data set]")
  g.add_argument("--width", type=int, default=d.width, help="base width of the small models")
  g.add_argument("--batch-norm", action="store_true", help="BatchNorm in the MLP / 1-D CNN")
  g.add_argument("--train-subset", type=int, default=d.train_subset, help="use the first N training examples")
  g.add_argument("--test-subset", type=int, default=d.test_subset, help="use the first N test examples")
  g.add_argument(
    "--augment",
    action=argparse.BooleanOptionalAction,
    default=d.augment,
    help="random crop + flip [on for tensorflow-datasets images]",
  )

  g = p.add_argument_group("optimization")
  g.add_argument("--epochs", type=int, default=d.epochs)
  g.add_argument("--batch-size", type=int, default=d.batch_size)
  g.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (cosine schedule)")
  g.add_argument("--momentum", type=float, default=d.momentum)
  g.add_argument("--weight-decay", type=float, default=d.weight_decay)
  g.add_argument("--rho", type=float, default=d.rho, help="ascent radius")
  g.add_argument("--rho-max", type=float, default=d.rho_max, help="XSAM probe radius [2 * rho]")
  g.add_argument("--num-steps", type=int, default=d.num_steps, help="ascent steps K")
  g.add_argument(
    "--alpha-update-period",
    type=_optional_int,
    default=d.alpha_update_period,
    help="XSAM probe period in steps [one epoch]",
  )
  g.add_argument(
    "--probe-batch-size",
    type=_probe_batch_size,
    default=d.probe_batch_size,
    help="XSAM probes at a time: an int, none (one vmap) or auto",
  )
  g.add_argument(
    "--alphas", type=_alphas, default=d.alphas, help="XSAM's alpha grid, comma-separated [none: 0.0, 0.1, ..., 2.0]"
  )
  g.add_argument(
    "--alpha-refinement",
    type=_refinement,
    default=d.alpha_refinement,
    choices=[None, "parabola"],
    help="XSAM's sub-grid alpha refinement: none or parabola",
  )
  g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints")
  g.add_argument(
    "--stop-after-epochs",
    type=int,
    default=None,
    help="stop after this many epochs (simulated preemption; re-run to resume)",
  )
  return p


# TrainConfig field -> argparse dest of its flag (all other flags are not fields).
CONFIG_FLAGS = {
  "dataset": "dataset",
  "data_dir": "data_dir",
  "model": "model",
  "width": "width",
  "batch_norm": "batch_norm",
  "train_subset": "train_subset",
  "test_subset": "test_subset",
  "augment": "augment",
  "epochs": "epochs",
  "batch_size": "batch_size",
  "learning_rate": "lr",
  "momentum": "momentum",
  "weight_decay": "weight_decay",
  "rho": "rho",
  "rho_max": "rho_max",
  "num_steps": "num_steps",
  "alpha_update_period": "alpha_update_period",
  "probe_batch_size": "probe_batch_size",
  "checkpoint_every": "checkpoint_every",
  "stop_after_epochs": "stop_after_epochs",
  "devices": "devices",
  "alphas": "alphas",
  "alpha_refinement": "alpha_refinement",
}


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: the arguments (None: ``sys.argv[1:]``).
    parser: the parser to use (None: :func:`build_parser`'s).

  Returns:
    The namespace of :func:`build_parser`, plus ``explicit``: the set of
    dests whose flags were given on the command line (whatever their value,
    default or not), so that they win over ``--quick``.
  """
  args = (parser or build_parser()).parse_args(argv)
  # A second parse in which no flag has a default: only given flags appear.
  # (Per action: parser-level set_defaults(SUPPRESS) would leak into the namespace.)
  probe = build_parser()
  for action in probe._actions:  # pylint: disable=protected-access
    action.default = argparse.SUPPRESS
  args.explicit = frozenset(vars(probe.parse_args(argv)))
  return args


def config_from_args(args: argparse.Namespace) -> configs.TrainConfig:
  """The base :class:`TrainConfig` of the study described by ``args``.

  With ``--quick`` the quick configuration's fields replace the defaults,
  except those given explicitly on the command line (``args.explicit`` from
  :func:`parse_args`), even when given with their default value.
  """
  values = {field: getattr(args, dest) for field, dest in CONFIG_FLAGS.items()}
  if not args.quick:
    return configs.TrainConfig(**values)
  quick = configs.quick_config()
  explicit: frozenset[str] = getattr(args, "explicit", frozenset())
  fields = {k: (v if CONFIG_FLAGS[k] in explicit else getattr(quick, k)) for k, v in values.items()}
  return configs.TrainConfig(**fields)


def seeds_from_args(args: argparse.Namespace) -> list[int]:
  """The seeds of the study: ``--seeds`` of them from ``--seed0``; 1 with ``--quick`` unless ``--seeds`` is given."""
  quick_default = args.quick and "seeds" not in getattr(args, "explicit", frozenset())
  return list(range(args.seed0, args.seed0 + (1 if quick_default else args.seeds)))


def check_devices(parser: argparse.ArgumentParser, config: configs.TrainConfig) -> None:
  """Exits with a usage error (status 2) for a ``--devices`` this machine or batch cannot take.

  The checks are :func:`experiments.trainer.check_devices`'; its error names
  the config field, turned here into the flag that sets it.
  """
  try:
    trainer.check_devices(config.devices, config.batch_size)
  except trainer.DeviceCountError as err:
    parser.error(f"argument --{err.field.replace('_', '-')}: {err.detail}")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study described by the command line; returns the exit status."""
  parser = build_parser()
  args = parse_args(argv, parser)
  base = config_from_args(args)
  check_devices(parser, base)
  names = [args.method] if args.method else [m.strip() for m in args.methods.split(",") if m.strip()]
  seeds = seeds_from_args(args)
  workdir = args.workdir or ("runs/quick" if args.quick else "runs/train")
  output_dir = args.output_dir or ("runs/quick" if args.quick else "results/train")
  if base.devices > 1:
    print(f"data parallel over {base.devices} of {len(jax.devices())} {jax.default_backend()} devices")
  start = time.perf_counter()
  result = study_lib.run_study(
    base,
    names,
    seeds,
    workdir=None if args.no_checkpoints else workdir,
    resume=not args.fresh,
    progress=not args.no_progress,
    download=args.download,
  )
  result["wall_time_s"] = time.perf_counter() - start
  command = ["python", "-m", "experiments.train", *(sys.argv[1:] if argv is None else argv)]
  out = report.write_report(result, output_dir, command=command)
  print()
  print(out["table"])
  if out["paired_differences"]:
    print(out["paired_differences"])
  if out["alpha_summary"]:
    print(out["alpha_summary"])
  status = "" if result["completed"] else " (stopped early; run again to resume)"
  print(f"\nwall time {result['wall_time_s']:.1f} s{status}; wrote {out['json']} and {len(out['pngs'])} PNG(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
