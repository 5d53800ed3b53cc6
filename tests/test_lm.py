"""The language-model study (``python -m experiments.lm``): its model, schedule, runs and the quick study end to end."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.core import config, pure_models, text
from experiments.lm import runs
from experiments.lm.__main__ import main
from experiments.lm.config import METHODS, LMConfig
from tests.tolerances import f32_rtol


def test_transformer_is_causal():
  """The logits at position t depend on tokens 0..t only: changing later tokens leaves them bitwise equal."""
  params = pure_models.transformer_init(jax.random.key(0), vocab=11, context=8, width=16, depth=2, heads=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(3, 8)), jnp.int32)
  logits = pure_models.transformer_forward(params, tokens, heads=4)
  assert logits.shape == (3, 8, 11)
  changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % 11)
  other = pure_models.transformer_forward(params, changed, heads=4)
  np.testing.assert_array_equal(logits[:, :5], other[:, :5])
  assert not np.allclose(logits[:, 5:], other[:, 5:])
  with pytest.raises(ValueError, match="divisible by `heads`"):
    pure_models.transformer_init(jax.random.key(0), vocab=11, context=8, width=10, depth=1, heads=4)


def test_schedule_warms_up_then_decays_to_zero():
  lr = runs.schedule(0.01, steps=100, warmup=0.1)
  assert float(lr(0)) == 0.0
  # float32 roundings: the warmup's t / warm * lr 2; the cosine's clip, divide, cos, add, halve and multiply 8.
  assert float(lr(5)) == pytest.approx(0.005, rel=f32_rtol(2))
  assert float(lr(10)) == pytest.approx(0.01, rel=f32_rtol(8))
  assert float(lr(55)) == pytest.approx(0.005, rel=f32_rtol(8))  # halfway through the cosine
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


def test_config_checks_name_the_field():
  with pytest.raises(config.ConfigError, match="heads"):
    LMConfig.quick().replace(width=16, heads=3)
  with pytest.raises(config.ConfigError, match="eval_every"):
    LMConfig.quick().replace(steps=10, eval_every=4)
  with pytest.raises(SystemExit):
    main(["--quick", "--fixed-alphas", "2.5"])


def test_runs_are_reproducible_and_functional_sam_gets_its_split_loss():
  """The same seed twice gives the same run bitwise (the same program); Functional SAM (which needs
  model_fn and output_loss_fn) trains; the loss starts near ln(vocabulary) and falls."""
  c = LMConfig.quick()
  corpus = text.load_pydoc_text()
  hp = {"lr": 3e-3, "rho": 0.03}
  first, again = runs.train_runs("functional_sam", [hp, hp], [4, 4], c, corpus)
  np.testing.assert_array_equal(first["epoch_val_loss"], again["epoch_val_loss"])
  assert abs(first["epoch_loss"][0] - math.log(len(corpus.vocab))) < 0.5
  assert first["epoch_val_loss"][-1] < first["epoch_val_loss"][0]
  assert runs.bits_per_character(math.log(2.0)) == pytest.approx(1.0)


def test_rwp_noise_key_is_each_runs_seed():
  """RWP's noise key is its built-in key (seed 0) folded with the run's traced seed: runs of one vmapped
  call draw different noise, and the same seed draws the same."""
  c = LMConfig.quick()
  params = {"w": jnp.ones((3, 2))}
  keys = jax.vmap(
    lambda s: runs.make_tx("rwp", {"lr": 1e-3, "gamma": 0.01, "seed": s}, c, c.steps).init(params)[0].key
  )(jnp.asarray([0, 1, 1], jnp.int32))
  for i, s in enumerate([0, 1, 1]):
    np.testing.assert_array_equal(keys[i], jax.random.fold_in(jax.random.PRNGKey(0), s))
  assert not np.array_equal(keys[0], keys[1])


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
  """``python -m experiments.lm --quick``: every method tuned and tested, paired intervals, files written."""
  doc = main(["--quick", "--out", str(tmp_path), "--no-progress"])
  c = LMConfig.quick()
  assert set(doc["selected"]) == set(METHODS)
  assert set(doc["test"]) == {*METHODS, "adamw_2x"}
  for method, t in doc["test"].items():
    assert len(t["test_loss"]) == c.test_seeds, method
    assert all(math.isfinite(v) for v in t["test_loss"]), method
  assert doc["selected"]["sam"]["rho"] in c.rhos
  assert doc["selected"]["xsam"]["rho_max"] == pytest.approx(c.rho_max_factors[0] * doc["selected"]["sam"]["rho"])
  for method, comp in doc["comparisons"].items():
    d = comp["equal_steps"]
    assert d["n"] == c.test_seeds, method
    assert d["low"] <= d["mean"] <= d["high"], method
    assert ("equal_compute" in comp) == (runs.GRADIENTS_PER_STEP.get(method, 1) == 2), method
  assert 0.0 <= doc["alpha"]["mean"] <= 2.0
  assert len(doc["curves"]["adamw"]["val_loss"]) == c.steps // c.eval_every
  assert len(doc["curves"]["adamw_2x"]["val_loss"]) == 2 * c.steps // c.eval_every
  written = json.loads((tmp_path / "lm.json").read_text())
  assert written["selected"] == json.loads(json.dumps(doc["selected"]))
  assert "| XSAM |" in (tmp_path / "tables.md").read_text()
  assert (tmp_path / "curves.png").stat().st_size > 10_000
