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
command resumes interrupted runs (and reuses finished ones). A run's id
holds only the hyperparameters its method reads (a new ``--rho`` reuses
SGD's runs). ``--fresh`` retrains every run; a damaged checkpoint folder
stops the job with an error naming it (delete it, or use ``--fresh``).

Everything is checked before any data is loaded, as a usage error (exit
status 2) naming the flag and its range: each flag's value, every method's
hyperparameters (its transformation is built up front: the library
validates them), the data set's name, writable output and checkpoint
folders. Diverged runs (non-finite losses) are reported as "diverged".

``--devices N`` trains data parallel over the first N of ``jax.devices()``
(the batch sharded, parameters and optimizer state replicated, one jitted
global step: the single-device result up to float reduction order). On a
CPU, make N devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before starting.
Flags given on the command line always win over ``--quick``'s settings.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import jax

from experiments import checkpoint as ckpt_lib
from experiments import configs, models, report, trainer
from experiments import data as data_lib
from experiments import study as study_lib

DEFAULT_METHODS = "sgd,sam,xsam"


MAX_SEED = 2**32 - 1
"""Seeds above it would repeat others' initialisations (JAX keys take 32 bits)."""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  """``in [low, high)``, ``> low``, ... as the ranges of the usage errors read."""
  text = lambda v: str(v) if isinstance(v, int) else f"{v:g}"
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {text(low)}"
  if high is not None:
    return f"{'<' if high_open else '<='} {text(high)}"
  return ""


def int_in(low: int, high: int | None = None, *, allow_none: bool = False) -> Callable[[str], int | None]:
  """An argparse type: an integer in ``[low, high]`` (``high`` None: no upper bound).

  With ``allow_none`` the word ``none`` gives None. Anything else is a usage
  error naming the flag and the range (argparse prefixes ``argument --flag:``).
  """
  want = f"an integer {_interval(low, high, False, False)}" + (" or none" if allow_none else "")

  def parse(text: str) -> int | None:
    if allow_none and text.strip().lower() == "none":
      return None
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
    if value < low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
    return value

  parse.__name__ = want  # argparse's fallback message names the type by this
  return parse


def float_in(
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
) -> Callable[[str], float | None]:
  """An argparse type: a finite float in the interval from ``low`` to ``high``.

  ``low_open`` / ``high_open`` exclude the bound itself (e.g. ``float_in(0,
  1, high_open=True)`` is ``[0, 1)``); a None bound is no bound. NaN and
  infinities are always rejected; with ``allow_none`` the word ``none``
  gives None.
  """
  want = f"a finite number {_interval(low, high, low_open, high_open)}".rstrip() + (" or none" if allow_none else "")

  def parse(text: str) -> float | None:
    if allow_none and text.strip().lower() == "none":
      return None
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
    ok = math.isfinite(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
    return value

  parse.__name__ = want
  return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)
_optional_positive_int = int_in(1, allow_none=True)


def _probe_batch_size(text: str) -> int | str | None:
  if text.strip().lower() == "auto":
    return "auto"
  try:
    return _optional_positive_int(text)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, none or auto, got {text!r}") from None


def _alphas(text: str) -> tuple | None:
  if text.strip().lower() in ("none", "default", ""):
    return None
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    values = ()
  if not values or not all(math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(
      f"must be comma-separated finite numbers (or none: the default grid), got {text!r}"
    )
  return values


def _refinement(text: str) -> str | None:
  return None if text.lower() == "none" else text


def _model(text: str) -> str | None:
  name = text.strip().lower()
  if name in ("auto", "none"):
    return None
  if name not in models.MODELS:
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(models.MODELS)} or auto (by data set), got {text!r}")
  return name


def _folder(text: str) -> str:
  if not text.strip():
    raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
  return text


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
  g.add_argument("--seeds", type=positive_int, default=3, help="number of seeds per method (>= 1)")
  g.add_argument("--seed0", type=int_in(0, MAX_SEED), default=0, help=f"first seed (0 to {MAX_SEED})")
  g.add_argument(
    "--quick", action="store_true", help="tiny subset, 1 epoch, 1 seed (smoke test); flags given explicitly override it"
  )
  g.add_argument(
    "--workdir", type=_folder, default=None, help="checkpoint folder [runs/train, or runs/quick with --quick]"
  )
  g.add_argument(
    "--output-dir", type=_folder, default=None, help="results folder [results/train, or runs/quick with --quick]"
  )
  g.add_argument(
    "--fresh",
    action="store_true",
    help="delete the runs' checkpoints in --workdir and train every run from the start "
    "(also the way past an unreadable checkpoint folder)",
  )
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
  g.add_argument("--model", type=_model, default=d.model, help="mlp, cnn1d, cnn2d, resnet18 or auto [by data set]")
  g.add_argument("--width", type=positive_int, default=d.width, help="base width of the small models (>= 1)")
  g.add_argument("--batch-norm", action="store_true", help="BatchNorm in the MLP / 1-D CNN")
  g.add_argument(
    "--train-subset",
    type=_optional_positive_int,
    default=d.train_subset,
    help="use the first N >= 1 training examples (none: all)",
  )
  g.add_argument(
    "--test-subset",
    type=_optional_positive_int,
    default=d.test_subset,
    help="use the first N >= 1 test examples (none: all)",
  )
  g.add_argument(
    "--augment",
    action=argparse.BooleanOptionalAction,
    default=d.augment,
    help="random crop + flip [on for tensorflow-datasets images]",
  )

  g = p.add_argument_group("optimization")
  g.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs, >= 1")
  g.add_argument(
    "--batch-size",
    type=positive_int,
    default=d.batch_size,
    help="training batch size, >= 1 and at most the training examples",
  )
  g.add_argument(
    "--lr", type=float_in(0, low_open=True), default=d.learning_rate, help="peak learning rate (cosine schedule), > 0"
  )
  g.add_argument("--momentum", type=float_in(0, 1, high_open=True), default=d.momentum, help="SGD momentum in [0, 1)")
  g.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay, help="decoupled weight decay, >= 0")
  g.add_argument("--rho", type=float_in(0, low_open=True), default=d.rho, help="ascent radius, > 0")
  g.add_argument(
    "--rho-max",
    type=float_in(0, low_open=True, allow_none=True),
    default=d.rho_max,
    help="XSAM probe radius, > 0 [none: 2 * rho]",
  )
  g.add_argument("--num-steps", type=positive_int, default=d.num_steps, help="ascent steps K >= 1")
  g.add_argument(
    "--alpha-update-period",
    type=_optional_positive_int,
    default=d.alpha_update_period,
    help="XSAM probe period in steps, >= 1 [none: one epoch]",
  )
  g.add_argument(
    "--probe-batch-size",
    type=_probe_batch_size,
    default=d.probe_batch_size,
    help="XSAM probes at a time: an int >= 1, none (one vmap) or auto",
  )
  g.add_argument(
    "--alphas",
    type=_alphas,
    default=d.alphas,
    help="XSAM's alpha grid, comma-separated finite numbers [none: 0.0, 0.1, ..., 2.0]",
  )
  g.add_argument(
    "--alpha-refinement",
    type=_refinement,
    default=d.alpha_refinement,
    choices=[None, "parabola"],
    help="XSAM's sub-grid alpha refinement: none or parabola",
  )
  g.add_argument(
    "--checkpoint-every",
    type=nonnegative_int,
    default=d.checkpoint_every,
    help="epochs between checkpoints (0: only after the last epoch)",
  )
  g.add_argument(
    "--stop-after-epochs",
    type=_optional_positive_int,
    default=None,
    help="stop after this many epochs, >= 1 (simulated preemption; re-run to resume)",
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


def _flag(field: str, args: argparse.Namespace) -> str:
  """The flag that sets the config ``field`` (``method``: --method or --methods, whichever is used)."""
  if field == "method":
    return "--method" if getattr(args, "method", None) is not None else "--methods"
  return "--" + CONFIG_FLAGS.get(field, field).replace("_", "-")


def _config_error(parser: argparse.ArgumentParser, args: argparse.Namespace, err: trainer.ConfigError) -> NoReturn:
  parser.error(f"argument {_flag(err.field, args)}: {err.detail}")


def check_devices(parser: argparse.ArgumentParser, config: configs.TrainConfig) -> None:
  """Exits with a usage error (status 2) for a ``--devices`` this machine or batch cannot take.

  The checks are :func:`experiments.trainer.check_devices`'; its error names
  the config field, turned here into the flag that sets it.
  """
  try:
    trainer.check_devices(config.devices, config.batch_size)
  except trainer.DeviceCountError as err:
    parser.error(f"argument --{err.field.replace('_', '-')}: {err.detail}")


def method_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
  """The methods to train: ``--method``, else the names in ``--methods`` (a usage error if none)."""
  if args.method is not None:
    if not args.method.strip():
      parser.error("argument --method: expected a method name (sgd, sam, xsam, ...), got ''")
    return [args.method.strip()]
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not names:
    parser.error(
      f"argument --methods: expected comma-separated method names (e.g. {DEFAULT_METHODS}), got {args.methods!r}"
    )
  return names


def check_study(
  parser: argparse.ArgumentParser, args: argparse.Namespace, config: configs.TrainConfig, names: Sequence[str]
) -> None:
  """Exits with a usage error (status 2) for anything the study cannot run with, before loading data.

  :func:`experiments.trainer.check_study` (devices, data set name, model,
  batch size where the data size is known, every method's transformation
  built by the library, which validates its hyperparameters); its
  :class:`~experiments.trainer.ConfigError` names the config field, turned
  here into the flag that sets it.
  """
  check_devices(parser, config)
  try:
    trainer.check_study(config, names)
  except trainer.ConfigError as err:
    _config_error(parser, args, err)


def check_folder(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
  """Exits with a usage error unless ``path`` is (or can be made) a folder this process can write into.

  Creates the folder and writes and deletes a scratch file in it: the only
  check that root, read-only mounts and ACLs cannot fool.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    parser.error(f"argument {flag}: {path!r} is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    parser.error(f"argument {flag}: cannot write into the folder {path!r} ({e.strerror or e})")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study described by the command line; returns the exit status.

  Everything is checked before any data is loaded (usage errors, exit
  status 2, naming the flag): each flag's range, every method's
  hyperparameters (by building its transformation), the data set's name,
  and that the output, checkpoint and (for a first MNIST-1D run) data
  folders are writable. An unreadable checkpoint folder stops the study with
  exit status 1 and a message naming the folder.
  """
  parser = build_parser()
  args = parse_args(argv, parser)
  base = config_from_args(args)
  names = method_names(parser, args)
  seeds = seeds_from_args(args)
  if seeds[-1] > MAX_SEED:
    parser.error(f"argument --seeds: --seed0 {args.seed0} with {len(seeds)} seeds passes the largest seed {MAX_SEED}")
  check_study(parser, args, base, names)
  workdir = args.workdir or ("runs/quick" if args.quick else "runs/train")
  output_dir = args.output_dir or ("runs/quick" if args.quick else "results/train")
  check_folder(parser, "--output-dir", output_dir)
  if not args.no_checkpoints:
    check_folder(parser, "--workdir", workdir)
  if base.dataset == "mnist1d":
    data_dir = base.data_dir or "./data_cache"
    if not os.path.exists(os.path.join(data_dir, data_lib.MNIST1D_FILE)):
      check_folder(parser, "--data-dir", data_dir)
  if base.devices > 1:
    print(f"data parallel over {base.devices} of {len(jax.devices())} {jax.default_backend()} devices")
  start = time.perf_counter()
  try:
    result = study_lib.run_study(
      base,
      names,
      seeds,
      workdir=None if args.no_checkpoints else workdir,
      resume=not args.fresh,
      progress=not args.no_progress,
      download=args.download,
    )
  except data_lib.DatasetError as err:  # raised while loading, before any training
    parser.error(f"argument --dataset: {err}")
  except trainer.ConfigError as err:  # checks that need the data (batch size, model), before any training
    _config_error(parser, args, err)
  except ckpt_lib.CheckpointError as err:
    parser.exit(1, f"{parser.prog}: error: {err}\n")
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
