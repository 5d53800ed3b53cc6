"""The models and problems of ``experiments.bench``: Flax MLP, small CNN and ResNet-18 on random batches."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  width: int = 256

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class SmallCNN(nn.Module):
  """Four 3x3 convs (one at full resolution, three with stride 2), ~0.39M params."""

  width: int = 32

  @nn.compact
  def __call__(self, x):
    w = self.width
    x = nn.relu(nn.Conv(w, (3, 3))(x))
    for mult in (2, 4, 8):
      x = nn.relu(nn.Conv(w * mult, (3, 3), strides=(2, 2))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def _classification(batch, image, seed, init, apply):
  """``(params, loss_of)`` for a random batch of ``batch`` images ``image x image x 3`` with 10 labels.

  ``init(x) -> params`` and ``apply(params, x) -> logits`` adapt the model's API.
  ``loss_of`` is ``functools.partial(loss, batch={"x": x, "y": y})`` for
  ``loss(params, batch)``, the mean cross-entropy (:func:`bench_microbatched`
  reads ``loss_of.func`` and ``loss_of.keywords["batch"]``).
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch))
  params = init(x)

  def loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, batch["x"]), batch["y"]).mean()

  return params, functools.partial(loss, batch={"x": x, "y": y})


def _problem(model, batch, image, seed=0):
  """A Linen model's ``(params, loss_of)``."""
  return _classification(
    batch,
    image,
    seed,
    lambda x: model.init(jax.random.key(seed), x)["params"],
    lambda p, x: model.apply({"params": p}, x),
  )


def _resnet18_problem(batch, image, seed=0):
  """ResNet-18 (``experiments.models``, Flax NNX, BatchNorm in training mode) as ``(params, loss_of)``."""
  from flax import nnx

  from experiments import models

  graphdef, params, *rest = nnx.split(models.ResNet18(3, 10, rngs=nnx.Rngs(seed)), nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, *rest, copy=True)(x, train=True)  # batch statistics; their update is dropped

  return _classification(batch, image, seed, lambda x: params, apply)


def problems(mlp_width: int, cnn_width: int) -> dict[str, Callable[[int, int], tuple[Any, Callable[[Any], jax.Array]]]]:
  """Model name -> ``(batch, image) -> (params, loss_of)``."""
  return {
    "mlp": lambda b, i: _problem(MLP(mlp_width), b, i),
    "cnn": lambda b, i: _problem(SmallCNN(cnn_width), b, i),
    "resnet18": _resnet18_problem,
  }


MODELS = ("mlp", "cnn", "resnet18")
"""The models :func:`problems` builds."""


def default_models() -> tuple[str, ...]:
  """``mlp`` and ``cnn``, plus ``resnet18`` on an accelerator (too slow to time on a CPU)."""
  return MODELS[:2] if jax.default_backend() == "cpu" else MODELS
