"""Facts about xsam_jax.testfns.fisher_sam_toy, checked independently.

The reference is a plain float64 NumPy transcription of the published
formula (no logsumexp, no floor); derivatives are central finite differences
on it, and minima are located with scipy.optimize when scipy is installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import f32_bound
from xsam_jax import testfns

FN = jax.jit(testfns.fisher_sam_toy)
GRAD = jax.jit(jax.grad(testfns.fisher_sam_toy))
HESSIAN = jax.jit(jax.hessian(testfns.fisher_sam_toy))

POINTS = {
  "flat": testfns.FLAT_MINIMUM,
  "sharp": testfns.SHARP_MINIMUM,
  "saddle": testfns.SADDLE_POINT,
}


def _kl_ref(mu, s, m, t):
  return np.log(t / s) + (s**2 + (mu - m) ** 2) / (2 * t**2) - 0.5


def f_ref(x):
  """The published formula, verbatim, in float64 (valid for s > 0)."""
  mu, s = np.float64(x[0]), np.float64(x[1])
  return -np.log(
    0.7 * np.exp(-_kl_ref(mu, s, 20.0, 30.0) / 1.8**2) + 0.3 * np.exp(-_kl_ref(mu, s, -20.0, 10.0) / 1.2**2)
  )


def fd_grad(x, h=1e-4):
  x = np.asarray(x, np.float64)
  return np.array([(f_ref(x + h * e) - f_ref(x - h * e)) / (2 * h) for e in np.eye(2)])


def fd_hessian(x, h=1e-3):
  x = np.asarray(x, np.float64)
  hess = np.zeros((2, 2))
  for i, ei in enumerate(np.eye(2)):
    for j, ej in enumerate(np.eye(2)):
      hess[i, j] = (
        f_ref(x + h * ei + h * ej)
        - f_ref(x + h * ei - h * ej)
        - f_ref(x - h * ei + h * ej)
        + f_ref(x - h * ei - h * ej)
      ) / (4 * h * h)
  return hess


def test_matches_published_formula_on_a_grid():
  mu, s = np.meshgrid(np.linspace(-60, 60, 41), np.concatenate([[0.1, 0.2, 0.5], np.linspace(1, 80, 40)]))
  pts = np.stack([mu.ravel(), s.ravel()], axis=-1)
  ref = np.array([f_ref(p) for p in pts])
  got = np.asarray(FN(jnp.asarray(pts, jnp.float32)))
  # float32: the inputs' rounding (1 step), each KL (~12; its terms, e.g. 0.5 and s^2 / 2t^2 near a
  # minimum, cancel to within ~1.5x of f) and logaddexp (~11).
  np.testing.assert_allclose(got, ref, rtol=0, atol=f32_bound(1.5 * ref, 1.0, n_ops=24))
  with jax.enable_x64(True):
    got64 = np.asarray(FN(jnp.asarray(pts, jnp.float64)))
  np.testing.assert_allclose(got64, ref, rtol=1e-12)


def test_gaussian_kl_against_numerical_integration():
  z = np.linspace(-400.0, 400.0, 400001)
  for mu, s, m, t in ((3.0, 2.0, -1.0, 5.0), (-16.8, 12.8, 20.0, 30.0), (20.0, 30.0, -20.0, 10.0)):
    p = np.exp(-0.5 * ((z - mu) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    log_p = -0.5 * ((z - mu) / s) ** 2 - np.log(s * np.sqrt(2 * np.pi))
    log_q = -0.5 * ((z - m) / t) ** 2 - np.log(t * np.sqrt(2 * np.pi))
    kl_num = np.trapezoid(p * (log_p - log_q), z)
    with jax.enable_x64(True):
      kl = float(testfns.gaussian_kl(jnp.float64(mu), jnp.float64(s), m, t))
    assert kl == pytest.approx(kl_num, rel=1e-8)


@pytest.mark.parametrize("name", sorted(POINTS))
def test_critical_points_fd_float64(name):
  point = POINTS[name]
  x = np.asarray(point.location)
  # Locations are given to 7 decimals: the gradient there is ~ |H| * 5e-8.
  assert np.max(np.abs(fd_grad(x))) < 1e-9
  assert f_ref(x) == pytest.approx(point.value, abs=2e-9)
  eig = np.linalg.eigvalsh(fd_hessian(x))
  np.testing.assert_allclose(eig, point.hessian_eigenvalues, rtol=1e-4)
  if name == "saddle":
    assert eig[0] < 0 < eig[1]
  else:
    assert eig[0] > 0


@pytest.mark.parametrize("name", sorted(POINTS))
def test_critical_points_autodiff(name):
  point = POINTS[name]
  with jax.enable_x64(True):
    x = jnp.asarray(point.location, jnp.float64)
    grad = np.asarray(GRAD(x))
    hess = np.asarray(HESSIAN(x))
  assert np.max(np.abs(grad)) < 1e-9
  np.testing.assert_allclose(hess, hess.T, atol=1e-15)  # float64, operands <~1e-2: 30 steps < 1e-16
  np.testing.assert_allclose(hess, fd_hessian(point.location), rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(np.linalg.eigvalsh(hess), point.hessian_eigenvalues, rtol=2e-6)
  # float32 autodiff is accurate enough for the optimizers.
  x32 = jnp.asarray(point.location, jnp.float32)
  hess32 = np.asarray(HESSIAN(x32))
  np.testing.assert_allclose(np.linalg.eigvalsh(hess32), point.hessian_eigenvalues, rtol=1e-3)


def test_the_sharp_minimum_is_sharper_and_lower():
  flat, sharp = testfns.FLAT_MINIMUM, testfns.SHARP_MINIMUM
  assert sharp.value < flat.value
  assert sharp.hessian_eigenvalues[1] > 7 * flat.hessian_eigenvalues[1]
  assert sum(sharp.hessian_eigenvalues) > 7 * sum(flat.hessian_eigenvalues)
  assert flat.location[0] == pytest.approx(20, abs=0.5)
  assert flat.location[1] == pytest.approx(30, abs=0.5)
  assert sharp.location[0] == pytest.approx(-17, abs=0.5)
  assert sharp.location[1] == pytest.approx(13, abs=0.5)


def test_minima_with_scipy():
  optimize = pytest.importorskip("scipy.optimize")
  found = []
  for x0 in ((30.0, 40.0), (10.0, 20.0), (-30.0, 5.0), (-10.0, 15.0), (-40.0, 40.0)):
    res = optimize.minimize(f_ref, x0, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-15, "maxiter": 5000})
    found.append(res.x)
  found = np.asarray(found)
  for x in found:
    d = [np.linalg.norm(x - np.asarray(p.location)) for p in (testfns.FLAT_MINIMUM, testfns.SHARP_MINIMUM)]
    assert min(d) < 1e-5, x
  # Both minima are found (the list of start points reaches each basin).
  assert any(np.linalg.norm(x - testfns.FLAT_MINIMUM.location) < 1e-5 for x in found)
  assert any(np.linalg.norm(x - testfns.SHARP_MINIMUM.location) < 1e-5 for x in found)


def test_no_other_local_minimum_on_a_grid():
  with jax.enable_x64(True):
    mu, s = np.meshgrid(np.linspace(-80, 80, 321), np.linspace(0.25, 100, 400))
    f = np.asarray(FN(jnp.asarray(np.stack([mu, s], -1))))
  inner = f[1:-1, 1:-1]
  neighbours = np.stack(
    [f[:-2, 1:-1], f[2:, 1:-1], f[1:-1, :-2], f[1:-1, 2:], f[:-2, :-2], f[2:, 2:], f[:-2, 2:], f[2:, :-2]]
  )
  rows, cols = np.nonzero(inner < neighbours.min(axis=0))
  locs = np.stack([mu[1:-1, 1:-1][rows, cols], s[1:-1, 1:-1][rows, cols]], -1)
  assert len(locs) == 2
  for loc in locs:
    d = [np.linalg.norm(loc - np.asarray(p.location)) for p in (testfns.FLAT_MINIMUM, testfns.SHARP_MINIMUM)]
    assert min(d) < 0.5


def test_finite_everywhere_including_nonpositive_s():
  mu = np.concatenate([-np.logspace(-3, 6, 10), [0.0], np.logspace(-3, 6, 10)])
  s = np.concatenate([-np.logspace(-3, 6, 10), [0.0, 1e-30, 1e-8], np.logspace(-3, 6, 10)])
  mm, ss = np.meshgrid(mu, s)
  pts = jnp.asarray(np.stack([mm.ravel(), ss.ravel()], -1), jnp.float32)
  vals = FN(pts)
  grads = jax.jit(jax.vmap(jax.grad(testfns.fisher_sam_toy)))(pts)
  assert bool(jnp.all(jnp.isfinite(vals)))
  assert bool(jnp.all(jnp.isfinite(grads)))
  # The s-gradient points back into s > 0 below the floor.
  below = np.asarray(pts[:, 1]) < testfns.DEFAULT_S_FLOOR
  assert np.all(np.asarray(grads)[below, 1] < 0)


def test_continuation_is_c1_at_the_floor():
  floor = testfns.DEFAULT_S_FLOOR
  with jax.enable_x64(True):
    fn = testfns.fisher_sam_toy
    g = GRAD
    for mu in (-30.0, 0.0, 25.0):
      lo, hi = jnp.array([mu, floor - 1e-9]), jnp.array([mu, floor + 1e-9])
      assert float(FN(lo)) == pytest.approx(float(FN(hi)), abs=1e-7)
      np.testing.assert_allclose(np.asarray(g(lo)), np.asarray(g(hi)), rtol=1e-6)
    # Above the floor the function is the published one, whatever the floor.
    x = jnp.array([5.0, 0.3])
    assert float(fn(x, s_floor=0.2)) == pytest.approx(f_ref(np.asarray(x)), rel=1e-12)


def test_shapes_dtypes_and_errors():
  x = jnp.broadcast_to(jnp.array([1.0, 5.0], jnp.float32), (3, 4, 2))
  assert FN(x).shape == (3, 4)
  assert FN(x).dtype == jnp.float32
  assert FN(x.astype(jnp.bfloat16)).dtype == jnp.float32
  assert FN(jnp.array([1, 5])).dtype == jnp.float32
  with jax.enable_x64(True):
    assert FN(jnp.full(2, 5.0, jnp.float32)).dtype == jnp.float32
    assert FN(jnp.full(2, 5.0, jnp.float64)).dtype == jnp.float64
  with pytest.raises(ValueError, match="shape"):
    FN(jnp.zeros(3))
  with pytest.raises(ValueError, match="shape"):
    FN(jnp.float32(1.0))
  for bad in (0.0, -1.0, float("nan"), "x"):
    with pytest.raises(ValueError, match="s_floor"):
      testfns.fisher_sam_toy(jnp.ones(2), s_floor=bad)
    with pytest.raises(ValueError, match="s_floor"):
      testfns.gaussian_kl(1.0, 1.0, 0.0, 1.0, s_floor=bad)


def test_jit_and_optax_step():
  import optax

  import xsam_jax

  fn = testfns.fisher_sam_toy
  x = jnp.array([-10.0, 20.0])
  tx = optax.chain(xsam_jax.xsam(rho=2.0, rho_max=4.0, alpha_update_period=1), optax.sgd(50.0))

  @jax.jit
  def step(x, state):
    updates, state = tx.update(jax.grad(fn)(x), state, x, loss_fn=fn)
    return optax.apply_updates(x, updates), state

  new, _ = step(x, tx.init(x))
  assert bool(jnp.all(jnp.isfinite(new)))
  assert float(FN(new)) < float(FN(x))
