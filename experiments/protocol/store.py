"""The resumable run store: one JSON line per finished (configuration, seed, split), keyed by a fingerprint.

Every trained run is appended to ``runs.jsonl`` in the work folder (and
flushed) as soon as it finishes; a run whose key is already there is never
trained again, so an interrupted protocol continues where it stopped and a
finished one re-writes its reports without training. A line that is not a
run record (cut short when the process was killed while writing, not UTF-8,
not a JSON object with a ``key`` and a ``result``) is skipped with a warning
naming the file and line, and its run is trained again. The key hashes everything
that determines the run's result: the engine version, the data split and
regime, the model, the method and its hyperparameters, the seed and the
evaluation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

ENGINE_VERSION = 1
"""Bump when the trainer changes what a run computes: older records then no longer match."""

STORE_FILE = "runs.jsonl"


def fingerprint(ident: dict[str, Any]) -> str:
  """A short hash of the JSON of ``ident`` (sorted keys) with the engine version."""
  blob = json.dumps({"engine": ENGINE_VERSION, **ident}, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def _record(raw: bytes) -> dict[str, Any] | None:
  """One line of the store as a run record, or None if it is not one (cut short, not UTF-8, not a JSON
  object with a string ``key`` and a dict ``result``)."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  if (
    not isinstance(record, dict) or not isinstance(record.get("key"), str) or not isinstance(record.get("result"), dict)
  ):
    return None
  return record


class Store:
  """The run records of one work folder (see the module docstring).

  Attributes:
    path: the JSON-lines file.
    records: key -> record (``{"key", "ident", "result", "time_s", "index"}``).
    trained: how many runs this object added (0 on a rerun that found everything).
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, STORE_FILE)
    self.records: dict[str, dict[str, Any]] = {}
    self.trained = 0
    if os.path.exists(self.path):
      with open(self.path, "rb") as f:
        for number, raw in enumerate(f, start=1):
          record = _record(raw)
          if record is None:  # cut short by an interruption, damaged or edited
            warnings.warn(
              f"{self.path}, line {number}: not a run record (cut short, damaged or edited); skipped, so its "
              "run is trained again",
              stacklevel=2,
            )
            continue
          self.records[record["key"]] = record
      with open(self.path, "rb+") as f:  # end a cut-short last line, so the next record starts on its own line
        if f.seek(0, os.SEEK_END) > 0:
          f.seek(-1, os.SEEK_END)
          if f.read(1) != b"\n":
            f.write(b"\n")

  def get(self, key: str) -> dict[str, Any] | None:
    """The record of ``key``, or None if that run has not finished."""
    return self.records.get(key)

  def add(self, key: str, ident: dict[str, Any], result: dict[str, Any], time_s: float) -> dict[str, Any]:
    """Appends one finished run (``index`` = its position in the store) and returns its record."""
    record = {"key": key, "ident": ident, "result": _jsonable(result), "time_s": time_s, "index": len(self.records)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.records[key] = record
    self.trained += 1
    return record
