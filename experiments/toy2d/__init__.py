"""The 2-D test-function study (XSAM paper Sec. 5.1, Fig. 3a; Fig. 1b).

Runs plain gradient descent ("SGD": the function is deterministic, so there
is no gradient noise), SAM and XSAM, single-step and with K = 1..4 ascent
steps, from a grid of start points on :func:`xsam_jax.testfns.fisher_sam_toy`
(a sharp global minimum near (-16.8, 12.8) and a 7x flatter local minimum
near (19.8, 29.9)), over several (rho, rho_max, lr, alpha period) settings.
Each run ends either at one of the minima (the mean of its last 10% of
iterates within ``NEAR_RADIUS`` of it) or at neither: SAM and XSAM can stall at the saddle,
or at points where their update ``|g_K| * direction`` vanishes because the
ascent lands on a critical point although the gradient at the iterate does
not vanish, or keep bouncing around the ridge at large steps; those runs are
split by the plain-GD basin of their end point. The study also measures how
well each method's update direction points at the true loss maximum on the
neighbourhood circle (the question behind the paper's Fig. 1).

All start points and settings of one (method, K) pair run in one jitted
call: ``jax.vmap`` over settings and start points around a ``jax.lax.scan``
over optimizer steps. Everything is deterministic (no random numbers).

Usage::

  python -m experiments.toy2d            # full study  -> results/toy2d/
  python -m experiments.toy2d --quick    # < 1 minute  -> results/toy2d/quick/
  python -m experiments.toy2d --help     # a flag per field of Toy2dConfig

The study under the paper's base optimizer (issue 19, item 6): SGD, SAM and
XSAM K=1 on ``optax.sgd(lr, momentum)`` for momentum in {0, 0.9} x XSAM's
alpha update period in {1, 5, 20}, on 9 (rho, lr) settings, from every other
start point per axis (:func:`axes_sweep`, the ``axes`` section of the outputs).

In code: ``run(Toy2dConfig.quick(), out)``; ``axes_sweep(Toy2dConfig.quick())``
alone returns the momentum x period fractions and their markdown tables. The
package's modules: ``config`` (:class:`Toy2dConfig`, :class:`Setting`, the
command line), ``dynamics`` (the batched runs, where they end, update
directions), ``analysis`` (the study's measurements and outputs), ``axes``
(the momentum x period sweep) and ``plots``.

Outputs (in the output folder): ``toy2d.json`` (deterministic: fractions
per method and setting, direction errors, the axes sweep's fractions,
trajectory end points), ``toy2d_tables.md`` (the same fractions as markdown
tables), ``toy2d_timing.json`` (wall time), and PNGs ``toy2d_trajectories.png``,
``toy2d_fractions.png``, ``toy2d_outcomes.png``, ``toy2d_directions.png``,
``toy2d_axes.png``.
"""

from experiments.toy2d.analysis import headline_paths, markdown_tables, run, run_study
from experiments.toy2d.axes import axes_markdown, axes_sweep
from experiments.toy2d.config import COMMAND, Setting, Toy2dConfig
from experiments.toy2d.dynamics import (
  FLAT,
  LOSS,
  NEAR_RADIUS,
  OUTCOMES,
  SHARP,
  base_optimizer,
  direction_errors,
  method_list,
  outcome,
  run_grid,
  run_one,
  run_paths,
  settle,
  start_grid,
  true_max_direction,
  update_directions,
)
from experiments.toy2d.plots import plot_axes, plot_directions, plot_fractions, plot_outcomes, plot_trajectories

__all__ = [
  "COMMAND",
  "FLAT",
  "LOSS",
  "NEAR_RADIUS",
  "OUTCOMES",
  "SHARP",
  "Setting",
  "Toy2dConfig",
  "axes_markdown",
  "axes_sweep",
  "base_optimizer",
  "direction_errors",
  "headline_paths",
  "markdown_tables",
  "method_list",
  "outcome",
  "plot_axes",
  "plot_directions",
  "plot_fractions",
  "plot_outcomes",
  "plot_trajectories",
  "run",
  "run_grid",
  "run_one",
  "run_paths",
  "run_study",
  "settle",
  "start_grid",
  "true_max_direction",
  "update_directions",
]
