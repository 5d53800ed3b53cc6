"""Hostile inputs (issue 14): each gets a ValueError that names the argument
(or the params leaf) and what is allowed, or the correct finite result; and
eager ``update`` calls compile once, not on every call."""

import contextlib
import gc
import logging
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems
from tests.registry import CASES
from tests.tolerances import assert_trees_within, f32_bound

FACTORIES = {
  "sam": lambda **kw: xsam_jax.sam(0.1, **kw),
  "xsam": lambda **kw: xsam_jax.xsam(0.1, 0.2, alphas=(0.0, 0.5, 1.0), alpha_update_period=2, **kw),
  "msam": lambda **kw: xsam_jax.msam(0.1, num_steps=2, **kw),
  "lsam": lambda **kw: xsam_jax.lsam(0.1, num_steps=2, **kw),
  "vasso": lambda **kw: xsam_jax.vasso(0.1, **kw),
  "eigen_sam": lambda **kw: xsam_jax.eigen_sam(0.1, eig_update_period=2, power_iterations=2, **kw),
}
ADAPTIVE = ("sam", "xsam", "msam", "lsam")  # the methods with an adaptive_mask

PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 0.3]]), "b": jnp.array([0.1, -0.2])}


def _loss(p):
  return jnp.sum(p["w"] ** 4) + jnp.sum(jnp.tanh(p["w"] @ p["b"])) + jnp.sum(p["b"] ** 2)


def _update(tx, params=PARAMS, loss_fn=_loss, state=None, grads=None):
  state = tx.init(params) if state is None else state
  grads = jax.grad(loss_fn)(params) if grads is None else grads
  return tx.update(grads, state, params, loss_fn=loss_fn)


# --- 3: scalar hyperparameters must be scalars -----------------------------

SCALARS = [
  # (factory, kwargs without the argument, argument, a valid value)
  (xsam_jax.sam, {}, "rho", 0.1),
  (xsam_jax.sam, {"rho": 0.1}, "eta", 0.01),
  (xsam_jax.xsam, {"rho_max": 0.2}, "rho", 0.1),
  (xsam_jax.xsam, {"rho": 0.1}, "rho_max", 0.2),
  (xsam_jax.xsam, {"rho": 0.1, "rho_max": 0.2}, "alpha_init", 0.5),
  (xsam_jax.xsam, {"rho": 0.1, "rho_max": 0.2}, "eta", 0.01),
  (xsam_jax.xsam, {"rho": 0.1, "rho_max": 0.2}, "alpha_update_period", 3),
  (xsam_jax.msam, {"num_steps": 2}, "rho", 0.1),
  (xsam_jax.msam, {"rho": 0.1, "num_steps": 2}, "eta", 0.01),
  (xsam_jax.lsam, {"num_steps": 2}, "rho", 0.1),
  (xsam_jax.lsam, {"rho": 0.1, "num_steps": 2}, "eta", 0.01),
  (xsam_jax.vasso, {}, "rho", 0.1),
  (xsam_jax.vasso, {"rho": 0.1}, "theta", 0.5),
  (xsam_jax.eigen_sam, {}, "rho", 0.1),
  (xsam_jax.eigen_sam, {"rho": 0.1}, "alpha", 0.5),
  (xsam_jax.eigen_sam, {"rho": 0.1}, "eig_update_period", 3),
]
_IDS = [f"{f.__name__}-{name}" for f, _, name, _ in SCALARS]


@pytest.mark.parametrize(("factory", "kwargs", "name", "value"), SCALARS, ids=_IDS)
@pytest.mark.parametrize("wrap", [np.array, jnp.array], ids=["numpy", "jax"])
@pytest.mark.parametrize("shape", [(1,), (3,)])
def test_array_valued_scalar_hyperparameters_are_rejected(factory, kwargs, name, value, wrap, shape):
  with pytest.raises(ValueError, match=rf"`{name}` must be .*\(a Python number or a 0-d array\)|`{name}` must be "):
    factory(**kwargs, **{name: wrap(np.full(shape, value))})


@pytest.mark.parametrize(("factory", "kwargs", "name", "value"), SCALARS, ids=_IDS)
@pytest.mark.parametrize("wrap", [np.array, jnp.array, lambda v: v], ids=["numpy", "jax", "python"])
def test_zero_d_and_python_scalars_are_accepted(factory, kwargs, name, value, wrap):
  factory(**kwargs, **{name: wrap(value)})


@pytest.mark.parametrize(("factory", "kwargs", "name", "value"), SCALARS, ids=_IDS)
@pytest.mark.parametrize("bad", [True, np.bool_(True), jnp.array(True), np.complex64(0.5), "0.5", None], ids=repr)
def test_non_real_scalars_are_rejected(factory, kwargs, name, value, bad):
  if bad is None and name == "alpha_update_period":
    return  # None: never probe
  with pytest.raises(ValueError, match=rf"`{name}` must be"):
    factory(**kwargs, **{name: bad})


def test_array_alpha_init_would_have_reshaped_the_params():
  """The reported symptom: a (1,) alpha_init made a () param (1,)-shaped."""
  with pytest.raises(ValueError, match=r"`alpha_init` must be a finite real number \(a Python number or a 0-d array\)"):
    xsam_jax.xsam(0.1, 0.2, alpha_init=np.array([0.5]))
  with pytest.raises(ValueError, match=r"`alpha_init`.*shape \(3,\)"):
    xsam_jax.xsam(0.1, 0.2, alpha_init=np.array([0.5, 0.5, 0.5]), alpha_update_period=None)


def test_inject_hyperparams_tracers_still_pass_and_array_values_fail_at_init():
  injected = optax.inject_hyperparams(xsam_jax.xsam, static_args=("num_steps",))(
    rho=0.1, rho_max=0.2, alpha_init=0.5, alpha_update_period=2, alphas=(0.0, 1.0)
  )
  state = injected.init(PARAMS)
  step = jax.jit(lambda s: injected.update(jax.grad(_loss)(PARAMS), s, PARAMS, loss_fn=_loss))
  for _ in range(2):
    out, state = step(state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  bad = optax.inject_hyperparams(xsam_jax.sam)(rho=np.array([0.1]))
  with pytest.raises(ValueError, match=r"`rho` must be .*0-d array"):
    bad.init(PARAMS)


# --- 4: errors that name the argument --------------------------------------


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize(
  ("mask", "match"),
  [
    ({"w": True}, r"`adaptive_mask` must be a pytree with the structure of params.*missing: \['b'\]"),
    ({"w": True, "b": False, "c": True}, r"`adaptive_mask` must be.*not in params: \['c'\]"),
    (
      {"w": jnp.array([[True, False], [True, True]]), "b": True},
      r"`adaptive_mask` must be .*one bool per leaf.*leaf \['w'\] is an array of shape \(2, 2\)",
    ),
    ({"w": 1, "b": True}, r"`adaptive_mask` must be .*one bool per leaf.*leaf \['w'\] is 1"),
    (lambda p: {"w": True}, r"`adaptive_mask\(params\)` must be a pytree with the structure of params"),
    (lambda p: None, r"`adaptive_mask\(params\)` must be"),
  ],
  ids=["missing-key", "extra-key", "per-element", "int-leaf", "callable-missing", "callable-none"],
)
def test_bad_adaptive_mask_is_named(method, mask, match):
  tx = FACTORIES[method](adaptive=True, adaptive_mask=mask)
  with pytest.raises(ValueError, match=match):
    _update(tx)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_good_adaptive_masks_agree(method):
  """Python bools, NumPy bools, 0-d bool arrays and a callable give one result."""
  weights_only = [
    {"w": True, "b": False},
    {"w": np.bool_(True), "b": np.bool_(False)},
    {"w": np.array(True), "b": jnp.array(False)},
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
  ]
  outs = [_update(FACTORIES[method](adaptive=True, adaptive_mask=m))[0] for m in weights_only]
  for out in outs[1:]:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0]), strict=True):
      np.testing.assert_array_equal(a, b)


def test_vasso_array_theta_is_named():
  with pytest.raises(
    ValueError,
    match=r"`theta` must be .*\(a Python number or a 0-d array\), got an array of shape \(2,\)",
  ):
    xsam_jax.vasso(0.1, theta=jnp.array([0.5, 0.5]))
  with pytest.raises(ValueError, match=r"`theta` must be a finite real number in \(0, 1\], got 1.5"):
    xsam_jax.vasso(0.1, theta=1.5)


@pytest.mark.parametrize("method", sorted(FACTORIES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("leaf", "dtype"), [(jnp.array([1, 2], jnp.int32), "int32"), (jnp.array([True, False]), "bool")], ids=["int", "bool"]
)
def test_non_float_params_leaf_is_named(method, jit, leaf, dtype):
  params = {"w": PARAMS["w"], "n": leaf}
  loss_fn = lambda p: jnp.sum(p["w"] ** 4)
  grads = {"w": jax.grad(loss_fn)({"w": params["w"]})["w"], "n": jnp.zeros(2, jnp.float32)}
  tx = FACTORIES[method]()
  with pytest.raises(ValueError, match=rf"{method}.init: params leaf \['n'\] has dtype {dtype}: .*floating-point"):
    tx.init(params)
  state = tx.init({"w": PARAMS["w"], "n": jnp.zeros(2)})  # a state of the right shapes
  update = lambda g, s: tx.update(g, s, params, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=rf"{method}.update: params leaf \['n'\] has dtype {dtype}: .*floating-point"):
    (jax.jit(update) if jit else update)(grads, state)


def test_float0_updates_leaf_is_named():
  tx = xsam_jax.sam(0.1)
  grads = {"w": jax.grad(_loss)(PARAMS)["w"], "b": np.zeros(2, jax.dtypes.float0)}
  with pytest.raises(ValueError, match=r"sam.update: updates leaf \['b'\] has dtype .*float0.*floating-point"):
    tx.update(grads, tx.init(PARAMS), PARAMS, loss_fn=_loss)


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_python_float_params_leaf_is_a_zero_d_array(method):
  loss_fn = lambda p: jnp.sum(p["w"] ** 4) + p["s"] ** 2 * jnp.sum(p["w"])
  with_float = {"w": PARAMS["w"], "s": 0.5}
  with_array = {"w": PARAMS["w"], "s": jnp.array(0.5)}
  out_f, state_f = _update(FACTORIES[method](), with_float, loss_fn)
  out_a, state_a = _update(FACTORIES[method](), with_array, loss_fn)
  for a, b in zip(jax.tree.leaves((out_f, state_f)), jax.tree.leaves((out_a, state_a)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.isfinite(float(out_f["s"]))
  new = optax.apply_updates(with_float, out_f)
  assert jnp.shape(new["s"]) == ()


def test_non_numeric_params_leaf_is_named():
  tx = xsam_jax.sam(0.1)
  with pytest.raises(ValueError, match=r"sam: params leaf \['name'\] is a str"):
    tx.init({"w": PARAMS["w"], "name": "layer"})


def test_updates_must_match_params():
  tx = xsam_jax.sam(0.1)
  with pytest.raises(ValueError, match=r"`updates` must have the tree structure of `params` \(missing from updates"):
    tx.update({"w": PARAMS["w"]}, tx.init(PARAMS), PARAMS, loss_fn=_loss)
  with pytest.raises(ValueError, match=r"updates leaf \['b'\] has shape \(3,\), but the params leaf has \(2,\)"):
    tx.update({"w": PARAMS["w"], "b": jnp.zeros(3)}, tx.init(PARAMS), PARAMS, loss_fn=_loss)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_xsam_state_from_another_alpha_grid_is_named(jit):
  big = xsam_jax.xsam(0.1, 0.2)  # 21 alphas
  small = xsam_jax.xsam(0.1, 0.2, alphas=np.linspace(0.0, 2.0, 11))
  update = lambda s: small.update(jax.grad(_loss)(PARAMS), s, PARAMS, loss_fn=_loss)
  with pytest.raises(ValueError, match=r"xsam.update: .*\(21,\).*11 points.*different `alphas` grid"):
    (jax.jit(update) if jit else update)(big.init(PARAMS))


def test_state_for_other_params_or_method_is_named():
  vasso = xsam_jax.vasso(0.1)
  with pytest.raises(ValueError, match=r"vasso.update: the state does not match this transformation and params"):
    _update(vasso, state=vasso.init({"w": PARAMS["w"]}))
  with pytest.raises(ValueError, match=r"eigen_sam.update: the state does not match.*state leaf .*eigvec.*shape"):
    _update(FACTORIES["eigen_sam"](), state=FACTORIES["eigen_sam"]().init({"w": PARAMS["w"][:1], "b": PARAMS["b"]}))
  with pytest.raises(ValueError, match=r"xsam.update: the state does not match.*SAMState.*XSAMState"):
    _update(FACTORIES["xsam"](), state=xsam_jax.sam(0.1).init(PARAMS))


def test_eigen_sam_period_message_agrees_with_what_is_accepted():
  for bad in (0, None, 2.5, np.array([3])):
    with pytest.raises(ValueError, match=r"`eig_update_period` must be an int >= 1, got") as info:
      xsam_jax.eigen_sam(0.1, eig_update_period=bad)
    assert "None" not in str(info.value).split(", got")[0]
  xsam_jax.eigen_sam(0.1, eig_update_period=np.int64(3))
  xsam_jax.eigen_sam(0.1, eig_update_period=jnp.array(3))


@pytest.mark.parametrize(
  ("make", "name"),
  [
    (lambda v: xsam_jax.msam(0.1, num_steps=2, plus=v), "plus"),
    (lambda v: xsam_jax.lsam(0.1, num_steps=2, plus=v), "plus"),
    (lambda v: xsam_jax.sam(0.1, adaptive=v), "adaptive"),
    (lambda v: xsam_jax.xsam(0.1, 0.2, adaptive=v), "adaptive"),
    (lambda v: xsam_jax.msam(0.1, num_steps=2, adaptive=v), "adaptive"),
    (lambda v: xsam_jax.lsam(0.1, num_steps=2, adaptive=v), "adaptive"),
    (lambda v: xsam_jax.sam(0.1, axis_name="i", m_sharpness=v), "m_sharpness"),
    (lambda v: xsam_jax.xsam(0.1, 0.2, axis_name="i", m_sharpness=v), "m_sharpness"),
  ],
)
@pytest.mark.parametrize("bad", ["no", "False", 1, 0, None, np.array([True])], ids=repr)
def test_bool_flags_must_be_bools(make, name, bad):
  with pytest.raises(ValueError, match=rf"`{name}` must be a bool \(True or False\)"):
    make(bad)
  make(True)
  make(np.bool_(False))


# --- 5: complex params -------------------------------------------------------


@pytest.mark.parametrize("method", sorted(FACTORIES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_complex_params_are_rejected(method, jit):
  params = {"w": jnp.array([1.0 + 1.0j, -2.0]), "b": jnp.array([0.5])}
  loss_fn = lambda p: jnp.sum(jnp.abs(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)
  tx = FACTORIES[method]()
  with pytest.raises(ValueError, match=rf"{method}.init: params leaf \['w'\] has dtype complex64: complex"):
    tx.init(params)
  state = tx.init(jax.tree.map(jnp.real, params))  # a state of the right shapes
  grads = jax.grad(loss_fn)(params)
  update = lambda s: tx.update(grads, s, params, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=rf"{method}.update: params leaf \['w'\] has dtype complex64: complex"):
    (jax.jit(update) if jit else update)(state)


# --- 7: eager update compiles once -----------------------------------------


@contextlib.contextmanager
def _compiles():
  """Collects the "Compiling ..." messages that ``jax.log_compiles`` logs."""
  messages = []

  class Handler(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Compiling"):
        messages.append(record.getMessage()[:120])

  handler, logger = Handler(level=logging.DEBUG), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield messages
  finally:
    logger.removeHandler(handler)


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_eager_update_compiles_once_per_loss_fn(method):
  tx = FACTORIES[method]()
  params, state = PARAMS, tx.init(PARAMS)
  grads = jax.grad(_loss)(params)
  with _compiles() as first:
    out, state = tx.update(grads, state, params, loss_fn=_loss)
    jax.block_until_ready(out)
  assert first, "the first eager call compiles the update"
  for _ in range(2):  # the second and third calls (probe and refresh calls included) compile nothing
    with _compiles() as later:
      out, state = tx.update(grads, state, params, loss_fn=_loss)
      jax.block_until_ready((out, state))
    assert later == []
  jitted_tx = FACTORIES[method]()
  s = jitted_tx.init(PARAMS)
  step = jax.jit(lambda g, s: jitted_tx.update(g, s, PARAMS, loss_fn=_loss))
  for _ in range(3):
    ref, s = step(grads, s)
  for a, b in zip(jax.tree.leaves((out, state)), jax.tree.leaves((ref, s)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eager_update_with_a_partial_loss_reuses_the_compilation_for_new_batches():
  def loss(p, x):
    return jnp.sum((p["w"] @ x) ** 2) + jnp.sum(p["b"] * x)

  tx = xsam_jax.xsam(0.1, 0.2, alphas=(0.0, 0.5, 1.0), alpha_update_period=1)
  state = tx.init(PARAMS)
  for i in range(3):
    x = jnp.array([1.0, -0.5]) * (i + 1)
    loss_fn = jax.tree_util.Partial(loss, x=x)
    grads = jax.grad(loss_fn)(PARAMS)
    with _compiles() as compiled:
      out, new_state = tx.update(grads, state, PARAMS, loss_fn=loss_fn)
      jax.block_until_ready(out)
    assert bool(compiled) == (i == 0), compiled
    # the batch is data of the compiled update, not a constant of the first one
    ref = jax.jit(lambda g, s, x=x: tx.update(g, s, PARAMS, loss_fn=lambda p: loss(p, x)))(grads, state)
    for a, b in zip(jax.tree.leaves((out, new_state)), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    state = new_state


def test_eager_cache_does_not_keep_every_closure_alive():
  tx = xsam_jax.sam(0.1)
  state = tx.init(PARAMS)

  class Batch:  # a stand-in for per-step data captured by a fresh closure
    scale = 1.0

  refs = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(8):
      batch = Batch()
      refs.append(weakref.ref(batch))
      loss_fn = lambda p, batch=batch: batch.scale * _loss(p)
      _, state = tx.update(jax.grad(loss_fn)(PARAMS), state, PARAMS, loss_fn=loss_fn)
  assert sum("compiles the update again" in str(w.message) for w in caught) == 1  # a fresh closure each call
  del batch, loss_fn
  gc.collect()
  assert refs[0]() is None, "an old loss_fn (and its batch) is still held by the eager cache"


def test_disable_jit_runs_the_update_op_by_op():
  """The documented escape hatch for a loss that reads changing outside data."""
  data = {"scale": 1.0}
  loss_fn = lambda p: data["scale"] * _loss(p)  # impure: reads data at call time
  tx = xsam_jax.sam(0.1)
  state = tx.init(PARAMS)
  outs = []
  for scale in (1.0, 2.0):
    data["scale"] = scale
    with jax.disable_jit():
      outs.append(tx.update(jax.grad(loss_fn)(PARAMS), state, PARAMS, loss_fn=loss_fn)[0])
  for a, b in zip(jax.tree.leaves(outs[1]), jax.tree.leaves(outs[0]), strict=True):
    np.testing.assert_allclose(a, 2.0 * b, rtol=1e-5)


# Third round: arguments that failed late, deep inside JAX, or silently.


def test_eigen_sam_seed_beyond_the_prng_range_is_named():
  xsam_jax.eigen_sam(0.1, alpha=0.5, seed=2**63 - 1)  # the largest PRNG seed is fine
  with pytest.raises(ValueError, match=r"`seed` must be an int in \[0, 9223372036854775807\]"):
    xsam_jax.eigen_sam(0.1, alpha=0.5, seed=2**70)


@pytest.mark.parametrize("lr", [lambda count: jnp.nan, lambda count: -1.0, lambda count: jnp.inf])
def test_wsam_learning_rate_schedule_is_checked_at_step_0(lr):
  with pytest.raises(ValueError, match=r"`learning_rate\(0\)` must be a finite real number >= 0"):
    xsam_jax.wsam(0.1, gamma=0.5, base_optimizer=optax.sgd(0.1), learning_rate=lr)


def test_eager_update_warns_once_when_every_call_recompiles():
  """A fresh functools.partial holding a Python float each call defeats the eager cache: one warning, naming
  the cure; jax.tree_util.Partial with array arguments neither recompiles nor warns."""
  import functools

  def loss(p, scale):
    return scale * _loss(p)

  tx = xsam_jax.sam(0.1)
  state = tx.init(PARAMS)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for scale in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
      loss_fn = functools.partial(loss, scale=scale)
      tx.update(jax.grad(loss_fn)(PARAMS), state, PARAMS, loss_fn=loss_fn)
  messages = [str(w.message) for w in caught if "compiles the update again" in str(w.message)]
  assert len(messages) == 1
  assert "jax.tree_util.Partial" in messages[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx2 = xsam_jax.sam(0.1)
    for scale in (1.0, 2.0, 3.0, 4.0):
      loss_fn = jax.tree_util.Partial(loss, scale=jnp.float32(scale))
      tx2.update(jax.grad(loss_fn)(PARAMS), state, PARAMS, loss_fn=loss_fn)
  assert not [w for w in caught if "compiles the update again" in str(w.message)]


def test_sharpness_toolkit_names_bad_radii_coordinates_and_trees():
  loss_fn = lambda p: jnp.sum(p["w"] ** 2)
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"`rho` must be a finite real number >= 0"):
    xsam_jax.sharpness.average_sharpness(loss_fn, params, jax.random.key(0), rho=-1.0, num_directions=2)
  d = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"`xs` must hold finite coordinates"):
    xsam_jax.sharpness.loss_surface(loss_fn, params, d, d, xs=[0.0, float("nan")], ys=[0.0])
  with pytest.raises(ValueError, match=r"loss_surface: `direction1` must have the tree structure.*\['b'\]"):
    xsam_jax.sharpness.loss_surface(loss_fn, params, {"w": jnp.ones(3)}, d, xs=[0.0], ys=[0.0])
  with pytest.raises(ValueError, match=r"direction2 leaf \['w'\] has shape \(2,\)"):
    xsam_jax.sharpness.loss_surface(loss_fn, params, d, {"w": jnp.ones(2), "b": jnp.ones(2)}, xs=[0.0], ys=[0.0])
  with pytest.raises(ValueError, match=r"hessian_vector_product: vector leaf \['w'\] has shape \(4,\)"):
    xsam_jax.sharpness.hessian_vector_product(loss_fn, params, {"w": jnp.ones(4), "b": jnp.ones(2)})


@pytest.mark.parametrize(("curvature", "n"), [(1.5e38, 4), (3e38, 4), (1e38, 64)])
def test_eigen_sam_keeps_a_unit_eigenvector_near_float32s_largest_value(curvature, n):
  """Gradients and Hessian-vector products near 3e38 (their norms beyond float32): the stored eigenvector stays
  a unit vector (it used to collapse to 0, the output silently becoming SAM's), and the output is EigenSAM's
  correction |g_1| unit(u - alpha |<u, v>| v), computed here in float64 on values divided by the curvature."""
  alpha = 0.5
  loss = lambda p: 0.5 * curvature * jnp.sum(p["w"] ** 2)
  params = {"w": jnp.linspace(0.5, 0.9, n)}
  tx = xsam_jax.eigen_sam(1e-3, alpha=alpha, eig_update_period=1, power_iterations=3)
  state = tx.init(params)
  g = jax.grad(loss)(params)
  for _ in range(2):
    out, state = tx.update(g, state, params, loss_fn=loss)
  v = np.asarray(state.eigvec["w"], np.float64)
  assert bool(state.has_eigvec)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=0, atol=n * 2**-23)
  w = np.asarray(params["w"], np.float64)
  g1 = w + 1e-3 * w / np.linalg.norm(w)  # the gradient at the ascent point, over the curvature
  u = g1 / np.linalg.norm(g1)
  corrected = u - alpha * abs(u @ v) * v
  expected = np.linalg.norm(g1) * corrected / np.linalg.norm(corrected)
  got = np.asarray(out["w"], np.float64) / curvature
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=0, atol=64 * n * 2**-23 * np.max(np.abs(expected)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_is_proportional_to_the_gradient_at_tiny_scales(name):
  """The loss times s, for s = 1e-13, 1e-20, 1e-30: every method's update is s times the update at s = 1, to
  float32 rounding (with the authors' |g| + 1e-12 divisions, MSAM's was 0.12x at 1e-13 and XSAM's ~0 at
  1e-30). One compiled step, the scale a traced argument."""
  params, loss_fn = problems.mlp_problem(seed=3)
  tx = CASES[name]()

  @jax.jit
  def step(s):
    scaled = lambda p: s * loss_fn(p)
    return tx.update(jax.grad(scaled)(params), tx.init(params), params, loss_fn=scaled)[0]

  reference = step(jnp.float32(1.0))
  ops = 10 * problems.LOSS_OPS + 10 * problems.NUM_PARAMS  # one update along two roundings (the battery's)
  for s in (1e-13, 1e-20, 1e-30):
    got = jax.tree.map(lambda u, s=s: u / s, step(jnp.float32(s)))
    assert_trees_within(got, reference, f32_bound(*jax.tree.leaves(reference), n_ops=ops))
