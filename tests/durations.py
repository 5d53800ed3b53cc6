"""Per-file test durations, stamped with the machine: where the suite's time goes.

``tests/conftest.py`` sums each test file's setup, call and teardown times
when ``XSAM_JAX_DURATIONS=PATH`` is set and calls :func:`write` at the end of
the run. The sum over files is the CPU-side test time across all workers,
not the wall-clock time of a parallel run.

The root ``conftest.py`` reads the committed table back (:func:`read`) to hand
pytest-xdist the longest files first (:func:`longest_files_first`).
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from experiments.core import report as core_report


def format_table(durations: dict[str, float], *, exitstatus: int, cpu: str, cores: int | None, date: str) -> str:
  """A markdown table of the files, slowest first, with their share of the total."""
  total = sum(durations.values())
  lines = [
    "# Test durations per file",
    "",
    f"Machine: {cpu}, {cores} cores; date {date}; pytest exit status {exitstatus}.",
    f"Total test time {total:.0f} s (summed over files and workers; not the wall-clock time).",
    "",
    "| file | seconds | share |",
    "|---|---:|---:|",
  ]
  for name, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
    lines.append(f"| {name} | {seconds:.1f} | {100 * seconds / total:.1f}% |")
  return "\n".join(lines) + "\n"


def write(path: str, durations: dict[str, float], *, exitstatus: int) -> None:
  """Writes :func:`format_table` of ``durations`` for this machine and today to ``path``."""
  text = format_table(
    durations,
    exitstatus=exitstatus,
    cpu=core_report.cpu_name(),
    cores=os.cpu_count(),
    date=datetime.date.today().isoformat(),
  )
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)


_ROW = re.compile(r"^\| (\S+) \| ([0-9.]+) \| [0-9.]+% \|$", re.M)


def read(path: str | Path) -> dict[str, float]:
  """The ``{file: seconds}`` of a table :func:`write` wrote; ``{}`` if ``path`` does not exist."""
  path = Path(path)
  if not path.is_file():
    return {}
  return {name: float(seconds) for name, seconds in _ROW.findall(path.read_text())}


def longest_files_first(nodeids: list[str], seconds: dict[str, float]) -> list[int]:
  """The order (indices into ``nodeids``) that puts the files with the most recorded ``seconds`` first.

  The sort is stable: a file's tests keep their order, and files without a record (0 s) keep theirs,
  after the recorded ones. pytest-xdist's ``--dist loadfile`` hands out files in collection order, so
  a run that starts with its longest files does not end on one worker busy with one of them while
  the other idles.
  """
  return sorted(range(len(nodeids)), key=lambda i: -seconds.get(nodeids[i].split("::")[0], 0.0))
