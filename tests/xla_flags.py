"""XLA flags that make the test suite compile faster, applied by the root ``conftest.py``."""

import os
import subprocess
import sys

# The suite compiles thousands of tiny programs and runs each a few times, so XLA's CPU compiler is
# most of its time. Two flags make compiling cheaper, measured on a 2-core AMD EPYC (2026-12-06,
# python -m pytest, 2 workers): LLVM's optimization level 0 (~15% less compile time) and XLA's
# legacy CPU fusion emitters instead of the MLIR ones (the whole suite 11 min 33 s -> 7 min 27 s).
# Neither changes the operations a program runs, only how XLA wraps them into fusions and the
# machine code it emits, and so how they round: every float comparison has a bound-derived
# tolerance, and bitwise checks compare one program with itself or op-by-op runs. The memory
# figures the tests check (memory_analysis) hold under both settings. XSAM_JAX_TEST_FULL_OPT=1 tests
# jax's defaults. Subprocesses (multi-device checks, notebooks) and pytest-xdist workers inherit the flags.
CHEAP_COMPILATION = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags):
  """Whether this jaxlib starts with ``flags`` (XLA aborts a process on a flag it does not know)."""
  env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  return subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0


def cheap_compilation_flags(xla_flags):
  """``xla_flags`` plus each flag of ``CHEAP_COMPILATION`` it does not set and this jaxlib knows."""
  new = [f for f in CHEAP_COMPILATION if f.split("=")[0] not in xla_flags]
  if new and not _xla_accepts(new):  # a later jaxlib dropped one: keep those it still knows
    new = [f for f in new if _xla_accepts([f])]
  return " ".join([xla_flags, *new]).strip()
