"""experiments.bench --quick produces a well-formed report (no timing asserts)."""

import json

from experiments import bench


def test_bench_quick_report(tmp_path):
  report = bench.main(["--quick", "--models", "mlp", "--repeats", "2", "--out", str(tmp_path)])
  on_disk = json.loads((tmp_path / "bench.json").read_text())
  assert on_disk["device"]
  assert on_disk["models"]["mlp"]["params"] > 0
  m = report["models"]["mlp"]
  assert set(m["steps"]) == {"sgd", "sam", "xsam_nonprobe", "xsam_probe", "optax_contrib_sam"}
  assert {"vmap", "python loop", "lax.map(batch_size=1)"} <= set(m["probes"])
  for group in ("steps", "probes"):
    for v in m[group].values():
      assert v["median_s"] > 0
      assert v["compile_s"] > 0
  assert all(r > 0 for r in m["ratios"].values())
  assert "ratio sam/sgd" in bench.format_table(report)
