"""What every bench report starts with (date, machine, versions) and how it is written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
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


def write(out_dir: str, filename: str, report: dict[str, Any], text: str) -> None:
  """Writes ``report`` as ``out_dir/filename`` (JSON) and prints ``text`` and where it went."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / filename).write_text(json.dumps(report, indent=2))
  print(text)
  print(f"[bench] wrote {out / filename}")
