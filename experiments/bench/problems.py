"""The problems of ``experiments.bench``: the zoo's MLP, small CNN and ResNet-18 on random batches.

The models are those of ``experiments.core.models``; only the batch (random images and labels) is made here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.core import models


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


def _nnx_problem(model: nnx.Module, batch: int, image: int, seed: int) -> tuple[Any, Callable[[Any], jax.Array]]:
  """An NNX model of ``experiments.core.models`` as ``(params, loss_of)``; BatchNorm (if any) in training mode."""
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, *rest, copy=True)(x, train=True)  # batch statistics; their update is dropped

  return _classification(batch, image, seed, lambda x: params, apply)


def problems(mlp_width: int, cnn_width: int) -> dict[str, Callable[[int, int], tuple[Any, Callable[[Any], jax.Array]]]]:
  """Model name -> ``(batch, image) -> (params, loss_of)``: the zoo's MLP, SmallCNN and ResNet-18 on RGB images."""
  rngs = lambda: nnx.Rngs(0)
  return {
    "mlp": lambda b, i: _nnx_problem(models.MLP(i * i * 3, 10, hidden=(mlp_width, mlp_width), rngs=rngs()), b, i, 0),
    "cnn": lambda b, i: _nnx_problem(models.SmallCNN(3, 10, width=cnn_width, rngs=rngs()), b, i, 0),
    "resnet18": lambda b, i: _nnx_problem(models.ResNet18(3, 10, rngs=rngs()), b, i, 0),
  }


MODELS = ("mlp", "cnn", "resnet18")
"""The models :func:`problems` builds."""


def default_models() -> tuple[str, ...]:
  """``mlp`` and ``cnn``, plus ``resnet18`` on an accelerator (too slow to time on a CPU)."""
  return MODELS[:2] if jax.default_backend() == "cpu" else MODELS
