"""What every study's report records: the machine and versions, and floats rounded for JSON."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``, else ``lscpu``), else what ``platform`` knows."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return platform.processor() or platform.machine()


def header() -> dict[str, Any]:
  """Date, device, CPU, host and versions: the first keys of every bench JSON."""
  device = jax.devices()[0]
  return {
    "date": time.strftime("%Y-%m-%d"),
    "device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
    "cpu": cpu_name(),
    "host": f"{platform.machine()}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores",
    "jax": jax.__version__,
    "optax": optax.__version__,
  }


def machine() -> dict:
  """Platform, Python, CPU count, JAX backend, devices and version: the ``machine`` of every study's JSON."""
  return {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
  }


def rounded(obj: Any, digits: int = 6) -> Any:
  """Floats rounded to ``digits`` significant digits (keeps the JSON small); NaN and infinities as None (null)."""
  if isinstance(obj, (float, np.floating)):
    return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: rounded(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [rounded(v, digits) for v in obj]
  return obj
