"""Small problems shared by the tests (JAX side)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests import reference

# Rounding steps (tests/tolerances.py) of mlp_problem, with M the size of its loss (~1-4): one loss or
# gradient chains reductions of length 3, 5, 2 and 16 (the mean), tanh (4) and a few elementwise ops,
# under 32 steps, on residuals y - t that cancel operands up to ~2x their size: 64. A norm or dot
# product over its 32 parameters is 32 steps.
LOSS_OPS = 64
NUM_PARAMS = 32


def mlp_data(seed=0, n=16, din=3, dh=5, dout=2):
  """Random data and params (numpy float64) for the reference MLP."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, din))
  t = rng.normal(size=(n, dout))
  shapes = {"w1": (din, dh), "b1": (dh,), "w2": (dh, dout), "b2": (dout,)}
  params = {k: rng.normal(size=s) * (0.8 if k[0] == "w" else 0.1) for k, s in shapes.items()}
  return reference.MLP(x, t, shapes), params


def mlp_batch_loss(p, batch):
  """The reference MLP's loss ``loss(params, batch)``: the mean over the examples of ``batch = {"x", "t"}``."""
  h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"][None, :])
  y = h @ p["w2"] + p["b2"][None, :]
  return 0.5 * jnp.mean(jnp.sum((y - batch["t"]) ** 2, axis=1))


def mlp_batch(problem, dtype=jnp.float32):
  """A reference MLP problem's data as the batch ``{"x": (n, din), "t": (n, dout)}`` of :func:`mlp_batch_loss`."""
  return {"x": jnp.asarray(problem.x, dtype), "t": jnp.asarray(problem.t, dtype)}


def mlp_loss_fn(problem, dtype=jnp.float32):
  """The JAX loss of a reference MLP problem, as a function of a params dict."""
  batch = mlp_batch(problem, dtype)
  return lambda p: mlp_batch_loss(p, batch)


def mlp_problem(seed=0, dtype=jnp.float32):
  """(params, loss_fn) in ``dtype`` for the battery."""
  problem, params = mlp_data(seed)
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params), mlp_loss_fn(problem, dtype)


# ---------------------------------------------------------------------------------------------------------
# Data parallelism on one device: the replicas are a ``jax.vmap`` axis named "batch", each with its own shard
# ---------------------------------------------------------------------------------------------------------

N_REPLICAS = 4
# Two programs computing one SAM-like update on mlp_problem: per side one ascent gradient and one norm over the
# parameters (tests/tolerances.py), plus a few elementwise roundings of the combination.
UPDATE_OPS = 2 * (LOSS_OPS + NUM_PARAMS) + 4


def replica_shards(seed):
  """(float32 params, the whole batch (x, t), its N_REPLICAS shards (xs, ts)) of the reference MLP on 16 examples."""
  problem, p0 = mlp_data(seed=seed, n=16)
  params = jax.tree.map(jnp.float32, p0)
  x, t = jnp.asarray(problem.x, jnp.float32), jnp.asarray(problem.t, jnp.float32)
  xs, ts = x.reshape(N_REPLICAS, -1, x.shape[1]), t.reshape(N_REPLICAS, -1, t.shape[1])
  return params, (x, t), (xs, ts)


def replicated(tree):
  """``tree`` stacked N_REPLICAS times along a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_REPLICAS, *jnp.shape(a))), tree)


def replica_update(tx, params, xs, ts):
  """One update of ``tx`` on each of the replicas (vmap axis "batch"); returns (updates, states) stacked."""

  def step(p, s, xb, tb):
    loss_fn = lambda q: mlp_batch_loss(q, {"x": xb, "t": tb})
    return tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)

  return jax.jit(jax.vmap(step, axis_name="batch"))(replicated(params), replicated(tx.init(params)), xs, ts)


def replica_steps(make, params, xs, ts, updates_to_follow):
  """Runs ``make("batch")`` on the replicas along the params ``updates_to_follow`` leads to; returns the
  per-step (updates, states), stacked over the replicas."""
  tx = make("batch")

  def step(p, s, xb, tb):
    lf = lambda q: mlp_batch_loss(q, {"x": xb, "t": tb})
    return tx.update(jax.grad(lf)(p), s, p, loss_fn=lf)

  step = jax.jit(jax.vmap(step, axis_name="batch"))
  state, out = replicated(tx.init(params)), []
  for u_follow in updates_to_follow:
    u, state = step(replicated(params), state, xs, ts)
    out.append((u, state))
    params = jax.tree.map(lambda p, v: p - 0.05 * v, params, u_follow)
  return out


def train_step(tx, loss_fn, *, pass_loss_fn=True):
  """``step(params, state) -> (params, state, updates)``: the clean gradient, then ``tx.update`` (with
  ``loss_fn=`` unless ``pass_loss_fn`` is False: the whole optimizers called without it), then the update."""

  def step(params, state):
    g = jax.grad(loss_fn)(params)
    extra = {"loss_fn": loss_fn} if pass_loss_fn else {}
    u, state = tx.update(g, state, params, **extra)
    return optax.apply_updates(params, u), state, u

  return step


def train(tx, params, loss_fn, steps=3, *, jit=True, pass_loss_fn=True):
  """``steps`` steps of :func:`train_step` from ``tx.init(params)``; returns ``(params, state, last_updates)``."""
  step = train_step(tx, loss_fn, pass_loss_fn=pass_loss_fn)
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  u = None
  for _ in range(steps):
    params, state, u = step(params, state)
  return params, state, u


def assert_dtypes_kept(params, new_params, updates, dtype):
  """Every update leaf has ``dtype``, every new parameter its old dtype, and the updates are finite."""
  for leaf_u, leaf_p, leaf_p0 in zip(
    jax.tree.leaves(updates), jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True
  ):
    assert leaf_u.dtype == jnp.dtype(dtype)
    assert leaf_p.dtype == leaf_p0.dtype
  assert all_finite(updates)


def all_finite(tree):
  """Whether every leaf of ``tree`` is finite (checked in float64, so bfloat16 and float16 leaves count too)."""
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


def assert_state_survives_cond(update_state, state):
  """The state one update makes (``update_state(state)``) has the structure, shapes and dtypes of ``state``,
  so the update can sit in a ``jax.lax.cond`` (the false branch keeps ``state`` as it is); its int32
  ``count`` is 1 after one step."""

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(pred, update_state, lambda s: s, state)

  new_state = maybe_update(True, state)
  chex.assert_trees_all_equal_structs(state, new_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
  chex.assert_trees_all_equal(maybe_update(False, state), state)
  assert new_state.count.dtype == jnp.int32
  assert int(new_state.count) == 1
