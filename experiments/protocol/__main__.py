"""``python -m experiments.protocol [--quick] [--out DIR] [--workdir DIR] [flags]``: runs the protocol."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments.protocol.config import COMMAND
from experiments.protocol.protocol import run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the protocol the command line ``argv`` describes (None: ``sys.argv[1:]``); returns its JSON document."""
  config, args, command = COMMAND.parse(argv)
  return run(config, args.out, workdir=args.workdir, command=command, progress=not args.no_progress)


if __name__ == "__main__":
  main(sys.argv[1:])
