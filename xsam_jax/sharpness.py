"""Sharpness toolkit: Hessian spectra, average sharpness and loss surfaces.

``import xsam_jax.sharpness`` pulls in JAX only; matplotlib is imported
inside the plotting functions when they are called.
"""

from xsam_jax._src.hvp import hessian_vector_product as hessian_vector_product
from xsam_jax._src.sharpness.directions import NORMALIZATIONS as NORMALIZATIONS
from xsam_jax._src.sharpness.directions import VECTOR_LEAVES as VECTOR_LEAVES
from xsam_jax._src.sharpness.directions import normalize_direction as normalize_direction
from xsam_jax._src.sharpness.directions import random_direction as random_direction
from xsam_jax._src.sharpness.directions import random_plane as random_plane
from xsam_jax._src.sharpness.hessian import HessianEigenpairs as HessianEigenpairs
from xsam_jax._src.sharpness.hessian import hessian_eigenpairs as hessian_eigenpairs
from xsam_jax._src.sharpness.hessian import hessian_eigenvalues as hessian_eigenvalues
from xsam_jax._src.sharpness.perturbations import average_sharpness as average_sharpness
from xsam_jax._src.sharpness.perturbations import perturbed_losses as perturbed_losses
from xsam_jax._src.sharpness.plane import XSAMPlane as XSAMPlane
from xsam_jax._src.sharpness.plane import xsam_directions as xsam_directions
from xsam_jax._src.sharpness.plots import plot_loss_surface as plot_loss_surface
from xsam_jax._src.sharpness.plots import plot_xsam_plane as plot_xsam_plane
from xsam_jax._src.sharpness.plots import xsam_arrows as xsam_arrows
from xsam_jax._src.sharpness.surface import LossSurface as LossSurface
from xsam_jax._src.sharpness.surface import loss_surface as loss_surface

__all__ = (
  "NORMALIZATIONS",
  "VECTOR_LEAVES",
  "HessianEigenpairs",
  "LossSurface",
  "XSAMPlane",
  "average_sharpness",
  "hessian_eigenpairs",
  "hessian_eigenvalues",
  "hessian_vector_product",
  "loss_surface",
  "normalize_direction",
  "perturbed_losses",
  "plot_loss_surface",
  "plot_xsam_plane",
  "random_direction",
  "random_plane",
  "xsam_arrows",
  "xsam_directions",
)
