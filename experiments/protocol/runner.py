"""Settings, arms and the runner that trains what the store lacks.

A :class:`Setting` is one trainable configuration (method, K, traced
hyperparameters), put in canonical form so that equal runs share a key
(``msam``/``lsam`` with K = 1, the fixed alpha 1, GSAM's alpha 0 and WSAM's
gamma 1/2 are SAM). An :class:`Arm` is a model on a data regime. The
:class:`Runner` returns the records of ``(arm, setting, seed, split)``
runs, training the missing ones (grouped by compiled program, with a
progress bar) and storing each as soon as it finishes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from experiments.protocol import programs, splits
from experiments.protocol.config import ProtocolConfig
from experiments.protocol.store import Store, fingerprint


def _round(value: float) -> float:
  """``value`` to 6 significant digits (keys stay equal whatever float arithmetic made the value)."""
  return float(f"{value:.6g}")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One trainable configuration: method, ascent steps K and the traced hyperparameters it reads."""

  method: str
  num_steps: int
  hp: tuple[tuple[str, float], ...]

  @classmethod
  def make(cls, method: str, num_steps: int = 1, /, **values: float) -> Setting:
    """The canonical setting of ``method`` with the hyperparameters it reads taken from ``values``."""
    if method == "sgd":
      num_steps = 1
    if method in ("msam", "lsam") and num_steps == 1:
      method = "sam"
    if (
      (method == "xsam_fixed" and _round(values["alpha"]) == 1.0)
      or (method == "gsam" and _round(values["alpha"]) == 0.0)
      or (method == "wsam" and _round(values["gamma"]) == 0.5)
    ):
      method = "sam"
    hp = programs.hyperparameters(method, values)
    return cls(method, num_steps, tuple(sorted((k, _round(v)) for k, v in hp.items())))

  @property
  def values(self) -> dict[str, float]:
    """The hyperparameters as a dict."""
    return dict(self.hp)

  def label(self) -> str:
    """``sam K=2 lr=0.05 rho=0.1 wd=0.0005``-like text."""
    k = f" K={self.num_steps}" if self.num_steps > 1 else ""
    return f"{self.method}{k} " + " ".join(f"{n}={v:g}" for n, v in self.hp)

  def to_dict(self) -> dict[str, Any]:
    """JSON form."""
    return {"method": self.method, "num_steps": self.num_steps, **self.values}


@dataclasses.dataclass(frozen=True)
class Arm:
  """A model on a data regime: what one single-step protocol tunes."""

  name: str
  model: str
  width: int
  regime: splits.Regime


class Runner:
  """Trains and remembers runs (see the module docstring).

  Attributes:
    config: the protocol's settings.
    store: the run store.
    test_reads: the arms whose test split has been read, in order (the protocol reads them last).
  """

  def __init__(self, config: ProtocolConfig, store: Store, *, progress: bool = True, log: Callable[[str], Any] = print):
    self.config = config
    self.store = store
    self.progress = progress
    self.log = log
    self.test_reads: list[str] = []
    self._splits: dict[splits.Regime, splits.Splits] = {}
    self._problems: dict[tuple[splits.Regime, str], programs.Problem] = {}

  def splits(self, regime: splits.Regime) -> splits.Splits:
    """The regime's splits (made once)."""
    if regime not in self._splits:
      c = self.config
      self._splits[regime] = splits.make_splits(
        c.data_dir, regime, val_fraction=c.val_fraction, split_seed=c.split_seed, noise_seed=c.noise_seed
      )
    return self._splits[regime]

  def problem(self, arm: Arm, split: str) -> programs.Problem:
    """The arm's device arrays with evaluation split ``split``; reading ``"test"`` is logged in :attr:`test_reads`."""
    key = (arm.regime, split)
    if split == "test":
      self.test_reads.append(arm.name)
    if key not in self._problems:
      self._problems[key] = splits.problem(self.splits(arm.regime), split)
    return self._problems[key]

  def static(self, arm: Arm, setting: Setting) -> programs.Static:
    """The compiled program's settings of ``setting`` on ``arm``."""
    c = self.config
    return programs.Static(
      model=arm.model,
      width=arm.width,
      method=setting.method,
      num_steps=setting.num_steps,
      epochs=c.epochs,
      batch_size=c.batch_size,
      momentum=c.momentum,
      label_noise=arm.regime.label_noise,
      train_size=arm.regime.train_size,
      warmup_epochs=c.warmup_epochs,
    )

  def ident(self, arm: Arm, setting: Setting, seed: int, split: str) -> dict[str, Any]:
    """What determines a run's result (hashed into its key)."""
    c = self.config
    data = {"val_fraction": c.val_fraction, "split_seed": c.split_seed, "noise_seed": c.noise_seed}
    return {
      "data": data,
      "static": dataclasses.asdict(self.static(arm, setting)),
      "hp": setting.values,
      "seed": seed,
      "split": split,
    }

  def records(
    self, arm: Arm, settings: Sequence[Setting], seeds: Sequence[int], split: str, desc: str = ""
  ) -> list[list[dict[str, Any]]]:
    """The records of every ``(setting, seed)``: ``out[i][j]`` for ``settings[i]`` and ``seeds[j]``.

    Runs missing from the store are trained first, grouped by program (one
    compilation per group), and stored one by one (``vmap``: chunk by chunk).
    """
    keys = [[fingerprint(self.ident(arm, s, seed, split)) for seed in seeds] for s in settings]
    todo: dict[programs.Static, list[tuple[Setting, int, str]]] = {}
    for s, row in zip(settings, keys, strict=True):
      for seed, key in zip(seeds, row, strict=True):
        if self.store.get(key) is None and all(key != k for *_, k in todo.get(self.static(arm, s), [])):
          todo.setdefault(self.static(arm, s), []).append((s, seed, key))
    total = sum(len(v) for v in todo.values())
    if total:
      problem = self.problem(arm, split)
      data = self.splits(arm.regime)
      bar = tqdm(total=total, desc=f"{arm.name}: {desc or split}", disable=not self.progress, leave=False)
      for static, runs in todo.items():
        chunk = self.config.vmap_chunk if self.config.vmap else 1
        for start in range(0, len(runs), chunk):
          part = runs[start : start + chunk]
          t0 = time.perf_counter()
          results = programs.train_runs(
            static,
            [dict(s.hp) for s, _, _ in part],
            [seed for _, seed, _ in part],
            problem,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            batched=self.config.vmap,
          )
          per_run = (time.perf_counter() - t0) / len(part)
          for (s, seed, key), result in zip(part, results, strict=True):
            self.store.add(key, self.ident(arm, s, seed, split), result, per_run)
          bar.update(len(part))
      bar.close()
    return [[self.store.records[k] for k in row] for row in keys]

  def scores(self, arm: Arm, settings: Sequence[Setting], desc: str) -> list[dict[str, Any]]:
    """Validation accuracy of each setting over the tuning seeds: ``{"setting", "mean", "std", "per_seed"}``.

    XSAM's rows also hold ``alpha_mean`` and ``alpha_at_2``: the mean of its probed alpha over every probe
    round of the tuning runs and the fraction of rounds at the grid's top (2.0).
    """
    seeds = list(range(self.config.tune_seeds))
    rows = self.records(arm, settings, seeds, "val", desc)
    out = []
    for s, row in zip(settings, rows, strict=True):
      accs = [float(r["result"]["eval_acc"]) for r in row]
      mean = sum(accs) / len(accs)
      std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
      entry: dict[str, Any] = {"setting": s, "mean": mean, "std": std, "per_seed": accs}
      alphas = [a for r in row for a in r["result"].get("epoch_alpha", [])]  # one probe round per epoch
      if alphas:
        entry["alpha_mean"] = sum(alphas) / len(alphas)
        entry["alpha_at_2"] = sum(a >= 1.95 for a in alphas) / len(alphas)
      out.append(entry)
    return out
