"""Preconditioned SAM (xsam_jax.preconditioned_sam): the float64 numpy reference over several training steps,
SAM under a constant preconditioner, the zero radius, the scaled second moment, validation.

The battery (tests/test_battery.py, tests/registry.py) runs it with eps = 0; here eps > 0 too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference
from tests.test_reference_sam_xsam import HP
from tests.test_reference_sam_xsam import _jax_train as jax_train_f64
from tests.tolerances import assert_trees_equal, assert_trees_within, f32_bound, f32_rtol, f64_bound

STEPS = 5
BASE = dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"])
RHO = HP["rho"]
# Rounding steps (tests/tolerances.py) of one step, as the battery counts them (tests/test_battery.py): up to 4
# gradients and 10 norms or dot products, plus the preconditioner's few element-wise operations (< NUM_PARAMS);
# the base optimizer sums the outputs of the steps with weights below 6 (momentum 0.9) times lr = 0.05, so the
# params after STEPS steps are within STEPS such bounds (the error a step leaves in w moves the next gradient by
# its Hessian times it, ~1, times lr).
STEP_OPS = 10 * problems.LOSS_OPS + 11 * problems.NUM_PARAMS
TRAIN_OPS = STEPS * STEP_OPS


def _ref_train(problem, p0, b2, eps):
  return reference.run(
    reference.MLP.flatten(p0),
    STEPS,
    lambda w, count, nu: reference.preconditioned_sam_output(problem.grad, w, RHO, b2, eps, count, nu),
    **BASE,
  )


@pytest.mark.parametrize(("b2", "eps"), [(0.999, 1e-8), (0.9, 0.0), (0.5, 0.3)])
def test_matches_reference(b2, eps):
  problem, p0 = problems.mlp_data(seed=41)
  w_ref, nu_ref = _ref_train(problem, p0, b2, eps)
  w, state, _ = jax_train_f64(xsam_jax.preconditioned_sam(RHO, b2=b2, eps=eps), problem, p0, STEPS)
  bound = f64_bound(w_ref, n_ops=TRAIN_OPS)
  assert_trees_within(w, w_ref, bound)
  nu = reference.MLP.flatten(jax.tree.map(np.asarray, state[0].nu)) * 4.0 ** int(state[0].nu_exp)
  assert_trees_within(nu, nu_ref, f64_bound(nu_ref, n_ops=TRAIN_OPS))


def test_constant_preconditioner_is_sam():
  """eps = 1e30: P = sqrt(v_hat) + eps is eps exactly in float32 (sqrt(v_hat) ~ 1 is far below half an ulp of
  1e30), a constant: the ascent is g / |g|, SAM's, to the rounding of one division per coordinate."""
  params, loss_fn = problems.mlp_problem(seed=42)
  g = jax.grad(loss_fn)(params)
  outs = []
  for tx in (xsam_jax.preconditioned_sam(0.1, eps=1e30), xsam_jax.sam(0.1)):
    state = tx.init(params)
    step = jax.jit(lambda s, tx=tx: tx.update(g, s, params, loss_fn=loss_fn))
    for _ in range(3):
      out, state = step(state)
    outs.append(out)
  assert_trees_within(outs[0], outs[1], f32_bound(*jax.tree.leaves(outs[1]), n_ops=2 * problems.LOSS_OPS))


@pytest.mark.parametrize("inject", [False, True], ids=["schedule", "inject_hyperparams"])
def test_zero_radius_outputs_g0_bitwise(inject):
  params, loss_fn = problems.mlp_problem(seed=43)
  g = jax.grad(loss_fn)(params)
  if inject:  # built with rho > 0 (checked), then set to 0 in the state
    tx = optax.inject_hyperparams(xsam_jax.preconditioned_sam)(rho=0.1)
    state = tx.init(params)
    state.hyperparams["rho"] = jnp.zeros_like(state.hyperparams["rho"])
  else:
    tx = xsam_jax.preconditioned_sam(optax.constant_schedule(0.0))
    state = tx.init(params)
  out, state = jax.jit(lambda s: tx.update(g, s, params, loss_fn=loss_fn))(state)
  assert_trees_equal(out, g)


def test_second_moment_survives_scales_beyond_float32():
  """Gradients of 3e38 (squares beyond float32's range) and of 1e-30 (squares below its smallest normal):
  the moment is held as mantissas times 4^nu_exp, and the direction with eps = 0 is the same at any
  power-of-two scale of the loss, bitwise."""
  params, loss_fn = problems.mlp_problem(seed=44)
  tx = xsam_jax.preconditioned_sam(0.1, b2=0.9, eps=0.0)

  def run(scale):
    scaled = lambda p: scale * loss_fn(p)
    state, outs = tx.init(params), []
    step = jax.jit(lambda s: tx.update(jax.grad(scaled)(params), s, params, loss_fn=scaled))
    for _ in range(3):
      out, state = step(state)
      outs.append(out)
    return outs, state

  base, s1 = run(1.0)
  for scale in (2.0**100, 2.0**-100):
    outs, state = run(scale)
    assert np.all(np.isfinite(np.asarray(state.nu_exp)))
    assert int(state.nu_exp) != int(s1.nu_exp)
    for a, b in zip(outs, base, strict=True):
      assert_trees_within(jax.tree.map(lambda x, s=scale: x / s, a), b, f32_bound(*jax.tree.leaves(b), n_ops=64))
    moment = lambda s: [np.asarray(x, np.float64) * 4.0 ** int(s.nu_exp) for x in jax.tree.leaves(s.nu)]
    for a, b in zip(moment(state), moment(s1), strict=True):  # scale^2 times the moment: powers of two, exact
      np.testing.assert_allclose(a / scale**2, b, rtol=f32_rtol(4))


def test_default_eps_is_adams():
  """With Adam's eps = 1e-8, gradients far below it are ascended along as by SAM (P ~ eps I)."""
  params, loss_fn = problems.mlp_problem(seed=45)
  tiny = lambda p: 1e-14 * loss_fn(p)
  g = jax.grad(tiny)(params)
  outs = []
  for tx in (xsam_jax.preconditioned_sam(0.1), xsam_jax.sam(0.1)):
    out, _ = tx.update(g, tx.init(params), params, loss_fn=tiny)
    outs.append(out)
  assert_trees_within(outs[0], outs[1], 1e-6 * max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(outs[1])))


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(b2=1.0), "b2"),
    (dict(b2=-0.1), "b2"),
    (dict(b2=float("nan")), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(rho=0.0), "rho"),
  ],
)
def test_validation_names_the_argument(kwargs, name):
  args = dict(rho=0.1) | kwargs
  with pytest.raises(ValueError, match=rf"`{name}`"):
    xsam_jax.preconditioned_sam(**args)
