"""Every transformation of the package, as the shared battery runs it.

A new method joins the battery by adding a line to ``CASES`` (a factory
with small hyperparameters) and, where it has numeric hyperparameters, to
``INJECT`` (factory, kwargs, static args for ``optax.inject_hyperparams``).
"""

import jax
import optax

import xsam_jax
from xsam_jax._src import validation
from xsam_jax._src.eigen_sam import eigen_sam
from xsam_jax._src.friendly_sam import friendly_sam
from xsam_jax._src.functional_sam import functional_sam
from xsam_jax._src.gsam import gsam
from xsam_jax._src.looksam import looksam
from xsam_jax._src.multistep import lsam, msam
from xsam_jax._src.preconditioned_sam import preconditioned_sam
from xsam_jax._src.rwp import rwp
from xsam_jax._src.vasso import vasso
from xsam_jax._src.wsam import wsam

_WEIGHTS_ONLY = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # ASAM adapts weights only


def _identity(outputs):
  """The output loss of the battery's split: the model's output is the loss itself."""
  return outputs


def from_loss(tx):
  """``functional_sam`` called as the battery calls every method, ``update(..., loss_fn=loss_fn)``.

  The battery's problems are losses, not models: the only split of a given ``loss_fn`` into ``model_fn`` and
  ``output_loss_fn`` is ``model_fn = loss_fn`` and ``output_loss_fn = identity`` (the "outputs" are the loss),
  a loss linear in its outputs, where Functional SAM's output equals SAM's (preconditioned: equals
  ``preconditioned_sam``'s). So the battery checks the plumbing (jit, dtypes, hostile gradients, state,
  wrappers, aux, inject_hyperparams) on the real code path, the vector-Jacobian product included; the
  functional-path numerics, on a model with a nonlinear output loss, are checked against the float64
  reference in tests/test_functional_sam.py.
  """

  def update(updates, state, params=None, *, loss_fn=None, **extra_args):
    if loss_fn is not None and params is not None:  # the adapter takes `loss_fn`: it names it, as every method does
      validation.check_loss_output("functional_sam.update", "loss_fn", jax.eval_shape(loss_fn, params))
    return tx.update(updates, state, params, model_fn=loss_fn, output_loss_fn=_identity, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def functional_sam_from_loss(rho, *, precondition=False, b2=0.999, eps=1e-8, perturb_every=1):
  """:func:`from_loss` of ``functional_sam``, as a factory ``optax.inject_hyperparams`` can read."""
  return from_loss(functional_sam(rho, precondition=precondition, b2=b2, eps=eps, perturb_every=perturb_every))


# The XSAM cases' radii make every probe round of the battery's problems (mlp_problem, seeds 11-18)
# pick its alpha with a lead of over 3x the rounding bound (tests/tolerances.py: assert_argmax_lead):
# at rho_max = 2 rho the best probes tied to float32 rounding, so two code paths could pick either.
CASES = {
  "sam": lambda: xsam_jax.sam(0.1),
  "sam_k3": lambda: xsam_jax.sam(0.1, num_steps=3),
  "xsam": lambda: xsam_jax.xsam(0.1, 1.0, alpha_update_period=2),
  "xsam_k3_chunked": lambda: xsam_jax.xsam(0.1, 1.0, num_steps=3, alpha_update_period=1, probe_batch_size=4),
  "xsam_fixed_alpha": lambda: xsam_jax.xsam(0.1, 0.2, alpha_update_period=None, alpha_init=0.5),
  "xsam_asam": lambda: xsam_jax.xsam(0.2, 2.0, alpha_update_period=2, adaptive=True),
  "msam_plus_k2": lambda: msam(0.1, num_steps=2, plus=True),
  "lsam_plus_asam_k2": lambda: lsam(0.2, num_steps=2, plus=True, adaptive=True, adaptive_mask=_WEIGHTS_ONLY),
  "vasso": lambda: vasso(0.1, theta=0.4),
  "vasso_asam": lambda: vasso(0.2, theta=0.4, adaptive=True, adaptive_mask=_WEIGHTS_ONLY),
  "eigen_sam": lambda: eigen_sam(0.1, alpha=0.5, eig_update_period=2, power_iterations=3),
  "eigen_sam_asam_k2": lambda: eigen_sam(
    0.2, alpha=0.5, eig_update_period=2, power_iterations=3, num_steps=2, adaptive=True
  ),
  "gsam": lambda: gsam(0.1, alpha=0.5),  # with ASAM: tests/test_sam_variants.py (float64 reference)
  "wsam": lambda: wsam(0.1, gamma=0.7),
  # The decoupled form with an identity base optimizer: g_0 - lr_t gamma/(1-gamma) (g_1 - g_0), a gradient-sized
  # output like every other case's, through the base-optimizer state and the learning-rate schedule.
  "wsam_decoupled": lambda: wsam(
    0.1, gamma=0.6, base_optimizer=optax.identity(), learning_rate=optax.linear_schedule(0.5, 0.1, 4)
  ),
  "friendly_sam": lambda: friendly_sam(0.1, sigma=1.0, lmbda=0.6),
  # k = 2: the battery's 2- and 3-step runs take SAM's step, then reuse g_v (no extra pass), then SAM's again.
  "looksam": lambda: looksam(0.1, k=2, alpha=0.7),
  # perturb_start = 1: the first call reuses the zero g_v (outputs g_0), the second perturbs; ASAM on weights.
  "looksam_asam_start1": lambda: looksam(
    0.2, k=2, alpha=0.5, adaptive=True, adaptive_mask=_WEIGHTS_ONLY, perturb_start=1
  ),
  # RWP draws its noise from the key in its state: every battery run from init draws the same noise.
  "rwp": lambda: rwp(0.05, alpha=0.5),
  "rwp_pure_torch_layout": lambda: rwp(0.1, alpha=1.0, seed=3, filter_axis=0),  # g_eps alone
  # eps = 0: Adam's eps is an absolute gradient scale below which the ascent turns into SAM's, which the
  # battery's scale tests (1e-30 .. 2^127 times the loss) would see; eps > 0: tests/test_preconditioned_sam.py.
  "preconditioned_sam": lambda: preconditioned_sam(0.1, b2=0.9, eps=0.0),
  # Called with loss_fn through from_loss (model_fn = loss_fn, output_loss_fn = identity; see its docstring).
  "functional_sam": lambda: functional_sam_from_loss(0.1),
  # The paper's preconditioned Functional SAM; perturb_every = 2: the second battery step reuses g_0.
  "functional_sam_preconditioned": lambda: functional_sam_from_loss(
    0.1, precondition=True, b2=0.9, eps=0.0, perturb_every=2
  ),
}

INJECT = {
  "sam": (xsam_jax.sam, dict(rho=0.1, num_steps=2), ("num_steps",)),
  # A coarse alpha grid and rho_max as in CASES: no near-ties between two compilations of the same
  # maths (injected vs plain).
  "xsam": (
    xsam_jax.xsam,
    dict(rho=0.1, rho_max=1.0, alpha_update_period=2, alphas=(0.0, 0.5, 1.0, 1.5, 2.0)),
    ("num_steps",),
  ),
  "xsam_asam": (
    xsam_jax.xsam,
    dict(eta=0.05, rho=0.2, rho_max=2.0, alpha_update_period=2, adaptive=True),  # no near-ties (see CASES)
    ("num_steps", "adaptive"),
  ),
  "msam": (msam, dict(rho=0.1, num_steps=2), ("num_steps", "plus")),
  "vasso": (vasso, dict(rho=0.1, theta=0.4), ()),
  "eigen_sam": (eigen_sam, dict(alpha=0.5, rho=0.1, eig_update_period=2), ("power_iterations", "num_steps", "seed")),
  # The method's own hyperparameter first: the battery doubles the first non-static one.
  "gsam": (gsam, dict(alpha=0.5, rho=0.1), ()),
  "wsam": (wsam, dict(gamma=0.3, rho=0.1), ()),
  "friendly_sam": (friendly_sam, dict(sigma=1.0, rho=0.1, lmbda=0.6), ()),
  # k injected too (a traced int period): the factory then decides per call under jax.lax.cond.
  "looksam": (looksam, dict(alpha=0.7, rho=0.1, k=2), ()),
  "rwp": (rwp, dict(gamma=0.05, alpha=0.5, seed=1), ("seed", "filter_axis")),
  "preconditioned_sam": (preconditioned_sam, dict(b2=0.4, rho=0.1, eps=1e-3), ()),
  "functional_sam": (
    functional_sam_from_loss,
    dict(rho=0.1, b2=0.4, eps=1e-3, precondition=True),
    ("precondition", "perturb_every"),
  ),
}

# Whole optimizers called without `loss_fn` (`tx.update(grads, state, params)`, output: the update), which the
# battery above cannot run: it passes `loss_fn`, puts a base optimizer after the method, expects a gradient-sized
# output and `perturbed_loss` in the state, and requires optax.MultiSteps around the method to be an error.
# tests/test_plain_battery.py runs these instead (jit, dtypes, hostile gradients, wrappers, inject_hyperparams).
# Each entry is (factory, kwargs): the battery also builds the factory with rho=0 (the base optimizer).
PLAIN_OPTIMIZERS = {
  "momentum_sam": (xsam_jax.momentum_sam, dict(rho=0.1, learning_rate=0.05, momentum=0.9)),
  "momentum_sam_schedules_wd": (
    xsam_jax.momentum_sam,
    dict(
      rho=optax.linear_schedule(0.2, 0.05, 4),
      learning_rate=optax.cosine_decay_schedule(0.1, 4),
      momentum=0.5,
      weight_decay=1e-3,
    ),
  ),
  "momentum_sam_adamw": (xsam_jax.momentum_sam_adamw, dict(rho=0.1, learning_rate=0.01, weight_decay=1e-2)),
}

# (factory, kwargs, static args) for optax.inject_hyperparams; the battery doubles rho.
PLAIN_INJECT = {
  "momentum_sam": (xsam_jax.momentum_sam, dict(rho=0.1, learning_rate=0.05, momentum=0.9, weight_decay=1e-3), ()),
  "momentum_sam_adamw": (
    xsam_jax.momentum_sam_adamw,
    dict(rho=0.1, learning_rate=0.01, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2),
    (),
  ),
}
