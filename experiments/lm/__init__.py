"""``python -m experiments.lm``: does sharpness-awareness help a small character-level transformer, and does XSAM?

A decoder-only transformer (the zoo's :func:`experiments.core.pure_models.transformer_init`) trained
with AdamW on CPython's own documentation (``pydoc_data.topics``, :mod:`experiments.core.text`), on
the shared engine (:mod:`experiments.core.engine`). Modules: ``config`` (:class:`LMConfig`, the command
line), ``runs`` (the model, the optimizers, vmapped runs), ``study`` (tuning, test seeds, paired
intervals) and ``report`` (``lm.json``, ``tables.md``, ``curves.png``).
"""

from experiments.lm.config import COMMAND, METHODS, LMConfig
from experiments.lm.study import run

__all__ = ["COMMAND", "METHODS", "LMConfig", "run"]
