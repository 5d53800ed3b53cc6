"""SAM and XSAM equal the independent float64 numpy reference (tests/reference.py) to 1e-10; the other
methods: tests/test_reference_family.py and the methods' own files.

The tolerance is a rounding bound (tests/tolerances.py): a training step chains ~500 float64 rounding
steps (K + 1 gradients, a probe loss, norms over the parameters), 6 steps with lr 0.05 and momentum
0.9 move the params by less than that times eps64 * |w| (~2): ~2e-13, far below 1e-10. Alphas are
grid points whose float64 probe losses lead by ~1e-5, not near-ties at 1e-13, so they match exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax
from tests import problems, reference

STEPS = 6
ALPHAS = xsam_jax.DEFAULT_ALPHAS
HP = dict(rho=0.4, lr=0.05, momentum=0.9, wd=5e-4)


def _jax_train(tx0, problem, p0, steps=STEPS):
  """Runs ``tx0`` (chained as the reference is) in float64 on ``problem`` from ``p0``.

  Returns the final flat params, the final state and the alphas per step."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
    out, state, alphas = _run_jax(tx0, params, problems.mlp_loss_fn(problem, jnp.float64), steps)
    return reference.MLP.flatten(jax.tree.map(np.asarray, out)), state, alphas


def _run_jax(tx0, params, loss_fn, steps, *, chained=True):
  """``steps`` jitted steps of ``tx0`` chained with the reference's base optimizer (``chained=False``:
  ``tx0`` is the whole optimizer, e.g. WSAM's decoupled form). Returns (params, state, alphas)."""
  tx = tx0
  if chained:
    tx = optax.chain(tx0, optax.add_decayed_weights(HP["wd"]), optax.sgd(HP["lr"], momentum=HP["momentum"]))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, u), s

  alphas = []
  for _ in range(steps):
    params, state = step(params, state)
    if hasattr(state[0], "alpha"):
      alphas.append(float(state[0].alpha))
  return params, state, alphas


@pytest.mark.parametrize("k_steps", [1, 3])
@pytest.mark.parametrize(
  ("period", "alpha_init"),
  [(None, 0.7), (None, 1.6), (1, 1.0), (3, 1.0)],
  ids=["fixed0.7", "fixed1.6", "probe-every-step", "probe-every-3"],
)
def test_xsam_matches_float64_reference(k_steps, period, alpha_init):
  problem, p0 = problems.mlp_data(seed=1)
  w_ref, alphas_ref = reference.train(
    problem,
    reference.MLP.flatten(p0),
    STEPS,
    method="xsam",
    k_steps=k_steps,
    rho_max=2 * HP["rho"],
    alphas=np.asarray(ALPHAS),
    alpha_init=alpha_init,
    period=period,
    **HP,
  )
  tx0 = xsam_jax.xsam(HP["rho"], 2 * HP["rho"], num_steps=k_steps, alpha_init=alpha_init, alpha_update_period=period)
  w, state, alphas = _jax_train(tx0, problem, p0)
  assert alphas == alphas_ref
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
  assert int(state[0].count) == STEPS
  if period is not None:
    # The test exercises real searches: the probes did not all pick an endpoint.
    assert any(0.0 < a < 2.0 for a in alphas_ref) or len(set(alphas_ref)) > 1


@pytest.mark.parametrize("k_steps", [1, 3])
def test_xsam_parabola_refinement_matches_float64_reference(k_steps):
  problem, p0 = problems.mlp_data(seed=1)
  coarse = (0.0, 0.5, 1.0, 1.5, 2.0)
  w_ref, alphas_ref = reference.train(
    problem,
    reference.MLP.flatten(p0),
    STEPS,
    method="xsam",
    k_steps=k_steps,
    rho_max=2 * HP["rho"],
    alphas=np.asarray(coarse),
    period=2,
    refine="parabola",
    **HP,
  )
  tx0 = xsam_jax.xsam(
    HP["rho"], 2 * HP["rho"], num_steps=k_steps, alphas=coarse, alpha_update_period=2, alpha_refinement="parabola"
  )
  w, _, alphas = _jax_train(tx0, problem, p0)
  # Refined alphas are off the grid (the test exercises the refinement) and
  # agree to float32 rounding (both are stored as float32).
  assert any(a not in coarse for a in alphas_ref)
  np.testing.assert_allclose(alphas, alphas_ref, rtol=0, atol=2e-7)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k_steps", [1, 3])
def test_sam_matches_float64_reference(k_steps):
  problem, p0 = problems.mlp_data(seed=2)
  w_ref, _ = reference.train(problem, reference.MLP.flatten(p0), STEPS, method="sam", k_steps=k_steps, **HP)
  w, _, _ = _jax_train(xsam_jax.sam(HP["rho"], num_steps=k_steps), problem, p0)
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)


def test_reference_gradient_is_right():
  """The hand-derived reference gradient agrees with central differences."""
  problem, p0 = problems.mlp_data(seed=3)
  w = reference.MLP.flatten(p0)
  g = problem.grad(w)
  h = 1e-6
  fd = np.array([(problem.loss(w + h * e) - problem.loss(w - h * e)) / (2 * h) for e in np.eye(w.size)])
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
