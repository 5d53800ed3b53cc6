"""Tests of xsam_jax.sharpness: Hessian spectra, average sharpness, loss surfaces."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_jax
from tests.tolerances import assert_argmax_lead, assert_trees_within, f32_bound, f32_rtol
from xsam_jax import sharpness

# Rounding steps (tests/tolerances.py) of the tiny MLP, with M the size of its loss (~1.5): one loss
# or gradient chains reductions of length 3, 8, 2 and 24 (the mean), tanh, exp and log, on logits up
# to ~5, about 50 steps at M (64 with slack); a norm or dot product over its 50 parameters is 50.
MLP_LOSS_OPS = 64
MLP_PARAMS = 50


def _quadratic(eigs, seed=0):
  """``0.5 w^T H w`` with ``H = Q diag(eigs) Q^T`` on a two-leaf pytree."""
  n = len(eigs)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  hess = q @ np.diag(eigs) @ q.T
  m = n // 2

  def loss_fn(p):
    v = jnp.concatenate([p["a"].ravel(), p["b"]])
    return 0.5 * v @ jnp.asarray(hess, v.dtype) @ v

  params = {"a": jnp.ones((m // 2, 2)), "b": jnp.ones(n - 2 * (m // 2))}
  return loss_fn, params, hess


@functools.cache
def _tiny_mlp(dtype, seed=0, n=24, din=3, dh=8, dout=2):
  """(loss_fn, params); cached so that jit caches keyed on ``loss_fn`` are shared by tests."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, din)), dtype)
  labels = jnp.asarray(rng.integers(0, dout, size=n))
  params = {
    "dense1": {
      "kernel": jnp.asarray(rng.normal(size=(din, dh)), dtype),
      "bias": jnp.asarray(0.1 * rng.normal(size=dh), dtype),
    },
    "dense2": {"kernel": jnp.asarray(rng.normal(size=(dh, dout)), dtype), "bias": jnp.zeros(dout, dtype)},
  }

  def loss_fn(p):
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"][None, :])
    logits = h @ p["dense2"]["kernel"] + p["dense2"]["bias"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn, params


def _dense_hessian(loss_fn, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat), np.float64)


@functools.cache
def _tiny_mlp_dense_hessian():
  """The float64 dense Hessian of the tiny MLP (computed once)."""
  with jax.enable_x64(True):
    return _dense_hessian(*_tiny_mlp(jnp.float64))


# --------------------------------------------------------------------- Hessian


def test_hvp_matches_dense_hessian():
  with jax.enable_x64(True):
    loss_fn, params = _tiny_mlp(jnp.float64)
    hess = _tiny_mlp_dense_hessian()
    flat, unravel = ravel_pytree(params)
    v = np.random.default_rng(1).normal(size=flat.size)
    hv = sharpness.hessian_vector_product(loss_fn, params, unravel(jnp.asarray(v)))
    np.testing.assert_allclose(ravel_pytree(hv)[0], hess @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
  "eigs",
  [
    np.linspace(0.1, 10.0, 40),  # positive definite
    np.concatenate([np.linspace(-50.0, -1.0, 30), [0.5, 2.0, 3.0, 7.0]]),  # indefinite, |min| >> max
    np.linspace(-9.0, -1.0, 34),  # negative definite: the top-k are negative
  ],
  ids=["psd", "indefinite", "negative"],
)
def test_top_eigenvalues_of_quadratics(eigs):
  with jax.enable_x64(True):
    loss_fn, params, hess = _quadratic(eigs)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    k = 3
    out = sharpness.hessian_eigenpairs(loss_fn, params, k, max_iters=300)
    expected = np.sort(eigs)[::-1][:k]
    np.testing.assert_allclose(out.eigenvalues, expected, rtol=1e-6, atol=1e-8)
    assert int(out.num_iterations) < 300, "the shift must let LOBPCG stop early"
    # Eigenvectors come back as pytrees with a leading axis k, unit, and H v = lambda v.
    assert out.eigenvectors["a"].shape == (k, *params["a"].shape)
    vecs = np.stack([ravel_pytree(jax.tree.map(lambda x, i=i: x[i], out.eigenvectors))[0] for i in range(k)], 1)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(hess @ vecs, vecs * expected[None, :], atol=1e-3 * np.abs(eigs).max())


def test_dense_fallback_for_small_problems():
  eigs = np.array([3.0, -5.0, 2.0, 1.0, 0.5, 0.0, -1.0, 0.2])
  loss_fn = lambda p: 0.5 * jnp.sum(jnp.asarray(eigs, p.dtype) * p**2)
  out = sharpness.hessian_eigenpairs(loss_fn, jnp.ones(8), k=3)  # 5 * 3 >= 8: dense path
  # eigh is backward stable: eigenvalues within ~n eps |H| (n = 8), eigenvectors within that over the gap.
  tol, gap = f32_bound(eigs, n_ops=8), 1.0
  np.testing.assert_allclose(out.eigenvalues, [3.0, 2.0, 1.0], rtol=0, atol=tol)
  assert int(out.num_iterations) == 0
  np.testing.assert_allclose(np.abs(out.eigenvectors[0]), np.eye(8)[0], atol=tol / gap)


def test_zero_hessian_gives_zeros_without_nan():
  loss_fn = lambda p: jnp.sum(jnp.arange(30.0) * p)
  lam = sharpness.hessian_eigenvalues(loss_fn, jnp.ones(30), k=2, max_iters=20)
  np.testing.assert_allclose(lam, 0.0, atol=1e-6)  # H = 0 exactly (a linear loss): any tiny atol


def test_tiny_mlp_against_dense_eigh_float64():
  with jax.enable_x64(True):
    loss_fn, params = _tiny_mlp(jnp.float64)
    dense = np.linalg.eigvalsh(_tiny_mlp_dense_hessian())[::-1]
    assert dense[-1] < 0 < dense[0], "the MLP Hessian is indefinite here"
    out = sharpness.hessian_eigenpairs(loss_fn, params, k=5, block_size=8, max_iters=400)
    np.testing.assert_allclose(out.eigenvalues, dense[:5], rtol=1e-6, atol=1e-9)


def test_tiny_mlp_float32_default_close_to_float64_and_deterministic():
  dense = np.linalg.eigvalsh(_tiny_mlp_dense_hessian())[::-1]
  loss32, params32 = _tiny_mlp(jnp.float32)
  lam = sharpness.hessian_eigenvalues(loss32, params32, k=2)
  assert lam.dtype == jnp.float32
  np.testing.assert_allclose(lam, dense[:2], rtol=1e-3)
  again = sharpness.hessian_eigenvalues(loss32, params32, k=2, key=jax.random.key(0))
  # The default key is key(0): the same program on the same inputs, so bitwise equal is the contract.
  np.testing.assert_array_equal(lam, again)


def test_eigen_arguments_validated():
  loss_fn, params, _ = _quadratic(np.linspace(1, 2, 20))
  with pytest.raises(ValueError, match="k"):
    sharpness.hessian_eigenvalues(loss_fn, params, k=0)
  with pytest.raises(ValueError, match="block_size"):
    sharpness.hessian_eigenvalues(loss_fn, params, k=3, block_size=2)
  with pytest.raises(ValueError, match="k"):
    sharpness.hessian_eigenvalues(loss_fn, params, k=21)


# ------------------------------------------------------------ directions


def _conv_params():
  rng = np.random.default_rng(0)
  return {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32), "bias": jnp.ones(4)},
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(5, 3)) * np.array([1.0, 0.0, 3.0]), jnp.float32),
      "bias": jnp.ones(3),
    },
    "norm": {"scale": jnp.full(5, 2.0)},
  }


def test_filter_normalization_property():
  params = _conv_params()
  d = sharpness.random_direction(jax.random.key(0), params)
  for name in ("conv", "dense"):
    w, dk = params[name]["kernel"], d[name]["kernel"]
    axes = tuple(range(w.ndim - 1))  # Flax: output features on the last axis
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(dk**2, axis=axes)), jnp.sqrt(jnp.sum(w**2, axis=axes)), rtol=1e-5)
  assert np.all(np.isfinite(d["dense"]["kernel"]))  # the zero filter stays zero, no NaN
  np.testing.assert_array_equal(d["dense"]["kernel"][:, 1], 0.0)
  for leaf in (d["conv"]["bias"], d["dense"]["bias"], d["norm"]["scale"]):
    np.testing.assert_array_equal(leaf, 0.0)  # rank-1 leaves zeroed by default (Li et al.)


def test_other_normalizations():
  params = _conv_params()
  key = jax.random.key(1)
  d = sharpness.random_direction(key, params, vector_leaves="normalize")
  np.testing.assert_allclose(jnp.linalg.norm(d["norm"]["scale"]), jnp.linalg.norm(params["norm"]["scale"]), rtol=1e-5)
  layer = sharpness.random_direction(key, params, normalization="layer")
  np.testing.assert_allclose(
    jnp.linalg.norm(layer["conv"]["kernel"]), jnp.linalg.norm(params["conv"]["kernel"]), rtol=1e-5
  )
  unit = sharpness.random_direction(key, params, normalization="unit", vector_leaves="normalize")
  np.testing.assert_allclose(xsam_jax._src.tree_math.tree_norm(unit), 1.0, rtol=1e-5)
  elem = sharpness.normalize_direction(jax.tree.map(jnp.ones_like, params), params, normalization="element")
  np.testing.assert_array_equal(elem["conv"]["kernel"], jnp.abs(params["conv"]["kernel"]))  # 1 * |w|: exact
  with pytest.raises(ValueError, match="normalization"):
    sharpness.random_direction(key, params, normalization="bogus")
  with pytest.raises(ValueError, match="vector_leaves"):
    sharpness.random_direction(key, params, vector_leaves="bogus")


# ------------------------------------------------------- average sharpness


def test_average_sharpness_exact_isotropic_case(maybe_jit):
  # L(v) = c/2 |v_kernel - w_kernel|^2: every filter-normalized d has |d| = |w_kernel|,
  # so L(w + rho d) - L(w) = c/2 rho^2 |w_kernel|^2 for every direction.
  params = _conv_params()
  c, rho = 3.0, 0.05

  def loss_fn(p):
    return 0.5 * c * sum(jnp.sum((p[n]["kernel"] - params[n]["kernel"]) ** 2) for n in ("conv", "dense"))

  expected = 0.5 * c * rho**2 * sum(float(jnp.sum(params[n]["kernel"] ** 2)) for n in ("conv", "dense"))
  fn = maybe_jit(lambda p, k: sharpness.average_sharpness(loss_fn, p, k, rho=rho, num_directions=6))
  np.testing.assert_allclose(fn(params, jax.random.key(0)), expected, rtol=1e-5)


def test_average_sharpness_deterministic_and_batched():
  loss_fn, params = _tiny_mlp(jnp.float32)
  key = jax.random.key(7)
  kw = dict(rho=0.1, num_directions=8)
  a = sharpness.average_sharpness(loss_fn, params, key, **kw)
  b = sharpness.average_sharpness(loss_fn, params, key, **kw)
  c = sharpness.average_sharpness(loss_fn, params, key, batch_size=3, **kw)
  other = sharpness.average_sharpness(loss_fn, params, jax.random.key(8), **kw)
  losses = sharpness.perturbed_losses(loss_fn, params, key, **kw)
  assert losses.shape == (8,)
  assert float(a) == float(b)  # the same programs on the same inputs: bitwise equal is the contract
  # a = mean(L(w + rho d_i)) - L(w) ~ 0.02 keeps the absolute error of the losses (~1.5) it subtracts.
  # vmap vs lax.map: each loss and its direction (normal sample, filter norm, scaling: < 24 steps), the mean (8).
  np.testing.assert_allclose(c, a, rtol=0, atol=f32_bound(losses, n_ops=MLP_LOSS_OPS + 24 + 8))
  assert float(other) != float(a)
  # Only L(w) differs: op by op here, jitted inside average_sharpness.
  np.testing.assert_allclose(jnp.mean(losses) - loss_fn(params), a, rtol=0, atol=f32_bound(losses, n_ops=MLP_LOSS_OPS))


@pytest.mark.parametrize("normalization", ["unit", "element"])
def test_average_sharpness_matches_closed_form_expectation(normalization):
  # L(v) = 1/2 (v - c)^T H (v - c) + const. For d symmetric in distribution,
  # E[L(w + rho d)] - L(w) = rho^2/2 E[d^T H d]:
  #   "unit" (d uniform on the unit sphere): rho^2/2 tr(H)/n;
  #   "element" (d = z * |w|, z ~ N(0, I)): rho^2/2 sum_i H_ii w_i^2.
  n, rho, num = 12, 0.5, 4000
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, n))
  hess = a @ a.T / n + np.eye(n)
  w = rng.normal(size=n)
  centre = rng.normal(size=n)
  loss_fn = lambda v: 0.5 * (v - centre) @ jnp.asarray(hess, v.dtype) @ (v - centre)
  params = jnp.asarray(w, jnp.float32)[None, :]  # a (1, n) kernel: "unit"/"element" treat it as a whole
  flat_loss = lambda p: loss_fn(p[0])
  losses = sharpness.perturbed_losses(
    flat_loss, params, jax.random.key(0), rho=rho, num_directions=num, normalization=normalization
  )
  sample = np.asarray(losses, np.float64) - float(flat_loss(params))
  if normalization == "unit":
    expected = 0.5 * rho**2 * np.trace(hess) / n
  else:
    expected = 0.5 * rho**2 * np.sum(np.diag(hess) * w**2)
  stderr = sample.std() / np.sqrt(num)
  assert abs(sample.mean() - expected) < 5 * stderr, (sample.mean(), expected, stderr)


# ----------------------------------------------------------- loss surfaces


def test_loss_surface_closed_form_quadratic():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  amat = a @ a.T
  b = rng.normal(size=4)
  loss_fn = lambda p: 0.5 * p["v"] @ jnp.asarray(amat, jnp.float32) @ p["v"] + jnp.asarray(b, jnp.float32) @ p["v"]
  w = rng.normal(size=4)
  d1, d2 = rng.normal(size=4), rng.normal(size=4)
  xs, ys = np.linspace(-1, 1, 5), np.linspace(-2, 2, 3)
  surf = sharpness.loss_surface(
    loss_fn, {"v": jnp.asarray(w, jnp.float32)}, {"v": jnp.asarray(d1)}, {"v": jnp.asarray(d2)}, xs=xs, ys=ys
  )
  assert surf.losses.shape == (3, 5)
  grid_points = []
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      v = w + x * d1 + y * d2
      grid_points.append(v)
      np.testing.assert_allclose(surf.losses[i, j], 0.5 * v @ amat @ v + b @ v, rtol=1e-4, atol=1e-4)
  chunked = sharpness.loss_surface(
    loss_fn,
    {"v": jnp.asarray(w, jnp.float32)},
    {"v": jnp.asarray(d1)},
    {"v": jnp.asarray(d2)},
    xs=xs,
    ys=ys,
    batch_size=4,
  )
  # lax.map vs vmap: v = w + x d1 + y d2 (4 steps), A v and v . (A v) (4 each), b . v (4), 2 more; errors
  # relative to the sum of |terms| (the quadratic in |v|, |A|, |b|), not to the loss, which cancels.
  terms = max(0.5 * np.abs(v) @ np.abs(amat) @ np.abs(v) + np.abs(b) @ np.abs(v) for v in grid_points)
  np.testing.assert_allclose(chunked.losses, surf.losses, rtol=0, atol=f32_bound(terms, n_ops=18))


def test_random_plane_surface_is_centred():
  loss_fn, params = _tiny_mlp(jnp.float32)
  d1, d2 = sharpness.random_plane(jax.random.key(0), params)
  surf = sharpness.loss_surface(loss_fn, params, d1, d2, xs=[-0.5, 0.0, 0.5], ys=[0.0, 0.3])
  # w + 0 d1 + 0 d2 = w exactly; the loss is one program vmapped under jit there, op by op here.
  np.testing.assert_allclose(
    surf.losses[0, 1], loss_fn(params), rtol=0, atol=f32_bound(loss_fn(params), n_ops=MLP_LOSS_OPS)
  )


def _weights_only(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def _asam_scale(params, options):
  """ASAM's ``T = |w| + eta`` on the leaves ``adaptive_mask`` marks, 1 elsewhere (all 1 unless adaptive)."""
  if not options.get("adaptive"):
    return jax.tree.map(jnp.ones_like, params)
  mask = options.get("adaptive_mask", lambda p: jax.tree.map(lambda _: True, p))(params)
  return jax.tree.map(lambda w, m: jnp.abs(w) + 0.01 if m else jnp.ones_like(w), params, mask)


@pytest.mark.parametrize(
  ("options", "rho", "rho_max"),
  [
    ({}, 2.0, 4.0),
    ({"alpha_refinement": "parabola"}, 2.0, 4.0),
    ({"adaptive": True, "adaptive_mask": _weights_only}, 2.0, 4.0),
    ({"adaptive": True, "alpha_refinement": "parabola"}, 3.0, 6.0),
    ({"num_steps": 2}, 3.0, 6.0),
  ],
  ids=["plain", "parabola", "adaptive", "adaptive-parabola", "K2"],
)
def test_xsam_directions_agree_with_the_optimizer(options, rho, rho_max):
  """The analysis's alpha and direction are those of one probing xsam update with the same options."""
  loss_fn, params = _tiny_mlp(jnp.float32)
  # Radii with a clear probe winner (checked below) at an interior grid point and theta ~ 0.2-0.4: at
  # rho = 0.2, rho_max = 0.5 the winner led by 7e-7, a few ulps of the losses, so rounding decided it.
  num_steps = options.get("num_steps", 1)
  plane = sharpness.xsam_directions(loss_fn, params, rho=rho, rho_max=rho_max, **options)
  tx = xsam_jax.xsam(rho=rho, rho_max=rho_max, alpha_update_period=1, **options)
  grads = jax.grad(loss_fn)(params)
  out, state = jax.jit(lambda g, st, p: tx.update(g, st, p, loss_fn=loss_fn))(grads, tx.init(params), params)
  alpha = float(optax.tree.get(state, "alpha"))
  losses = np.asarray(optax.tree.get(state, "probe_losses"), np.float64)
  theta = float(optax.tree.get(state, "theta"))
  # Two programs compute the same thing. A probe loss chains g_0 .. g_K and the loss (K + 2 MLP chains)
  # and the norms |g_0| .. |g_K|, the cosine and the probe point (K + 3 over the parameters); ASAM's
  # T = |w| + eta and its products add a few elementwise steps (8).
  extra = 8 if options.get("adaptive") else 0
  probe_tol = f32_bound(losses, n_ops=(num_steps + 2) * MLP_LOSS_OPS + (num_steps + 3) * MLP_PARAMS + extra)
  np.testing.assert_allclose(plane.probe_losses, losses, rtol=0, atol=probe_tol)
  assert_argmax_lead(losses, probe_tol)
  best = int(np.argmax(losses))
  if options.get("alpha_refinement") == "parabola":
    # The vertex on the uniform grid (step h) through the best point and its neighbours is
    # x* = x_i - (h/2) (y_- - y_+) / D, D = 2 y_i - y_- - y_+, with |x* - x_i| <= h/2: each of the three
    # losses moves it by at most h/D times its error; the vertex formula itself rounds a few times.
    assert 0 < best < losses.size - 1, best
    h = float(plane.alphas[1] - plane.alphas[0])
    curvature = 2 * losses[best] - losses[best - 1] - losses[best + 1]
    alpha_tol = 3 * h * probe_tol / curvature + f32_bound(alpha, n_ops=8)
    # Refinement moved alpha off the grid by more than twice the tolerance: the check tells them apart.
    assert abs(alpha - float(plane.alphas[best])) > 2 * alpha_tol, (alpha, alpha_tol)
    np.testing.assert_allclose(plane.alpha, alpha, rtol=0, atol=alpha_tol)
  else:
    alpha_tol = 0.0
    assert float(plane.alpha) == alpha  # the same grid point, not a near-tie (checked above)
  # Unit in-plane quantities (cos theta, e2, coordinates) come from the gradients and their norms;
  # e2 = (v1 - cos theta v0) / sin theta divides their error by sin theta.
  plane_tol = f32_bound(1.0, n_ops=(num_steps + 1) * (MLP_LOSS_OPS + MLP_PARAMS) + extra) / np.sin(theta)
  np.testing.assert_allclose(plane.theta, theta, rtol=0, atol=plane_tol)
  grad_norm = optax.tree.get(state, "grad_norm")
  np.testing.assert_allclose(plane.grad_norm, grad_norm, rtol=f32_rtol((num_steps + 1) * MLP_LOSS_OPS + MLP_PARAMS))
  tree_math = xsam_jax._src.tree_math
  # In XSAM's coordinates (ASAM's w / T when adaptive; T = 1 otherwise) e1 / T, e2 / T are orthonormal and
  # XSAM's update, a gradient there T out, is |.| v(alpha) = |.| (x e1 + y e2) / T.
  scale = _asam_scale(params, options)
  e1, e2 = (jax.tree.map(jnp.divide, e, scale) for e in (plane.e1, plane.e2))
  np.testing.assert_allclose(tree_math.tree_vdot(e1, e2), 0.0, atol=plane_tol)
  # e2 is normalized by one norm over the parameters and measured by another.
  np.testing.assert_allclose(tree_math.tree_norm(e2), 1.0, rtol=f32_rtol(2 * MLP_PARAMS + extra))
  x, y = plane.xsam_xy
  direction = tree_math.tree_lincomb(x, e1, y, e2)
  update, _ = tree_math.tree_normalize(jax.tree.map(jnp.multiply, out, scale))
  # (x, y) and e1, e2 each within plane_tol; theta's error rotates v(alpha) by alpha times it, and
  # alpha's by theta times that.
  assert_trees_within(update, direction, (2 + alpha) * plane_tol + theta * alpha_tol)
  np.testing.assert_allclose(plane.sam_xy, [np.cos(theta), np.sin(theta)], atol=plane_tol)
  np.testing.assert_allclose(plane.ascent_xy[1], 0.0, atol=rho * plane_tol)  # e1 = v0 points at the ascent point
  if num_steps == 1:
    np.testing.assert_allclose(plane.sgd_xy, [1.0, 0.0], atol=plane_tol)  # v0 is the (T) g_0 direction
    np.testing.assert_allclose(plane.ascent_xy[0], rho, rtol=plane_tol)  # |T^{-1} d_1| = rho


def test_xsam_directions_options_validated():
  loss_fn, params = _tiny_mlp(jnp.float32)
  directions = functools.partial(sharpness.xsam_directions, loss_fn, params, rho=0.1, rho_max=0.2)
  with pytest.raises(ValueError, match="alpha_refinement"):
    directions(alpha_refinement="cubic")
  with pytest.raises(ValueError, match="strictly increasing"):
    directions(alphas=[0.0, 1.0, 0.5], alpha_refinement="parabola")
  with pytest.raises(ValueError, match="adaptive_mask"):
    directions(adaptive=True, adaptive_mask={"dense1": True})
  with pytest.raises(ValueError, match="eta"):
    directions(adaptive=True, eta=-1.0)


def test_xsam_directions_given_alpha():
  loss_fn = lambda p: jnp.sum(jnp.array([1.0, 30.0, 5.0]) * p**2)
  plane = sharpness.xsam_directions(loss_fn, jnp.array([1.0, 0.1, 0.2]), rho=0.3, rho_max=0.6, alpha=0.5)
  assert float(plane.theta) > 0.1
  np.testing.assert_allclose(plane.alpha, 0.5)
  np.testing.assert_array_equal(plane.probe_losses, 0.0)  # no probes
  half = 0.5 * float(plane.theta)
  np.testing.assert_allclose(plane.xsam_xy, [np.cos(half), np.sin(half)], atol=1e-5)


def test_xsam_directions_degenerate_plane():
  """g_1 parallel to g_0 (one nonzero coordinate): the residual of v1 off v0 is rounding error, so e2 is the
  random fallback (in float32 theta itself comes out of arccos at ~3.5e-4, not 0)."""
  loss_fn = lambda p: jnp.sum(p**2)
  plane = sharpness.xsam_directions(loss_fn, jnp.array([3.0, 0.0, 0.0]), rho=0.1, rho_max=0.2)
  assert float(plane.theta) < 1e-3
  assert float(jnp.abs(plane.e2[0])) < 1e-5  # not along e1 ...
  assert float(jnp.linalg.norm(plane.e2[1:])) > 0.99  # ... but in the random fallback's directions
  for leaf in (plane.e1, plane.e2, plane.xsam_xy, plane.sam_xy):
    assert np.all(np.isfinite(leaf))
  # e2: a 3-element random vector, projected off e1 and normalized; the check is one more dot product.
  np.testing.assert_allclose(jnp.vdot(plane.e1, plane.e2), 0.0, atol=f32_bound(1.0, n_ops=16))
  np.testing.assert_allclose(jnp.linalg.norm(plane.e2), 1.0, rtol=1e-5)
  # v(alpha) for theta < 1e-3 is within alpha * theta < 2e-3 of v1 (alpha <= 2): xsam_xy ~ sam_xy ~ (1, 0).
  np.testing.assert_allclose(plane.xsam_xy, plane.sam_xy, atol=2e-3)


def test_xsam_directions_nearly_parallel_plane():
  """g_1 parallel to g_0 up to rounding: whether cos(theta) rounds to 1 depends on the compiler; either way the
  basis is orthonormal (the residual of v1 is projected off v0 twice)."""
  loss_fn = lambda p: jnp.sum(p**2)
  plane = sharpness.xsam_directions(loss_fn, jnp.array([1.0, 2.0, 3.0]), rho=0.1, rho_max=0.2)
  assert float(plane.theta) < 1e-3
  for leaf in (plane.e1, plane.e2, plane.xsam_xy, plane.sam_xy):
    assert np.all(np.isfinite(leaf))
  # Each projection leaves an error along e1 of a few ulps of the vector it projects; normalized: 16 ulps of 1.
  np.testing.assert_allclose(jnp.vdot(plane.e1, plane.e2), 0.0, atol=f32_bound(1.0, n_ops=16))
  np.testing.assert_allclose(jnp.linalg.norm(plane.e2), 1.0, rtol=1e-5)


def test_plot_xsam_plane(tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  loss_fn, params = _tiny_mlp(jnp.float32)
  plane = sharpness.xsam_directions(loss_fn, params, rho=0.2, rho_max=0.5)
  grid = np.linspace(-1.0, 1.0, 9)
  surf = sharpness.loss_surface(loss_fn, params, plane.e1, plane.e2, xs=grid, ys=grid)
  ax = sharpness.plot_xsam_plane(plane, surf)
  assert len(ax.get_legend().get_texts()) == 4  # SGD, SAM, XSAM arrows and the ascent point
  path = tmp_path / "plane.png"
  ax.figure.savefig(path, dpi=60)
  plt.close(ax.figure)
  assert path.stat().st_size > 1000


def test_import_pulls_no_plotting_or_flax():
  code = (
    "import sys, xsam_jax, xsam_jax.sharpness; "
    "bad = [m for m in ('matplotlib', 'flax', 'tensorflow') if m in sys.modules]; "
    "assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
