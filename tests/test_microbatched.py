"""xsam_jax.microbatched: the full batch's loss and gradient, one micro-batch's activations."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_jax
from tests import problems
from tests.registry import CASES
from tests.test_multidevice import ROOT, _env
from tests.tolerances import assert_argmax_lead, assert_trees_within, f32_bound

N = 16  # examples in problems.mlp_data's batch
# Rounding steps (tests/tolerances.py) of one update of any registered method along two code paths (as in
# tests/test_battery.py: up to 4 ascent gradients, a probe loss or 3 Hessian-vector products, and up to
# 10 norms or dot products); of an XSAM probe loss: up to 4 gradients and the probe, and 5 norms.
STEP_OPS = 10 * problems.LOSS_OPS + 10 * problems.NUM_PARAMS
PROBE_OPS = 5 * problems.LOSS_OPS + 5 * problems.NUM_PARAMS


def _problem(seed=0):
  problem, params = problems.mlp_data(seed, n=N)
  return jax.tree.map(jnp.asarray, params), problems.mlp_batch(problem)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_value_and_grad_equal_the_full_batch(k, maybe_jit):
  params, batch = _problem()
  value, grads = maybe_jit(jax.value_and_grad(xsam_jax.microbatched(problems.mlp_batch_loss, k)))(params, batch)
  full_value, full_grads = jax.value_and_grad(problems.mlp_batch_loss)(params, batch)
  assert value.dtype == full_value.dtype == jnp.float32
  # The two compute the same mean with the sum split differently: the loss's rounding steps at the size
  # of the loss; the gradient, a mean of per-example gradients, at the size of those summands.
  np.testing.assert_allclose(value, full_value, rtol=0, atol=f32_bound(full_value, n_ops=problems.LOSS_OPS))
  one = lambda p, x, t: problems.mlp_batch_loss(p, {"x": x[None], "t": t[None]})
  per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch["x"], batch["t"])
  assert_trees_within(grads, full_grads, f32_bound(*jax.tree.leaves(per_example), n_ops=problems.LOSS_OPS))


def test_one_microbatch_calls_loss_on_the_whole_batch():
  params, batch = _problem()
  calls = []

  def loss(p, b):
    calls.append(b["x"].shape)
    return problems.mlp_batch_loss(p, b)

  value = xsam_jax.microbatched(loss, 1)(params, batch)
  assert calls == [(N, 3)]
  assert value == problems.mlp_batch_loss(params, batch)  # the same call: bitwise


def test_microbatches_are_strided_and_aux_is_stacked():
  """Micro-batch i holds examples i, i + k, ...; aux leaves gain a leading axis of length k (also k = 1)."""
  params, batch = _problem()

  def loss(p, b):
    return problems.mlp_batch_loss(p, b), {"x0": b["x"][0], "count": jnp.asarray(b["x"].shape[0])}

  for k in (1, 4):
    (value, aux), grads = jax.value_and_grad(xsam_jax.microbatched(loss, k), has_aux=True)(params, batch)
    np.testing.assert_array_equal(aux["x0"], batch["x"][:k])
    np.testing.assert_array_equal(aux["count"], np.full(k, N // k))
    plain_value, plain_grads = jax.value_and_grad(xsam_jax.microbatched(problems.mlp_batch_loss, k))(params, batch)
    assert value == plain_value  # the same program, with one more output
    assert_trees_within(grads, plain_grads, 0.0)


@pytest.mark.parametrize("k", [1, 4])
def test_a_pair_stays_a_pair(k):
  """``(loss, None)`` (aux with no leaves) still returns a pair."""
  params, batch = _problem()
  value, aux = xsam_jax.microbatched(lambda p, b: [problems.mlp_batch_loss(p, b), None], k)(params, batch)
  assert value.shape == ()
  assert aux is None


def test_losses_are_summed_in_float32():
  """bfloat16 micro-batch losses 256, 1, 1, 2: their mean 65 is a bfloat16, but a bfloat16 running sum
  loses both 1s (256 + 1 rounds to 256, bfloat16's spacing there being 2) and gives 64.5."""
  batch = {"v": jnp.array([256.0, 1.0, 1.0, 2.0], jnp.bfloat16)}
  loss = lambda p, b: jnp.mean(b["v"]) * p
  value = jax.jit(xsam_jax.microbatched(loss, 4))(jnp.ones([], jnp.bfloat16), batch)
  assert value.dtype == jnp.bfloat16
  assert float(value) == 65.0


@pytest.mark.parametrize("name", sorted(CASES))
def test_updates_with_a_microbatched_loss_fn_equal_the_full_batch(name):
  """Every method's ascent, probes and Hessian-vector products run micro-batched: the full-batch update."""
  params, batch = _problem(seed=3)
  loss_mb = xsam_jax.microbatched(problems.mlp_batch_loss, 4)

  def step(loss, params):
    tx = CASES[name]()
    grads = jax.grad(loss)(params, batch)
    return tx.update(grads, tx.init(params), params, loss_fn=functools.partial(loss, batch=batch))

  u_mb, s_mb = jax.jit(functools.partial(step, loss_mb))(params)
  u_full, s_full = jax.jit(functools.partial(step, problems.mlp_batch_loss))(params)
  for s in (s_mb, s_full):
    if hasattr(s, "probe_losses") and np.any(np.asarray(s.probe_losses) != 0):  # zeros: no probe round
      assert_argmax_lead(s.probe_losses, f32_bound(s.probe_losses, n_ops=PROBE_OPS))
  assert_trees_within(u_mb, u_full, f32_bound(*jax.tree.leaves(u_full), n_ops=STEP_OPS))
  if hasattr(s_full, "alpha"):
    assert s_mb.alpha == s_full.alpha


SHARDED = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, xsam_jax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from tests import problems
  from tests.tolerances import f32_bound

  problem, params = problems.mlp_data(0, n=64)
  params, batch = jax.tree.map(jnp.asarray, params), problems.mlp_batch(problem)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  f = jax.jit(jax.value_and_grad(xsam_jax.microbatched(problems.mlp_batch_loss, 4)))
  value, grads = f(params, sharded)
  full_value, full_grads = jax.value_and_grad(problems.mlp_batch_loss)(params, batch)
  np.testing.assert_allclose(value, full_value, rtol=0, atol=f32_bound(full_value, n_ops=problems.LOSS_OPS))
  one = lambda p, x, t: problems.mlp_batch_loss(p, {"x": x[None], "t": t[None]})
  per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch["x"], batch["t"])
  tol = f32_bound(*jax.tree.leaves(per_example), n_ops=problems.LOSS_OPS)
  for k in grads:
    np.testing.assert_allclose(grads[k], full_grads[k], rtol=0, atol=tol)
  hlo = f.lower(params, sharded).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo, "the batch moved between devices"
  print("SHARDED OK")
  """
)


def test_strided_microbatches_keep_a_sharded_batch_in_place():
  """8 CPU devices, the batch sharded along its examples: equal to one device, and the compiled step moves
  no batch data between devices (each micro-batch has its slice on every device); jax starts with the
  device count, hence a subprocess."""
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED], cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600, check=False
  )
  assert "SHARDED OK" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]


def _primitives(jaxpr):
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        names += _primitives(inner)
  return names


def test_gradient_runs_a_scan():
  params, batch = _problem()
  jaxpr = jax.make_jaxpr(jax.value_and_grad(xsam_jax.microbatched(problems.mlp_batch_loss, 4)))(params, batch)
  assert _primitives(jaxpr.jaxpr).count("scan") == 2  # the forward scan and its transpose


def test_activation_memory_is_one_microbatchs():
  """XLA's estimate of the temporaries of value_and_grad on an MLP whose activations (4096 x 256 per
  layer) dwarf its parameters: 8 micro-batches need well under half the full batch's (compiled, not run)."""
  rng = np.random.default_rng(0)
  n, d, h = 4096, 32, 256
  batch = {"x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32), "y": jnp.asarray(rng.normal(size=n), jnp.float32)}
  params = {
    "w1": jnp.asarray(rng.normal(size=(d, h)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(h, h)), jnp.float32),
    "w3": jnp.asarray(rng.normal(size=h), jnp.float32),
  }

  def loss(p, b):
    z = jnp.tanh(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"])
    return jnp.mean((z @ p["w3"] - b["y"]) ** 2)

  def temp_bytes(k):
    compiled = jax.jit(jax.value_and_grad(xsam_jax.microbatched(loss, k))).lower(params, batch).compile()
    mem = compiled.memory_analysis()
    if mem is None:
      pytest.skip("this backend gives no memory analysis")
    return mem.temp_size_in_bytes

  full, micro = temp_bytes(1), temp_bytes(8)
  assert full > 2 * n * h * 4  # the two stored hidden layers
  assert micro < full / 2, (micro, full)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None, np.array(2)])
def test_num_microbatches_must_be_an_int(bad):
  with pytest.raises(ValueError, match=r"`num_microbatches` must be (a Python int|an int) >= 1"):
    xsam_jax.microbatched(problems.mlp_batch_loss, bad)


def test_numpy_int_is_accepted():
  params, batch = _problem()
  value = xsam_jax.microbatched(problems.mlp_batch_loss, np.int64(2))(params, batch)
  assert value.shape == ()


def test_loss_must_be_callable():
  with pytest.raises(ValueError, match="`loss` must be callable"):
    xsam_jax.microbatched("loss", 2)


@pytest.mark.parametrize(
  ("batch", "match"),
  [
    ({"a": jnp.ones((16, 3)), "b": jnp.ones((16, 2))}, r"batch leaf \['a'\] has leading axis 16, not divisible by "),
    ({"a": jnp.ones((12, 3)), "b": jnp.ones((15, 2))}, r"batch leaf \['b'\] has leading axis 15, but leaf \['a'\]"),
    ({"a": jnp.ones((12, 3)), "s": jnp.ones(())}, r"batch leaf \['s'\] has shape \(\)"),
    ({}, "`batch` has no array leaves"),
  ],
)
def test_batch_errors_name_the_leaf(batch, match):
  loss = lambda p, b: jnp.sum(p)
  with pytest.raises(ValueError, match=match) as info:
    xsam_jax.microbatched(loss, 3)(jnp.ones(3), batch)
  assert "num_microbatches" in str(info.value) or "same leading" in str(info.value)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
  ("out", "match"),
  [
    (lambda b: b["x"][:, 0], r"array of shape \(\d+,\) and dtype float32"),
    (lambda b: jnp.sum(b["x"] > 0), "array of shape \\(\\) and dtype int32"),
    (lambda b: {"loss": jnp.mean(b["x"])}, "a dict"),
  ],
)
def test_loss_must_return_a_scalar_or_a_pair(k, out, match):
  with pytest.raises(ValueError, match=f"microbatched: `loss` must return the scalar loss.*{match}"):
    xsam_jax.microbatched(lambda p, b: out(b), k)(jnp.ones(3), {"x": jnp.ones((4, 3))})
