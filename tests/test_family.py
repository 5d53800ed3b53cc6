"""Identities, limits and edge cases of the SAM family: MSAM/LSAM, ASAM in
XSAM, VaSSO and the eigenvector-corrected SAM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.test_axis_name import _loss_on
from tests.test_probes import _CountingLoss
from tests.tolerances import assert_argmax_lead, assert_trees_close, assert_trees_equal, f32_bound, f32_rtol
from xsam_jax._src.eigen_sam import eigen_sam, power_iteration
from xsam_jax._src.hvp import hessian_vector_product
from xsam_jax._src.multistep import lsam, msam
from xsam_jax._src.vasso import vasso

WEIGHTS_ONLY = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)

# Rounding steps (tests/tolerances.py) of an output or a few training steps of these methods on
# problems.mlp_problem, computed along two code paths: up to 3 gradients and 3 norms over the parameters.
SAM_OPS = 3 * problems.LOSS_OPS + 3 * problems.NUM_PARAMS


def _one_update(tx, params, loss_fn, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda s: tx.update(jax.grad(loss_fn)(params), s, params, loss_fn=loss_fn))(state)


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _cosine(a, b):
  a, b = _flat(a), _flat(b)
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_k1_msam_and_lsam_are_sam():
  params, loss_fn = problems.mlp_problem(seed=31)
  sam_out, _ = _one_update(xsam_jax.sam(0.3), params, loss_fn)
  for tx in (msam(0.3, num_steps=1), lsam(0.3, num_steps=1)):
    out, state = _one_update(tx, params, loss_fn)
    assert_trees_close(out, sam_out, SAM_OPS)
    # cos(g_1, g_1) from two normalizations and a dot product over the parameters.
    np.testing.assert_allclose(state.cosine, 1.0, atol=f32_bound(1.0, n_ops=3 * problems.NUM_PARAMS))


def test_k1_lsam_plus_is_xsam_alpha0():
  """Both are the g_0 direction at SAM's scale |g_1| ("SGD+")."""
  params, loss_fn = problems.mlp_problem(seed=32)
  out_l, _ = _one_update(lsam(0.3, num_steps=1, plus=True), params, loss_fn)
  out_x, _ = _one_update(xsam_jax.xsam(0.3, 0.6, alpha_update_period=None, alpha_init=0.0), params, loss_fn)
  assert_trees_close(out_l, out_x, SAM_OPS)
  # out_l is g_0 times scalars: elementwise errors of a few eps tilt it by an angle phi ~ 1e-6, and
  # 1 - cos = phi^2 / 2 ~ 1e-12 (float64 cosine): atol 1e-6 has a wide margin.
  np.testing.assert_allclose(_cosine(out_l, jax.grad(loss_fn)(params)), 1.0, atol=1e-6)


@pytest.mark.parametrize(
  "make",
  [
    lambda rho: msam(rho, num_steps=2, plus=True),
    lambda rho: lsam(rho, num_steps=3),
    lambda rho: vasso(rho, theta=0.4),
    lambda rho: xsam_jax.sam(rho, num_steps=2, adaptive=True, adaptive_mask=WEIGHTS_ONLY),
    lambda rho: xsam_jax.xsam(rho, 2 * rho, num_steps=2, alpha_update_period=1, adaptive=True),
  ],
  ids=["msam+", "lsam", "vasso", "asam", "xsam-asam"],
)
def test_rho_to_zero_gives_the_plain_gradient(make):
  # The output moves O(rho) away from g_0; and rho not much below 1e-7:
  # |d_K| ~ rho meets eps = 1e-12 in XSAM's v0 (relative error eps / rho).
  with jax.enable_x64(True):
    params, loss_fn = problems.mlp_problem(seed=33, dtype=jnp.float64)
    out, _ = _one_update(make(1e-7), params, loss_fn)
    g0 = _flat(jax.grad(loss_fn)(params))
    assert np.linalg.norm(_flat(out) - g0) < 2e-5 * np.linalg.norm(g0)


def test_zero_combined_direction_gives_a_finite_zero_output():
  """MSAM+ with K = 1 on a concave parabola: g_1 = -g_0 exactly, so the mean is 0."""
  params = {"w": jnp.array([0.5])}
  loss_fn = lambda p: -0.5 * jnp.sum(p["w"] ** 2)
  out, state = _one_update(msam(1.0, num_steps=1, plus=True), params, loss_fn)
  # Exact: every intermediate (0.5, 1, -0.5, the norm 0.5) is a float32 number, so g_1 + g_0 = 0 bit for bit.
  np.testing.assert_array_equal(np.asarray(out["w"]), 0.0)
  assert np.isfinite(float(state.grad_norm))
  assert float(state.grad_norm) > 0


# --- ASAM inside XSAM --------------------------------------------------------


def test_xsam_asam_with_an_all_false_mask_is_plain_xsam():
  params, loss_fn = problems.mlp_problem(seed=34)
  none = lambda p: jax.tree.map(lambda _: False, p)
  # rho_max = 1.0: a clear probe winner (with 0.6 the best alpha led by 3e-5, within rounding of the losses).
  plain = xsam_jax.xsam(0.3, 1.0, num_steps=2, alpha_update_period=1)
  masked = xsam_jax.xsam(0.3, 1.0, num_steps=2, alpha_update_period=1, adaptive=True, adaptive_mask=none)
  out_p, s_p = _one_update(plain, params, loss_fn)
  out_m, s_m = _one_update(masked, params, loss_fn)
  assert_trees_close(out_m, out_p, SAM_OPS)
  # A probe loss: 2 ascent gradients, g_K and the loss, and norms, the cosine and the probe point.
  probe_tol = f32_bound(s_p.probe_losses, n_ops=4 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS)
  np.testing.assert_allclose(s_m.probe_losses, s_p.probe_losses, rtol=0, atol=probe_tol)
  assert_argmax_lead(s_p.probe_losses, probe_tol)
  assert float(s_m.alpha) == float(s_p.alpha)  # the same grid point, not a near-tie (checked above)


def test_xsam_asam_alpha1_is_asam_and_alpha0_is_the_g0_direction():
  params, loss_fn = problems.mlp_problem(seed=35)
  kw = dict(alpha_update_period=None, adaptive=True, eta=0.02, adaptive_mask=WEIGHTS_ONLY)
  out_1, _ = _one_update(xsam_jax.xsam(0.5, 1.0, num_steps=2, alpha_init=1.0, **kw), params, loss_fn)
  asam_out, _ = _one_update(
    xsam_jax.sam(0.5, num_steps=2, adaptive=True, eta=0.02, adaptive_mask=WEIGHTS_ONLY), params, loss_fn
  )
  assert_trees_close(out_1, asam_out, SAM_OPS)
  out_0, _ = _one_update(xsam_jax.xsam(0.5, 1.0, alpha_init=0.0, **kw), params, loss_fn)
  np.testing.assert_allclose(_cosine(out_0, jax.grad(loss_fn)(params)), 1.0, atol=1e-6)  # 1 - cos: 2nd order


def test_xsam_asam_probe_at_alpha0_is_the_ascent_point():
  """With K = 1 and rho_max = rho, the alpha = 0 probe sits at w + d_1."""
  params, loss_fn = problems.mlp_problem(seed=36)
  rho = 0.7
  tx = xsam_jax.xsam(rho, rho, alphas=(0.0,), alpha_update_period=1, adaptive=True)
  _, state = _one_update(tx, params, loss_fn)
  trace = xsam_jax.building_blocks.ascent(
    loss_fn, params, jax.grad(loss_fn)(params), rho=rho, num_steps=1, adaptive=True
  )
  expected = loss_fn(jax.tree.map(jnp.add, params, trace.displacement))
  # Two programs: g_0, T and |T g_0| to the point, then the loss; the probe side renormalizes (|T c_1|).
  tol = f32_bound(expected, n_ops=2 * problems.LOSS_OPS + 2 * problems.NUM_PARAMS)
  np.testing.assert_allclose(state.probe_losses[0], expected, rtol=0, atol=tol)


def test_adaptive_xsam_plane_is_the_plane_in_rescaled_coordinates():
  """adaptive_xsam_plane against its formulas (T = |w| + eta, v = T x / |T x|),
  and its output side against xsam(adaptive=True) at a fixed alpha."""
  params, loss_fn = problems.mlp_problem(seed=38)
  trace = xsam_jax.building_blocks.ascent(
    loss_fn, params, jax.grad(loss_fn)(params), rho=0.5, num_steps=2, adaptive=True, eta=0.02
  )
  (p0, p1), (o0, o1), theta, tg_norm = xsam_jax.building_blocks.adaptive_xsam_plane(trace)
  t = _flat(trace.scale)
  tc, tg = t * _flat(trace.gradient_displacement), t * _flat(trace.grads[-1])
  v0, v1 = tc / np.linalg.norm(tc), tg / np.linalg.norm(tg)
  for got, want in ((p0, t * v0), (p1, t * v1), (o0, v0 / t), (o1, v1 / t)):
    # Elementwise products of the trace's own float32 values and one norm: relative error < 36 eps < 1e-5.
    np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-7)
  # float32 cosine (norms and a dot product over the parameters); arccos divides its error by sin(theta).
  theta_tol = f32_bound(1.0, n_ops=3 * problems.NUM_PARAMS) / np.sin(float(theta))
  np.testing.assert_allclose(float(theta), np.arccos(np.clip(v0 @ v1, -1.0, 1.0)), atol=theta_tol)
  np.testing.assert_allclose(float(tg_norm), np.linalg.norm(tg), rtol=f32_rtol(problems.NUM_PARAMS + 2))  # T g, norm
  alpha = 0.7
  tx = xsam_jax.xsam(0.5, 1.0, num_steps=2, alpha_init=alpha, alpha_update_period=None, adaptive=True, eta=0.02)
  out, _ = _one_update(tx, params, loss_fn)
  a, b = xsam_jax.building_blocks.slerp_coefficients(jnp.float32(alpha), theta)
  # Its own (jitted) ascent, then the output; a o0 + b o1 can cancel: the bound is on |a o0| + |b o1|.
  terms = float(tg_norm) * (abs(float(a)) * np.abs(_flat(o0)) + abs(float(b)) * np.abs(_flat(o1)))
  tol = f32_bound(terms, n_ops=3 * problems.LOSS_OPS + 4 * problems.NUM_PARAMS)
  np.testing.assert_allclose(
    _flat(out), float(tg_norm) * (float(a) * _flat(o0) + float(b) * _flat(o1)), rtol=0, atol=tol
  )


def test_adaptive_mask_callable_equals_pytree():
  params, loss_fn = problems.mlp_problem(seed=37)
  out_c, _ = _one_update(lsam(0.5, num_steps=2, adaptive=True, adaptive_mask=WEIGHTS_ONLY), params, loss_fn)
  out_t, _ = _one_update(lsam(0.5, num_steps=2, adaptive=True, adaptive_mask=WEIGHTS_ONLY(params)), params, loss_fn)
  # The callable is resolved to the same pytree of Python bools at trace time: one program, so bitwise equal.
  assert_trees_equal(out_c, out_t)


# --- VaSSO -------------------------------------------------------------------


def _trajectory(tx, params, loss_fn, steps):
  tx = optax.chain(tx, optax.sgd(0.05, momentum=0.9))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_vasso_theta1_is_sam_and_its_first_step_is_sam():
  params, loss_fn = problems.mlp_problem(seed=38)
  p_sam, _ = _trajectory(xsam_jax.sam(0.3), params, loss_fn, 3)
  p_v1, _ = _trajectory(vasso(0.3, theta=1.0), params, loss_fn, 3)
  assert_trees_close(p_v1, p_sam, SAM_OPS)
  p_sam1, _ = _trajectory(xsam_jax.sam(0.3), params, loss_fn, 1)
  p_v, s_v = _trajectory(vasso(0.3, theta=0.4), params, loss_fn, 1)
  assert_trees_close(p_v, p_sam1, SAM_OPS)
  assert_trees_close(s_v[0].ema, jax.grad(loss_fn)(params), SAM_OPS)


def test_vasso_ema_follows_the_recursion():
  params, loss_fn = problems.mlp_problem(seed=39)
  theta, tx = 0.3, vasso(0.2, theta=0.3)
  state, ema = tx.init(params), None
  for step in range(3):
    p = jax.tree.map(lambda x, step=step: x * (1.0 + 0.1 * step), params)  # the gradient changes between calls
    g = jax.grad(loss_fn)(p)
    _, state = tx.update(g, state, p, loss_fn=loss_fn)
    ema = g if ema is None else jax.tree.map(lambda e, x: (1 - theta) * e + theta * x, ema, g)
    assert_trees_close(state.ema, ema, SAM_OPS)


# --- eigenvector-corrected SAM ----------------------------------------------


def _known_quadratic(seed=40):
  """loss = 0.5 w^T A w on {"a": (3,), "b": (2,)} with A's spectrum known."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  lams = np.array([5.0, 2.0, 1.0, -0.5, 0.1])
  a = jnp.asarray(q @ np.diag(lams) @ q.T, jnp.float32)

  def loss_fn(p):
    w = jnp.concatenate([p["a"], p["b"]])
    return 0.5 * w @ a @ w

  params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(rng.normal(size=2), jnp.float32)}
  return params, loss_fn, q[:, 0], lams[0]


def test_power_iteration_finds_the_top_eigenvector():
  params, loss_fn, top, lam = _known_quadratic()
  hvp = lambda v: hessian_vector_product(loss_fn, params, v)
  v0 = jax.tree.map(lambda x: jnp.ones_like(x) / jnp.sqrt(5.0), params)
  v, est, ok = jax.jit(lambda v: power_iteration(hvp, v, 40))(v0)
  assert bool(ok)
  np.testing.assert_allclose(float(est), lam, rtol=1e-5)
  np.testing.assert_allclose(abs(_flat(v) @ top), 1.0, atol=1e-5)


def test_eigen_sam_warm_starts_its_power_iteration():
  """2 iterations per refresh, each from the previous v, converge over refreshes."""
  params, loss_fn, top, lam = _known_quadratic()
  tx = eigen_sam(0.05, eig_update_period=1, power_iterations=2)
  state, errors = tx.init(params), []
  for _ in range(8):
    _, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
    errors.append(1.0 - abs(_flat(state.eigvec) @ top))
  assert errors[-1] < 1e-6 < errors[0]
  np.testing.assert_allclose(float(state.eigenvalue), lam, rtol=1e-4)


def test_eigen_sam_refreshes_only_on_schedule():
  params, loss_fn, _, _ = _known_quadratic()
  tx = eigen_sam(0.05, eig_update_period=3, power_iterations=4)
  state, refreshed = tx.init(params), []
  for _ in range(7):
    counting = _CountingLoss(loss_fn)
    _, new_state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=counting)
    jax.effects_barrier()
    refreshed.append(counting.calls > 1)  # the ascent evaluates the loss once; a refresh, once per HVP
    if not refreshed[-1]:
      assert_trees_equal(new_state.eigvec, state.eigvec)  # carried over unchanged: bitwise is the contract
    state = new_state
  assert refreshed == [c % 3 == 0 for c in range(7)]


def test_eigen_sam_alpha0_is_sam_and_zero_curvature_stays_sam():
  params, loss_fn = problems.mlp_problem(seed=41)
  sam_out, _ = _one_update(xsam_jax.sam(0.2), params, loss_fn)
  out, state = _one_update(eigen_sam(0.2, alpha=0.0), params, loss_fn)
  assert_trees_close(out, sam_out, SAM_OPS)
  assert bool(state.has_eigvec)
  # A linear loss has H = 0: no eigenvector is found and the output is SAM's.
  lin = {"w": jnp.array([1.0, -2.0, 0.5])}
  lin_loss = lambda p: jnp.sum(jnp.array([0.3, -1.0, 2.0]) * p["w"])
  out, state = _one_update(eigen_sam(0.2, alpha=1.0), lin, lin_loss)
  assert not bool(state.has_eigvec)
  assert_trees_close(out, jax.grad(lin_loss)(lin), SAM_OPS)


def test_eigen_sam_correction_lowers_the_component_along_v():
  params, loss_fn = problems.mlp_problem(seed=42)
  out, state = _one_update(eigen_sam(0.2, alpha=0.5), params, loss_fn)
  sam_out, _ = _one_update(xsam_jax.sam(0.2), params, loss_fn)
  v = _flat(state.eigvec)
  c_sam, c_out = _cosine(sam_out, state.eigvec), (_flat(out) @ v) / np.linalg.norm(_flat(out))
  # cos(g_1, v): SAM's g_1 from another program (2 gradients, |g_0|), then 2 norms and a dot product.
  np.testing.assert_allclose(
    c_sam, float(state.cosine), atol=f32_bound(1.0, n_ops=2 * problems.LOSS_OPS + 3 * problems.NUM_PARAMS)
  )
  assert c_out < c_sam
  np.testing.assert_allclose(np.linalg.norm(_flat(out)), float(state.grad_norm), rtol=1e-5)


# --- data parallelism --------------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    lambda ax: vasso(0.3, theta=0.5, axis_name=ax),
    lambda ax: eigen_sam(0.3, alpha=0.5, eig_update_period=2, power_iterations=3, axis_name=ax),
    lambda ax: lsam(0.3, num_steps=2, plus=True, adaptive=True, axis_name=ax),
  ],
  ids=["vasso", "eigen_sam", "lsam+asam"],
)
def test_replicas_agree_with_global_batch(make):
  """Replicas (a vmap axis) on shards of the batch = one device on the whole batch."""
  problem, p0 = problems.mlp_data(seed=43, n=16)
  x, t = jnp.asarray(problem.x, jnp.float32), jnp.asarray(problem.t, jnp.float32)
  n = 4
  with_sgd = lambda tx: optax.chain(tx, optax.sgd(0.05, momentum=0.9))
  tx_g, tx_r = with_sgd(make(None)), with_sgd(make("batch"))
  replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)

  def step_of(tx):
    def step(p, s, xb, tb):
      f = _loss_on(xb, tb)
      u, s = tx.update(jax.grad(f)(p), s, p, loss_fn=f)
      return optax.apply_updates(p, u), s

    return step

  step_g, step_r = jax.jit(step_of(tx_g)), jax.jit(jax.vmap(step_of(tx_r), axis_name="batch"))
  p_g = jax.tree.map(jnp.float32, p0)
  s_g, p_r, s_r = tx_g.init(p_g), replicate(p_g), replicate(tx_r.init(p_g))
  shards = x.reshape(n, -1, x.shape[1]), t.reshape(n, -1, t.shape[1])
  for _ in range(3):
    p_g, s_g = step_g(p_g, s_g, x, t)
    p_r, s_r = step_r(p_r, s_r, *shards)
  assert_trees_close(p_r, replicate(p_g), SAM_OPS)


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: msam(0.1, num_steps=0), r"`num_steps` must be an int >= 1"),
    (lambda: lsam(-0.1, num_steps=2), r"`rho` must be a finite real number > 0"),
    (lambda: msam(0.1, num_steps=2, eta=-1.0), r"`eta` must be a finite real number >= 0"),
    (lambda: xsam_jax.xsam(0.1, 0.2, adaptive=True, eta=-0.1), r"`eta`"),
    (lambda: vasso(0.1, theta=0.0), r"`theta` must be a finite real number > 0"),
    (lambda: vasso(0.1, theta=1.5), r"`theta` must be a finite real number in \(0, 1\]"),
    (lambda: vasso(0.1, theta=float("nan")), r"`theta`"),
    (lambda: eigen_sam(0.1, alpha=float("inf")), r"`alpha` must be a finite real number"),
    (lambda: eigen_sam(0.1, eig_update_period=0), r"`eig_update_period`"),
    (lambda: eigen_sam(0.1, eig_update_period=None), r"`eig_update_period` must be an int >= 1"),
    (lambda: eigen_sam(0.1, power_iterations=0), r"`power_iterations` must be an int >= 1"),
    (lambda: eigen_sam(0.1, seed=-1), r"`seed` must be an int >= 0"),
  ],
)
def test_bad_hyperparameters_are_rejected(make, match):
  with pytest.raises(ValueError, match=match):
    make()
