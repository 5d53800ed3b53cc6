"""2-D test functions with a sharp and a flat minimum.

The function used by the XSAM paper (Chen & Zhou 2026, Sec. 5.1, Fig. 3a),
taken from Fisher-SAM (Kim et al. 2022): a negative log mixture of two
"Gaussian-KL" bumps over the parameters ``(mu, s)`` of a 1-D Gaussian
``N(mu, s^2)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_S_FLOOR = 0.1
"""Below this ``s`` the ``log s`` of the KL is continued linearly (see
:func:`gaussian_kl`); the published function is unchanged for ``s >= 0.1``."""

# (weight, mean, std, temperature) of the two mixture components.
_FLAT_COMPONENT = (0.7, 20.0, 30.0, 1.8)
_SHARP_COMPONENT = (0.3, -20.0, 10.0, 1.2)


class CriticalPoint(NamedTuple):
  """A critical point of a 2-D test function, found numerically in float64.

  Attributes:
    location: ``(mu, s)``, to 7 decimals.
    value: the function value there.
    hessian_eigenvalues: ascending eigenvalues of the Hessian there.
  """

  location: tuple[float, float]
  value: float
  hessian_eigenvalues: tuple[float, float]


FLAT_MINIMUM = CriticalPoint((19.8100639, 29.9366210), 0.356446928, (3.260753e-4, 6.813517e-4))
"""The flat (local, higher) minimum of :func:`fisher_sam_toy`."""

SHARP_MINIMUM = CriticalPoint((-16.8047440, 12.8025435), 0.275229654, (2.377080e-3, 4.868851e-3))
"""The sharp (global, lower) minimum of :func:`fisher_sam_toy`."""

SADDLE_POINT = CriticalPoint((0.3103362, 22.4990383), 0.397668184, (-8.316723e-4, 1.060354e-3))
"""The saddle between the two basins of :func:`fisher_sam_toy`."""


def _check_floor(s_floor: Any) -> float:
  try:
    value = float(s_floor)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"`s_floor` must be a finite Python number > 0, got {s_floor!r}.")
  return value


def _log_floor(s: jax.Array, s_floor: float) -> jax.Array:
  """``log s`` for ``s >= s_floor``; its tangent line at ``s_floor`` below.

  C1 in ``s``, finite for every real ``s``; the unused branch never sees a
  non-positive argument, so gradients stay finite too.
  """
  safe = jnp.maximum(s, s_floor)
  return jnp.where(s >= s_floor, jnp.log(safe), math.log(s_floor) + (s - s_floor) / s_floor)


def gaussian_kl(
  mu: jax.typing.ArrayLike, s: jax.typing.ArrayLike, m: float, t: float, *, s_floor: float = DEFAULT_S_FLOOR
) -> jax.Array:
  r"""KL divergence between two 1-D Gaussians, extended to all real ``s``.

  .. math::

    \mathrm{KL}(\mathcal N(\mu, s^2) \,\|\, \mathcal N(m, t^2))
      = \log\frac{t}{s} + \frac{s^2 + (\mu - m)^2}{2 t^2} - \frac12 .

  For ``s < s_floor`` the ``log s`` term is replaced by its tangent line at
  ``s_floor``, so the result is finite and continuously differentiable on
  the whole plane and keeps growing as ``s`` decreases (its ``s``-gradient is
  ``-1/s_floor`` there, as at ``s = s_floor``). For ``s >= s_floor`` it is
  the exact KL.

  Args:
    mu: mean of the first Gaussian (array).
    s: standard deviation of the first Gaussian (array; exact for
      ``s >= s_floor``).
    m: mean of the second Gaussian.
    t: standard deviation of the second Gaussian, > 0.
    s_floor: where the linear continuation of ``log s`` starts, > 0.

  Returns:
    The KL divergence, broadcast from ``mu`` and ``s``, in their dtype
    promoted to at least float32.

  Example:
    >>> import jax.numpy as jnp
    >>> float(gaussian_kl(jnp.float32(0.0), jnp.float32(1.0), 0.0, 1.0))
    0.0
  """
  s_floor = _check_floor(s_floor)
  mu = jnp.asarray(mu)
  s = jnp.asarray(s)
  dtype = jnp.result_type(mu, s, jnp.float32)
  mu, s = mu.astype(dtype), s.astype(dtype)
  kl = math.log(t) - _log_floor(s, s_floor) + (jnp.square(s) + jnp.square(mu - m)) / (2.0 * t * t) - 0.5
  return kl.astype(dtype)


def fisher_sam_toy(params: jax.typing.ArrayLike, *, s_floor: float = DEFAULT_S_FLOOR) -> jax.Array:
  r"""The 2-D test function of Fisher-SAM, used by XSAM (Sec. 5.1, Fig. 3a).

  With ``params = (mu, s)`` the parameters of a Gaussian ``N(mu, s^2)`` and
  :func:`gaussian_kl` the KL divergence,

  .. math::

    f(\mu, s) = -\log\Big(
        0.7\, e^{-\mathrm{KL}(\mathcal N(\mu, s^2)\|\mathcal N(20, 30^2)) / 1.8^2}
      + 0.3\, e^{-\mathrm{KL}(\mathcal N(\mu, s^2)\|\mathcal N(-20, 10^2)) / 1.2^2}
    \Big),

  computed as ``-logaddexp(log 0.7 - KL_1 / 1.8^2, log 0.3 - KL_2 / 1.2^2)``
  so that no term under- or overflows.

  Critical points (Newton's method on ``jax.hessian`` in float64, checked
  against ``scipy.optimize`` and float64 finite differences in the tests):

  ================  ==========================  ===========  ==========================
  point             (mu, s)                     f            Hessian eigenvalues
  ================  ==========================  ===========  ==========================
  flat minimum      (19.8100639, 29.9366210)    0.356446928  3.260753e-4, 6.813517e-4
  sharp minimum     (-16.8047440, 12.8025435)   0.275229654  2.377080e-3, 4.868851e-3
  saddle            (0.3103362, 22.4990383)     0.397668184  -8.316723e-4, 1.060354e-3
  ================  ==========================  ===========  ==========================

  The sharp minimum is the *global* one (lower loss) and is about 7x sharper
  (top eigenvalue 4.87e-3 vs 6.81e-4; trace 7.25e-3 vs 1.01e-3). Its stiff
  direction is almost the ``s`` axis (eigenvector (0.18, 0.98)). The barrier
  to the saddle is 0.122 from the sharp minimum and 0.041 from the flat one;
  both minima are about 20 units from the saddle, so a SAM radius ``rho`` of
  a few units is "meaningful" here (the function's scale is that of the
  Gaussians' parameters, not 1).

  Domain: the function is defined for ``s > 0``; ``f -> +inf`` (like
  ``-log(s) / 1.8^2``) as ``s -> 0+``. So that ascent points and iterates
  that step across ``s = 0`` stay finite, ``log s`` is continued by its
  tangent line below ``s_floor`` (default 0.1; see :func:`gaussian_kl`): the
  value and gradient are finite (no NaN or Inf) for every real ``(mu, s)``,
  the function is C1, and the gradient keeps pointing back towards ``s > 0``.
  For ``s >= s_floor`` it is the published function exactly. Nothing is
  reparametrised: optimizers act on ``(mu, s)`` directly, as in the papers.

  Args:
    params: array of shape ``(..., 2)``: ``params[..., 0] = mu`` and
      ``params[..., 1] = s``; any float dtype (float32 is accurate enough for
      optimization; use float64 for Hessians to many digits).
    s_floor: start of the linear continuation of ``log s``, a Python number
      > 0 (``ValueError`` otherwise).

  Returns:
    ``f`` with shape ``params.shape[:-1]``, computed and returned in
    ``params``' dtype promoted to at least float32 (bf16, f16 and integer
    inputs give float32; float64 stays float64).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> from xsam_jax import testfns
    >>> x = jnp.array([-10.0, 20.0])
    >>> tx = optax.chain(xsam_jax.sam(rho=2.0), optax.sgd(50.0))
    >>> state = tx.init(x)
    >>> g = jax.grad(testfns.fisher_sam_toy)(x)
    >>> u, state = tx.update(g, state, x, loss_fn=testfns.fisher_sam_toy)
    >>> bool(jnp.all(jnp.isfinite(optax.apply_updates(x, u))))
    True

  References:
    Kim, Li, Hu & Hospedales, Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation, ICML 2022, https://arxiv.org/abs/2206.04920.
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026, https://arxiv.org/abs/2603.10048.
  """
  s_floor = _check_floor(s_floor)
  params = jnp.asarray(params)
  if params.ndim < 1 or params.shape[-1] != 2:
    raise ValueError(f"`params` must have shape (..., 2) = (mu, s), got shape {params.shape}.")
  if not jnp.issubdtype(params.dtype, jnp.floating):
    params = params.astype(jnp.float32)
  mu, s = params[..., 0], params[..., 1]
  logits = []
  for weight, m, t, temp in (_FLAT_COMPONENT, _SHARP_COMPONENT):
    kl = gaussian_kl(mu, s, m, t, s_floor=s_floor)
    logits.append(math.log(weight) - kl / (temp * temp))
  return -jnp.logaddexp(logits[0], logits[1])
