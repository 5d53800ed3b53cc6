"""Functional SAM (and its preconditioned form) on a small NNX classifier and a Linen one.

Functional SAM needs the loss in two parts: the model's outputs (the logits) and the loss of those
outputs. ``update`` takes them as ``model_fn=`` and ``output_loss_fn=`` instead of ``loss_fn=``; the
Flax helpers build them: ``xsam_jax.flax.value_grad_and_model_fns`` for NNX (BatchNorm and Dropout
handled as ``value_grad_and_loss_fn`` handles them), and ``TrainState.apply_gradients(grads=...,
model_fn=..., output_loss_fn=...)`` for Linen.

    python examples/functional_sam.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

import xsam_jax
import xsam_jax.flax

x = jax.random.normal(jax.random.key(0), (64, 8))
y = (x[:, :4].sum(axis=1) > x[:, 4:].sum(axis=1)).astype(jnp.int32)


# --- NNX ------------------------------------------------------------------------------------------------
class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(32, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.bn(self.hidden(x)))))


def model_call(model, x, y):  # the outputs: the logits
  return model(x)


def output_loss(logits, x, y):  # the loss of the outputs
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


model = MLP(nnx.Rngs(0))
# precondition=True: the paper's preconditioned Functional SAM (Adam's second moment scales the ascent).
tx = optax.chain(xsam_jax.functional_sam(0.05, precondition=True), optax.adamw(3e-3, weight_decay=1e-4))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, x, y):
  loss, grads, model_fn, output_loss_fn = xsam_jax.flax.value_grad_and_model_fns(model_call, output_loss, model, x, y)
  optimizer.update(model, grads, model_fn=model_fn, output_loss_fn=output_loss_fn)
  return loss


for _ in range(30):
  loss = nnx_step(model, optimizer, x, y)
print(f"NNX   functional_sam(precondition=True): loss {float(loss):.4f}")


# --- Linen ----------------------------------------------------------------------------------------------
class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(32)(x)))


state = xsam_jax.flax.TrainState.create(
  apply_fn=LinenMLP().apply,
  params=LinenMLP().init(jax.random.key(1), x)["params"],
  tx=optax.chain(xsam_jax.functional_sam(0.05), optax.sgd(0.1, momentum=0.9)),
)


@jax.jit
def linen_step(state, x, y):
  model_fn = lambda params: state.apply_fn({"params": params}, x)  # the logits
  output_loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = jax.value_and_grad(lambda params: output_loss_fn(model_fn(params)))(state.params)
  state = state.apply_gradients(grads=grads, model_fn=model_fn, output_loss_fn=output_loss_fn)
  return state, loss


for _ in range(30):
  state, loss = linen_step(state, x, y)
print(f"Linen functional_sam: loss {float(loss):.4f}, perturbed loss {float(state.opt_state[0].perturbed_loss):.4f}")
