"""Mixed precision: a non-finite ascent pass is caught, and low-precision probes.

A float16 model can overflow at the perturbed point ``w + e`` although the
clean pass at ``w`` is finite: the ascent gradient, and so the update, is
then inf/NaN, and a check of the clean gradient (``DynamicScale``'s
``is_fin``) cannot see it. The recipe (docs/flax.md, "Where things go") puts ``optax.apply_if_finite``
*after* the sharpness-aware transformation in the chain, where it sees the
transformation's output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.tolerances import assert_argmax_lead, f32_bound

# The loss overflows float32 just beyond w: exp(50 w) is finite at w_0 = 1.7 (e^85 ~ 8e36) and inf at
# w_0 + rho = 1.8 (e^90 > 3.4e38), so the clean gradient is finite and the ascent's is not.
PARAMS = {"w": jnp.array([1.7, 0.0], jnp.float32)}
RHO = 0.1


def _overflowing_loss(p):
  return jnp.sum(jnp.exp(50.0 * p["w"])) * 1e-30


def _finite_loss(p):
  return jnp.sum(p["w"] ** 2)


@pytest.mark.parametrize(
  "make",
  [lambda: xsam_jax.sam(RHO), lambda: xsam_jax.xsam(RHO, 2 * RHO, alpha_update_period=1)],
  ids=["sam", "xsam"],
)
def test_non_finite_ascent_is_caught_by_apply_if_finite_after_the_transformation(make):
  g = jax.grad(_overflowing_loss)(PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))  # the clean pass is finite

  # Unguarded: the output is not finite (what the guard is for).
  bare = optax.chain(make(), optax.sgd(0.1, momentum=0.9))
  u, _ = bare.update(g, bare.init(PARAMS), PARAMS, loss_fn=_overflowing_loss)
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))

  # The recipe: apply_if_finite after the transformation skips the step and keeps the base state.
  tx = optax.chain(make(), optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=3))
  state = tx.init(PARAMS)

  def step(params, state, loss_fn_id):
    loss_fn = _overflowing_loss if loss_fn_id == 0 else _finite_loss
    g = jax.grad(loss_fn)(params)
    u, state = tx.update(g, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, u), state

  step = jax.jit(step, static_argnums=2)
  params, state = step(PARAMS, state, 0)
  guard = optax.tree.get(state, "last_finite")
  assert not bool(guard)
  assert int(optax.tree.get(state, "total_notfinite")) == 1
  np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(PARAMS["w"]))  # the step was skipped
  trace = optax.tree.get(state, "trace")  # sgd's momentum: untouched
  np.testing.assert_array_equal(np.asarray(trace["w"]), np.zeros(2, np.float32))
  # A later finite step goes through.
  params, state = step(params, state, 1)
  assert bool(optax.tree.get(state, "last_finite"))
  assert np.all(np.isfinite(np.asarray(params["w"])))
  assert not np.array_equal(np.asarray(params["w"]), np.asarray(PARAMS["w"]))


def test_dynamic_scale_recipe_combines_both_checks():
  """flax's DynamicScale checks the clean gradient; the recipe ands it with the guard's last_finite
  and keeps the old params and optimizer state when either failed."""
  from flax.training import dynamic_scale as dynamic_scale_lib

  tx = optax.chain(xsam_jax.sam(RHO), optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
  ds = dynamic_scale_lib.DynamicScale()

  @jax.jit
  def train_step(params, opt_state, ds):
    # [snippet: dynamic-scale]
    ds, is_fin, loss, grads = ds.value_and_grad(_overflowing_loss)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params, loss_fn=_overflowing_loss)
    is_fin &= optax.tree.get(new_opt_state, "last_finite")  # the ascent pass too
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(is_fin, a, b), new, old)
    params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
    # [end snippet]
    return params, opt_state, ds, is_fin, loss

  params, opt_state, _, is_fin, loss = train_step(PARAMS, tx.init(PARAMS), ds)
  assert np.isfinite(float(loss))
  assert not bool(is_fin)
  np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(PARAMS["w"]))
  assert int(optax.tree.get(opt_state, "count")) == 0  # SAM's own counter kept too: the step never happened


# A bfloat16 model and its float32 twin: the loss of problems' MLP plus a constant 50, as a cross-entropy
# of a large vocabulary sits at a few units: its probe losses differ by ~1e-2, below bfloat16's rounding
# of values near 50 (0.25), and well above float32's (4e-6).
OFFSET = 50.0


def _bf16_problem():
  problem, p64 = problems.mlp_data(seed=3)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)
  batch = problems.mlp_batch(problem)

  def loss_bf16(p):  # float32 params, bfloat16 compute (as a bf16-activation model)
    cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    return problems.mlp_batch_loss(cast(p), cast(batch)) + jnp.bfloat16(OFFSET)

  def loss_f32(p):
    return problems.mlp_batch_loss(p, batch) + OFFSET

  return params, loss_bf16, loss_f32


def test_bf16_probes_warn_and_probe_loss_fn_picks_the_f32_alpha():
  params, loss_bf16, loss_f32 = _bf16_problem()
  tx = xsam_jax.xsam(0.1, 1.0, alphas=(0.0, 0.5, 1.0, 1.5, 2.0), alpha_update_period=1)
  step = lambda g, loss_fn, **kw: jax.jit(lambda s: tx.update(g, s, params, loss_fn=loss_fn, **kw))(tx.init(params))
  g32, g16 = jax.grad(loss_f32)(params), jax.grad(loss_bf16)(params)
  _, twin = step(g32, loss_f32)

  # bfloat16 probes: a warning at trace time, and losses on bfloat16's grid near 50 (multiples of 2^-2).
  with pytest.warns(UserWarning, match=r"probe losses are bfloat16.*probe_loss_fn"):
    _, noisy = step(g16, loss_bf16)
  np.testing.assert_array_equal(np.asarray(noisy.probe_losses) % 0.25, 0.0)

  # probe_loss_fn: the ascent in bfloat16, the probes in float32; the same alpha as the float32 twin.
  _, mixed = step(g16, loss_bf16, probe_loss_fn=loss_f32)
  # The planes differ by the bfloat16 rounding of the gradients, which moves each probe loss by far less
  # than the twin's winning lead: so both argmaxes are the same grid point.
  deviation = float(np.max(np.abs(np.asarray(mixed.probe_losses) - np.asarray(twin.probe_losses))))
  twin_losses = np.sort(np.asarray(twin.probe_losses, np.float64))
  assert deviation < (twin_losses[-1] - twin_losses[-2]) / 2
  assert float(mixed.alpha) == float(twin.alpha)


def test_probe_loss_fn_is_checked_and_only_changes_the_probes():
  params, _, loss_f32 = _bf16_problem()
  tx = xsam_jax.xsam(0.1, 1.0, alpha_update_period=1)
  g = jax.grad(loss_f32)(params)
  with pytest.raises(ValueError, match="`probe_loss_fn` must be callable or None, got int"):
    tx.update(g, tx.init(params), params, loss_fn=loss_f32, probe_loss_fn=3)
  # probe_loss_fn = loss_fn is the default, bitwise (the same program).
  u1, s1 = tx.update(g, tx.init(params), params, loss_fn=loss_f32, probe_loss_fn=loss_f32)
  u2, s2 = tx.update(g, tx.init(params), params, loss_fn=loss_f32)
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # SAM has no probes: probe_loss_fn changes nothing (a probe loss shifted by 1 would not either).
  sam = xsam_jax.sam(0.1)
  shifted = lambda p: loss_f32(p) + 1.0
  u3, _ = sam.update(g, sam.init(params), params, loss_fn=loss_f32, probe_loss_fn=shifted)
  u4, _ = sam.update(g, sam.init(params), params, loss_fn=loss_f32)
  for a, b in zip(jax.tree.leaves(u3), jax.tree.leaves(u4), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # XSAM's probes do use it: with the negated loss as probe loss, alpha is the grid point of least loss.
  _, s5 = tx.update(g, tx.init(params), params, loss_fn=loss_f32, probe_loss_fn=lambda p: -loss_f32(p))
  grid = np.asarray(xsam_jax.DEFAULT_ALPHAS)
  assert_argmax_lead(
    -np.asarray(s2.probe_losses), f32_bound(s2.probe_losses, n_ops=4 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS)
  )
  assert float(s5.alpha) == pytest.approx(float(grid[np.argmin(np.asarray(s2.probe_losses))]))
  assert float(s5.alpha) != float(s2.alpha)
