"""xsam_jax: sharpness-aware optimizers (SAM, XSAM, ...) as optax transformations.

The top level holds the optimizers, their states and the user helpers; the pieces the optimizers are
made of are in :mod:`xsam_jax.building_blocks`, the sharpness measurements in :mod:`xsam_jax.sharpness`,
the Flax helpers in :mod:`xsam_jax.flax` (imported on demand: it needs flax).
"""

from xsam_jax import building_blocks as building_blocks
from xsam_jax import sharpness as sharpness
from xsam_jax import testfns as testfns
from xsam_jax._src.eigen_sam import EigenSAMState as EigenSAMState
from xsam_jax._src.eigen_sam import eigen_sam as eigen_sam
from xsam_jax._src.friendly_sam import FriendlySAMState as FriendlySAMState
from xsam_jax._src.friendly_sam import friendly_sam as friendly_sam
from xsam_jax._src.functional_sam import FunctionalSAMState as FunctionalSAMState
from xsam_jax._src.functional_sam import functional_sam as functional_sam
from xsam_jax._src.gsam import GSAMState as GSAMState
from xsam_jax._src.gsam import gsam as gsam
from xsam_jax._src.looksam import LookSAMState as LookSAMState
from xsam_jax._src.looksam import looksam as looksam
from xsam_jax._src.microbatch import microbatched as microbatched
from xsam_jax._src.momentum_sam import MomentumSAMState as MomentumSAMState
from xsam_jax._src.momentum_sam import momentum_sam as momentum_sam
from xsam_jax._src.momentum_sam import momentum_sam_adamw as momentum_sam_adamw
from xsam_jax._src.momentum_sam import momentum_sam_params as momentum_sam_params
from xsam_jax._src.multistep import MultiStepSAMState as MultiStepSAMState
from xsam_jax._src.multistep import lsam as lsam
from xsam_jax._src.multistep import msam as msam
from xsam_jax._src.preconditioned_sam import PreconditionedSAMState as PreconditionedSAMState
from xsam_jax._src.preconditioned_sam import preconditioned_sam as preconditioned_sam
from xsam_jax._src.rwp import RWPState as RWPState
from xsam_jax._src.rwp import rwp as rwp
from xsam_jax._src.sam import SAMState as SAMState
from xsam_jax._src.sam import sam as sam
from xsam_jax._src.schedules import rho_schedule_from_lr as rho_schedule_from_lr
from xsam_jax._src.vasso import VaSSOState as VaSSOState
from xsam_jax._src.vasso import vasso as vasso
from xsam_jax._src.wsam import WSAMState as WSAMState
from xsam_jax._src.wsam import wsam as wsam
from xsam_jax._src.xsam import DEFAULT_ALPHAS as DEFAULT_ALPHAS
from xsam_jax._src.xsam import XSAMState as XSAMState
from xsam_jax._src.xsam import xsam as xsam
from xsam_jax._version import __version__ as __version__

__all__ = (
  "DEFAULT_ALPHAS",
  "EigenSAMState",
  "FriendlySAMState",
  "FunctionalSAMState",
  "GSAMState",
  "LookSAMState",
  "MomentumSAMState",
  "MultiStepSAMState",
  "PreconditionedSAMState",
  "RWPState",
  "SAMState",
  "VaSSOState",
  "WSAMState",
  "XSAMState",
  "building_blocks",
  "eigen_sam",
  "friendly_sam",
  "functional_sam",
  "gsam",
  "looksam",
  "lsam",
  "microbatched",
  "momentum_sam",
  "momentum_sam_adamw",
  "momentum_sam_params",
  "msam",
  "preconditioned_sam",
  "rho_schedule_from_lr",
  "rwp",
  "sam",
  "sharpness",
  "testfns",
  "vasso",
  "wsam",
  "xsam",
)
