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
``--output-dir`` (default ``runs/train``, ignored by git: a run never
changes the committed reference results, which are the output of
``--output-dir results/train``). Checkpoints go to ``--workdir``; re-running the same
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
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NoReturn

import jax

from experiments.core import checkpoint as ckpt_lib
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core import data as data_lib
from experiments.train import report
from experiments.train import study as study_lib
from experiments.train.config import MAX_SEED, TrainConfig

MAX_SEEDS = 10_000
"""The most ``--seeds`` a study takes: each is one training run per method (checked before any list is built)."""

DEFAULT_METHODS = "sgd,sam,xsam"


def _folder(text: str) -> str:
  if not text.strip():
    raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
  return text


def build_parser(quick: bool = False) -> argparse.ArgumentParser:
  """The command line: the study's flags and one flag per :class:`TrainConfig` field.

  Args:
    quick: make ``TrainConfig.quick()``'s values (and one seed, and the
      ``runs/quick`` folders) the defaults, as ``--quick`` does.
  """
  p = command_lib.study_parser(
    TrainConfig,
    quick,
    prog="python -m experiments.train",
    description=__doc__.split("\n\n")[0],
    quick_help="tiny subset, 1 epoch, 1 seed (smoke test)",
  )
  g = p.add_argument_group("study")
  g.add_argument("--method", help="train a single method (a name of experiments.core.methods.METHODS)")
  g.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods to compare")
  g.add_argument(
    "--seeds",
    type=config.integer(1, MAX_SEEDS),
    default=1 if quick else 3,
    help=f"number of seeds per method (1 to {MAX_SEEDS}: each is a training run)",
  )
  g.add_argument("--seed0", type=config.integer(0, MAX_SEED), default=0, help=f"first seed (0 to {MAX_SEED})")
  g.add_argument("--workdir", type=_folder, default="runs/quick" if quick else "runs/train", help="checkpoint folder")
  g.add_argument("--output-dir", type=_folder, default="runs/quick" if quick else "runs/train", help="results folder")
  g.add_argument(
    "--fresh",
    action="store_true",
    help="delete the runs' checkpoints in --workdir and train every run from the start "
    "(also the way past an unreadable checkpoint folder)",
  )
  g.add_argument("--no-checkpoints", action="store_true", help="do not write checkpoints")
  g.add_argument("--no-progress", action="store_true", help="hide progress bars")
  g.add_argument(
    "--download",
    action="store_true",
    help="let tensorflow-datasets download and prepare the data set (needs TensorFlow)",
  )
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (None: ``sys.argv[1:]``); with ``--quick``, the quick defaults."""
  return command_lib.parse_args(build_parser, argv)[1]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
  """The base :class:`TrainConfig` of the study described by ``args`` (``method`` and ``seed`` are set per run)."""
  return command_lib.from_args(TrainConfig, args)


def seeds_from_args(args: argparse.Namespace) -> list[int]:
  """The seeds of the study: ``--seeds`` of them from ``--seed0``."""
  return list(range(args.seed0, args.seed0 + args.seeds))


def _flag(field: str, args: argparse.Namespace) -> str:
  """The flag that sets the config ``field`` (``method``: --method or --methods, whichever is used)."""
  if field == "method":
    return "--method" if getattr(args, "method", None) is not None else "--methods"
  return config.flags(TrainConfig).get(field, "--" + field.replace("_", "-"))


def _config_error(parser: argparse.ArgumentParser, args: argparse.Namespace, err: config.ConfigError) -> NoReturn:
  parser.error(f"argument {_flag(err.field, args)}: {err.detail}")


def method_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
  """The methods to train: ``--method``, else the names in ``--methods`` (a usage error if none)."""
  if args.method is not None:
    if not args.method.strip():
      parser.error("argument --method: expected a method name (sgd, sam, xsam, ...), got ''")
    return [args.method.strip()]
  names = [m.strip() for m in args.methods.split(",")]
  if not any(names) or not all(names):
    parser.error(
      f"argument --methods: expected comma-separated method names with none empty (e.g. {DEFAULT_METHODS}), "
      f"got {args.methods!r}"
    )
  return names


def check_study(
  parser: argparse.ArgumentParser,
  args: argparse.Namespace,
  base: TrainConfig,
  names: Sequence[str],
  seeds: Sequence[int] = (),
) -> study_lib.Plan:
  """Exits with a usage error (status 2) for anything the study cannot run with, before loading data.

  :func:`experiments.train.checks.check_study` (devices, data set name, model,
  batch size where the data size is known, every method's transformation
  built by the library, which validates its hyperparameters); its
  :class:`~experiments.core.config.ConfigError` names the config field, turned
  here into the flag that sets it.

  Returns:
    The checked :class:`experiments.train.study.Plan`, which the study runs without checking again.
  """
  try:
    return study_lib.plan(base, names, seeds)
  except config.ConfigError as err:
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
  parser, args = command_lib.parse_args(build_parser, argv)
  try:
    base = config_from_args(args)
  except config.ConfigError as err:  # the flags' types check each field already
    _config_error(parser, args, err)
  names = method_names(parser, args)
  if args.seed0 + args.seeds - 1 > MAX_SEED:  # checked before the list of seeds is built
    parser.error(f"argument --seeds: --seed0 {args.seed0} with {args.seeds} seeds passes the largest seed {MAX_SEED}")
  seeds = seeds_from_args(args)
  checked = check_study(parser, args, base, names, seeds)
  workdir, output_dir = args.workdir, args.output_dir
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
      checked,
      workdir=None if args.no_checkpoints else workdir,
      resume=not args.fresh,
      progress=not args.no_progress,
      download=args.download,
    )
  except data_lib.DatasetError as err:  # raised while loading, before any training
    parser.error(f"argument --dataset: {err}")
  except config.ConfigError as err:  # checks that need the data (batch size, model), before any training
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
  if out["sharpness_summary"]:
    print(out["sharpness_summary"])
  status = "" if result["completed"] else " (stopped early; run again to resume)"
  print(f"\nwall time {result['wall_time_s']:.1f} s{status}; wrote {out['json']} and {len(out['pngs'])} PNG(s)")
  return 0
