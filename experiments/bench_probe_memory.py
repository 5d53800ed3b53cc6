"""``python -m experiments.bench_probe_memory [flags]``: runs :mod:`experiments.bench.probe_memory` alone."""

from experiments.bench.probe_memory import main

if __name__ == "__main__":
  main()
