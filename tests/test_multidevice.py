"""Data parallelism: the three modes of docs/scaling-out.md.

The 8-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax starts, so they run in a subprocess (``tests/multidevice/run.py``);
this process stays on one device; a second test joins two such processes
(4 devices each) into one cluster with ``jax.distributed.initialize``. The
one-device tests of m-sharpness (under ``jax.vmap(axis_name=...)``) are in
tests/test_m_sharpness.py.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "multidevice" / "run.py"
SNIPPET_FILES = (ROOT / "tests" / "multidevice" / "snippets.py", CHECKS)
SNIPPET = re.compile(r"# \[snippet: ([\w-]+)\]\n(.*?)# \[end snippet\]\n", re.S)


def _env(devices):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def test_eight_device_checks():
  proc = subprocess.run(
    [sys.executable, str(CHECKS)], cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900, check=False
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-20000:]
  assert "ALL CHECKS PASSED" in proc.stdout, out[-20000:]


def test_two_process_cluster():
  """Multi-host on one machine: 2 processes x 4 CPU devices joined with
  jax.distributed.initialize (gloo collectives) agree with one device."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = [
    subprocess.Popen(
      [sys.executable, str(CHECKS), "--process-id", str(i), "--num-processes", "2", "--port", str(port)],
      cwd=ROOT,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, out in zip(procs, outs, strict=True):
    assert proc.returncode == 0, out[-20000:]
    assert "ALL CHECKS PASSED" in out, out[-20000:]


def test_scaling_out_page_shows_the_checked_snippets():
  """docs/scaling-out.md shows every snippet of tests/multidevice/ by ``literalinclude`` (so the
  page's code is the tested code), and the markers it includes by are where the snippets are."""
  page = (ROOT / "docs" / "scaling-out.md").read_text()
  found = 0
  for path in SNIPPET_FILES:
    for name, _ in SNIPPET.findall(path.read_text()):
      found += 1
      where = f"../{path.relative_to(ROOT)}"
      include = f'{{literalinclude}} {where}\n:language: python\n:start-after: "# [snippet: {name}]"'
      assert include in page, f"docs/scaling-out.md does not include snippet {name!r} of {where}"
  assert found >= 6
