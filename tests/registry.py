"""Every transformation of the package, as the shared battery runs it.

A new method joins the battery by adding a line to ``CASES`` (a factory
with small hyperparameters) and, where it has numeric hyperparameters, to
``INJECT`` (factory, kwargs, static args for ``optax.inject_hyperparams``).
"""

import jax
import optax

import xsam_jax
from xsam_jax._src.eigen_sam import eigen_sam
from xsam_jax._src.friendly_sam import friendly_sam
from xsam_jax._src.gsam import gsam
from xsam_jax._src.looksam import looksam
from xsam_jax._src.multistep import lsam, msam
from xsam_jax._src.vasso import vasso
from xsam_jax._src.wsam import wsam

_WEIGHTS_ONLY = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # ASAM adapts weights only

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
}
