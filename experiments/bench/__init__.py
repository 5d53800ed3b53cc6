"""The benchmarks: ``python -m experiments.bench`` (step times, probe strategies, memory) and its parts.

- :mod:`~experiments.bench.steps`: step and probe-round times per method and model (the main bench);
- :mod:`~experiments.bench.wide`: compile times on wide parameter trees;
- :mod:`~experiments.bench.controls`: epoch times of the one-gradient methods and training controls;
- :mod:`~experiments.bench.probe_memory`: peak memory of the memory-aware probe strategies;
- :mod:`~experiments.bench.problems`: the models on random batches; :mod:`~experiments.bench.common`:
  the shared step, compile-and-time helpers and report header.

The parts run alone as ``python -m experiments.bench_wide``, ``experiments.bench_controls`` and
``experiments.bench_probe_memory``.
"""

from experiments.bench.steps import COMMAND, MICROBATCHES, BenchConfig, format_table, main, plane_floor, ratios

__all__ = ["COMMAND", "MICROBATCHES", "BenchConfig", "format_table", "main", "plane_floor", "ratios"]
