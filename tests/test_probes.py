"""The alpha probes: batched (vmap), chunked (lax.map) and a Python loop agree;
the schedule follows the contract; ties and non-finite losses are handled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xsam_jax
from tests import problems
from tests.tolerances import assert_argmax_lead, f32_bound
from xsam_jax._src.xsam import parabola_vertex, select_alpha


def _plane(params, loss_fn, rho=0.3, k=1):
  g0 = jax.grad(loss_fn)(params)
  trace = xsam_jax.building_blocks.ascent(loss_fn, params, g0, rho=rho, num_steps=k)
  return xsam_jax.building_blocks.xsam_plane(trace.displacement, trace.grads[-1])


@pytest.mark.parametrize("batch_size", [None, 1, 3, 7, 21, 50])
def test_batched_probes_equal_python_loop(batch_size):
  params, loss_fn = problems.mlp_problem(seed=7)
  v0, v1, theta, _ = _plane(params, loss_fn)
  alphas = jnp.asarray(xsam_jax.DEFAULT_ALPHAS, jnp.float32)
  got = jax.jit(
    lambda p: xsam_jax.building_blocks.probe_losses(loss_fn, p, v0, v1, theta, alphas, 0.6, batch_size=batch_size)
  )(params)
  expected = []
  for alpha in xsam_jax.DEFAULT_ALPHAS:
    a, b = xsam_jax.building_blocks.slerp_coefficients(jnp.float32(alpha), theta)
    expected.append(loss_fn(jax.tree.map(lambda w, x, y, a=a, b=b: w + 0.6 * (a * x + b * y), params, v0, v1)))
  # Same plane; the slerp coefficients (sin, division: ~10 steps), the probe point (3) and the loss differ.
  np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=f32_bound(expected, n_ops=problems.LOSS_OPS + 16))


def test_xsam_outputs_do_not_depend_on_probe_batch_size():
  params, loss_fn = problems.mlp_problem(seed=8)
  outs = []
  for bs in ("auto", None, 1, 4):
    # Radii with a clear probe winner (alpha = 1.4): at 0.3, 0.6 the best alpha led by 3e-4, within the bound below.
    tx = xsam_jax.xsam(0.6, 1.2, alpha_update_period=1, probe_batch_size=bs)
    s = tx.init(params)
    u, s = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))(params, s)
    outs.append((u, s))
  u0, s0 = outs[0]
  # One program per batch size (vmap, lax.map): a probe loss chains g_0, g_1 and the loss, and 4 norms
  # or dot products over the parameters; the output, the two gradients and 3 of those.
  probe_tol = f32_bound(s0.probe_losses, n_ops=3 * problems.LOSS_OPS + 4 * problems.NUM_PARAMS)
  out_tol = f32_bound(*jax.tree.leaves(u0), n_ops=2 * problems.LOSS_OPS + 3 * problems.NUM_PARAMS)
  assert_argmax_lead(s0.probe_losses, probe_tol)
  for u, s in outs[1:]:
    assert float(s.alpha) == float(s0.alpha)  # the same grid point, not a near-tie (checked above)
    np.testing.assert_allclose(s.probe_losses, s0.probe_losses, rtol=0, atol=probe_tol)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u0), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=out_tol)


class _CountingLoss:
  """A loss that counts, through a host callback, how often it is evaluated."""

  def __init__(self, loss_fn):
    self.loss_fn, self.calls = loss_fn, 0

  def _tick(self, n):
    self.calls += int(np.size(n))

  def __call__(self, p):
    val = self.loss_fn(p)
    jax.debug.callback(self._tick, val)
    return val


@pytest.mark.parametrize("period", [1, 3, None])
def test_probe_schedule(period):
  """Probes exactly on the calls with count % period == 0, counting from 0."""
  params, loss_fn = problems.mlp_problem(seed=9)
  tx = xsam_jax.xsam(0.3, 0.6, alpha_update_period=period, alpha_init=0.35)
  state = tx.init(params)
  probed = []
  for step in range(7):
    counting = _CountingLoss(loss_fn)
    g = jax.grad(loss_fn)(params)
    _, new_state = tx.update(g, state, params, loss_fn=counting)
    jax.effects_barrier()
    n_alphas = len(xsam_jax.DEFAULT_ALPHAS)
    # the ascent evaluates loss_fn once (inside its grad); probes add n_alphas
    probed.append(counting.calls > n_alphas)
    if not probed[-1]:  # carried over unchanged: bitwise is the contract
      assert float(new_state.alpha) == float(state.alpha)
      np.testing.assert_array_equal(new_state.probe_losses, state.probe_losses)
    assert int(new_state.count) == step + 1
    state = new_state
  expected = [period is not None and c % period == 0 for c in range(7)]
  assert probed == expected
  if period is None:
    assert float(state.alpha) == pytest.approx(0.35)


def test_ties_pick_the_first_and_nonfinite_never_wins():
  alphas = jnp.asarray([0.0, 0.5, 1.0, 1.5])
  from xsam_jax._src.xsam import select_alpha

  a, m = select_alpha(jnp.asarray([1.0, 3.0, 3.0, 2.0]), alphas, jnp.float32(9.0))
  assert float(a) == 0.5
  assert float(m) == 3.0
  a, m = select_alpha(jnp.asarray([1.0, jnp.nan, jnp.inf, 2.0]), alphas, jnp.float32(9.0))
  assert float(a) == 1.5
  assert float(m) == 2.0
  a, _ = select_alpha(jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, jnp.nan]), alphas, jnp.float32(9.0))
  assert float(a) == 9.0


def test_nan_probe_losses_keep_state_finite():
  """A loss that is NaN away from w must not corrupt alpha or the output."""
  params = {"w": jnp.array([0.3, -0.2])}

  def loss_fn(p):
    w = p["w"]
    val = jnp.sum(w**2) + w[0] * w[1]
    return jnp.where(jnp.linalg.norm(w) > 0.6, jnp.nan, val)

  tx = xsam_jax.xsam(0.05, 5.0, alpha_update_period=1, alpha_init=0.4)
  s = tx.init(params)
  u, s = tx.update(jax.grad(loss_fn)(params), s, params, loss_fn=loss_fn)
  assert float(s.alpha) == pytest.approx(0.4)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


def test_auto_probe_strategy_is_sequential_on_cpu():
  from xsam_jax._src.xsam import resolve_probe_batch_size

  assert jax.default_backend() == "cpu"
  assert resolve_probe_batch_size("auto") == 1
  assert resolve_probe_batch_size(None) is None
  assert resolve_probe_batch_size(3) == 3


# --- sub-grid refinement (alpha_refinement="parabola") ----------------------


@settings(max_examples=60, deadline=None)
@given(
  vertex=st.floats(0.0, 2.0),
  curvature=st.floats(0.05, 50.0),
  offset=st.floats(-10.0, 10.0),
  stride=st.sampled_from([1, 2, 4, 5]),
)
def test_parabola_refinement_recovers_the_vertex_of_a_concave_quadratic(vertex, curvature, offset, stride):
  grid = np.asarray(xsam_jax.DEFAULT_ALPHAS[::stride], np.float64)
  losses = offset - curvature * (grid - vertex) ** 2
  with jax.enable_x64(True):
    alpha, max_loss = select_alpha(jnp.asarray(losses), jnp.asarray(grid), 1.0, refine="parabola")
  i = int(np.argmax(losses))
  if 0 < i < len(grid) - 1:  # an interior maximum: the quadratic is recovered exactly
    np.testing.assert_allclose(float(alpha), vertex, atol=1e-6)
  else:  # a maximum at an end of the grid is kept
    assert float(alpha) == np.float32(grid[i])
  assert float(max_loss) == pytest.approx(losses[i])


def test_parabola_refinement_edge_cases():
  grid = jnp.asarray([0.0, 0.5, 1.0, 1.5], jnp.float32)
  flat = jnp.asarray([1.0, 2.0, 2.0, 2.0], jnp.float32)  # first maximum at 0.5; its parabola peaks at 0.75
  assert float(select_alpha(flat, grid, 1.0, refine="parabola")[0]) == pytest.approx(0.75)
  plateau = jnp.asarray([1.0, 1.0, 1.0, 0.0], jnp.float32)  # flat triple around the first maximum (index 0: an end)
  assert float(select_alpha(plateau, grid, 1.0, refine="parabola")[0]) == 0.0
  nan_neighbour = jnp.asarray([1.0, 3.0, jnp.nan, 0.0], jnp.float32)
  assert float(select_alpha(nan_neighbour, grid, 1.0, refine="parabola")[0]) == 0.5
  all_nan = jnp.full([4], jnp.nan, jnp.float32)
  assert float(select_alpha(all_nan, grid, 0.3, refine="parabola")[0]) == pytest.approx(0.3)
  # a flat triple in the interior: zero denominator, the grid point is kept
  assert float(parabola_vertex(0.0, 1.0, 2.0, 5.0, 5.0, 5.0)) == 1.0


def test_refined_alpha_is_the_vertex_of_the_stored_probe_losses():
  params, loss_fn = problems.mlp_problem(seed=3)
  grid = (0.0, 0.5, 1.0, 1.5, 2.0)
  tx = xsam_jax.xsam(0.3, 0.6, alphas=grid, alpha_update_period=1, alpha_refinement="parabola")
  _, s = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))(params, tx.init(params))
  losses = np.asarray(s.probe_losses, np.float64)
  i = int(np.argmax(losses))
  expected = grid[i]
  if 0 < i < len(grid) - 1:
    a, b, _ = np.polyfit(grid[i - 1 : i + 2], losses[i - 1 : i + 2], 2)
    expected = float(np.clip(-b / (2 * a), grid[i - 1], grid[i + 1])) if a < 0 else grid[i]
  # Both from the same stored float32 losses: only the vertex formula's float32 rounding differs (~1e-8 here).
  np.testing.assert_allclose(float(s.alpha), expected, atol=1e-4)
