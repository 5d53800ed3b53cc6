"""Data parallelism: the three modes of docs/scaling-out.md.

The 8-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax starts, so they run in a subprocess (``tests/multidevice_checks.py``);
this process stays on one device; a second test joins two such processes
(4 devices each) into one cluster with ``jax.distributed.initialize``. The
one-device tests here cover m-sharpness under ``jax.vmap(axis_name=...)``.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.tolerances import f32_bound, f32_rtol

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "multidevice_checks.py"
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
  """docs/scaling-out.md shows every snippet of multidevice_checks.py by ``literalinclude`` (so the
  page's code is the tested code), and the markers it includes by are where the snippets are."""
  page = (ROOT / "docs" / "scaling-out.md").read_text()
  snippets = SNIPPET.findall(CHECKS.read_text())
  assert len(snippets) >= 6
  for name, _ in snippets:
    where = f"../{CHECKS.relative_to(ROOT)}"
    include = f'{{literalinclude}} {where}\n:language: python\n:start-after: "# [snippet: {name}]"'
    assert include in page, f"docs/scaling-out.md does not include snippet {name!r} of {CHECKS.name}"


def test_m_sharpness_needs_axis_name():
  with pytest.raises(ValueError, match="axis_name"):
    xsam_jax.sam(0.1, m_sharpness=True)
  with pytest.raises(ValueError, match="axis_name"):
    xsam_jax.xsam(0.1, 0.2, m_sharpness=True)


def _data(n_replicas=4, per_replica=4, seed=3):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.normal(size=(3, 6)) * 0.8, jnp.float32),
    "b1": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(6, 2)) * 0.8, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(n_replicas, per_replica, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n_replicas, per_replica, 2)), jnp.float32)
  return params, x, y


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
  return 0.5 * jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, axis=-1))


def test_m_sharpness_sam_step_is_mean_of_per_shard_sam():
  rho = 0.2
  params, x, y = _data()
  tx = xsam_jax.sam(rho, axis_name="r", m_sharpness=True)

  def replica(xb, yb):
    loss_fn = lambda p: _loss(p, xb, yb)
    out, state = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    return out, state.grad_norm

  out, grad_norm = jax.jit(jax.vmap(replica, axis_name="r"))(x, y)

  def own_sam(xb, yb):
    g = jax.grad(_loss)(params, xb, yb)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    g1 = jax.grad(_loss)(jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g), xb, yb)
    return g1, jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g1)))

  per_shard, norms = jax.vmap(own_sam)(x, y)
  # Two programs (the ascent point written another way): per shard g_0, |g_0| over the 36 parameters
  # and g_1 (problems.LOSS_OPS bounds this smaller MLP's chain too), then the mean over 4 shards.
  # Gradient entries share their operands: the bound is on the largest; the norms do not cancel.
  n_ops = 2 * problems.LOSS_OPS + 36 + 4
  tol = f32_bound(*jax.tree.leaves(per_shard), n_ops=n_ops)
  for key in params:
    for i in range(x.shape[0]):
      np.testing.assert_allclose(out[key][i], per_shard[key].mean(0), rtol=0, atol=tol)
  np.testing.assert_allclose(grad_norm, jnp.full_like(grad_norm, norms.mean()), rtol=f32_rtol(n_ops))
  # Not the global SAM gradient: the per-replica ascents differ.
  flat = (x.reshape(-1, 3), y.reshape(-1, 2))
  g_global = jax.grad(_loss)(params, *flat)
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g_global)))
  sam_global = jax.grad(_loss)(jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g_global), *flat)
  assert float(jnp.max(jnp.abs(out["w1"][0] - sam_global["w1"]))) > 1e-4


@pytest.mark.parametrize(("num_steps", "period"), [(1, 2), (3, 1)])
def test_m_sharpness_xsam_replicas_agree_under_vmap(num_steps, period):
  params, x, y = _data()
  n = x.shape[0]
  tx = optax.chain(
    xsam_jax.xsam(0.2, 0.4, num_steps=num_steps, alpha_update_period=period, axis_name="r", m_sharpness=True),
    optax.sgd(0.05, momentum=0.9),
  )
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n), t)
  p, s = stack(params), stack(tx.init(params))

  def replica(p, s, xb, yb):
    loss_fn = lambda q: _loss(q, xb, yb)
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.vmap(replica, axis_name="r"))
  for _ in range(4):
    p, s = step(p, s, x, y)
  # Bitwise: each replica applies one pmean result to the same state, so replicas never drift apart
  # (the contract of data parallelism, not a rounding question).
  for leaf in jax.tree.leaves((p, s)):
    for i in range(1, n):
      np.testing.assert_array_equal(leaf[i], leaf[0])
  assert np.float32(s[0].alpha[0]) in np.float32(xsam_jax.DEFAULT_ALPHAS)
