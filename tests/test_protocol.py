"""The protocol (experiments.protocol): the --quick run end to end, resume, splits, label noise, statistics, vmap."""

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_jax
from experiments.core import engine, methods, stats
from experiments.core.config import ConfigError
from experiments.protocol import COMMAND, ProtocolConfig, programs, runner, splits, stages, store
from experiments.protocol import protocol as protocol_lib
from tests import tolerances

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = str(REPO / "data_cache")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The --quick protocol, run once for the module: ``(doc, out, workdir)``."""
  base = tmp_path_factory.mktemp("protocol")
  out, work = str(base / "out"), str(base / "work")
  argv = ["--quick", "--out", out, "--workdir", work, "--no-progress", "--data-dir", DATA_DIR]
  config, args, command = COMMAND.parse(argv)
  assert config == ProtocolConfig.quick().replace(data_dir=DATA_DIR)
  doc = protocol_lib.run(config, args.out, workdir=args.workdir, command=command, progress=False, log=lambda _: None)
  return doc, out, work


def _store_lines(work):
  with open(os.path.join(work, store.STORE_FILE)) as f:
    return [json.loads(line) for line in f]


def test_quick_run_end_to_end(quick):
  _, out, work = quick
  for name in (protocol_lib.JSON_FILE, protocol_lib.TABLES_FILE):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, protocol_lib.JSON_FILE)) as f:
    written = json.load(f)  # strict JSON: no NaN
  config = ProtocolConfig.quick()
  assert written["machine"]["cpu"]
  assert written["machine"]["versions"]["jax"] == jax.__version__
  tests = written["single_step"]["tests"]
  assert set(tests) == {"sgd", "sam", "xsam", "xsam_fixed"}  # GSAM and WSAM: test_extra_method_hyperparameters
  assert all(t["seeds"] == [1000, 1001] and len(t["test_acc"]) == 2 for t in tests.values())
  assert {(c["a"], c["b"]) for c in written["single_step"]["comparisons"]} >= {("xsam", "sam"), ("sam", "sgd")}
  assert [e["factor"] for e in written["rho"]] == list(config.rho_factors)
  assert set(written["multistep"]["tests"]) == {f"{m}@K={k}" for m in config.multistep_methods for k in config.ks}
  assert set(written["regimes"]) == {"noise"}
  assert "toy2d" not in config.stages
  assert written["runs_trained"] == written["runs_stored"] > 0
  with open(os.path.join(out, protocol_lib.TABLES_FILE)) as f:
    md = f.read()
  for heading in ("## Single step on test", "## Varying rho", "## Multi-step", "## Regime noise", "## Cost"):
    assert heading in md
  # The test curves: every rho_max factor and every coarse fixed alpha on test, paired with SAM, per arm.
  assert "## XSAM - SAM along the grids" in md
  assert os.path.getsize(os.path.join(out, "curves.png")) > 0
  assert set(written["curves"]) == {"main", "noise"}
  for curve in written["curves"].values():
    assert [p["x"] for p in curve["rho_max"]] == list(config.rho_max_factors)
    assert {*config.coarse_alphas, 1.0} <= {p["x"] for p in curve["alpha"]}
    for p in curve["rho_max"] + curve["alpha"]:
      assert p["test"]["n"] == config.test_seeds
      assert "val" in p  # every curve point is a point of the tuning grid
    sam_point = next(p for p in curve["alpha"] if p["x"] == 1.0)
    assert sam_point["test"]["mean"] == 0.0  # alpha = 1 is SAM's own run
  assert "near_ties" in written["rules"]
  # XSAM's diagnostics are recorded per epoch; alpha stays on the probe grid.
  alphas = [r["result"]["epoch_alpha"] for r in _store_lines(work) if "epoch_alpha" in r["result"]]
  assert alphas
  assert all(0 <= a <= 2 for run in alphas for a in run)


def test_main_arm_alone_with_no_optional_stages(quick, tmp_path):
  """``--stages ''`` (or ``none``): the single-step protocol of the main arm and its test phase, nothing else;
  the runs are the quick run's own (same keys), so the store of the full quick run serves them all."""
  _, _, work = quick
  argv = ["--quick", "--stages", "", "--out", str(tmp_path), "--workdir", work, "--no-progress", "--data-dir", DATA_DIR]
  config, args, command = COMMAND.parse(argv)
  assert config.stages == ()
  assert COMMAND.parse([*argv[:2], "none", *argv[3:]])[0].stages == ()
  doc = protocol_lib.run(config, args.out, workdir=args.workdir, command=command, progress=False, log=lambda _: None)
  assert doc["runs_trained"] == 0  # every run found in the store: no split read again
  assert set(doc["single_step"]["tests"]) == set(quick[0]["single_step"]["tests"])
  assert doc["single_step"]["comparisons"] == quick[0]["single_step"]["comparisons"]
  assert doc["rho"] == []
  assert doc["multistep"] == {}
  assert doc["regimes"] == {}
  assert os.path.getsize(os.path.join(str(tmp_path), protocol_lib.TABLES_FILE)) > 0


def test_rerun_trains_nothing(quick):
  doc, out, work = quick
  config = ProtocolConfig.quick().replace(data_dir=DATA_DIR)
  again = protocol_lib.run(config, out, workdir=work, progress=False, log=lambda _: None)
  assert again["runs_trained"] == 0
  assert again["runs_stored"] == doc["runs_stored"]
  assert again["selection"] == json.loads(json.dumps(doc["selection"]))
  assert again["single_step"]["comparisons"] == doc["single_step"]["comparisons"]


def test_test_split_read_only_in_the_test_phase(quick):
  doc, _, work = quick
  lines = _store_lines(work)
  val = [r["index"] for r in lines if r["ident"]["split"] == "val"]
  test = [r["index"] for r in lines if r["ident"]["split"] == "test"]
  assert val
  assert test
  assert max(val) < min(test)
  assert doc["test_reads"] == ["main", "noise"]
  # Every test run is a selected (multi-step, or test-curve) setting, on the fresh test seeds only.
  planned = []
  for arm in ("main", "noise"):
    planned += [r["setting"] for r in json.loads(json.dumps(doc["selection"][arm]["selected"])).values()]
  planned += [e["selected"][m]["setting"] for e in doc["rho"] for m in ("sam", "xsam", "xsam_fixed")]
  planned += [t["setting"] for t in doc["multistep"]["tests"].values()]
  planned += [p["setting"] for c in doc["curves"].values() for p in c["rho_max"] + c["alpha"]]  # the test curves
  planned_keys = {json.dumps(p, sort_keys=True) for p in json.loads(json.dumps(planned))}
  for r in lines:
    if r["ident"]["split"] == "test":
      setting = {"method": r["ident"]["static"]["method"], "num_steps": r["ident"]["static"]["num_steps"]}
      assert json.dumps({**setting, **r["ident"]["hp"]}, sort_keys=True) in planned_keys
      assert r["ident"]["seed"] >= ProtocolConfig.quick().test_seed_offset
    else:
      assert r["ident"]["seed"] < ProtocolConfig.quick().tune_seeds


def test_interrupted_sweep_resumes(quick, tmp_path, monkeypatch):
  """A sweep killed after 3 runs: the rerun trains exactly the others (the quick run compiled the programs)."""
  config = ProtocolConfig.quick().replace(data_dir=DATA_DIR)
  arm = stages.main_arm(config)
  calls = {"n": 0}
  train = programs.train_runs

  def dying(*args, **kwargs):
    if calls["n"] == 3:
      raise KeyboardInterrupt
    calls["n"] += 1
    return train(*args, **kwargs)

  monkeypatch.setattr(programs, "train_runs", dying)
  first = runner.Runner(config, store.Store(str(tmp_path)), progress=False)
  with pytest.raises(KeyboardInterrupt):
    stages.tune_single(first, arm, alphas=config.fixed_alphas, baselines=False)
  assert first.store.trained == 3
  monkeypatch.setattr(programs, "train_runs", train)
  second = runner.Runner(config, store.Store(str(tmp_path)), progress=False)
  assert len(second.store.records) == 3
  result = stages.tune_single(second, arm, alphas=config.fixed_alphas, baselines=False)
  total = len(second.store.records)
  assert second.store.trained == total - 3
  keys = [r["key"] for r in _store_lines(str(tmp_path))]
  assert len(keys) == len(set(keys)) == total
  assert result["selected"]["sam"]["setting"].method == "sam"


def test_store_skips_a_cut_short_last_line(tmp_path):
  s = store.Store(str(tmp_path))
  s.add("a", {"x": 1}, {"eval_acc": np.float32(0.5)}, 1.0)
  with open(s.path, "a") as f:
    f.write('{"key": "b", "ident"')  # killed while writing
  with pytest.warns(UserWarning, match=r"runs\.jsonl, line 2: not a run record"):
    again = store.Store(str(tmp_path))
  assert set(again.records) == {"a"}
  again.add("c", {"x": 2}, {}, 1.0)  # on a line of its own: the cut-short line was ended
  with pytest.warns(UserWarning, match=r"line 2: not a run record"):
    assert set(store.Store(str(tmp_path)).records) == {"a", "c"}


@pytest.mark.parametrize(
  "line", [b"\xff\xfe not utf-8", b"[]", b"{}", b'{"key": "b", "ident": {}}', b'{"key": 3, "result": {}}', b"7"]
)
def test_store_skips_damaged_lines_with_a_warning_naming_them(tmp_path, line):
  s = store.Store(str(tmp_path))
  s.add("a", {"x": 1}, {"eval_acc": 0.5}, 1.0)
  with open(s.path, "ab") as f:
    f.write(line + b"\n")
  s.add("c", {"x": 2}, {"eval_acc": 0.25}, 1.0)
  with pytest.warns(UserWarning, match=r"runs\.jsonl, line 2: not a run record"):
    again = store.Store(str(tmp_path))
  assert set(again.records) == {"a", "c"}


def test_validation_split_is_disjoint_and_test_is_untouched():
  config = ProtocolConfig.default()
  s = splits.make_splits(DATA_DIR, splits.Regime(), val_fraction=0.2, split_seed=config.split_seed, noise_seed=0)
  assert len(s.train_index) == 3200
  assert len(s.val_index) == 800
  assert not set(s.train_index) & set(s.val_index)
  assert sorted([*s.train_index, *s.val_index]) == list(range(4000))
  raw = splits._mnist1d(DATA_DIR)
  np.testing.assert_array_equal(s.y_test, raw.y_test)
  np.testing.assert_array_equal(s.y_val, raw.y_train[s.val_index])
  # Normalized with the training split's statistics only.
  x_train = raw.x_train[s.train_index].astype(np.float64)
  expected = (raw.x_test.astype(np.float64) - x_train.mean()) / x_train.std()
  np.testing.assert_allclose(s.x_test, expected, rtol=0, atol=tolerances.f32_bound(expected, n_ops=4))
  small = splits.make_splits(DATA_DIR, splits.Regime(0.0, 500), val_fraction=0.2, split_seed=0, noise_seed=0)
  np.testing.assert_array_equal(small.train_index, s.train_index[:500])
  np.testing.assert_array_equal(small.val_index, s.val_index)


def test_label_noise_rate_and_symmetry():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 20_000).astype(np.int32)
  noisy, flipped = splits.symmetric_noise(labels, 0.25, 10, seed=3)
  assert flipped.sum() == 5000  # exactly round(rate * n)
  assert np.all(noisy[flipped] != labels[flipped])
  assert np.all(noisy[~flipped] == labels[~flipped])
  # Each class's flipped labels spread evenly over the 9 other classes: chi-square over the 90 (from, to) cells.
  counts = np.zeros((10, 10))
  np.add.at(counts, (labels[flipped], noisy[flipped]), 1)
  off = ~np.eye(10, dtype=bool)
  expected = counts.sum(axis=1, keepdims=True) / 9 * np.ones((1, 10))
  chi2 = float(((counts - expected) ** 2 / expected)[off].sum())
  assert chi2 < 130  # 80 degrees of freedom: P(chi2 > 130) < 1e-3
  # In the protocol: train and validation labels noisy at the rate, test labels clean.
  s = splits.make_splits(DATA_DIR, splits.Regime(0.25), val_fraction=0.2, split_seed=0, noise_seed=0)
  raw = splits._mnist1d(DATA_DIR)
  assert s.flipped.sum() == 1000
  np.testing.assert_array_equal(s.y_train != raw.y_train[s.train_index], s.flipped[s.train_index])
  np.testing.assert_array_equal(s.y_val != raw.y_train[s.val_index], s.flipped[s.val_index])
  np.testing.assert_array_equal(s.y_test, raw.y_test)


def _row(seed_accs, method, **hp):
  return {"setting": runner.Setting.make(method, **hp), "per_seed": seed_accs, "mean": sum(seed_accs) / len(seed_accs)}


def test_near_tie_rule_prefers_the_baseline_within_one_standard_error():
  """XSAM's rho_max: 2 rho has the best validation mean, but rho_max = rho is within one paired standard
  error of it, so the rule picks rho_max = rho; a point outside it is never picked; argmax picks the best."""
  base = dict(lr=0.1, wd=1e-4, rho=0.1)
  far = _row([0.90, 0.91, 0.92], "xsam", **base, rho_max=0.3)  # d = (0.06, 0.00, 0.02): mean 0.027 > se 0.018
  near = _row([0.93, 0.93, 0.93], "xsam", **base, rho_max=0.1)  # d = (0.03, -0.02, 0.01): mean 0.007 <= se 0.015
  best = _row([0.96, 0.91, 0.94], "xsam", **base, rho_max=0.2)
  assert stages.near_tie(best, near)
  assert not stages.near_tie(best, far)
  assert stages.select([far, near, best], "nearest_within_se", "xsam") is near
  assert stages.select([far, near, best], "argmax", "xsam") is best
  assert stages.select([far, near, best], "nearest_within_se", None) is best  # lr / wd grids
  # Each method's baseline: SAM's rho nearest 0 (SGD); the fixed alpha nearest 1; GSAM's alpha nearest 0;
  # WSAM's gamma nearest 1/2; a row that is SAM's own run is at distance 0.
  d = stages.distance_to_baseline
  hp = dict(lr=0.1, wd=0.0, rho=0.1)
  assert d(runner.Setting.make("sam", **hp), "sam") == 0.1
  assert d(runner.Setting.make("xsam_fixed", **hp, alpha=1.5), "xsam_fixed") == 0.5
  assert d(runner.Setting.make("xsam_fixed", **hp, alpha=1.0), "xsam_fixed") == 0.0  # canonical: SAM's run
  assert d(runner.Setting.make("wsam", **hp, gamma=0.7), "wsam") == pytest.approx(0.2)
  assert d(runner.Setting.make("gsam", **hp, alpha=0.05), "gsam") == 0.05


def test_t_quantiles_match_the_table():
  # Two-sided 95% (p = 0.975) and one-sided 95% (p = 0.95) critical values of Student's t (standard tables).
  table = {(0.975, 1): 12.7062, (0.975, 3): 3.1824, (0.975, 9): 2.2622, (0.975, 29): 2.0452, (0.95, 5): 2.0150}
  for (p, df), value in table.items():
    assert stats.t_quantile(p, df) == pytest.approx(value, abs=5e-5)
  assert stats.t_quantile(0.025, 9) == pytest.approx(-stats.t_quantile(0.975, 9))
  assert stats.t_cdf(0.0, 4) == pytest.approx(0.5)


def test_paired_interval_by_hand():
  # d = a - b = [1, 0, 2, -1]: mean 0.5, sample std sqrt(5/3), n = 4, t_{0.975, 3} = 3.18245.
  c = stats.paired([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 5.0])
  half = 3.182446 * math.sqrt(5 / 3) / 2
  assert c["mean"] == pytest.approx(0.5)
  assert c["std"] == pytest.approx(math.sqrt(5 / 3))
  assert (c["low"], c["high"]) == (pytest.approx(0.5 - half, abs=1e-5), pytest.approx(0.5 + half, abs=1e-5))
  assert (c["wins"], c["ties"], c["losses"]) == (2, 1, 1)
  one = stats.paired([1.0], [0.5])
  assert one["mean"] == 0.5
  assert math.isnan(one["low"])


def test_vmapped_runs_equal_a_loop_and_keep_the_probe_cond():
  config = ProtocolConfig.quick()
  s = splits.make_splits(DATA_DIR, splits.Regime(0.0, config.train_size), val_fraction=0.2, split_seed=0, noise_seed=0)
  problem = splits.problem(s, "val")
  static = programs.Static("cnn1d", config.width, "xsam", 1, config.epochs, config.batch_size, 0.9, 0.0, 1000)
  values = [(0.05, 0.05), (0.1, 0.1), (0.2, 0.05)]
  hps = [programs.hyperparameters("xsam", {"lr": lr, "wd": 5e-4, "rho": r, "rho_max": 2 * r}) for lr, r in values]
  kw = {"input_shape": s.input_shape, "num_classes": 10}
  loop = programs.train_runs(static, hps, [0, 1, 2], problem, batched=False, **kw)
  batched = programs.train_runs(static, hps, [0, 1, 2], problem, batched=True, **kw)
  steps = config.epochs * 10
  for a, b in zip(loop, batched, strict=True):
    assert set(a) == set(b)
    np.testing.assert_array_equal(a["epoch_alpha"], b["epoch_alpha"])  # the same probe rounds picked the same alpha
    for key in ("epoch_loss", "probe_losses", "eval_loss", "train_loss_final"):
      # The batched program may sum in another order: a few ulps per rounding step, compounded over the steps.
      np.testing.assert_allclose(a[key], b[key], rtol=0, atol=tolerances.f32_bound(a[key], n_ops=64 * steps))
  # The runs differ (each got its own hyperparameters and seed), so equality above is not vacuous.
  assert len({float(r["epoch_loss"][-1]) for r in loop}) == 3
  assert programs.cond_survives(static, problem, **kw)


def test_cond_check_catches_a_batched_step_count():
  """Negative control: vmapping XSAM's state (its count batched) turns the probe cond into a select."""
  tx = xsam_jax.xsam(0.1, 0.2, alpha_update_period=5)
  loss = lambda p: jnp.sum(jnp.tanh(jnp.ones((3, 4)) @ p) ** 2)
  params = jnp.ones(4)

  def step(p, s):
    return tx.update(jax.grad(loss)(p), s, p, loss_fn=loss)

  state = tx.init(params)
  assert engine.model_conds(jax.make_jaxpr(step)(params, state).jaxpr) == 1
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), (params, state))
  assert engine.model_conds(jax.make_jaxpr(jax.vmap(step))(*stacked).jaxpr) == 0


def test_settings_are_canonical():
  base = {"lr": 0.1, "wd": 5e-4, "rho": 0.05}
  sam = runner.Setting.make("sam", **base)
  assert runner.Setting.make("msam", 1, **base) == sam
  assert runner.Setting.make("lsam", 1, **base) == sam
  assert runner.Setting.make("xsam_fixed", **base, alpha=1.0) == sam
  assert runner.Setting.make("gsam", **base, alpha=0.0) == sam
  assert runner.Setting.make("wsam", **base, gamma=0.5) == sam
  assert runner.Setting.make("msam_plus", 1, **base) != sam
  sgd = runner.Setting.make("sgd", 3, **base, rho_max=1.0)  # SGD reads neither K nor rho: they leave its identity
  assert sgd == runner.Setting.make("sgd", lr=0.1, wd=5e-4)
  assert sgd.to_dict() == {
    "method": "sgd",
    "num_steps": 1,
    "lr": 0.1,
    "wd": 5e-4,
  }
  assert runner.Setting.make("xsam", **base, rho_max=0.1 + 0.2 - 0.2).values["rho_max"] == 0.1


def test_extra_method_hyperparameters_reach_the_library():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  loss = lambda p: jnp.sum(p["w"] ** 4) + jnp.prod(p["w"])
  grads = jax.grad(loss)(params)

  def out(name, **hp):
    tx = methods.build(name, rho=0.1, **hp)
    return tx.update(grads, tx.init(params), params, loss_fn=loss)[0]["w"]

  sam = out("sam")
  np.testing.assert_allclose(out("xsam_fixed", alpha=1.0), sam, rtol=tolerances.f32_rtol(16))
  np.testing.assert_allclose(out("gsam", alpha=0.0), sam, rtol=tolerances.f32_rtol(16))
  assert not np.allclose(out("xsam_fixed", alpha=0.0), sam)
  assert not np.allclose(out("wsam", gamma=0.9), sam)
  assert methods.used_fields("gsam") == {"rho"}  # run ids of the main job unchanged
  # Traced, under jit (the protocol's programs pass them as arrays).
  traced = jax.jit(lambda a: out("xsam_fixed", alpha=a))(jnp.float32(1.0))
  np.testing.assert_allclose(traced, sam, rtol=tolerances.f32_rtol(16))


def test_config_checks():
  assert ProtocolConfig.default().epochs == 30
  assert len(ProtocolConfig.default().rho_factors) >= 4
  assert len(ProtocolConfig.default().fixed_alphas) == 21
  with pytest.raises(ConfigError, match="multistep_seeds"):
    ProtocolConfig.default().replace(multistep_seeds=11)
  with pytest.raises(ConfigError, match="test_seed_offset"):
    ProtocolConfig.default().replace(test_seed_offset=2)
  with pytest.raises(ConfigError, match="regimes"):
    ProtocolConfig.default().replace(regimes=("cifar",))
  assert dataclasses.asdict(ProtocolConfig.quick())["mode"] == "quick"
  with pytest.raises(ConfigError, match="warmup_epochs"):
    ProtocolConfig.default().replace(warmup_epochs=30)


def test_sgd_base_warmup_schedule_closed_form():
  """The base optimizer's step size: a linear ramp over W steps, then lr (1 + cos(pi (t - W) / (T - W))) / 2."""
  import optax

  from experiments.core import methods

  lr, T, W = 0.2, 20, 4
  for warm in (0, W):
    tx = optax.chain(*methods.sgd_base(lr, 0.0, 0.0, T, warm))
    state = tx.init(np.zeros(1, np.float32))
    for t in range(T):
      u, state = tx.update(np.ones(1, np.float32), state, np.zeros(1, np.float32))
      want = lr * t / W if t < warm else lr * (1 + math.cos(math.pi * (t - warm) / (T - warm))) / 2
      np.testing.assert_allclose(-float(u[0]), want, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="warmup_steps"):
    methods.sgd_base(lr, 0.0, 0.0, T, T)


def test_toy2d_stage_calls_the_axes_sweep(monkeypatch):
  import experiments.toy2d

  seen = []

  def sweep(config, log=print):
    seen.append(config.mode)
    return {"markdown": "| table |", "cells": []}

  monkeypatch.setattr(experiments.toy2d, "axes_sweep", sweep, raising=False)
  out = stages.toy2d_stage(ProtocolConfig.quick(), log=lambda _: None)
  assert out["status"] == "done"
  assert out["markdown"] == "| table |"
  assert seen == ["quick"]
  monkeypatch.delattr(experiments.toy2d, "axes_sweep")
  assert stages.toy2d_stage(ProtocolConfig.default())["status"].startswith("hook only")


def test_curves_mark_the_selected_grid_factor_not_a_rounded_quotient():
  """The selected rho_max is marked at its grid factor: with rho 0.1 and factor 1.5, the stored rho_max
  (0.15) divided by 0.1 is 1.4999999999999998, which once left the MLP arm's choice unmarked."""
  from experiments.protocol import curves

  config = ProtocolConfig(rho_max_factors=(1.0, 1.25, 1.5, 2.0, 3.0))
  hp = {"lr": 0.4, "wd": 1e-3, "rho": 0.1}
  selection = {
    "selected": {
      "sam": {"setting": runner.Setting.make("sam", **hp)},
      "xsam": {"setting": runner.Setting.make("xsam", **hp, rho_max=1.5 * hp["rho"])},
      "xsam_fixed": {"setting": runner.Setting.make("xsam_fixed", **hp, alpha=2.0)},
    }
  }
  assert selection["selected"]["xsam"]["setting"].values["rho_max"] / hp["rho"] != 1.5  # the trap
  assert curves.selected_points(config, selection) == {"rho_max": 1.5, "alpha": 2.0}
