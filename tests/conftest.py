"""Test configuration: make silent broadcasting fail, keep runs deterministic."""

import os

# Tests run on CPU; multi-device tests start their own subprocess with
# XLA_FLAGS=--xla_force_host_platform_device_count=8.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The compile-time flags the suite runs with: the root conftest.py.

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["nojit", "jit"])
def maybe_jit(request):
  """Runs a test body both eagerly and under ``jax.jit``."""
  return (lambda f: f) if request.param == "nojit" else jax.jit


# Per-file test time: with XSAM_JAX_DURATIONS=PATH, the run writes what each test file took (the sum of its
# tests' setup, call and teardown, as pytest-xdist's controller receives them) to PATH, stamped with the
# machine and date: tests/durations.py formats it. results/tests/durations.md is one such run.
_DURATIONS: dict[str, float] = {}


def pytest_runtest_logreport(report):
  if os.environ.get("XSAM_JAX_DURATIONS"):
    name = report.nodeid.split("::")[0]
    _DURATIONS[name] = _DURATIONS.get(name, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
  path = os.environ.get("XSAM_JAX_DURATIONS")
  if path and _DURATIONS and not hasattr(session.config, "workerinput"):  # the controller (or a lone process)
    from tests import durations

    durations.write(path, _DURATIONS, exitstatus=int(exitstatus))
