"""Exact large-batch SAM in one micro-batch's memory: ``xsam_jax.microbatched``.

The gradient and every extra pass of the method are means over 8 micro-batches of 32 examples,
computed one micro-batch at a time: the update is the full-batch one.

    python examples/accumulation.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax


def loss(params, batch):  # the mean over the examples of `batch`
  logits = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


rng = np.random.default_rng(0)
batch = {"x": jnp.asarray(rng.normal(size=(256, 16)), jnp.float32), "y": jnp.asarray(rng.integers(0, 10, 256))}
params = {"w1": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32), "w2": jnp.zeros((64, 10))}
tx = optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))  # or xsam, eigen_sam, ...
opt_state = tx.init(params)

loss_mb = xsam_jax.microbatched(loss, 8)  # 8 micro-batches of 32 examples


@jax.jit
def train_step(params, opt_state, batch):
  value, grads = jax.value_and_grad(loss_mb)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params, loss_fn=functools.partial(loss_mb, batch=batch))
  return optax.apply_updates(params, updates), opt_state, value


params, opt_state, value = train_step(params, opt_state, batch)
print(f"loss {value:.4f}")
