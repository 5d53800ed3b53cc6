"""``python -m experiments.bench_controls [flags]``: runs :mod:`experiments.bench.controls` alone."""

from experiments.bench.controls import main

if __name__ == "__main__":
  main()
