"""Root pytest configuration: the doctests of ``xsam_jax`` run like the tests.

``python -m pytest`` collects ``tests/`` and, with ``--doctest-modules``
(pyproject.toml), every docstring example under ``xsam_jax/``. This file sets
the same jax configuration as ``tests/conftest.py`` (CPU, rank promotion is
an error) before anything imports jax, and runs each doctest in float32 (jax's
default), whatever an earlier test did. It lives outside the package, so it is
not shipped in the wheel.
"""

import os
from pathlib import Path

from tests.xla_flags import cheap_compilation_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")  # the plotting examples draw off screen

# Cheaper compilation for the whole suite (tests/xla_flags.py); XSAM_JAX_TEST_FULL_OPT=1 keeps jax's defaults.
if os.environ.get("XSAM_JAX_TEST_FULL_OPT") != "1":
  os.environ["XLA_FLAGS"] = cheap_compilation_flags(os.environ.get("XLA_FLAGS", ""))

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# --doctest-modules imports every module it collects. This one is a script for
# its own 8-device subprocess (it sets XLA_FLAGS when imported) and has no
# doctests; tests/test_multidevice.py runs it.
collect_ignore_glob = ["tests/multidevice/*"]


@pytest.fixture(autouse=True)
def _doctests_in_float32(request):
  """Runs doctests with jax's default dtypes (64-bit off)."""
  if isinstance(request.node, pytest.DoctestItem):
    with jax.enable_x64(False):
      yield
  else:
    yield


def pytest_collection_modifyitems(config, items):
  """Runs the files that took longest in the committed durations table first (tests/durations.py)."""
  from tests import durations

  seconds = durations.read(Path(__file__).parent / "results" / "tests" / "durations.md")
  order = durations.longest_files_first([item.nodeid for item in items], seconds)
  items[:] = [items[i] for i in order]
