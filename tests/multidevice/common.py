"""What every multi-device check shares: the optimizers, the problem, the single-device reference,
the replica helpers, rounding-derived tolerances and the registry of checks (``CHECKS``)."""

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from snippets import make_global_step, make_m_sharpness_step, mesh

import xsam_jax
from tests.tolerances import assert_argmax_lead, assert_trees_close, f32_bound

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
"""The 8-device checks, in order; ``run.py`` runs them (the multi-process ones: ``MULTIPROCESS_CHECKS``)."""


def check(fn):
  CHECKS.append(fn)
  return fn


def _per_optimizer(make_check):
  for name in OPTIMIZERS:
    fn = make_check(name)
    fn.__name__ = f"{make_check.__name__}[{name}]"
    CHECKS.append(fn)
  return make_check


MULTIPROCESS_CHECKS = []
"""The checks of a local two-process cluster."""


def multiprocess_check(fn):
  MULTIPROCESS_CHECKS.append(fn)
  return fn


def train_m_sharpness_shard_map(tx, params, batches):
  step = make_m_sharpness_step(tx)
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  for x, y in batches:
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    params, opt_state, _ = step(params, opt_state, x, y)
  return params, opt_state
