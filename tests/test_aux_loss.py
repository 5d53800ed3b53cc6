"""A ``(loss, aux)`` loss_fn is accepted by every method (aux ignored); other outputs are named errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.registry import CASES

NAMES = sorted(CASES)


def _with_aux(loss_fn):
  def loss_and_aux(p):
    loss = loss_fn(p)
    return loss, {"acc": jnp.tanh(loss), "n": jnp.asarray(16)}

  return loss_and_aux


def _assert_aux_ignored(name, wrap):
  """Two steps (the first probes or refreshes): the same program up to an unused output, so equal bits."""
  params, loss_fn = problems.mlp_problem(seed=5)
  results = []
  for fn in (loss_fn, _with_aux(loss_fn)):
    tx = optax.chain(CASES[name](), optax.sgd(0.05))
    step = wrap(lambda p, s, fn=fn, tx=tx: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=fn))
    state = tx.init(params)
    updates = []
    for _ in range(2):
      u, state = step(params, state)
      updates.append(u)
    results.append((updates, state))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


@pytest.mark.parametrize("name", NAMES)
def test_aux_is_ignored(name):
  _assert_aux_ignored(name, jax.jit)


def test_aux_is_ignored_eagerly():
  """Un-jitted, the update runs compiled per loss_fn (the cache keys on the caller's function)."""
  _assert_aux_ignored("xsam", lambda f: f)


BAD_OUTPUTS = {
  "vector": (lambda loss: jnp.stack([loss, loss, loss]), r"an array of shape \(3,\) and dtype float32"),
  "int": (lambda loss: jnp.round(loss).astype(jnp.int32), r"an array of shape \(\) and dtype int32"),
  "dict": (lambda loss: {"loss": loss}, "a dict"),
  "triple": (lambda loss: (loss, loss, loss), "a tuple of length 3"),
  "vector_pair": (
    lambda loss: (jnp.stack([loss, loss]), {}),
    r"a tuple whose first element is an array of shape \(2,\) and dtype float32",
  ),
}


def _assert_named(name, bad, got, wrap):
  params, loss_fn = problems.mlp_problem(seed=5)
  tx = CASES[name]()
  g = jax.grad(loss_fn)(params)
  match = rf"\.update: `loss_fn` must return the scalar loss.*it returned {got}\."
  with pytest.raises(ValueError, match=match) as info:
    wrap(lambda p, s: tx.update(g, s, p, loss_fn=lambda q: bad(loss_fn(q))))(params, tx.init(params))
  method = str(info.value).split(".update")[0]
  assert name.startswith(method), (method, name)
  assert "`(loss, aux)` pair" in str(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_OUTPUTS))
def test_other_outputs_are_named(kind, maybe_jit):
  _assert_named("xsam", *BAD_OUTPUTS[kind], maybe_jit)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_names_a_vector_loss(name):
  _assert_named(name, *BAD_OUTPUTS["vector"], jax.jit)


SHARPNESS = {
  "hessian_vector_product": lambda fn, p: xsam_jax.sharpness.hessian_vector_product(fn, p, p),
  "hessian_eigenvalues": lambda fn, p: xsam_jax.sharpness.hessian_eigenvalues(fn, p, k=2),
  "average_sharpness": lambda fn, p: xsam_jax.sharpness.average_sharpness(
    fn, p, jax.random.key(0), rho=0.1, num_directions=4
  ),
  "loss_surface": lambda fn, p: xsam_jax.sharpness.loss_surface(fn, p, p, p, xs=[0.0, 0.5], ys=[-0.5, 0.5]),
  "xsam_directions": lambda fn, p: xsam_jax.sharpness.xsam_directions(fn, p, rho=0.1, rho_max=0.2),
}


@pytest.mark.parametrize("name", sorted(SHARPNESS))
def test_sharpness_helpers_ignore_aux(name):
  params, loss_fn = problems.mlp_problem(seed=5)
  plain = SHARPNESS[name](loss_fn, params)
  jax.tree.map(np.testing.assert_array_equal, SHARPNESS[name](_with_aux(loss_fn), params), plain)
  where = {"average_sharpness": "perturbed_losses", "hessian_eigenvalues": "hessian_eigenpairs"}.get(name, name)
  with pytest.raises(ValueError, match=rf"^{where}: `loss_fn` must return the scalar loss"):
    SHARPNESS[name](lambda p: BAD_OUTPUTS["vector"][0](loss_fn(p)), params)
