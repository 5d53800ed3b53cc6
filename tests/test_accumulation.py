"""Gradient accumulation: xsam_jax.microbatched, which gives the full-batch update (docs/accumulation.md).
optax.MultiSteps around a sharpness-aware chain is an error, and MultiSteps inside the chain the recipe for
loops that call the optimizer once per micro-batch: tests/test_script_traps.py."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.tolerances import assert_argmax_lead, assert_trees_within, f32_bound, f64_bound
from xsam_jax._src.microbatch import split_batch

K = 2  # micro-batches
# Rounding steps (tests/tolerances.py) of one update along two code paths, as in tests/test_battery.py.
STEP_OPS = 10 * problems.LOSS_OPS + 10 * problems.NUM_PARAMS
PROBE_OPS = 5 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS

INNER = {
  "sam": lambda: xsam_jax.sam(0.1),
  "xsam": lambda: xsam_jax.xsam(0.1, 0.2, alpha_update_period=1, probe_batch_size=1),
}


def _problem(dtype=jnp.float32):
  problem, params = problems.mlp_data(3, n=16)
  batch = problems.mlp_batch(problem, dtype)
  micro = split_batch(batch, K)
  micro_batches = [jax.tree.map(lambda x, i=i: x[i], micro) for i in range(K)]
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params), batch, micro_batches


def _loss_fn(batch):
  return functools.partial(problems.mlp_batch_loss, batch=batch)


@pytest.mark.parametrize("name", sorted(INNER))
def test_microbatched_update_is_the_full_batch_update_in_float64(name):
  with jax.enable_x64(True):
    params, batch, _ = _problem(jnp.float64)
    loss_mb = xsam_jax.microbatched(problems.mlp_batch_loss, K)

    def update(loss, p):
      tx = INNER[name]()
      return tx.update(jax.grad(loss)(p, batch), tx.init(p), p, loss_fn=functools.partial(loss, batch=batch))

    u_mb, s_mb = jax.jit(functools.partial(update, loss_mb))(params)
    u_full, s_full = jax.jit(functools.partial(update, problems.mlp_batch_loss))(params)
    assert jax.tree.leaves(u_mb)[0].dtype == jnp.float64
    if name == "xsam":
      assert_argmax_lead(s_full.probe_losses, f64_bound(s_full.probe_losses, n_ops=PROBE_OPS))
      assert s_mb.alpha == s_full.alpha
    assert_trees_within(u_mb, u_full, f64_bound(*jax.tree.leaves(u_full), n_ops=STEP_OPS))


# The guide's example: a loss chaining a 16-, a 64- and a 10-long dot product, tanh, log-softmax (2 x 4
# steps) and a 256-example mean, under 400 steps; norms and dot products over its 1664 parameters. One
# SAM step along two code paths: 2 gradients, a norm, and the base optimizer.
GUIDE_LOSS_OPS, GUIDE_PARAMS = 400, 1664


def test_the_guide_runs_and_is_the_full_batch_step():
  """examples/accumulation.py (the guide's example) runs as written, and its step is the plain full-batch step."""
  root = Path(__file__).resolve().parents[1]
  block = (root / "examples" / "accumulation.py").read_text()
  assert "{literalinclude} ../examples/accumulation.py" in (root / "docs" / "accumulation.md").read_text()
  setup, _ = block.split("loss_mb = ")
  scope: dict = {"__name__": "__guide__"}
  exec(compile(block, "examples/accumulation.py", "exec"), scope)
  plain: dict = {"__name__": "__guide__"}
  exec(compile(setup, "examples/accumulation.py (setup)", "exec"), plain)
  loss, batch, tx, params = plain["loss"], plain["batch"], plain["tx"], plain["params"]
  value, grads = jax.value_and_grad(loss)(params, batch)
  updates, _ = tx.update(grads, plain["opt_state"], params, loss_fn=functools.partial(loss, batch=batch))
  assert int(scope["opt_state"][0].count) == 1
  step_ops = 3 * GUIDE_LOSS_OPS + 3 * GUIDE_PARAMS
  tol = f32_bound(*jax.tree.leaves(updates), n_ops=step_ops) + f32_bound(*jax.tree.leaves(params), n_ops=2)
  assert_trees_within(scope["params"], optax.apply_updates(params, updates), tol)
  np.testing.assert_allclose(scope["value"], value, rtol=0, atol=f32_bound(value, n_ops=GUIDE_LOSS_OPS))
