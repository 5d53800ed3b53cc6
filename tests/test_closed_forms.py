"""Closed-form identities of XSAM and the slerp it is built on."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import xsam_jax
from tests import problems
from tests.tolerances import f32_bound, f32_rtol


def _one_update(tx, params, loss_fn):
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)
  return tx.update(g, state, params, loss_fn=loss_fn)


def test_fixed_alpha_one_is_sam():
  params, loss_fn = problems.mlp_problem(seed=4)
  for k in (1, 3):
    out_x, _ = _one_update(
      xsam_jax.xsam(0.3, 0.6, num_steps=k, alpha_update_period=None, alpha_init=1.0), params, loss_fn
    )
    out_s, _ = _one_update(xsam_jax.sam(0.3, num_steps=k), params, loss_fn)
    # The ascent point may be formed differently (with K = 1 XSAM never forms d_1): the gradient there
    # and norms over the parameters; errors scale with the largest gradient entry, not each entry.
    tol = f32_bound(*jax.tree.leaves(out_s), n_ops=2 * problems.LOSS_OPS + 3 * problems.NUM_PARAMS)
    for a, b in zip(jax.tree.leaves(out_x), jax.tree.leaves(out_s), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_k1_alpha0_is_g0_direction_with_g1_scale():
  params, loss_fn = problems.mlp_problem(seed=5)
  rho = 0.3
  out, state = _one_update(xsam_jax.xsam(rho, 2 * rho, alpha_update_period=None, alpha_init=0.0), params, loss_fn)
  g0 = jax.grad(loss_fn)(params)
  n0 = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g0)))
  w1 = jax.tree.map(lambda w, g: w + rho * g / n0, params, g0)
  g1 = jax.grad(loss_fn)(w1)
  n1 = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g1)))
  # g_0 times scalars (no cancellation: relative bounds); |g_1| from the two ascent points' gradients and norms.
  n1_rtol = f32_rtol(problems.LOSS_OPS + problems.NUM_PARAMS)
  for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(o, g * (n1 / n0), rtol=n1_rtol + f32_rtol(problems.NUM_PARAMS + 4))
  np.testing.assert_allclose(state.grad_norm, n1, rtol=n1_rtol)


def test_sam_k1_is_gradient_at_normalized_ascent_point():
  params, loss_fn = problems.mlp_problem(seed=6)
  rho = 0.2
  out, _ = _one_update(xsam_jax.sam(rho), params, loss_fn)
  g0 = jax.grad(loss_fn)(params)
  n0 = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g0)))
  expected = jax.grad(loss_fn)(jax.tree.map(lambda w, g: w + rho * g / n0, params, g0))
  # The ascent point written another way (|g_0| and 3 ops), then the gradient there: errors scale with
  # the largest gradient entry (each entry sums terms over examples and weights).
  tol = f32_bound(*jax.tree.leaves(expected), n_ops=problems.LOSS_OPS + problems.NUM_PARAMS + 4)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def _unit(rng, n):
  v = rng.normal(size=n)
  return v / np.linalg.norm(v)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(-1.0, 3.0), n=st.integers(2, 7))
def test_slerp_unit_norm_and_rotation_angle(seed, alpha, n):
  rng = np.random.default_rng(seed)
  v0, v1 = _unit(rng, n), _unit(rng, n)
  theta = float(np.arccos(np.clip(v0 @ v1, -1, 1)))
  with jax.enable_x64(True):
    a, b = xsam_jax.building_blocks.slerp_coefficients(jnp.float64(alpha), jnp.float64(theta))
  v = float(a) * v0 + float(b) * v1
  assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-9)
  if np.sin(theta) > 1e-6:
    # v lies in the plane and is rotated by alpha * theta from v0 towards v1.
    e1 = (v1 - (v0 @ v1) * v0) / np.linalg.norm(v1 - (v0 @ v1) * v0)
    np.testing.assert_allclose(v, np.cos(alpha * theta) * v0 + np.sin(alpha * theta) * e1, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(theta=st.floats(1e-3, np.pi - 1e-3))
def test_slerp_endpoints(theta):
  with jax.enable_x64(True):
    a0, b0 = xsam_jax.building_blocks.slerp_coefficients(0.0, jnp.float64(theta))
    a1, b1 = xsam_jax.building_blocks.slerp_coefficients(1.0, jnp.float64(theta))
  np.testing.assert_allclose([float(a0), float(b0), float(a1), float(b1)], [1.0, 0.0, 0.0, 1.0], atol=1e-12)


def test_slerp_degenerate_falls_back_to_v1():
  for theta in (0.0, 1e-10, np.pi, np.pi - 1e-10):
    a, b = xsam_jax.building_blocks.slerp_coefficients(jnp.asarray([0.0, 0.5, 2.0]), jnp.float32(theta))
    # The fallback returns the constants (0, 1): exact is the contract.
    np.testing.assert_array_equal(np.asarray(a), 0.0)
    np.testing.assert_array_equal(np.asarray(b), 1.0)
