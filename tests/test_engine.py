"""The training engine (``experiments.core.engine``): scanned runs and the epoch loop, against hand-written loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.core import engine
from tests.tolerances import f32_bound


def _quadratic_problem():
  x = jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(6, 2), jnp.float32)
  y = jnp.asarray([1.0, -1.0, 0.5, 0.0, 2.0, -0.5], jnp.float32)
  loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
  return (x, y), loss


def test_scan_run_is_the_hand_written_loop():
  """SGD through scan_run equals the same steps written out (to rounding: a scan body and a jitted step
  may fuse differently; six steps of a two-parameter quadratic stay within the rounding bound below),
  and the per-epoch metrics are the epoch means, ``last`` the epoch's last value, ``evaluate`` at each epoch's end."""
  data, loss = _quadratic_problem()
  order = jnp.asarray([[0, 1], [2, 3], [4, 5], [1, 2], [3, 4], [5, 0]], jnp.int32)  # 3 epochs of 2 steps
  gather = lambda d, idx: (d[0][idx], d[1][idx])
  run = engine.scan_run(
    loss,
    lambda hp: optax.with_extra_args_support(optax.sgd(hp["lr"])),
    steps_per_epoch=2,
    epochs=3,
    gather=gather,
    monitor=lambda value, state: {"twice": 2.0 * value},
    last=("twice",),
    evaluate=lambda w: {"norm": jnp.sum(w**2)},
  )
  w0 = jnp.asarray([0.3, -0.2], jnp.float32)
  w, metrics = jax.jit(run)({"lr": jnp.float32(0.1)}, w0, order, data)

  @jax.jit
  def step(w, idx):
    value, grad = jax.value_and_grad(loss)(w, gather(data, idx))
    return w - 0.1 * grad, value

  expected, losses, norms = w0, [], []
  for t, idx in enumerate(order):
    expected, value = step(expected, idx)
    losses.append(float(value))
    if t % 2 == 1:
      norms.append(float(jnp.sum(expected**2)))
  # Rounding bounds (tests/tolerances.py): a step is ~4 roundings of w's size (a 2-term dot product, the
  # residual, the mean of 2, the update), whichever way it is fused; 6 steps: 24. A loss adds ~8 roundings to
  # the error of the w it is computed at; an epoch mean of 2 losses 2 more; |w|^2 doubles w's error and adds 2.
  np.testing.assert_allclose(w, expected, rtol=0, atol=f32_bound(expected, n_ops=24))
  means = np.asarray(losses).reshape(3, 2).mean(axis=1)
  loss_tol = f32_bound(*losses, n_ops=2 * 24 + 8 + 2)
  np.testing.assert_allclose(metrics["epoch_loss"], means, rtol=0, atol=loss_tol)
  last = 2.0 * np.asarray(losses).reshape(3, 2)[:, -1]
  np.testing.assert_allclose(metrics["epoch_twice"], last, rtol=0, atol=2 * loss_tol)
  np.testing.assert_allclose(metrics["epoch_norm"], norms, rtol=0, atol=f32_bound(*norms, n_ops=2 * 24 + 2))


def test_scan_run_vmaps_over_runs():
  """A vmapped call trains each run as a single call does."""
  data, loss = _quadratic_problem()
  run = engine.scan_run(
    loss,
    lambda hp: optax.with_extra_args_support(optax.sgd(hp["lr"])),
    steps_per_epoch=3,
    epochs=1,
    gather=lambda d, idx: (d[0][idx], d[1][idx]),
  )
  orders = jnp.asarray([[[0, 1], [2, 3], [4, 5]], [[5, 4], [3, 2], [1, 0]]], jnp.int32)
  hp = {"lr": jnp.asarray([0.1, 0.3], jnp.float32)}
  w0 = jnp.asarray([[0.3, -0.2], [0.0, 1.0]], jnp.float32)
  batched, _ = jax.jit(jax.vmap(run, in_axes=(0, 0, 0, None)))(hp, w0, orders, data)
  for i in range(2):
    single, _ = jax.jit(run)({"lr": hp["lr"][i]}, w0[i], orders[i], data)
    np.testing.assert_allclose(batched[i], single, rtol=0, atol=f32_bound(single, n_ops=3 * 4))  # 3 steps


def test_scan_run_passes_the_split_loss():
  """With ``split``, the optimizer gets ``model_fn`` and ``output_loss_fn`` (what Functional SAM reads)."""
  data, _ = _quadratic_problem()
  seen = {}

  def update(updates, state, params=None, **extra):
    seen.update(extra)
    return updates, state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  model = lambda w, batch: batch[0] @ w
  output_loss = lambda out, batch: 0.5 * jnp.mean((out - batch[1]) ** 2)
  run = engine.scan_run(
    None, lambda hp: tx, steps_per_epoch=1, epochs=1, gather=lambda d, i: (d[0][i], d[1][i]), split=(model, output_loss)
  )
  run({}, jnp.zeros((2,), jnp.float32), jnp.asarray([[0, 1]], jnp.int32), data)
  assert {"model_fn", "output_loss_fn", "loss_fn"} <= set(seen)
  with pytest.raises(ValueError, match="either as `loss` or as `split"):
    engine.scan_run(None, lambda hp: tx, steps_per_epoch=1, epochs=1, gather=lambda d, i: d)


def test_data_order_is_each_epochs_permutation():
  order = engine.data_order(seed=3, epochs=2, n=10, batch_size=3)
  assert order.shape == (6, 3)
  assert order.dtype == np.int32
  for e in range(2):
    rows = order[3 * e : 3 * e + 3].reshape(-1)
    assert len(set(rows.tolist())) == 9
    assert set(rows.tolist()) <= set(range(10))


def _fit(**kw):
  """A counter trained by fit: the state is the sum of its batches, one batch per step."""
  log, saves = [], []
  state, progress, completed = engine.fit(
    0,
    epochs=3,
    steps_per_epoch=2,
    batches=lambda epoch: [10 * epoch + 1, 10 * epoch + 2],
    step=lambda state, batch: (state + batch, {"batch": batch}),
    evaluate=lambda state: state,
    log=lambda epoch, step, metrics, evaluation, elapsed: log.append((epoch, step, metrics, evaluation)) or {},
    save=lambda step, state, elapsed: saves.append((step, state)),
    progress=False,
    **kw,
  )
  return state, progress, completed, log, saves


def test_fit_runs_every_epoch_and_saves_at_the_end():
  state, progress, completed, log, saves = _fit(start=engine.Progress(0, 0.0))
  assert state == 1 + 2 + 11 + 12 + 21 + 22
  assert progress.step == 6
  assert completed
  assert [(e, s, ev) for e, s, _, ev in log] == [(0, 2, 3), (1, 4, 26), (2, 6, 69)]
  assert [[m["batch"] for m in metrics] for _, _, metrics, _ in log] == [[1, 2], [11, 12], [21, 22]]
  assert saves == [(6, 69)]
  assert progress.elapsed_s >= 0.0


def test_fit_resumes_mid_epoch_checkpoints_and_stops():
  """From step 3 (inside epoch 1) it runs the rest of that epoch's batches; checkpoint_every and
  stop_after_epochs save where they should, and a stop is not completed."""
  state, progress, completed, log, saves = _fit(start=engine.Progress(3, 1.5), checkpoint_every=1, stop_after_epochs=2)
  assert state == 12
  assert progress.step == 4
  assert not completed
  assert [(e, s) for e, s, _, _ in log] == [(1, 4)]
  assert saves == [(4, 12)]
  assert progress.elapsed_s >= 1.5
  state, progress, completed, log, saves = _fit(start=engine.Progress(6, 2.0))
  assert (state, progress.step, completed, log, saves) == (0, 6, True, [], [])
  assert math.isclose(progress.elapsed_s, 2.0)
