"""SAM in a Flax Linen ``TrainState`` with BatchNorm, under ``jax.pmap``.

Flax's ``TrainState.apply_gradients`` sends extra keyword arguments to ``.replace``, so ``loss_fn``
would never reach the optimizer; ``xsam_jax.flax.TrainState`` passes it to ``tx.update``. Under
``pmap``, ``axis_name`` is mandatory: without it each replica would ascend on its own shard and the
replicas would drift apart. The lines marked ``# xsam_jax`` are the whole change to a plain script.

    python examples/linen_pmap.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/linen_pmap.py   # 8 CPU devices
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import xsam_jax
import xsam_jax.flax


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train, axis_name="batch")(nn.Dense(32)(x))
    return nn.Dense(2)(nn.relu(x))


class TrainState(xsam_jax.flax.TrainState):  # xsam_jax: was flax.training.train_state.TrainState
  batch_stats: Any


n = jax.local_device_count()
x = jax.random.normal(jax.random.key(0), (n, 64 // n, 5))  # (devices, per-device batch, features)
y = (x.sum(axis=-1) > 0).astype(jnp.int32)
variables = jax.jit(Net().init, static_argnames="train")(jax.random.key(1), x[0], train=False)
state = TrainState.create(
  apply_fn=Net().apply,
  params=variables["params"],
  batch_stats=variables["batch_stats"],
  tx=optax.chain(xsam_jax.sam(0.05, axis_name="batch"), optax.sgd(0.1, momentum=0.9)),  # xsam_jax
)
state = jax.tree.map(lambda a: jnp.stack([a] * n), state)  # one copy per device


def train_step(state, x, y):
  def loss_and_stats(params):
    logits, new = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, "batch")
  loss_fn = lambda p: loss_and_stats(p)[0]  # xsam_jax: the extra passes' statistics are dropped
  state = state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=batch_stats)  # xsam_jax: loss_fn=
  return state, jax.lax.pmean(loss, "batch")


train_step = jax.pmap(train_step, axis_name="batch")
for _ in range(20):
  state, loss = train_step(state, x, y)
print(f"loss {loss[0]:.4f}")
