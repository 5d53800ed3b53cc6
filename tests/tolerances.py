"""Tolerances for float comparisons, derived from rounding-error bounds.

Two computations of one quantity along different code paths (jit and op by
op, vmap and lax.map, one device and eight, or one program on two CPUs with
other vector widths, FMA contraction or exp/tanh/log approximations) need
not round alike. So a tolerance comes from an error bound, never from the
output of one machine.

The bound (to first order; Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., 2002, chapters 2-3): with unit roundoff ``u = eps / 2``,
a value reached through a chain of ``n`` rounding steps whose operands are at
most ``M`` in magnitude is within ``n u M`` of the exact value, so two such
computations are within ``n eps M`` of each other. Counting ``n_ops``:

* a sum, mean or dot product of length ``m``: ``m`` steps;
* exp, log, tanh, sin, cos, arccos (XLA's CPU approximations are within a
  few ulps): 4 steps each;
* any other elementwise operation (+, -, *, /, sqrt): 1 step;
* a chain of computations: the sum of its steps.

``M`` is the size of what gets rounded, not of the result: a difference of
nearby numbers such as ``L(w + d) - L(w)`` keeps the absolute error of its
operands, and a dot product's error scales with ``sum |x_i y_i|``, not with
``|x . y|``. Where no such cancellation occurs (norms, products, quotients,
sums of terms of one sign) ``M`` is the result itself and the bound is
relative: ``rtol = n eps``.

A tolerance from these functions is ~1e-6 to 1e-4 of the values compared,
while the bugs the tests guard against (a wrong direction, scale or grid
point) move results by 1e-3 or more.
"""

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52 ~ 2.22e-16


def _max_abs(magnitudes):
  if not magnitudes:
    raise ValueError("give at least one magnitude")
  return max(float(np.max(np.abs(np.asarray(m, np.float64)))) for m in magnitudes)


def f32_bound(*magnitudes, n_ops):
  """Absolute tolerance ``n_ops * eps32 * M``; ``M``: the largest ``|value|`` in ``magnitudes`` (numbers, arrays)."""
  return n_ops * EPS32 * _max_abs(magnitudes)


def f32_rtol(n_ops):
  """Relative tolerance ``n_ops * eps32`` for results computed without cancellation."""
  return n_ops * EPS32


def f64_bound(*magnitudes, n_ops):
  """Absolute tolerance ``n_ops * eps64 * M``, as :func:`f32_bound` in float64."""
  return n_ops * EPS64 * _max_abs(magnitudes)


def assert_argmax_lead(losses, bound):
  """Asserts that the largest finite loss leads the runner-up by more than ``2 * bound``.

  XSAM's alpha is a grid point chosen by ``argmax`` over probe losses. Two
  code paths pick the same point, exactly, when each of their losses is
  within ``bound`` of the exact one and the winner leads by more than twice
  that; this checks that the test problem is not such a near-tie, so an
  exact comparison of alphas is a comparison of choices, not of rounding.
  """
  losses = np.sort(np.asarray(losses, np.float64)[np.isfinite(losses)])
  assert losses.size >= 2, losses
  lead = losses[-1] - losses[-2]
  assert lead > 2 * bound, f"probe losses nearly tie: lead {lead:.3g} <= 2 * rounding bound {bound:.3g}"


def assert_trees_within(a, b, atol):
  """Every leaf of ``a`` within ``atol`` (absolute) of the matching leaf of ``b``; the trees have one structure."""
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=atol), a, b)


def assert_trees_equal(a, b):
  """Bitwise equality of two trees, leaf by leaf (where equality is the contract: the same program, resume)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, n_ops):
  """Within ``n_ops`` float32 rounding steps of the largest entry of ``b`` (:func:`f32_bound`).

  For results whose every entry shares its operands (gradients sum over the
  whole batch, norms run over all parameters), so one bound serves the tree.
  """
  assert_trees_within(a, b, f32_bound(*jax.tree.leaves(b), n_ops=n_ops))
