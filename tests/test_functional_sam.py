"""Functional SAM (xsam_jax.functional_sam): the float64 numpy reference on the reference MLP split into its
outputs and a squared-error output loss (hand-derived backward pass of a given output cotangent), with and
without the preconditioner; SAM for a loss linear in the outputs; the zero radius; the calling convention; the
eager cache; the Flax helpers (NNX value_grad_and_model_fns, Linen TrainState.apply_gradients).

The battery (tests/test_battery.py) runs it through tests/registry.py's from_loss adapter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.test_reference_sam_xsam import HP
from tests.tolerances import assert_trees_equal, assert_trees_within, f32_bound, f64_bound

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]
# Rounding steps of one step (tests/tolerances.py), as the battery counts them: up to 4 loss or gradient
# evaluations (here g_0, the forward at w, the vector-Jacobian product at w + e) and 10 norms or dot products,
# plus the preconditioner's element-wise operations; STEPS steps of the base optimizer (see
# tests/test_preconditioned_sam.py).
STEP_OPS = 10 * problems.LOSS_OPS + 11 * problems.NUM_PARAMS
TRAIN_OPS = STEPS * STEP_OPS


def _split(problem, dtype=jnp.float32):
  """The reference MLP as (model_fn, output_loss_fn): outputs y = tanh(x W1 + b1) W2 + b2, l(y) = mean 0.5|y-t|^2."""
  batch = problems.mlp_batch(problem, dtype)

  def model_fn(p):
    return jnp.tanh(batch["x"] @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]

  def output_loss_fn(y):
    return 0.5 * jnp.mean(jnp.sum((y - batch["t"]) ** 2, axis=1))

  return model_fn, output_loss_fn


def _train(tx0, params, model_fn, output_loss_fn, steps=STEPS):
  tx = optax.chain(tx0, optax.add_decayed_weights(HP["wd"]), optax.sgd(HP["lr"], momentum=HP["momentum"]))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda q: output_loss_fn(model_fn(q)))(p)
    u, s = tx.update(g, s, p, model_fn=model_fn, output_loss_fn=output_loss_fn)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("precondition", [None, (0.9, 1e-8)], ids=["plain", "preconditioned"])
def test_matches_reference(precondition):
  problem, p0 = problems.mlp_data(seed=51)
  w_ref, nu_ref = reference.run(
    reference.MLP.flatten(p0),
    STEPS,
    lambda w, count, nu: reference.functional_sam_output(problem, w, RHO, precondition, count, nu),
    **BASE,
  )
  kwargs = {} if precondition is None else dict(precondition=True, b2=precondition[0], eps=precondition[1])
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    out, state = _train(xsam_jax.functional_sam(RHO, **kwargs), params, *_split(problem, jnp.float64))
    w = reference.MLP.flatten(jax.tree.map(np.asarray, out))
  assert_trees_within(w, w_ref, f64_bound(w_ref, n_ops=TRAIN_OPS))
  # The functional path is not SAM's: the same run of SAM ends elsewhere, by far more than rounding.
  w_sam, _ = reference.run(
    reference.MLP.flatten(p0), STEPS, lambda w, c, s: (reference.sam_output(problem.grad, w, RHO, 1), s), **BASE
  )
  assert np.max(np.abs(w_sam - w_ref)) > 1e3 * f64_bound(w_ref, n_ops=TRAIN_OPS)
  if precondition is not None:
    nu = reference.MLP.flatten(jax.tree.map(np.asarray, state[0].nu)) * 4.0 ** int(state[0].nu_exp)
    assert_trees_within(nu, nu_ref, f64_bound(nu_ref, n_ops=TRAIN_OPS))


@pytest.mark.parametrize("precondition", [False, True])
def test_loss_linear_in_outputs_is_sam(precondition):
  """l(y) = <c, y>: dl/dy is c at every point, so J(w + e)^T dl/dy(w) is SAM's gradient at w + e (and
  preconditioned SAM's with precondition=True), to the rounding of two programs."""
  problem, p0 = problems.mlp_data(seed=52)
  params = jax.tree.map(jnp.asarray, jax.tree.map(lambda a: a.astype(np.float32), p0))
  model_fn, _ = _split(problem)
  c = jnp.asarray(np.random.default_rng(0).normal(size=problem.t.shape), jnp.float32)
  output_loss_fn = lambda y: jnp.sum(c * y) / y.shape[0]
  loss_fn = lambda p: output_loss_fn(model_fn(p))
  g = jax.grad(loss_fn)(params)
  fsam = xsam_jax.functional_sam(0.1, precondition=precondition, b2=0.9)
  other = xsam_jax.preconditioned_sam(0.1, b2=0.9) if precondition else xsam_jax.sam(0.1)
  s_f, s_o = fsam.init(params), other.init(params)
  for _ in range(3):
    u_f, s_f = jax.jit(lambda s: fsam.update(g, s, params, model_fn=model_fn, output_loss_fn=output_loss_fn))(s_f)
    u_o, s_o = jax.jit(lambda s: other.update(g, s, params, loss_fn=loss_fn))(s_o)
    assert_trees_within(u_f, u_o, f32_bound(*jax.tree.leaves(u_o), n_ops=2 * problems.LOSS_OPS))


@pytest.mark.parametrize("precondition", [False, True])
def test_zero_radius_outputs_g0_bitwise(precondition):
  problem, p0 = problems.mlp_data(seed=53)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  model_fn, output_loss_fn = _split(problem)
  g = jax.grad(lambda p: output_loss_fn(model_fn(p)))(params)
  tx = xsam_jax.functional_sam(optax.constant_schedule(0.0), precondition=precondition)
  out, _ = jax.jit(lambda s: tx.update(g, s, params, model_fn=model_fn, output_loss_fn=output_loss_fn))(tx.init(params))
  assert_trees_equal(out, g)


def test_calling_convention_errors_say_what_to_pass():
  problem, p0 = problems.mlp_data(seed=54)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  model_fn, output_loss_fn = _split(problem)
  loss_fn = lambda p: output_loss_fn(model_fn(p))
  g = jax.grad(loss_fn)(params)
  tx = optax.chain(xsam_jax.functional_sam(0.1), optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"needs `model_fn` and `output_loss_fn` \(`loss_fn` alone is not enough"):
    tx.update(g, state, params, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=r"needs `output_loss_fn`: call it as .*model_fn=model_fn"):
    tx.update(g, state, params, model_fn=model_fn)
  with pytest.raises(ValueError, match=r"`model_fn` must be callable"):
    tx.update(g, state, params, model_fn=3, output_loss_fn=output_loss_fn)
  with pytest.raises(ValueError, match=r"`output_loss_fn` must return the scalar loss"):
    jax.jit(lambda s: tx.update(g, s, params, model_fn=model_fn, output_loss_fn=lambda y: y))(state)
  with pytest.raises(ValueError, match=r"`precondition` must be"):
    xsam_jax.functional_sam(0.1, precondition=1)
  with pytest.raises(ValueError, match=r"`b2`"):
    xsam_jax.functional_sam(0.1, precondition=True, b2=1.0)


def test_aux_of_the_output_loss_is_ignored():
  problem, p0 = problems.mlp_data(seed=55)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  model_fn, output_loss_fn = _split(problem)
  g = jax.grad(lambda p: output_loss_fn(model_fn(p)))(params)
  tx = xsam_jax.functional_sam(0.1)
  with_aux = lambda y: (output_loss_fn(y), {"mean": jnp.mean(y), "n": jnp.asarray(16)})
  outs = [
    jax.jit(lambda s, f=f: tx.update(g, s, params, model_fn=model_fn, output_loss_fn=f))(tx.init(params))[0]
    for f in (output_loss_fn, with_aux)
  ]
  assert_trees_equal(outs[0], outs[1])


def test_eager_updates_with_partials_compile_once():
  """Un-jitted, ``jax.tree_util.Partial`` parts whose arguments are arrays (a new batch each call) are traced
  arguments of one compiled update; plain functions are looked up by identity."""
  problem, p0 = problems.mlp_data(seed=56)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
  model = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]
  out_loss = lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=1))
  tx = xsam_jax.functional_sam(0.1)
  state = tx.init(params)
  compiles = []
  with jax.log_compiles(True):
    import logging

    class Count(logging.Handler):
      def emit(self, record):
        if "XLA compilation of jit(functional_sam_update)" in record.getMessage():
          compiles.append(record)

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    try:
      for i in range(3):
        x = jnp.asarray(problem.x, jnp.float32) * (1.0 + i)
        model_fn = jax.tree_util.Partial(model, x=x)
        output_loss_fn = jax.tree_util.Partial(out_loss, t=jnp.asarray(problem.t, jnp.float32))
        g = jax.grad(lambda p, f=model_fn, o=output_loss_fn: o(f(p)))(params)
        _, state = tx.update(g, state, params, model_fn=model_fn, output_loss_fn=output_loss_fn)
    finally:
      logging.getLogger("jax").removeHandler(handler)
  assert int(state.count) == 3
  assert len(compiles) == 1


# ---------------------------------------------------------------------------------------------------------
# Flax
# ---------------------------------------------------------------------------------------------------------


def test_nnx_helper_keeps_batchnorm_and_dropout_to_the_clean_pass():
  """value_grad_and_model_fns with BatchNorm and Dropout under nnx.jit: the clean pass updates the statistics
  and draws one dropout key per step, as a plain step does; the extra passes touch neither."""
  nnx = pytest.importorskip("flax.nnx")
  import xsam_jax.flax

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 6, rngs=rngs)
      self.bn = nnx.BatchNorm(6, rngs=rngs)
      self.dropout = nnx.Dropout(0.25, rngs=rngs)
      self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(self.dropout(jax.nn.relu(self.bn(self.hidden(x)))))

  x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
  y = (x.sum(axis=1) > 0).astype(jnp.int32)
  model_call = lambda m, x, y: m(x)
  output_loss = lambda logits, x, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(model, optimizer, x, y):
    loss, grads, model_fn, output_loss_fn = xsam_jax.flax.value_grad_and_model_fns(model_call, output_loss, model, x, y)
    optimizer.update(model, grads, model_fn=model_fn, output_loss_fn=output_loss_fn)
    return loss, model_fn(nnx.state(model, nnx.Param))

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(xsam_jax.functional_sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
  for _ in range(3):
    loss, _ = nnx.jit(step)(model, optimizer, x, y)
  # The clean pass as a plain step's: the same BatchNorm statistics' update and one dropout key per step.
  assert int(model.dropout.rngs.count[...]) == 3
  assert np.isfinite(float(loss))
  assert bool(jnp.all(model.bn.mean[...] != 0))


def test_nnx_helper_update_equals_the_functional_update():
  """One step: value_grad_and_model_fns' update is functional_sam's with model_fn = the module as a pure
  function of its params (no BatchNorm or Dropout: the same function)."""
  nnx = pytest.importorskip("flax.nnx")
  import xsam_jax.flax

  model = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(1)), jnp.tanh, nnx.Linear(5, 2, rngs=nnx.Rngs(2)))
  x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
  t = jnp.cos(x[:, :2])
  model_call = lambda m, x, t: m(x)
  output_loss = lambda out, x, t: jnp.mean((out - t) ** 2)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = xsam_jax.functional_sam(0.2)

  @nnx.jit
  def helper(model):
    _, grads, model_fn, output_loss_fn = xsam_jax.flax.value_grad_and_model_fns(model_call, output_loss, model, x, t)
    p = nnx.state(model, nnx.Param)
    return tx.update(grads, tx.init(p), p, model_fn=model_fn, output_loss_fn=output_loss_fn)[0]

  @jax.jit
  def direct(params):
    model_fn = lambda p: nnx.merge(graphdef, p)(x)
    output_loss_fn = lambda out: jnp.mean((out - t) ** 2)
    g = jax.grad(lambda p: output_loss_fn(model_fn(p)))(params)
    return tx.update(g, tx.init(params), params, model_fn=model_fn, output_loss_fn=output_loss_fn)[0]

  a, b = helper(model), direct(params)
  assert_trees_within(
    jax.tree.leaves(a), jax.tree.leaves(b), f32_bound(*jax.tree.leaves(b), n_ops=4 * problems.LOSS_OPS)
  )


def test_linen_train_state_forwards_the_split():
  pytest.importorskip("flax")
  from flax import linen as nn

  import xsam_jax.flax

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.tanh(nn.Dense(4)(x)))

  x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
  y = (x.sum(axis=1) > 0).astype(jnp.int32)
  params = Net().init(jax.random.key(0), x)["params"]
  state = xsam_jax.flax.TrainState.create(
    apply_fn=Net().apply, params=params, tx=optax.chain(xsam_jax.functional_sam(0.05), optax.sgd(0.1))
  )

  @jax.jit
  def train_step(state):
    model_fn = lambda p: state.apply_fn({"params": p}, x)
    output_loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(lambda p: output_loss_fn(model_fn(p)))(state.params)
    return state.apply_gradients(grads=grads, model_fn=model_fn, output_loss_fn=output_loss_fn), loss

  losses = []
  for _ in range(10):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert int(state.step) == 10
  assert losses[-1] < losses[0]
  with pytest.raises(ValueError, match=r"needs `model_fn` and `output_loss_fn`"):
    state.apply_gradients(grads=jax.tree.map(jnp.zeros_like, state.params))
