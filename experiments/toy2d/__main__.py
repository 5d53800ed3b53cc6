"""``python -m experiments.toy2d [--quick] [--out DIR] [flags]``: runs the 2-D study (see ``experiments.toy2d``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments.toy2d.analysis import run
from experiments.toy2d.config import COMMAND


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study the command line ``argv`` describes (None: ``sys.argv[1:]``); returns its JSON dict."""
  config, args, command = COMMAND.parse(argv)
  return run(config, args.out, command)


if __name__ == "__main__":
  main(sys.argv[1:])
