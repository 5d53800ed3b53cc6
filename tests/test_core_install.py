"""The library needs only its core dependencies (jax, optax, chex, numpy).

(a) In a subprocess that refuses to import any optional dependency, the
package imports and SAM/XSAM take a step. (b) In a fresh virtual
environment, ``pip install`` of the package (non-editable, core dependencies
only, from pip's configured index) gives a working ``import xsam_jax``, with
the version and the ``py.typed`` marker in the built wheel.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest

import xsam_jax

ROOT = Path(__file__).resolve().parents[1]

OPTIONAL = (
  "flax",
  "tensorflow",
  "tensorflow_datasets",
  "orbax",
  "matplotlib",
  "tqdm",
  "sklearn",
  "mnist1d",
  "experiments",
)

# One SAM and one XSAM step (with a probe) on a tiny least-squares problem;
# fails if any optional top-level package got imported.
STEP = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, optax
    import xsam_jax, xsam_jax.sharpness, xsam_jax.testfns

    x = jnp.linspace(-1.0, 1.0, 8)[:, None] * jnp.ones((1, 3))
    y = jnp.sin(x).sum(axis=1)
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    loss_fn = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    for opt in (xsam_jax.sam(0.05), xsam_jax.xsam(0.05, 0.1, alpha_update_period=1)):
        tx = optax.chain(opt, optax.sgd(0.1))
        state = tx.init(params)
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
        new = optax.apply_updates(params, updates)
        assert float(loss_fn(new)) < float(loss_fn(params)), type(opt)
    optional = OPTIONAL
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in optional)
    assert not loaded, f"the core imported optional packages: {loaded}"
    print("xsam_jax", xsam_jax.__version__, "from", xsam_jax.__file__, "alpha", float(state[0].alpha))
""").replace("OPTIONAL", repr(OPTIONAL))

# Makes every optional package look not installed.
BLOCKER = textwrap.dedent("""
    import sys

    class _NoOptionalDependencies:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _NoOptionalDependencies())
""").replace("OPTIONAL", repr(OPTIONAL))


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")


def test_version_is_the_installed_distributions_version():
  assert importlib.metadata.version("xsam_jax") == xsam_jax.__version__
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project
  assert "version" in project["dynamic"]


def test_py_typed_marker_is_in_the_package():
  assert (Path(xsam_jax.__file__).parent / "py.typed").is_file()


def test_core_imports_no_optional_dependency():
  result = subprocess.run(
    [sys.executable, "-c", BLOCKER + STEP],
    cwd=ROOT,
    env=_env(),
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "xsam_jax " + xsam_jax.__version__ in result.stdout


def test_blocker_blocks():
  """The blocker of the test above really hides an optional package."""
  code = BLOCKER + "import experiments.train\n"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=_env(), check=False, capture_output=True, text=True, timeout=300
  )
  assert result.returncode != 0
  assert "blocked by the test" in result.stderr


def _copy_sources(dest: Path) -> Path:
  """The files a source build needs (so the build leaves nothing in the checkout)."""
  dest.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(ROOT / name, dest / name)
  shutil.copytree(ROOT / "xsam_jax", dest / "xsam_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return dest


@pytest.mark.slow
def test_fresh_venv_core_install(tmp_path):
  """pip install into a new venv, core dependencies only; then import and step.

  Marked slow (outside the default run, ``pytest -m slow`` runs it): 40 to
  70 s on the project's 2-core machine, most of it pip installing jax and
  jaxlib again; test (a) above keeps the import isolation in the default run.
  """
  start = time.perf_counter()
  venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
  bindir = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin")
  python = str(bindir / "python")
  src = _copy_sources(tmp_path / "src")
  pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]

  def run(cmd, **kw):
    result = subprocess.run(
      cmd, cwd=tmp_path, env=_env(), check=False, capture_output=True, text=True, timeout=900, **kw
    )
    assert result.returncode == 0, " ".join(map(str, cmd)) + "\n" + result.stdout + result.stderr
    return result

  run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)])
  (wheel,) = (tmp_path / "dist").glob("xsam_jax-*.whl")
  assert wheel.name.startswith(f"xsam_jax-{xsam_jax.__version__}-")
  files = set(zipfile.ZipFile(wheel).namelist())
  assert {"xsam_jax/py.typed", "xsam_jax/_version.py", "xsam_jax/__init__.py", "xsam_jax/_src/xsam.py"} <= files
  assert not any(f.startswith(("tests/", "experiments/", "docs/")) or f == "conftest.py" for f in files)

  run([*pip, "install", str(wheel)])  # the core dependencies, from pip's configured index
  result = run([python, "-c", STEP])
  assert f"xsam_jax {xsam_jax.__version__} from {tmp_path / 'venv'}" in result.stdout
  check = (
    "import importlib.metadata as m, importlib.util as u, xsam_jax; "
    "assert m.version('xsam_jax') == xsam_jax.__version__; "
    f"missing = [n for n in {OPTIONAL[:-1]!r} if u.find_spec(n) is not None]; "
    "assert not missing, missing"
  )
  run([python, "-c", check])
  print(f"fresh venv install + step: {time.perf_counter() - start:.1f} s")
