"""``python -m experiments.bench [--quick] [flags]``: the benchmarks (see :mod:`experiments.bench.steps`)."""

from experiments.bench.steps import main

if __name__ == "__main__":
  main()
