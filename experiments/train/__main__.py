"""``python -m experiments.train [flags]``: the main job (see :mod:`experiments.train.cli`)."""

import sys

from experiments.train.cli import main

if __name__ == "__main__":
  sys.exit(main())
