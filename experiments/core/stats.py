"""The studies' statistics, in numpy only: Student's t quantiles, paired differences with t confidence intervals.

Used by the protocol and the language-model study.

The t quantile inverts the t distribution's CDF, written with the
regularized incomplete beta function (continued fraction, as in Numerical
Recipes' ``betacf``), by bisection; ``tests/test_protocol.py`` checks it
against published table values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
  """The continued fraction of the incomplete beta function (modified Lentz), converged to 1e-15."""
  tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    m2 = 2 * m
    for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def incomplete_beta(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
  return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """The CDF of Student's t distribution with ``df > 0`` degrees of freedom at ``t``."""
  tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`, to 1e-12)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p}")
  if df <= 0:
    raise ValueError(f"df must be > 0, got {df}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    hi *= 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


def summary(values: Sequence[float]) -> dict[str, float]:
  """``{"mean", "std" (ddof=1; 0 for one value), "n"}`` of ``values``."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
  """The paired difference ``a - b`` over matched seeds, with a t confidence interval and win counts.

  Args:
    a, b: one value per seed, in the same seed order.
    confidence: the interval's coverage.

  Returns:
    ``mean``, ``std`` (ddof=1), ``n``, ``low`` and ``high`` (``mean -+
    t_{(1+confidence)/2, n-1} std / sqrt(n)``; NaN for n < 2), ``wins``
    (``a > b``), ``ties`` and ``losses``.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"need two equal-length non-empty sequences, got {len(a)} and {len(b)}")
  mean = float(d.mean())
  if d.size > 1:
    std = float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, d.size - 1) * std / math.sqrt(d.size)
  else:
    std, half = 0.0, math.nan
  return {
    "mean": mean,
    "std": std,
    "n": int(d.size),
    "low": mean - half,
    "high": mean + half,
    "wins": int((d > 0).sum()),
    "ties": int((d == 0).sum()),
    "losses": int((d < 0).sum()),
  }
