"""Mode 1, global: no ``axis_name``; ``jax.jit`` over a batch sharded with ``NamedSharding`` equals the
single-device run on the same global batch."""

import jax
import jax.numpy as jnp
from common import LOSS_OPS, _per_optimizer, check, check_matches_reference, make_tx, problem
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from snippets import batch_loss, make_global_step, mesh, train_global

from tests.tolerances import assert_trees_close


@check
def evidence_shard_map_grad_of_replicated_params_is_summed():
  """What the collectives code builds on (jax 0.10.2): under shard_map with
  check_vma=True the gradient w.r.t. replicated params is the sum over
  replicas; with varying params, under pmap or with check_vma=False, it is
  the replica's own."""
  params, batches = problem()
  x, y = jax.device_put(batches[0], NamedSharding(mesh, P("batch")))
  n = jax.device_count()
  g_global = jax.grad(batch_loss)(params, *batches[0])

  def grads(check_vma, cast):
    def f(p, xb, yb):
      q = jax.lax.pcast(p, "batch", to="varying") if cast else p
      return jax.lax.pmean(jax.grad(batch_loss)(q, xb, yb), "batch")

    return jax.jit(
      jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P(), check_vma=check_vma)
    )(params, x, y)

  summed = grads(True, False)
  assert_trees_close(summed, jax.tree.map(lambda g: n * g, g_global), LOSS_OPS)  # one gradient, other reductions
  assert_trees_close(grads(True, True), g_global, LOSS_OPS)
  assert_trees_close(grads(False, False), g_global, LOSS_OPS)
  ratio = float(jnp.linalg.norm(summed["w1"]) / jnp.linalg.norm(g_global["w1"]))
  print(f"   shard_map(check_vma=True): |grad wrt P() params| / |global grad| = {ratio:.4f} on {n} devices")


@_per_optimizer
def global_jit_named_sharding(name):
  def run():
    params, batches = problem()
    p, s = train_global(make_tx(name), params, batches)
    check_matches_reference(name, p, s)

  return run


@check
def global_jit_named_sharding_auto_axes():
  """The same with an Auto (not Explicit) mesh axis, the older default."""
  name = "xsam-k3"
  auto_mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  params, batches = problem()
  tx = make_tx(name)
  step = make_global_step(tx)
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(auto_mesh, P()))
  for x, y in batches:
    x, y = jax.device_put((x, y), NamedSharding(auto_mesh, P("batch")))
    params, opt_state, _ = step(params, opt_state, x, y)
  check_matches_reference(name, params, opt_state)
