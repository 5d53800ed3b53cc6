"""axis_name: replicas that see different shards of a batch agree with the
single-device result on the whole batch (one device: the axis is a vmap axis;
the multi-device tests run on 8 CPU devices in their own module)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import xsam_jax
from tests import problems
from tests.tolerances import assert_argmax_lead, assert_trees_close, f32_bound

N_REPLICAS = 4


def _loss_on(x, t):
  def loss_fn(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
    y = h @ p["w2"] + p["b2"][None, :]
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=1))

  return loss_fn


@pytest.mark.parametrize(
  "make",
  [
    lambda ax: xsam_jax.sam(0.3, num_steps=3, axis_name=ax),
    # rho_max = 1.0: every probe round has a clear winner (with 0.6 the best alpha led by ~3e-5, within
    # rounding of the losses, so 4 replicas and one device could pick different alphas).
    lambda ax: xsam_jax.xsam(0.3, 1.0, alpha_update_period=2, axis_name=ax),
    lambda ax: xsam_jax.xsam(0.3, 1.0, num_steps=3, alpha_update_period=1, probe_batch_size=5, axis_name=ax),
  ],
  ids=["sam-k3", "xsam-k1", "xsam-k3-chunked"],
)
def test_replicas_agree_with_global_batch(make):
  problem, p0 = problems.mlp_data(seed=10, n=16)
  params = jax.tree.map(jnp.float32, p0)
  x, t = jnp.asarray(problem.x, jnp.float32), jnp.asarray(problem.t, jnp.float32)
  base = lambda tx0: optax.chain(tx0, optax.sgd(0.05, momentum=0.9))

  tx_global = base(make(None))
  tx_rep = base(make("batch"))
  s_g = tx_global.init(params)
  s_r = jax.tree.map(lambda a: jnp.broadcast_to(a, (N_REPLICAS, *a.shape)), tx_rep.init(params))
  p_g = params
  p_r = jax.tree.map(lambda a: jnp.broadcast_to(a, (N_REPLICAS, *a.shape)), params)
  xs, ts = x.reshape(N_REPLICAS, -1, x.shape[1]), t.reshape(N_REPLICAS, -1, t.shape[1])

  def replica_step(p, s, xb, tb):
    loss_fn = _loss_on(xb, tb)
    g = jax.grad(loss_fn)(p)  # local gradient; the transformation averages it
    u, s = tx_rep.update(g, s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  step_r = jax.jit(jax.vmap(replica_step, axis_name="batch"))

  @jax.jit
  def step_g(p, s):
    loss_fn = _loss_on(x, t)
    u, s = tx_global.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  # Replicas reduce over shards (pmean of 4 means of 4), one device over the batch (a mean of 16).
  # One step, K = 3 with probes: 4 gradients and a probe loss, 5 norms or dot products over the parameters.
  step_ops = 5 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS
  for _ in range(4):
    p_g, s_g = step_g(p_g, s_g)
    p_r, s_r = step_r(p_r, s_r, xs, ts)
    if hasattr(s_g[0], "alpha"):  # alpha is an argmax: the same only without near-ties
      assert_argmax_lead(s_g[0].probe_losses, f32_bound(s_g[0].probe_losses, n_ops=step_ops))
  # 4 steps: each update within step_ops of its size (<= the params'), moved by lr = 0.05 and summed by
  # momentum 0.9 (weights 1 + 1.9 + 2.71 + 3.44 < 10): under 0.5 step_ops, plus 4 roundings of the params.
  tol = f32_bound(*jax.tree.leaves(p_g), n_ops=0.5 * step_ops + 4)
  for leaf_r, leaf_g in zip(jax.tree.leaves(p_r), jax.tree.leaves(p_g), strict=True):
    for i in range(N_REPLICAS):
      np.testing.assert_allclose(leaf_r[i], leaf_g, rtol=0, atol=tol)
  if hasattr(s_g[0], "alpha"):  # the same grid point, not a near-tie (checked above)
    np.testing.assert_array_equal(np.asarray(s_r[0].alpha), float(s_g[0].alpha))


def _shard_map_step(tx, pmean_loss, pcast):
  """One update inside ``jax.shard_map`` (check_vma on) on a 1-device mesh, without ``axis_name``."""
  mesh = jax.make_mesh((1,), ("data",))
  problem, params = problems.mlp_data(seed=21)
  params = jax.device_put(
    jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), jax.sharding.NamedSharding(mesh, P())
  )
  data = [jnp.asarray(a, jnp.float32) for a in (problem.x, problem.t)]
  x, t = jax.device_put(data, jax.sharding.NamedSharding(mesh, P("data")))

  def step(p, x, t):
    loss = _loss_on(x, t)
    loss_fn = (lambda q: jax.lax.pmean(loss(q), "data")) if pmean_loss else loss
    g = jax.grad(loss_fn)(jax.lax.pcast(p, "data", to="varying") if pcast else p)
    u, _ = tx.update(g, tx.init(p), p, loss_fn=loss_fn)
    return jax.tree.map(lambda v: jax.lax.pmean(v, "data"), u)

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))(params, x, t)


@pytest.mark.parametrize("method", ["sam", "xsam"])
@pytest.mark.parametrize(
  ("pmean_loss", "pcast", "match"),
  [
    (False, False, r"`loss_fn` returns a loss that varies over the mesh axes \['data'\].*axis_name='data'"),
    (False, True, r"gradient at \['b1'\] varies over the mesh axes \['data'\].*axis_name='data'"),
  ],
)
def test_per_replica_values_without_axis_name_are_an_error(method, pmean_loss, pcast, match):
  """Data parallelism under shard_map without axis_name: each replica would perturb with its own
  gradient and the replicas drift apart; with vma types this is visible at trace time."""
  tx = xsam_jax.sam(0.1) if method == "sam" else xsam_jax.xsam(0.1, 0.2, alpha_update_period=2)
  with pytest.raises(ValueError, match=match):
    _shard_map_step(tx, pmean_loss, pcast)


def test_global_loss_under_shard_map_needs_no_axis_name():
  """A loss averaged over the axis inside loss_fn is the global loss: no axis_name is needed, and the
  update equals the plain one (one device: the same computation)."""
  tx = xsam_jax.sam(0.1)
  u = _shard_map_step(tx, pmean_loss=True, pcast=False)
  problem, params = problems.mlp_data(seed=21)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  loss_fn = _loss_on(jnp.asarray(problem.x, jnp.float32), jnp.asarray(problem.t, jnp.float32))
  expected, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
  # Two programs (shard_map and plain jit): 2 gradients and 2 norms over the parameters.
  assert_trees_close(u, expected, 2 * problems.LOSS_OPS + 2 * problems.NUM_PARAMS)
