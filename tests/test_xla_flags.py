"""The compile flags the suite adds (tests/xla_flags.py): only flags the installed jaxlib accepts, never twice."""

import os

from tests import xla_flags


def test_an_unknown_flag_is_detected_and_a_known_one_accepted():
  """XLA aborts a process on a flag it does not know; the probe sees that in a subprocess."""
  assert not xla_flags._xla_accepts(["--xla_no_such_flag_in_any_jaxlib=true"])
  assert xla_flags._xla_accepts(["--xla_backend_optimization_level=0"])


def test_flags_are_added_once_and_unknown_ones_dropped(monkeypatch):
  monkeypatch.setattr(xla_flags, "CHEAP_COMPILATION", ("--xla_a=0", "--xla_gone=false", "--xla_b=1"))
  monkeypatch.setattr(xla_flags, "_xla_accepts", lambda flags: not any("gone" in f for f in flags))
  assert xla_flags.cheap_compilation_flags("") == "--xla_a=0 --xla_b=1"
  assert xla_flags.cheap_compilation_flags("--xla_a=2 --other=1") == "--xla_a=2 --other=1 --xla_b=1"
  assert (
    xla_flags.cheap_compilation_flags("--xla_a=0 --xla_gone=true --xla_b=1") == "--xla_a=0 --xla_gone=true --xla_b=1"
  )


def test_this_run_has_the_flags_unless_told_not_to():
  """Each flag is set in this run, unless XSAM_JAX_TEST_FULL_OPT=1 or the installed jaxlib rejects it."""
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in xla_flags.CHEAP_COMPILATION:
    if os.environ.get("XSAM_JAX_TEST_FULL_OPT") == "1":
      assert flag.split("=")[0] not in flags
    elif flag.split("=")[0] not in flags:
      assert not xla_flags._xla_accepts([flag]), f"{flag} is accepted by this jaxlib but not set: {flags!r}"
