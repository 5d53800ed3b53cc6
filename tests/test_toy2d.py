"""experiments.toy2d: the quick study writes well-formed outputs; the batched
runner agrees with a plain step-by-step loop and is deterministic; the command
line gives the study's configs.

No assertion here is about who wins: that is the study's result, not a
property of the code.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from experiments import toy2d
from experiments.core import methods
from tests.tolerances import assert_argmax_lead, f32_bound
from xsam_jax import testfns

# Rounding steps (tests/tolerances.py) of one loss or gradient of fisher_sam_toy: two KLs (~12 steps each)
# and logaddexp (~11), under 40, on terms within ~2x of max(1, f).
TOY_OPS = 40

PNGS = (
  "toy2d_trajectories.png",
  "toy2d_fractions.png",
  "toy2d_outcomes.png",
  "toy2d_directions.png",
  "toy2d_axes.png",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy2d_quick")
  config, args, command = toy2d.COMMAND.parse(["--quick", "--out", str(out)])
  assert (config, args.out) == (toy2d.Toy2dConfig.quick(), str(out))
  payload = toy2d.run(config, args.out, command)
  return out, payload


@pytest.mark.slow  # the quick study end to end (~2 min on 2 cores): outside CI, like the other studies
def test_quick_writes_well_formed_json(quick_run):
  out, payload = quick_run
  with open(out / "toy2d.json") as fh:
    data = json.load(fh)
  assert data == json.loads(json.dumps(payload))  # what was returned is what was written
  assert data["command"] == f"python -m experiments.toy2d --quick --out {out}"
  cfg = toy2d.Toy2dConfig.quick()
  n = cfg.starts_per_axis**2
  assert data["mode"] == "quick"
  assert data["protocol"]["start_grid"]["n"] == n
  labels = {lab for lab, _, _ in toy2d.method_list(cfg.ks)}
  settings = {s.name for s in cfg.settings}
  assert {r["label"] for r in data["results"]} == labels
  assert {(r["label"], r["setting"]) for r in data["results"]} == {(a, b) for a in labels for b in settings}
  for r in data["results"]:
    assert r["n_runs"] == n
    fr = r["fractions"]
    assert set(fr) == set(toy2d.OUTCOMES)
    assert all(0.0 <= v <= 1.0 for v in fr.values())
    assert sum(fr.values()) == pytest.approx(1.0, abs=1e-3)
    assert r["neither"] == pytest.approx(fr["neither_flat_basin"] + fr["neither_sharp_basin"], abs=1e-3)
    for key in (
      "escape_from_sharp",
      "stay_in_flat",
      "neither",
      "sharp_starts_ending_in_flat_basin",
      "frac_ascent_may_cross_s_floor",
      "frac_iterate_below_s_floor",
      "frac_end_spread_over_1",
      "frac_final_iterate_outcome_differs",
    ):
      assert 0.0 <= r[key] <= 1.0
    assert r["sharp_starts_ending_in_flat_basin"] >= r["escape_from_sharp"]
    assert np.isfinite(r["median_end_loss"])
    if r["method"] == "XSAM":
      assert 0.0 <= r["mean_final_alpha"] <= 2.0
  # Gradient descent at a stable lr converges to the minimum of its start basin.
  assert sum(data["start_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
  for r in data["results"]:
    if r["method"] == "SGD":
      assert r["neither"] == 0.0
      assert r["fractions"]["flat"] == pytest.approx(data["start_fractions"]["flat"], abs=0.05)
  assert len(data["paired"]) == len(settings) * len(cfg.ks)
  for row in data["paired"]:
    assert 0 <= row["xsam_flat_sam_not"] <= row["n_starts"] == n
  for row in data["direction_errors"]:
    for key, v in row.items():
      if key.startswith("mean_angle_"):
        assert 0.0 <= v <= 180.0
  assert set(data["trajectories"]["final_points"]) == {s.name for s in cfg.headlines}
  for by_label in data["trajectories"]["final_points"].values():
    for lab, pts in by_label.items():
      assert np.asarray(pts).shape == (len(cfg.trajectory_starts), 2)
      assert np.all(np.isfinite(pts)), lab
  with open(out / "toy2d_timing.json") as fh:
    assert json.load(fh)["wall_time_s"] > 0
  tables = (out / "toy2d_tables.md").read_text()
  assert tables.count("| setting | SGD |") == 3
  assert tables.count("| setting | momentum | SGD |") == 3
  assert "XSAM K=1" in tables
  assert "XSAM K=1 period=20" in tables
  assert data["axes"]["markdown"] in tables


@pytest.mark.slow  # the quick study end to end (~2 min on 2 cores): outside CI, like the other studies
@pytest.mark.parametrize("name", PNGS)
def test_quick_writes_small_pngs(quick_run, name):
  out, _ = quick_run
  path = out / name
  size = os.path.getsize(path)
  assert 5_000 < size < 200_000
  with open(path, "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3
  assert img.shape[0] > 100
  assert img.shape[1] > 100


def test_settle_and_outcome_labels():
  pts = jnp.asarray(
    [
      testfns.FLAT_MINIMUM.location,
      testfns.SHARP_MINIMUM.location,
      (30.0, 45.0),
      (-30.0, 15.0),
      (9.24, 27.01),
      (-13.3, 14.2),
      (21.0, 31.0),
      (-17.5, 14.0),
      (np.nan, 3.0),
    ],
    jnp.float32,
  )
  basins = np.asarray(jax.jit(jax.vmap(toy2d.settle))(pts))
  np.testing.assert_array_equal(basins, [0, 1, 0, 1, 0, 1, 0, 1, 2])
  outcomes = np.asarray(jax.jit(jax.vmap(toy2d.outcome))(pts))
  np.testing.assert_array_equal(outcomes, [0, 1, 2, 3, 2, 3, 0, 1, 4])
  assert toy2d.OUTCOMES[2] == "neither_flat_basin"
  assert toy2d.OUTCOMES[3] == "neither_sharp_basin"


@pytest.mark.parametrize(("method", "k"), [("sgd", 1), ("sam", 2), ("xsam", 2)])
def test_batched_scan_matches_a_plain_loop(method, k, monkeypatch):
  """The vmap-over-settings x vmap-over-starts x scan runner = a loop of steps."""
  run_grid = toy2d.run_grid
  if method == "xsam":
    # On XSAM's 21-point grid the compared run's probe rounds nearly tie (the best alpha leads by ~1e-6,
    # a few ulps of the losses), so scan and loop could choose differently on another CPU. The runner
    # does not depend on the grid: with (0, 1, 2) every winner is clear (checked in the loop below).
    grid3 = methods.Method(functools.partial(xsam_jax.xsam, alphas=(0.0, 1.0, 2.0)), methods.METHOD_FIELDS)
    monkeypatch.setitem(methods.METHODS, "xsam", grid3)
    # toy2d.run_grid's own jit cache may hold a trace on the default grid: trace it afresh.
    run_grid = jax.jit(toy2d.run_grid.__wrapped__, static_argnames=("method", "num_steps", "steps"))
  x0s = jnp.asarray([[-30.0, 35.0], [-5.0, 14.0], [25.0, 40.0]], jnp.float32)
  rhos, rho_maxs = jnp.asarray([2.0, 6.0]), jnp.asarray([4.0, 12.0])
  lrs, periods = jnp.asarray([50.0, 100.0]), jnp.asarray([1, 3], jnp.int32)
  steps = 25
  out = run_grid(x0s, rhos, rho_maxs, lrs, periods, method=method, num_steps=k, steps=steps)
  again = run_grid(x0s, rhos, rho_maxs, lrs, periods, method=method, num_steps=k, steps=steps)
  for key in out:  # deterministic: the same program on the same inputs, so bitwise equal is the contract
    np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(again[key]))
  x_final = out["x_final"]

  i, j = 1, 0  # setting 1 (rho=6, period 3), start 0
  tx = methods.chain(method, optax.sgd(100.0), rho=6.0, rho_max=12.0, num_steps=k, alpha_update_period=3)
  fn = testfns.fisher_sam_toy

  @jax.jit
  def step(x, state):
    updates, state = tx.update(jax.grad(fn)(x), state, x, loss_fn=fn)
    return optax.apply_updates(x, updates), state

  x, state = x0s[j], tx.init(x0s[j])
  window = []
  for _ in range(steps):
    x, state = step(x, state)
    window.append(np.asarray(x))
    if method == "xsam":  # K + 1 gradients and the probe loss per round, on the losses' scale (>= 1)
      losses = state[0].probe_losses
      assert losses.shape == (3,)
      assert_argmax_lead(losses, f32_bound(2.0, 2 * losses, n_ops=(k + 2) * TOY_OPS))
  np.testing.assert_allclose(np.asarray(x_final[i, j]), np.asarray(x), rtol=1e-5, atol=1e-4)
  last = np.asarray(window[-max(1, steps // 10) :])  # the end-state window
  np.testing.assert_allclose(np.asarray(out["x_end"][i, j]), last.mean(axis=0), rtol=1e-5, atol=1e-4)
  spread = np.sqrt(np.mean(np.sum((last - last.mean(axis=0)) ** 2, axis=-1)))
  np.testing.assert_allclose(float(out["spread"][i, j]), spread, rtol=1e-3, atol=1e-4)


def _axes_cell_keys(cfg):
  keys = set()
  for label, method, k in toy2d.method_list(cfg.axes_ks):
    for s in cfg.axes_settings:
      for m in cfg.momenta:
        for p in cfg.periods if method == "xsam" else (None,):
          keys.add((label, k, s._replace(period=1).name, m, p))
  return keys


@pytest.mark.slow  # the quick study end to end (~2 min on 2 cores): outside CI, like the other studies
def test_axes_sweep_quick_gives_a_fraction_per_cell(quick_run):
  """Every method x K x setting x momentum x period cell has its fractions in [0, 1]; the dict is JSON."""
  cfg = toy2d.Toy2dConfig.quick()
  axes = toy2d.axes_sweep(cfg, log=lambda _: None)
  assert json.loads(json.dumps(axes)) == axes
  assert axes["wall_time_s"] > 0
  cells = axes["cells"]
  assert {(c["label"], c["num_steps"], c["setting"], c["momentum"], c["period"]) for c in cells} == _axes_cell_keys(cfg)
  assert len(cells) == len(_axes_cell_keys(cfg))
  assert (axes["momenta"], axes["periods"]) == ([0.0, 0.9], [1, 5, 20])
  assert axes["n_starts"] == cfg.starts_per_axis**2 == axes["n_sharp_basin_starts"] + axes["n_flat_basin_starts"]
  for c in cells:
    for key in ("escape_from_sharp", "stay_in_flat", "flat", "neither", "non_finite"):
      assert 0.0 <= c[key] <= 1.0, (c, key)
    assert c["flat"] + c["neither"] + c["non_finite"] <= 1.0 + 1e-3
  assert axes["markdown"].count("| setting | momentum |") == 3
  assert "XSAM K=1 period=5" in axes["markdown"]
  # Deterministic: the study's own run of the sweep gave the same cells.
  _, payload = quick_run
  assert payload["axes"]["cells"] == cells
  # Momentum 0 through optax's trace takes plain SGD's steps: the main sweep's numbers at the shared cells.
  check = payload["axes"]["main_sweep_check"]
  assert check["cells_compared"] == len(cfg.axes_settings) * (1 + 2 * len(cfg.axes_ks))
  assert check["max_abs_diff"] == 0.0


def _heavy_ball_reference(x0, method, rho, lr, beta, steps):
  """x <- x - lr v, v <- beta v + u (u: the gradient, or SAM's K=1 gradient at x + rho g / |g|), step by step."""
  grad = jax.jit(jax.grad(testfns.fisher_sam_toy))
  x, v, path = x0, jnp.zeros_like(x0), [x0]
  for _ in range(steps):
    g = grad(x)
    u = g if method == "sgd" else grad(x + rho * g / jnp.linalg.norm(g))
    v = beta * v + u
    x = x - lr * v
    path.append(x)
  return np.asarray(jnp.stack(path))


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_momentum_is_heavy_ball(method):
  """Momentum 0.9 runs the heavy-ball update (checked against a hand-written loop); momentum 0 is plain SGD."""
  x0s = jnp.asarray([[-5.0, 14.0], [-30.0, 35.0], [25.0, 40.0]], jnp.float32)
  rho, lr, beta, steps = 5.0, 100.0, 0.9, 6
  paths = np.asarray(toy2d.run_paths(x0s, rho, 2 * rho, lr, 1, beta, method=method, num_steps=1, steps=steps))
  plain = np.asarray(toy2d.run_paths(x0s, rho, 2 * rho, lr, 1, method=method, num_steps=1, steps=steps))
  for j, x0 in enumerate(x0s):
    ref = _heavy_ball_reference(x0, method, rho, lr, beta, steps)
    np.testing.assert_allclose(paths[j], ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(plain[j], _heavy_ball_reference(x0, method, rho, lr, 0.0, steps), rtol=1e-5, atol=1e-4)
  assert np.max(np.abs(paths[:, -1] - plain[:, -1])) > 1.0  # momentum moved the iterates
  # Batched over cells, momentum is traced: cell 1 (beta) is the reference, cell 0 (momentum 0) plain SGD's steps.
  cells = [jnp.asarray(v) for v in ([rho, rho], [2 * rho, 2 * rho], [lr, lr])]
  ones = jnp.ones(2, jnp.int32)
  out = toy2d.run_grid(x0s, *cells, ones, jnp.asarray([0.0, beta]), method=method, num_steps=1, steps=steps)
  none = toy2d.run_grid(x0s, *cells, ones, method=method, num_steps=1, steps=steps)
  np.testing.assert_allclose(np.asarray(out["x_final"][1]), paths[:, -1], rtol=1e-5, atol=1e-4)
  # Two programs (a traced momentum of 0 against none): equal up to rounding, not bitwise.
  np.testing.assert_allclose(np.asarray(out["x_final"][0]), np.asarray(none["x_final"][0]), rtol=1e-5, atol=1e-4)


def test_period_axis_sets_when_alpha_is_reestimated():
  """XSAM's alpha changes only at steps t with t % period == 0, and there it is the alpha probed at x_t."""
  x0 = jnp.asarray([-5.0, 14.0], jnp.float32)
  rho, rho_max, lr, beta, steps = 5.0, 10.0, 100.0, 0.9, 30
  periods = (1, 5, 20)
  one = functools.partial(toy2d.run_one, method="xsam", num_steps=1, steps=steps, record=True)
  batched = jax.jit(jax.vmap(one, in_axes=(None, None, None, None, 0, None)))
  out = batched(x0, rho, rho_max, lr, jnp.asarray(periods, jnp.int32), beta)
  alphas, paths = np.asarray(out["alpha_path"]), np.asarray(out["path"])
  assert alphas.shape == (len(periods), steps)
  before = np.concatenate([np.ones((len(periods), 1), np.float32), alphas[:, :-1]], axis=1)  # alpha_init = 1
  changed = alphas != before
  probe_alpha = jax.jit(lambda x: toy2d.update_directions(x, rho, rho_max, 1)["alpha"])
  for p, ch, a, path in zip(periods, changed, alphas, paths, strict=True):
    assert not np.any(ch[np.arange(steps) % p != 0]), p  # alpha is kept between probes
    for t in range(0, steps, p):  # a probe round at step t, from the iterate x_t
      assert a[t] == pytest.approx(float(probe_alpha(jnp.asarray(path[t]))), abs=1e-6), (p, t)
  assert np.any(changed[0][np.arange(steps) % 5 != 0])  # probing every step re-estimates alpha in between
  assert np.any(changed[1][5:])  # period 5 re-estimates after the first round
  assert np.any(changed[2][20:])  # period 20: at step 20 (and 0) only
  assert np.max(np.abs(paths[0, -1] - paths[2, -1])) > 1e-3  # and the period changes the run
