"""Runnable studies that reproduce the XSAM paper's claims with xsam_jax.

One package per study, over a shared core:

- ``experiments.core``: the configuration system, data, the model zoo, the
  methods by name, the training engine, checkpoints and report headers.
- ``experiments.train``: the main job, ``python -m experiments.train``
  (= ``python3 tasks.py run``): NNX classifiers trained with SGD, SAM and
  XSAM over several seeds, with a table, JSON and plots.
- ``experiments.protocol``: the paper's protocol (tuned on validation, test
  seeds, paired intervals).
- ``experiments.toy2d``: the 2-D test function; ``experiments.sharpness_study``:
  Hessian sharpness at the end of training; ``experiments.alpha_refine``:
  coarse alpha grids; ``experiments.lm``: a character-level language model.
- ``experiments.bench``: step times, probe strategies and memory
  (``python -m experiments.bench``; its parts also run alone as
  ``experiments.bench_wide``, ``experiments.bench_controls`` and
  ``experiments.bench_probe_memory``, the three modules at the top level).

Each study runs with ``python -m experiments.<study>``; see docs/experiments.md.
"""
