#!/usr/bin/env python3
"""The project's Quickstart commands, needing nothing but python3.

    python3 tasks.py run   [args...]   # the main job: python -m experiments.train
    python3 tasks.py test  [args...]   # the test suite: python -m pytest
    python3 tasks.py docs  [args...]   # the HTML docs: sphinx-build -W -b html docs docs/_build/html

Each first makes ``.venv`` (if missing or stale) and installs the package with
its ``experiments``, ``dev`` and ``docs`` extras into it.
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

COMMANDS = {
    "run": ["-m", "experiments.train"],
    "test": ["-m", "pytest"],
    "docs": ["-m", "sphinx", "-W", "-b", "html", "docs", "docs/_build/html"],  # = sphinx-build
}


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


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in COMMANDS:
    print(__doc__)
    return 2
  ensure_venv()
  cmd = [str(PY), *COMMANDS[argv[0]], *argv[1:]]
  print("[tasks] " + " ".join(cmd), flush=True)
  return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
