"""Data-parallel checks on 8 CPU devices, run by ``tests/test_multidevice.py``.

The device count is fixed when jax starts, so these checks run in their own
process: ``python tests/multidevice_checks.py [SUBSTRING ...]`` (it asks for
8 host devices itself unless ``XLA_FLAGS`` already sets a count). Each check
prints ``ok <name>``; the process exits non-zero if any check fails.

With ``--process-id I --num-processes 2 --port PORT`` (and 4 devices per
process) it joins a local two-process CPU cluster and runs the multi-host
checks instead (``tests/test_multidevice.py`` starts both processes).

The code between ``# [snippet: NAME]`` and ``# [end snippet]`` is what docs/scaling-out.md
shows, by ``literalinclude`` (``tests/test_multidevice.py`` checks that the page includes
every snippet).

Modes checked, for SAM and XSAM with K = 1 and 3 and probes every 1 or 2
steps:

1. global: no ``axis_name``; ``jax.jit`` over a batch sharded with
   ``NamedSharding`` equals the single-device run on the same global batch.
2. explicit collectives: ``axis_name="batch"`` inside ``jax.shard_map``
   (default ``check_vma=True``, also ``False``) and ``jax.pmap``; every
   replica holds the same parameters and alpha, equal to the single-device
   run. Also with ``g_0`` from varying params and with an already averaged
   loss.
3. m-sharpness: ``m_sharpness=True``; replicas agree with each other, the
   result differs from the global one, shard_map equals pmap, and one SAM
   step equals a per-shard computation written out by hand.
"""

import os
import sys
import time
import traceback

# ``--process-id I --num-processes N --port PORT``: join a local CPU cluster
# of N processes with 8 // N devices each (the multi-process checks).
CLUSTER = None
if "--process-id" in sys.argv:
  _args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=True))
  CLUSTER = {k: int(_args["--" + k.replace("_", "-")]) for k in ("process_id", "num_processes", "port")}
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // CLUSTER['num_processes']}"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if CLUSTER is not None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPU/TPU need nothing
  coordinator_address = f"localhost:{CLUSTER['port']}"
  num_processes, process_id = CLUSTER["num_processes"], CLUSTER["process_id"]
  # [snippet: multi-host]
  jax.distributed.initialize(  # on every process, before any other JAX call
    coordinator_address=coordinator_address,  # "host:port" of process 0
    num_processes=num_processes,
    process_id=process_id,
  )  # on TPU, Slurm or Open MPI: jax.distributed.initialize() finds these itself
  # [end snippet]

# docs/scaling-out.md shows the setup snippet as written, with `PartitionSpec as P` combined: keep its imports.
# isort: off
# [snippet: setup]
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import xsam_jax

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


# ----------------------------------------------------------------------------
# The checks.

from tolerances import (  # tests/tolerances.py: tests/ is sys.path[0] in this script
  assert_argmax_lead,
  assert_trees_close,
  f32_bound,
)

N_STEPS = 4
GLOBAL_BATCH = 64

# Tolerances from rounding bounds (tests/tolerances.py), not from one machine's output. One device
# and 8 reduce the batch in other orders (one mean of 64, or 8 shard means combined). With M the size
# of the loss, a loss or gradient of problem() chains reductions of length 3, 8, 2 and 64 (the mean)
# and tanh, ~90 steps on residuals that cancel: 128; a norm or dot product over its 50 parameters: 50.
LOSS_OPS, NUM_PARAMS = 128, 50
# One step of the longest chain (K = 3, probing): 4 gradients and a probe loss, 5 norms or dot products.
STEP_OPS = 5 * LOSS_OPS + 5 * NUM_PARAMS
# N_STEPS steps: each update within STEP_OPS of its size, moved by lr = 0.05 and summed by momentum 0.9
# (weights 1 + 1.9 + 2.71 + 3.44 < 10), so under 0.5 STEP_OPS, plus a rounding of the params per step.
# The optimizer state (momentum, |g_K|, probe losses, theta) is within STEP_OPS of its largest entry.
PARAMS_OPS = 0.5 * STEP_OPS + N_STEPS

# XSAM on a 5-point grid at radii where every probe round of the reference has a clear winner (checked
# by train_single_device): with 21 points and rho_max = 0.2 the best alpha led by ~1e-5, within rounding
# of the losses, so one device and 8 could pick different alphas.
COARSE_ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)
OPTIMIZERS = {
  "sam-k1": lambda **kw: xsam_jax.sam(0.1, **kw),
  "sam-k3": lambda **kw: xsam_jax.sam(0.1, num_steps=3, **kw),
  "xsam-k1": lambda **kw: xsam_jax.xsam(0.3, 0.6, alphas=COARSE_ALPHAS, alpha_update_period=2, **kw),
  "xsam-k3": lambda **kw: xsam_jax.xsam(0.3, 0.6, alphas=COARSE_ALPHAS, num_steps=3, alpha_update_period=1, **kw),
}


# Checked in fewer modes (not part of the per-optimizer loops).
EXTRA_OPTIMIZERS = {
  "xsam-asam-k1": lambda **kw: xsam_jax.xsam(
    0.9, 1.8, alphas=COARSE_ALPHAS, alpha_update_period=1, adaptive=True, **kw
  ),
}


def make_tx(name, **kw):
  make = OPTIMIZERS.get(name) or EXTRA_OPTIMIZERS[name]
  return optax.chain(make(**kw), optax.sgd(0.05, momentum=0.9))


def problem(seed=0, din=3, dh=8, dout=2):
  """Float32 params and N_STEPS global batches of a random regression, as
  host (numpy) arrays, as a data loader would give them."""
  rng = np.random.default_rng(seed)
  shapes = {"w1": (din, dh), "b1": (dh,), "w2": (dh, dout), "b2": (dout,)}
  params = {k: (rng.normal(size=s) * (0.8 if k[0] == "w" else 0.1)).astype(np.float32) for k, s in shapes.items()}
  batches = [
    (rng.normal(size=(GLOBAL_BATCH, din)).astype(np.float32), rng.normal(size=(GLOBAL_BATCH, dout)).astype(np.float32))
    for _ in range(N_STEPS)
  ]
  return params, batches


def train_single_device(tx, params, batches):
  """The reference: the global step on one device, nothing sharded. Checks that each
  probe round (XSAM) has a clear winner, so that the runs compared with it choose alike."""
  step = make_global_step(tx)
  dev = jax.local_devices()[0]
  params, opt_state = jax.device_put((params, tx.init(params)), dev)
  for x, y in batches:
    params, opt_state, _ = step(params, opt_state, *jax.device_put((x, y), dev))
    if hasattr(sa_state(opt_state), "probe_losses"):
      losses = sa_state(opt_state).probe_losses
      assert_argmax_lead(losses, f32_bound(losses, n_ops=STEP_OPS))
  return params, opt_state


def replicas_of(tree, stacked=False):
  """One numpy copy of ``tree`` per device: the rows of a pmap output, or
  every device's buffer of a replicated array."""
  if stacked:
    n = jax.tree.leaves(tree)[0].shape[0]
    tree = jax.tree.map(np.asarray, tree)
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]
  leaves, treedef = jax.tree.flatten(tree)
  per_leaf = []
  for leaf in leaves:
    shards = sorted(leaf.addressable_shards, key=lambda s: s.device.id)
    assert all(s.data.shape == leaf.shape for s in shards), "not replicated"
    per_leaf.append([np.asarray(s.data) for s in shards])
  return [jax.tree.unflatten(treedef, list(row)) for row in zip(*per_leaf, strict=True)]


def assert_replicas_identical(tree, stacked=False):
  """Bitwise: every replica applies the same all-reduced values to the same state, so replicas never
  drift apart; that is the contract of data parallelism, not a rounding question."""
  rows = replicas_of(tree, stacked)
  assert len(rows) == jax.local_device_count(), len(rows)
  for row in rows[1:]:
    jax.tree.map(np.testing.assert_array_equal, row, rows[0])
  return rows[0]


def sa_state(opt_state):
  """The sharpness-aware transformation's own state inside the chain."""
  return opt_state[0]


_REFERENCE = {}


def reference(name):
  if name not in _REFERENCE:
    params, batches = problem()
    _REFERENCE[name] = jax.tree.map(np.asarray, train_single_device(make_tx(name), params, batches))
  return _REFERENCE[name]


def check_matches_reference(name, params, opt_state, stacked=False):
  """Replicas identical (params and the whole optimizer state), equal to the
  single-device run; alpha exactly equal."""
  p = assert_replicas_identical(params, stacked)
  s = assert_replicas_identical(opt_state, stacked)
  p_ref, s_ref = reference(name)
  assert_trees_close(p, p_ref, PARAMS_OPS)
  assert_trees_close(s, s_ref, STEP_OPS)
  if hasattr(sa_state(s_ref), "alpha"):  # a grid point; no near-tie in the reference (train_single_device)
    np.testing.assert_array_equal(sa_state(s).alpha, sa_state(s_ref).alpha)


CHECKS = []


def check(fn):
  CHECKS.append(fn)
  return fn


def _per_optimizer(make_check):
  for name in OPTIMIZERS:
    fn = make_check(name)
    fn.__name__ = f"{make_check.__name__}[{name}]"
    CHECKS.append(fn)
  return make_check


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
  p, s = _train_m_sharpness_shard_map(make_tx(name, axis_name="batch", m_sharpness=True), params, batches)
  assert_replicas_identical((p, s))


def _train_m_sharpness_shard_map(tx, params, batches):
  step = make_m_sharpness_step(tx)
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  for x, y in batches:
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    params, opt_state, _ = step(params, opt_state, x, y)
  return params, opt_state


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
    p, s = _train_m_sharpness_shard_map(make_tx(name, axis_name="batch", m_sharpness=True), params, batches)
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
  agree bitwise, and shard_map equals pmap. Their float64 references: tests/test_shared_options.py."""
  params, batches = problem()
  for make in (
    lambda **kw: xsam_jax.msam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.lsam(0.1, num_steps=2, plus=True, **kw),
    lambda **kw: xsam_jax.vasso(0.1, theta=0.4, adaptive=True, **kw),
    lambda **kw: xsam_jax.friendly_sam(0.1, **kw),
    lambda **kw: xsam_jax.eigen_sam(0.1, eig_update_period=2, power_iterations=2, **kw),
  ):
    tx = optax.chain(make(axis_name="batch", m_sharpness=True), optax.sgd(0.05, momentum=0.9))
    p, s = _train_m_sharpness_shard_map(tx, params, batches)
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


MULTIPROCESS_CHECKS = []


def multiprocess_check(fn):
  MULTIPROCESS_CHECKS.append(fn)
  return fn


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


def main(argv):
  assert jax.device_count() == 8, f"expected 8 devices, got {jax.device_count()}"
  argv = [a for a in argv if not a.startswith("--") and not a.isdigit()]
  pool = CHECKS if CLUSTER is None else MULTIPROCESS_CHECKS
  selected = [c for c in pool if not argv or any(a in c.__name__ for a in argv)]
  failed = []
  start = time.perf_counter()
  for fn in selected:
    t0 = time.perf_counter()
    try:
      fn()
    except Exception:  # noqa: BLE001 - report every failing check, then fail
      failed.append(fn.__name__)
      print(f"FAIL {fn.__name__}")
      traceback.print_exc()
    else:
      print(f"ok   {fn.__name__} ({time.perf_counter() - t0:.1f}s)")
    sys.stdout.flush()
  print(f"{len(selected) - len(failed)}/{len(selected)} checks passed in {time.perf_counter() - start:.1f}s")
  if failed:
    print("FAILED: " + ", ".join(failed))
    return 1
  print("ALL CHECKS PASSED")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
