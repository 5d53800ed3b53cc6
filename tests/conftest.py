"""Test configuration: make silent broadcasting fail, keep runs deterministic."""

import os

# Tests run on CPU; multi-device tests start their own subprocess with
# XLA_FLAGS=--xla_force_host_platform_device_count=8.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["nojit", "jit"])
def maybe_jit(request):
  """Runs a test body both eagerly and under ``jax.jit``."""
  return (lambda f: f) if request.param == "nojit" else jax.jit
