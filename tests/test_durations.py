"""The per-file durations table: written, read back, and the longest-first order it gives the suite."""

from tests import durations


def test_table_reads_back_to_a_tenth_of_a_second(tmp_path):
  seconds = {"tests/test_a.py": 12.34, "xsam_jax/_src/b.py": 0.05, "tests/test_c.py": 3.0}
  path = tmp_path / "d.md"
  path.write_text(durations.format_table(seconds, exitstatus=0, cpu="CPU", cores=2, date="2026-12-06"))
  back = durations.read(path)
  assert back.keys() == seconds.keys()
  for name, s in seconds.items():
    assert abs(back[name] - s) <= 0.05 + 1e-9, name
  assert durations.read(tmp_path / "missing.md") == {}


def test_longest_files_first_keeps_each_files_order():
  ids = ["t/a.py::1", "t/a.py::2", "t/b.py::1", "t/c.py::1", "t/c.py::2", "t/d.py::1"]
  order = durations.longest_files_first(ids, {"t/c.py": 9.0, "t/b.py": 1.0})
  assert [ids[i] for i in order] == ["t/c.py::1", "t/c.py::2", "t/b.py::1", "t/a.py::1", "t/a.py::2", "t/d.py::1"]


def test_the_committed_table_reads():
  """The suite's order comes from results/tests/durations.md: it must parse, with the heaviest files in it."""
  from pathlib import Path

  seconds = durations.read(Path(__file__).resolve().parents[1] / "results" / "tests" / "durations.md")
  assert len(seconds) > 20
  assert all(name.endswith(".py") and s >= 0 for name, s in seconds.items())
