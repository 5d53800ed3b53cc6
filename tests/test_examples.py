"""Every script of examples/ runs as written (the docs show them with ``literalinclude``).

Each runs in this process on its default device count (one CPU device here): the transformer on a
2-D mesh of 8 devices is tests/test_mesh.py, the Linen ``pmap`` script on 8 devices is
tests/test_flax_scripts.py, and the accumulation script's step against the full batch is
tests/test_accumulation.py.
"""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_the_examples_are_there():
  assert set(SCRIPTS) >= {
    "nnx_batchnorm_dropout.py",
    "linen_pmap.py",
    "transformer_mesh.py",
    "controls.py",
    "accumulation.py",
  }


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name, capsys):
  scope = runpy.run_path(str(EXAMPLES / name), run_name="__main__")
  out = capsys.readouterr().out
  assert "loss" in out, out
  assert "nan" not in out.lower(), out
  assert scope["__doc__"], f"examples/{name} has no docstring saying what it shows"
