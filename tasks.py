#!/usr/bin/env python3
"""The project's Quickstart commands, needing nothing but python3.

    python3 tasks.py run   [args...]   # the main job: python -m experiments.train
    python3 tasks.py test  [args...]   # lint, format check, type check, then python -m pytest [args...]:
                                       # every test, the `slow` studies included (what CI runs), on
                                       # min(CPUs, 4) pytest-xdist workers, one test file each at a time
                                       # (pass -n 0 for one process)
    python3 tasks.py test --fast [args...]   # the local loop: the same without the `slow` tests (-m "not slow")
    python3 tasks.py lint              # only the checks: ruff check, ruff format --check, mypy
    python3 tasks.py docs  [args...]   # the HTML docs: sphinx-build -W -b html docs docs/_build/html

Each first makes ``.venv`` (if missing or stale) and installs the package with
its ``experiments``, ``dev`` and ``docs`` extras into it. ``test`` and ``lint``
run their steps in order and stop at the first that fails, with its exit code.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".xsam_jax_installed"

CHECKS = [
  ["-m", "ruff", "check", "."],
  ["-m", "ruff", "format", "--check", "."],
  ["-m", "mypy"],  # what it checks, and how strictly: [tool.mypy] in pyproject.toml
]

COMMANDS = {  # name -> steps; the command line's extra arguments go to the last step
  "run": [["-m", "experiments.train"]],
  "test": [*CHECKS, ["-m", "pytest"]],
  "lint": CHECKS,
  "docs": [["-m", "sphinx", "-W", "-b", "html", "docs", "docs/_build/html"]],  # = sphinx-build
}
PASS_THROUGH = {"run", "test", "docs"}
MAX_TEST_WORKERS = 4
"""Most pytest-xdist workers ``test`` starts: each is a JAX process of 1-3 GB, and tests compile more than they run."""


def test_workers(args: list[str]) -> list[str]:
  """pytest-xdist arguments for ``test``: ``-n min(CPUs, 4) --dist loadfile`` unless ``args`` choose ``-n`` themselves.

  ``loadfile`` keeps each test file in one worker, so module-scoped fixtures (the docs build, the
  notebooks' kernel) are made once.
  """
  if any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args):
    return []
  return ["-n", str(max(1, min(os.cpu_count() or 1, MAX_TEST_WORKERS))), "--dist", "loadfile"]


def _fingerprint() -> str:
  return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_venv() -> None:
  """Creates .venv and installs ``.[experiments,dev,docs]`` unless already current."""
  if STAMP.exists() and STAMP.read_text() == _fingerprint() and PY.exists():
    return
  if not PY.exists():
    print(f"[tasks] creating {VENV}", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  print("[tasks] installing xsam_jax with extras [experiments,dev,docs] ...", flush=True)
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[experiments,dev,docs]"])
  STAMP.write_text(_fingerprint())


FAST = ["-m", "not slow"]
"""What ``test --fast`` passes to pytest: every test but the ``slow`` studies."""


def fast_args(command: str, args: list[str]) -> list[str]:
  """``args`` with ``--fast`` (``test`` only) replaced by :data:`FAST`."""
  if command != "test" or "--fast" not in args:
    return args
  return [*FAST, *(a for a in args if a != "--fast")]


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in COMMANDS or (argv[1:] and argv[0] not in PASS_THROUGH):
    print(__doc__)
    return 2
  argv = [argv[0], *fast_args(argv[0], argv[1:])]
  ensure_venv()
  steps = COMMANDS[argv[0]]
  for i, step in enumerate(steps):
    last = i == len(steps) - 1
    cmd = [str(PY), *step, *(test_workers(argv[1:]) if last and argv[0] == "test" else []), *(argv[1:] if last else [])]
    print("[tasks] " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    if code != 0:
      print(f"[tasks] failed (exit code {code}): " + " ".join(cmd), flush=True)
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
