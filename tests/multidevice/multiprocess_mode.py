"""Multi-host: a local cluster of two processes with 4 CPU devices each, joined with
``jax.distributed.initialize``, agrees with one device."""

import jax
import numpy as np
from common import check_matches_reference, make_tx, multiprocess_check, problem
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from snippets import global_batch, make_replica_step, mesh, train_global, train_shard_map


@multiprocess_check
def multiprocess_global_and_shard_map_whole_batch_on_every_process():
  """The single-process snippets, unchanged, on a cluster: every process
  holds the whole batch and jax.device_put keeps its own part."""
  for train, kw in ((train_global, {}), (train_shard_map, {"axis_name": "batch"})):
    params, batches = problem()
    p, s = train(make_tx("xsam-k3", **kw), params, batches)
    check_matches_reference("xsam-k3", p, s)


@multiprocess_check
def multiprocess_shard_map_process_rows():
  """Each process feeds only its own rows (global_batch)."""
  name = "xsam-k3"
  tx = make_tx(name, axis_name="batch")
  step = jax.jit(
    jax.shard_map(make_replica_step(tx), mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P())
  )
  params, batches = problem()
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  rows = lambda a: np.split(a, jax.process_count())[jax.process_index()]
  for x, y in batches:
    params, opt_state, _ = step(params, opt_state, *global_batch(rows(x), rows(y)))
  check_matches_reference(name, params, opt_state)
