"""experiments.core.config: the studies' one configuration system.

Flags are generated from the dataclass fields (help from their metadata;
tuples, bools, optional fields and extra words handled), ``--quick`` makes the
quick config's values the defaults, flags given explicitly win over it, and
every field is range-checked however the config is made, with an error naming
the field and its range. No study is run here.
"""

import argparse
import dataclasses

import pytest

from experiments import alpha_refine, bench, lm, sharpness_study, toy2d, train
from experiments.bench import controls as bench_controls
from experiments.bench import probe_memory as bench_probe_memory
from experiments.bench import wide as bench_wide
from experiments.core import command as command_lib
from experiments.core import config
from experiments.core.config import ConfigError, setting
from experiments.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Demo(config.StudyConfig):
  """One field of each kind the helper handles."""

  count: int = setting(3, "how many", low=1)
  share: float = setting(0.5, "a fraction", low=0, high=1, high_open=True)
  sizes: tuple[int, ...] = setting((8, 16), "layer sizes", low=1)
  box: tuple[float, float] = setting((-1.0, 1.0), "a 2-number range")
  limit: int | None = setting(None, "an optional cap", low=1)
  batch: int | str | None = setting("auto", "a size, none or auto", low=1, words={"auto": "auto"})
  name: str = setting("a", "a choice", choices=("a", "b"))
  fast: bool = setting(False, "a switch")
  learning_rate: float = setting(0.1, "renamed flag", flag="lr", low=0, low_open=True)
  label: str = setting("full", "set by the study, no flag", flag=None)

  @classmethod
  def quick(cls):
    """The small one."""
    return cls(count=1, sizes=(2,), fast=True, label="quick")


def _parser(quick=False):
  return command_lib.study_parser(Demo, quick, prog="demo", description="A demo.", quick_help="small")


def _parse(argv):
  _, args = command_lib.parse_args(_parser, argv)
  return command_lib.from_args(Demo, args)


def test_flags_are_generated_from_the_fields():
  assert config.flags(Demo) == {
    "count": "--count",
    "share": "--share",
    "sizes": "--sizes",
    "box": "--box",
    "limit": "--limit",
    "batch": "--batch",
    "name": "--name",
    "fast": "--fast",
    "learning_rate": "--lr",
  }
  text = _parser().format_help()
  for words in ("how many; an integer >= 1", "a fraction; a finite number in [0, 1)", "--no-fast", "renamed flag"):
    assert words in " ".join(text.split()), words
  assert "--label" not in text
  assert _parse([]) == Demo.default()
  parsed = _parse(["--count", "7", "--sizes", "4,5,6", "--box", "0,2.5", "--limit", "9", "--batch", "none"])
  assert parsed == Demo(count=7, sizes=(4, 5, 6), box=(0.0, 2.5), limit=9, batch=None)
  parsed = _parse(["--limit", "none", "--batch", "AUTO", "--name", "B", "--fast", "--lr", "0.5"])
  assert parsed == Demo(limit=None, batch="auto", name="b", fast=True, learning_rate=0.5)


def test_quick_sets_the_defaults_and_explicit_flags_win():
  assert _parse(["--quick"]) == Demo.quick()
  assert _parse(["--quick", "--count", "3", "--no-fast"]) == Demo.quick().replace(count=3, fast=False)
  # given explicitly, it wins even at the full study's value (3) and before --quick
  assert _parse(["--count", "3", "--quick"]) == Demo.quick().replace(count=3)
  assert _parse(["--count", "4"]) == Demo(count=4)


@pytest.mark.parametrize(
  ("argv", "says"),
  [
    (["--count", "0"], "argument --count: must be an integer >= 1, got 0"),
    (["--count", "x"], "argument --count: must be an integer >= 1, got 'x'"),
    (["--share", "1"], "argument --share: must be a finite number in [0, 1), got '1'"),
    (["--share", "nan"], "argument --share: must be a finite number in [0, 1), got 'nan'"),
    (["--sizes", "4,0"], "argument --sizes: must be comma-separated integers >= 1, got '4,0'"),
    (["--box", "1,2,3"], "argument --box: must be 2 comma-separated finite numbers, got '1,2,3'"),
    (["--limit", "0"], "argument --limit: must be an integer >= 1 or none, got 0"),
    (["--batch", "-1"], "argument --batch: must be an integer >= 1, none or auto, got -1"),
    (["--name", "c"], "argument --name: must be one of a, b, got 'c'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
  ],
)
def test_bad_flags_are_usage_errors_naming_the_flag_and_range(argv, says, capsys):
  with pytest.raises(SystemExit) as info:
    _parse(argv)
  assert info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == f"demo: error: {says}"


@pytest.mark.parametrize(
  ("changes", "says"),
  [
    (dict(count=0), "count must be an integer >= 1, got 0"),
    (dict(count=True), "count must be an integer >= 1, got True"),
    (dict(share=1.0), "share must be a finite number in [0, 1), got 1.0"),
    (dict(sizes=()), "sizes must be a tuple of integers >= 1, got ()"),
    (dict(sizes=[8]), "sizes must be a tuple of integers >= 1, got [8]"),
    (dict(box=(0.0, float("inf"))), "box must be a tuple of 2 finite numbers, got (0.0, inf)"),
    (dict(batch="big"), "batch must be an integer >= 1, None or 'auto', got 'big'"),
    (dict(name=None), "name must be one of a, b, got None"),
    (dict(fast=1), "fast must be a boolean, got 1"),
    (dict(label=3), "label must be a string, got 3"),
  ],
)
def test_configs_made_in_code_are_range_checked(changes, says):
  with pytest.raises(ConfigError) as info:
    Demo(**changes)
  assert str(info.value) == says
  assert info.value.field == next(iter(changes))
  assert isinstance(info.value, ValueError)
  with pytest.raises(ConfigError):
    Demo.default().replace(**changes)


STUDIES = [
  (TrainConfig, train.build_parser),
  (toy2d.Toy2dConfig, toy2d.COMMAND.build_parser),
  (sharpness_study.SharpnessConfig, sharpness_study.COMMAND.build_parser),
  (alpha_refine.AlphaRefineConfig, alpha_refine.COMMAND.build_parser),
  (bench.BenchConfig, bench.COMMAND.build_parser),
  (bench_wide.WideConfig, bench_wide.COMMAND.build_parser),
  (bench_controls.ControlsConfig, bench_controls.COMMAND.build_parser),
  (bench_probe_memory.ProbeMemoryConfig, bench_probe_memory.COMMAND.build_parser),
  (lm.LMConfig, lm.COMMAND.build_parser),
]


@pytest.mark.parametrize(("cls", "build_parser"), STUDIES, ids=[cls.__name__ for cls, _ in STUDIES])
def test_every_study_reads_its_configs_from_the_command_line(cls, build_parser):
  """No flag: default(); --quick: quick(); every flag's own default, given as text, parses back to itself."""
  for argv, expected in (([], cls.default()), (["--quick"], cls.quick())):
    _, args = command_lib.parse_args(build_parser, argv)
    assert command_lib.from_args(cls, args) == expected
    assert dataclasses.is_dataclass(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
      expected.__setattr__("mode", "x")
    parser = build_parser("--quick" in argv)
    for field, flag in config.flags(cls).items():
      value = getattr(expected, field)
      if isinstance(value, bool) or value is None:
        continue
      text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
      assert getattr(parser.parse_args([*argv, f"{flag}={text}"]), field) == value, flag  # "=": text may start "-"


def test_command_parses_config_output_folder_and_extra_flags():
  command = command_lib.Command(
    Demo,
    prog="python -m demo",
    description="A demo.",
    quick_help="small",
    out=("results/demo", "runs/demo_quick"),
    out_flag="--output-dir",
    extra={"--verbose": {"action": "store_true", "help": "say more"}},
  )
  study, args, text = command.parse(["--quick", "--count", "2", "--verbose"])
  assert study == Demo.quick().replace(count=2)
  assert (args.output_dir, args.verbose) == ("runs/demo_quick", True)
  assert text == "python -m demo --quick --count 2 --verbose"
  study, args, text = command.parse([])
  assert (study, args.output_dir, args.verbose, text) == (Demo.default(), "results/demo", False, "python -m demo")


def test_main_job_flags_and_quick():
  """The main job: every TrainConfig field but the per-run method and seed has a flag; --quick's extras."""
  assert set(config.flags(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "seed"}
  assert config.flags(TrainConfig)["learning_rate"] == "--lr"
  quick = train.parse_args(["--quick"])
  assert (quick.seeds, quick.workdir, quick.output_dir) == (1, "runs/quick", "runs/quick")
  full = train.parse_args([])
  assert (full.seeds, full.workdir, full.output_dir) == (3, "runs/train", "runs/train")  # never the committed results/
  assert isinstance(train.build_parser(), argparse.ArgumentParser)
