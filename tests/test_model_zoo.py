"""The model zoo (``experiments.core.models`` and ``pure_models``): every model is defined once, and
gives the same outputs in every place a study uses it.

Tolerances are rounding bounds (``tests/tolerances.py``): the pure forwards sum the same products as
the NNX layers in another order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import sharpness_study
from experiments.bench import problems
from experiments.core import models, pure_models
from tests import tolerances


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_pure_forward_equals_the_nnx_model(name):
  """The protocol's (and the engine's) pure forward of a zoo model is the NNX model's, on its parameters."""
  x = jax.random.normal(jax.random.key(1), (7, 40))
  model = models.make_model(name, (40,), 10, width=8, seed=3)
  params = pure_models.init(name, (40,), 10, width=8, seed=3)
  ours, theirs = pure_models.forward(name)(params, x), model(x, train=True)
  # Same products, summed in another order: a dot of length <= 5 * 8 (conv) or 8 * 8 * 8 (MLP) per layer, 3 layers.
  n_ops = 3 * (40 if name == "cnn1d" else 512)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tolerances.f32_bound(theirs, n_ops=n_ops))


def test_he_mlp_forward_is_the_mlp_in_float64():
  """The sharpness study's MLP is the zoo's (He init, ``dense_relu``), checked against numpy in float64."""
  assert sharpness_study.init_mlp is pure_models.he_mlp
  assert sharpness_study.apply_mlp is pure_models.he_mlp_forward
  params = pure_models.he_mlp(jax.random.key(0), (12, 16, 16, 10))
  kernels = [np.asarray(params[f"dense{i}"]["kernel"], np.float64) for i in range(3)]
  assert [k.shape for k in kernels] == [(12, 16), (16, 16), (16, 10)]
  for i, k in enumerate(kernels):  # He: N(0, 2 / fan_in); 192 to 256 draws, so the std is within 25%
    assert 0.75 < k.std() * np.sqrt(k.shape[0] / 2.0) < 1.25, i
    assert not np.any(np.asarray(params[f"dense{i}"]["bias"]))
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, 12)), np.float64)
  h = x
  for i, k in enumerate(kernels):
    h = h @ k + np.asarray(params[f"dense{i}"]["bias"], np.float64)
    h = np.maximum(h, 0.0) if i < 2 else h
  out = pure_models.he_mlp_forward(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, h, rtol=0, atol=tolerances.f32_bound(h, n_ops=3 * 16 + 3))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_bench_trains_the_zoo_models(name):
  """The bench's problems are the zoo's NNX models: the same parameters, and its loss is their cross-entropy."""
  params, loss_of = problems.problems(mlp_width=16, cnn_width=4)[name](3, 8)
  if name == "mlp":
    zoo = models.MLP(8 * 8 * 3, 10, hidden=(16, 16), rngs=nnx.Rngs(0))
  else:
    zoo = models.SmallCNN(3, 10, width=4, rngs=nnx.Rngs(0))
  zoo_params = nnx.state(zoo, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(zoo_params))
  batch = loss_of.keywords["batch"]
  expected = optax.softmax_cross_entropy_with_integer_labels(zoo(batch["x"], train=True), batch["y"]).mean()
  # The same model and loss, traced apart: the same operations, summed alike.
  np.testing.assert_allclose(loss_of(params), expected, rtol=0, atol=tolerances.f32_bound(expected, n_ops=8 * 8 * 3))
