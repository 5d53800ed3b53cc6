"""``python -m experiments.sharpness_study [--quick] [--out DIR] [flags]``: see ``experiments.sharpness_study``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments.sharpness_study.analysis import run
from experiments.sharpness_study.config import COMMAND


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study the command line ``argv`` describes (None: ``sys.argv[1:]``); returns its JSON dict."""
  config, args, command = COMMAND.parse(argv)
  return run(config, args.out, command)


if __name__ == "__main__":
  main(sys.argv[1:])
