"""The sharpness study (experiments.sharpness_study) in its quick configuration writes well-formed JSON, markdown
and PNGs."""

import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from experiments import sharpness_study as study


@pytest.mark.slow  # a study end to end: outside CI
def test_quick_mode_outputs(tmp_path):
  config, args, command = study.COMMAND.parse(["--quick", "--out", str(tmp_path)])
  assert (config, args.out) == (study.SharpnessConfig.quick(), str(tmp_path))
  payload = study.run(config, args.out, command)
  with open(tmp_path / "sharpness.json") as fh:
    saved = json.load(fh)
  assert saved["summary"] == json.loads(json.dumps(payload["summary"]))
  assert saved["config"]["mode"] == "quick"
  assert saved["config"]["rho_max"] == 2 * saved["config"]["rho"]  # None (2 rho) is recorded as the number
  assert saved["command"] == f"python -m experiments.sharpness_study --quick --out {tmp_path}"
  for method in study.METHODS:
    (run,) = saved["runs"][method]
    assert len(run["eigenvalues"]) == saved["config"]["num_eigs"]
    assert run["eigenvalues"] == sorted(run["eigenvalues"], reverse=True)
    for key in ("lambda_max", "lambda1_over_lambda5", "avg_sharpness", "test_acc", "train_loss", "xsam_theta"):
      assert math.isfinite(run[key]), (method, key)
      assert math.isfinite(saved["summary"][method][key]["mean"])
    assert run["lambda_max"] > 0
  assert len(saved["runs"]["XSAM"][0]["alpha_per_epoch"]) == saved["config"]["epochs"]
  for claim in saved["claim_sgd_gt_sam_gt_xsam"].values():
    assert sorted(claim["order_of_means"]) == sorted(study.METHODS)
  md = (tmp_path / "sharpness.md").read_text()
  assert "| method |" in md
  assert all(f"| {m} |" in md for m in study.METHODS)
  for name in ("plane_xsam.png", "plane_random.png"):
    png = tmp_path / name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < png.stat().st_size < 200_000
