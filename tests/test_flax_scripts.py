"""xsam_jax.flax in training scripts shaped like real ones.

- NNX: a conv classifier with ``nnx.BatchNorm`` and ``nnx.Dropout``, trained by
  ``nnx.Optimizer`` with XSAM through :func:`xsam_jax.flax.value_grad_and_loss_fn`.
- Linen: a small ResNet with ``nn.BatchNorm`` in :class:`xsam_jax.flax.TrainState`
  under ``jax.pmap`` on 8 CPU devices (``tests/flax_pmap_checks.py``, in a
  subprocess: the device count is fixed when jax starts).

Exact (bitwise) checks only where exactness is the contract: the clean pass
*is* a plain ``nnx.value_and_grad`` pass, so it leaves the BatchNorm statistics
and RNG counters a plain step leaves, and the extra passes change nothing.
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import xsam_jax
import xsam_jax.flax
from tests.test_multidevice import _env
from tests.tolerances import f32_bound

ROOT = Path(__file__).resolve().parents[1]
# The python blocks of docs/flax.md written there (the README sections it includes run in test_readme.py).
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "flax.md").read_text(), flags=re.S)

PERIOD = 2  # XSAM probes alpha on steps 0, 2, 4, ...
# A grid without alpha_init = 1.0: the first probe round must move alpha.
ALPHAS = (0.0, 0.5, 1.5, 2.0)


def _images(seed=0, n=32, classes=4):
  """8x8 one-channel images whose class is set by a fixed random template, plus noise."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(classes, 8, 8, 1))
  y = rng.integers(0, classes, size=n)
  x = templates[y] + 0.5 * rng.normal(size=(n, 8, 8, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


class CNN(nnx.Module):
  """Conv (stride 2) -> BatchNorm -> relu -> Dropout -> Linear: the NNX classifier of the scripts."""

  def __init__(self, rngs, classes=4, bn_momentum=0.9):
    self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=bn_momentum, rngs=rngs)
    self.dropout = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(4 * 4 * 4, classes, rngs=rngs)

  def __call__(self, x):
    h = self.dropout(nnx.relu(self.bn(self.conv(x))))
    return self.out(h.reshape(h.shape[0], -1))


def loss_of_model(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _xsam_optimizer(model):
  tx = optax.chain(xsam_jax.xsam(0.2, 0.4, alphas=ALPHAS, alpha_update_period=PERIOD), optax.sgd(0.1, momentum=0.9))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


# The script's step: a plain NNX step with nnx.value_and_grad replaced (the recipe of docs/flax.md).
@nnx.jit
def xsam_step(model, optimizer, x, y):
  loss, grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(loss_of_model, model, x, y)
  optimizer.update(model, grads, loss_fn=loss_fn)
  return loss


PLAIN_TX = optax.sgd(0.1)  # one object: the jitted steps of the twins compile once


@nnx.jit
def plain_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_of_model, argnums=nnx.DiffState(0, nnx.Param))(model, x, y)
  optimizer.update(model, grads)
  return loss


def _plain_twin_step(model, x, y):
  """A copy of ``model`` after one plain SGD step (the model itself is left as it is)."""
  twin = nnx.clone(model)
  loss = plain_step(twin, nnx.Optimizer(twin, PLAIN_TX, wrt=nnx.Param), x, y)
  return twin, loss


def _non_trainable(model):
  """The state a step mutates besides the parameters: BatchNorm statistics and RNG keys and counters."""
  return nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))


def _assert_bitwise_equal(a, b):
  as_numbers = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(a)
  b_leaves, b_def = jax.tree_util.tree_flatten_with_path(b)
  assert a_def == b_def
  for (path, u), (_, v) in zip(a_leaves, b_leaves, strict=True):
    np.testing.assert_array_equal(as_numbers(u), as_numbers(v), err_msg=jax.tree_util.keystr(path))


def test_eager_step_leaves_bn_stats_and_rng_state_of_a_plain_step():
  """Without jit, from identical models: one XSAM step and one plain SGD step leave identical loss,
  BatchNorm statistics and RNG state (the parameters differ: that is the optimizer's job). Exact by
  construction: op by op, the clean pass is the same primitives on the same inputs."""
  x, y = _images()
  model = CNN(nnx.Rngs(params=0, dropout=1))
  twin = nnx.clone(model)
  loss, grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(loss_of_model, model, x, y)
  _xsam_optimizer(model).update(model, grads, loss_fn=loss_fn)
  twin_loss, twin_grads = nnx.value_and_grad(loss_of_model, argnums=nnx.DiffState(0, nnx.Param))(twin, x, y)
  nnx.Optimizer(twin, PLAIN_TX, wrt=nnx.Param).update(twin, twin_grads)
  assert float(loss) == float(twin_loss)
  _assert_bitwise_equal(nnx.as_pure(grads), nnx.as_pure(twin_grads))
  _assert_bitwise_equal(_non_trainable(model), _non_trainable(twin))
  assert int(model.dropout.rngs.count[...]) == 1  # one dropout key drawn: the clean pass's
  assert np.all(np.asarray(model.bn.mean[...]) != 0)


def _stats_bounds(model, x):
  """Rounding bounds ``(mean, var, loss)`` for two programs' clean passes of ``model`` on ``x`` (tests/tolerances.py).

  BatchNorm's batch mean is a 512-long mean of conv outputs, each a 9-term dot plus a bias, whose
  operands are at most ``M = max(conv(|x|; |w|, |b|))``: ``522`` steps at ``M``; its variance
  (``mean(h^2) - mean(h)^2``) twice that at ``M^2``. The loss runs through the normalization, which
  divides those errors by the batch's smallest standard deviation, then the 64-term dense layer,
  the softmax (exp, log) and the 32-long batch mean.
  """
  conv = nnx.clone(model.conv)
  conv.kernel[...] = jnp.abs(conv.kernel[...])
  conv.bias[...] = jnp.abs(conv.bias[...])
  m = float(jnp.max(conv(jnp.abs(x))))
  std = float(jnp.sqrt(jnp.min(model.bn.var[...]) + model.bn.epsilon))
  mean_bound, var_bound = f32_bound(m, n_ops=522), f32_bound(m * m, n_ops=2 * 522)
  return mean_bound, var_bound, f32_bound(1.0, n_ops=2 * 522 + 64 + 8 + 32) * m / std


def _ascent_pass(model, x, y, rho):
  """Loss and BatchNorm batch mean of a training-mode pass at ``p + rho g / |g|`` (SAM's ascent
  point): what a step that let an ascent pass write the model's state would leave (BatchNorm momentum 0)."""
  probe = nnx.clone(model)
  grads = nnx.as_pure(nnx.grad(loss_of_model, argnums=nnx.DiffState(0, nnx.Param))(nnx.clone(model), x, y))
  scale = rho / optax.tree.norm(grads)
  nnx.update(probe, jax.tree.map(lambda p, g: p + scale * g, nnx.as_pure(nnx.state(probe, nnx.Param)), grads))
  loss = loss_of_model(probe, x, y)
  return float(loss), probe.bn.mean[...]


def test_nnx_xsam_script():
  """A few jitted XSAM steps of the NNX classifier. Before each, a copy of the model takes a plain
  SGD step on the same batch: the XSAM step's RNG state equals the copy's bitwise, its loss and
  BatchNorm statistics within a rounding bound; the loss goes down; alpha moves only on probe steps.

  A bound, not bitwise: the two steps are different programs, which XLA may fuse, and so round,
  differently (a loss 1 ulp away, with other code generation). BatchNorm's momentum is 0 here, so
  the running statistics are the last training pass's batch statistics, and a leak (an ascent pass
  writing them) would move them by the whole gap between two passes' statistics: each step checks
  that the gap in the mean, and in the loss, exceeds twice its bound, so the bound can see a leak
  (the variance's bound, with its cancellation, is looser: it is checked, not relied on)."""
  model = CNN(nnx.Rngs(params=0, dropout=1), bn_momentum=0.0)
  optimizer = _xsam_optimizer(model)
  losses, alphas, probe_losses = [], [], []
  for step in range(8):
    x, y = _images(seed=step % 2)  # two batches, alternating
    twin, twin_loss = _plain_twin_step(model, x, y)
    leak_loss, leak_mean = _ascent_pass(model, x, y, rho=0.2)
    losses.append(float(xsam_step(model, optimizer, x, y)))
    mean_bound, var_bound, loss_bound = _stats_bounds(twin, x)
    np.testing.assert_allclose(losses[-1], float(twin_loss), rtol=0, atol=loss_bound, err_msg=str(step))
    np.testing.assert_allclose(model.bn.mean[...], twin.bn.mean[...], rtol=0, atol=mean_bound, err_msg=str(step))
    np.testing.assert_allclose(model.bn.var[...], twin.bn.var[...], rtol=0, atol=var_bound, err_msg=str(step))
    assert abs(leak_loss - float(twin_loss)) > 2 * loss_bound, step
    assert np.max(np.abs(leak_mean - twin.bn.mean[...])) > 2 * mean_bound, step
    _assert_bitwise_equal(nnx.as_pure(nnx.state(model, nnx.RngState)), nnx.as_pure(nnx.state(twin, nnx.RngState)))
    assert int(model.dropout.rngs.count[...]) == step + 1
    opt_state = nnx.as_pure(optimizer.opt_state)
    alphas.append(float(optax.tree.get(opt_state, "alpha")))
    probe_losses.append(np.asarray(optax.tree.get(opt_state, "probe_losses")))
  assert np.all(np.asarray(model.bn.mean[...]) != 0)  # running statistics move (not stuck at 0)
  assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
  # alpha: a grid point, set on the probe steps (0, 2, 4, 6) and kept in between. The first probe must
  # move it: alpha_init = 1.0 is not on the grid.
  assert alphas[0] != 1.0, alphas
  assert alphas[0] in ALPHAS, alphas
  for step in range(1, len(alphas)):
    if step % PERIOD:
      assert alphas[step] == alphas[step - 1], (step, alphas)
      np.testing.assert_array_equal(probe_losses[step], probe_losses[step - 1])
    else:
      assert not np.array_equal(probe_losses[step], probe_losses[step - 1]), step  # a new probe round


def test_loss_fn_is_pure_and_reuses_the_clean_pass_masks():
  """loss_fn(params) evaluated (twice, and differentiated) inside the step changes nothing in the
  model; at the model's own params it is the clean pass's loss, with the clean pass's dropout masks
  and batch statistics."""
  x, y = _images()
  model = CNN(nnx.Rngs(params=0, dropout=1))
  model_before = nnx.clone(model)

  @nnx.jit
  def probe(model, x, y):
    loss, grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(loss_of_model, model, x, y)
    params = nnx.as_pure(nnx.state(model, nnx.Param))  # what nnx.Optimizer hands to tx.update
    far = jax.tree.map(lambda w: w + 0.3, params)
    return loss, nnx.as_pure(grads), loss_fn(params), loss_fn(params), jax.grad(loss_fn)(params), loss_fn(far)

  loss, grads, first, second, grads_again, far = probe(model, x, y)
  twin, _ = _plain_twin_step(model_before, x, y)
  _assert_bitwise_equal(_non_trainable(model), _non_trainable(twin))  # the extra passes left no trace
  assert float(first) == float(second)
  # Two copies of the clean pass in one program, which XLA may fuse and round differently: within a
  # loss chain of ~1200 rounding steps (conv of 9, batch mean and mean square over 32 x 4 x 4 = 512,
  # a dot of 64, log-softmax and the mean over 32), and twice that for the gradient. Another dropout
  # mask moves this loss by 0.03 to 0.08.
  np.testing.assert_allclose(float(first), float(loss), rtol=0, atol=f32_bound(loss, n_ops=1200))
  for a, b in zip(jax.tree.leaves(grads_again), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=f32_bound(*jax.tree.leaves(grads), n_ops=2400))
  assert abs(float(far) - float(loss)) > 1e-3  # loss_fn does read its argument
  assert int(model.dropout.rngs.count[...]) == 1
  assert np.all(np.asarray(model.bn.mean[...]) != 0)


class RngArgCNN(CNN):
  """The same classifier taking an nnx.Rngs argument and returning logits as aux (LM-style scripts)."""

  def __call__(self, x, rngs=None):
    h = self.dropout(nnx.relu(self.bn(self.conv(x))), rngs=rngs)
    return self.out(h.reshape(h.shape[0], -1))


def test_rngs_argument_and_aux():
  """An nnx.Rngs passed as an argument is advanced by the clean pass only; has_aux=True returns the
  clean pass's (loss, aux) and loss_fn returns the loss alone."""
  x, y = _images()
  model = RngArgCNN(nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=7)
  optimizer = nnx.Optimizer(model, optax.chain(xsam_jax.sam(0.1), optax.sgd(0.1)), wrt=nnx.Param)

  def loss_and_logits(model, x, y, rngs):
    logits = model(x, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  @nnx.jit
  def step(model, optimizer, rngs, x, y):
    (loss, logits), grads, loss_fn = xsam_jax.flax.value_grad_and_loss_fn(
      loss_and_logits, model, x, y, rngs, has_aux=True
    )
    optimizer.update(model, grads, loss_fn=loss_fn)
    return loss, logits, loss_fn(nnx.as_pure(nnx.state(model, nnx.Param)))

  for i in range(3):
    loss, logits, after = step(model, optimizer, rngs, x, y)
    assert logits.shape == (32, 4)
    assert np.shape(after) == ()
    assert int(rngs.dropout.count[...]) == i + 1
  assert np.isfinite(float(loss))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4)(nn.relu(x))


class BNTrainState(xsam_jax.flax.TrainState):
  batch_stats: dict


def _linen_state(tx, x):
  variables = LinenNet().init(jax.random.key(0), x, train=False)
  return BNTrainState.create(
    apply_fn=LinenNet().apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
  )


def test_train_state_without_loss_fn_names_apply_gradients():
  x, _ = _images()
  state = _linen_state(optax.chain(xsam_jax.sam(0.05), optax.sgd(0.1)), x)
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(ValueError, match=r"apply_gradients\(grads=grads, loss_fn=loss_fn\)"):
    state.apply_gradients(grads=grads)


def test_train_state_plain_tx_is_flax_train_state():
  """With a plain optax tx (no loss_fn needed, or one given and ignored) it steps as Flax's TrainState."""
  from flax.training import train_state

  x, y = _images()
  ours = _linen_state(optax.adam(1e-2), x)
  flax_state = train_state.TrainState.create(apply_fn=ours.apply_fn, params=ours.params, tx=optax.adam(1e-2))

  def loss_fn(p):
    logits, _ = ours.apply_fn({"params": p, "batch_stats": ours.batch_stats}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = jax.grad(loss_fn)(ours.params)
  expected = flax_state.apply_gradients(grads=grads)
  for got in (ours.apply_gradients(grads=grads), ours.apply_gradients(grads=grads, loss_fn=loss_fn)):
    assert int(got.step) == 1
    # Exact by contract: the same optax update on the same inputs, op by op.
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params), strict=True):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("check", ["sync_batchnorm", "per_replica_batchnorm", "without_axis_name_is"])
def test_linen_train_state_pmap_checks(check):
  """tests/flax_pmap_checks.py on 8 CPU devices, one check per process (each compiles its own pmap
  steps): a Linen ResNet with BatchNorm in xsam_jax.flax.TrainState under jax.pmap."""
  proc = subprocess.run(
    [sys.executable, "-m", "tests.flax_pmap_checks", check],
    cwd=ROOT,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-20000:]
  assert f"ok check_{check}" in proc.stdout, out[-20000:]
  assert "ALL CHECKS PASSED" in proc.stdout, out[-20000:]


def test_docs_flax_has_the_recipes():
  assert len(DOC_BLOCKS) == 3
  assert "value_grad_and_loss_fn" in DOC_BLOCKS[0]
  assert all("xsam_jax.flax.TrainState" in block and "loss_fn=loss_fn" in block for block in DOC_BLOCKS[1:])
  assert 'axis_name="batch"' in DOC_BLOCKS[2]


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_docs_flax_example_runs(index, capsys):
  """Each recipe of docs/flax.md runs as written (the pmap one on this process's one device) and trains."""
  exec(compile(DOC_BLOCKS[index], f"docs/flax.md[python block {index}]", "exec"), {"__name__": "__docs__"})
  out = capsys.readouterr().out
  loss = float(re.search(r"loss (\S+)", out).group(1))
  assert 0 < loss < 0.6, out  # from log(2) = 0.69 at the start
