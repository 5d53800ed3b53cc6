"""experiments.bench.controls --quick writes a well-formed report (its keys and shapes; no timing asserts)."""

import json

import pytest

from experiments import bench
from experiments.bench import controls as bench_controls
from experiments.core import report as core_report


@pytest.mark.slow  # a study end to end: outside CI
def test_bench_controls_quick_report(tmp_path):
  report = bench_controls.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
  on_disk = json.loads((tmp_path / "controls.json").read_text())
  assert on_disk == json.loads(json.dumps(report))  # what is printed is what is written
  for key in ("date", "command", "device", "cpu", "host", "jax", "optax", "config"):
    assert on_disk[key], key
  assert on_disk["config"]["repeats"] == 1
  p = on_disk["problem"]
  assert p["params"] > 0
  assert p["steps"] == bench_controls.ControlsConfig.quick().steps
  assert tuple(on_disk["epoch"]) == bench_controls.EPOCH_VARIANTS
  assert tuple(on_disk["step"]) == bench_controls.STEP_VARIANTS
  for v in on_disk["epoch"].values():
    assert {"median_s", "compile_s", "perturbed_steps", "expected_ratio"} <= set(v)
    assert v["median_s"] > 0
  # 10 steps: SAM (and RWP) perturbs on all, every 2nd on 5, every 5th (and LookSAM with k = 5) on 2.
  extra = {name: v["perturbed_steps"] for name, v in on_disk["epoch"].items()}
  assert extra == {
    "sgd": 0,
    "sam": 10,
    "sam_every2": 5,
    "sam_every5": 2,
    "looksam_k5": 2,
    "rwp": 10,
    "momentum_sam": 0,
    "preconditioned_sam": 10,
    "functional_sam": 10,
    "functional_sam_precond": 10,
  }
  assert "epoch functional_sam/sgd" in on_disk["ratios"]
  assert "epoch preconditioned_sam/sgd" in on_disk["ratios"]
  assert "epoch momentum_sam/sgd" in on_disk["ratios"]  # a whole optimizer, no extra pass
  assert "epoch rwp/sgd" in on_disk["ratios"]
  assert all(v["median_s"] > 0 for v in on_disk["step"].values())
  assert "step looksam_reuse/sgd" in on_disk["ratios"]
  assert "epoch looksam_k5/sgd" in on_disk["ratios"]
  assert all(r > 0 for r in on_disk["ratios"].values())
  table = bench_controls.format_table(report)
  assert "looksam_reuse" in table
  assert "ratio epoch sam_every5/sgd" in table
  # experiments.bench nests run()'s output (the report less the header and command) whole under "controls":
  # its table must still find the config (the full bench lost its whole report to a KeyError here).
  header = {k: report[k] for k in core_report.header()}
  nested = {k: v for k, v in report.items() if k not in header and k != "command"}
  assert "looksam_reuse" in bench.format_table({**header, "models": {}, "controls": nested})


def test_steps_beyond_the_epoch_is_a_config_error():
  c = bench_controls.ControlsConfig.quick().replace(batch=1000, steps=5)  # digits: one batch of 1000
  with pytest.raises(ValueError, match="steps must be at most 1"):
    bench_controls.problem(c)
