"""The pieces the optimizers are made of, public for analysis and for writing new variants.

Every method of :mod:`xsam_jax` is the shared ascent (:func:`ascent`), then a rule, built with
one factory (:func:`sharpness_aware_transform`); XSAM's plane, great-circle interpolation and
probes, and the helpers of MSAM/LSAM and eigen_sam, are here for analysis (the sharpness
toolkit's plane plots use them) and for new variants (CONTRIBUTING.md, "Adding a SAM variant").
"""

from xsam_jax._src.ascent import AscentTrace as AscentTrace
from xsam_jax._src.ascent import ascent as ascent
from xsam_jax._src.base import sharpness_aware_transform as sharpness_aware_transform
from xsam_jax._src.eigen_sam import initial_eigvec as initial_eigvec
from xsam_jax._src.eigen_sam import power_iteration as power_iteration
from xsam_jax._src.multistep import rescaled_combination as rescaled_combination
from xsam_jax._src.xsam import adaptive_xsam_plane as adaptive_xsam_plane
from xsam_jax._src.xsam import probe_losses as probe_losses
from xsam_jax._src.xsam import slerp_coefficients as slerp_coefficients
from xsam_jax._src.xsam import xsam_plane as xsam_plane

__all__ = (
  "AscentTrace",
  "adaptive_xsam_plane",
  "ascent",
  "initial_eigvec",
  "power_iteration",
  "probe_losses",
  "rescaled_combination",
  "sharpness_aware_transform",
  "slerp_coefficients",
  "xsam_plane",
)
