"""The sharpness study's model and training: a pure-function MLP trained with SGD, SAM or XSAM.

The training loop is self-contained (optax, one ``jax.lax.scan`` per epoch)
so the Hessian is that of a plain function of the parameters (no BatchNorm
state). The optimizers come from :mod:`experiments.methods`: the method
(:func:`~experiments.methods.chain`), then the main job's base optimizer
(:func:`~experiments.methods.sgd_base`: decoupled weight decay, SGD with
momentum and a cosine schedule).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import methods
from experiments.sharpness_study.config import SharpnessConfig

METHODS = ("SGD", "SAM", "XSAM")
"""The compared methods, as the outputs name them (``experiments.methods`` names them in lower case)."""


def load_data(name: str, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train, y_train, x_test, y_test)`` as standardized float32 / int32 numpy arrays.

  The arrays come from :func:`experiments.data.load_dataset` (MNIST-1D
  generated locally and cached, never downloaded; scikit-learn's digits with
  its fixed 80/20 split), flattened to vectors for the MLP.
  """
  if name not in ("mnist1d", "digits"):
    raise ValueError(f"unknown dataset {name!r} (mnist1d or digits)")
  ds = data_lib.load_dataset(name, None)
  flat = lambda a: a.reshape(len(a), -1)
  x, y, xt, yt = flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test
  if max_train is not None:
    x, y = x[:max_train], y[:max_train]
  x, xt = np.asarray(x, np.float32), np.asarray(xt, np.float32)
  mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-6
  return (x - mean) / std, np.asarray(y, np.int32), (xt - mean) / std, np.asarray(yt, np.int32)


# ----------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> dict[str, dict[str, jax.Array]]:
  """He-initialized MLP params in Flax layout (``kernel: (in, out)``, ``bias: (out,)``)."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
      "bias": jnp.zeros((fan_out,)),
    }
  return params


def apply_mlp(params: Any, x: jax.Array) -> jax.Array:
  """ReLU MLP forward pass; returns logits."""
  n = len(params)
  for i in range(n):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"] + layer["bias"][None, :]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def make_loss_fn(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> Callable[[Any], jax.Array]:
  """Mean cross-entropy on ``(x, y)`` as a function of the params."""
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss_fn(params: Any) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()

  return loss_fn


def accuracy(params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> float:
  return float(jnp.mean(jnp.argmax(apply_mlp(params, jnp.asarray(x)), -1) == jnp.asarray(y)))


def train(
  method: str, seed: int, c: SharpnessConfig, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> tuple[Any, dict[str, Any]]:
  """Trains one model; returns ``(params, history)``."""
  x, y, xt, yt = data
  steps = len(y) // c.batch_size
  # SGD with momentum, cosine lr and decoupled weight decay, after SAM / XSAM (alpha probed once per epoch).
  base = methods.sgd_base(c.lr, c.momentum, c.weight_decay, c.epochs * steps)
  tx = methods.chain(method.lower(), *base, rho=c.rho, rho_max=c.probe_radius, alpha_update_period=steps)
  params = init_mlp(jax.random.key(seed), (x.shape[1], *c.hidden, 10))
  opt_state = tx.init(params)

  @jax.jit
  def run_epoch(params, opt_state, xb, yb):
    def step(carry, batch):
      params, opt_state = carry
      loss_fn = make_loss_fn(*batch)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xb, yb))
    return params, opt_state, jnp.mean(losses)

  history: dict[str, Any] = {"train_loss": [], "alpha": []}
  rng = np.random.default_rng(seed)
  for _ in range(c.epochs):
    order = rng.permutation(len(y))[: steps * c.batch_size].reshape(steps, c.batch_size)
    params, opt_state, loss = run_epoch(params, opt_state, x[order], y[order])
    history["train_loss"].append(round(float(loss), 5))
    if method == "XSAM":
      history["alpha"].append(round(float(opt_state[0].alpha), 2))
  history["test_acc"] = accuracy(params, xt, yt)
  return params, history
