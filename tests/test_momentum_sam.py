"""Momentum-SAM (xsam_jax.momentum_sam, momentum_sam_adamw, momentum_sam_params): the float64 reference
(tests/reference.py, a transcription of the authors' update loops), the base optimizers at rho = 0 (bitwise),
the unperturbed params, and the hyperparameter checks. The battery every plain optimizer runs (jit, dtypes,
hostile gradients, wrappers): tests/test_plain_battery.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.tolerances import assert_trees_equal, f32_bound

STEPS = 6
SGD_HP = dict(lr=0.05, momentum=0.9, wd=5e-4)
ADAMW_HP = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.05)

# Rounding steps (tests/tolerances.py) of a float32 Momentum-SAM run of STEPS steps on problems.mlp_problem, in
# units of eps32 times the largest of |w|, rho and the gradient's elements:
# - the descent: each gradient's rounding (LOSS_OPS) is carried by the momentum over up to STEPS steps, each
#   moving the weights by lr times it: lr STEPS^2 LOSS_OPS;
# - the params: the update formed and added, ~4 roundings a step: 4 STEPS;
# - the perturbation rho m / |m|: the momentum's relative error (STEPS LOSS_OPS) and its norm's (NUM_PARAMS),
#   times rho; not carried over (w_t = p_t + e_{t-1} adds back the stored e_{t-1} itself);
# - twice all that for the gradients taken at the rounded params (lr |H| < 1 per step on this MLP).
F32_RUN_OPS = 2 * (
  SGD_HP["lr"] * STEPS**2 * problems.LOSS_OPS + 4 * STEPS + STEPS * problems.LOSS_OPS + problems.NUM_PARAMS
)


def _train(tx, problem, p0, steps=STEPS, dtype=jnp.float64):
  """``steps`` jitted steps of the plain optimizer ``tx`` on the reference MLP in ``dtype``.

  Returns the held params, the unperturbed params (momentum_sam_params) and the state."""
  with jax.enable_x64(dtype == jnp.float64):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), p0)
    loss_fn = problems.mlp_loss_fn(problem, dtype)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p)
      return optax.apply_updates(p, u), s

    for _ in range(steps):
      params, state = step(params, state)
    eval_params = jax.jit(xsam_jax.momentum_sam_params)(params, state)
    flat = lambda t: reference.MLP.flatten(jax.tree.map(np.asarray, t))
    return flat(params), flat(eval_params), state


def _sgd_reference(problem, p0, rho, lr=SGD_HP["lr"], steps=STEPS):
  as_fn = lambda v: v if callable(v) else (lambda t: v)
  return reference.momentum_sam_sgd(
    problem.grad,
    reference.MLP.flatten(p0),
    steps,
    lr=as_fn(lr),
    momentum=SGD_HP["momentum"],
    wd=SGD_HP["wd"],
    rho=as_fn(rho),
  )


# -- (a) the float64 reference --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "schedules", [False, True], ids=["constant", "lr-and-rho-schedules"]
)  # schedules: their step count aligned with the reference's t
def test_momentum_sam_matches_reference_float64(schedules):
  """Float64 against the float64 transcription: 6 steps chain ~200 float64 roundings each (a gradient, a norm
  over 32 params) of values <= ~3: ~1e-13, far below 1e-10 (a wrong sign or index moves them by > 1e-3)."""
  problem, p0 = problems.mlp_data(seed=31)
  # Schedules as Python expressions of the count: float64 under x64 in JAX, Python floats in the reference.
  lr = (lambda count: 0.08 - 0.01 * count) if schedules else SGD_HP["lr"]
  rho = (lambda count: 0.5 - 0.08 * count) if schedules else 0.3
  held_ref, eval_ref = _sgd_reference(problem, p0, rho, lr)
  tx = xsam_jax.momentum_sam(rho, learning_rate=lr, momentum=SGD_HP["momentum"], weight_decay=SGD_HP["wd"])
  held, eval_params, state = _train(tx, problem, p0)
  np.testing.assert_allclose(held, held_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(eval_params, eval_ref, rtol=0, atol=1e-10)  # (c): the unperturbed weights
  assert np.linalg.norm(eval_ref - held_ref) > 0.05  # the perturbation is there (rho_{T-1} >= 0.1)
  assert int(state.count) == STEPS


def test_momentum_sam_matches_reference_float32():
  """Float32 against the float64 reference, within the float32 rounding bound of the run (F32_RUN_OPS)."""
  problem, p0 = problems.mlp_data(seed=32)
  rho = 0.3
  held_ref, eval_ref = _sgd_reference(problem, p0, rho)
  tx = xsam_jax.momentum_sam(rho, learning_rate=SGD_HP["lr"], momentum=SGD_HP["momentum"], weight_decay=SGD_HP["wd"])
  held, eval_params, _ = _train(tx, problem, p0, dtype=jnp.float32)
  g0 = problem.grad(reference.MLP.flatten(p0))
  atol = f32_bound(held_ref, eval_ref, rho, g0, n_ops=F32_RUN_OPS)
  assert atol < 1e-3  # below the size of the bugs the test guards against
  np.testing.assert_allclose(held, held_ref, rtol=0, atol=atol)
  np.testing.assert_allclose(eval_params, eval_ref, rtol=0, atol=atol)


def test_momentum_sam_adamw_matches_reference_float64():
  problem, p0 = problems.mlp_data(seed=33)
  hp = ADAMW_HP
  rho = 0.2
  w0 = reference.MLP.flatten(p0)
  kw = dict(lr=hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], wd=hp["wd"], rho=rho)
  held_ref, eval_ref = reference.momentum_sam_adamw(problem.grad, w0, STEPS, **kw)
  tx = xsam_jax.momentum_sam_adamw(
    rho, learning_rate=hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"]
  )
  held, eval_params, _ = _train(tx, problem, p0)
  # As the SGD form's: ~1e-13 of rounding; Adam's division by sqrt(nu) + eps is by |g| (>> eps) here.
  np.testing.assert_allclose(held, held_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(eval_params, eval_ref, rtol=0, atol=1e-10)
  # The documented departure: the authors' decay after the Adam step differs by lr^2 wd |adam| per step
  # (|adam| <= (1 - b1) / sqrt(1 - b2) < 3.2 elementwise), carried over the run (under 2x in STEPS steps).
  authors, _ = reference.momentum_sam_adamw(problem.grad, w0, STEPS, **kw, authors_decay=True)
  gap = np.max(np.abs(authors - held_ref))
  assert 0 < gap <= 2 * STEPS * hp["lr"] ** 2 * hp["wd"] * 3.2


# -- (b) rho = 0 is the base optimizer, bitwise ---------------------------------------------------------------
# Op by op, without jit: at rho = 0 the method runs the base optimizer's primitives on the same inputs and
# adds exact zeros, so the results are bitwise the base's. Two jitted programs need not be: XLA may fuse
# (and so round) them differently.


def _run_plain(tx, params, loss_fn, steps):
  state = tx.init(params)

  def step(p, s):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p)
    return optax.apply_updates(p, u), s, u

  updates = []
  for _ in range(steps):
    params, state, u = step(params, state)
    updates.append(u)
  return params, updates


@pytest.mark.parametrize(
  ("wd", "lr"),
  [(0.0, 0.05), (5e-4, 0.05), (5e-4, optax.cosine_decay_schedule(0.1, 5))],
  ids=["sgd", "sgd-wd", "sgd-wd-schedule"],
)
def test_momentum_sam_at_rho_zero_is_sgd_bitwise(wd, lr):
  params, loss_fn = problems.mlp_problem(seed=34)
  ours = xsam_jax.momentum_sam(0.0, learning_rate=lr, momentum=0.9, weight_decay=wd)
  base = optax.sgd(lr, momentum=0.9)
  if wd:
    base = optax.chain(optax.add_decayed_weights(wd), base)
  p1, u1 = _run_plain(ours, params, loss_fn, 5)
  p2, u2 = _run_plain(base, params, loss_fn, 5)
  assert_trees_equal(u1, u2)
  assert_trees_equal(p1, p2)


def test_momentum_sam_adamw_at_rho_zero_is_adamw_bitwise():
  params, loss_fn = problems.mlp_problem(seed=35)
  kw = dict(b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  lr = optax.linear_schedule(0.01, 0.001, 5)
  p1, u1 = _run_plain(xsam_jax.momentum_sam_adamw(0.0, learning_rate=lr, **kw), params, loss_fn, 5)
  p2, u2 = _run_plain(optax.adamw(lr, **kw), params, loss_fn, 5)
  assert_trees_equal(u1, u2)
  assert_trees_equal(p1, p2)


# -- (c) the unperturbed params ---------------------------------------------------------------------------------


def test_momentum_sam_params_before_the_first_step_and_at_rho_zero():
  params, loss_fn = problems.mlp_problem(seed=36)
  tx = xsam_jax.momentum_sam(0.5, learning_rate=0.1)
  assert_trees_equal(xsam_jax.momentum_sam_params(params, tx.init(params)), params)
  flat = xsam_jax.momentum_sam(0.0, learning_rate=0.1)
  state = flat.init(params)
  u, state = flat.update(jax.grad(loss_fn)(params), state, params)
  p = optax.apply_updates(params, u)
  assert_trees_equal(xsam_jax.momentum_sam_params(p, state), p)


def test_momentum_sam_params_finds_the_state_inside_wrappers():
  """In a chain, under inject_hyperparams and MultiSteps, the helper finds the one state by its type; the
  unperturbed params are the held ones plus rho m / |m|, whose norm is rho."""
  params, loss_fn = problems.mlp_problem(seed=37)
  rho = 0.25
  wrapped = {
    "chain": optax.chain(optax.clip_by_global_norm(1.0), xsam_jax.momentum_sam(rho, learning_rate=0.05)),
    "inject": optax.inject_hyperparams(xsam_jax.momentum_sam)(rho=rho, learning_rate=0.05),
    "multisteps": optax.MultiSteps(xsam_jax.momentum_sam_adamw(rho, learning_rate=0.01), every_k_schedule=1),
    "named": optax.named_chain(("clip", optax.clip(1.0)), ("msam", xsam_jax.momentum_sam(rho, learning_rate=0.05))),
  }
  for name, tx in wrapped.items():
    p, s = params, tx.init(params)
    for _ in range(2):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p)
      p = optax.apply_updates(p, u)
    w = jax.jit(xsam_jax.momentum_sam_params)(p, s)
    diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), w, p)
    norm = np.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(diff)))
    np.testing.assert_allclose(norm, rho, rtol=f32_bound(1.0, n_ops=problems.NUM_PARAMS + 8), err_msg=name)


def test_momentum_sam_params_needs_exactly_one_state():
  params = {"w": jnp.ones(3)}
  tx = xsam_jax.momentum_sam(0.1, learning_rate=0.1)
  with pytest.raises(ValueError, match=r"exactly one MomentumSAMState.*found 0"):
    xsam_jax.momentum_sam_params(params, optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="found 2"):
    xsam_jax.momentum_sam_params(params, (tx.init(params), tx.init(params)))
  with pytest.raises(ValueError, match="momentum_sam_params"):
    xsam_jax.momentum_sam_params({"v": jnp.ones(3)}, tx.init(params))  # other params


# -- (d) jit, chains, inject_hyperparams ------------------------------------------------------------------------


def test_momentum_sam_after_clip_equals_momentum_sam_on_the_clipped_gradient():
  params, loss_fn = problems.mlp_problem(seed=38)
  clip = optax.clip_by_global_norm(0.1)
  chained = optax.chain(clip, xsam_jax.momentum_sam(0.2, learning_rate=0.05, weight_decay=1e-3))
  alone = xsam_jax.momentum_sam(0.2, learning_rate=0.05, weight_decay=1e-3)
  s_c, s_a = chained.init(params), alone.init(params)
  p_c = p_a = params
  for _ in range(3):
    u_c, s_c = chained.update(jax.grad(loss_fn)(p_c), s_c, p_c)
    g, _ = clip.update(jax.grad(loss_fn)(p_a), clip.init(p_a))
    u_a, s_a = alone.update(g, s_a, p_a)
    p_c, p_a = optax.apply_updates(p_c, u_c), optax.apply_updates(p_a, u_a)
  assert_trees_equal(p_c, p_a)  # the same operations on the same values


def test_momentum_sam_inject_hyperparams_changes_take_effect():
  """rho injected: lowered to 0 in the state, the next update is SGD's on the unperturbed weights."""
  params, loss_fn = problems.mlp_problem(seed=39)
  tx = optax.inject_hyperparams(xsam_jax.momentum_sam)(rho=0.3, learning_rate=0.05, momentum=0.9, weight_decay=1e-3)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  for _ in range(2):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  state.hyperparams["rho"] = jnp.zeros_like(state.hyperparams["rho"])
  u, state = step(params, state)
  params = optax.apply_updates(params, u)
  # rho_t = 0: the held params are the unperturbed ones now.
  assert_trees_equal(xsam_jax.momentum_sam_params(params, state), params)


# -- (e) hostile hyperparameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(rho=-0.1), r"`rho` must be a finite real number >= 0"),
    (dict(rho=float("nan")), r"`rho` must be"),
    (dict(rho=True), r"`rho` must be .* got the bool"),
    (dict(rho=optax.constant_schedule(-1.0)), r"`rho\(0\)` must be"),
    (dict(learning_rate=0.0), r"`learning_rate` must be a finite real number > 0"),
    (dict(learning_rate=-1.0), r"`learning_rate` must be"),
    (dict(learning_rate="0.1"), r"`learning_rate` must be"),
    (dict(momentum=1.0), r"`momentum` must be a real number in \[0, 1\)"),
    (dict(momentum=-0.1), r"`momentum` must be a real number in \[0, 1\)"),
    (dict(weight_decay=-1e-4), r"`weight_decay` must be a finite real number >= 0"),
  ],
)
def test_momentum_sam_rejects_bad_hyperparameters(kwargs, match):
  args = dict(rho=0.1, learning_rate=0.1) | kwargs
  with pytest.raises(ValueError, match=match):
    xsam_jax.momentum_sam(**args)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(rho=-1.0), r"`rho` must be"),
    (dict(learning_rate=0.0), r"`learning_rate` must be"),
    (dict(b1=1.0), r"`b1` must be a real number in \[0, 1\)"),
    (dict(b2=1.5), r"`b2` must be a real number in \[0, 1\)"),
    (dict(eps=-1e-8), r"`eps` must be a finite real number >= 0"),
    (dict(weight_decay=float("inf")), r"`weight_decay` must be"),
  ],
)
def test_momentum_sam_adamw_rejects_bad_hyperparameters(kwargs, match):
  args = dict(rho=0.1, learning_rate=0.1) | kwargs
  with pytest.raises(ValueError, match=match):
    xsam_jax.momentum_sam_adamw(**args)


def test_momentum_sam_update_needs_params_and_matching_updates():
  params = {"w": jnp.ones(3)}
  tx = xsam_jax.momentum_sam(0.1, learning_rate=0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"momentum_sam.update needs `params`"):
    tx.update(params, state)
  with pytest.raises(ValueError, match=r"updates leaf \['w'\] has shape \(2,\)"):
    tx.update({"w": jnp.ones(2)}, state, params)
  with pytest.raises(ValueError, match=r"params leaf \['w'\] has dtype int32"):
    tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3, jnp.int32)})
