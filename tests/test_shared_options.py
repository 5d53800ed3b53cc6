"""The options every method shares (docs/controls.md, "Options every method takes"): every method takes
them, they are checked once (``base.Options``), and the new ones are validated on the methods they were
added to.

Where each option's behaviour is tested: ``m_sharpness`` in tests/test_m_sharpness.py; ``adaptive`` against
the float64 reference in tests/test_reference_family.py (and in each method's own file); ``perturb_mask``,
``perturb_every`` and ``perturb_start`` in tests/test_controls.py; ``axis_name`` in tests/test_axis_name.py.
"""

import inspect

import numpy as np
import pytest

import xsam_jax
from xsam_jax._src import base

METHODS = {
  "sam": xsam_jax.sam,
  "xsam": xsam_jax.xsam,
  "msam": xsam_jax.msam,
  "lsam": xsam_jax.lsam,
  "vasso": xsam_jax.vasso,
  "eigen_sam": xsam_jax.eigen_sam,
  "gsam": xsam_jax.gsam,
  "wsam": xsam_jax.wsam,
  "friendly_sam": xsam_jax.friendly_sam,
  "looksam": xsam_jax.looksam,
}
EVERYWHERE = {
  "axis_name": None,
  "m_sharpness": False,
  "adaptive": False,
  "eta": 0.01,
  "adaptive_mask": None,
  "perturb_mask": None,
  "perturb_start": 0,
  "check_updates": False,
}
MULTI_STEP = {"sam", "xsam", "msam", "lsam", "eigen_sam"}  # the methods defined with K ascent steps


# ---------------------------------------------------------------------------------------------------------
# Every method takes every option; the record checks them once
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_every_shared_option(name):
  parameters = inspect.signature(METHODS[name]).parameters
  expected = dict(EVERYWHERE)
  if name != "looksam":  # LookSAM's period is its `k`
    expected["perturb_every"] = 1
  if name in MULTI_STEP:  # MSAM and LSAM require K
    expected["num_steps"] = inspect.Parameter.empty if name in ("msam", "lsam") else 1
  for option, default in expected.items():
    assert option in parameters, f"{name} has no `{option}`"
    assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
    assert parameters[option].default == default, (name, option)
  if name not in MULTI_STEP:
    assert "num_steps" not in parameters


def test_options_record_is_checked_once_and_complete():
  arguments = dict(rho=0.1, num_steps=np.int64(2), adaptive=np.bool_(True), m_sharpness=False, other=object())
  arguments |= dict(axis_name=None, eta=0.01, adaptive_mask=None, perturb_mask=None, perturb_start=0)
  arguments |= dict(check_updates=False)
  options = base.Options.from_arguments("m", arguments, perturb_every=3)
  assert options.method == "m"
  assert (options.num_steps, options.adaptive, options.perturb_every) == (2, True, 3)
  assert type(options.num_steps) is int
  assert type(options.adaptive) is bool
  with pytest.raises(TypeError, match=r"\['perturb_every'\]"):  # neither given nor fixed
    base.Options.from_arguments("m", arguments)
  with pytest.raises(TypeError, match=r"\['eta'\]"):  # given twice
    base.Options.from_arguments("m", arguments, perturb_every=1, eta=0.1)
  with pytest.raises(TypeError, match=r"\['nope'\]"):
    base.Options.from_arguments("m", arguments, perturb_every=1, nope=1)
  with pytest.raises(ValueError, match=r"`eta` must be a finite real number >= 0"):
    base.Options.from_arguments("m", arguments | dict(eta=-1.0), perturb_every=1)


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: xsam_jax.msam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.lsam(0.1, num_steps=2, **kw),
    lambda **kw: xsam_jax.vasso(0.1, **kw),
    lambda **kw: xsam_jax.eigen_sam(0.1, **kw),
    lambda **kw: xsam_jax.friendly_sam(0.1, **kw),
  ],
  ids=["msam", "lsam", "vasso", "eigen_sam", "friendly_sam"],
)
def test_new_options_are_checked(make):
  with pytest.raises(ValueError, match=r"`m_sharpness=True` needs `axis_name`"):
    make(m_sharpness=True)
  with pytest.raises(ValueError, match=r"`m_sharpness` must be"):
    make(axis_name="batch", m_sharpness="yes")
  with pytest.raises(ValueError, match=r"`adaptive` must be"):
    make(adaptive=1)
  with pytest.raises(ValueError, match=r"`eta` must be a finite real number >= 0"):
    make(adaptive=True, eta=-0.1)
