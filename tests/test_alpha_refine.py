"""experiments.alpha_refine: the offline alpha-error measurement on known probe losses."""

import json

import numpy as np
import pytest

import xsam_jax
from experiments import alpha_refine


def test_alpha_errors_on_quadratic_probe_rounds():
  grid = np.asarray(xsam_jax.DEFAULT_ALPHAS)
  vertices = [0.63, 1.27, 0.0, 2.0]  # two interior maxima, two at the ends of the grid
  rounds = [-((grid - v) ** 2) for v in vertices]
  err = alpha_refine.alpha_errors(rounds)
  assert err["rounds"] == 4
  assert err["at_grid_end"] == pytest.approx(0.5)
  # Refining the 21-point grid moves its choice (0.6, 1.3) to the true vertices.
  assert err["grid21+parabola"]["max_abs"] == pytest.approx(0.03, abs=1e-5)
  assert err["grid21+parabola"]["mean_abs"] == pytest.approx((0.03 + 0.03) / 4, abs=1e-5)
  # The 5-point grid (step 0.5) picks 0.5 and 1.5; refined, it recovers the vertices exactly,
  # so its error against the 21-point choice is the 21-point grid's own rounding.
  assert err["grid5"]["max_abs"] == pytest.approx(0.2, abs=1e-5)
  assert err["grid5+parabola"]["max_abs"] == pytest.approx(0.03, abs=1e-5)
  assert err["grid5+parabola"]["frac_over_0.05"] == 0.0


def test_tables_are_well_formed():
  report = {
    "alpha_error": alpha_refine.alpha_errors([-((np.asarray(xsam_jax.DEFAULT_ALPHAS) - 1.04) ** 2)]),
    "trained": {
      name: {
        "summary": {"mean": 0.5, "std": 0.01},
        "final_test_accuracy": [0.5],
        "final_train_loss": [0.1],
        "mean_alpha": 1.0,
      }
      for name in alpha_refine.TRAINED
    },
  }
  text = alpha_refine.format_tables(report)
  assert all(f"| {name} |" in text for name in alpha_refine.TRAINED)
  json.dumps(report)


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
  assert alpha_refine.main(["--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
  doc = json.loads((tmp_path / "alpha_refine.json").read_text())
  assert set(doc["trained"]) == set(alpha_refine.TRAINED)
  assert doc["alpha_error"]["rounds"] == 2
