"""The shared battery: every transformation in tests/registry.py runs it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import problems
from tests.registry import CASES, INJECT
from tests.tolerances import assert_argmax_lead, assert_trees_close, f32_bound

NAMES = sorted(CASES)

# Rounding steps (tests/tolerances.py) of one update of any method here on problems.mlp_problem, along
# two code paths: up to 4 ascent gradients, a probe loss or 3 Hessian-vector products (2 gradients
# each), and up to 10 norms or dot products over the parameters.
STEP_OPS = 10 * problems.LOSS_OPS + 10 * problems.NUM_PARAMS
# Of an XSAM probe loss: up to 4 ascent gradients (K = 3) and the probe, and 5 norms or dot products.
PROBE_OPS = 5 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS


def _probe_states(state):
  """The XSAM states (those with probe losses) inside a possibly wrapped optimizer state."""
  if hasattr(state, "probe_losses"):
    return [state]
  if isinstance(state, (tuple, list)):
    return [s for x in state for s in _probe_states(x)]
  if isinstance(state, dict):
    return [s for x in state.values() for s in _probe_states(x)]
  return []


def _assert_no_near_tie(state):
  """XSAM's alpha is an argmax over probe losses: two code paths pick the same grid point only if the
  winner leads by more than their rounding (assert_argmax_lead); the registry's radii ensure it."""
  for s in _probe_states(state):
    if np.any(np.asarray(s.probe_losses) != 0):  # zeros before the first probe round
      assert_argmax_lead(s.probe_losses, f32_bound(s.probe_losses, n_ops=PROBE_OPS))


def _chain(name):
  return optax.chain(CASES[name](), optax.sgd(0.05, momentum=0.9))


def _run(name, params, loss_fn, steps=3, jit=True):
  return problems.train(_chain(name), params, loss_fn, steps, jit=jit)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_nojit(name):
  params, loss_fn = problems.mlp_problem(seed=11)
  p_jit, s_jit, u_jit = _run(name, params, loss_fn, jit=True)
  p_eager, s_eager, _ = _run(name, params, loss_fn, jit=False)
  # One jitted program against a compiled function per update (the eager path): two programs, which
  # XLA may fuse and round differently. 3 steps: each update within STEP_OPS of its size, moved by
  # lr = 0.05 and summed by momentum 0.9 (weights 1 + 1.9 + 2.71 < 6): under 0.3 STEP_OPS, plus a
  # rounding of the params per step. Probe rounds must have a clear winner (no near-tie).
  _assert_no_near_tie(s_jit)
  problems.assert_dtypes_kept(params, p_jit, u_jit, jnp.float32)  # float32 of test_params_dtype_is_kept
  assert_trees_close(p_eager, p_jit, 0.3 * STEP_OPS + 3)
  assert_trees_close(s_eager, s_jit, STEP_OPS)
  for a, b in zip(_probe_states(s_eager), _probe_states(s_jit), strict=True):
    np.testing.assert_array_equal(np.asarray(a.alpha), np.asarray(b.alpha))


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation(name):
  params, loss_fn = problems.mlp_problem(seed=12)
  tx = _chain(name)
  inner, traces = problems.train_step(tx, loss_fn), []

  def counted(params, state):
    traces.append(1)  # runs once per trace, never at execution
    return inner(params, state)

  step = jax.jit(counted)
  state = tx.init(params)
  assert float(optax.tree.get(state, "perturbed_loss")) == 0.0
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1
  assert problems.all_finite(params)
  # Every method keeps L(w + d_K) of its last perturbed step (tests/test_controls.py checks its value).
  perturbed_loss = float(optax.tree.get(state, "perturbed_loss"))
  assert np.isfinite(perturbed_loss)
  assert perturbed_loss > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_unknown_extra_args_are_ignored(name):
  params, loss_fn = problems.mlp_problem(seed=13)
  tx = optax.chain(CASES[name](), optax.scale_by_adam())
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)
  u1, _ = tx.update(g, state, params, loss_fn=loss_fn, value=1.0, grad=g, something_else="x")
  u2, _ = tx.update(g, state, params, loss_fn=loss_fn)
  chex.assert_trees_all_close(u1, u2)


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_and_dtypes_are_stable(name):
  params, loss_fn = problems.mlp_problem(seed=14)
  tx = CASES[name]()
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)

  problems.assert_state_survives_cond(lambda s: tx.update(g, s, params, loss_fn=loss_fn)[1], state)


# float32 runs in test_jit_equals_nojit (the same training run).
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:xsam. the probe losses are b?float16:UserWarning")  # expected with a 16-bit loss
def test_params_dtype_is_kept(name, dtype):
  with jax.enable_x64(dtype == "float64"):
    params, loss_fn = problems.mlp_problem(seed=15, dtype=jnp.dtype(dtype))
    new_params, _, u = _run(name, params, loss_fn, steps=2)
    problems.assert_dtypes_kept(params, new_params, u, dtype)


def _quadratic(sign):
  params = {"w": jnp.array([0.3, -0.4, 0.1]), "b": jnp.array([[0.2]])}

  def loss_fn(p):
    return sign * 0.5 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))

  return params, loss_fn


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradient_gives_finite_zero_output(name):
  params = {"w": jnp.zeros(3), "b": jnp.zeros((1, 1))}
  _, loss_fn = _quadratic(1.0)
  tx = CASES[name]()
  state = tx.init(params)
  u, state = jax.jit(lambda s: tx.update(jax.grad(loss_fn)(params), s, params, loss_fn=loss_fn))(state)
  assert problems.all_finite(u)
  assert problems.all_finite(state)
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["parallel", "antiparallel"])
@pytest.mark.parametrize("name", NAMES)
def test_parallel_and_antiparallel_directions_are_finite(name, sign):
  # +: the isotropic quadratic makes g_K parallel to d_K; -: with rho larger
  # than |w| the ascent of the concave quadratic overshoots the origin and
  # g_K becomes anti-parallel to d_K.
  params, loss_fn = _quadratic(sign)
  params = jax.tree.map(lambda x: 0.05 * x, params)
  _, state, u = _run(name, params, loss_fn, steps=2)
  assert problems.all_finite(u)
  assert problems.all_finite(state)


def _assert_finite_unless_overflowed(state, unscaled_state, scale):
  """The state of an update on ``scale * loss`` is finite, except XSAM's probe losses whose exact value
  (``scale`` times the unscaled run's) exceeds float32's range: those are inf, and if all of them are,
  ``max_loss`` is NaN and alpha keeps its value from before the round, as documented."""
  probes, probes1 = _probe_states(state), _probe_states(unscaled_state)
  for s, s1 in zip(probes, probes1, strict=True):
    exact = np.asarray(s1.probe_losses, np.float64) * scale
    big = np.abs(exact) > 0.99 * float(np.finfo(np.float32).max)  # 1%: far beyond float32 rounding
    losses = np.asarray(s.probe_losses)
    assert np.all(np.isfinite(losses[~big])), losses
    assert np.all(np.isinf(losses[np.abs(exact) > 1.01 * float(np.finfo(np.float32).max)])), losses
    if np.all(big):
      assert np.isnan(s.max_loss)
      assert float(s.alpha) == 1.0  # alpha_init, kept
    else:
      assert np.isfinite(s.max_loss)
  rest = [x for x in jax.tree.leaves(state) if not any(x is p.probe_losses or x is p.max_loss for p in probes)]
  assert problems.all_finite(rest)


def _global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("name", NAMES)
def test_extreme_gradient_scales(name):
  """Outputs are finite at both extremes of the loss's scale.

  At 1e30 the directions are scale-free, so the output scales linearly with
  the loss; "2^127" scales the loss so that |g_0| = 2^127 (1.7e38, near
  float32's largest value 3.4e38), where 1/|g| is below float32's smallest
  normal number (flushed to zero by XLA on CPU) and ratios such as
  |g_K| / |d_K| overflow unless norms are kept as scale * mantissa. At
  1e-30, |g| is far below the docs' eps = 1e-12, which then
  dominates every normalisation (as in the authors' code): the ascent
  shrinks to ~0 and the unit vectors of XSAM's plane shrink with it, so the
  output may shrink but must neither blow up nor turn non-finite.

  The scale is an argument of one compiled update (as a loss scale is in a
  real script), so the unscaled reference is the same program at scale 1.
  """
  params, loss_fn = problems.mlp_problem(seed=16)
  tx = CASES[name]()

  @jax.jit
  def update(state, scale):
    scaled_loss = lambda p: scale * loss_fn(p)
    return tx.update(jax.grad(scaled_loss)(params), state, params, loss_fn=scaled_loss)

  u_ref, s_ref = update(tx.init(params), jnp.float32(1.0))
  g_norm = _global_norm(jax.grad(loss_fn)(params))
  for scale in (1e-30, 1e30, 2.0**127 / g_norm):
    u1, s1 = u_ref, s_ref
    u_s, s_s = update(tx.init(params), jnp.float32(scale))
    assert problems.all_finite(u_s), scale
    _assert_finite_unless_overflowed(s_s, s1, scale)
    if any(np.all(np.isinf(np.asarray(p.probe_losses))) for p in _probe_states(s_s)):
      # XSAM probes at rho_max ~ 1-2 raise the loss by ~rho_max |g| > float32's max: every probe is inf and
      # alpha stays alpha_init (checked above). The unscaled reference must use alpha_init too: the same
      # update from a state whose count skips the probe round (alpha_update_period 2), or else (period 1,
      # not adaptive) the output's norm, |g_K| for every alpha.
      u1, s1 = update(tx.init(params)._replace(count=jnp.ones([], jnp.int32)), jnp.float32(1.0))
      if np.any(np.asarray(s1.probe_losses) != 0):
        u1, u_s = _global_norm(u1), _global_norm(u_s)
    if scale > 1:
      top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u1))
      for a, b in zip(jax.tree.leaves(u_s), jax.tree.leaves(u1), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64) / scale, b, rtol=1e-3, atol=1e-4 * top)
    else:
      assert _global_norm(u_s) / scale <= 5.0 * g_norm


@pytest.mark.parametrize("name", NAMES)
def test_gradient_norm_beyond_float32(name):
  """Four gradient elements of +-3e38: |g| = 6e38 is not a float32 number, yet the update is.

  The loss is linear plus a tiny quadratic, so every ascent point has
  (to float32 rounding of 3e38) the same gradient and every method's output
  is that gradient: SAM's g_K, XSAM's |g_K| v(alpha) with v0 || v1, the
  multi-step means and VaSSO's g_1; EigenSAM keeps its norm and turns it
  by its eigenvector correction. Diagnostics
  that hold |g| itself may be inf (it exceeds float32's range); nothing may
  be NaN.
  """
  g = jnp.array([3e38, -3e38, 3e38, 3e38], jnp.float32)
  params = {"w": jnp.array([0.01, -0.02, 0.005, 0.03], jnp.float32)}  # small: the loss (and XSAM's probes) stay finite
  loss_fn = lambda p: jnp.vdot(g, p["w"]) + 1e-3 * jnp.sum(p["w"] ** 2)
  tx = CASES[name]()
  state = tx.init(params)
  step = jax.jit(lambda g0, s: tx.update(g0, s, params, loss_fn=loss_fn))
  for _ in range(2):
    u, state = step(jax.grad(loss_fn)(params), state)
  u64, g64 = np.asarray(u["w"], np.float64), np.asarray(g, np.float64)
  # Every output has g_K's norm; the exact one differs from |g| by the quadratic term's
  # gradient (< 1e-2, nothing at 6e38) and a few float32 roundings (relative 2^-24 each).
  np.testing.assert_allclose(np.linalg.norm(u64), np.linalg.norm(g64), rtol=1e-5)
  if name.startswith("eigen_sam"):
    # EigenSAM subtracts alpha |<u, v>| v for the top Hessian eigenvector v; with H = 2e-3 I
    # every vector is one, so the direction moves by a data-dependent angle: only bound it.
    assert np.dot(u64, g64) / np.linalg.norm(u64) / np.linalg.norm(g64) > 0.9
  else:
    np.testing.assert_allclose(u64, g64, rtol=1e-5)
  # Nothing is NaN, except XSAM's max_loss when every probe overflowed (at rho_max ~ 1 the probes'
  # loss, ~rho_max |g|, exceeds float32's range), as documented; alpha then stays alpha_init.
  probes = _probe_states(state)
  for p in probes:
    if np.isnan(p.max_loss):
      assert np.all(np.isinf(np.asarray(p.probe_losses)))
      assert float(p.alpha) == 1.0
  rest = [x for x in jax.tree.leaves(state) if not any(x is p.max_loss for p in probes)]
  assert not any(bool(np.any(np.isnan(np.asarray(x, np.float64)))) for x in rest)


@pytest.mark.parametrize("name", NAMES)
def test_nested_and_empty_pytrees(name):
  params = {"a": {"b": jnp.array([0.5, -1.0]), "c": (jnp.ones((2, 2)), jnp.array(0.3))}, "e": {}, "n": None}

  def loss_fn(p):
    b, (c, s) = p["a"]["b"], p["a"]["c"]
    return jnp.sum(jnp.sin(c @ b) ** 2) + s**2 * jnp.sum(b**4)

  _, state, u = _run(name, params, loss_fn, steps=2)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  assert problems.all_finite(u)
  assert problems.all_finite(state)

  empty = {}
  _, _, u_empty = _run(name, empty, lambda p: jnp.float32(1.0), steps=2)
  assert u_empty == {}


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_around_the_method_is_an_error(name):
  """optax.MultiSteps would hand the method the mean gradient with the last micro-batch's loss_fn: an error
  naming it (the accumulation recipe, MultiSteps inside the chain: tests/test_script_traps.py)."""
  params, loss_fn = problems.mlp_problem(seed=17)
  tx = optax.MultiSteps(CASES[name](), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"optax\.MultiSteps"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)


@pytest.mark.parametrize("name", sorted(INJECT))
def test_inject_hyperparams(name):
  factory, kwargs, static = INJECT[name]
  params, loss_fn = problems.mlp_problem(seed=18)
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  plain = factory(**kwargs)
  g = jax.grad(loss_fn)(params)
  s_i, s_p = injected.init(params), plain.init(params)
  upd = jax.jit(lambda s: injected.update(g, s, params, loss_fn=loss_fn))
  for _ in range(3):
    u_i, s_i = upd(s_i)
    u_p, s_p = plain.update(g, s_p, params, loss_fn=loss_fn)
    # Two programs (hyperparameters traced from the state vs constants): one update apart, and the
    # same alpha when the probe round has a clear winner (checked).
    _assert_no_near_tie(s_p)
    assert_trees_close(u_i, u_p, STEP_OPS)
  # A hyperparameter changed in the state takes effect without re-building.
  first = next(iter(k for k in kwargs if k not in static))
  s_i.hyperparams[first] = s_i.hyperparams[first] * 2
  u_changed, _ = upd(s_i)
  assert not np.allclose(jax.tree.leaves(u_changed)[0], jax.tree.leaves(u_i)[0])
