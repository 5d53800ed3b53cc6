"""m-sharpness (``m_sharpness=True``) on one device, for every method that takes it.

The replicas are a ``jax.vmap`` axis, each with its own shard of the batch. The semantics: each replica
takes the method's step on its own shard from the one shared state (its own ascent, and its own
decomposition or correction where the method has one), and the outputs and the new states are the replicas'
means (``reference.per_replica``); the base optimizer sees one mean gradient, so its state stays the same on
every replica. EigenSAM's eigenvector is the one of the replicas' mean Hessian.

Elsewhere: on 8 devices (replicas agree, shard_map equals pmap) tests/multidevice/m_sharpness_mode.py, run
by tests/test_multidevice.py; steps skipped by ``perturb_every`` under m-sharpness are in
tests/test_controls.py (test_skipped_steps_average_g0_over_axis_name); rejected values of the flag are in
tests/test_shared_options.py, tests/test_hostile_inputs.py and each method's test_bad_hyperparameters_raise.

Tolerances: the float64 reference as tests/test_reference_family.py (a few steps: ~1e-13, far below
1e-10); float32 comparisons of two programs computing one update from tests/tolerances.py
(``problems.UPDATE_OPS``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.problems import N_REPLICAS, UPDATE_OPS
from tests.test_reference_sam_xsam import HP
from tests.test_reference_sam_xsam import _jax_train as jax_train_f64
from tests.tolerances import assert_trees_close, f32_bound, f32_rtol
from xsam_jax._src.eigen_sam import initial_eigvec

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]


def test_m_sharpness_needs_axis_name():
  with pytest.raises(ValueError, match="axis_name"):
    xsam_jax.sam(0.1, m_sharpness=True)
  with pytest.raises(ValueError, match="axis_name"):
    xsam_jax.xsam(0.1, 0.2, m_sharpness=True)


# ---------------------------------------------------------------------------------------------------------
# SAM and XSAM (a small MLP of 36 parameters; the replica axis is named "r")
# ---------------------------------------------------------------------------------------------------------


def _data(n_replicas=4, per_replica=4, seed=3):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.normal(size=(3, 6)) * 0.8, jnp.float32),
    "b1": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(6, 2)) * 0.8, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(n_replicas, per_replica, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n_replicas, per_replica, 2)), jnp.float32)
  return params, x, y


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
  return 0.5 * jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, axis=-1))


def test_m_sharpness_sam_step_is_mean_of_per_shard_sam():
  rho = 0.2
  params, x, y = _data()
  tx = xsam_jax.sam(rho, axis_name="r", m_sharpness=True)

  def replica(xb, yb):
    loss_fn = lambda p: _loss(p, xb, yb)
    out, state = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    return out, state.grad_norm

  out, grad_norm = jax.jit(jax.vmap(replica, axis_name="r"))(x, y)

  def own_sam(xb, yb):
    g = jax.grad(_loss)(params, xb, yb)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    g1 = jax.grad(_loss)(jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g), xb, yb)
    return g1, jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g1)))

  per_shard, norms = jax.vmap(own_sam)(x, y)
  # Two programs (the ascent point written another way): per shard g_0, |g_0| over the 36 parameters
  # and g_1 (problems.LOSS_OPS bounds this smaller MLP's chain too), then the mean over 4 shards.
  # Gradient entries share their operands: the bound is on the largest; the norms do not cancel.
  n_ops = 2 * problems.LOSS_OPS + 36 + 4
  tol = f32_bound(*jax.tree.leaves(per_shard), n_ops=n_ops)
  for key in params:
    for i in range(x.shape[0]):
      np.testing.assert_allclose(out[key][i], per_shard[key].mean(0), rtol=0, atol=tol)
  np.testing.assert_allclose(grad_norm, jnp.full_like(grad_norm, norms.mean()), rtol=f32_rtol(n_ops))
  # Not the global SAM gradient: the per-replica ascents differ.
  flat = (x.reshape(-1, 3), y.reshape(-1, 2))
  g_global = jax.grad(_loss)(params, *flat)
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g_global)))
  sam_global = jax.grad(_loss)(jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g_global), *flat)
  assert float(jnp.max(jnp.abs(out["w1"][0] - sam_global["w1"]))) > 1e-4


@pytest.mark.parametrize(("num_steps", "period"), [(1, 2), (3, 1)])
def test_m_sharpness_xsam_replicas_agree_under_vmap(num_steps, period):
  params, x, y = _data()
  n = x.shape[0]
  tx = optax.chain(
    xsam_jax.xsam(0.2, 0.4, num_steps=num_steps, alpha_update_period=period, axis_name="r", m_sharpness=True),
    optax.sgd(0.05, momentum=0.9),
  )
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n), t)
  p, s = stack(params), stack(tx.init(params))

  def replica(p, s, xb, yb):
    loss_fn = lambda q: _loss(q, xb, yb)
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.vmap(replica, axis_name="r"))
  for _ in range(4):
    p, s = step(p, s, x, y)
  # Bitwise: each replica applies one pmean result to the same state, so replicas never drift apart
  # (the contract of data parallelism, not a rounding question).
  for leaf in jax.tree.leaves((p, s)):
    for i in range(1, n):
      np.testing.assert_array_equal(leaf[i], leaf[0])
  assert np.float32(s[0].alpha[0]) in np.float32(xsam_jax.DEFAULT_ALPHAS)


# ---------------------------------------------------------------------------------------------------------
# GSAM, WSAM and LookSAM (float32): the mean of the single-device method on each shard
# ---------------------------------------------------------------------------------------------------------


def test_gsam_m_sharpness_averages_per_replica_outputs():
  """Each replica decomposes its own gradients (as the authors' code does per worker); the outputs are
  averaged: the mean of single-device GSAM on each shard."""
  params, _, (xs, ts) = problems.replica_shards(seed=39)
  tx_r = xsam_jax.gsam(0.3, alpha=0.5, axis_name="batch", m_sharpness=True)
  u_r, s_r = problems.replica_update(tx_r, params, xs, ts)
  single = xsam_jax.gsam(0.3, alpha=0.5)
  outs, states = [], []
  for i in range(N_REPLICAS):
    loss_fn = lambda q, i=i: problems.mlp_batch_loss(q, {"x": xs[i], "t": ts[i]})
    u, s = single.update(jax.grad(loss_fn)(params), single.init(params), params, loss_fn=loss_fn)
    outs.append(u)
    states.append(s)
  expected = jax.tree.map(lambda *a: sum(a) / N_REPLICAS, *outs)
  for i in range(N_REPLICAS):
    assert_trees_close(jax.tree.map(lambda a, i=i: a[i], u_r), expected, UPDATE_OPS)
    np.testing.assert_allclose(s_r.cosine[i], np.mean([s.cosine for s in states]), rtol=f32_rtol(UPDATE_OPS))


def test_wsam_decoupled_m_sharpness_keeps_one_base_state():
  """Per-replica ascents, but the base optimizer sees the replicas' mean g_0: its state (the momentum)
  is the same on every replica, and the update is base(mean g_0) - lr c mean(g_1 - g_0)."""
  params, _, (xs, ts) = problems.replica_shards(seed=40)
  lr, gamma = 0.05, 0.8
  make = lambda **kw: xsam_jax.wsam(0.3, gamma, base_optimizer=optax.sgd(lr, momentum=0.9), learning_rate=lr, **kw)
  u_r, s_r = problems.replica_update(make(axis_name="batch", m_sharpness=True), params, xs, ts)
  coupled = xsam_jax.wsam(0.3, gamma)
  g0s, sharp = [], []
  for i in range(N_REPLICAS):
    loss_fn = lambda q, i=i: problems.mlp_batch_loss(q, {"x": xs[i], "t": ts[i]})
    g0 = jax.grad(loss_fn)(params)
    out, _ = coupled.update(g0, coupled.init(params), params, loss_fn=loss_fn)  # g_0 + c (g_1 - g_0)
    g0s.append(g0)
    sharp.append(jax.tree.map(lambda o, a: o - a, out, g0))  # c (g_1 - g_0)
  mean = lambda trees: jax.tree.map(lambda *a: sum(a) / N_REPLICAS, *trees)
  expected = jax.tree.map(lambda a, b: -lr * a - lr * b, mean(g0s), mean(sharp))
  momentum = optax.tree.get(s_r.base_state, "trace")
  for i in range(N_REPLICAS):
    assert_trees_close(jax.tree.map(lambda a, i=i: a[i], u_r), expected, UPDATE_OPS)
    jax.tree.map(lambda a, i=i: np.testing.assert_array_equal(a[i], a[0]), momentum)


def test_looksam_m_sharpness_keeps_one_g_v_on_every_replica():
  """Per-replica ascents and decompositions; g_v is the replicas' mean of their own, the same on all, and
  so are the outputs (the factory averages SAM's steps; the reuse steps use the mean g_0)."""
  params, _, (xs, ts) = problems.replica_shards(seed=46)
  make = lambda ax: xsam_jax.looksam(0.3, k=2, alpha=0.7, axis_name=ax, m_sharpness=True)
  runs = problems.replica_steps(make, params, xs, ts, [jax.tree.map(jnp.zeros_like, params)] * 2)
  single = xsam_jax.looksam(0.3, k=2, alpha=0.7)
  g_vs = []
  for i in range(N_REPLICAS):
    lf = lambda q, i=i: problems.mlp_batch_loss(q, {"x": xs[i], "t": ts[i]})
    g_vs.append(single.update(jax.grad(lf)(params), single.init(params), params, loss_fn=lf)[1].g_v)
  mean_g_v = jax.tree.map(lambda *a: sum(a) / N_REPLICAS, *g_vs)
  for u_r, s_r in runs:
    for i in range(1, N_REPLICAS):
      jax.tree.map(lambda a, i=i: np.testing.assert_array_equal(a[i], a[0]), (u_r, s_r.g_v))
    assert_trees_close(jax.tree.map(lambda a: a[0], s_r.g_v), mean_g_v, UPDATE_OPS)


# ---------------------------------------------------------------------------------------------------------
# m_sharpness on MSAM, LSAM, VaSSO, Friendly SAM and EigenSAM: the float64 reference
# ---------------------------------------------------------------------------------------------------------


def _mlp_shards(seed):
  """(problem, p0, shard problems, xs, ts): the reference MLP on 16 examples, cut into 4 shards of 4."""
  problem, p0 = problems.mlp_data(seed=seed, n=16)
  xs = problem.x.reshape(N_REPLICAS, -1, problem.x.shape[1])
  ts = problem.t.reshape(N_REPLICAS, -1, problem.t.shape[1])
  shards = [reference.MLP(x, t, problem.shapes) for x, t in zip(xs, ts, strict=True)]
  return problem, p0, shards, xs, ts


def _train_replicas(tx0, params, replica_loss, data, steps=STEPS):
  """``steps`` float64 steps of ``chain(tx0, add_decayed_weights, sgd(momentum))`` on every replica (a vmap
  axis "batch"), replica i with ``loss_fn = replica_loss(data_i)``. Checks that the replicas hold the same
  params and state bit for bit, and returns replica 0's ``(params, state)``."""
  with jax.enable_x64(True):
    tx = optax.chain(tx0, optax.add_decayed_weights(HP["wd"]), optax.sgd(HP["lr"], momentum=HP["momentum"]))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (N_REPLICAS, *jnp.shape(a))), tree)
    p, s = stack(params), stack(tx.init(params))

    def replica(p, s, shard):
      loss_fn = replica_loss(shard)
      u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
      return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(replica, axis_name="batch"))
    data = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), data)
    for _ in range(steps):
      p, s = step(p, s, data)
    for leaf in jax.tree.leaves((p, s)):
      for i in range(1, N_REPLICAS):
        np.testing.assert_array_equal(leaf[i], leaf[0])
    return jax.tree.map(lambda a: np.asarray(a[0]), (p, s))


def _mlp_replica_loss(shard):
  return lambda q: problems.mlp_batch_loss(q, {"x": shard[0], "t": shard[1]})


def _multistep_case(kind, k, plus):
  """(factory, per-replica reference step) of MSAM or LSAM with K = k."""
  factory = xsam_jax.msam if kind == "msam" else xsam_jax.lsam
  return (
    lambda **kw: factory(RHO, num_steps=k, plus=plus, **kw),
    lambda shard: lambda w, s: (reference.multistep_output(shard.grad, w, RHO, k, kind=kind, plus=plus), s),
  )


MLP_CASES = {
  f"{kind}{'_plus' if plus else ''}_k{k}": _multistep_case(kind, k, plus)
  for kind, k, plus in (("msam", 3, False), ("msam", 2, True), ("lsam", 3, False), ("lsam", 2, True))
}
MLP_CASES |= {
  "vasso": (
    lambda **kw: xsam_jax.vasso(RHO, theta=0.4, **kw),
    lambda shard: lambda w, ema: reference.vasso_output(shard.grad, w, RHO, 0.4, ema),
  ),
  "friendly_sam": (
    lambda **kw: xsam_jax.friendly_sam(RHO, sigma=1.0, lmbda=0.6, **kw),
    lambda shard: lambda w, ema: reference.friendly_sam_output(shard.grad, w, RHO, 1.0, 0.6, ema),
  ),
}


@pytest.mark.parametrize("name", sorted(MLP_CASES))
def test_m_sharpness_matches_reference(name):
  """Each replica steps on its own shard; outputs and states are the replicas' means."""
  make, ref_step = MLP_CASES[name]
  problem, p0, shards, xs, ts = _mlp_shards(seed=43)
  steps = [ref_step(shard) for shard in shards]
  w_ref, state_ref = reference.run(
    reference.MLP.flatten(p0), STEPS, lambda w, c, s: reference.per_replica(steps, w, s), **BASE
  )
  p, s = _train_replicas(make(axis_name="batch", m_sharpness=True), p0, _mlp_replica_loss, (xs, ts))
  np.testing.assert_allclose(reference.MLP.flatten(p), w_ref, rtol=0, atol=1e-10)
  if state_ref is not None:  # the gradient average the replicas share
    np.testing.assert_allclose(reference.MLP.flatten(s[0].ema), state_ref, rtol=0, atol=1e-10)
  # Not the global method: the per-replica ascents differ.
  w_global, _, _ = jax_train_f64(make(), problem, p0, STEPS)
  assert np.max(np.abs(w_global - w_ref)) > 1e-4


def test_m_sharpness_eigen_sam_matches_reference():
  """Each replica corrects its own SAM gradient with the one eigenvector of the replicas' mean Hessian."""
  quartics, p0, (a_s, b_s) = _quartic_shards()
  period, iters, rho, alpha, steps = 2, 5, 0.2, 0.8, 6

  def output_fn(w, count, v):
    if count % period == 0:
      hvp = lambda x: np.mean([q.hvp(w, x) for q in quartics], axis=0)
      v, _ = reference.power_iteration(hvp, v, iters)
    corrected = lambda q: reference.eigen_corrected(reference.sam_output(q.grad, w, rho, 1), v, alpha)
    return reference.per_replica([lambda w, _, q=q: (corrected(q), None) for q in quartics], w, None)[0], v

  with jax.enable_x64(True):
    v0 = _flat(initial_eigvec(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0), seed=2))
  tx = xsam_jax.eigen_sam(
    rho, alpha=alpha, eig_update_period=period, power_iterations=iters, seed=2, axis_name="batch", m_sharpness=True
  )
  p, s = _train_replicas(tx, p0, _quartic_loss, (a_s, b_s), steps)
  w_ref, v_ref = reference.run(_flat(p0), steps, output_fn, state=v0, **BASE)
  np.testing.assert_allclose(_flat(p), w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(s[0].eigvec), v_ref, rtol=0, atol=1e-10)
  assert bool(s[0].has_eigvec)


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: xsam_jax.msam(RHO, num_steps=3, **kw),
    lambda **kw: xsam_jax.lsam(RHO, num_steps=2, plus=True, adaptive=True, **kw),
    lambda **kw: xsam_jax.vasso(RHO, theta=0.4, **kw),
    lambda **kw: xsam_jax.friendly_sam(RHO, sigma=1.0, lmbda=0.6, **kw),
  ],
  ids=["msam", "lsam_plus_asam", "vasso", "friendly_sam"],
)
def test_m_sharpness_step_is_the_mean_of_single_device_steps(make):
  """The per-replica semantics of SAM's m_sharpness: one step is the mean of the single-device method's
  step on each shard, and the state is the mean of their states (float64: two programs, rounding only).
  Not EigenSAM's: its eigenvector is the replicas' mean Hessian's, one for all (a mean of per-shard
  eigenvectors, each of either sign, would be no eigenvector); test_m_sharpness_eigen_sam_matches_reference."""
  _, p0, _, xs, ts = _mlp_shards(seed=44)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    tx_r, single = make(axis_name="batch", m_sharpness=True), make()

    def replica(xb, tb):
      loss_fn = _mlp_replica_loss((xb, tb))
      return tx_r.update(jax.grad(loss_fn)(params), tx_r.init(params), params, loss_fn=loss_fn)

    u_r, s_r = jax.jit(jax.vmap(replica, axis_name="batch"))(jnp.asarray(xs), jnp.asarray(ts))
    outs = []
    for xb, tb in zip(xs, ts, strict=True):
      loss_fn = _mlp_replica_loss((jnp.asarray(xb), jnp.asarray(tb)))
      outs.append(single.update(jax.grad(loss_fn)(params), single.init(params), params, loss_fn=loss_fn))
  mean = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *outs)
  # float32 diagnostics (grad_norm, cosine): means of float32 values, rounded once more in either program.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12 if a.dtype == np.float64 else 1e-6, atol=1e-15)
  for i in range(N_REPLICAS):
    jax.tree.map(close, jax.tree.map(lambda a, i=i: np.asarray(a[i]), (u_r, s_r)), mean)


# ---------------------------------------------------------------------------------------------------------
# Quartic problems (a Hessian-vector product in closed form, for EigenSAM)
# ---------------------------------------------------------------------------------------------------------


def _quartic_shards(seed=46):
  """One Quartic per replica (its own A and b: its own batch), the params, and the stacked (A, b)."""
  rng = np.random.default_rng(seed)
  a0 = _quartic_matrix(rng)
  a_s, b_s = [], []
  for _ in range(N_REPLICAS):
    noise = rng.normal(size=(7, 7)) * 0.3
    a_s.append(a0 + (noise + noise.T) / 2)
    b_s.append(rng.normal(size=7) * 0.5)
  quartics = [reference.Quartic(a, b) for a, b in zip(a_s, b_s, strict=True)]
  return quartics, _quartic_params(rng.normal(size=7) * 0.5), (np.stack(a_s), np.stack(b_s))


def _quartic_matrix(rng):
  q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
  return q @ np.diag([6.0, 2.5, 1.5, 1.0, 0.5, 0.2, -0.3]) @ q.T


def _quartic_params(w0):
  return {"u": w0[:3], "v": w0[3:].reshape(2, 2)}


def _quartic_loss(ab):
  a, b = ab

  def loss_fn(p):
    w = jnp.concatenate([p["u"].ravel(), p["v"].ravel()])
    return 0.5 * w @ jnp.asarray(a) @ w + jnp.asarray(b) @ w + 0.25 * jnp.sum(w**4)

  return loss_fn


def _flat(p):
  return np.concatenate([np.asarray(p["u"]).ravel(), np.asarray(p["v"]).ravel()])
