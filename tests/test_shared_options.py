"""The options every method shares (docs/controls.md, "Options every method takes"): every method takes
them, they are checked once (``base.Options``), and the ones added to more methods match the float64
numpy reference: ``m_sharpness`` on MSAM, LSAM, VaSSO, EigenSAM and Friendly SAM, ``adaptive`` on VaSSO and
EigenSAM.

m-sharpness runs on one device: the replicas are a ``jax.vmap`` axis named "batch", each with its own
shard of the batch. Its semantics, as for SAM, GSAM and WSAM (tests/test_multidevice.py,
tests/test_sam_variants.py): each replica takes the method's step on its own shard from the one shared
state, and the outputs and the new states are the replicas' means (``reference.per_replica``).
Tolerance: as tests/test_family_reference.py (float64, a few steps: ~1e-13, far below 1e-10).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.test_reference import HP, _run_jax
from tests.test_reference import _jax_train as jax_train_f64
from xsam_jax._src import base
from xsam_jax._src.eigen_sam import initial_eigvec

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]
N_REPLICAS = 4
WEIGHTS_ONLY = {"b1": False, "b2": False, "w1": True, "w2": True}

METHODS = {
  "sam": xsam_jax.sam,
  "xsam": xsam_jax.xsam,
  "msam": xsam_jax.msam,
  "lsam": xsam_jax.lsam,
  "vasso": xsam_jax.vasso,
  "eigen_sam": xsam_jax.eigen_sam,
  "gsam": xsam_jax.gsam,
  "wsam": xsam_jax.wsam,
  "friendly_sam": xsam_jax.friendly_sam,
  "looksam": xsam_jax.looksam,
}
EVERYWHERE = {
  "axis_name": None,
  "m_sharpness": False,
  "adaptive": False,
  "eta": 0.01,
  "adaptive_mask": None,
  "perturb_mask": None,
  "perturb_start": 0,
  "check_updates": False,
}
MULTI_STEP = {"sam", "xsam", "msam", "lsam", "eigen_sam"}  # the methods defined with K ascent steps


# ---------------------------------------------------------------------------------------------------------
# Every method takes every option; the record checks them once
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_every_shared_option(name):
  parameters = inspect.signature(METHODS[name]).parameters
  expected = dict(EVERYWHERE)
  if name != "looksam":  # LookSAM's period is its `k`
    expected["perturb_every"] = 1
  if name in MULTI_STEP:  # MSAM and LSAM require K
    expected["num_steps"] = inspect.Parameter.empty if name in ("msam", "lsam") else 1
  for option, default in expected.items():
    assert option in parameters, f"{name} has no `{option}`"
    assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
    assert parameters[option].default == default, (name, option)
  if name not in MULTI_STEP:
    assert "num_steps" not in parameters


def test_options_record_is_checked_once_and_complete():
  arguments = dict(rho=0.1, num_steps=np.int64(2), adaptive=np.bool_(True), m_sharpness=False, other=object())
  arguments |= dict(axis_name=None, eta=0.01, adaptive_mask=None, perturb_mask=None, perturb_start=0)
  arguments |= dict(check_updates=False)
  options = base.Options.from_arguments("m", arguments, perturb_every=3)
  assert options.method == "m"
  assert (options.num_steps, options.adaptive, options.perturb_every) == (2, True, 3)
  assert type(options.num_steps) is int
  assert type(options.adaptive) is bool
  with pytest.raises(TypeError, match=r"\['perturb_every'\]"):  # neither given nor fixed
    base.Options.from_arguments("m", arguments)
  with pytest.raises(TypeError, match=r"\['eta'\]"):  # given twice
    base.Options.from_arguments("m", arguments, perturb_every=1, eta=0.1)
  with pytest.raises(TypeError, match=r"\['nope'\]"):
    base.Options.from_arguments("m", arguments, perturb_every=1, nope=1)
  with pytest.raises(ValueError, match=r"`eta` must be a finite real number >= 0"):
    base.Options.from_arguments("m", arguments | dict(eta=-1.0), perturb_every=1)


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: xsam_jax.msam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.lsam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.vasso(0.1, **kw),
    lambda **kw: xsam_jax.eigen_sam(0.1, **kw),
    lambda **kw: xsam_jax.friendly_sam(0.1, **kw),
  ],
  ids=["msam", "lsam", "vasso", "eigen_sam", "friendly_sam"],
)
def test_new_options_are_checked(make):
  with pytest.raises(ValueError, match=r"`m_sharpness=True` needs `axis_name`"):
    make(m_sharpness=True)
  with pytest.raises(ValueError, match=r"`m_sharpness` must be"):
    make(axis_name="batch", m_sharpness="yes")
  with pytest.raises(ValueError, match=r"`adaptive` must be"):
    make(adaptive=1)
  with pytest.raises(ValueError, match=r"`eta` must be a finite real number >= 0"):
    make(adaptive=True, eta=-0.1)


# ---------------------------------------------------------------------------------------------------------
# adaptive on VaSSO and EigenSAM: the float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["all", "weights-only"])
def test_adaptive_vasso_matches_reference(masked):
  """ASAM's neighbourhood for VaSSO's perturbation: w + rho T^2 d_t / |T d_t|."""
  problem, p0 = problems.mlp_data(seed=42)
  theta, eta = 0.4, 0.05
  mask = WEIGHTS_ONLY if masked else None
  flat_mask = reference.flat_mask(problem, mask) if masked else None

  def output_fn(w, count, ema):
    return reference.vasso_output(problem.grad, w, RHO, theta, ema, t=reference.asam_t(w, eta, flat_mask))

  w_ref, ema_ref = reference.run(reference.MLP.flatten(p0), STEPS, output_fn, **BASE)
  tx = xsam_jax.vasso(RHO, theta=theta, adaptive=True, eta=eta, adaptive_mask=mask)
  w, state, _ = jax_train_f64(tx, problem, p0, STEPS)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(reference.MLP.flatten(jax.tree.map(np.asarray, state[0].ema)), ema_ref, atol=1e-10)
  w_plain, _, _ = jax_train_f64(xsam_jax.vasso(RHO, theta=theta), problem, p0, STEPS)
  assert np.max(np.abs(w - w_plain)) > 1e-4  # ASAM changed the run


def test_adaptive_eigen_sam_matches_reference():
  """ASAM moves EigenSAM's ascent point; the eigenvector and the correction stay in plain coordinates."""
  problem, p0, loss_fn = _quartic()
  period, iters, rho, eta, alpha, steps = 2, 5, 0.2, 0.1, 0.8, 6

  def output_fn(w, count, v):
    if count % period == 0:
      v, _ = reference.power_iteration(lambda x: problem.hvp(w, x), v, iters)
    g_adv = reference.ascent(problem.grad, w, problem.grad(w), rho, 1, t=reference.asam_t(w, eta))[0][-1]
    return reference.eigen_corrected(g_adv, v, alpha), v

  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    v0 = _flat(initial_eigvec(params, seed=1))
    tx = xsam_jax.eigen_sam(
      rho, alpha=alpha, eig_update_period=period, power_iterations=iters, seed=1, adaptive=True, eta=eta
    )
    out, state, _ = _run_jax(tx, params, loss_fn, steps)
    w = _flat(out)
  w_ref, v_ref = reference.run(_flat(p0), steps, output_fn, state=v0, **BASE)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(_flat(state[0].eigvec), v_ref, atol=1e-10)


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


def _quartic(seed=45):
  """A reference Quartic on 7 parameters, with its JAX loss on {"u": (3,), "v": (2, 2)}."""
  rng = np.random.default_rng(seed)
  a, b = _quartic_matrix(rng), rng.normal(size=7) * 0.5
  params = _quartic_params(rng.normal(size=7) * 0.5)
  return reference.Quartic(a, b), params, _quartic_loss((a, b))


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
