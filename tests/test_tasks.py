"""tasks.py, the Quickstart's commands: the test command runs every test (CI), --fast is the local loop."""

from pathlib import Path

import tomllib

import tasks

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_with_nothing_deselected():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert ci[-1] == "python3 tasks.py test"
  addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
  assert "-m" not in addopts.split()  # no marker is deselected by default: `slow` runs in CI
  assert "python3 tasks.py test" in (ROOT / "README.md").read_text()


def test_fast_deselects_only_the_slow_tests():
  assert tasks.fast_args("test", ["--fast", "-x"]) == ["-m", "not slow", "-x"]
  assert tasks.fast_args("test", ["-x"]) == ["-x"]
  assert tasks.fast_args("run", ["--fast"]) == ["--fast"]  # only `test` knows it


def test_workers_default_and_override():
  assert tasks.test_workers(["-n", "0"]) == []
  workers = tasks.test_workers([])
  assert workers[0] == "-n"
  assert 1 <= int(workers[1]) <= tasks.MAX_TEST_WORKERS
  assert workers[2:] == ["--dist", "loadfile"]
