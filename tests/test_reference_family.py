"""The SAM family (MSAM, LSAM, ASAM, XSAM+ASAM, VaSSO, eigenvector-corrected
SAM, and VaSSO and EigenSAM with ``adaptive``) equals the independent float64
numpy reference to 1e-10, over several training steps of
``chain(method, add_decayed_weights, sgd(momentum))``.

SAM and XSAM: tests/test_reference_sam_xsam.py; their m-sharpness:
tests/test_m_sharpness.py. The methods with a file of their own compare with
the reference there (GSAM, WSAM, Friendly SAM: tests/test_sam_variants.py;
LookSAM, Momentum-SAM, RWP, preconditioned and Functional SAM: tests/test_<method>.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_jax
from tests import problems, reference
from tests.test_reference_sam_xsam import HP, _run_jax
from tests.test_reference_sam_xsam import _jax_train as jax_train_f64
from xsam_jax._src.eigen_sam import eigen_sam, initial_eigvec
from xsam_jax._src.multistep import lsam, msam
from xsam_jax._src.vasso import vasso

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]
WEIGHTS_ONLY = {"b1": False, "b2": False, "w1": True, "w2": True}


def _jax_train(tx0, problem, p0, steps=STEPS):
  """Runs tx0 in float64 on the reference MLP; returns (flat params, state, alphas)."""
  return jax_train_f64(tx0, problem, p0, steps)


def _ref_train(problem, p0, output_fn, steps=STEPS):
  return reference.run(reference.MLP.flatten(p0), steps, output_fn, **BASE)


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@pytest.mark.parametrize("kind", ["msam", "lsam"])
def test_multistep_matches_reference(kind, plus):
  problem, p0 = problems.mlp_data(seed=21)
  k = 3
  w_ref, _ = _ref_train(
    problem, p0, lambda w, c, s: (reference.multistep_output(problem.grad, w, RHO, k, kind=kind, plus=plus), s)
  )
  factory = msam if kind == "msam" else lsam
  w, _, _ = _jax_train(factory(RHO, num_steps=k, plus=plus), problem, p0)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)


def test_asam_ascent_step_is_rho_t2_g_over_tg():
  """One adaptive ascent step is rho T^2 g / |T g| with T = |w| + eta (numpy, float64)."""
  problem, p0 = problems.mlp_data(seed=22)
  eta, rho = 0.05, 0.3
  w = reference.MLP.flatten(p0)
  for mask in (None, WEIGHTS_ONLY):
    t = reference.asam_t(w, eta, None if mask is None else reference.flat_mask(problem, mask))
    g = problem.grad(w)
    expected = rho * t**2 * g / np.linalg.norm(t * g)
    with jax.enable_x64(True):
      params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
      loss_fn = problems.mlp_loss_fn(problem, jnp.float64)
      trace = xsam_jax.building_blocks.ascent(
        loss_fn, params, jax.grad(loss_fn)(params), rho=rho, num_steps=1, adaptive=True, eta=eta, adaptive_mask=mask
      )
      d = reference.MLP.flatten(jax.tree.map(np.asarray, trace.displacement))
    np.testing.assert_allclose(d, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("k", "masked"), [(1, False), (3, False), (2, True)], ids=["k1", "k3", "k2-weights-only"])
def test_asam_matches_reference(k, masked):
  problem, p0 = problems.mlp_data(seed=23)
  eta = 0.02
  mask = WEIGHTS_ONLY if masked else None
  flat_mask = reference.flat_mask(problem, mask) if masked else None
  w_ref, _ = _ref_train(
    problem,
    p0,
    lambda w, c, s: (
      reference.ascent(problem.grad, w, problem.grad(w), RHO, k, t=reference.asam_t(w, eta, flat_mask))[0][-1],
      s,
    ),
  )
  w, _, _ = _jax_train(xsam_jax.sam(RHO, num_steps=k, adaptive=True, eta=eta, adaptive_mask=mask), problem, p0)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)


def test_adaptive_lsam_plus_matches_reference():
  problem, p0 = problems.mlp_data(seed=24)
  eta, k = 0.03, 2
  w_ref, _ = _ref_train(
    problem,
    p0,
    lambda w, c, s: (
      reference.multistep_output(problem.grad, w, RHO, k, kind="lsam", plus=True, t=reference.asam_t(w, eta)),
      s,
    ),
  )
  w, _, _ = _jax_train(lsam(RHO, num_steps=k, plus=True, adaptive=True, eta=eta), problem, p0)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
  ("k", "period", "alpha_init", "masked"),
  [(1, 2, 1.0, False), (2, None, 0.6, False), (1, 1, 1.0, True)],
  ids=["k1-probe-every-2", "k2-fixed0.6", "k1-probe-weights-only"],
)
def test_xsam_asam_matches_reference(k, period, alpha_init, masked):
  problem, p0 = problems.mlp_data(seed=25)
  eta, rho, rho_max = 0.05, 1.0, 2.0  # ASAM's radii are larger: T ~ |w| + eta shrinks the step
  alphas = np.asarray(xsam_jax.DEFAULT_ALPHAS)
  mask = WEIGHTS_ONLY if masked else None
  flat_mask = reference.flat_mask(problem, mask) if masked else None

  def output_fn(w, count, alpha):
    probe = period is not None and count % period == 0
    out, alpha = reference.adaptive_xsam_output(
      problem.loss, problem.grad, w, rho, k, rho_max, alphas, alpha, probe, reference.asam_t(w, eta, flat_mask)
    )
    used.append(alpha)
    return out, alpha

  used = []
  w_ref, _ = reference.run(reference.MLP.flatten(p0), STEPS, output_fn, state=float(np.float32(alpha_init)), **BASE)
  tx0 = xsam_jax.xsam(
    rho,
    rho_max,
    num_steps=k,
    alpha_init=alpha_init,
    alpha_update_period=period,
    adaptive=True,
    eta=eta,
    adaptive_mask=mask,
  )
  w, _, alphas_jax = _jax_train(tx0, problem, p0)
  assert alphas_jax == used
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  if period is not None:
    assert any(0.0 < a < 2.0 for a in used) or len(set(used)) > 1  # real searches


@pytest.mark.parametrize("theta", [0.4, 0.9])
def test_vasso_matches_reference(theta):
  problem, p0 = problems.mlp_data(seed=26)
  w_ref, ema_ref = _ref_train(problem, p0, lambda w, c, ema: reference.vasso_output(problem.grad, w, RHO, theta, ema))
  w, state, _ = _jax_train(vasso(RHO, theta=theta), problem, p0)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(reference.MLP.flatten(jax.tree.map(np.asarray, state[0].ema)), ema_ref, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "weights-only"])
def test_adaptive_vasso_matches_reference(masked):
  """ASAM's neighbourhood for VaSSO's perturbation: w + rho T^2 d_t / |T d_t|."""
  problem, p0 = problems.mlp_data(seed=42)
  theta, eta = 0.4, 0.05
  mask = WEIGHTS_ONLY if masked else None
  flat_mask = reference.flat_mask(problem, mask) if masked else None

  def output_fn(w, count, ema):
    return reference.vasso_output(problem.grad, w, RHO, theta, ema, t=reference.asam_t(w, eta, flat_mask))

  w_ref, ema_ref = reference.run(reference.MLP.flatten(p0), STEPS, output_fn, **BASE)
  tx = xsam_jax.vasso(RHO, theta=theta, adaptive=True, eta=eta, adaptive_mask=mask)
  w, state, _ = jax_train_f64(tx, problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(reference.MLP.flatten(jax.tree.map(np.asarray, state[0].ema)), ema_ref, atol=1e-10)
  w_plain, _, _ = jax_train_f64(xsam_jax.vasso(RHO, theta=theta), problem, p0, STEPS)
  assert np.max(np.abs(w - w_plain)) > 1e-4  # ASAM changed the run


def _quartic(seed=27):
  """A reference Quartic on 7 parameters, with its JAX loss on {"u": (3,), "v": (2, 2)}."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
  a = q @ np.diag([6.0, 2.5, 1.5, 1.0, 0.5, 0.2, -0.3]) @ q.T
  b = rng.normal(size=7) * 0.5
  problem = reference.Quartic(a, b)
  w0 = rng.normal(size=7) * 0.5
  params = {"u": w0[:3], "v": w0[3:].reshape(2, 2)}

  def loss_fn(p):
    w = jnp.concatenate([p["u"].ravel(), p["v"].ravel()])
    return 0.5 * w @ jnp.asarray(a) @ w + jnp.asarray(b) @ w + 0.25 * jnp.sum(w**4)

  return problem, params, loss_fn


def _flat(p):
  return np.concatenate([np.asarray(p["u"]).ravel(), np.asarray(p["v"]).ravel()])


@pytest.mark.parametrize("alpha", [0.2, 1.5])
def test_eigen_sam_matches_reference(alpha):
  problem, p0, loss_fn = _quartic()
  period, iters, rho, steps = 2, 5, 0.2, 6

  def output_fn(w, count, v):
    if count % period == 0:
      v, _ = reference.power_iteration(lambda x: problem.hvp(w, x), v, iters)
    return reference.eigen_corrected(reference.sam_output(problem.grad, w, rho, 1), v, alpha), v

  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    v0 = _flat(initial_eigvec(params, seed=3))
    tx0 = eigen_sam(rho, alpha=alpha, eig_update_period=period, power_iterations=iters, seed=3)
    out, state, _ = _run_jax(tx0, params, loss_fn, steps)
    w = _flat(out)
  w_ref, v_ref = reference.run(_flat(p0), steps, output_fn, state=v0, **BASE)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(state[0].eigvec), v_ref, atol=1e-10)
  assert bool(state[0].has_eigvec)


def test_adaptive_eigen_sam_matches_reference():
  """ASAM moves EigenSAM's ascent point; the eigenvector and the correction stay in plain coordinates."""
  problem, p0, loss_fn = _quartic(seed=45)
  period, iters, rho, eta, alpha, steps = 2, 5, 0.2, 0.1, 0.8, 6

  def output_fn(w, count, v):
    if count % period == 0:
      v, _ = reference.power_iteration(lambda x: problem.hvp(w, x), v, iters)
    g_adv = reference.ascent(problem.grad, w, problem.grad(w), rho, 1, t=reference.asam_t(w, eta))[0][-1]
    return reference.eigen_corrected(g_adv, v, alpha), v

  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    v0 = _flat(initial_eigvec(params, seed=1))
    tx = xsam_jax.eigen_sam(
      rho, alpha=alpha, eig_update_period=period, power_iterations=iters, seed=1, adaptive=True, eta=eta
    )
    out, state, _ = _run_jax(tx, params, loss_fn, steps)
    w = _flat(out)
  w_ref, v_ref = reference.run(_flat(p0), steps, output_fn, state=v0, **BASE)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(state[0].eigvec), v_ref, atol=1e-10)
