"""Flax NNX classifiers for the study.

Every model is called as ``model(x, train=...)``: ``train=True`` normalizes
BatchNorm layers with the batch's statistics (and updates their running
averages as a side effect), ``train=False`` uses the running averages. The
mode is a call argument rather than module state so that one ``GraphDef``
serves training and evaluation.

- :class:`MLP`: flattens the input; the CPU-friendly choice.
- :class:`CNN1D`: three stride-2 1-D convolutions, for MNIST-1D.
- :class:`CNN2D`: three stride-2 3x3 convolutions with BatchNorm and global
  average pooling, for small images on CPU.
- :class:`SmallCNN`: four 3x3 convolutions without BatchNorm, the benchmarks' CNN.
- :class:`ResNet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool;
  He et al. 2016), the paper's network; meant for a GPU.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, rngs=rngs)


class MLP(nnx.Module):
  """Fully connected ReLU network on the flattened input.

  Args:
    in_features: number of input features after flattening.
    num_classes: number of output logits.
    hidden: widths of the hidden layers.
    batch_norm: BatchNorm after every hidden linear layer.
    rngs: initialisation randomness.
  """

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (256, 256),
    batch_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    sizes = [in_features, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
    self.norms = nnx.List([_batch_norm(b, rngs) for b in hidden]) if batch_norm else None
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``(B, num_classes)`` for a batch ``(B, ...)``."""
    x = x.reshape(x.shape[0], -1)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if self.norms is not None:
        x = self.norms[i](x, use_running_average=not train)
      x = jax.nn.relu(x)
    return self.head(x)


class CNN1D(nnx.Module):
  """Three stride-2 1-D convolutions and a linear head (MNIST-1D's CNN shape).

  Input ``(B, L)`` or ``(B, L, C)``; kernel sizes 5, 3, 3, ``width``
  channels, ReLU; the length shrinks by 8 before the head.

  Args:
    length: input length ``L``.
    in_channels: input channels (1 for MNIST-1D).
    num_classes: number of output logits.
    width: channels of every convolution.
    batch_norm: BatchNorm after every convolution.
    rngs: initialisation randomness.
  """

  def __init__(
    self,
    length: int,
    in_channels: int,
    num_classes: int,
    *,
    width: int = 32,
    batch_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    kernels = (5, 3, 3)
    chans = [in_channels, width, width, width]
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (k,), strides=(2,), rngs=rngs)
        for (a, b), k in zip(itertools.pairwise(chans), kernels, strict=True)
      ]
    )
    self.norms = nnx.List([_batch_norm(width, rngs) for _ in kernels]) if batch_norm else None
    out_len = length
    for _ in kernels:
      out_len = math.ceil(out_len / 2)
    self.head = nnx.Linear(out_len * width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``(B, num_classes)``."""
    if x.ndim == 2:
      x = x[..., None]
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms is not None:
        x = self.norms[i](x, use_running_average=not train)
      x = jax.nn.relu(x)
    return self.head(x.reshape(x.shape[0], -1))


class CNN2D(nnx.Module):
  """Three stride-2 3x3 convolutions with BatchNorm, global average pool, linear.

  Channels ``width, 2 width, 4 width``. Stride-2 convolutions keep the
  backward pass cheap on CPU (no max-pool, no full-resolution layers).

  Args:
    in_channels: image channels.
    num_classes: number of output logits.
    width: channels of the first convolution.
    rngs: initialisation randomness.
  """

  def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, rngs: nnx.Rngs):
    chans = [in_channels, width, 2 * width, 4 * width]
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs) for a, b in itertools.pairwise(chans)]
    )
    self.norms = nnx.List([_batch_norm(b, rngs) for b in chans[1:]])
    self.head = nnx.Linear(chans[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``(B, H, W, C)``."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.relu(norm(conv(x), use_running_average=not train))
    return self.head(jnp.mean(x, axis=(1, 2)))


class SmallCNN(nnx.Module):
  """The benchmarks' CNN: four 3x3 convolutions (one at full resolution, three with stride 2), ReLU, average pool.

  Channels ``width, 2 width, 4 width, 8 width``; about 0.39M parameters at
  ``width=32`` on RGB images. No BatchNorm: ``train`` changes nothing.

  Args:
    in_channels: image channels.
    num_classes: number of output logits.
    width: channels of the first convolution.
    rngs: initialisation randomness.
  """

  def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, rngs: nnx.Rngs):
    chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
    strides = (1, 2, 2, 2)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (3, 3), strides=(s, s), rngs=rngs)
        for (a, b), s in zip(itertools.pairwise(chans), strides, strict=True)
      ]
    )
    self.head = nnx.Linear(chans[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``(B, H, W, C)``."""
    del train  # no BatchNorm
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nnx.Module):
  """ResNet basic block: two 3x3 conv-BN layers and a (projected) shortcut."""

  def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, channels, (3, 3), strides=(stride, stride), use_bias=False, rngs=rngs)
    self.bn1 = _batch_norm(channels, rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = _batch_norm(channels, rngs)
    if stride != 1 or in_channels != channels:
      self.proj: nnx.Conv | None = nnx.Conv(
        in_channels, channels, (1, 1), strides=(stride, stride), use_bias=False, rngs=rngs
      )
      self.proj_bn: nnx.BatchNorm | None = _batch_norm(channels, rngs)
    else:
      self.proj = None
      self.proj_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``relu(F(x) + shortcut(x))``."""
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    shortcut = x
    if self.proj is not None and self.proj_bn is not None:  # both set, or neither
      shortcut = self.proj_bn(self.proj(x), use_running_average=ura)
    return jax.nn.relu(y + shortcut)


class ResNet18(nnx.Module):
  """ResNet-18 for 32x32 images (CIFAR stem: one 3x3 conv, no max-pool).

  Four stages of two :class:`BasicBlock` each with 64, 128, 256, 512
  channels and strides 1, 2, 2, 2; about 11.2M parameters for 10 classes.

  Args:
    in_channels: image channels.
    num_classes: number of output logits.
    rngs: initialisation randomness.
  """

  def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, 64, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = _batch_norm(64, rngs)
    blocks = []
    cin = 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      blocks.append(BasicBlock(cin, channels, stride, rngs=rngs))
      blocks.append(BasicBlock(channels, channels, 1, rngs=rngs))
      cin = channels
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(512, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``(B, H, W, C)``."""
    x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    return self.head(jnp.mean(x, axis=(1, 2)))


MODELS = ("mlp", "cnn1d", "cnn2d", "resnet18")


def default_model(input_shape: tuple, is_image: bool) -> str:
  """``cnn2d`` for images, ``cnn1d`` for 1-D series, ``mlp`` otherwise."""
  if is_image:
    return "cnn2d"
  return "cnn1d" if len(input_shape) == 1 and input_shape[0] >= 8 else "mlp"


def make_model(
  name: str,
  input_shape: tuple,
  num_classes: int,
  *,
  width: int = 32,
  batch_norm: bool = False,
  seed: int = 0,
) -> nnx.Module:
  """Builds a model by name for inputs of ``input_shape`` (one example).

  Args:
    name: one of :data:`MODELS`.
    input_shape: shape of one input, ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
    num_classes: number of output logits.
    width: base width (hidden units of the MLP are ``8 * width``).
    batch_norm: BatchNorm for the MLP and the 1-D CNN.
    seed: initialisation seed (``nnx.Rngs(seed)``).

  Returns:
    The initialised NNX module.
  """
  rngs = nnx.Rngs(seed)
  if name == "mlp":
    return MLP(math.prod(input_shape), num_classes, hidden=(8 * width, 8 * width), batch_norm=batch_norm, rngs=rngs)
  if name == "cnn1d":
    in_channels = input_shape[1] if len(input_shape) == 2 else 1
    return CNN1D(input_shape[0], in_channels, num_classes, width=width, batch_norm=batch_norm, rngs=rngs)
  if name == "cnn2d":
    return CNN2D(input_shape[-1], num_classes, width=width, rngs=rngs)
  if name == "resnet18":
    return ResNet18(input_shape[-1], num_classes, rngs=rngs)
  raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
