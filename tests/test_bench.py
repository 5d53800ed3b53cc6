"""experiments.bench --quick produces a well-formed report (no timing asserts)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from experiments import bench
from experiments.bench import common, problems
from tests.tolerances import f32_bound, f32_rtol


@pytest.mark.slow  # the whole quick bench, every sub-bench included (~1 min on 2 cores)
def test_bench_quick_report(tmp_path):
  """``python -m experiments.bench --quick`` end to end on the MLP: the report, its sub-benches and its table
  (where a sub-report missing its config once lost a whole run after the measuring)."""
  argv = ["--quick", "--models", "mlp", "--repeats", "2", "--out", str(tmp_path)]
  report = bench.main(argv)
  on_disk = json.loads((tmp_path / "bench.json").read_text())
  assert on_disk["device"]
  assert on_disk["models"]["mlp"]["params"] > 0
  m = report["models"]["mlp"]
  assert set(m["steps"]) == {"sgd", "sam", "plane_floor", "xsam_nonprobe", "xsam_probe", "optax_contrib_sam"}
  assert {"vmap", "python loop", "lax.map(batch_size=1)"} <= set(m["probes"])
  for group in ("steps", "probes"):
    for v in m[group].values():
      assert v["median_s"] > 0
      assert v["compile_s"] > 0
  assert all(r > 0 for r in m["ratios"].values())
  assert "ratio sam/sgd" in bench.format_table(report)
  assert set(m["microbatched"]) == {"value_and_grad", "sam_step"}
  for rows in m["microbatched"].values():
    assert {"k=1", f"k={bench.MICROBATCHES}"} <= set(rows)
    if rows["k=1"].get("temp_bytes") is not None:  # backends without a memory analysis give only compile_s
      assert rows["temp_ratio"] > 0
      assert rows["k=1"]["peak_bytes"] >= rows["k=1"]["temp_bytes"]
  assert on_disk["models"]["mlp"]["microbatched"] == m["microbatched"]
  assert "microbatched value_and_grad temp ratio" in bench.format_table(report)
  _check_quick_wide(report["wide"])
  table = bench.format_table(report)
  assert "compile time on wide trees" in table
  assert "looksam" in table  # the controls sub-bench
  assert on_disk["controls"]["config"]["repeats"] == report["controls"]["config"]["repeats"]
  assert "probe_memory" in on_disk


def _check_quick_wide(wide):
  """The wide-tree report of ``WideConfig.quick()``: every variant compiled on every tree, ratios from the times."""
  assert set(wide["flat"]) == {"10", "20"}
  assert wide["transformer"]["leaves"] == 1 + 2 * 12
  for e in [*wide["flat"].values(), wide["transformer"]]:
    assert set(e["compile_s"]) == {"sgd", "hand_sam", "sam", "xsam"}
    assert all(v > 0 for v in e["compile_s"].values())
    assert e["sam_over_hand"] == e["compile_s"]["sam"] / e["compile_s"]["hand_sam"]
    assert e["xsam_over_hand"] == e["compile_s"]["xsam"] / e["compile_s"]["hand_sam"]
  assert wide["flat_growth"]["leaf_ratio"] == 2.0


def test_wide_hand_sam_is_sam():
  """The bench's hand-written SAM step is the library's sam (same maths), on the transformer-shaped tree."""
  from experiments.bench import wide as bench_wide

  params, loss_of = bench_wide.transformer_problem(blocks=1, width=4)
  _, hand = bench_wide.hand_sam_step(loss_of)
  tx, lib = bench_wide.variants(loss_of)["sam"]
  p_hand, _, (_, perturbed_loss) = jax.jit(hand)(params, bench_wide._base().init(params))
  p_lib, s_lib, _ = jax.jit(lib)(params, tx.init(params))
  # The same outputs too: the loss at the ascent point (one loss, ~100 rounding steps, in both programs).
  lib_loss = optax.tree.get(s_lib, "perturbed_loss")
  np.testing.assert_allclose(perturbed_loss, lib_loss, rtol=0, atol=f32_bound(lib_loss, n_ops=2 * 100))
  # Two programs: 2 gradients (a loss of ~100 rounding steps on this tiny model) and a norm over the
  # parameters, moved by lr 0.05.
  n = sum(x.size for x in jax.tree.leaves(params))
  for a, b in zip(jax.tree.leaves(p_hand), jax.tree.leaves(p_lib), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=f32_bound(b, n_ops=2 * 100 + n + 2))


def test_plane_floor_outputs_sam_and_reads_both_gradients():
  """The yardstick's output is SAM's g_1 (g_1 + 0 * <g_0, g_1> g_0), but its compiled step still reads g_0."""
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
  loss_fn = lambda p: jnp.sum(p["w"] ** 4) + p["b"] * jnp.sum(p["w"]) + p["b"] ** 2
  g = jax.grad(loss_fn)(params)
  floor, sam = bench.plane_floor(0.1), xsam_jax.sam(0.1)
  u_floor, s_floor = jax.jit(lambda s: floor.update(g, s, params, loss_fn=loss_fn))(floor.init(params))
  u_sam, s_sam = sam.update(g, sam.init(params), params, loss_fn=loss_fn)
  # g_1 + 0 * (...) = g_1 exactly in each program, but one is jitted and one runs op by op, and XLA does
  # not promise equal bits across programs (fusion, FMA contraction): |g_0| (4 steps) and the ascent
  # point (3) move g_1 = 4 w^3 + b by ~3x their relative error, plus its own 4 steps: under 16 at max |g_1|.
  n_ops = 16
  tol = f32_bound(*jax.tree.leaves(u_sam), n_ops=n_ops)
  for a, b in zip(jax.tree.leaves(u_floor), jax.tree.leaves(u_sam), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)
  np.testing.assert_allclose(float(s_floor.grad_norm), float(s_sam.grad_norm), rtol=f32_rtol(n_ops + 4))
  # The g_0 term is not folded away: the output depends on the state's zero.
  u_one, _ = floor.update(g, s_floor._replace(zero=jnp.ones([], jnp.float32)), params, loss_fn=loss_fn)
  assert not jnp.allclose(u_one["w"], u_sam["w"])


def test_models_flag_is_validated(capsys):
  with pytest.raises(SystemExit) as info:
    bench.main(["--quick", "--models", "mlp,vgg"])
  assert info.value.code == 2
  assert "argument --models: must be comma-separated names from mlp, cnn, resnet18" in capsys.readouterr().err
  cpu = jax.default_backend() == "cpu"
  assert problems.default_models() == (("mlp", "cnn") if cpu else ("mlp", "cnn", "resnet18"))


@pytest.mark.slow  # a ResNet-18 (11M parameters) compiled for an XSAM step: ~20 s on 2 cores
def test_bench_resnet18_problem():
  """The ResNet-18 row's problem (benched by default off CPU): the zoo's NNX ResNet-18 with BatchNorm in
  training mode, on which XSAM's probing step compiles and runs. The row's code is every model's, run end to
  end on the MLP by test_bench_quick_report; a whole ResNet-18 row on CPU compiles ~13 programs (~150 s)."""
  params, loss_of = problems.problems(64, 8)["resnet18"](16, 8)
  assert sum(x.size for x in jax.tree.leaves(params)) > 11_000_000
  # Training mode: on a batch of one image repeated, every BatchNorm subtracts the batch mean, so every
  # activation after it is 0 (beta's initial value) up to the rounding of a 16-long mean (16 eps) scaled by
  # 1 / sqrt(1e-5) = 316: the logits are ~1e-3 of the activations at most, and the cross-entropy of equal
  # logits over 10 classes is ln 10. (With running averages instead the loss moves off ln 10 by ~0.07.)
  batch = loss_of.keywords["batch"]
  same = {"x": jnp.broadcast_to(batch["x"][:1], batch["x"].shape), "y": batch["y"]}
  np.testing.assert_allclose(float(jax.jit(loss_of.func)(params, same)), np.log(10.0), rtol=0, atol=1e-3)
  tx = optax.chain(xsam_jax.xsam(0.05, 1.0, alpha_update_period=1), optax.sgd(0.1))
  new_params, state, loss = jax.jit(common.make_step(tx, loss_of))(params, tx.init(params))
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(state[0].probe_losses)))
  assert float(state[0].alpha) in set(np.asarray(xsam_jax.DEFAULT_ALPHAS, np.float32).tolist())
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), strict=True)]
  assert all(moved)  # every parameter has a gradient (sgd moves each leaf)


def test_bench_wide_quick_cases(tmp_path):
  """``python -m experiments.bench_wide --quick`` (one compile per variant): every variant on every tree, the
  report written."""
  from experiments.bench import wide as bench_wide

  wide = bench_wide.main(["--quick", "--compile-repeats", "1", "--out", str(tmp_path)])
  _check_quick_wide(wide)
  assert json.loads((tmp_path / "wide.json").read_text())["flat"] == json.loads(json.dumps(wide["flat"]))
  assert "compile time on wide trees" in "\n".join(bench_wide.format_rows(wide))


def test_bench_wide_compile_repeats_is_validated(capsys):
  from experiments.bench import wide as bench_wide

  with pytest.raises(SystemExit) as info:
    bench_wide.main(["--compile-repeats", "0"])
  assert info.value.code == 2
  assert "--compile-repeats: must be an integer >= 1" in capsys.readouterr().err


def test_bench_table_includes_the_sub_benches():
  """bench's table shows the controls and probe-memory reports (the committed results/bench files)."""
  results = Path(__file__).resolve().parents[1] / "results" / "bench"
  report = {
    "device": "cpu: cpu",
    "host": "x86_64",
    "jax": jax.__version__,
    "date": "2026-12-01",
    "models": {},
    "controls": json.loads((results / "controls.json").read_text()),
    "probe_memory": json.loads((results / "probe_memory.json").read_text()),
  }
  text = bench.format_table(report)
  assert "looksam" in text
  assert "bound: sam + c P" in text
