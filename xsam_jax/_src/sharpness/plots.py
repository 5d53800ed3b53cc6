"""matplotlib drawings of loss surfaces and of XSAM's plane (matplotlib is imported when they are called)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from xsam_jax._src.sharpness.plane import XSAMPlane
from xsam_jax._src.sharpness.surface import LossSurface

if TYPE_CHECKING:
  from matplotlib.axes import Axes


def xsam_arrows(plane: XSAMPlane) -> dict[str, np.ndarray]:
  """The labelled in-plane unit directions of the paper's Fig. 1a.

  Args:
    plane: from :func:`xsam_directions`.

  Returns:
    ``{label: (x, y)}`` for SGD (``g_0``), SAM (``g_K``) and XSAM
    (``v(alpha*)``), as numpy 2-vectors in the ``(e1, e2)`` basis.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax.sharpness import xsam_directions
    >>> plane = xsam_directions(lambda p: jnp.sum(p ** 4), jnp.array([1.0, 2.0, 3.0]),
    ...                         rho=0.1, rho_max=0.2)
    >>> sorted(xsam_arrows(plane))
    ['SAM $g_K$', 'SGD $g_0$', 'XSAM $v(\\\\alpha^*)$']

  References:
    Chen & Zhou, ICLR 2026 (Fig. 1a).
  """
  return {
    "SGD $g_0$": np.asarray(plane.sgd_xy, np.float64),
    "SAM $g_K$": np.asarray(plane.sam_xy, np.float64),
    r"XSAM $v(\alpha^*)$": np.asarray(plane.xsam_xy, np.float64),
  }


def plot_loss_surface(
  surface: LossSurface,
  *,
  arrows: Mapping[str, Any] | None = None,
  radius: float | None = None,
  ax: Axes | None = None,
  levels: int | Sequence[float] | np.ndarray = 30,
  title: str | None = None,
  xlabel: str = "$d_1$",
  ylabel: str = "$d_2$",
  colorbar: bool = True,
) -> Axes:
  """Draws a :class:`LossSurface` as filled contours, with optional arrows.

  matplotlib is imported here, not when the library is imported.

  Args:
    surface: from :func:`loss_surface`.
    arrows: ``{label: (x, y)}`` directions drawn from the origin, scaled by
      ``radius`` (e.g. :func:`xsam_arrows`).
    radius: arrow length and the radius of a dashed circle (the
      neighbourhood); default: 0.8 of the smaller half-extent of the grid,
      with no circle.
    ax: a matplotlib Axes (default: a new figure).
    levels: number of contour levels, or the increasing level values (to
      share one colour scale between panels).
    title, xlabel, ylabel: labels.
    colorbar: draw a colour bar.

  Returns:
    The matplotlib Axes.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax.sharpness import loss_surface
    >>> s = loss_surface(lambda p: jnp.sum(p ** 2), jnp.zeros(2), jnp.array([1.0, 0.0]),
    ...                  jnp.array([0.0, 1.0]))
    >>> ax = plot_loss_surface(s, arrows={"e1": (1.0, 0.0)}, radius=0.5)
    >>> ax.get_legend_handles_labels()[1]
    ['e1']
    >>> import matplotlib.pyplot as plt
    >>> plt.close(ax.figure)

  References:
    Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018;
    Chen & Zhou, ICLR 2026 (Fig. 1a).
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  xs, ys = np.asarray(surface.xs), np.asarray(surface.ys)
  losses = np.asarray(surface.losses, np.float64)
  if ax is None:
    _, ax = plt.subplots(figsize=(4.5, 4))
  finite = np.where(np.isfinite(losses), losses, np.nanmax(np.where(np.isfinite(losses), losses, np.nan)))
  cs = ax.contourf(xs, ys, finite, levels=levels, cmap="viridis")
  ax.contour(xs, ys, finite, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
  if colorbar:
    ax.figure.colorbar(cs, ax=ax, shrink=0.85, label="loss")
  ax.plot([0.0], [0.0], "w+", markersize=8)
  if radius is None:
    length = 0.8 * min(xs.max() - xs.min(), ys.max() - ys.min()) / 2
  else:
    length = float(radius)
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(length * np.cos(t), length * np.sin(t), "w--", linewidth=0.8)
  colors = ["#ff4040", "#ffa500", "#ffffff", "#40c0ff", "#ff80ff"]
  for i, (label, arrow) in enumerate((arrows or {}).items()):
    xy = np.asarray(arrow, np.float64)
    ax.annotate(
      "",
      xy=(length * xy[0], length * xy[1]),
      xytext=(0.0, 0.0),
      arrowprops=dict(arrowstyle="-|>", color=colors[i % len(colors)], lw=1.8),
    )
    ax.plot([], [], color=colors[i % len(colors)], lw=2, label=label)
  if arrows:
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
  ax.set_aspect("equal")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=9)
  return ax


def plot_xsam_plane(
  plane: XSAMPlane, surface: LossSurface, *, ax: Axes | None = None, title: str | None = None, **kwargs: Any
) -> Axes:
  """The paper's Fig. 1a: loss contours on XSAM's plane with the three directions.

  Draws ``surface`` (computed with ``plane.e1, plane.e2``), the circle of
  radius ``rho_max`` that the probes search, arrows of length ``rho_max``
  for SGD (``g_0``), SAM (``g_K``) and XSAM (``v(alpha*)``), and the ascent
  point ``w + d_K``.

  Args:
    plane: from :func:`xsam_directions`.
    surface: ``loss_surface(loss_fn, params, plane.e1, plane.e2, ...)``.
    ax: a matplotlib Axes (default: a new figure).
    title: plot title (default shows theta and alpha*).
    **kwargs: forwarded to :func:`plot_loss_surface`.

  Returns:
    The matplotlib Axes.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax.sharpness import loss_surface, xsam_directions
    >>> loss_fn = lambda p: jnp.sum(p ** 4) + p[0] * p[1]
    >>> w = jnp.array([1.0, -0.5, 0.3])
    >>> plane = xsam_directions(loss_fn, w, rho=0.1, rho_max=0.5)
    >>> s = loss_surface(loss_fn, w, plane.e1, plane.e2)
    >>> ax = plot_xsam_plane(plane, s)
    >>> print(ax.get_title())
    $\\theta$=0.01 rad, $\\alpha^*$=2.0
    >>> import matplotlib.pyplot as plt
    >>> plt.close(ax.figure)

  References:
    Chen & Zhou, Revisiting Sharpness-Aware Minimization: A More Faithful and
    Effective Implementation, ICLR 2026 (Fig. 1a).
  """
  if title is None:
    title = rf"$\theta$={float(plane.theta):.2f} rad, $\alpha^*$={float(plane.alpha):.1f}"
  ax = plot_loss_surface(
    surface,
    arrows=xsam_arrows(plane),
    radius=plane.rho_max,
    ax=ax,
    title=title,
    xlabel="$e_1 = v_0$",
    ylabel="$e_2$ ($v_1$ orthogonalized)",
    **kwargs,
  )
  ascent = np.asarray(plane.ascent_xy, np.float64)
  ax.plot(
    [ascent[0]], [ascent[1]], "o", color="#ffa500", markeredgecolor="k", markersize=5, label="ascent point $w + d_K$"
  )
  ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
  return ax
