"""Mode 2, explicit collectives: ``axis_name="batch"`` inside ``jax.shard_map`` (``check_vma`` True and
False) and ``jax.pmap``; every replica holds the same parameters and alpha, equal to the single-device
run; also with ``g_0`` from varying params and with an already averaged loss."""

import jax
import optax
from common import (
  _per_optimizer,
  assert_replicas_identical,
  check,
  check_matches_reference,
  make_tx,
  problem,
  train_m_sharpness_shard_map,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from snippets import batch_loss, mesh, train_pmap, train_shard_map


@_per_optimizer
def axis_name_shard_map(name):
  def run():
    params, batches = problem()
    p, s = train_shard_map(make_tx(name, axis_name="batch"), params, batches)
    check_matches_reference(name, p, s)

  return run


@_per_optimizer
def axis_name_pmap(name):
  def run():
    params, batches = problem()
    p, s = train_pmap(make_tx(name, axis_name="batch"), params, batches)
    check_matches_reference(name, p, s, stacked=True)

  return run


def _shard_map_variant(name, *, cast_params, average_loss, check_vma=True):
  """axis_name under shard_map with other forms of g_0 and loss_fn."""
  tx = make_tx(name, axis_name="batch")

  def replica_step(params, opt_state, x, y):
    def loss_fn(p):
      loss = batch_loss(p, x, y)
      return jax.lax.pmean(loss, "batch") if average_loss else loss

    at = jax.lax.pcast(params, "batch", to="varying") if cast_params else params
    grads = jax.grad(loss_fn)(at)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(
    jax.shard_map(
      replica_step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P(), check_vma=check_vma
    )
  )
  params, batches = problem()
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  for x, y in batches:
    params, opt_state = step(params, opt_state, *jax.device_put((x, y), NamedSharding(mesh, P("batch"))))
  check_matches_reference(name, params, opt_state)


# Each form takes another path through collectives.gradient_sync (pmean of a
# varying gradient, psum of a varying share, an invariant global gradient,
# no type tracking); the paths do not depend on the method.
@check
def axis_name_shard_map_g0_from_varying_params():
  _shard_map_variant("sam-k3", cast_params=True, average_loss=False)


@check
def axis_name_shard_map_averaged_loss():
  _shard_map_variant("xsam-k3", cast_params=False, average_loss=True)


@check
def axis_name_shard_map_averaged_loss_varying_params():
  _shard_map_variant("xsam-k1", cast_params=True, average_loss=True)


@check
def axis_name_shard_map_check_vma_false():
  _shard_map_variant("sam-k1", cast_params=False, average_loss=False, check_vma=False)


@check
def adaptive_xsam_shard_map_axis_name_and_m_sharpness():
  """XSAM with ASAM's neighbourhood: axis_name equals one device;
  m-sharpness replicas agree."""
  name = "xsam-asam-k1"
  params, batches = problem()
  p, s = train_shard_map(make_tx(name, axis_name="batch"), params, batches)
  check_matches_reference(name, p, s)
  p, s = train_m_sharpness_shard_map(make_tx(name, axis_name="batch", m_sharpness=True), params, batches)
  assert_replicas_identical((p, s))
