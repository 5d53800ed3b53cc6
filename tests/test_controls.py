"""Training controls of every method (docs/controls.md): rho schedules, ``perturb_mask``,
``perturb_every`` / ``perturb_start``, and the ``perturbed_loss`` kept in every state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference, registry
from tests.test_reference_sam_xsam import HP, _jax_train
from tests.tolerances import assert_trees_close, assert_trees_equal, f32_bound

NO_BIASES = {"b1": False, "b2": False, "w1": True, "w2": True}
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


def _steps(tx, params, loss_fn, n):
  """``n`` jitted steps of ``tx`` alone (no base optimizer: the output is what is compared).

  Returns the list of (g_0, output, state) per step; params move by ``-0.05 * output``.
  """
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p, loss_fn=loss_fn)
    return jax.tree.map(lambda w, x: w - 0.05 * x, p, u), s, g, u

  out = []
  for _ in range(n):
    params, state, g, u = step(params, state)
    out.append((g, u, state))
  return out


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
  ("make", "value"),
  [
    (xsam_jax.sam, 0.1),
    (lambda r: xsam_jax.sam(r, num_steps=3), 0.1),
    (lambda r: xsam_jax.xsam(r, 1.0, alpha_update_period=2, alphas=ALPHAS), 0.1),
    (lambda r: xsam_jax.xsam(0.1, r, alpha_update_period=2, alphas=ALPHAS), 1.0),
  ],
  ids=["sam", "sam_k3", "xsam_rho", "xsam_rho_max"],
)
def test_constant_schedule_is_the_scalar_bitwise(make, value):
  params, loss_fn = problems.mlp_problem(seed=3)
  plain = _steps(make(value), params, loss_fn, 4)
  scheduled = _steps(make(optax.constant_schedule(value)), params, loss_fn, 4)
  assert_trees_equal(plain, scheduled)


def _linear_rho(count):
  return float(optax.linear_schedule(0.4, 0.1, 4)(count))  # optax schedules are float32: the exact value used


@pytest.mark.parametrize("k_steps", [1, 3])
def test_linear_rho_schedule_matches_float64_reference(k_steps):
  problem, p0 = problems.mlp_data(seed=21)
  tx = xsam_jax.sam(optax.linear_schedule(0.4, 0.1, 4), num_steps=k_steps)
  got, _, _ = _jax_train(tx, problem, p0, 6)
  want, _ = reference.run(
    reference.MLP.flatten(p0),
    6,
    lambda w, c, s: (reference.sam_output(problem.grad, w, _linear_rho(c), k_steps), s),
    lr=HP["lr"],
    momentum=HP["momentum"],
    wd=HP["wd"],
  )
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_xsam_rho_and_rho_max_schedules_match_float64_reference():
  problem, p0 = problems.mlp_data(seed=22)
  rho_max = optax.linear_schedule(1.0, 0.5, 5)
  tx = xsam_jax.xsam(optax.linear_schedule(0.4, 0.1, 4), rho_max, alpha_update_period=2, alphas=ALPHAS)
  got, _, _alphas = _jax_train(tx, problem, p0, 6)

  def output(w, count, alpha):
    out, alpha = reference.xsam_output(
      problem.loss, problem.grad, w, _linear_rho(count), 1, float(rho_max(count)), ALPHAS, alpha, count % 2 == 0
    )
    return out, alpha

  want, _ = reference.run(
    reference.MLP.flatten(p0), 6, output, lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"], state=1.0
  )
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_rho_schedule_from_lr_is_proportional_and_clamped():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.2, warmup_steps=20, decay_steps=200, end_value=0.01)
  rho = xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05)
  steps = np.arange(0, 260)
  got = np.asarray(jax.vmap(rho)(jnp.asarray(steps)))
  want = 0.05 * np.asarray(jax.vmap(lr)(jnp.asarray(steps)), np.float64) / 0.2
  np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float32).eps, atol=1e-9)
  assert got[20] == np.float32(0.05)
  assert got[0] == 0.0
  # lr below lr_min during warm-up: the GSAM formula would go negative; the clamp holds rho_min.
  lifted = xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05, rho_min=0.01, lr_min=0.05)
  vals = np.asarray(jax.vmap(lifted)(jnp.asarray(steps)))
  assert vals.min() == np.float32(0.01)
  assert vals.max() == np.float32(0.05)
  assert np.all(vals[:5] == np.float32(0.01))  # lr(t) < 0.05 there
  np.testing.assert_allclose(vals[12], 0.01 + 0.04 * (float(lr(12)) - 0.05) / 0.15, rtol=1e-6)
  # An explicit lr_max skips the search and sets the scale.
  half = xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05, lr_max=0.4)
  np.testing.assert_allclose(float(half(20)), 0.025, rtol=1e-6)
  assert float(xsam_jax.rho_schedule_from_lr(0.1, rho_max=0.03)(7)) == np.float32(0.03)


def test_rho_schedule_drives_training():
  params, loss_fn = problems.mlp_problem(seed=4)
  rho = xsam_jax.rho_schedule_from_lr(optax.linear_schedule(0.0, 0.1, 3), rho_max=0.1)
  out = _steps(xsam_jax.sam(rho), params, loss_fn, 2)
  # Step 0: lr = 0, so rho = 0: no perturbation, the output is g_0 recomputed at w.
  assert_trees_close(out[0][1], out[0][0], n_ops=problems.LOSS_OPS)
  assert not np.allclose(np.asarray(out[1][1]["w1"]), np.asarray(out[1][0]["w1"]))


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(rho=lambda t: -0.1 + 0.0 * t), "rho(0)"),
    (dict(rho=lambda t: jnp.nan + 0.0 * t), "rho(0)"),
    (dict(rho=lambda: 0.1), "rho"),
    (dict(rho=0.1, perturb_every=0), "perturb_every"),
    (dict(rho=0.1, perturb_every=1.5), "perturb_every"),
    (dict(rho=0.1, perturb_start=-1), "perturb_start"),
    (dict(rho=0.1, perturb_start=True), "perturb_start"),
  ],
)
def test_bad_controls_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name.replace('(', '[(]').replace(')', '[)]')}`"):
    xsam_jax.sam(**kwargs)


def test_bad_rho_schedule_from_lr_arguments():
  lr = optax.constant_schedule(0.1)
  with pytest.raises(ValueError, match="`rho_min`"):
    xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05, rho_min=0.1)
  with pytest.raises(ValueError, match="`rho_max`"):
    xsam_jax.rho_schedule_from_lr(lr, rho_max=0.0)
  with pytest.raises(ValueError, match="`lr_max`"):
    xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05, lr_min=0.2)


def test_xsam_rho_max_schedule_is_checked():
  with pytest.raises(ValueError, match="`rho_max"):
    xsam_jax.xsam(0.1, lambda t: -1.0 + 0.0 * t)


# --------------------------------------------------------------------------- perturb_mask


@pytest.mark.parametrize("case", ["sam", "xsam", "vasso", "eigen_sam", "msam_plus_k2", "gsam"])
def test_all_false_mask_is_g0_without_a_pass(case):
  params, loss_fn = problems.mlp_problem(seed=5)
  calls = []

  def counted(p):
    calls.append(1)
    return loss_fn(p)

  tx = _with_controls(case, perturb_mask=jax.tree.map(lambda _: False, params))
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)
  u, new = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=counted))(g, state, params)
  assert_trees_equal(u, g)
  assert calls == [], "the all-False mask traced loss_fn"
  assert int(new.count) == 1


def _with_controls(case, **controls):
  """A registry case built again with the given controls (its hyperparameters kept)."""
  factory, kwargs, _ = registry.INJECT.get(case, (None, None, None))
  if factory is not None:
    return factory(**kwargs, **controls)
  return {
    "msam_plus_k2": lambda: xsam_jax.msam(0.1, num_steps=2, plus=True, **controls),
  }[case]()


@pytest.mark.parametrize("case", ["sam", "xsam", "vasso"])
def test_all_true_mask_is_no_mask_bitwise(case):
  params, loss_fn = problems.mlp_problem(seed=6)
  plain = _steps(_with_controls(case), params, loss_fn, 3)
  masked = _steps(_with_controls(case, perturb_mask=jax.tree.map(lambda _: True, params)), params, loss_fn, 3)
  assert_trees_equal(plain, masked)


@pytest.mark.parametrize("k_steps", [1, 2])
def test_masked_sam_matches_float64_reference(k_steps):
  problem, p0 = problems.mlp_data(seed=23)
  tx = xsam_jax.sam(HP["rho"], num_steps=k_steps, perturb_mask=NO_BIASES)
  got, _, _ = _jax_train(tx, problem, p0, 5)
  mask = reference.flat_mask(problem, NO_BIASES)
  want, _ = reference.run(
    reference.MLP.flatten(p0),
    5,
    lambda w, c, s: (reference.sam_output(problem.grad, w, HP["rho"], k_steps, mask=mask), s),
    lr=HP["lr"],
    momentum=HP["momentum"],
    wd=HP["wd"],
  )
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  unmasked, _, _ = _jax_train(xsam_jax.sam(HP["rho"], num_steps=k_steps), problem, p0, 5)
  assert np.max(np.abs(unmasked - got)) > 1e-4  # the mask matters on this problem


@pytest.mark.parametrize("k_steps", [1, 2])
def test_masked_xsam_matches_float64_reference(k_steps):
  problem, p0 = problems.mlp_data(seed=24)
  mask_tree = {"b1": True, "b2": False, "w1": False, "w2": True}
  tx = xsam_jax.xsam(HP["rho"], 1.0, num_steps=k_steps, alpha_update_period=2, alphas=ALPHAS, perturb_mask=mask_tree)
  got, _, alphas = _jax_train(tx, problem, p0, 5)
  mask = reference.flat_mask(problem, mask_tree)

  def output(w, count, alpha):
    return reference.xsam_output(
      problem.loss, problem.grad, w, HP["rho"], k_steps, 1.0, ALPHAS, alpha, count % 2 == 0, mask=mask
    )

  want, alpha = reference.run(
    reference.MLP.flatten(p0), 5, output, lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"], state=1.0
  )
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert alphas[-1] == alpha


def test_mask_callable_and_state_on_perturbed_leaves():
  params, loss_fn = problems.mlp_problem(seed=7)
  tx = xsam_jax.vasso(0.1, perturb_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  state = tx.init(params)
  assert sorted(k for k, v in state.ema.items() if v is not None) == ["w1", "w2"]
  out = _steps(tx, params, loss_fn, 2)
  assert np.isfinite(float(out[-1][2].perturbed_loss))


def test_bad_mask_names_perturb_mask():
  params, _loss_fn = problems.mlp_problem(seed=8)
  tx = xsam_jax.sam(0.1, perturb_mask={"w1": True})
  with pytest.raises(ValueError, match="perturb_mask"):
    tx.init(params)
  tx = xsam_jax.sam(0.1, perturb_mask=lambda p: jax.tree.map(lambda x: jnp.ones(x.shape, bool), p))
  with pytest.raises(ValueError, match=r"perturb_mask\(params\)"):
    tx.init(params)


# --------------------------------------------------------------------------- perturb_every / perturb_start


def _perturbs(count, every, start):
  return count >= start and (count - start) % every == 0


def test_skipped_steps_output_g0_and_run_no_pass():
  params, loss_fn = problems.mlp_problem(seed=9)
  evaluations = []

  def counted(p):
    jax.debug.callback(lambda: evaluations.append(1))
    return loss_fn(p)

  tx = xsam_jax.sam(0.1, perturb_every=3, perturb_start=2)
  plain = xsam_jax.sam(0.1)
  state, plain_state = tx.init(params), plain.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=counted))
  plain_step = jax.jit(lambda g, s, p: plain.update(g, s, p, loss_fn=loss_fn))
  last_loss = 0.0
  for count in range(9):
    g = jax.grad(loss_fn)(params)
    before = len(evaluations)
    u, state = step(g, state, params)
    jax.effects_barrier()
    if _perturbs(count, 3, 2):
      assert len(evaluations) - before == 1, count  # one ascent pass
      want, plain_state = plain_step(g, plain_state, params)
      assert_trees_close(u, want, n_ops=2 * problems.LOSS_OPS + problems.NUM_PARAMS)
      assert float(state.perturbed_loss) != last_loss
    else:
      assert len(evaluations) == before, count
      assert_trees_equal(u, g)
      assert float(state.perturbed_loss) == last_loss  # kept from the last perturbed step
    last_loss = float(state.perturbed_loss)
    assert int(state.count) == count + 1
    params = jax.tree.map(lambda w, x: w - 0.05 * x, params, u)


def test_xsam_alpha_schedule_counts_perturbed_steps():
  params, loss_fn = problems.mlp_problem(seed=12)
  tx = xsam_jax.xsam(0.1, 1.0, alpha_update_period=2, alphas=ALPHAS, perturb_every=2)
  out = _steps(tx, params, loss_fn, 9)
  probes = [np.asarray(s.probe_losses) for _, _, s in out]
  changed = [c for c in range(9) if not np.array_equal(probes[c], probes[c - 1] if c else np.zeros(len(ALPHAS)))]
  # Perturbed steps 0, 2, 4, 6, 8 are perturbed steps number 0..4; every 2nd of those probes.
  assert changed == [0, 4, 8]


def test_traced_perturb_every_under_inject_hyperparams():
  params, loss_fn = problems.mlp_problem(seed=13)
  tx = optax.inject_hyperparams(xsam_jax.sam, static_args=("num_steps",))(rho=0.1, perturb_every=2)
  out = _steps(tx, params, loss_fn, 4)
  for count, (g, u, _) in enumerate(out):
    if count % 2:
      assert_trees_equal(u, g)
    else:
      assert not np.array_equal(np.asarray(u["w1"]), np.asarray(g["w1"]))


# --------------------------------------------------------------------------- perturbed_loss


@pytest.mark.parametrize("k_steps", [1, 3])
def test_perturbed_loss_is_the_loss_at_the_ascent_point(k_steps):
  problem, p0 = problems.mlp_data(seed=25)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    loss_fn = problems.mlp_loss_fn(problem, jnp.float64)
    tx = xsam_jax.sam(0.3, num_steps=k_steps)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
    _, state = update(jax.grad(loss_fn)(params), tx.init(params), params)
    got = float(state.perturbed_loss)
  w = reference.MLP.flatten(p0)
  _, d = reference.ascent(problem.grad, w, problem.grad(w), 0.3, k_steps)
  want = problem.loss(w + d)
  assert abs(got - want) <= f32_bound(want, n_ops=1)  # stored in float32: one rounding
  assert want > problem.loss(w)


def test_perturbed_loss_is_the_replicas_mean():
  problem, p0 = problems.mlp_data(seed=26)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  batch = problems.mlp_batch(problem)
  shards = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), batch)
  tx, global_tx = xsam_jax.sam(0.2, axis_name="i"), xsam_jax.sam(0.2)

  def replica(b):
    loss_fn = lambda p: problems.mlp_batch_loss(p, b)
    _, s = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    return s.perturbed_loss

  per_replica = jax.jit(jax.vmap(replica, axis_name="i"))(shards)
  loss_fn = lambda p: problems.mlp_batch_loss(p, batch)
  _, s = global_tx.update(jax.grad(loss_fn)(params), global_tx.init(params), params, loss_fn=loss_fn)
  np.testing.assert_array_equal(per_replica, np.full(4, per_replica[0]))
  assert abs(float(per_replica[0]) - float(s.perturbed_loss)) <= f32_bound(
    s.perturbed_loss, n_ops=problems.LOSS_OPS * 2
  )


@pytest.mark.parametrize("m_sharpness", [False, True], ids=["global", "m_sharpness"])
def test_skipped_steps_average_g0_over_axis_name(m_sharpness):
  """A skipped step's output is the replicas' mean g_0: replicas agree, and (without m-sharpness) equal one device."""
  problem, p0 = problems.mlp_data(seed=27)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  batch = problems.mlp_batch(problem)
  shards = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), batch)
  tx = xsam_jax.sam(0.2, axis_name="i", perturb_every=2, m_sharpness=m_sharpness)

  def replica(b, count):
    loss_fn = lambda p: problems.mlp_batch_loss(p, b)
    state = tx.init(params)._replace(count=count)
    return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)[0]

  run = jax.jit(jax.vmap(replica, in_axes=(0, None), axis_name="i"))
  loss_fn = lambda p: problems.mlp_batch_loss(p, batch)
  g0 = jax.grad(loss_fn)(params)
  skipped = run(shards, jnp.int32(1))
  for leaf, g in zip(jax.tree.leaves(skipped), jax.tree.leaves(g0), strict=True):
    np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))  # identical replicas
    # the mean of 4 shard gradients against the full batch's: a mean over 16 examples either way
    np.testing.assert_allclose(leaf[0], g, atol=f32_bound(g, n_ops=problems.LOSS_OPS))


@pytest.mark.parametrize("case", ["xsam", "gsam", "eigen_sam"])
def test_donated_state_with_skipped_steps(case):
  params, loss_fn = problems.mlp_problem(seed=15)
  tx = _with_controls(case, perturb_every=2)
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(p, s):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  for _ in range(3):
    params, state = step(params, state)
  assert int(state.count) == 3
