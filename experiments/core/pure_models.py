"""Pure forward passes of ``experiments.core.models``' MLP and 1-D CNN, for the protocol's scanned trainer.

The parameters are those of the NNX models (``nnx.to_pure_dict`` of
``experiments.core.models.make_model(name, ..., seed=seed)``: the same
initialisation as the main job); only the forward pass is written anew. The
1-D CNN's stride-2 ``SAME`` convolutions are computed as ``im2col`` (the
windows as ``k`` strided slices) followed by one matmul: inside a ``lax.scan`` on
XLA:CPU, ``conv_general_dilated`` ran about 5x slower than a Python loop of
the same jitted step (measured 2026-12, 2-core AMD EPYC), while the matmul
form runs as fast in the scan as out of it. ``tests/test_protocol.py`` checks
both forwards against the NNX modules' to float rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.core import models

Params = dict[str, Any]


def init(name: str, input_shape: tuple[int, ...], num_classes: int, *, width: int, seed: int) -> Params:
  """The initial parameters of ``experiments.core.models.make_model(name, ...)`` as a pure dict (no BatchNorm)."""
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


def dense_relu(layers: Sequence[Params], x: jax.Array) -> jax.Array:
  """The MLP forward pass: ``x <- relu(x W_i + b_i)`` for every layer but the last, then ``x W + b``.

  Every MLP of the studies is this function; they differ in how the
  ``{"kernel": (in, out), "bias": (out,)}`` layers are stored and initialised.
  """
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"][None, :])
  return x @ layers[-1]["kernel"] + layers[-1]["bias"][None, :]


def _mlp(params: Params, x: jax.Array) -> jax.Array:
  layers = [params["layers"][i] for i in range(len(params["layers"]))]
  return dense_relu([*layers, params["head"]], x.reshape(x.shape[0], -1))


def he_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
  """He-initialised MLP parameters ``{"dense0": ..., "dense1": ...}`` (kernel ``N(0, 2/fan_in)``, bias 0).

  The sharpness study's MLP (its Hessians are of a plain function of these
  parameters); run it with :func:`he_mlp_forward`.
  """
  params = {}
  for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
      "bias": jnp.zeros((fan_out,)),
    }
  return params


def he_mlp_forward(params: Params, x: jax.Array) -> jax.Array:
  """Logits of :func:`he_mlp`'s parameters on ``x`` of shape ``(B, features)``."""
  return dense_relu([params[f"dense{i}"] for i in range(len(params))], x)


def forward(name: str) -> Callable[[Params, jax.Array], jax.Array]:
  """``apply(params, x) -> logits`` of model ``name`` (``mlp`` or ``cnn1d``, without BatchNorm)."""
  if name == "cnn1d":
    return _cnn1d
  if name == "mlp":
    return _mlp
  raise ValueError(f"the protocol's models are mlp and cnn1d, got {name!r}")


def _layer_norm(p: Params, x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  lead = (1,) * (x.ndim - 1)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"].reshape(*lead, -1) + p["bias"].reshape(*lead, -1)


def transformer_init(
  key: jax.Array, *, vocab: int, context: int, width: int, depth: int, heads: int, mlp_ratio: int = 4
) -> Params:
  """Parameters of a small decoder-only (GPT-style, pre-LayerNorm) transformer, the language-model study's.

  Token and position embeddings ``N(0, 0.02^2)``; per block a causal self-attention (``qkv``:
  ``(width, 3 width)``, ``proj``) and a GELU MLP (``fc``: ``(width, mlp_ratio width)``, ``out``), each
  after a LayerNorm; the residual projections ``proj`` and ``out`` scaled by ``1 / sqrt(2 depth)``
  (GPT-2); a final LayerNorm; the output layer tied to the token embedding. Biases and LayerNorm
  shifts 0, LayerNorm scales 1.

  Args:
    key: initialisation key.
    vocab: number of tokens; context: longest sequence; width: model width (divisible by ``heads``);
    depth: blocks; heads: attention heads; mlp_ratio: MLP width / model width.
  """
  if width % heads:
    raise ValueError(f"`width` ({width}) must be divisible by `heads` ({heads})")
  keys = iter(jax.random.split(key, 2 + 4 * depth))
  normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
  norm = lambda: {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}
  zeros = lambda n: jnp.zeros((n,), jnp.float32)
  residual_std = 0.02 / np.sqrt(2 * depth)
  blocks = [
    {
      "ln1": norm(),
      "qkv": {"kernel": normal((width, 3 * width)), "bias": zeros(3 * width)},
      "proj": {"kernel": normal((width, width), residual_std), "bias": zeros(width)},
      "ln2": norm(),
      "fc": {"kernel": normal((width, mlp_ratio * width)), "bias": zeros(mlp_ratio * width)},
      "out": {"kernel": normal((mlp_ratio * width, width), residual_std), "bias": zeros(width)},
    }
    for _ in range(depth)
  ]
  return {"embed": normal((vocab, width)), "pos": normal((context, width)), "blocks": blocks, "ln_f": norm()}


def transformer_forward(params: Params, tokens: jax.Array, *, heads: int) -> jax.Array:
  """Next-token logits ``(B, T, vocab)`` of :func:`transformer_init`'s model on ``tokens`` ``(B, T)``.

  Position ``t`` attends to positions ``<= t`` (a causal mask), so its logits predict token ``t + 1``.
  """
  b, t = tokens.shape
  x = params["embed"][tokens] + params["pos"][:t][None]
  width = x.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  dense = lambda p, h: h @ p["kernel"] + p["bias"][None, None, :]
  for block in params["blocks"]:
    q, k, v = jnp.split(dense(block["qkv"], _layer_norm(block["ln1"], x)), 3, axis=-1)
    split = lambda a: a.reshape(b, t, heads, width // heads).transpose(0, 2, 1, 3)  # (B, H, T, D/H)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads), -1e30)
    attended = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, width)
    x = x + dense(block["proj"], attended)
    x = x + dense(block["out"], jax.nn.gelu(dense(block["fc"], _layer_norm(block["ln2"], x))))
  return _layer_norm(params["ln_f"], x) @ params["embed"].T
