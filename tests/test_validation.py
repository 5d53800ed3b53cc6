"""Bad input gets a clear ValueError naming the argument and its range."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(rho=0.0), r"`rho` must be a finite real number > 0"),
    (dict(rho=-1.0), r"`rho` must be a finite real number > 0"),
    (dict(rho=float("nan")), r"`rho`"),
    (dict(rho=float("inf")), r"`rho`"),
    (dict(rho="0.1"), r"`rho`"),
    (dict(rho=0.1, num_steps=0), r"`num_steps` must be an int >= 1"),
    (dict(rho=0.1, num_steps=1.5), r"`num_steps` must be a Python int >= 1"),
    (dict(rho=0.1, num_steps=True), r"`num_steps`"),
    (dict(rho=0.1, eta=-0.1), r"`eta` must be a finite real number >= 0"),
  ],
)
def test_sam_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.sam(**kwargs)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(rho=0.1, rho_max=0.0), r"`rho_max` must be a finite real number > 0"),
    (dict(rho=-0.1, rho_max=0.2), r"`rho`"),
    (dict(rho=0.1, rho_max=0.2, num_steps=0), r"`num_steps`"),
    (dict(rho=0.1, rho_max=0.2, alphas=()), r"`alphas` must be a non-empty 1-D sequence"),
    (dict(rho=0.1, rho_max=0.2, alphas=[0.0, float("nan")]), r"`alphas`"),
    (dict(rho=0.1, rho_max=0.2, alphas=[[0.0, 1.0]]), r"`alphas`"),
    (dict(rho=0.1, rho_max=0.2, alpha_init=float("inf")), r"`alpha_init` must be a finite real"),
    (dict(rho=0.1, rho_max=0.2, alpha_update_period=0), r"`alpha_update_period` must be None or an int >= 1"),
    (dict(rho=0.1, rho_max=0.2, alpha_update_period=2.5), r"`alpha_update_period`"),
    (dict(rho=0.1, rho_max=0.2, probe_batch_size=0), r"`probe_batch_size`"),
    (dict(rho=0.1, rho_max=0.2, probe_batch_size="fast"), r'`probe_batch_size` must be "auto", None or an int'),
    (dict(rho=0.1, rho_max=0.2, probe_memory_budget=0), r"`probe_memory_budget` must be an int >= 1"),
    (dict(rho=0.1, rho_max=0.2, probe_memory_budget=-(2**30)), r"`probe_memory_budget` must be an int >= 1"),
    (dict(rho=0.1, rho_max=0.2, probe_memory_budget=1e9), r"`probe_memory_budget` must be a Python int >= 1"),
    (dict(rho=0.1, rho_max=0.2, probe_memory_budget=True), r"`probe_memory_budget` must be a Python int >= 1"),
    (dict(rho=0.1, rho_max=0.2, probe_memory_budget="8GB"), r"`probe_memory_budget` must be a Python int >= 1"),
    (
      dict(rho=0.1, rho_max=0.2, probe_batch_size=4, probe_memory_budget=2**30),
      r'`probe_memory_budget` applies to `probe_batch_size="auto"` only',
    ),
    (dict(rho=0.1, rho_max=0.2, alpha_refinement="cubic"), r"`alpha_refinement` must be one of"),
    (
      dict(rho=0.1, rho_max=0.2, alphas=[0.0, 2.0, 1.0], alpha_refinement="parabola"),
      r"`alphas` must be strictly increasing",
    ),
  ],
)
def test_xsam_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.xsam(**kwargs)


@pytest.mark.parametrize("make", [lambda: xsam_jax.sam(0.1), lambda: xsam_jax.xsam(0.1, 0.2)])
def test_update_without_loss_fn_or_params_explains_the_call(make):
  tx = make()
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"needs `loss_fn`.*tx.update\(grads, state, params, loss_fn=loss_fn\)"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match=r"needs `params`"):
    tx.update(params, state, loss_fn=lambda p: jnp.sum(p["w"]))
  chained = optax.chain(make(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"needs `params` and `loss_fn`"):
    chained.update(params, chained.init(params))


def test_numpy_and_jax_scalars_are_accepted():
  xsam_jax.sam(np.float32(0.1), num_steps=np.int64(2))
  xsam_jax.xsam(jnp.asarray(0.1), np.float64(0.2), alpha_update_period=np.int32(5))
