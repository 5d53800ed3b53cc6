"""Pure forward passes of ``experiments.models``' MLP and 1-D CNN, for the protocol's scanned trainer.

The parameters are those of the NNX models (``nnx.to_pure_dict`` of
``experiments.models.make_model(name, ..., seed=seed)``: the same
initialisation as the main job); only the forward pass is written anew. The
1-D CNN's stride-2 ``SAME`` convolutions are computed as ``im2col`` (the
windows as ``k`` strided slices) followed by one matmul: inside a ``lax.scan`` on
XLA:CPU, ``conv_general_dilated`` ran about 5x slower than a Python loop of
the same jitted step (measured 2026-12, 2-core AMD EPYC), while the matmul
form runs as fast in the scan as out of it. ``tests/test_protocol.py`` checks
both forwards against the NNX modules' to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import models

Params = dict[str, Any]


def init(name: str, input_shape: tuple[int, ...], num_classes: int, *, width: int, seed: int) -> Params:
  """The initial parameters of ``experiments.models.make_model(name, ...)`` as a pure dict (no BatchNorm)."""
  if name not in ("mlp", "cnn1d"):
    raise ValueError(f"the protocol's models are mlp and cnn1d, got {name!r}")
  model = models.make_model(name, input_shape, num_classes, width=width, seed=seed)
  return nnx.to_pure_dict(nnx.state(model))


def conv1d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
  """``nnx.Conv(padding="SAME", strides=stride)`` on ``x`` of shape ``(B, L, C_in)``, as im2col + matmul."""
  k, c_in, c_out = kernel.shape
  length = x.shape[1]
  out = -(-length // stride)
  total = max((out - 1) * stride + k - length, 0)
  lo = total // 2
  padded = jnp.pad(x, ((0, 0), (lo, total - lo), (0, 0)))
  # Strided slices, not a gather: their transposes (the backward pass) are pads, not scatters.
  taps = [jax.lax.slice_in_dim(padded, j, j + stride * (out - 1) + 1, stride, axis=1) for j in range(k)]
  windows = jnp.stack(taps, axis=2)  # (B, out, k, C_in), the kernel's (k, C_in) order
  return windows.reshape(x.shape[0], out, k * c_in) @ kernel.reshape(k * c_in, c_out) + bias[None, None, :]


def _cnn1d(params: Params, x: jax.Array) -> jax.Array:
  if x.ndim == 2:
    x = x[..., None]
  for i in range(len(params["convs"])):
    layer = params["convs"][i]
    x = jax.nn.relu(conv1d_same(x, layer["kernel"], layer["bias"], 2))
  return x.reshape(x.shape[0], -1) @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def _mlp(params: Params, x: jax.Array) -> jax.Array:
  x = x.reshape(x.shape[0], -1)
  for i in range(len(params["layers"])):
    layer = params["layers"][i]
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"][None, :])
  return x @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def forward(name: str) -> Callable[[Params, jax.Array], jax.Array]:
  """``apply(params, x) -> logits`` of model ``name`` (``mlp`` or ``cnn1d``, without BatchNorm)."""
  if name == "cnn1d":
    return _cnn1d
  if name == "mlp":
    return _mlp
  raise ValueError(f"the protocol's models are mlp and cnn1d, got {name!r}")
