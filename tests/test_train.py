"""Tests of the classification study (experiments.train and its modules)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import xsam_jax
from experiments import train
from experiments.core import data as data_lib
from experiments.core import methods, models
from experiments.train import checks, trainer
from experiments.train.config import TrainConfig
from tests.tolerances import f32_bound

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = str(REPO / "data_cache")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mnist1d():
  return data_lib.load_mnist1d(DATA_DIR)


def _tiny(**changes):
  base = TrainConfig.quick().replace(data_dir=DATA_DIR, width=4, batch_size=32, train_subset=256, test_subset=128)
  return base.replace(**changes)


# One XSAM configuration (BatchNorm, K=2 ascent steps, probes every 3 steps)
# shared by the tests below, so its train step compiles once for all of them.
SHARED = dict(method="xsam", epochs=2, batch_norm=True, num_steps=2, alpha_update_period=3)


def test_quick_end_to_end_writes_json_and_pngs(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  argv = ["--quick", "--no-progress", "--data-dir", DATA_DIR, "--output-dir", str(out), "--workdir", str(work)]
  assert train.main(argv) == 0
  doc = json.loads((out / "results.json").read_text())
  assert set(doc["methods"]) == {"sgd", "sam", "xsam"}
  assert doc["completed"] is True
  assert doc["wall_time_s"] > 0
  for name, entry in doc["methods"].items():
    assert entry["seeds"] == [0]
    assert entry["config"]["method"] == name
    acc = entry["final_test_accuracy"][0]
    assert 0.0 <= acc <= 1.0
    assert entry["summary"]["mean"] == pytest.approx(acc)
    hist = entry["histories"][0]
    assert hist["epoch"] == [1]
    assert np.isfinite(hist["train_loss"][0])
  xsam_hist = doc["methods"]["xsam"]["histories"][0]
  assert xsam_hist["alpha"][0] in [pytest.approx(a) for a in xsam_jax.DEFAULT_ALPHAS]
  assert 0.0 <= xsam_hist["theta"][0] <= np.pi
  # the epoch's probe round: one loss per alpha of the grid, and alpha is its first maximum
  losses = xsam_hist["probe_losses"][0]
  assert len(losses) == len(xsam_jax.DEFAULT_ALPHAS)
  assert xsam_hist["alpha"][0] == pytest.approx(xsam_jax.DEFAULT_ALPHAS[int(np.argmax(losses))])
  assert "| xsam |" in doc["table"]
  assert "xsam - sam" in doc["paired_differences"]
  assert "alpha" in doc["alpha_summary"]
  # Every sharpness-aware method logs L(w + d) (its state's perturbed_loss) and L(w + d) - L(w).
  for name in ("sam", "xsam"):
    hist = doc["methods"][name]["histories"][0]
    assert hist["sharpness"][0] == pytest.approx(hist["perturbed_loss"][0] - hist["train_loss"][0], rel=1e-4)
    assert hist["sharpness"][0] > 0  # the ascent raises the loss
    assert f"{name}: L(w + d) - L(w)" in doc["sharpness_summary"]
  assert "sharpness" not in doc["methods"]["sgd"]["histories"][0]
  for png in ("accuracy.png", "xsam_alpha_theta.png", "sharpness.png"):
    blob = (out / png).read_bytes()
    assert blob.startswith(PNG_MAGIC)
    assert 1_000 < len(blob) < 200_000


def test_resume_equals_uninterrupted(tmp_path, mnist1d):
  """2 epochs straight == 1 epoch, stop, resume for 1 more: params and state bitwise."""
  config = _tiny(**SHARED)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "a"), data=mnist1d, progress=False)
  first = trainer.train_and_evaluate(
    config.replace(stop_after_epochs=1), str(tmp_path / "b"), data=mnist1d, progress=False
  )
  assert not first.completed
  assert first.step == 8
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "b"), data=mnist1d, progress=False)
  assert resumed.completed
  assert resumed.step == straight.step == 16
  leaves_a, leaves_b = jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)
  assert len(leaves_a) == len(leaves_b) > 0
  for a, b in zip(leaves_a, leaves_b, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key, values in straight.history.items():
    if key != "time_s":
      assert resumed.history[key] == values, key
  # alpha is part of the restored optimizer state, and it was re-probed after the resume
  _, opt = nnx.merge(straight.graphdef, resumed.state)
  assert float(nnx.as_pure(opt.opt_state)[0].alpha) in [pytest.approx(a) for a in xsam_jax.DEFAULT_ALPHAS]
  assert resumed.history["alpha_min"][1] != resumed.history["alpha_max"][1]
  # a finished run reloads from its final checkpoint without training
  again = trainer.train_and_evaluate(config, str(tmp_path / "b"), data=mnist1d, progress=False)
  assert again.step == 16
  assert again.history == resumed.history


def test_batchnorm_stats_only_from_clean_pass(mnist1d):
  """XSAM's ascent (K=2) and probe passes use batch stats but never touch the running stats."""
  data = mnist1d.subset(256, 128)
  _, graphdef, state = trainer.init_run(_tiny(**SHARED), data)
  x, y = data_lib.EpochBatches(data, seed=0, epoch=0, batch_size=32, augment=False)[0]
  fresh = lambda: nnx.merge(graphdef, jax.tree.map(jnp.copy, state))[0]
  batch_stats = lambda m: jax.tree.map(np.array, nnx.as_pure(nnx.state(m, nnx.BatchStat)))

  init_stats = batch_stats(fresh())
  # Reference: one clean forward pass in training mode at the initial params.
  ref_model = fresh()
  ref_model(x, train=True)
  ref_stats = batch_stats(ref_model)
  # What a leaking extra pass (at a perturbed point, after the clean pass) would have produced.
  leak_model = fresh()
  leak_model(x, train=True)
  nnx.update(leak_model, jax.tree.map(lambda p: p + 0.1 * jnp.sign(p), nnx.state(leak_model, nnx.Param)))
  leak_model(x, train=True)
  leak_stats = batch_stats(leak_model)

  new_state, metrics = trainer.train_step(graphdef, state, x, y)
  new_model, new_opt = nnx.merge(graphdef, new_state)
  # the first call probes: the probe passes did run
  assert float(nnx.as_pure(new_opt.opt_state)[0].probe_losses.sum()) > 0
  assert "alpha" in metrics
  assert "theta" in metrics
  leaves = [jax.tree.leaves(t) for t in (batch_stats(new_model), ref_stats, init_stats, leak_stats)]
  assert len(leaves[0]) == 6  # mean and var of three BatchNorm layers
  # The jitted train step against an eager forward pass: two programs, rounded differently. A stored
  # stat is m * init + (1 - m) * the batch's (m = 0.9), and a layer's batch stats chain the layers
  # before it: per layer a convolution (fan-in <= 12), BatchNorm's sums over batch x length (<= 32 x 20)
  # and a few elementwise ops: under 1200 rounding steps (tests/tolerances.py). They round activations
  # within 10 times their root mean square (E h^2 = var + mean^2 of the batch), or its square for a
  # variance, and the (1 - m) factor scales the error down.
  m = 0.9
  batch = lambda stored, init: (np.asarray(stored, np.float64) - m * init) / (1 - m)
  means, variances = leaves[1][0::2], leaves[1][1::2]  # sorted keys: mean before var per layer
  assert len(means) == len(variances) == 3
  rms = [np.sqrt(np.max(batch(v, 1.0) + batch(mu, 0.0) ** 2)) for mu, v in zip(means, variances, strict=True)]
  for i, (got, ref, init, leak) in enumerate(zip(*leaves, strict=True)):
    scale = 10 * rms[i // 2] if i % 2 == 0 else (10 * rms[i // 2]) ** 2
    tol = (1 - m) * f32_bound(scale, n_ops=1200)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    assert not np.allclose(got, init)  # the clean pass did update them
    assert np.max(np.abs(ref - leak)) > 2 * tol  # the check can tell a leak


def test_train_step_compiled_once_for_all_steps_and_seeds(mnist1d):
  config = _tiny(**SHARED)
  before = trainer.train_step._cache_size()
  first = trainer.train_and_evaluate(config, None, data=mnist1d, progress=False)
  after_first = trainer.train_step._cache_size()
  assert after_first - before <= 1  # 0 if another test already compiled it
  second = trainer.train_and_evaluate(config.replace(seed=1), None, data=mnist1d, progress=False)
  assert first.step == second.step == 16
  assert trainer.train_step._cache_size() == after_first


def test_training_learns_on_digits():
  result = trainer.train_and_evaluate(
    TrainConfig(dataset="digits", model="mlp", method="sgd", epochs=3, width=8, batch_size=32),
    None,
    progress=False,
  )
  assert result.history["test_accuracy"][-1] > 0.8


def test_tfds_mock_cifar10_trains(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  try:
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
      data = data_lib.load_tfds("cifar10", str(tmp_path))
  except ImportError as e:
    pytest.skip(f"tensorflow-datasets cannot mock cifar10 without TensorFlow here: {e}")
  config = TrainConfig(dataset="cifar10", method="sgd", width=4, epochs=1, batch_size=8)
  result = trainer.train_and_evaluate(config, None, data=data, progress=False)
  assert result.config.augment is True
  assert result.config.model == "cnn2d"
  assert result.step == 4
  assert np.isfinite(result.history["train_loss"][0])


def test_resnet18_shapes_abstractly():
  model = nnx.eval_shape(lambda: models.make_model("resnet18", (32, 32, 3), 100))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 11_000_000 < n_params < 11_400_000
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(
    lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  )
  assert out.shape == (2, 100)


def test_flags_given_explicitly_win_over_quick():
  """Even when given with their full-run default value (--epochs 60 is the default)."""
  d, q = TrainConfig.default(), TrainConfig.quick()
  args = train.parse_args(["--quick", "--epochs", "60", "--batch-size", "100", "--seeds", "3", "--no-augment"])
  config = train.config_from_args(args)
  assert (config.epochs, config.batch_size, config.augment) == (d.epochs, d.batch_size, False)
  assert (config.width, config.train_subset, config.test_subset) == (q.width, q.train_subset, q.test_subset)
  assert train.seeds_from_args(args) == [0, 1, 2]
  quick = train.parse_args(["--quick", "--seed0", "5"])
  assert train.config_from_args(quick) == q
  assert train.seeds_from_args(quick) == [5]
  full = train.parse_args(["--width", "16"])
  assert train.config_from_args(full) == d.replace(width=16)
  assert train.seeds_from_args(full) == [0, 1, 2]


def test_single_device_fingerprints_unchanged_by_devices_option():
  """Checkpoints of runs made before --devices existed still resume; N > 1 runs keep their own.

  (XSAM's: SGD's and SAM's run ids now leave out the fields they do not read,
  see tests/test_train_cli.py.)
  """
  assert TrainConfig.default().fingerprint() == "293517fbda"
  assert TrainConfig.quick().fingerprint() == "d2af170499"
  xsam_unused = methods.unused_fields("xsam")
  assert TrainConfig.default().replace(method="xsam").fingerprint(ignore=xsam_unused) == "da65149922"
  assert TrainConfig.quick().replace(method="xsam").fingerprint(ignore=xsam_unused) == "4a2dc49e3b"
  assert TrainConfig.default().replace(devices=8).fingerprint() != "293517fbda"
  assert train.config_from_args(train.parse_args([])).devices == 1
  assert TrainConfig.default().replace(alpha_refinement="parabola").fingerprint() != "293517fbda"


def test_alpha_grid_and_refinement_flags_reach_xsam():
  args = train.parse_args(["--alphas", "0,0.5,1,1.5,2", "--alpha-refinement", "parabola"])
  config = train.config_from_args(args)
  assert config.alphas == (0.0, 0.5, 1.0, 1.5, 2.0)
  assert config.alpha_refinement == "parabola"
  state = methods.method_transform(config.replace(method="xsam", rho_max=0.2, alpha_update_period=1)).init(
    {"w": jnp.ones(3)}
  )
  assert state.probe_losses.shape == (5,)
  with pytest.raises(SystemExit):
    train.parse_args(["--alpha-refinement", "cubic"])


def test_method_table_and_chain():
  assert set(methods.METHODS) >= {"sgd", "sam", "xsam"}
  config = checks.resolve(_tiny(method="xsam"), data_lib.load_digits())
  assert config.rho_max == pytest.approx(2 * config.rho)
  assert config.alpha_update_period == 1437 // 32
  assert config.probe_batch_size == 1
  tx = methods.make_optimizer(config, 10)
  assert tx is methods.make_optimizer(config.replace(seed=3), 10)  # shared across seeds
  state = tx.init({"w": jnp.ones(3)})
  assert isinstance(state[0], xsam_jax.XSAMState)
  assert methods.method_transform(config.replace(method="sgd")) is None
  assert methods.is_known("sam")
  assert not methods.is_known("no_such_method")
  with pytest.raises(ValueError, match="unknown method"):
    methods.method_transform(config.replace(method="no_such_method"))
  # sgd: the same chain without a method transformation
  sgd = methods.make_optimizer(config.replace(method="sgd"), 10)
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.5])}
  updates, _ = sgd.update(g, sgd.init(p), p)
  expected = -config.learning_rate * (g["w"] + config.weight_decay * p["w"])
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  assert isinstance(sgd, optax.GradientTransformation)
