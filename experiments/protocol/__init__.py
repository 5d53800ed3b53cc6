"""The XSAM paper's tuning and evaluation protocol at CPU scale (issue 19).

Hyperparameters are selected on a validation split held out of MNIST-1D's
training set; the selected settings are then trained with fresh seeds and
evaluated once on the test split (see ``stages`` for the exact rules).
Stages: the single-step protocol (SGD, SAM, XSAM, the fixed-alpha baseline,
GSAM, WSAM), varying rho, multi-step K = 1..4 (SAM, MSAM(+), LSAM(+), XSAM),
further arms (label noise, a small training set, the MLP) and the 2-D
study's momentum x alpha-period sweep (``experiments.toy2d.axes_sweep``).

Usage::

  python -m experiments.protocol            # full protocol -> results/protocol/ (store: runs/protocol/)
  python -m experiments.protocol --quick    # every stage on a tiny scale, < 2 minutes
  python -m experiments.protocol --help     # a flag per field of ProtocolConfig

Every finished run is appended to ``<workdir>/runs.jsonl`` keyed by a
fingerprint of what determines it; a rerun skips what is there, so an
interrupted protocol resumes where it stopped.

Modules: ``config`` (:class:`ProtocolConfig`, the command line), ``splits``
(validation split, label noise),
``programs`` (whole runs on :mod:`experiments.core.engine`, batched with ``vmap``),
``store`` (the run store), ``runner`` (settings, arms, training what is
missing), ``stages`` (selection and the test phase), ``timing`` (does vmap pay), ``report``/``tables``
(summaries and ``tables.md``) and ``protocol`` (:func:`run`).
"""

from experiments.protocol.config import COMMAND, ProtocolConfig
from experiments.protocol.protocol import run

__all__ = ["COMMAND", "ProtocolConfig", "run"]
