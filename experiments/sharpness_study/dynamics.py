"""The sharpness study's model and training: a pure-function MLP trained with SGD, SAM or XSAM.

Training is :func:`experiments.core.engine.scan_run` on a pure-function MLP
(:func:`experiments.core.pure_models.he_mlp`), so the Hessian is that of a
plain function of the parameters (no BatchNorm state). The optimizers come
from :mod:`experiments.core.methods`: the method
(:func:`~experiments.core.methods.chain`), then the main job's base optimizer
(:func:`~experiments.core.methods.sgd_base`: decoupled weight decay, SGD with
momentum and a cosine schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.core import data as data_lib
from experiments.core import engine, methods, pure_models
from experiments.sharpness_study.config import SharpnessConfig

METHODS = ("SGD", "SAM", "XSAM")
"""The compared methods, as the outputs name them (``experiments.core.methods`` names them in lower case)."""


def load_data(name: str, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train, y_train, x_test, y_test)`` as standardized float32 / int32 numpy arrays.

  The arrays come from :func:`experiments.core.data.load_dataset` (MNIST-1D
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


init_mlp = pure_models.he_mlp
"""He-initialized MLP params (:func:`experiments.core.pure_models.he_mlp`)."""

apply_mlp = pure_models.he_mlp_forward
"""ReLU MLP forward pass; returns logits (:func:`experiments.core.pure_models.he_mlp_forward`)."""


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
  rng = np.random.default_rng(seed)
  order = np.concatenate(
    [rng.permutation(len(y))[: steps * c.batch_size].reshape(steps, c.batch_size) for _ in range(c.epochs)]
  )
  run = engine.scan_run(
    lambda p, batch: make_loss_fn(*batch)(p),
    lambda hp: tx,
    steps_per_epoch=steps,
    epochs=c.epochs,
    gather=lambda data, idx: (data[0][idx], data[1][idx]),
    monitor=(lambda loss, opt_state: {"alpha": opt_state[0].alpha}) if method == "XSAM" else None,
    last=("alpha",),
  )
  params, metrics = jax.jit(run)({}, params, jnp.asarray(order), (jnp.asarray(x), jnp.asarray(y)))
  history: dict[str, Any] = {"train_loss": [round(float(v), 5) for v in metrics["epoch_loss"]], "alpha": []}
  if method == "XSAM":
    history["alpha"] = [round(float(v), 2) for v in metrics["epoch_alpha"]]
  history["test_acc"] = accuracy(params, xt, yt)
  return params, history
