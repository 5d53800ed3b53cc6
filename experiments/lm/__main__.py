"""``python -m experiments.lm [--quick] [--out DIR] [flags]``: runs the language-model study."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments.lm import report
from experiments.lm.config import COMMAND
from experiments.lm.study import run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study the command line ``argv`` describes (None: ``sys.argv[1:]``); returns its document."""
  config, args, command = COMMAND.parse(argv)
  log = (lambda _: None) if args.no_progress else (lambda line: print(line, flush=True))
  doc = report.write(run(config, log=log), args.out, command)
  print(report.markdown(doc, command))
  print(f"[lm] wrote {args.out}/lm.json, tables.md and curves.png")
  return doc


if __name__ == "__main__":
  main(sys.argv[1:])
