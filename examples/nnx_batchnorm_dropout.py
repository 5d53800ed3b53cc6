"""XSAM in a Flax NNX training step, with BatchNorm and Dropout.

The optimizer evaluates ``loss_fn`` at perturbed parameters (the ascent, XSAM's probes); those extra
passes must neither update BatchNorm's running statistics nor advance Dropout's RNG.
``xsam_jax.flax.value_grad_and_loss_fn`` replaces ``nnx.value_and_grad``: its clean pass is the plain
one, and the ``loss_fn`` it returns runs a copy of the model with the pre-step state and the clean
pass's dropout masks. The lines marked ``# xsam_jax`` are the whole change to a plain NNX step.

    python examples/nnx_batchnorm_dropout.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import xsam_jax
import xsam_jax.flax


class Net(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.bn = nnx.Linear(5, 32, rngs=rngs), nnx.BatchNorm(32, rngs=rngs)
    self.dropout, self.l2 = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(32, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.dropout(nnx.relu(self.bn(self.l1(x)))))


def loss_of_model(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


x = jax.random.normal(jax.random.key(0), (64, 5))
y = (x.sum(axis=1) > 0).astype(jnp.int32)
model = Net(nnx.Rngs(0))
tx = optax.chain(xsam_jax.xsam(0.05, 0.05, alpha_update_period=10), optax.sgd(0.1, momentum=0.9))  # xsam_jax
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(loss_of_model, model, x, y)  # xsam_jax
  optimizer.update(model, grads, loss_fn=loss_fn)  # xsam_jax: loss_fn=
  return loss


for _ in range(20):
  loss = train_step(model, optimizer, x, y)
print(f"loss {loss:.4f}  alpha {float(optax.tree.get(optimizer.opt_state, 'alpha')):.1f}")
