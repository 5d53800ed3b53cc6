"""GSAM, WSAM and Friendly SAM: the float64 numpy reference, the equivalences with SAM, validation, and
data parallelism (their m-sharpness: tests/test_m_sharpness.py).

Reference tolerance (as tests/test_reference_sam_xsam.py): a training step chains a few hundred float64
rounding steps (two gradients, a few norms and dot products over 32 parameters), and 5-6 steps with lr 0.05
and momentum 0.9 move the params by less than ~1e3 eps64 |w| (~2): ~5e-13, far below 1e-10. The float32
diagnostics in the state are float64 results rounded once to float32: within eps32 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.problems import N_REPLICAS, UPDATE_OPS
from tests.test_reference_sam_xsam import HP, _run_jax
from tests.test_reference_sam_xsam import _jax_train as jax_train_f64
from tests.tolerances import assert_trees_close, assert_trees_within, f32_bound, f32_rtol

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]


def _flat(tree):
  return reference.MLP.flatten(jax.tree.map(np.asarray, tree))


def _ref_train(p0, output_fn, steps=STEPS):
  return reference.run(reference.MLP.flatten(p0), steps, output_fn, **BASE)


# ---------------------------------------------------------------------------------------------------------
# The float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("alpha", "eta"), [(0.4, None), (1.5, None), (0.3, 0.02)], ids=["alpha0.4", "alpha1.5", "alpha0.3-asam"]
)
def test_gsam_matches_reference(alpha, eta):
  problem, p0 = problems.mlp_data(seed=31)
  diagnostics = []

  def output_fn(w, count, state):
    t = None if eta is None else reference.asam_t(w, eta)
    out, g1_norm, cosine = reference.gsam_output(problem.grad, w, RHO, alpha, t=t)
    diagnostics.append((g1_norm, cosine))
    return out, state

  w_ref, _ = _ref_train(p0, output_fn)
  adaptive = dict(adaptive=True, eta=eta) if eta is not None else {}
  w, state, _ = jax_train_f64(xsam_jax.gsam(RHO, alpha, **adaptive), problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  s = state[0]
  assert int(s.count) == STEPS
  np.testing.assert_allclose(float(s.grad_norm), diagnostics[-1][0], rtol=f32_rtol(1))
  np.testing.assert_allclose(float(s.cosine), diagnostics[-1][1], rtol=f32_rtol(1))
  assert diagnostics[-1][1] < 1 - 1e-4  # g_0 and g_1 not parallel: the correction is exercised


@pytest.mark.parametrize("gamma", [0.3, 0.9])
def test_wsam_matches_reference(gamma):
  problem, p0 = problems.mlp_data(seed=32)
  w_ref, _ = _ref_train(p0, lambda w, c, s: (reference.wsam_output(problem.grad, w, RHO, gamma), s))
  w, state, _ = jax_train_f64(xsam_jax.wsam(RHO, gamma), problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  assert int(state[0].count) == STEPS


def test_wsam_decoupled_matches_reference():
  """The base optimizer (decayed weights + SGD with momentum, a linear learning-rate schedule) sees g_0;
  the sharpness term lr_t gamma/(1-gamma) (g_1 - g_0) is added outside it."""
  problem, p0 = problems.mlp_data(seed=33)
  # A linear schedule of dyadic values, 2^-4 to 2^-5 over 4 steps: exact in float32 (optax evaluates
  # schedules in float32 even with x64 on) in any order of evaluation, so the reference's lr is the one used.
  gamma, lr0, lr1, decay_steps = 0.8, 2.0**-4, 2.0**-5, 4
  schedule = optax.linear_schedule(lr0, lr1, decay_steps)
  weight = gamma / (1.0 - gamma)

  w, m = reference.MLP.flatten(p0), 0.0
  for t in range(STEPS):
    lr = lr0 + (lr1 - lr0) * min(t, decay_steps) / decay_steps
    g0, g1 = reference.wsam_gradients(problem.grad, w, RHO)
    m = g0 + HP["wd"] * w + HP["momentum"] * m
    w = w - lr * m - lr * weight * (g1 - g0)

  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    loss_fn = problems.mlp_loss_fn(problem, jnp.float64)
    base_opt = optax.chain(optax.add_decayed_weights(HP["wd"]), optax.sgd(schedule, momentum=HP["momentum"]))
    tx = xsam_jax.wsam(RHO, gamma, base_optimizer=base_opt, learning_rate=schedule)
    params, state, _ = _run_jax(tx, params, loss_fn, STEPS, chained=False)
    np.testing.assert_allclose(_flat(params), w, rtol=0, atol=1e-10)
    assert int(state.count) == STEPS
    momentum = optax.tree.get(state.base_state, "trace")
    np.testing.assert_allclose(_flat(momentum), m, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("sigma", "lmbda"), [(1.0, 0.6), (0.5, 0.9)])
def test_friendly_sam_matches_reference(sigma, lmbda):
  problem, p0 = problems.mlp_data(seed=34)
  w_ref, ema_ref = _ref_train(
    p0, lambda w, c, ema: reference.friendly_sam_output(problem.grad, w, RHO, sigma, lmbda, ema)
  )
  w, state, _ = jax_train_f64(xsam_jax.friendly_sam(RHO, sigma=sigma, lmbda=lmbda), problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(state[0].ema), ema_ref, rtol=0, atol=1e-10)
  assert int(state[0].count) == STEPS


@pytest.mark.parametrize(("sigma", "lmbda"), [(1.0, 0.95), (0.5, 0.9)])
def test_friendly_sam_first_gradient_is_the_authors_code(sigma, lmbda):
  """``init="first_gradient"``: the authors' update order and start (m_1 = g_1, then g_t - sigma m_{t-1})."""
  problem, p0 = problems.mlp_data(seed=35)
  w_ref, ema_ref = _ref_train(
    p0, lambda w, c, ema: reference.friendly_sam_code_output(problem.grad, w, RHO, sigma, lmbda, ema)
  )
  tx = xsam_jax.friendly_sam(RHO, sigma=sigma, lmbda=lmbda, init="first_gradient")
  w, state, _ = jax_train_f64(tx, problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(state[0].ema), ema_ref, rtol=0, atol=1e-10)
  # The paper's start gives another trajectory: the option is not a no-op.
  w_zero, _, _ = jax_train_f64(xsam_jax.friendly_sam(RHO, sigma=sigma, lmbda=lmbda), problem, p0, STEPS)
  assert np.abs(w_zero - w).max() > 1e-6


def test_friendly_sam_init_is_checked():
  with pytest.raises(ValueError, match=r"`init` must be one of \('zero', 'first_gradient'\), got 'first'"):
    xsam_jax.friendly_sam(0.1, init="first")


def test_friendly_sam_on_a_quartic_matches_reference():
  """A second problem, pytree leaves of two shapes: the average and the perturbation per leaf."""
  problem, p0 = _quartic()
  sigma, lmbda, rho = 1.0, 0.6, 0.2
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    out, state, _ = _run_jax(xsam_jax.friendly_sam(rho, sigma=sigma, lmbda=lmbda), params, _quartic_loss(problem), 6)
    w = _quartic_flat(out)
    ema = _quartic_flat(state[0].ema)
  output_fn = lambda w, c, ema: reference.friendly_sam_output(problem.grad, w, rho, sigma, lmbda, ema)
  w_ref, ema_ref = reference.run(_quartic_flat(p0), 6, output_fn, **BASE)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(ema, ema_ref, rtol=0, atol=1e-10)


def _quartic(seed=35):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
  a = q @ np.diag([5.0, 2.0, 1.5, 1.0, 0.5, 0.2, -0.3]) @ q.T
  w0 = rng.normal(size=7) * 0.5
  return reference.Quartic(a, rng.normal(size=7) * 0.5), {"u": w0[:3], "v": w0[3:].reshape(2, 2)}


def _quartic_loss(problem):
  a, b = jnp.asarray(problem.a), jnp.asarray(problem.b)

  def loss_fn(p):
    w = jnp.concatenate([p["u"].ravel(), p["v"].ravel()])
    return 0.5 * w @ a @ w + b @ w + 0.25 * jnp.sum(w**4)

  return loss_fn


def _quartic_flat(p):
  return np.concatenate([np.asarray(p["u"]).ravel(), np.asarray(p["v"]).ravel()])


# ---------------------------------------------------------------------------------------------------------
# Equivalences (float32): each against SAM or the plain gradient, along SAM's trajectory
# ---------------------------------------------------------------------------------------------------------


def _updates_along_sam(tx, steps=4, seed=36):
  """``[(u, u_sam, g_0)]``: ``tx``'s update and SAM's at each point of a SAM + SGD trajectory, each from
  ``tx``'s own state carried along the same points."""
  params, loss_fn = problems.mlp_problem(seed=seed)
  sam = xsam_jax.sam(RHO)
  s, s_sam = tx.init(params), sam.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
  update_sam = jax.jit(lambda g, s, p: sam.update(g, s, p, loss_fn=loss_fn))
  out = []
  for _ in range(steps):
    g = jax.grad(loss_fn)(params)
    u, s = update(g, s, params)
    u_sam, s_sam = update_sam(g, s_sam, params)
    out.append((u, u_sam, g))
    params = optax.apply_updates(params, jax.tree.map(lambda x: -0.05 * x, u_sam))
  return out


def test_gsam_alpha_zero_is_sam():
  for u, u_sam, _ in _updates_along_sam(xsam_jax.gsam(RHO, alpha=0.0)):
    assert_trees_close(u, u_sam, UPDATE_OPS)


def test_friendly_sam_sigma_zero_is_sam():
  for u, u_sam, _ in _updates_along_sam(xsam_jax.friendly_sam(RHO, sigma=0.0, lmbda=0.6)):
    assert_trees_close(u, u_sam, UPDATE_OPS)


def test_wsam_gamma_half_is_sam():
  for u, u_sam, g in _updates_along_sam(xsam_jax.wsam(RHO, gamma=0.5)):
    # g_0 + (g_1 - g_0): two more roundings, of operands up to max(|g_0|, |g_1|).
    assert_trees_within(u, u_sam, f32_bound(*jax.tree.leaves(u_sam), *jax.tree.leaves(g), n_ops=UPDATE_OPS))


def test_wsam_gamma_zero_is_the_plain_gradient_exactly():
  for u, _, g in _updates_along_sam(xsam_jax.wsam(RHO, gamma=0.0)):
    jax.tree.map(np.testing.assert_array_equal, u, g)  # g_0 + 0 (g_1 - g_0) = g_0, bit for bit


def test_gsam_correction_is_orthogonal_to_sam():
  """output - g_1 = -alpha g_0_perp is orthogonal to g_1, and has norm alpha |g_0| sin(angle)."""
  alpha = 0.7
  tx = xsam_jax.gsam(RHO, alpha=alpha)
  for u, u_sam, g in _updates_along_sam(tx):
    d = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_sam), strict=True)])
    g1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u_sam)])
    g0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    cos = g0 @ g1 / np.linalg.norm(g0) / np.linalg.norm(g1)
    bound = f32_bound(g0, g1, n_ops=UPDATE_OPS)  # per element; the norms below sum 32 of them
    assert abs(d @ g1) / np.linalg.norm(g1) <= problems.NUM_PARAMS * bound
    np.testing.assert_allclose(
      np.linalg.norm(d), alpha * np.linalg.norm(g0) * np.sqrt(1 - cos**2), atol=problems.NUM_PARAMS * bound
    )


@pytest.mark.parametrize("gamma", [0.5, 0.85])
def test_wsam_decoupled_with_plain_sgd_is_coupled(gamma):
  """Without momentum the decoupled and coupled forms are the same update."""
  lr = 0.05
  params, loss_fn = problems.mlp_problem(seed=37)
  coupled = optax.chain(xsam_jax.wsam(RHO, gamma), optax.sgd(lr))
  decoupled = xsam_jax.wsam(RHO, gamma, base_optimizer=optax.sgd(lr), learning_rate=lr)
  s_c, s_d = coupled.init(params), decoupled.init(params)
  for _ in range(3):
    g = jax.grad(loss_fn)(params)
    u_c, s_c = coupled.update(g, s_c, params, loss_fn=loss_fn)
    u_d, s_d = decoupled.update(g, s_d, params, loss_fn=loss_fn)
    # lr (g_0 + c (g_1 - g_0)) against lr g_0 + lr c (g_1 - g_0): a few roundings of terms up to c |g|.
    scale = gamma / (1 - gamma) * lr
    assert_trees_within(u_d, u_c, f32_bound(*jax.tree.leaves(g), n_ops=UPDATE_OPS) * max(scale, lr))
    params = optax.apply_updates(params, u_c)


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: xsam_jax.gsam(0.1, alpha=-0.1), r"`alpha` must be a finite real number >= 0, got -0.1"),
    (lambda: xsam_jax.gsam(0.1, alpha=float("nan")), r"`alpha` must be a finite real number >= 0"),
    (lambda: xsam_jax.gsam(0.1, alpha="0.4"), r"`alpha`"),
    (lambda: xsam_jax.gsam(0.0), r"`rho` must be"),
    (lambda: xsam_jax.gsam(0.1, eta=-1.0), r"`eta` must be"),
    (lambda: xsam_jax.gsam(0.1, m_sharpness=True), r"`m_sharpness=True` needs `axis_name`"),
    (lambda: xsam_jax.wsam(0.1, gamma=1.0), r"`gamma` must be a real number in \[0, 1\), got 1.0"),
    (lambda: xsam_jax.wsam(0.1, gamma=-0.2), r"`gamma` must be a real number in \[0, 1\), got -0.2"),
    (lambda: xsam_jax.wsam(0.1, gamma=float("inf")), r"`gamma` must be a real number in \[0, 1\)"),
    (lambda: xsam_jax.wsam(0.1, gamma=np.ones(2)), r"`gamma`.*array of shape \(2,\)"),
    (lambda: xsam_jax.wsam(-0.1), r"`rho` must be"),
    (lambda: xsam_jax.wsam(0.1, learning_rate=0.1), r"`base_optimizer` and `learning_rate` go together"),
    (lambda: xsam_jax.wsam(0.1, base_optimizer=optax.sgd(0.1)), r"`base_optimizer` and `learning_rate`"),
    (
      lambda: xsam_jax.wsam(0.1, base_optimizer=lambda g: g, learning_rate=0.1),
      r"`base_optimizer` must be an optax GradientTransformation",
    ),
    (
      lambda: xsam_jax.wsam(0.1, base_optimizer=optax.sgd(0.1), learning_rate=0.0),
      r"`learning_rate` must be a finite real number > 0",
    ),
    (lambda: xsam_jax.friendly_sam(0.1, sigma=-1.0), r"`sigma` must be a finite real number >= 0, got -1.0"),
    (lambda: xsam_jax.friendly_sam(0.1, lmbda=1.0), r"`lmbda` must be a real number in \[0, 1\), got 1.0"),
    (lambda: xsam_jax.friendly_sam(0.1, lmbda=-0.5), r"`lmbda` must be a real number in \[0, 1\)"),
    (lambda: xsam_jax.friendly_sam(0.1, lmbda=True), r"`lmbda`.*bool"),
    (lambda: xsam_jax.friendly_sam(float("nan")), r"`rho`"),
  ],
)
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_traced_hyperparameters_are_accepted():
  """Under inject_hyperparams the values are tracers: only their shape and dtype can be checked."""
  for make in (
    lambda a: xsam_jax.gsam(0.1, alpha=a),
    lambda a: xsam_jax.wsam(0.1, gamma=a),
    lambda a: xsam_jax.friendly_sam(0.1, sigma=a, lmbda=a),
  ):
    jax.jit(lambda a, make=make: make(a).init({"w": jnp.ones(2)}))(jnp.float32(0.5))


# ---------------------------------------------------------------------------------------------------------
# Data parallelism (one device: the replica axis is a vmap axis)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    lambda ax: xsam_jax.gsam(0.3, alpha=0.5, axis_name=ax),
    lambda ax: xsam_jax.wsam(0.3, 0.8, base_optimizer=optax.sgd(0.05, momentum=0.9), learning_rate=0.05, axis_name=ax),
    lambda ax: xsam_jax.friendly_sam(0.3, sigma=1.0, lmbda=0.6, axis_name=ax),
  ],
  ids=["gsam", "wsam-decoupled", "friendly_sam"],
)
def test_replicas_agree_with_global_batch(make):
  params, (x, t), (xs, ts) = problems.replica_shards(seed=38)
  loss_fn = lambda q: problems.mlp_batch_loss(q, {"x": x, "t": t})
  tx_g, tx_r = make(None), make("batch")
  u_g, s_g = tx_g.update(jax.grad(loss_fn)(params), tx_g.init(params), params, loss_fn=loss_fn)
  u_r, s_r = problems.replica_update(tx_r, params, xs, ts)
  # Replicas reduce over shards (pmean of 4 means of 4), one device over the batch: two programs.
  for i in range(N_REPLICAS):
    assert_trees_close(jax.tree.map(lambda a, i=i: a[i], u_r), u_g, UPDATE_OPS)
    assert_trees_close(jax.tree.map(lambda a, i=i: a[i], s_r), s_g, UPDATE_OPS)
