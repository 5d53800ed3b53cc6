"""xsam_jax in Flax training steps: NNX (nnx.Optimizer) and Linen with BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import xsam_jax
from tests.tolerances import assert_argmax_lead, f32_bound

# Rounding steps (tests/tolerances.py) of NNXMLP's loss on _data(), with M its size (~1.3): reductions
# of length 6, 16, 3 and 32 (the mean), tanh, exp and log (4 each) and a few elementwise ops, on logits
# up to ~1.5: under 96. A norm or dot product over its 163 parameters: 163 steps.
NNX_LOSS_OPS, NNX_PARAMS = 96, 163


def _data(seed=0, n=32, d=6, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, classes, size=n)
  return jnp.asarray(x), jnp.asarray(y)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(6, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.tanh(self.l1(x)))


@pytest.mark.parametrize(
  "make",
  [
    lambda: xsam_jax.sam(0.05),
    # Radii and a 5-point grid where every probe round has a clear winner (checked below): at 0.05, 0.1
    # on the 21-point grid the best alpha led by a few ulps of the losses.
    lambda: xsam_jax.xsam(1.0, 2.0, alphas=(0.0, 0.5, 1.0, 1.5, 2.0), alpha_update_period=2),
  ],
  ids=["sam", "xsam"],
)
def test_nnx_optimizer_step_matches_functional_optax(make):
  x, y = _data()
  model = NNXMLP(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = jax.tree.map(jnp.array, nnx.as_pure(params0))  # a copy: the model is updated in place
  tx = optax.chain(make(), optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_of(params):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: loss_of(nnx.state(m, nnx.Param)))(model)
    optimizer.update(model, grads, loss_fn=loss_of)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]

  # The same run through plain optax on the pure param state.
  params = params0
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_of)(params)
    u, state = tx.update(g, state, params, loss_fn=loss_of)
    return optax.apply_updates(params, u), state

  # Two programs (nnx.jit over the graph, jax.jit over the pure state). One step: 2 gradients and a
  # probe loss, 4 norms or dot products over the parameters.
  step_ops = 3 * NNX_LOSS_OPS + 4 * NNX_PARAMS
  for _ in range(5):
    params, state = step(params, state)
    if hasattr(state[0], "alpha"):  # alpha is an argmax: the same only without near-ties
      assert_argmax_lead(state[0].probe_losses, f32_bound(state[0].probe_losses, n_ops=step_ops))
  # 5 steps: each update within step_ops of its size (<= the params'), moved by lr = 0.1 and summed by
  # momentum 0.9 (weights 1 + 1.9 + 2.71 + 3.44 + 4.1 < 14): under 1.4 step_ops, plus 5 roundings.
  tol = f32_bound(*jax.tree.leaves(params), n_ops=1.4 * step_ops + 5)
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)
  if hasattr(state[0], "alpha"):  # the same grid point, not a near-tie (checked above)
    assert float(optimizer.opt_state[0].alpha[...]) == float(state[0].alpha)


class LinenBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


@pytest.mark.parametrize(
  "make",
  [lambda: xsam_jax.sam(0.05, num_steps=2), lambda: xsam_jax.xsam(0.05, 0.1, alpha_update_period=1)],
  ids=["sam-k2", "xsam"],
)
def test_linen_batchnorm_running_stats_come_from_the_clean_pass_only(make):
  x, y = _data(seed=1)
  model = LinenBN()
  variables = model.init(jax.random.key(0), x, train=True)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.chain(make(), optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(params)
  extra_calls = []

  def ce(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def clean_loss(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return ce(logits), updates["batch_stats"]

    def loss_fn(p):  # ascent and probes: batch statistics, new running stats discarded
      extra_calls.append(1)
      logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return ce(logits)

    (loss, new_stats), grads = jax.value_and_grad(clean_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  p1, stats1, opt_state, _ = train_step(params, batch_stats, opt_state)
  assert extra_calls, "the optimizer must have evaluated loss_fn"
  # Expected running stats: one clean training-mode pass at the old params.
  _, expected = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # The clean pass inside the jitted step vs this op-by-op apply: per feature a dot product (6), batch
  # means of h and h^2 (32 each) and the blend with the old stats (2), on operands up to max(1, h^2).
  h = np.asarray(x) @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])
  tol = f32_bound(1.0, h**2, n_ops=6 + 32 + 32 + 2)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(expected["batch_stats"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)
  # They differ from what any single extra (perturbed) pass would have produced.
  g = jax.grad(
    lambda p: ce(model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])[0])
  )(params)
  n = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gi: w + 0.05 * gi / n, params, g)
  _, wrong = model.apply({"params": perturbed, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  assert not all(
    np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(wrong["batch_stats"]), strict=True)
  )
  # Training continues to work with the evaluated stats.
  for _ in range(3):
    p1, stats1, opt_state, loss = train_step(p1, stats1, opt_state)
  assert np.isfinite(float(loss))
