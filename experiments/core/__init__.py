"""The shared core of every study: configs, data, models, methods, the engine, checkpoints and reports.

- :mod:`experiments.core.config`: the one configuration system (a frozen
  dataclass per study, its range checks and its generated flags).
- :mod:`experiments.core.data`: MNIST-1D, scikit-learn digits and
  tensorflow-datasets loaders, the batch order and image augmentation;
  :mod:`experiments.core.text`: the language-model study's text.
- :mod:`experiments.core.models` (NNX) and :mod:`experiments.core.pure_models`
  (the same models as pure functions): the model zoo.
- :mod:`experiments.core.methods`: the optimizers by name.
- :mod:`experiments.core.engine`: the training engine (scanned runs, the epoch
  loop with checkpoints, progress and monitors).
- :mod:`experiments.core.checkpoint`: orbax checkpoints;
  :mod:`experiments.core.report`: what every report records (machine, versions).
- :mod:`experiments.core.notebook`: the notebooks' helpers.
"""
