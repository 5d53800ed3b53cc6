"""A transformer on a 2-D (data x fsdp) mesh of 8 CPU devices, in the global ``jax.jit`` mode.

The checks run in subprocesses (tests/mesh_checks.py), with 8 devices or one, since the device count is
fixed when jax starts. (1) The transformer example (examples/transformer_mesh.py), as written: AdamW,
bfloat16 compute, a ``(loss, aux)`` loss, ``probe_loss_fn`` in float32, params sharded over ``fsdp``: it
trains, and alpha moves only on probe steps. (2) FSDP-sharded params give the one-device result.
"""

import json
import subprocess
import sys

import numpy as np

from tests.test_multidevice import ROOT, _env
from tests.tolerances import assert_argmax_lead, f32_bound

SCRIPT = "tests/mesh_checks.py"

# Rounding steps (tests/tolerances.py) of the recipe model's loss: reductions over the width (<= 32), the
# MLP (<= 128), the attention (15), the vocabulary's softmax (64) and the mean over 16 x 15 tokens (240),
# and a dozen exp/log/rsqrt/gelu (4 each): under 600. A norm or dot product over the N parameters: N
# steps. One XSAM step: 2 gradients and a probe loss, and 5 norms or dot products.
LOSS_OPS = 600


def _step_ops(num_params):
  return 3 * LOSS_OPS + 5 * num_params


def _run(check, devices):
  proc = subprocess.run(
    [sys.executable, SCRIPT, check],
    check=False,
    cwd=ROOT,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
  assert lines, proc.stdout[-8000:]
  return json.loads(lines[-1][len("REPORT ") :])


def test_transformer_example_on_a_2d_mesh():
  report = _run("recipe", 8)
  assert report["devices"] == 8
  assert report["mesh"] == {"data": 4, "fsdp": 2}
  assert "P('fsdp',)" in report["sharded"]  # the matrices really are sharded
  losses, alphas = zip(*report["history"], strict=True)
  assert losses[-1] < losses[0]
  for i in range(1, len(alphas)):
    if i % report["probe_period"] != 0:  # count i: no probe round, alpha carried
      assert alphas[i] == alphas[i - 1], (i, alphas)


def test_fsdp_sharded_params_equal_one_device():
  eight, one = _run("fsdp", 8), _run("fsdp", 1)
  assert "P('fsdp',)" in eight["sharded"]
  step_ops = _step_ops(one["num_params"])
  for losses in one["probe_losses"]:
    assert_argmax_lead(losses, f32_bound(losses, n_ops=step_ops))
  assert eight["alpha"] == one["alpha"]
  # 3 steps of SGD (lr 0.5, no momentum): each update within step_ops of its size, moved by 0.5: under
  # 1.5 step_ops of the params' largest entry, plus a rounding per step.
  for name, value in one["params"].items():
    p1, p8 = np.asarray(value), np.asarray(eight["params"][name])
    np.testing.assert_allclose(p8, p1, rtol=0, atol=f32_bound(p1, n_ops=1.5 * step_ops + 3))
