"""Where a real training script differs from the recipes: each difference works or stops with a message.

One test (or group) per trap, each shaped like the script that found it:
bf16 activations under a float32 loss (Linen and NNX, with the float32 twin
for ``probe_loss_fn``), one NaN batch under ``optax.apply_if_finite``, a
``rho_max`` warm-up from 0, ``optax.MultiSteps`` around the chain (and the
accumulation recipe inside it), a wrapper that drops ``loss_fn``, the chain
order (``check_updates``), token-weighted losses in ``microbatched``, and
``jax.pmap`` without ``axis_name``.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state as flax_train_state

import xsam_jax
import xsam_jax.flax
from tests import problems, reference
from tests.registry import CASES
from tests.tolerances import assert_trees_equal, assert_trees_within, f32_bound, f64_bound

# --- 1, 2: bf16 activations under a float32 loss ---------------------------------------------------


class TinyLM(nn.Module):
  """An embedding, one self-attention block and a logit layer in ``dtype``, float32 params: a transformer script."""

  dtype: jnp.dtype = jnp.bfloat16
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, 16, dtype=self.dtype)(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, dtype=self.dtype, deterministic=True)(
      nn.LayerNorm(dtype=self.dtype)(h)
    )
    return nn.Dense(self.vocab, dtype=self.dtype)(h)


def _tokens(seed=0, batch=4, length=8, vocab=11):
  return jax.random.randint(jax.random.key(seed), (batch, length + 1), 1, vocab)


def _lm_loss(apply_fn, params, tokens):
  logits = apply_fn({"params": params}, tokens[:, :-1]).astype(jnp.float32)  # the loss cast to float32
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _lm_state(dtype, tx):
  model = TinyLM(dtype=dtype)
  params = model.init(jax.random.key(0), _tokens()[:, :-1])["params"]
  return xsam_jax.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx), model


def _xsam_tx():
  return optax.chain(xsam_jax.xsam(0.05, 0.1, alpha_update_period=2), optax.adamw(1e-3))


def _lm_step(state, tokens, probe_apply=None):
  loss_fn = functools.partial(_lm_loss, state.apply_fn, tokens=tokens)
  grads = jax.grad(loss_fn)(state.params)
  probe = None if probe_apply is None else functools.partial(_lm_loss, probe_apply, tokens=tokens)
  return state.apply_gradients(grads=grads, loss_fn=loss_fn, probe_loss_fn=probe)


def _warnings_of(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn()
  return out, [str(w.message) for w in caught if "xsam:" in str(w.message)]


def test_bf16_activations_under_a_float32_loss_warn_and_name_probe_loss_fn():
  """The loss is float32, the matmuls bfloat16: the warning reads the program, not the output dtype."""
  state, _ = _lm_state(jnp.bfloat16, _xsam_tx())
  _, caught = _warnings_of(lambda: jax.jit(_lm_step)(state, _tokens(1)))
  assert len(caught) == 1, caught
  assert "dot_general in bfloat16" in caught[0]
  assert "probe_loss_fn" in caught[0]


def test_float32_model_does_not_warn():
  state, _ = _lm_state(jnp.float32, _xsam_tx())
  _, caught = _warnings_of(lambda: jax.jit(_lm_step)(state, _tokens(1)))
  assert caught == []


def test_train_state_forwards_probe_loss_fn_from_the_float32_twin():
  """``apply_gradients(probe_loss_fn=)`` reaches XSAM: the probes run the ``clone(dtype=float32)`` twin (no
  warning), and their curve over alpha is the smooth float32 one, not bfloat16's rounding noise."""
  state, model = _lm_state(jnp.bfloat16, _xsam_tx())
  twin = model.clone(dtype=jnp.float32)
  seen = []

  def spy_apply(variables, tokens):
    seen.append(1)
    return twin.apply(variables, tokens)

  step = jax.jit(lambda s, t: _lm_step(s, t, spy_apply))
  new, caught = _warnings_of(lambda: step(state, _tokens(1)))
  assert caught == []
  assert seen
  # Without it the probes run the bf16 loss: other losses, by far more than float32 rounding.
  plain, _ = _warnings_of(lambda: jax.jit(_lm_step)(state, _tokens(1)))
  probes32 = np.asarray(optax.tree.get(new.opt_state, "probe_losses"))
  probes16 = np.asarray(optax.tree.get(plain.opt_state, "probe_losses"))
  # The probe curve along alpha is smooth; bf16 rounding makes it jagged. Second differences measure that.
  assert np.max(np.abs(np.diff(probes32, 2))) * 10 < np.max(np.abs(np.diff(probes16, 2)))


class NnxLM(nnx.Module):
  """An NNX classifier head in ``dtype`` with Dropout: the NNX mixed-precision script."""

  def __init__(self, rngs, dtype=jnp.bfloat16):
    self.embed = nnx.Linear(6, 16, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(16, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jnp.tanh(self.embed(x))))


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x).astype(jnp.float32), y).mean()


def test_nnx_probe_dtype_gives_the_float32_twin_with_the_same_dropout_masks():
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.arange(8) % 3
  model = NnxLM(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _xsam_tx(), wrt=nnx.Param)
  f32_model = NnxLM(nnx.Rngs(0), dtype=jnp.float32)  # same seed: same params and dropout stream

  @nnx.jit
  def step(model, optimizer, x, y):
    _, grads, loss_fn, probe_loss_fn = xsam_jax.flax.value_grad_and_loss_fn(
      _nnx_loss, model, x, y, probe_dtype=jnp.float32
    )
    params = nnx.state(model, nnx.Param)
    values = probe_loss_fn(params), loss_fn(params)  # before the update changes params in place
    optimizer.update(model, grads, loss_fn=loss_fn, probe_loss_fn=probe_loss_fn)
    return values

  @nnx.jit
  def f32_loss(model, x, y):
    loss, _, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(_nnx_loss, model, x, y)
    return loss, loss_fn(nnx.state(model, nnx.Param))

  (probe_value, bf16_value), caught = _warnings_of(lambda: step(model, optimizer, x, y))
  assert caught == []
  clean32, replay32 = f32_loss(f32_model, x, y)
  # The twin replays the clean pass's dropout masks in float32: the float32 model's loss, to rounding.
  tol = f32_bound(clean32, n_ops=problems.LOSS_OPS)
  np.testing.assert_allclose(float(probe_value), float(replay32), rtol=0, atol=tol)
  assert abs(float(bf16_value) - float(replay32)) > tol  # the bf16 loss_fn is not the twin
  with pytest.raises(ValueError, match="probe_dtype"):
    xsam_jax.flax.value_grad_and_loss_fn(_nnx_loss, model, x, y, probe_dtype=jnp.int32)


# --- 3: one non-finite batch costs one step -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_nan_batch_under_apply_if_finite_costs_one_step(name):
  """The documented recipe, ``chain(method, apply_if_finite(sgd, 5))``: a NaN batch then 8 good ones ends where
  the run that skips that step ends (its step count advanced, nothing else touched: the same program on the
  same inputs, so bitwise), with finite parameters."""
  problem, params = problems.mlp_data(5)
  params = jax.tree.map(jnp.asarray, params)
  batch = problems.mlp_batch(problem)
  bad = {"x": batch["x"].at[0, 0].set(jnp.nan), "t": batch["t"]}
  tx = optax.chain(CASES[name](), optax.apply_if_finite(optax.sgd(0.05), max_consecutive_errors=5))

  @jax.jit
  def step(p, s, b):
    loss_fn = functools.partial(problems.mlp_batch_loss, batch=b)
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  def skip(p, s):
    return p, (s[0]._replace(count=s[0].count + 1), s[1])

  p_bad, s_bad = params, tx.init(params)
  p_skip, s_skip = p_bad, s_bad
  for i in range(10):
    p_bad, s_bad = step(p_bad, s_bad, bad if i == 1 else batch)
    p_skip, s_skip = skip(p_skip, s_skip) if i == 1 else step(p_skip, s_skip, batch)
  assert int(s_bad[1].total_notfinite) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p_bad))
  assert_trees_equal(p_bad, p_skip)
  assert_trees_equal(s_bad[0], s_skip[0])  # the method's own state: as if the batch had been skipped


# --- 4: a probe round at radius 0 ----------------------------------------------------------------------


def test_rho_max_warmup_from_zero_keeps_alpha_and_the_output():
  """A warm-up from ``rho_schedule_from_lr`` starts at radius 0: the probes tie, alpha stays ``alpha_init``,
  and with ``rho`` at 0 too the output is ``g_0``."""
  params, loss_fn = problems.mlp_problem(seed=3)
  warmup = optax.linear_schedule(0.0, 0.1, 10)
  rho = xsam_jax.rho_schedule_from_lr(warmup, rho_max=0.05)
  rho_max = xsam_jax.rho_schedule_from_lr(warmup, rho_max=0.1)
  tx = xsam_jax.xsam(rho, rho_max, alpha_update_period=4, alpha_init=0.7)
  g0 = jax.grad(loss_fn)(params)
  out, state = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))(params, tx.init(params))
  assert float(state.alpha) == np.float32(0.7)
  assert np.unique(np.asarray(state.probe_losses)).size == 1  # all tied
  assert_trees_within(out, g0, f32_bound(*jax.tree.leaves(g0), n_ops=4 * problems.NUM_PARAMS))


def test_select_alpha_keeps_alpha_on_a_tie_only():
  from xsam_jax._src.xsam import select_alpha

  grid = jnp.array([0.0, 1.0, 2.0])
  assert float(select_alpha(jnp.array([3.0, 3.0, 3.0]), grid, 0.4)[0]) == np.float32(0.4)
  assert float(select_alpha(jnp.array([3.0, jnp.nan, 3.0]), grid, 0.4)[0]) == np.float32(0.4)
  assert float(select_alpha(jnp.array([3.0, 3.0, 2.0]), grid, 0.4)[0]) == 0.0  # a real maximum, first of two


# --- 5: optax.MultiSteps ---------------------------------------------------------------------------------


def _multisteps_chain():
  return optax.MultiSteps(optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1)), every_k_schedule=2)


def test_multisteps_around_the_chain_is_an_error_naming_the_alternatives():
  params, loss_fn = problems.mlp_problem(seed=4)
  g = jax.grad(loss_fn)(params)
  tx = _multisteps_chain()
  with pytest.raises(ValueError, match=r"MultiSteps.*microbatched.*optax\.chain\(sam"):
    jax.jit(lambda p, s: tx.update(g, s, p, loss_fn=loss_fn))(params, tx.init(params))
  # Through nnx.Optimizer and through xsam_jax.flax.TrainState (which used to say "needs loss_fn"):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _multisteps_chain(), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  _, grads, nnx_loss_fn = xsam_jax.flax.value_grad_and_loss_fn(lambda m, x: jnp.mean(m(x) ** 2), model, x)
  with pytest.raises(ValueError, match="MultiSteps"):
    optimizer.update(model, grads, loss_fn=nnx_loss_fn)
  state = xsam_jax.flax.TrainState.create(
    apply_fn=None, params=params, tx=_multisteps_chain().gradient_transformation()
  )
  with pytest.raises(ValueError, match="MultiSteps"):
    state.apply_gradients(grads=g, loss_fn=loss_fn)


@pytest.mark.parametrize("name", ["sam", "xsam"])
def test_multisteps_inside_the_chain_is_the_mean_of_micro_batch_outputs_in_float64(name):
  """``chain(method, MultiSteps(sgd, k))``, called once per micro-batch: the k-th call's update is
  ``-lr`` times the mean of the per-micro-batch sharpness-aware gradients (float64 reference)."""
  k, lr, rho, rho_max, alphas = 2, 0.1, 0.1, 0.2, (0.0, 0.5, 1.0, 1.5, 2.0)
  with jax.enable_x64(True):
    problem, params = problems.mlp_data(6, n=16)
    batch = problems.mlp_batch(problem, jnp.float64)
    micro = [jax.tree.map(lambda a, i=i: a[i::k], batch) for i in range(k)]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    method = xsam_jax.sam(rho) if name == "sam" else xsam_jax.xsam(rho, rho_max, alphas=alphas, alpha_update_period=1)
    inner = optax.MultiSteps(optax.sgd(lr), every_k_schedule=k, accumulator_dtype=jnp.float64)
    tx = optax.chain(method, inner)
    state = tx.init(params)
    for b in micro:
      loss_fn = functools.partial(problems.mlp_batch_loss, batch=b)
      u, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)

  w = reference.MLP.flatten(params)
  outputs = []
  for b in micro:
    mlp = reference.MLP(np.asarray(b["x"]), np.asarray(b["t"]), problem.shapes)
    if name == "sam":
      outputs.append(reference.sam_output(mlp.grad, w, rho, 1))
    else:
      outputs.append(reference.xsam_output(mlp.loss, mlp.grad, w, rho, 1, rho_max, alphas, 1.0, True)[0])
  expected = -lr * np.mean(outputs, axis=0)
  got = reference.MLP.flatten(u)
  np.testing.assert_allclose(got, expected, rtol=0, atol=f64_bound(expected, n_ops=50 * problems.LOSS_OPS))


# --- 6: a wrapper that drops loss_fn; probe_loss_fn's own errors ---------------------------------------


def test_flax_train_state_dropping_loss_fn_names_the_xsam_train_state():
  params, loss_fn = problems.mlp_problem(seed=7)
  state = flax_train_state.TrainState.create(
    apply_fn=None, params=params, tx=optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1))
  )
  with pytest.raises(ValueError, match=r"wrapper.*xsam_jax\.flax\.TrainState"):
    state.apply_gradients(grads=jax.grad(loss_fn)(params), loss_fn=loss_fn)


def test_non_scalar_probe_loss_fn_is_named():
  params, loss_fn = problems.mlp_problem(seed=7)
  tx = xsam_jax.xsam(0.05, 0.1, alpha_update_period=1)
  with pytest.raises(ValueError, match=r"`probe_loss_fn` must return the scalar loss"):
    tx.update(
      jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn, probe_loss_fn=lambda p: p["w1"].sum(0)
    )


# --- 7: the chain order ----------------------------------------------------------------------------------

CHECKED = ["sam", "xsam", "vasso", "looksam", "wsam_decoupled"]


def test_every_method_takes_check_updates():
  factories = [xsam_jax.building_blocks.sharpness_aware_transform] + [
    getattr(xsam_jax, n)
    for n in ("sam", "xsam", "msam", "lsam", "vasso", "eigen_sam", "gsam", "wsam", "friendly_sam", "looksam")
  ]
  for f in factories:
    assert inspect.signature(f).parameters["check_updates"].default is False, f.__name__
  with pytest.raises(ValueError, match="check_updates"):
    xsam_jax.sam(0.1, check_updates="yes")


@pytest.mark.parametrize("name", CHECKED)
def test_check_updates_names_the_chain_order(name):
  """A clip before the method (Flax's wmt/gemma scripts) and weight decay before it are caught on the
  first step; the recipe's order passes."""
  params, loss_fn = problems.mlp_problem(seed=8)
  make = {
    "sam": lambda: xsam_jax.sam(0.1, check_updates=True),
    "xsam": lambda: xsam_jax.xsam(0.1, 0.2, alpha_update_period=2, check_updates=True),
    "vasso": lambda: xsam_jax.vasso(0.1, theta=0.4, check_updates=True),
    "looksam": lambda: xsam_jax.looksam(0.1, k=2, alpha=0.7, check_updates=True),
    "wsam_decoupled": lambda: xsam_jax.wsam(
      0.1, gamma=0.6, base_optimizer=optax.identity(), learning_rate=0.1, check_updates=True
    ),
  }[name]
  g_norm = float(optax.tree.norm(jax.grad(loss_fn)(params)))

  def first_step(*chain):
    tx = optax.chain(*chain)
    u, _ = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))(params, tx.init(params))
    jax.block_until_ready(u)

  first_step(make(), optax.clip_by_global_norm(0.1 * g_norm), optax.add_decayed_weights(0.1), optax.sgd(0.1))
  with pytest.raises(Exception, match="chain order"):
    first_step(optax.clip_by_global_norm(0.1 * g_norm), make(), optax.sgd(0.1))
  if name == "sam":
    with pytest.raises(Exception, match="chain order"):
      first_step(optax.add_decayed_weights(0.1), make(), optax.sgd(0.1))


# --- 8: token-weighted losses in microbatched ----------------------------------------------------------


def _padded_lm_batch(batch=8, length=12, vocab=7, seed=0):
  """An lm1b-shaped batch: tokens with uneven right padding (0), very different lengths per row."""
  rng = np.random.default_rng(seed)
  lengths = np.array([12, 1, 3, 12, 2, 9, 1, 5])[:batch]
  tokens = rng.integers(1, vocab, size=(batch, length + 1))
  mask = np.arange(length)[None, :] < lengths[:, None]
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "mask": jnp.asarray(mask)}


def _token_sums(params, batch):
  logits = params["emb"][batch["inputs"]] @ params["out"]
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weight = batch["mask"].astype(jnp.float32)
  return jnp.sum(per_token * weight), jnp.sum(weight)


def test_weighted_microbatched_is_the_full_batch_token_mean():
  params = {"emb": jax.random.normal(jax.random.key(0), (7, 5)), "out": jax.random.normal(jax.random.key(1), (5, 7))}
  batch = _padded_lm_batch()

  def full(p, b):
    total, weight = _token_sums(p, b)
    return total / weight

  value, grads = jax.value_and_grad(full)(params, batch)
  n_tokens = int(batch["mask"].sum())
  ops = 3 * n_tokens + 40  # a token's log-softmax over 7 logits of 5-long dots, then the sums
  for k in (1, 2, 4):
    v_mb, g_mb = jax.value_and_grad(xsam_jax.microbatched(_token_sums, k, weighted=True))(params, batch)
    np.testing.assert_allclose(float(v_mb), float(value), rtol=0, atol=f32_bound(value, n_ops=ops))
    assert_trees_within(g_mb, grads, f32_bound(*jax.tree.leaves(grads), n_ops=ops))
  # (value, aux) still allowed; the unweighted form is off with this padding (not a rounding difference).
  with_aux = lambda p, b: (_token_sums(p, b), jnp.sum(b["mask"]))
  (v_aux, aux), _ = jax.value_and_grad(xsam_jax.microbatched(with_aux, 4, weighted=True), has_aux=True)(params, batch)
  assert float(v_aux) == pytest.approx(float(value), abs=f32_bound(value, n_ops=ops))
  assert aux.shape == (4,)
  assert int(aux.sum()) == n_tokens
  unweighted = xsam_jax.microbatched(full, 4)(params, batch)
  assert abs(float(unweighted) - float(value)) > 100 * f32_bound(value, n_ops=ops)
  with pytest.raises(ValueError, match="weighted=True"):
    xsam_jax.microbatched(full, 2, weighted=True)(params, batch)


# --- 9: jax.pmap without axis_name ------------------------------------------------------------------------


def test_pmap_without_axis_name_is_an_error_naming_the_axis():
  """Flax's ``pmap(..., axis_name="batch")`` step with the transformation's ``axis_name`` forgotten."""
  params, loss_fn = problems.mlp_problem(seed=9)
  tx = optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1))
  n = jax.local_device_count()

  def step(p, s):
    g = jax.lax.pmean(jax.grad(loss_fn)(p), "batch")
    return tx.update(g, s, p, loss_fn=loss_fn)

  replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), t)
  with pytest.raises(ValueError, match=r"pmap.*axis_name='batch'"):
    jax.pmap(step, axis_name="batch")(replicate(params), replicate(tx.init(params)))
  good = optax.chain(xsam_jax.sam(0.05, axis_name="batch"), optax.sgd(0.1))
  jax.pmap(lambda p, s: good.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn), axis_name="batch")(
    replicate(params), replicate(good.init(params))
  )


def test_check_updates_with_axis_name_compares_global_gradients():
  """Data parallel (``jax.vmap`` with an axis name, two replicas on their own shards, the pmap form): the
  recipe's order passes, a clip before the method raises."""
  problem, params = problems.mlp_data(9, n=16)
  params = jax.tree.map(jnp.asarray, params)
  batch = problems.mlp_batch(problem)
  shards = jax.tree.map(lambda x: x.reshape(2, 8, *x.shape[1:]), batch)
  g_norm = float(optax.tree.norm(jax.grad(problems.mlp_batch_loss)(params, batch)))

  def run(*chain):
    tx = optax.chain(*chain)
    state = tx.init(params)

    def replica(b):
      loss_fn = functools.partial(problems.mlp_batch_loss, batch=b)
      return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)[0]

    jax.block_until_ready(jax.jit(jax.vmap(replica, axis_name="batch"))(shards))

  method = lambda: xsam_jax.sam(0.1, axis_name="batch", check_updates=True)
  run(method(), optax.clip_by_global_norm(0.1 * g_norm), optax.sgd(0.1))
  with pytest.raises(Exception, match="chain order"):
    run(optax.clip_by_global_norm(0.1 * g_norm), method(), optax.sgd(0.1))
