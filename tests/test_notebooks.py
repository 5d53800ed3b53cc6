"""The notebooks in notebooks/: each .py / .ipynb pair is in sync, and each runs.

Every notebook is a jupytext percent-format source ``notebooks/<name>.py`` paired
with ``notebooks/<name>.ipynb`` (``formats: ipynb,py:percent``). The tests
check that the two hold the same cells, that the committed ``.ipynb`` stays
small, and execute the ``.ipynb`` with nbclient in the quick configuration
(``XSAM_NOTEBOOK_QUICK=1``), from ``notebooks/`` as the working directory and
with an empty data directory, as on a fresh clone (MNIST-1D is then generated
locally; nothing is downloaded). Any cell error fails the test.
"""

import os
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("quickstart", "understanding_xsam")
SLOW = ("understanding_xsam",)
"""Run only with ``-m slow`` (about 2 minutes on 2 cores); the quickstart stays in the default run."""
MAX_IPYNB_BYTES = 300 * 1024
KERNEL = "python3"


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def _ensure_kernel() -> str:
  """The name of a Python kernel spec, registering this interpreter's ipykernel if none is found."""
  from jupyter_client.kernelspec import KernelSpecManager

  if KERNEL not in KernelSpecManager().find_kernel_specs():
    import ipykernel.kernelspec

    # Into this environment's prefix (share/jupyter/kernels), where jupyter_client looks.
    ipykernel.kernelspec.install(user=False, prefix=sys.prefix)
  assert KERNEL in KernelSpecManager().find_kernel_specs(), "no python3 kernel spec could be registered"
  return KERNEL


def test_every_notebook_is_listed():
  """Each .py / .ipynb in notebooks/ is one of NOTEBOOKS, and each has both files."""
  stems = {p.stem for p in NOTEBOOK_DIR.glob("*.py")} | {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
  assert stems == set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync(name):
  """The .py source and the .ipynb hold the same cells, and both declare the pairing."""
  py_path, ipynb_path = NOTEBOOK_DIR / f"{name}.py", NOTEBOOK_DIR / f"{name}.ipynb"
  from_py = jupytext.read(py_path)
  from_ipynb = nbformat.read(ipynb_path, as_version=4)
  assert _cells(from_py) == _cells(from_ipynb), (
    f"{py_path.name} and {ipynb_path.name} differ: run `jupytext --sync notebooks/{name}.py`"
  )
  for nb in (from_py, from_ipynb):
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  assert ipynb_path.stat().st_size < MAX_IPYNB_BYTES, f"{ipynb_path.name} is over {MAX_IPYNB_BYTES} bytes"


@pytest.fixture(scope="module")
def fresh_data_dir(tmp_path_factory):
  """An empty data directory shared by the notebooks: MNIST-1D is generated once, locally."""
  return tmp_path_factory.mktemp("data_cache")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NOTEBOOKS])
def test_notebook_runs(name, fresh_data_dir, monkeypatch):
  """The notebook executes without a cell error in the quick configuration."""
  monkeypatch.setenv("XSAM_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("XSAM_NOTEBOOK_DATA_DIR", str(fresh_data_dir))
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
    nb,
    kernel_name=_ensure_kernel(),
    timeout=600,  # per cell
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
  elapsed = time.perf_counter() - start
  text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
  assert "quick configuration: True" in text
  print(f"{name}: executed in {elapsed:.0f} s")
