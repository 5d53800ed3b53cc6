"""Random weight perturbation (xsam_jax.rwp): an independent float64 reference of the authors' update, the
exact base behaviour at gamma = 0 or alpha = 0, the PRNG key, the usages the docstring promises, and
hostile inputs. The shared checks (jit, dtypes, extreme gradients, inject_hyperparams) are in the battery
(tests/registry.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.test_reference_sam_xsam import HP, _run_jax
from tests.tolerances import EPS32, assert_trees_equal, f32_bound
from xsam_jax._src.rwp import filter_norms

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])


# --- The reference: the authors' update (github.com/nblt/RWP, train_rwp_parallel.py) in numpy float64 on flat
# vectors, written from their code, sharing nothing with the library. Their noise for a weight `mp` of
# PyTorch layout (out, ...): torch.normal(0, gamma * |mp[o]|) per output filter o; for a 1-D leaf
# gamma * (|mp| + 1e-16); their gradient is DDP's mean of 2 (1 - alpha) g(w) and 2 alpha g(w + noise). ---


def _ref_noise(w, z, gamma, shapes, filter_axis):
  """The noise on the flat params ``w``: the standard normals ``z`` (flat) times gamma times the norm of each
  output filter (the slices along ``filter_axis``) of every weight, of the whole leaf for a bias."""
  out, i = [], 0
  for k in reference.KEYS:
    shape = shapes[k]
    n = int(np.prod(shape))
    leaf, zk = w[i : i + n].reshape(shape), z[i : i + n].reshape(shape)
    if len(shape) > 1:
      rows = np.moveaxis(leaf, filter_axis, 0).reshape(shape[filter_axis], -1)  # one row per output filter
      std = gamma * np.sqrt((rows**2).sum(axis=1))
      noise = np.moveaxis(
        np.moveaxis(zk, filter_axis, 0) * std.reshape((-1,) + (1,) * (len(shape) - 1)), 0, filter_axis
      )
    else:
      noise = zk * gamma * np.sqrt((leaf**2).sum())  # the authors' + 1e-16 moves nothing at float64 here
    out.append(noise.ravel())
    i += n
  return np.concatenate(out)


def _ref_output(grad, w, noise, alpha):
  """(1 - alpha) g(w) + alpha g(w + noise): the mean of the clean rank's 2 (1 - alpha) g and the perturbed
  rank's 2 alpha g."""
  return 0.5 * (2 * (1 - alpha) * grad(w) + 2 * alpha * grad(w + noise))


def _draws(seed, steps, shapes, dtype):
  """The standard normals the library draws (its docstring's recipe), flat, as float64: per step split the
  key into (next, draw) and draw leaf i (jax.tree.leaves order: reference.KEYS) from fold_in(draw, i)."""
  key, out = jax.random.PRNGKey(seed), []
  for _ in range(steps):
    key, draw = jax.random.split(key)
    leaves = [jax.random.normal(jax.random.fold_in(draw, i), shapes[k], dtype) for i, k in enumerate(reference.KEYS)]
    out.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]))
  return out


def _ref_train(problem, p0, gamma, alpha, zs, filter_axis=-1, steps=STEPS):
  def output_fn(w, count, state):
    noise = _ref_noise(w, zs[count], gamma, problem.shapes, filter_axis)
    return _ref_output(problem.grad, w, noise, alpha), state

  w, _ = reference.run(reference.MLP.flatten(p0), steps, output_fn, **BASE)
  return w


def _jax_train(tx0, problem, p0, dtype, steps=STEPS):
  """``steps`` jitted steps of chain(tx0, add_decayed_weights, sgd(momentum)) in ``dtype``; flat params."""
  with jax.enable_x64(dtype == jnp.float64):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), p0)
    out, state, _ = _run_jax(tx0, params, problems.mlp_loss_fn(problem, dtype), steps)
    return reference.MLP.flatten(jax.tree.map(np.asarray, out)), state


@pytest.mark.parametrize(
  ("alpha", "filter_axis"), [(0.5, -1), (0.3, 0), (1.0, -1)], ids=["alpha0.5", "alpha0.3-torch-layout", "pure-rwp"]
)
def test_matches_float64_reference(alpha, filter_axis):
  problem, p0 = problems.mlp_data(seed=41)
  gamma, seed = 0.2, 7
  with jax.enable_x64(True):
    zs = _draws(seed, STEPS, problem.shapes, jnp.float64)
  w, state = _jax_train(xsam_jax.rwp(gamma, alpha=alpha, seed=seed, filter_axis=filter_axis), problem, p0, jnp.float64)
  w_ref = _ref_train(problem, p0, gamma, alpha, zs, filter_axis)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  # The test sees the noise: without it (gamma = 0) the run is far from this one.
  assert np.max(np.abs(_ref_train(problem, p0, 0.0, alpha, zs) - w_ref)) > 1e-4
  assert int(state[0].count) == STEPS


def _hessian_norm(problem, w, h=1e-5):
  """The spectral norm of the loss's Hessian at ``w`` (central differences of the float64 gradient)."""
  n = w.size
  cols = [(problem.grad(w + h * e) - problem.grad(w - h * e)) / (2 * h) for e in np.eye(n)]
  hess = np.stack(cols, axis=1)
  return float(np.max(np.abs(np.linalg.eigvalsh(0.5 * (hess + hess.T)))))


def test_float32_matches_float64_reference_to_rounding():
  """Three float32 steps against the float64 reference fed the same (float32) normal draws.

  The bound (tests/tolerances.py): per step the output is two gradients (each LOSS_OPS roundings of the
  output's size M) and a 3-op mix; the noise takes a filter norm (NUM_PARAMS terms at most), a scaling and
  two products, and w + eps one more rounding of |w|: an error in the evaluation point of at most
  (NUM_PARAMS + 8) eps |w| per entry, which the gradient turns into ||H|| sqrt(NUM_PARAMS) times that.
  SGD with momentum sums the outputs with weights lr (1 + 1.9 + 2.71) < 0.3, plus a rounding of the params
  per step; the error fed back through the next steps' gradients (lr ||H|| < 1 here, checked) at most
  doubles the total.
  """
  problem, p0 = problems.mlp_data(seed=42)
  gamma, alpha, seed, steps = 0.2, 0.5, 5, 3
  zs = _draws(seed, steps, problem.shapes, jnp.float32)
  w, _ = _jax_train(xsam_jax.rwp(gamma, alpha=alpha, seed=seed), problem, p0, jnp.float32, steps=steps)
  w_ref = _ref_train(problem, p0, gamma, alpha, zs, steps=steps)

  w0 = reference.MLP.flatten(p0)
  hess = _hessian_norm(problem, w0)
  assert HP["lr"] * hess < 1.0
  out0 = _ref_output(problem.grad, w0, _ref_noise(w0, zs[0], gamma, problem.shapes, -1), alpha)
  m_w = 2 * np.max(np.abs(w0))  # |w + eps| over the three steps (gamma = 0.2 of a filter's norm, small steps)
  m_out = 2 * np.max(np.abs(out0))
  out_err = f32_bound(m_out, n_ops=2 * problems.LOSS_OPS + 3)
  out_err += hess * np.sqrt(problems.NUM_PARAMS) * (problems.NUM_PARAMS + 8) * EPS32 * m_w
  tol = 2 * (0.3 * out_err + f32_bound(m_w, n_ops=steps))
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=tol)
  assert np.max(np.abs(_ref_train(problem, p0, 0.0, alpha, zs, steps=steps) - w_ref)) > 100 * tol  # sensitive


def _base():
  return (optax.add_decayed_weights(HP["wd"]), optax.sgd(HP["lr"], momentum=HP["momentum"]))


def _run(tx, params, loss_fn, steps, *, grads_fn=None):
  """``steps`` jitted steps; ``grads_fn(params)``: the incoming gradient (default ``jax.grad(loss_fn)``)."""
  grads_fn = jax.grad(loss_fn) if grads_fn is None else grads_fn

  @jax.jit
  def step(p, s):
    u, s = tx.update(grads_fn(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s, u

  state, outs = tx.init(params), []
  for _ in range(steps):
    params, state, u = step(params, state)
    outs.append(u)
  return params, state, outs


@pytest.mark.parametrize(
  "method",
  [
    lambda: xsam_jax.rwp(0.0),
    lambda: xsam_jax.rwp(0.1, alpha=0.0),
    lambda: xsam_jax.rwp(optax.constant_schedule(0.0), alpha=0.7),
    lambda: optax.inject_hyperparams(xsam_jax.rwp, static_args=("seed", "filter_axis"))(gamma=0.0, alpha=0.5),
  ],
  ids=["gamma0", "alpha0", "gamma-schedule0", "gamma0-injected"],
)
def test_gamma_or_alpha_zero_is_the_base_optimizer_bitwise(method):
  """gamma = 0 (no noise) or alpha = 0 (no weight on it): the chain is the base optimizer, bit for bit, over
  several steps, whether the zero is a constant, a schedule's value or an injected (traced) hyperparameter."""
  params, loss_fn = problems.mlp_problem(seed=43)
  p_base, _, u_base = _run(optax.chain(*_base()), params, loss_fn, 4)
  p_rwp, state, u_rwp = _run(optax.chain(method(), *_base()), params, loss_fn, 4)
  assert_trees_equal(u_rwp, u_base)
  assert_trees_equal(p_rwp, p_base)
  assert float(optax.tree.get(state, "perturbed_loss")) > 0.0  # the extra pass still ran (L(w + 0) = L(w))


def test_alpha_one_ignores_the_incoming_gradient():
  """alpha = 1 is plain RWP: the output is g_eps alone, so zeros may come in instead of g_0 (one gradient a
  step), bitwise the same run."""
  params, loss_fn = problems.mlp_problem(seed=44)
  tx = optax.chain(xsam_jax.rwp(0.1, alpha=1.0, seed=2), *_base())
  p_full, s_full, _ = _run(tx, params, loss_fn, 3)
  p_one, s_one, _ = _run(tx, params, loss_fn, 3, grads_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
  assert_trees_equal(p_one, p_full)
  assert_trees_equal(s_one, s_full)


def _quadratic_params():
  return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4000, 3)), jnp.float32), "b": jnp.zeros(3)}


def _quadratic(p):
  return 0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))


def test_noise_is_gaussian_with_filter_norm_scale():
  """On L = |w|^2 / 2, g(w + eps) - g(w) = eps: the noise, read off exactly. Each output unit (a column of
  the Flax kernel) has standard deviation gamma |w_f| (4000 draws: the sample std is within 3% at 1.3 sigma,
  5% is over 2 sigma), mean ~0; a zero filter (the bias) gets exactly no noise."""
  params, gamma = _quadratic_params(), 0.05
  tx = xsam_jax.rwp(gamma, alpha=1.0, seed=9)
  out, _ = tx.update(jax.grad(_quadratic)(params), tx.init(params), params, loss_fn=_quadratic)
  eps = np.asarray(out["w"], np.float64) - np.asarray(params["w"], np.float64)
  norms = np.linalg.norm(np.asarray(params["w"], np.float64), axis=0)
  np.testing.assert_allclose(eps.std(axis=0), gamma * norms, rtol=0.05)
  assert np.all(np.abs(eps.mean(axis=0)) < 4 * gamma * norms / np.sqrt(eps.shape[0]))
  np.testing.assert_array_equal(np.asarray(out["b"]), np.zeros(3))
  # filter_axis=0 (PyTorch layout): the same kernel, transposed, draws per row.
  t_params = {"w": params["w"].T, "b": params["b"]}
  tx0 = xsam_jax.rwp(gamma, alpha=1.0, seed=9, filter_axis=0)
  out0, _ = tx0.update(jax.grad(_quadratic)(t_params), tx0.init(t_params), t_params, loss_fn=_quadratic)
  eps0 = np.asarray(out0["w"], np.float64) - np.asarray(t_params["w"], np.float64)
  np.testing.assert_allclose(eps0.std(axis=1), gamma * norms, rtol=0.05)


def test_seed_determinism_and_the_key():
  params, loss_fn = problems.mlp_problem(seed=45)
  make = lambda seed: optax.chain(xsam_jax.rwp(0.1, seed=seed), *_base())
  p_a, s_a, _ = _run(make(4), params, loss_fn, 3)
  p_b, s_b, _ = _run(make(4), params, loss_fn, 3)
  assert_trees_equal(p_a, p_b)  # the same seed: the same run, bit for bit
  assert_trees_equal(s_a, s_b)
  p_c, _, _ = _run(make(5), params, loss_fn, 3)
  assert not np.allclose(jax.tree.leaves(p_a)[2], jax.tree.leaves(p_c)[2])
  # The key advances once a step: PRNGKey(seed) split three times, keeping the first half.
  key = jax.random.PRNGKey(4)
  for _ in range(3):
    key, _ = jax.random.split(key)
  np.testing.assert_array_equal(np.asarray(s_a[0].key), np.asarray(key))
  # Two steps never draw the same noise: successive outputs at the same params differ.
  tx = xsam_jax.rwp(0.1, seed=4)
  g = jax.grad(loss_fn)(params)
  s0 = tx.init(params)
  u1, s1 = tx.update(g, s0, params, loss_fn=loss_fn)
  u2, _ = tx.update(g, s1, params, loss_fn=loss_fn)
  u1_again, _ = tx.update(g, s0, params, loss_fn=loss_fn)
  assert_trees_equal(u1, u1_again)
  assert not np.allclose(np.asarray(u1["w1"]), np.asarray(u2["w1"]))


def test_a_key_is_a_seed_given_directly():
  """``key=PRNGKey(s)`` is ``seed=s`` bit for bit (one program: the key lives in the state); a typed key works;
  keys made inside ``vmap`` from each run's seed give each run its own noise."""
  params, loss_fn = problems.mlp_problem(seed=45)
  make = lambda **kw: optax.chain(xsam_jax.rwp(0.1, **kw), *_base())
  p_seed, s_seed, _ = _run(make(seed=4), params, loss_fn, 2)
  p_key, s_key, _ = _run(make(key=jax.random.PRNGKey(4)), params, loss_fn, 2)
  assert_trees_equal(p_seed, p_key)
  assert_trees_equal(s_seed, s_key)
  typed = xsam_jax.rwp(0.1, key=jax.random.key(4))
  g = jax.grad(loss_fn)(params)
  u, state = typed.update(g, typed.init(params), params, loss_fn=loss_fn)
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(state.key), jax.random.key_data(jax.random.split(jax.random.key(4))[0])
  )
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))

  def first_step(seed):
    tx = xsam_jax.rwp(0.1, alpha=1.0, key=jax.random.fold_in(jax.random.PRNGKey(0), seed))
    state = tx.init(params)
    return state.key, tx.update(g, state, params, loss_fn=loss_fn)[0]

  keys, outs = jax.vmap(first_step)(jnp.asarray([0, 1], jnp.int32))
  for i in range(2):
    np.testing.assert_array_equal(keys[i], jax.random.fold_in(jax.random.PRNGKey(0), i))
  assert not np.allclose(np.asarray(outs["w1"][0]), np.asarray(outs["w1"][1]))  # two runs, two noises


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(seed=3, key=jax.random.PRNGKey(3)), r"pass `seed` or `key`, not both"),
    (dict(key=5), r"`key` must be one PRNG key.*For an int, pass `seed=`"),
    (dict(key=jnp.zeros(2, jnp.int32)), r"`key` must be one PRNG key.*shape \(2,\) and dtype int32"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), r"`key` must be one PRNG key"),
    (dict(key=jax.random.split(jax.random.PRNGKey(0), 2)), r"`key` must be one PRNG key"),
  ],
  ids=["with-seed", "python-int", "int32", "two-typed", "two-raw"],
)
def test_a_bad_key_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.rwp(0.1, **kwargs)


def test_perturb_every_outputs_g0_and_keeps_the_key_on_other_steps():
  params, loss_fn = problems.mlp_problem(seed=46)
  tx = xsam_jax.rwp(0.1, seed=1, perturb_every=2)
  g = jax.grad(loss_fn)(params)
  update = jax.jit(lambda s: tx.update(g, s, params, loss_fn=loss_fn))
  s0 = tx.init(params)
  u0, s1 = update(s0)
  u1, s2 = update(s1)
  assert not np.allclose(np.asarray(u0["w1"]), np.asarray(g["w1"]))  # step 0 perturbs
  assert_trees_equal(u1, g)  # step 1 does not: g_0, no extra pass
  assert not np.array_equal(np.asarray(s1.key), np.asarray(s0.key))
  np.testing.assert_array_equal(np.asarray(s2.key), np.asarray(s1.key))


def test_two_halves_of_the_batch():
  """The authors' usage: g_0 on one half, loss_fn on the other; the output mixes the two halves' gradients
  with the perturbation on the second only."""
  problem, p0 = problems.mlp_data(seed=47)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  batch = problems.mlp_batch(problem)
  half_a = jax.tree.map(lambda x: x[:8], batch)
  half_b = jax.tree.map(lambda x: x[8:], batch)
  loss_b = lambda p: problems.mlp_batch_loss(p, half_b)
  g_a = jax.grad(problems.mlp_batch_loss)(params, half_a)
  tx = xsam_jax.rwp(0.1, alpha=0.5, seed=3)
  out, _ = jax.jit(lambda s: tx.update(g_a, s, params, loss_fn=loss_b))(tx.init(params))
  # The same noise (the key of the first step) on the second half by hand.
  _, draw = jax.random.split(jax.random.PRNGKey(3))
  leaves, treedef = jax.tree.flatten(params)
  eps = jax.tree.unflatten(
    treedef,
    [0.1 * filter_norms(w) * jax.random.normal(jax.random.fold_in(draw, i), w.shape) for i, w in enumerate(leaves)],
  )
  g_b = jax.grad(loss_b)(jax.tree.map(jnp.add, params, eps))
  expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, g_a, g_b)
  tol = f32_bound(*jax.tree.leaves(expected), n_ops=2 * problems.LOSS_OPS + problems.NUM_PARAMS + 4)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol)


def test_perturb_mask_leaves_out_leaves_and_mixes_their_gradients():
  """A leaf outside perturb_mask gets no noise; its output is the same mix of its gradients at w and at
  w + eps. On the quadratic, g(w + eps) = w + eps per leaf, so the unperturbed bias's output is its g_0."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.array([0.5, -1.0])}
  tx = xsam_jax.rwp(0.1, alpha=0.5, perturb_mask={"w": True, "b": False})
  out, _ = tx.update(jax.grad(_quadratic)(params), tx.init(params), params, loss_fn=_quadratic)
  np.testing.assert_allclose(np.asarray(out["b"]), np.asarray(params["b"]), rtol=1e-6)
  assert not np.allclose(np.asarray(out["w"]), 1.0)


def test_axis_name_matches_one_device():
  """Two replicas (vmap with axis_name) on the two halves of a batch: the same noise on both (the key is in
  the state), both gradients averaged, so the update is the one-device update on the whole batch."""
  problem, p0 = problems.mlp_data(seed=48)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  batch = problems.mlp_batch(problem)
  shards = jax.tree.map(lambda x: x.reshape(2, 8, *x.shape[1:]), batch)
  tx_one, tx_par = xsam_jax.rwp(0.1, seed=6), xsam_jax.rwp(0.1, seed=6, axis_name="i")
  loss_all = lambda p: problems.mlp_batch_loss(p, batch)
  want, _ = tx_one.update(jax.grad(loss_all)(params), tx_one.init(params), params, loss_fn=loss_all)

  def replica(shard):
    loss = lambda p: problems.mlp_batch_loss(p, shard)
    return tx_par.update(jax.grad(loss)(params), tx_par.init(params), params, loss_fn=loss)[0]

  got = jax.vmap(replica, axis_name="i")(shards)
  tol = f32_bound(*jax.tree.leaves(want), n_ops=2 * problems.LOSS_OPS + problems.NUM_PARAMS + 4)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), rtol=0, atol=tol)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_filter_norms_are_finite_and_exact_at_the_extremes():
  big = jnp.full((4, 3), 1.5e38, jnp.float32)  # |w_f| = 3e38: representable, but every square overflows
  np.testing.assert_allclose(np.asarray(filter_norms(big)), np.full((1, 3), 3e38), rtol=4 * EPS32 * 8)
  assert np.all(np.isinf(np.asarray(jnp.sqrt(jnp.sum(big**2, axis=0)))))  # the naive norm overflows
  assert np.all(np.isinf(np.asarray(filter_norms(jnp.full((2, 3), 3e38, jnp.float32)))))  # 4.2e38: no float32
  np.testing.assert_array_equal(np.asarray(filter_norms(jnp.zeros((2, 3)))), np.zeros((1, 3)))
  np.testing.assert_array_equal(np.asarray(filter_norms(jnp.zeros(()))), 0.0)
  small = jnp.full((4,), 1e-30, jnp.float32)  # squares below float32's smallest number
  np.testing.assert_allclose(np.asarray(filter_norms(small)), [2e-30], rtol=4 * EPS32 * 8)
  tiny = jnp.full((4,), 1e-40, jnp.float32)  # subnormal entries: a finite norm (0 if XLA flushes them)
  assert np.all(np.isfinite(np.asarray(filter_norms(tiny))))
  assert filter_norms(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.float32


def test_noise_of_huge_filters_is_finite():
  """gamma |w_f| z for a filter of norm 3e38 is formed as (gamma r z) 2^e: finite, of the right size."""
  params = {"w": jnp.full((4, 3), 1.5e38, jnp.float32)}
  linear = lambda p: jnp.sum(1e-30 * p["w"])  # a gradient that does not depend on w
  tx = xsam_jax.rwp(1e-3, alpha=1.0, seed=0)
  out, state = tx.update(jax.grad(linear)(params), tx.init(params), params, loss_fn=linear)
  assert np.all(np.isfinite(np.asarray(out["w"])))
  assert np.isfinite(float(state.perturbed_loss))


def test_zero_params_and_huge_losses_stay_finite():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = xsam_jax.rwp(0.5, seed=1)
  out, state = tx.update(jax.grad(_quadratic)(params), tx.init(params), params, loss_fn=_quadratic)
  assert_trees_equal(out, jax.tree.map(jnp.zeros_like, params))  # zero filters: no noise, no NaN
  assert float(state.perturbed_loss) == 0.0
  # A non-finite gradient passes through (for optax.apply_if_finite to see); the count advances but the key
  # is kept, so the draws after a skipped bad batch are those of a run without it
  # (tests/test_script_traps.py: one NaN batch costs one step).
  bad = lambda p: jnp.float32(jnp.inf) * _quadratic(p)
  out, state2 = tx.update(jax.tree.map(lambda x: x + jnp.nan, params), state, params, loss_fn=bad)
  assert not np.all(np.isfinite(np.asarray(out["w"])))
  assert int(state2.count) == 2
  assert np.array_equal(np.asarray(state2.key), np.asarray(state.key))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(gamma=-0.1), r"`gamma` must be a finite real number >= 0"),
    (dict(gamma=float("nan")), r"`gamma` must be a finite real number >= 0"),
    (dict(gamma=float("inf")), r"`gamma` must be a finite real number >= 0"),
    (dict(gamma=jnp.ones(2)), r"`gamma` must be .* got an array of shape \(2,\)"),
    (dict(gamma=True), r"`gamma` must be .* got the bool"),
    (dict(gamma=lambda count: -1.0), r"`gamma\(0\)` must be a finite real number >= 0"),
    (dict(gamma=0.1, alpha=1.5), r"`alpha` must be a real number in \[0, 1\]"),
    (dict(gamma=0.1, alpha=-0.1), r"`alpha` must be a real number in \[0, 1\]"),
    (dict(gamma=0.1, alpha=float("nan")), r"`alpha` must be a real number in \[0, 1\]"),
    (dict(gamma=0.1, seed=-1), r"`seed` must be an int >= 0"),
    (dict(gamma=0.1, seed=2**63), r"`seed` must be an int in \[0, 9223372036854775807\]"),
    (dict(gamma=0.1, seed=1.5), r"`seed` must be a Python int >= 0"),
    (dict(gamma=0.1, filter_axis=1), r"`filter_axis` must be -1 .* or 0"),
    (dict(gamma=0.1, filter_axis=True), r"`filter_axis` must be -1 .* or 0"),
    (dict(gamma=0.1, perturb_every=0), r"`perturb_every` must be an int >= 1"),
    (dict(gamma=0.1, m_sharpness=True), r"m_sharpness=True` needs `axis_name`"),
  ],
)
def test_bad_hyperparameters_name_the_argument_and_range(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.rwp(**kwargs)


def test_shared_options_it_does_not_take_are_rejected():
  """No ascent, so no rho, num_steps or ASAM: passing them is a TypeError (not silently ignored)."""
  for kwargs in (dict(rho=0.1), dict(num_steps=2), dict(adaptive=True)):
    with pytest.raises(TypeError):
      xsam_jax.rwp(0.1, **kwargs)


def test_calling_convention_errors():
  params, loss_fn = problems.mlp_problem(seed=49)
  tx = xsam_jax.rwp(0.1)
  g = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match="needs `loss_fn`"):
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(g, tx.init(params), loss_fn=loss_fn)
  with pytest.raises(ValueError, match="state does not match"):
    tx.update(g, xsam_jax.sam(0.1).init(params), params, loss_fn=loss_fn)
