"""The code docs/scaling-out.md shows, by ``literalinclude``: each part between ``# [snippet: NAME]`` and
``# [end snippet]`` (``tests/test_multidevice.py`` checks that the page includes every snippet).

Imported by the checks in this folder (run by ``run.py`` on 8 CPU devices); never run on its own.
"""

# docs/scaling-out.md shows the setup snippet as written, with `PartitionSpec as P` combined: keep its imports.
# isort: off
# [snippet: setup]
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


mesh = jax.make_mesh((jax.device_count(),), ("batch",))


def batch_loss(params, x, y):
  """Mean squared error of a small MLP over the examples it is given."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return 0.5 * jnp.mean(jnp.sum((h @ params["w2"] + params["b2"] - y) ** 2, axis=-1))


# [end snippet]
# isort: on


# [snippet: global]
def make_global_step(tx):
  """Mode 1: no axis_name. Under jax.jit, a batch sharded across the mesh is
  one global batch; XLA inserts the collectives."""

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: batch_loss(p, x, y)  # the whole (sharded) batch
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train_global(tx, params, batches):
  step = make_global_step(tx)
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  for x, y in batches:
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    params, opt_state, loss = step(params, opt_state, x, y)
  return params, opt_state


# [end snippet]


# [snippet: replicas]
def make_replica_step(tx):
  """Mode 2: tx built with axis_name="batch". One replica's step on its shard;
  the same code runs under jax.shard_map and jax.pmap."""

  def replica_step(params, opt_state, x, y):
    loss_fn = lambda p: batch_loss(p, x, y)  # this replica's shard only
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, "batch")

  return replica_step


def train_shard_map(tx, params, batches):
  step = jax.jit(
    jax.shard_map(make_replica_step(tx), mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P())
  )
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  for x, y in batches:
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    params, opt_state, loss = step(params, opt_state, x, y)
  return params, opt_state


def train_pmap(tx, params, batches):
  step = jax.pmap(make_replica_step(tx), axis_name="batch")
  n = jax.local_device_count()
  per_device = NamedSharding(jax.sharding.Mesh(jax.local_devices(), "batch"), P("batch"))  # pmap's layout
  stack = lambda a: np.stack([a] * n)  # on the host: no device op per leaf
  params, opt_state = jax.device_put(jax.tree.map(stack, (params, tx.init(params))), per_device)
  for x, y in batches:
    x, y = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
    params, opt_state, loss = step(params, opt_state, x, y)
  return params, opt_state


# [end snippet]


# [snippet: m-sharpness]
def make_m_sharpness_step(tx):
  """Mode 3: tx built with axis_name="batch", m_sharpness=True. Each replica
  perturbs on its own shard, so it passes its own gradient: under shard_map
  that is the gradient with respect to params cast to varying."""

  def replica_step(params, opt_state, x, y):
    loss_fn = lambda p: batch_loss(p, x, y)
    own = jax.lax.pcast(params, "batch", to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(own)  # not summed over replicas
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, "batch")

  return jax.jit(jax.shard_map(replica_step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P()))


# [end snippet]


# [snippet: multi-host-data]
def global_batch(*process_rows):
  """Multi-host: every process passes its own rows of the global batch; the
  result is one global array per input, sharded over all processes' devices
  (use it instead of jax.device_put of a whole batch)."""
  sharding = NamedSharding(mesh, P("batch"))
  return tuple(jax.make_array_from_process_local_data(sharding, rows) for rows in process_rows)


# [end snippet]
