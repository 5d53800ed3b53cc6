"""Sharpness at the end of training: SGD vs SAM vs XSAM (the XSAM paper's Hessian claim).

Trains a small MLP with SGD, SAM and XSAM (same data order, initialization
and base optimizer per seed), then measures on the final parameters, with
``xsam_jax.sharpness``:

* the five largest Hessian eigenvalues of the training loss (the full
  training set, no weight decay term): ``lambda_max`` and
  ``lambda_1 / lambda_5``, as the paper reports them;
* average sharpness: the mean of ``L(w + rho d) - L(w)`` over random
  filter-normalized directions ``d`` (Li et al. 2018; biases not perturbed),
  the same directions for every model;
* XSAM's search plane at the final parameters (the paper's Fig. 1a): theta,
  the probed alpha*, and a contour picture with the SGD, SAM and XSAM
  directions; and a random filter-normalized plane per model.

The paper's claim checked here: "Hessian top eigenvalue at the end of
training: SGD > SAM > XSAM".

The training loop is self-contained (pure-function MLP, optax, one
``jax.lax.scan`` per epoch) so the Hessian is that of a plain function of the
parameters (no BatchNorm state).

Usage::

  python -m experiments.sharpness_study           # full study (MNIST-1D) -> results/sharpness/
  python -m experiments.sharpness_study --quick   # < 1 minute (digits)   -> results/sharpness/quick/
  python -m experiments.sharpness_study --help    # a flag per field of SharpnessConfig

In code: ``run(SharpnessConfig.quick(), out)``. The package's modules:
``config`` (:class:`SharpnessConfig`, the command line), ``dynamics`` (data,
the MLP, training), ``analysis`` (the measurements and outputs) and ``plots``.

Outputs: ``sharpness.json`` (config, per-seed metrics, summary, timing),
``sharpness.md`` (the table), ``plane_xsam.png`` (Fig. 1a style, one panel
per optimizer) and ``plane_random.png`` (random filter-normalized planes).
"""

from experiments.sharpness_study.analysis import METRICS, claim_check, markdown_table, measure, run
from experiments.sharpness_study.config import COMMAND, SharpnessConfig
from experiments.sharpness_study.dynamics import (
  METHODS,
  accuracy,
  apply_mlp,
  init_mlp,
  load_data,
  make_loss_fn,
  train,
)
from experiments.sharpness_study.plots import plot_planes

__all__ = [
  "COMMAND",
  "METHODS",
  "METRICS",
  "SharpnessConfig",
  "accuracy",
  "apply_mlp",
  "claim_check",
  "init_mlp",
  "load_data",
  "make_loss_fn",
  "markdown_table",
  "measure",
  "plot_planes",
  "run",
  "train",
]
