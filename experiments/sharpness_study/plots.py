"""The sharpness study's pictures: XSAM's plane (the paper's Fig. 1a) and random planes, per model."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sharpness_study.config import SharpnessConfig
from xsam_jax import sharpness


def plot_planes(
  models: dict[str, Any], c: SharpnessConfig, loss_fn: Callable[[Any], jax.Array], out: str
) -> dict[str, str]:
  """Writes plane_xsam.png (Fig. 1a style) and plane_random.png for seed 0's models."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = {"xsam": os.path.join(out, "plane_xsam.png"), "random": os.path.join(out, "plane_random.png")}
  span = 2.0 * c.probe_radius
  coords = np.linspace(-span, span, c.grid)
  fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.9))
  for ax, (method, (params, plane)) in zip(np.atleast_1d(axes), models.items(), strict=True):
    surf = sharpness.loss_surface(loss_fn, params, plane.e1, plane.e2, xs=coords, ys=coords, batch_size=64)
    sharpness.plot_xsam_plane(
      plane,
      surf,
      ax=ax,
      title=f"{method} model: " + rf"$\theta$={float(plane.theta):.2f}, "
      rf"$\alpha^*$={float(plane.alpha):.1f}",
      levels=20,
    )
  fig.suptitle(f"Training loss on XSAM's plane at the end of training (rho={c.rho}, rho_max={c.rho_max})", fontsize=10)
  fig.tight_layout()
  fig.savefig(paths["xsam"], dpi=80)
  plt.close(fig)

  coords = np.linspace(-0.6, 0.6, c.grid)
  fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.9))
  for ax, (method, (params, _)) in zip(np.atleast_1d(axes), models.items(), strict=True):
    d1, d2 = sharpness.random_plane(jax.random.key(1234), params)
    surf = sharpness.loss_surface(loss_fn, params, d1, d2, xs=coords, ys=coords, batch_size=64)
    clipped = surf._replace(losses=jnp.minimum(surf.losses, 3.0))
    sharpness.plot_loss_surface(
      clipped,
      ax=ax,
      levels=np.linspace(0.0, 3.0, 21),
      title=f"{method} model",
      xlabel="filter-normalized $d_1$",
      ylabel="$d_2$",
    )
  fig.suptitle(
    "Training loss on a random filter-normalized plane (same draws; shared colour scale, clipped at 3)", fontsize=10
  )
  fig.tight_layout()
  fig.savefig(paths["random"], dpi=80)
  plt.close(fig)
  return paths
