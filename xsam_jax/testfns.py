"""2-D test functions with a sharp and a flat minimum (``xsam_jax.testfns``)."""

from xsam_jax._src.testfns import DEFAULT_S_FLOOR as DEFAULT_S_FLOOR
from xsam_jax._src.testfns import FLAT_MINIMUM as FLAT_MINIMUM
from xsam_jax._src.testfns import SADDLE_POINT as SADDLE_POINT
from xsam_jax._src.testfns import SHARP_MINIMUM as SHARP_MINIMUM
from xsam_jax._src.testfns import CriticalPoint as CriticalPoint
from xsam_jax._src.testfns import fisher_sam_toy as fisher_sam_toy
from xsam_jax._src.testfns import gaussian_kl as gaussian_kl

__all__ = (
  "DEFAULT_S_FLOOR",
  "FLAT_MINIMUM",
  "SADDLE_POINT",
  "SHARP_MINIMUM",
  "CriticalPoint",
  "fisher_sam_toy",
  "gaussian_kl",
)
