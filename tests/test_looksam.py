"""LookSAM: the float64 numpy reference over SAM steps and the steps that reuse g_v, the equivalences with
SAM and SGD, no extra pass on the reuse steps, validation, and data parallelism (its m-sharpness:
tests/test_m_sharpness.py).

Reference tolerance (as tests/test_sam_variants.py): a step chains a few hundred float64 rounding steps
(two gradients, a few norms and dot products over 32 parameters). The reuse steps normalize g_v, whose
rounding error is that of g_s: relative to |g_v| it is |g_s| / |g_v| = 1 / sin(angle(g_0, g_s)) times
larger, under 1e2 here (asserted). 7 steps with lr 0.05 and momentum 0.9 then move the params by less than
~1e5 eps64 |w| (~2): ~5e-11, below 1e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.problems import N_REPLICAS, UPDATE_OPS
from tests.test_reference_family import WEIGHTS_ONLY
from tests.test_reference_sam_xsam import HP
from tests.test_reference_sam_xsam import _jax_train as jax_train_f64
from tests.test_sam_variants import _updates_along_sam
from tests.tolerances import assert_trees_close, f32_bound, f32_rtol
from xsam_jax._src.gsam import orthogonal_part
from xsam_jax._src.looksam import PARALLEL_ULPS

STEPS = 7
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _perturbs(count, k, start):
  return count >= start and (count - start) % k == 0


# ---------------------------------------------------------------------------------------------------------
# The float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("k", "alpha", "eta", "start", "masked"),
  [(3, 0.7, None, 0, False), (2, 1.5, 0.02, 0, False), (3, 0.7, None, 2, False), (2, 0.7, None, 0, True)],
  ids=["k3", "k2-alpha1.5-asam", "k3-start2", "k2-weights-only"],
)
def test_looksam_matches_reference(k, alpha, eta, start, masked):
  """Params after 7 steps (SAM's steps and the steps that reuse g_v), the final g_v and the cosine."""
  problem, p0 = problems.mlp_data(seed=41)
  mask = reference.flat_mask(problem, WEIGHTS_ONLY) if masked else None
  log = []

  def output_fn(w, count, g_v):
    perturb = _perturbs(count, k, start)
    t = None if eta is None else reference.asam_t(w, eta)
    out, g_v = reference.looksam_output(problem.grad, w, RHO, alpha, perturb, g_v, t=t, mask=mask)
    if perturb:
      g_s = out if mask is None else out[mask]
      log.append((np.linalg.norm(g_v) / np.linalg.norm(g_s), g_s))
    return out, g_v

  w_ref, g_v_ref = reference.run(reference.MLP.flatten(p0), STEPS, output_fn, **BASE)
  options = dict(perturb_start=start)
  if eta is not None:
    options |= dict(adaptive=True, eta=eta)
  if masked:
    options |= dict(perturb_mask=WEIGHTS_ONLY)
  w, state, _ = jax_train_f64(xsam_jax.looksam(RHO, k=k, alpha=alpha, **options), problem, p0, STEPS)
  assert min(ratio for ratio, _ in log) > 1e-2  # sin(angle(g_0, g_s)): the decomposition is well conditioned
  assert len(log) < STEPS  # the run has steps that reuse g_v
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  s = state[0]
  assert int(s.count) == STEPS
  np.testing.assert_allclose(_flat(s.g_v), g_v_ref, rtol=0, atol=1e-10)
  if masked:
    assert (s.g_v["b1"], s.g_v["b2"]) == (None, None)  # g_v lives on the perturbed leaves
  g_s = log[-1][1]
  cosine = np.sqrt(max(0.0, 1.0 - (np.linalg.norm(g_v_ref) / np.linalg.norm(g_s)) ** 2))
  # A float64 cosine rounded once to float32 (sign: g_0 and g_s point the same way here).
  np.testing.assert_allclose(float(s.cosine), cosine, rtol=f32_rtol(4))


# ---------------------------------------------------------------------------------------------------------
# Equivalences (float32), along SAM's trajectory
# ---------------------------------------------------------------------------------------------------------


def test_k1_is_sam():
  """Every call perturbs and outputs SAM's gradient (one program each: within an update's rounding)."""
  for u, u_sam, _ in _updates_along_sam(xsam_jax.looksam(RHO, k=1, alpha=0.7), steps=5):
    assert_trees_close(u, u_sam, UPDATE_OPS)


def test_alpha_zero_is_sam_then_the_plain_gradient():
  """alpha = 0: SAM on the steps that perturb, exactly g_0 (g_0 + 0 g_v) on the others."""
  for i, (u, u_sam, g) in enumerate(_updates_along_sam(xsam_jax.looksam(RHO, k=3, alpha=0.0), steps=6)):
    if i % 3 == 0:
      assert_trees_close(u, u_sam, UPDATE_OPS)
    else:
      jax.tree.map(np.testing.assert_array_equal, u, g)


def test_reuse_step_has_the_norm_ratio_and_direction():
  """output - g_0 = alpha |g_0| g_v / |g_v|: norm alpha |g_0|, along the stored g_v, orthogonal to the g_0 of
  the step that perturbed."""
  alpha = 0.6
  params, loss_fn = problems.mlp_problem(seed=43)
  tx = xsam_jax.looksam(RHO, k=2, alpha=alpha)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
  g_first = _flat(jax.grad(loss_fn)(params))
  _, state = step(params, tx.init(params))
  g_v = _flat(state.g_v)
  assert abs(g_v @ g_first) <= f32_rtol(UPDATE_OPS) * np.linalg.norm(g_v) * np.linalg.norm(g_first)
  params = jax.tree.map(lambda p: 0.9 * p, params)  # a new point: g_0 changes, g_v is reused
  u, state2 = step(params, state)
  g = _flat(jax.grad(loss_fn)(params))
  reused = _flat(u) - g
  expected = alpha * np.linalg.norm(g) * g_v / np.linalg.norm(g_v)
  # (g_0 + reused) - g_0: the rounding of the sum and of g_0 (another program), of operands up to |g_0|.
  np.testing.assert_allclose(reused, expected, rtol=0, atol=f32_bound(g, expected, n_ops=UPDATE_OPS))
  jax.tree.map(np.testing.assert_array_equal, state2.g_v, state.g_v)  # kept as it was


def test_parallel_gradients_give_zero_g_v_and_the_plain_gradient():
  """On an isotropic quadratic g_s = (1 + rho / |w|) w is parallel to g_0 = w: the computed g_v is rounding
  noise, which is dropped (rescaled to alpha |g_0| it would be a random kick), so reuse steps give g_0."""
  params = {"w": jnp.array([0.3, -0.4, 0.1, 0.7]), "b": jnp.array([[0.2, -0.15]])}
  loss_fn = lambda p: 0.5 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))
  g = jax.grad(loss_fn)(params)
  trace = xsam_jax.building_blocks.ascent(loss_fn, params, g, rho=0.3, num_steps=1)
  noise, n_s, _, _ = orthogonal_part(trace.grads[-1], g)
  noise_norm = np.linalg.norm(_flat(noise))
  assert 0 < noise_norm <= PARALLEL_ULPS * np.finfo(np.float32).eps * float(n_s.value)  # the guard is exercised
  tx = xsam_jax.looksam(0.3, k=2, alpha=0.7)
  step = jax.jit(lambda s: tx.update(g, s, params, loss_fn=loss_fn))
  _, state = step(tx.init(params))
  assert not np.any(_flat(state.g_v))
  u, _ = step(state)
  jax.tree.map(np.testing.assert_array_equal, u, g)


# ---------------------------------------------------------------------------------------------------------
# Cost: the steps that reuse g_v evaluate no loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize(("k", "start"), [(3, 0), (3, 2)], ids=["k3", "k3-start2"])
def test_reuse_steps_run_no_extra_loss_evaluation(k, start, jit):
  """``loss_fn`` reports each run-time evaluation (``jax.debug.callback``): one per step that perturbs (the
  ascent's gradient), none on the others (their branch of ``jax.lax.cond`` holds no pass)."""
  params, loss_fn = problems.mlp_problem(seed=44)
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p)

  tx = optax.chain(xsam_jax.looksam(RHO, k=k, perturb_start=start), optax.sgd(0.05))

  def step(p, s):
    g = jax.grad(loss_fn)(p)  # the training loop's own pass, not counted
    u, s = tx.update(g, s, p, loss_fn=counted)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  state, per_step = tx.init(params), []
  for _ in range(STEPS):
    before = len(calls)
    params, state = step(params, state)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
  assert per_step == [int(_perturbs(c, k, start)) for c in range(STEPS)]


def test_a_step_that_donates_its_state_runs():
  """Training loops (experiments.train among them) donate the optimizer state to the jitted step. A reuse
  step passes state leaves through, so jit keeps them as arguments: no buffer may appear twice in the state."""
  params, loss_fn = problems.mlp_problem(seed=47)
  tx = optax.chain(xsam_jax.looksam(RHO, k=2), optax.sgd(0.05, momentum=0.9))

  def step(p, s):
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  params, state = jax.tree.map(jnp.copy, params), tx.init(params)
  for _ in range(3):
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
    assert len(set(buffers)) == len(buffers)
    params, state = step(params, state)
  assert int(state[0].count) == 3


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: xsam_jax.looksam(0.1, k=0), r"`k` must be an int >= 1, got 0"),
    (lambda: xsam_jax.looksam(0.1, k=-3), r"`k` must be an int >= 1, got -3"),
    (lambda: xsam_jax.looksam(0.1, k=2.5), r"`k` must be an int >= 1, got 2.5"),
    (lambda: xsam_jax.looksam(0.1, k=True), r"`k` must be an int >= 1, got True"),
    (lambda: xsam_jax.looksam(0.1, k=None), r"`k` must be an int >= 1, got None"),
    (lambda: xsam_jax.looksam(0.1, k=np.array([2, 3])), r"`k` must be an int >= 1, got an array of shape \(2,\)"),
    (lambda: xsam_jax.looksam(0.1, alpha=-0.1), r"`alpha` must be a finite real number >= 0, got -0.1"),
    (lambda: xsam_jax.looksam(0.1, alpha=float("nan")), r"`alpha` must be a finite real number >= 0"),
    (lambda: xsam_jax.looksam(0.1, alpha=float("inf")), r"`alpha` must be a finite real number >= 0"),
    (lambda: xsam_jax.looksam(0.1, alpha="0.7"), r"`alpha`"),
    (lambda: xsam_jax.looksam(0.0), r"`rho` must be"),
    (lambda: xsam_jax.looksam(0.1, eta=-1.0), r"`eta` must be"),
    (lambda: xsam_jax.looksam(0.1, perturb_start=-1), r"`perturb_start`"),
    (lambda: xsam_jax.looksam(0.1, m_sharpness=True), r"`m_sharpness=True` needs `axis_name`"),
  ],
)
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_traced_hyperparameters_are_accepted():
  """Under inject_hyperparams alpha and k are tracers: only their shape and dtype can be checked."""
  init = lambda a, k: xsam_jax.looksam(0.1, k=k, alpha=a).init({"w": jnp.ones(2)})
  jax.jit(init)(jnp.float32(0.5), jnp.int32(3))


# ---------------------------------------------------------------------------------------------------------
# Data parallelism (one device: the replica axis is a vmap axis)
# ---------------------------------------------------------------------------------------------------------


def test_replicas_agree_with_global_batch():
  """With axis_name every replica returns the global-batch update on every step, the reuse steps included
  (their g_0 is averaged over the replicas before it is combined with g_v)."""
  params, (x, t), (xs, ts) = problems.replica_shards(seed=45)
  loss_fn = lambda q: problems.mlp_batch_loss(q, {"x": x, "t": t})
  tx = xsam_jax.looksam(0.3, k=2, alpha=0.7)
  state, p, global_updates = tx.init(params), params, []
  for _ in range(4):
    u, state = tx.update(jax.grad(loss_fn)(p), state, p, loss_fn=loss_fn)
    global_updates.append((u, state))
    p = jax.tree.map(lambda a, v: a - 0.05 * v, p, u)
  runs = problems.replica_steps(
    lambda ax: xsam_jax.looksam(0.3, k=2, alpha=0.7, axis_name=ax), params, xs, ts, [u for u, _ in global_updates]
  )
  for (u_r, s_r), (u_g, s_g) in zip(runs, global_updates, strict=True):
    # Replicas reduce over shards (pmean of 4 means of 4), one device over the batch: two programs. g_v's
    # rounding is amplified by |g_s| / |g_v| on the reuse steps (asserted below 10).
    assert float(s_g.cosine) < 0.99
    for i in range(N_REPLICAS):
      assert_trees_close(jax.tree.map(lambda a, i=i: a[i], u_r), u_g, 10 * UPDATE_OPS)
      assert_trees_close(jax.tree.map(lambda a, i=i: a[i], s_r.g_v), s_g.g_v, 10 * UPDATE_OPS)
