"""xsam_jax: sharpness-aware optimizers (SAM, XSAM, ...) as optax transformations."""

from xsam_jax import sharpness as sharpness
from xsam_jax import testfns as testfns
from xsam_jax._src.ascent import AscentTrace as AscentTrace
from xsam_jax._src.ascent import ascent as ascent
from xsam_jax._src.base import sharpness_aware_transform as sharpness_aware_transform
from xsam_jax._src.eigen_sam import EigenSAMState as EigenSAMState
from xsam_jax._src.eigen_sam import eigen_sam as eigen_sam
from xsam_jax._src.eigen_sam import initial_eigvec as initial_eigvec
from xsam_jax._src.eigen_sam import power_iteration as power_iteration
from xsam_jax._src.friendly_sam import FriendlySAMState as FriendlySAMState
from xsam_jax._src.friendly_sam import friendly_sam as friendly_sam
from xsam_jax._src.gsam import GSAMState as GSAMState
from xsam_jax._src.gsam import gsam as gsam
from xsam_jax._src.looksam import LookSAMState as LookSAMState
from xsam_jax._src.looksam import looksam as looksam
from xsam_jax._src.microbatch import microbatched as microbatched
from xsam_jax._src.multistep import MultiStepSAMState as MultiStepSAMState
from xsam_jax._src.multistep import lsam as lsam
from xsam_jax._src.multistep import msam as msam
from xsam_jax._src.multistep import rescaled_combination as rescaled_combination
from xsam_jax._src.sam import SAMState as SAMState
from xsam_jax._src.sam import sam as sam
from xsam_jax._src.schedules import rho_schedule_from_lr as rho_schedule_from_lr
from xsam_jax._src.vasso import VaSSOState as VaSSOState
from xsam_jax._src.vasso import vasso as vasso
from xsam_jax._src.wsam import WSAMState as WSAMState
from xsam_jax._src.wsam import wsam as wsam
from xsam_jax._src.xsam import DEFAULT_ALPHAS as DEFAULT_ALPHAS
from xsam_jax._src.xsam import XSAMState as XSAMState
from xsam_jax._src.xsam import adaptive_xsam_plane as adaptive_xsam_plane
from xsam_jax._src.xsam import probe_losses as probe_losses
from xsam_jax._src.xsam import slerp_coefficients as slerp_coefficients
from xsam_jax._src.xsam import xsam as xsam
from xsam_jax._src.xsam import xsam_plane as xsam_plane
from xsam_jax._version import __version__ as __version__

__all__ = (
  "DEFAULT_ALPHAS",
  "AscentTrace",
  "EigenSAMState",
  "FriendlySAMState",
  "GSAMState",
  "LookSAMState",
  "MultiStepSAMState",
  "SAMState",
  "VaSSOState",
  "WSAMState",
  "XSAMState",
  "adaptive_xsam_plane",
  "ascent",
  "eigen_sam",
  "friendly_sam",
  "gsam",
  "initial_eigvec",
  "looksam",
  "lsam",
  "microbatched",
  "msam",
  "power_iteration",
  "probe_losses",
  "rescaled_combination",
  "rho_schedule_from_lr",
  "sam",
  "sharpness",
  "sharpness_aware_transform",
  "slerp_coefficients",
  "testfns",
  "vasso",
  "wsam",
  "xsam",
  "xsam_plane",
)
