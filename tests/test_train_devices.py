"""``python -m experiments.train --devices N``: the study, data parallel.

The 8-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax starts, so it runs in a subprocess (this process keeps its one
device): the quick study with ``--devices 8`` (interrupted after one epoch and
resumed from its sharded checkpoints) and with ``--devices 1``, in that same
process; the results must agree up to float reduction order.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiments import train
from experiments.train import checks
from tests.test_multidevice import _env as multidevice_env
from tests.tolerances import EPS32, assert_argmax_lead, f32_bound

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = str(ROOT / "data_cache")
METHODS = ("sgd", "sam", "xsam")

# Runs in the 8-device subprocess: argv lists in, exit statuses and compile
# counts out (one JSON line); the study results go to the folders in argv.
DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys
    import jax
    from experiments import train
    from experiments.train import trainer

    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    assert jax.device_count() == 8, jax.devices()
    runs, report = json.loads(sys.argv[1]), {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      try:
        train.main(runs.pop("bad_batch"))
      except SystemExit as e:
        report["bad_batch"] = [e.code, err.getvalue().strip().splitlines()[-1]]
    for name, argv in runs.items():
      report[name] = [train.main(argv), trainer.train_step._cache_size()]
    print("REPORT " + json.dumps(report))
""")


def _argv(devices, out, *extra):
  return [
    "--quick",
    "--devices",
    str(devices),
    "--methods",
    ",".join(METHODS),
    "--epochs",
    "2",
    "--no-progress",
    "--data-dir",
    DATA_DIR,
    "--output-dir",
    str(out),
    # XSAM probes with a clear winner (checked with assert_argmax_lead): at the default rho_max = 2 rho
    # on the 21-point grid the best probes led by less than the runs' rounding.
    "--rho-max",
    "1.0",
    "--alphas",
    "0,0.5,1,1.5,2",
    *extra,
  ]


def _results(folder):
  doc = json.loads((folder / "results.json").read_text())
  assert set(doc["methods"]) == set(METHODS)
  for name in ("accuracy.png", "xsam_alpha_theta.png"):
    assert (folder / name).read_bytes().startswith(b"\x89PNG")
  return doc


def test_eight_devices_match_one_device(tmp_path):
  work = tmp_path / "work8"
  runs = {
    "bad_batch": _argv(8, tmp_path / "bad", "--batch-size", "36", "--no-checkpoints"),
    "one": _argv(1, tmp_path / "one", "--no-checkpoints"),
    "eight_stopped": _argv(8, tmp_path / "eight_stopped", "--workdir", str(work), "--stop-after-epochs", "1"),
    "eight": _argv(8, tmp_path / "eight", "--workdir", str(work)),  # resumes epoch 2
  }
  proc = subprocess.run(
    [sys.executable, "-c", DRIVER, json.dumps(runs)],
    check=False,
    cwd=ROOT,
    env=multidevice_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-20000:]
  assert lines, (proc.stdout + proc.stderr)[-20000:]
  report = json.loads(lines[-1][len("REPORT ") :])

  code, message = report["bad_batch"]
  assert code == 2
  assert "--batch-size" in message
  assert "36" in message
  assert "divisible" in message
  assert report["one"][0] == report["eight_stopped"][0] == report["eight"][0] == 0
  # One compilation per method and device count; the resumed runs, restored
  # onto the replicated sharding, reuse the step compiled before the stop.
  assert report["eight"][1] == report["eight_stopped"][1] == report["one"][1] + len(METHODS)

  one, stopped, eight = (_results(tmp_path / n) for n in ("one", "eight_stopped", "eight"))
  assert one["completed"]
  assert eight["completed"]
  assert not stopped["completed"]
  for name in METHODS:
    a, b = one["methods"][name], eight["methods"][name]
    assert a["config"]["devices"] == 1
    assert b["config"]["devices"] == 8
    ha, hb = a["histories"][0], b["histories"][0]
    assert ha["epoch"] == hb["epoch"] == [1, 2]
    assert stopped["methods"][name]["histories"][0]["epoch"] == [1]
    # float32 reductions in another order: losses agree to ~1e-6 relative;
    # an accuracy may differ by an example whose logits nearly tie.
    np.testing.assert_allclose(hb["train_loss"], ha["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(hb["test_loss"], ha["test_loss"], rtol=1e-4)
    np.testing.assert_allclose(hb["test_accuracy"], ha["test_accuracy"], atol=2 / 256)
    np.testing.assert_allclose(hb["train_accuracy"], ha["train_accuracy"], atol=2 / 512)
  xa, xb = one["methods"]["xsam"]["histories"][0], eight["methods"]["xsam"]["histories"][0]
  # Alpha is an argmax over probe losses: the runs pick the same grid point only where the winner
  # leads by more than the runs' disagreement, the 1e-4 relative their losses are checked to above
  # (840 float32 ulps: the gradient sums of 16 steps, reduced in another order, carried through).
  for losses in xa["probe_losses"]:
    assert_argmax_lead(losses, f32_bound(losses, n_ops=1e-4 / EPS32))
  for key in ("alpha", "alpha_min", "alpha_max"):
    assert xb[key] == xa[key], key  # probed twice (steps 0 and 16): the same alphas


@pytest.mark.parametrize(
  ("argv", "flag"),
  [
    (["--devices", "0"], "--devices"),
    (["--devices", "99"], "--devices"),
    (["--devices", "-2", "--quick"], "--devices"),
  ],
)
def test_devices_out_of_range_is_a_usage_error(argv, flag, capsys):
  with pytest.raises(SystemExit) as info:
    train.main([*argv, "--no-progress", "--no-checkpoints"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert f"argument {flag}: must be an integer between 1 and 1" in err


def test_trainer_checks_devices(monkeypatch):
  with pytest.raises(ValueError, match=r"devices must be an integer between 1 and 1 .* got 2") as info:
    checks.check_devices(2, 32)
  assert info.value.field == "devices"
  checks.check_devices(1, 33)
  monkeypatch.setattr(jax, "devices", lambda *a: ["d"] * 8)
  checks.check_devices(8, 32)
  with pytest.raises(ValueError, match=r"batch_size 36 is not divisible by the device count 8") as info:
    checks.check_devices(8, 36)
  assert info.value.field == "batch_size"
