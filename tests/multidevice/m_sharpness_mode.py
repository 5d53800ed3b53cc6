"""Mode 3, m-sharpness: ``m_sharpness=True``; replicas agree with each other, the result differs from
the global one, shard_map equals pmap, and one SAM step equals a per-shard computation by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
  LOSS_OPS,
  NUM_PARAMS,
  PARAMS_OPS,
  STEP_OPS,
  _per_optimizer,
  assert_replicas_identical,
  check,
  make_tx,
  problem,
  reference,
  sa_state,
  train_m_sharpness_shard_map,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from snippets import batch_loss, make_m_sharpness_step, make_replica_step, mesh, train_pmap

import xsam_jax
from tests.tolerances import assert_argmax_lead, assert_trees_close, f32_bound

_M_PMAP = {}


def _m_sharpness_pmap(name):
  if name not in _M_PMAP:
    params, batches = problem()
    p, s = train_pmap(make_tx(name, axis_name="batch", m_sharpness=True), params, batches)
    _M_PMAP[name] = (assert_replicas_identical(p, True), assert_replicas_identical(s, True))
  return _M_PMAP[name]


@_per_optimizer
def m_sharpness_pmap(name):
  def run():
    p, s = _m_sharpness_pmap(name)
    p_ref, _ = reference(name)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True))
    assert diff > 1e-4, f"m-sharpness should differ from the global run (max diff {diff:.2e})"
    if hasattr(sa_state(s), "alpha"):
      assert np.float32(sa_state(s).alpha) in np.float32(xsam_jax.DEFAULT_ALPHAS)

  return run


@_per_optimizer
def m_sharpness_shard_map(name):
  def run():
    params, batches = problem()
    p, s = train_m_sharpness_shard_map(make_tx(name, axis_name="batch", m_sharpness=True), params, batches)
    p = assert_replicas_identical(p)
    s = assert_replicas_identical(s)
    p_pmap, s_pmap = _m_sharpness_pmap(name)
    assert_trees_close(p, p_pmap, PARAMS_OPS)
    assert_trees_close(s, s_pmap, STEP_OPS)
    if hasattr(sa_state(s), "alpha"):  # a grid point: the same when the last round has a clear winner
      losses = sa_state(s_pmap).probe_losses
      assert_argmax_lead(losses, f32_bound(losses, n_ops=STEP_OPS))
      np.testing.assert_array_equal(sa_state(s).alpha, sa_state(s_pmap).alpha)

  return run


@check
def m_sharpness_one_sam_step_by_hand():
  """One m-sharpness SAM step is the mean over shards of the gradient at
  each shard's own ascent point (plain numpy-style loop on one device)."""
  rho, n = 0.1, jax.device_count()
  params, batches = problem()
  x, y = batches[0]
  tx = xsam_jax.sam(rho, axis_name="batch", m_sharpness=True)
  step = make_m_sharpness_step(tx)
  state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
  new_params, _, _ = step(
    jax.device_put(params, NamedSharding(mesh, P())), state, *jax.device_put((x, y), NamedSharding(mesh, P("batch")))
  )
  # make_m_sharpness_step applies the transformation's output directly, so
  # new_params = params + output, i.e. output = new_params - params.
  output = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_params, params)

  @jax.jit
  def shard_sam_gradient(xs, ys):
    g = jax.grad(batch_loss)(params, xs, ys)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    return jax.grad(batch_loss)(jax.tree.map(lambda w, v: w + rho * v / (norm + 1e-12), params, g), xs, ys)

  per_shard = [shard_sam_gradient(xs, ys) for xs, ys in zip(np.split(x, n), np.split(y, n), strict=True)]
  expected = jax.tree.map(lambda *v: sum(v) / n, *per_shard)
  # 2 gradients and |g_0| per shard, then the mean over shards (8); new_params - params keeps the
  # rounding of params + output (2 steps at the size of the params).
  tol = f32_bound(*jax.tree.leaves(expected), n_ops=2 * LOSS_OPS + NUM_PARAMS + 8)
  tol += f32_bound(*jax.tree.leaves(params), n_ops=2)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, np.asarray(v), rtol=0, atol=tol), output, expected)


@check
def m_sharpness_rejects_summed_gradient():
  """Under shard_map, the gradient w.r.t. replicated params is summed over
  replicas: m-sharpness cannot use it and says how to get the replica's own."""
  tx = make_tx("xsam-k1", axis_name="batch", m_sharpness=True)
  step = jax.jit(
    jax.shard_map(make_replica_step(tx), mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P())
  )
  params, batches = problem()
  try:
    step(
      *jax.device_put((params, tx.init(params)), NamedSharding(mesh, P())),
      *jax.device_put(batches[0], NamedSharding(mesh, P("batch"))),
    )
  except ValueError as e:
    assert "pcast" in str(e), e
  else:
    raise AssertionError("expected a ValueError")


@check
def m_sharpness_shard_map_every_method():
  """m_sharpness on the methods that gained it, whose states hold averages and eigenvectors: under
  shard_map (check_vma=True, the state's out_specs P() demands one state for all replicas) the replicas
  agree bitwise, and shard_map equals pmap. Their float64 references: tests/test_m_sharpness.py."""
  params, batches = problem()
  for make in (
    lambda **kw: xsam_jax.msam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.lsam(0.1, num_steps=2, plus=True, **kw),
    lambda **kw: xsam_jax.vasso(0.1, theta=0.4, adaptive=True, **kw),
    lambda **kw: xsam_jax.friendly_sam(0.1, **kw),
    lambda **kw: xsam_jax.eigen_sam(0.1, eig_update_period=2, power_iterations=2, **kw),
  ):
    tx = optax.chain(make(axis_name="batch", m_sharpness=True), optax.sgd(0.05, momentum=0.9))
    p, s = train_m_sharpness_shard_map(tx, params, batches)
    p, s = assert_replicas_identical(p), assert_replicas_identical(s)
    p_pmap, s_pmap = train_pmap(tx, params, batches)
    assert_trees_close(p, assert_replicas_identical(p_pmap, True), PARAMS_OPS)
    assert_trees_close(s, assert_replicas_identical(s_pmap, True), STEP_OPS)


@check
def m_sharpness_needs_axis_name():
  for make in (lambda: xsam_jax.sam(0.1, m_sharpness=True), lambda: xsam_jax.xsam(0.1, 0.2, m_sharpness=True)):
    try:
      make()
    except ValueError as e:
      assert "axis_name" in str(e), e
    else:
      raise AssertionError("expected a ValueError")
