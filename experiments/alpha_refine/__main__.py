"""``python -m experiments.alpha_refine [--quick] [flags]``: runs :mod:`experiments.alpha_refine.refine`."""

from experiments.alpha_refine.refine import main

if __name__ == "__main__":
  raise SystemExit(main())
