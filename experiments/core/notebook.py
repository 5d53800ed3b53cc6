"""Helpers the notebooks in ``notebooks/`` share: their settings and a compact figure display."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def settings(root: Path) -> tuple[str, bool]:
  """``(data_dir, quick)`` for a notebook run from the repository at ``root``.

  ``data_dir`` is ``$XSAM_NOTEBOOK_DATA_DIR`` or ``<root>/data_cache``;
  ``quick`` is true when ``$XSAM_NOTEBOOK_QUICK`` is set to anything but
  ``""`` or ``"0"`` (the small configuration the tests execute).
  """
  data_dir = os.environ.get("XSAM_NOTEBOOK_DATA_DIR", str(root / "data_cache"))
  return data_dir, os.environ.get("XSAM_NOTEBOOK_QUICK", "0") not in ("", "0")


def show(fig: Any) -> None:
  """Displays a matplotlib figure as a 256-colour PNG and closes it.

  A third of the bytes of matplotlib's own PNG, which keeps the committed
  notebooks small.
  """
  import IPython.display
  import matplotlib.pyplot as plt
  import PIL.Image

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", bbox_inches="tight")
  plt.close(fig)
  image = PIL.Image.open(buffer).convert("RGB").quantize(colors=256, method=PIL.Image.Quantize.MEDIANCUT)
  buffer = io.BytesIO()
  image.save(buffer, format="png", optimize=True)
  IPython.display.display(IPython.display.Image(buffer.getvalue()))
