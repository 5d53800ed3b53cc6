"""The battery of the whole optimizers called without ``loss_fn`` (tests/registry.py, ``PLAIN_OPTIMIZERS``):
Momentum-SAM and its AdamW form. Their ``update(grads, state, params)`` returns the update itself, so they
run here rather than in tests/test_battery.py, which passes ``loss_fn`` and chains a base optimizer after."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.registry import PLAIN_INJECT, PLAIN_OPTIMIZERS
from tests.tolerances import assert_trees_close, assert_trees_equal, f32_rtol

NAMES = sorted(PLAIN_OPTIMIZERS)

# Rounding steps (tests/tolerances.py) of one update on problems.mlp_problem along two code paths: the gradient,
# the momentum's norm and a few elementwise ops (Adam's division by sqrt(nu) + eps is relative: a few more).
STEP_OPS = problems.LOSS_OPS + problems.NUM_PARAMS + 16


def _make(name, **overrides):
  factory, kwargs = PLAIN_OPTIMIZERS[name]
  return factory(**(kwargs | overrides))


def _plain_step(tx, loss_fn):
  return problems.train_step(tx, loss_fn, pass_loss_fn=False)


def _run(tx, params, loss_fn, steps=3, jit=True):
  return problems.train(tx, params, loss_fn, steps, jit=jit, pass_loss_fn=False)


def _perturbation_norm(params, state):
  """|w - p|: the distance of the unperturbed params from the held ones (rho_{t-1}, or 0), in float64."""
  w = xsam_jax.momentum_sam_params(params, state)
  leaves = zip(jax.tree.leaves(w), jax.tree.leaves(params), strict=True)
  return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2) for a, b in leaves)))


@pytest.mark.parametrize("name", NAMES)
def test_plain_jit_equals_nojit(name):
  params, loss_fn = problems.mlp_problem(seed=41)
  p_jit, s_jit, _ = _run(_make(name), params, loss_fn, jit=True)
  p_eager, s_eager, _ = _run(_make(name), params, loss_fn, jit=False)
  # Two programs: 3 updates, each within STEP_OPS of the params' size (lr <= 0.1 times the gradient's
  # roundings, the perturbation's relative rounding times rho <= |w|), plus a rounding of the params per step.
  assert_trees_close(p_eager, p_jit, 3 * STEP_OPS + 3)
  assert_trees_close(s_eager, s_jit, 3 * STEP_OPS)


@pytest.mark.parametrize("name", NAMES)
def test_plain_no_recompilation_and_no_loss_fn(name):
  params, loss_fn = problems.mlp_problem(seed=42)
  tx = _make(name)
  inner, traces = _plain_step(tx, loss_fn), []

  def counted(params, state):
    traces.append(1)  # runs once per trace, never at execution
    return inner(params, state)

  step = jax.jit(counted)
  state = tx.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1
  assert problems.all_finite(params)
  assert int(state.count) == 3
  assert float(state.momentum_norm) > 0


@pytest.mark.parametrize("name", NAMES)
def test_plain_unknown_extra_args_are_ignored(name):
  params, loss_fn = problems.mlp_problem(seed=43)
  tx = optax.chain(optax.clip_by_global_norm(1.0), _make(name))
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)
  u1, s1 = tx.update(g, state, params, loss_fn=loss_fn, value=1.0, grad=g, something_else="x")
  u2, s2 = tx.update(g, state, params)
  assert_trees_equal(u1, u2)
  assert_trees_equal(s1, s2)


@pytest.mark.parametrize("name", NAMES)
def test_plain_state_structure_and_dtypes_are_stable(name):
  params, loss_fn = problems.mlp_problem(seed=44)
  tx = _make(name)
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)

  problems.assert_state_survives_cond(lambda s: tx.update(g, s, params)[1], state)


@pytest.mark.parametrize(
  "dtype",
  [
    "bfloat16",
    pytest.param("float16", marks=pytest.mark.slow),
    "float32",
    pytest.param("float64", marks=pytest.mark.slow),
  ],
)
@pytest.mark.parametrize("name", NAMES)
def test_plain_params_dtype_is_kept(name, dtype):
  with jax.enable_x64(dtype == "float64"):
    params, loss_fn = problems.mlp_problem(seed=45, dtype=jnp.dtype(dtype))
    new_params, state, u = _run(_make(name), params, loss_fn, steps=2)
    problems.assert_dtypes_kept(params, new_params, u, dtype)
    assert problems.all_finite(state)
    w = xsam_jax.momentum_sam_params(new_params, state)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(params), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_plain_zero_gradients_give_no_perturbation_and_no_nan(name):
  """m = 0 at step 0 and, with zero gradients, ever after: no division by |m| = 0, no perturbation; the
  update is the base optimizer's (rho = 0), bitwise (AdamW's weight decay alone, or nothing)."""
  params = {"w": jnp.array([0.5, -1.0, 0.25]), "b": jnp.zeros((1, 1))}
  zero_loss = lambda p: 0.0 * (jnp.sum(p["w"]) + jnp.sum(p["b"]))
  no_l2 = {} if "adamw" in name else {"weight_decay": 0.0}  # SGD's L2 term enters the momentum; AdamW's decay not
  p1, s1, u1 = _run(_make(name, **no_l2), params, zero_loss, steps=3)
  p0, _, u0 = _run(_make(name, rho=0.0, **no_l2), params, zero_loss, steps=3)
  assert problems.all_finite(s1)
  assert float(s1.momentum_norm) == 0.0
  assert_trees_equal(u1, u0)
  assert_trees_equal(p1, p0)
  assert _perturbation_norm(p1, s1) == 0.0


@pytest.mark.parametrize("scale", [1e-30, 1e30, "2^127", "beyond-float32"])
@pytest.mark.parametrize("name", NAMES)
def test_plain_extreme_gradient_scales(name, scale):
  """The perturbation rho_0 m / |m| has norm rho_0 at any gradient scale, even where |m| is no float32
  number (four elements of +-3e38: |m| = 6e38), and nothing turns non-finite."""
  params = {"w": jnp.array([0.01, -0.02, 0.005, 0.03], jnp.float32)}
  direction = jnp.array([1.0, -1.0, 1.0, 1.0], jnp.float32)
  size = {"2^127": 2.0**127 / 2.0, "beyond-float32": 3e38}.get(scale, scale)
  g = {"w": jnp.asarray(size, jnp.float32) * direction}
  tx = _make(name)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(g, state, params)
  assert problems.all_finite(u)
  rho0 = PLAIN_OPTIMIZERS[name][1]["rho"]
  rho0 = float(rho0(0)) if callable(rho0) else rho0
  # The perturbation alone: the unperturbed params of zero held params (the held ones here are ~lr |g|,
  # beyond which a float32 perturbation of norm rho vanishes).
  zeros = jax.tree.map(jnp.zeros_like, params)
  np.testing.assert_allclose(_perturbation_norm(zeros, state), rho0, rtol=f32_rtol(16))
  assert problems.all_finite(optax.tree.get(state.base_state, "mu" if "adamw" in name else "trace"))


@pytest.mark.parametrize("name", NAMES)
def test_plain_nested_and_empty_pytrees(name):
  params = {"a": {"b": jnp.array([0.5, -1.0]), "c": (jnp.ones((2, 2)), jnp.array(0.3))}, "e": {}, "n": None}

  def loss_fn(p):
    b, (c, s) = p["a"]["b"], p["a"]["c"]
    return jnp.sum(jnp.sin(c @ b) ** 2) + s**2 * jnp.sum(b**4)

  new_params, state, u = _run(_make(name), params, loss_fn, steps=2)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  assert problems.all_finite(u)
  assert problems.all_finite(state)
  assert jax.tree.structure(xsam_jax.momentum_sam_params(new_params, state)) == jax.tree.structure(params)

  _, _, u_empty = _run(_make(name), {}, lambda p: jnp.float32(1.0), steps=2)
  assert u_empty == {}


@pytest.mark.parametrize("name", NAMES)
def test_plain_inside_multisteps_is_one_step_on_the_mean_gradient(name):
  """A plain optimizer may be wrapped in optax.MultiSteps (no loss_fn to mix batches): k micro-batch gradients
  at the same held params make one step on their mean."""
  params, loss_fn = problems.mlp_problem(seed=46)
  grads = [jax.tree.map(lambda x, c=c: c * x, jax.grad(loss_fn)(params)) for c in (0.5, 1.5)]
  multi = optax.MultiSteps(_make(name), every_k_schedule=2)
  s = multi.init(params)
  u_first, s = multi.update(grads[0], s, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u_first))
  u, s = multi.update(grads[1], s, params)
  single = _make(name)
  u_ref, _ = single.update(jax.grad(loss_fn)(params), single.init(params), params)  # the mean: 1.0 g
  assert_trees_close(u, u_ref, STEP_OPS)
  assert _perturbation_norm(optax.apply_updates(params, u), s) > 0


@pytest.mark.parametrize("name", NAMES)
def test_plain_apply_if_finite_skips_a_bad_step(name):
  params, loss_fn = problems.mlp_problem(seed=47)
  tx = optax.apply_if_finite(_make(name), max_consecutive_errors=2)
  state = tx.init(params)
  g = jax.grad(loss_fn)(params)
  u, state = tx.update(g, state, params)
  params = optax.apply_updates(params, u)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g)
  u_bad, state_bad = tx.update(bad, state, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u_bad))  # the update is zeroed
  assert_trees_equal(state_bad.inner_state, state.inner_state)  # and the state kept
  assert_trees_equal(xsam_jax.momentum_sam_params(params, state_bad), xsam_jax.momentum_sam_params(params, state))


@pytest.mark.parametrize("name", sorted(PLAIN_INJECT))
def test_plain_inject_hyperparams(name):
  factory, kwargs, static = PLAIN_INJECT[name]
  params, loss_fn = problems.mlp_problem(seed=48)
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  plain = factory(**kwargs)
  s_i, s_p = injected.init(params), plain.init(params)
  p_i = p_p = params
  step_i = jax.jit(lambda p, s: injected.update(jax.grad(loss_fn)(p), s, p))
  for _ in range(3):
    u_i, s_i = step_i(p_i, s_i)
    u_p, s_p = plain.update(jax.grad(loss_fn)(p_p), s_p, p_p)
    p_i, p_p = optax.apply_updates(p_i, u_i), optax.apply_updates(p_p, u_p)
    # Two programs (hyperparameters traced from the state vs constants), each step's rounding carried on.
    assert_trees_close(p_i, p_p, 3 * STEP_OPS + 3)
  # rho changed in the state takes effect without re-building: the next perturbation has norm 2 rho.
  s_i.hyperparams["rho"] = s_i.hyperparams["rho"] * 2
  u_i, s_i = step_i(p_i, s_i)
  p_i = optax.apply_updates(p_i, u_i)
  np.testing.assert_allclose(_perturbation_norm(p_i, s_i), 2 * kwargs["rho"], rtol=f32_rtol(problems.NUM_PARAMS + 8))
