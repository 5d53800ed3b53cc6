"""Runnable studies that reproduce the XSAM paper's claims with xsam_jax.

The main job, ``python -m experiments.train``, trains Flax NNX classifiers
with SGD, SAM and XSAM and writes JSON and PNG results; its logic lives in
importable modules:

- ``experiments.config``: the one configuration system of every study (a
  frozen dataclass per study, its range checks and its generated flags).
- ``experiments.configs``: the main job's ``TrainConfig`` (``default()``, ``quick()``).
- ``experiments.data``: MNIST-1D, scikit-learn digits and tensorflow-datasets
  loaders, deterministic batch order and image augmentation.
- ``experiments.models``: MLP, 1-D/2-D CNNs and a CIFAR ResNet-18 in NNX.
- ``experiments.methods``: the sharpness-aware methods by name, ``build(name,
  **hyperparameters)`` for every study.
- ``experiments.checks``: the checks of a study before any data is loaded,
  and ``resolve`` (the fields left to the data set).
- ``experiments.trainer``: the jitted NNX train step and
  ``train_and_evaluate(config, workdir)``.
- ``experiments.checkpoint``: orbax checkpoints for resuming a run.
- ``experiments.study``: several methods times several seeds.
- ``experiments.report``: the summary table, JSON and plots.

The other studies: the packages ``experiments.toy2d`` (the 2-D test function)
and ``experiments.sharpness_study`` (Hessian sharpness at the end of
training), and the modules ``experiments.alpha_refine``, ``experiments.bench``
(with ``bench_models`` and ``bench_wide``). Each runs with ``python -m``.
"""
