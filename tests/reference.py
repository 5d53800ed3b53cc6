"""An independent float64 reference of the SAM family, written from
docs/algorithm.md in plain numpy on flat vectors.

It shares no code with xsam_jax: the MLP's gradient is hand-derived
backpropagation, the ascent, plane, slerp and alpha search are written out
again, and the base optimizer (decayed weights + SGD with momentum) is
written out as optax documents it.
"""

from __future__ import annotations

import numpy as np


def inv(n):
  """1 / n, and 0 for n = 0: an exact division by a norm that leaves a zero vector zero (the authors add
  eps = 1e-12 to the norm instead; docs/algorithm.md, "Notation")."""
  return 1.0 / n if n > 0 else 0.0


KEYS = ("b1", "b2", "w1", "w2")  # sorted: the order jax flattens a dict in


class MLP:
  """y = tanh(x W1 + b1) W2 + b2, loss = mean_i 0.5 |y_i - t_i|^2."""

  def __init__(self, x, t, shapes):
    self.x, self.t, self.shapes = x, t, shapes

  def unflatten(self, v):
    out, i = {}, 0
    for k in KEYS:
      n = int(np.prod(self.shapes[k]))
      out[k] = v[i : i + n].reshape(self.shapes[k])
      i += n
    return out

  @staticmethod
  def flatten(p):
    return np.concatenate([np.asarray(p[k], np.float64).ravel() for k in KEYS])

  def loss(self, v):
    p = self.unflatten(v)
    h = np.tanh(self.x @ p["w1"] + p["b1"])
    y = h @ p["w2"] + p["b2"]
    return 0.5 * np.mean(np.sum((y - self.t) ** 2, axis=1))

  def grad(self, v):
    p = self.unflatten(v)
    n = self.x.shape[0]
    h = np.tanh(self.x @ p["w1"] + p["b1"])
    r = (h @ p["w2"] + p["b2"] - self.t) / n
    dz = (r @ p["w2"].T) * (1.0 - h**2)
    return self.flatten({"w2": h.T @ r, "b2": r.sum(0), "w1": self.x.T @ dz, "b1": dz.sum(0)})


def flat_mask(problem, mask):
  """A per-leaf bool mask (a dict over KEYS) as a flat bool vector in the order of ``MLP.flatten``."""
  return np.concatenate([np.full(int(np.prod(problem.shapes[k])), mask[k]) for k in KEYS])


def slerp(v0, v1, alpha, theta):
  s = np.sin(theta)
  if s < 1e-8:
    return v1
  return (np.sin((1.0 - alpha) * theta) * v0 + np.sin(alpha * theta) * v1) / s


def ascent(grad, w, g0, rho, k_steps, t=None, first=None, mask=None):
  """The K-step ascent; ``t``: ASAM's T (steps rho/K T^2 g / |T g|);
  ``first``: the direction of the first step instead of g0 (VaSSO);
  ``mask``: a flat bool vector, the perturbed coordinates (steps along the
  gradient restricted to them, normalized there)."""
  gs, d = [g0], np.zeros_like(w)
  for k in range(k_steps):
    g = first if (k == 0 and first is not None) else gs[-1]
    if mask is not None:
      g = np.where(mask, g, 0.0)
    if t is None:
      d = d + (rho / k_steps) * g * inv(np.linalg.norm(g))
    else:
      d = d + (rho / k_steps) * t**2 * g * inv(np.linalg.norm(t * g))
    gs.append(grad(w + d))
  return gs, d


def parabola_alpha(alphas, losses):
  """The first grid maximum refined by a least-squares quadratic through it and
  its two neighbours (np.polyfit, exact for 3 points): vertex -b / (2a) when
  the fit is concave, clipped to the neighbours; ends of the grid are kept."""
  alphas, losses = np.asarray(alphas, np.float64), np.asarray(losses, np.float64)
  i = int(np.argmax(losses))
  if 0 < i < len(alphas) - 1:
    a, b, _ = np.polyfit(alphas[i - 1 : i + 2], losses[i - 1 : i + 2], 2)
    if a < 0:
      return float(np.clip(-b / (2 * a), alphas[i - 1], alphas[i + 1]))
  return float(alphas[i])


def xsam_output(loss, grad, w, rho, k_steps, rho_max, alphas, alpha, probe, refine=None, mask=None):
  """One XSAM output; returns (output, alpha used). alpha is stored as float32.

  ``mask`` (flat bools): the plane, the probes and the output's direction
  live on the perturbed coordinates; the others get ``g_K``."""
  gs, d = ascent(grad, w, grad(w), rho, k_steps, mask=mask)
  g_k = gs[-1] if mask is None else np.where(mask, gs[-1], 0.0)
  v0 = d * inv(np.linalg.norm(d))
  nk = np.linalg.norm(g_k)
  v1 = g_k * inv(nk)
  theta = np.arccos(np.clip(v0 @ v1, -1.0, 1.0))
  if probe:
    losses = [loss(w + rho_max * slerp(v0, v1, a, theta)) for a in alphas]
    best = parabola_alpha(alphas, losses) if refine == "parabola" else alphas[int(np.argmax(losses))]
    alpha = float(np.float32(best))
  out = nk * slerp(v0, v1, alpha, theta)
  return (out if mask is None else np.where(mask, out, gs[-1])), alpha


def sam_output(grad, w, rho, k_steps, mask=None):
  gs, _ = ascent(grad, w, grad(w), rho, k_steps, mask=mask)
  return gs[-1]


def train(
  problem,
  w,
  steps,
  *,
  method,
  rho,
  k_steps,
  lr,
  momentum,
  wd,
  rho_max=None,
  alphas=None,
  alpha_init=1.0,
  period=None,
  refine=None,
):
  """Runs ``chain(method, add_decayed_weights(wd), sgd(lr, momentum))``.

  Returns the final flat params and the list of alphas used per step.
  """
  m = np.zeros_like(w)
  alpha, used = float(np.float32(alpha_init)), []
  for count in range(steps):
    if method == "sam":
      out = sam_output(problem.grad, w, rho, k_steps)
    else:
      probe = period is not None and count % period == 0
      out, alpha = xsam_output(problem.loss, problem.grad, w, rho, k_steps, rho_max, alphas, alpha, probe, refine)
      used.append(alpha)
    u = out + wd * w
    m = u + momentum * m
    w = w - lr * m
  return w, used


# ---------------------------------------------------------------------------
# The SAM family beyond SAM and XSAM (docs/algorithm.md "Relatives",
# "Adaptive neighbourhoods"; VaSSO; the eigenvector-corrected SAM).
# ---------------------------------------------------------------------------


def asam_t(w, eta, mask=None):
  """ASAM's T = |w| + eta element-wise; 1 where ``mask`` (flat bools) is False."""
  t = np.abs(w) + eta
  return t if mask is None else np.where(mask, t, 1.0)


def unit(v):
  return v * inv(np.linalg.norm(v))


def multistep_output(grad, w, rho, k_steps, *, kind, plus, t=None):
  """MSAM (mean of g_1..g_K; plus: g_0..g_K) or LSAM (sum of unit g_1..g_K;
  plus: g_0..g_{K-1}), rescaled to |g_K|."""
  gs, _ = ascent(grad, w, grad(w), rho, k_steps, t=t)
  if kind == "msam":
    combined = np.mean(gs if plus else gs[1:], axis=0)
  else:
    combined = np.sum([unit(g) for g in (gs[:-1] if plus else gs[1:])], axis=0)
  return np.linalg.norm(gs[-1]) * unit(combined)


def adaptive_xsam_output(loss, grad, w, rho, k_steps, rho_max, alphas, alpha, probe, t):
  """XSAM in ASAM's rescaled coordinates u = w / T, mapped back (divides by T)."""
  gs, d = ascent(grad, w, grad(w), rho, k_steps, t=t)
  e, tg = d / t, t * gs[-1]
  v0, v1 = unit(e), unit(tg)
  theta = np.arccos(np.clip(v0 @ v1, -1.0, 1.0))
  if probe:
    losses = [loss(w + rho_max * t * slerp(v0, v1, a, theta)) for a in alphas]
    alpha = float(np.float32(alphas[int(np.argmax(losses))]))
  return np.linalg.norm(tg) * slerp(v0, v1, alpha, theta) / t, alpha


def vasso_output(grad, w, rho, theta, ema, t=None):
  """One VaSSO step: ema <- (1-theta) ema + theta g (ema = g the first time);
  output = grad at w + rho ema/|ema| (``t``: ASAM's, w + rho T^2 ema/|T ema|).
  Returns (output, ema)."""
  g = grad(w)
  ema = g if ema is None else (1.0 - theta) * ema + theta * g
  gs, _ = ascent(grad, w, g, rho, 1, t=t, first=ema)
  return gs[-1], ema


def gsam_output(grad, w, rho, alpha, t=None):
  """One GSAM step: g_1 at SAM's ascent point (ASAM's with ``t``), minus alpha times
  the part of g_0 orthogonal to g_1. Returns (output, |g_1|, cos(g_0, g_1))."""
  g0 = grad(w)
  g1 = ascent(grad, w, g0, rho, 1, t=t)[0][-1]
  cosine = unit(g0) @ unit(g1)
  perp = g0 - np.linalg.norm(g0) * cosine * unit(g1)
  return g1 - alpha * perp, np.linalg.norm(g1), cosine


def wsam_gradients(grad, w, rho, t=None):
  """(g_0, g_1) of WSAM: the gradient and the gradient at SAM's ascent point."""
  g0 = grad(w)
  return g0, ascent(grad, w, g0, rho, 1, t=t)[0][-1]


def wsam_output(grad, w, rho, gamma):
  """The coupled WSAM gradient g_0 + gamma/(1-gamma) (g_1 - g_0)."""
  g0, g1 = wsam_gradients(grad, w, rho)
  return g0 + gamma / (1.0 - gamma) * (g1 - g0)


def friendly_sam_output(grad, w, rho, sigma, lmbda, ema):
  """One F-SAM step: m <- lmbda m + (1-lmbda) g (m = 0 before the first step);
  output = grad at w + rho (g - sigma m)/|g - sigma m|. Returns (output, m)."""
  g = grad(w)
  ema = lmbda * (np.zeros_like(g) if ema is None else ema) + (1.0 - lmbda) * g
  gs, _ = ascent(grad, w, g, rho, 1, first=g - sigma * ema)
  return gs[-1], ema


def friendly_sam_code_output(grad, w, rho, sigma, lmbda, ema):
  """One F-SAM step as the authors' PyTorch code takes it (nblt/F-SAM, ``FriendlySAM.first_step``): on the
  first step m = g and the perturbation is along g (SAM); afterwards along g - sigma m, and only then
  m <- lmbda m + (1-lmbda) g. Returns (output, m)."""
  g = grad(w)
  if ema is None:
    direction, ema = g, g.copy()
  else:
    direction, ema = g - sigma * ema, lmbda * ema + (1.0 - lmbda) * g
  gs, _ = ascent(grad, w, g, rho, 1, first=direction)
  return gs[-1], ema


LOOKSAM_PARALLEL_TOL = 1024 * np.finfo(np.float64).eps
"""|g_v| <= this * |g_s|: g_s parallel to g_0 to rounding, g_v = 0 (docs/algorithm.md, LookSAM)."""


def looksam_output(grad, w, rho, alpha, perturb, g_v, t=None, mask=None):
  """One LookSAM step. ``perturb`` (every k-th step): SAM's gradient g_s at the ascent point is the
  output and g_v <- g_s - |g_s| <unit(g_s), unit(g_0)> unit(g_0), its part orthogonal to g_0 (0 if
  below the rounding level); otherwise the output is g_0 + alpha |g_0| / (|g_v| + eps) g_v and g_v
  is kept. ``t``: ASAM's T for the ascent; ``mask`` (flat bools): only those coordinates are
  perturbed and decomposed (g_v lives on them), the others get g_s or g_0. ``g_v`` None: zeros.
  Returns (output, g_v)."""
  g0 = grad(w)
  m = np.ones(w.shape, bool) if mask is None else mask
  g_v = np.zeros(int(m.sum())) if g_v is None else g_v
  if not perturb:
    out = g0.copy()
    out[m] += alpha * np.linalg.norm(g0[m]) * inv(np.linalg.norm(g_v)) * g_v
    return out, g_v
  gs = ascent(grad, w, g0, rho, 1, t=t, mask=mask)[0][-1]
  u0 = unit(g0[m])
  g_v = gs[m] - np.linalg.norm(gs[m]) * (unit(gs[m]) @ u0) * u0
  if np.linalg.norm(g_v) <= LOOKSAM_PARALLEL_TOL * np.linalg.norm(gs[m]):
    g_v = np.zeros_like(g_v)
  return gs, g_v


def power_iteration(hvp, v, n):
  """n power-iteration steps; returns (v_n, Rayleigh quotient of v_{n-1})."""
  lam = 0.0
  for _ in range(n):
    hv = hvp(v)
    lam = v @ hv
    v = hv / np.linalg.norm(hv)
  return v, lam


def eigen_corrected(g, v, alpha):
  """u - alpha |<u, v>| v with u = g/|g|, rescaled to |g|."""
  u = unit(g)
  return np.linalg.norm(g) * unit(u - alpha * abs(u @ v) * v)


def per_replica(step_fns, w, state):
  """m-sharpness: every replica's step ``step(w, state) -> (output, state)`` from the one shared state,
  each on its own shard; the output and the new state are the replicas' means (a None state stays None).
  The mean of the new states is the state every replica keeps."""
  outs, states = zip(*(step(w, state) for step in step_fns), strict=True)
  mean_state = None if states[0] is None else np.mean(states, axis=0)
  return np.mean(outs, axis=0), mean_state


def run(w, steps, output_fn, *, lr, momentum, wd, state=None):
  """chain(method, add_decayed_weights(wd), sgd(lr, momentum)) for a method
  given as ``output_fn(w, count, state) -> (output, state)``."""
  m = np.zeros_like(w)
  for count in range(steps):
    out, state = output_fn(w, count, state)
    m = out + wd * w + momentum * m
    w = w - lr * m
  return w, state


class Quartic:
  """loss = 0.5 w^T A w + b^T w + 0.25 sum w^4 (a non-constant Hessian A + 3 diag(w^2))."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def loss(self, w):
    return 0.5 * w @ self.a @ w + self.b @ w + 0.25 * np.sum(w**4)

  def grad(self, w):
    return self.a @ w + self.b + w**3

  def hvp(self, w, v):
    return self.a @ v + 3.0 * w**2 * v


def momentum_sam_sgd(grad, w, steps, *, lr, momentum, wd, rho):
  """Momentum-SAM with SGD: the authors' ``MSAM.step`` (github.com/MarlonBecker/MSAM, optimizer/msam.py)
  transcribed onto a flat vector, the training loop's gradient at the held params included.

  ``w``: the initial weights; ``lr(t)``, ``rho(t)``: the values at step ``t`` (0-based). The loop holds the
  perturbed params ``p``. The factor of the stored momentum, ``coef``, is ``rho / |buf|`` of the step that
  perturbed (the authors' AdamW keeps it so; their SGD multiplies the stored ``1 / |buf|`` by the current
  rho: the same for a constant rho), and ``inv`` is exact (the authors: ``1 / (|buf| + 1e-12)``).

  Returns:
    ``(p, w)``: the held params and the unperturbed ones (``move_back_from_momentumAscent``) after ``steps``.
  """
  p, buf, coef = np.array(w, np.float64), np.zeros_like(w), 0.0  # inverse_norm_buffer = 0: unperturbed at first
  for t in range(steps):
    d_p = grad(p) + wd * p  # the loop's gradient at the held params, plus L2 weight decay
    p = p + coef * buf  # move back to w_t
    buf = momentum * buf + d_p
    p = p - lr(t) * buf  # the SGD step
    coef = rho(t) * inv(np.linalg.norm(buf))
    p = p - coef * buf  # perturb along -buf / |buf|
  return p, p + coef * buf


def momentum_sam_adamw(grad, w, steps, *, lr, b1, b2, eps, wd, rho, authors_decay=False):
  """Momentum-SAM with AdamW: the authors' ``adamW_msam`` (optimizer/adamW_msam.py) on a flat vector.

  ``authors_decay``: their weight decay, ``p *= 1 - lr wd`` after the Adam step; else optax's (and
  PyTorch's), ``- lr wd w_t`` in the same step. ``lr``, ``rho``: numbers. Returns ``(p, w)`` as
  :func:`momentum_sam_sgd`.
  """
  p, m, v, coef = np.array(w, np.float64), np.zeros_like(w), np.zeros_like(w), 0.0
  for t in range(1, steps + 1):
    g = grad(p)
    bias_correction1, bias_correction2 = 1 - b1**t, 1 - b2**t
    p = p + coef * m  # move back
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps
    if authors_decay:
      p = p - lr / bias_correction1 * m / denom
      p = p * (1 - lr * wd)
    else:
      p = p - lr * (m / bias_correction1 / denom + wd * p)
    coef = rho * inv(np.linalg.norm(m))
    p = p - coef * m  # ascent
  return p, p + coef * m


# ---------------------------------------------------------------------------
# Functional and preconditioned SAM (Singh, Mobahi, Agarwala & Dauphin 2025; docs/algorithm.md,
# "Functional and preconditioned SAM"). The MLP's outputs y and its loss l(y) = mean_i 0.5 |y_i - t_i|^2
# are taken apart: dl/dy = (y - t) / n, and the backward pass of a given output cotangent by hand.
# ---------------------------------------------------------------------------


def mlp_outputs(problem, v):
  """The reference MLP's outputs y = tanh(x W1 + b1) W2 + b2 at the flat params ``v``."""
  p = problem.unflatten(v)
  return np.tanh(problem.x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_output_loss_grad(problem, y):
  """dl/dy of l(y) = mean_i 0.5 |y_i - t_i|^2: (y - t) / n."""
  return (y - problem.t) / problem.x.shape[0]


def mlp_vjp(problem, v, r):
  """J_y(v)^T r: the backward pass of the output cotangent ``r`` (n x dout) at the flat params ``v``."""
  p = problem.unflatten(v)
  h = np.tanh(problem.x @ p["w1"] + p["b1"])
  dz = (r @ p["w2"].T) * (1.0 - h**2)
  return problem.flatten({"w2": h.T @ r, "b2": r.sum(0), "w1": problem.x.T @ dz, "b1": dz.sum(0)})


def preconditioner_step(g, nu, t, b2, eps):
  """Adam's second moment and the preconditioned direction: nu <- b2 nu + (1 - b2) g^2 (nu = 0 before the
  first step), u = g / (sqrt(nu / (1 - b2^t)) + eps) with t the number of updates of nu so far, this one
  included; a coordinate with g = 0 and nu = 0 gets u = 0. Returns (u, nu)."""
  nu = (1.0 - b2) * g * g if nu is None else b2 * nu + (1.0 - b2) * g * g
  den = np.sqrt(nu / (1.0 - b2**t)) + eps
  return np.where(den > 0, g / np.where(den > 0, den, 1.0), 0.0), nu


def preconditioned_sam_output(grad, w, rho, b2, eps, count, nu):
  """One preconditioned SAM step: e = rho u / |u|, output = grad(w + e). Returns (output, nu)."""
  g = grad(w)
  u, nu = preconditioner_step(g, nu, count + 1, b2, eps)
  return grad(w + rho * u * inv(np.linalg.norm(u))), nu


def functional_sam_output(problem, w, rho, precondition=None, count=0, nu=None):
  """One Functional SAM step on the reference MLP: e = rho g / |g| (``precondition=(b2, eps)``: along u),
  output = J_y(w + e)^T dl/dy(y(w)). Returns (output, nu)."""
  g = problem.grad(w)
  u = g
  if precondition is not None:
    u, nu = preconditioner_step(g, nu, count + 1, *precondition)
  e = rho * u * inv(np.linalg.norm(u))
  return mlp_vjp(problem, w + e, mlp_output_loss_grad(problem, mlp_outputs(problem, w))), nu
