"""``python -m experiments.bench_wide [flags]``: runs :mod:`experiments.bench.wide` alone."""

from experiments.bench.wide import main

if __name__ == "__main__":
  main()
