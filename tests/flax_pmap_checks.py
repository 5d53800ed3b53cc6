"""Linen ``TrainState`` under ``jax.pmap`` on 8 CPU devices, run by ``tests/test_flax_scripts.py``.

The device count is fixed when jax starts, so these checks run in their own
process, from the repository root::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m tests.flax_pmap_checks

Each check prints ``ok <name>``; the process exits non-zero if any fails.
Arguments (substrings of check names) select checks.

The training script is Flax's ImageNet example in small: a ResNet-ish Linen
model with ``nn.BatchNorm``, a ``TrainState`` with a ``batch_stats`` field,
the clean pass with ``mutable=["batch_stats"]`` and ``has_aux=True``,
``pmean`` of the gradient (and of the per-replica statistics); the changes for
XSAM are the ``axis_name`` of the transformation, :class:`xsam_jax.flax.TrainState`
and ``loss_fn=`` in ``apply_gradients``.
"""

import sys
import time
import traceback
from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import xsam_jax
import xsam_jax.flax
from tests.tolerances import assert_argmax_lead, f32_bound

N_DEVICES = 8
GLOBAL_BATCH = 32  # 4 examples per device
N_STEPS = 4
PERIOD = 2  # probe steps: 0 and 2
ALPHAS = (0.0, 0.5, 1.5, 2.0)  # without alpha_init = 1.0: the first probe moves alpha


class ResNetish(nn.Module):
  """Dense -> BatchNorm -> relu, one residual block (Dense -> BatchNorm, added, relu), Dense head.

  ``bn_axis``: BatchNorm's ``axis_name``; ``"batch"`` under pmap gives the
  statistics of the global batch (synchronised BatchNorm), ``None`` those of
  the batch the model sees (the replica's shard under pmap).
  """

  bn_axis: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis)
    h = nn.relu(norm()(nn.Dense(16)(x)))
    h = nn.relu(h + norm()(nn.Dense(16)(h)))
    return nn.Dense(4)(h)


class TrainState(xsam_jax.flax.TrainState):
  batch_stats: Any


def make_tx(axis_name):
  return optax.chain(
    xsam_jax.xsam(0.5, 1.0, alphas=ALPHAS, alpha_update_period=PERIOD, axis_name=axis_name),
    optax.sgd(0.1, momentum=0.9),
  )


def make_train_step(sync_stats_axis):
  """The script's step. ``sync_stats_axis``: pmean the new batch statistics over this axis (per-replica
  BatchNorm, as Flax's ImageNet example syncs them), and the gradient and loss too; None on one device."""
  mean = (lambda t: jax.lax.pmean(t, sync_stats_axis)) if sync_stats_axis else (lambda t: t)

  def train_step(state, x, y):
    def loss_and_stats(params):  # the clean pass: new running statistics as aux
      logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    loss_fn = lambda params: loss_and_stats(params)[0]  # extra passes: their statistics are discarded
    (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
    state = state.apply_gradients(grads=mean(grads), loss_fn=loss_fn, batch_stats=mean(batch_stats))
    return state, mean(loss)

  return train_step


def data():
  rng = np.random.default_rng(0)
  templates = rng.normal(size=(4, 8))
  batches = []
  for _ in range(N_STEPS):
    y = rng.integers(0, 4, size=GLOBAL_BATCH)
    x = templates[y] + 0.5 * rng.normal(size=(GLOBAL_BATCH, 8))
    batches.append((x.astype(np.float32), y.astype(np.int32)))
  return batches


def init_state(model, tx, cls=TrainState):
  x0 = data()[0][0]
  variables = ResNetish().init(jax.random.key(0), x0, train=False)
  return cls.create(apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx)


def replicate(tree):
  """One copy per device, in pmap's layout (stacked on the host: no device op per leaf)."""
  per_device = jax.sharding.NamedSharding(
    jax.sharding.Mesh(jax.local_devices(), "batch"), jax.sharding.PartitionSpec("batch")
  )
  return jax.device_put(jax.tree.map(lambda a: np.stack([np.asarray(a)] * N_DEVICES), tree), per_device)


def shard(x):
  return x.reshape(N_DEVICES, -1, *x.shape[1:])


def run_pmap(state, step, n_steps=N_STEPS):
  """Trains under pmap; returns the replicated states after each step and the losses."""
  pstep = jax.pmap(step, axis_name="batch")
  state = replicate(state)
  states, losses = [], []
  for x, y in data()[:n_steps]:
    state, loss = pstep(state, shard(x), shard(y))
    states.append(state)
    losses.append(float(loss[0]))
  return states, losses


def run_one_device(state, n_steps=N_STEPS):
  step = jax.jit(make_train_step(None))
  states, losses = [], []
  for x, y in data()[:n_steps]:
    state, loss = step(state, x, y)
    states.append(state)
    losses.append(float(loss))
  return states, losses


def assert_replicas_identical(state):
  # Exact by contract: every replica applies the same averaged update to the same state.
  for path, leaf in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state, state.batch_stats)):
    copies = np.asarray(leaf)
    for i in range(1, N_DEVICES):
      np.testing.assert_array_equal(copies[i], copies[0], err_msg=f"replica {i} {jax.tree_util.keystr(path)}")


def assert_alpha_moves_only_on_probe_steps(states):
  alphas = [float(optax.tree.get(s.opt_state, "alpha")[0]) for s in states]
  assert alphas[0] != 1.0, alphas
  assert alphas[0] in ALPHAS, alphas
  for step in range(1, len(alphas)):
    if step % PERIOD:
      assert alphas[step] == alphas[step - 1], (step, alphas)


# Rounding steps of ResNetish's loss (tests/tolerances.py), with M its size: a dot of 8, batch mean and
# mean square over 32 (BatchNorm, twice), dots of 16 (twice) and log-softmax over 4 (exp, log, sum: 12)
# and the mean over 32: under 250. A gradient: twice that. Norms and dot products over its 548 params.
LOSS_OPS, NUM_PARAMS = 250, 548
# One step: the clean and ascent gradients, the probe losses, 4 norms or dot products of the plane.
STEP_OPS = 4 * LOSS_OPS + LOSS_OPS + 4 * NUM_PARAMS
# N_STEPS = 4 steps: each update within STEP_OPS of its size, moved by lr 0.1 and summed by momentum 0.9
# (weights 1 + 1.9 + 2.71 + 3.44 < 10): under STEP_OPS, plus a rounding of the params per step.
PARAMS_OPS = STEP_OPS + N_STEPS


def check_sync_batchnorm_matches_one_device():
  """Synchronised BatchNorm (axis_name="batch"), xsam(axis_name="batch"): the replicas stay identical
  (bitwise) and equal the one-device run on the global batch; alpha is the same grid point; the loss
  goes down; alpha moves only on probe steps."""
  states, losses = run_pmap(init_state(ResNetish(bn_axis="batch"), make_tx("batch")), make_train_step("batch"))
  ref_states, ref_losses = run_one_device(init_state(ResNetish(), make_tx(None)))
  for state in states:
    assert_replicas_identical(state)
  for state, ref in zip(states, ref_states, strict=True):
    got, want = optax.tree.get(state.opt_state, "probe_losses")[0], optax.tree.get(ref.opt_state, "probe_losses")
    assert_argmax_lead(want, f32_bound(want, n_ops=STEP_OPS))  # no near-tie: the same alpha is a fair check
    assert float(optax.tree.get(state.opt_state, "alpha")[0]) == float(optax.tree.get(ref.opt_state, "alpha"))
    np.testing.assert_allclose(got, want, rtol=0, atol=f32_bound(want, n_ops=STEP_OPS))
  final, ref = jax.tree.map(lambda a: a[0], states[-1]), ref_states[-1]
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(ref.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=f32_bound(*jax.tree.leaves(ref.params), n_ops=PARAMS_OPS))
  # The running statistics: batch means of 32 blended with the old ones, once per step.
  for a, b in zip(jax.tree.leaves(final.batch_stats), jax.tree.leaves(ref.batch_stats), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=f32_bound(1.0, b, n_ops=N_STEPS * (2 * LOSS_OPS + 2)))
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=f32_bound(*ref_losses, n_ops=PARAMS_OPS + LOSS_OPS))
  assert losses[-1] < losses[0], losses
  assert_alpha_moves_only_on_probe_steps(states)


def check_per_replica_batchnorm_stats_from_the_clean_pass():
  """Per-replica BatchNorm, statistics pmean-ed after each step (Flax's ImageNet example): the replicas
  stay identical (bitwise); after one step the running statistics equal those of a plain
  flax TrainState SGD step (bitwise: the same clean pass); the loss goes down."""

  class PlainState(train_state.TrainState):
    batch_stats: Any

  def plain_step(state, x, y):
    def loss_and_stats(params):
      logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
    mean = lambda t: jax.lax.pmean(t, "batch")
    return state.apply_gradients(grads=mean(grads), batch_stats=mean(batch_stats)), mean(loss)

  states, losses = run_pmap(init_state(ResNetish(), make_tx("batch")), make_train_step("batch"))
  for state in states:
    assert_replicas_identical(state)
  plain, plain_losses = run_pmap(init_state(ResNetish(), optax.sgd(0.1), cls=PlainState), plain_step, n_steps=1)
  assert losses[0] == plain_losses[0]
  for a, b in zip(jax.tree.leaves(states[0].batch_stats), jax.tree.leaves(plain[0].batch_stats), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses[-1] < losses[0], losses
  assert_alpha_moves_only_on_probe_steps(states)


def check_without_axis_name_is_an_error():
  """Why axis_name is mandatory under pmap: without it, even with pmean-ed gradients, each replica would
  ascend on its own shard and the replicas' parameters drift apart. The pmap's bound axis is seen when
  the step is traced: a ValueError naming it, before any step runs."""
  with pytest.raises(ValueError, match=r"pmap.*`axis_name='batch'`"):
    run_pmap(init_state(ResNetish(), make_tx(None)), make_train_step("batch"), n_steps=1)


CHECKS = [
  check_sync_batchnorm_matches_one_device,
  check_per_replica_batchnorm_stats_from_the_clean_pass,
  check_without_axis_name_is_an_error,
]


def main(argv):
  assert jax.device_count() == N_DEVICES, (
    f"expected {N_DEVICES} devices, got {jax.device_count()}: "
    f"set XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} before jax starts"
  )
  selected = [c for c in CHECKS if not argv or any(a in c.__name__ for a in argv)]
  assert selected, f"no check matches {argv}"
  failed = []
  for check in selected:
    start = time.perf_counter()
    try:
      check()
    except Exception:  # noqa: BLE001  # report every failing check, then exit non-zero
      failed.append(check.__name__)
      print(f"FAIL {check.__name__}\n{traceback.format_exc()}", flush=True)
    else:
      print(f"ok {check.__name__} ({time.perf_counter() - start:.1f} s)", flush=True)
  if failed:
    print("FAILED:", ", ".join(failed))
    return 1
  print("ALL CHECKS PASSED")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
