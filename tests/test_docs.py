"""The Sphinx documentation builds with warnings as errors, and its API
reference covers every public symbol (docs/conf.py fails the build if not)."""

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import xsam_jax

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")
pytest.importorskip("furo")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def conf():
  """docs/conf.py, imported as a module."""
  spec = importlib.util.spec_from_file_location("xsam_jax_docs_conf", DOCS / "conf.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _sphinx_build(srcdir, outdir, *extra):
  """Runs ``sphinx-build -q -b html *extra`` in a fresh process; returns the CompletedProcess."""
  cmd = [
    sys.executable,
    "-m",
    "sphinx",
    "-q",
    "-b",
    "html",
    *extra,
    "-d",
    str(Path(outdir) / ".doctrees"),
    str(srcdir),
    str(outdir),
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)


def test_docs_build_without_warnings_and_document_every_public_symbol(tmp_path, conf):
  out = tmp_path / "html"
  result = _sphinx_build(DOCS, out, "-W")  # as `python3 tasks.py docs` builds
  assert result.returncode == 0, result.stdout + result.stderr
  for page in (
    "index",
    "getting-started",
    "methods",
    "algorithm",
    "experiments",
    "protocol",
    "testing",
    "flax",
    "accumulation",
    "scaling-out",
    "sharpness",
    "performance",
    "api/index",
    "api/optimizers",
    "api/building-blocks",
    "api/sharpness",
    "api/testfns",
    "api/flax",
  ):
    assert (out / f"{page}.html").is_file(), page
  html = "".join(p.read_text() for p in (out / "api").glob("*.html"))
  for module, names in conf.public_symbols().items():
    for name in names:
      full = f"{module}.{name}"
      anchor = f'id="module-{full}"' if full in conf.PUBLIC_MODULES else f'id="{full}"'
      assert anchor in html, f"{full} has no entry in the API reference"
  # The maths renders offline: no page loads a script from another host, and MathJax is in the build.
  remote = re.compile(r"<script[^>]*\ssrc=[\"'](?:https?:)?//", re.I)
  for page in out.rglob("*.html"):
    assert not remote.search(page.read_text()), f"{page.relative_to(out)} loads a remote script"
  for page in ("methods", "algorithm"):
    assert "_static/mathjax/tex-chtml.js" in (out / f"{page}.html").read_text(), page
  assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
  # The included scripts are in the pages: the examples and the multi-device snippets.
  flax_html = (out / "flax.html").read_text()
  assert "Where things go, and what to avoid" in flax_html
  assert "value_grad_and_loss_fn" in flax_html
  assert "probe_loss_fn" in flax_html
  assert "make_m_sharpness_step" in (out / "scaling-out.html").read_text()
  assert "microbatched" in (out / "accumulation.html").read_text()


def test_missing_symbol_fails_the_build(tmp_path):
  """A reference that documents only ``xsam_jax.sam`` must not build, even without ``-W``."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "index.rst").write_text("API\n===\n\n.. autofunction:: xsam_jax.sam\n")
  result = _sphinx_build(src, tmp_path / "html", "-c", str(DOCS))
  message = result.stdout + result.stderr
  assert result.returncode == 1, message
  assert "has no entry for these public symbols" in message
  named = set(re.findall(r"xsam_jax[\w.]*", message.split("has no entry for these public symbols")[1].split("[")[0]))
  assert {"xsam_jax.xsam", "xsam_jax.sharpness.hessian_eigenvalues", "xsam_jax.building_blocks.ascent"} <= named
  assert "xsam_jax.sam" not in named


def test_completeness_check_names_an_undocumented_symbol(conf):
  public = conf.public_symbols()
  documented = {f"{m}.{n}" for m, names in public.items() for n in names}
  assert conf.missing_symbols(documented, public) == []
  fake = dict(public, xsam_jax=(*xsam_jax.__all__, "not_documented"))
  assert conf.missing_symbols(documented, fake) == ["xsam_jax.not_documented"]

  class Domain:
    def __init__(self):
      self.objects = dict.fromkeys(documented)
      self.modules = {}

  class Env:
    @staticmethod
    def get_domain(name):
      assert name == "py"
      return Domain()

  class App:
    statuscode = 0

  app = App()
  assert conf.check_api_reference(app, Env, public=public) == []  # complete
  assert app.statuscode == 0
  assert conf.check_api_reference(app, Env, public=fake) == ["xsam_jax.not_documented"]
  assert app.statuscode == 1  # the build fails


def test_conf_examples(conf):
  result = doctest.testmod(conf)
  assert result.attempted > 0
  assert result.failed == 0


# Pages whose ```python blocks other tests run with their own assertions.
RUN_ELSEWHERE = {"flax.md": "tests/test_flax_scripts.py"}


@pytest.mark.parametrize(
  "page", sorted(p.name for p in DOCS.glob("*.md") if p.name not in RUN_ELSEWHERE and "```python" in p.read_text())
)
def test_python_blocks_of_a_page_run(page, capsys):
  """Every ```python block of a docs page runs as written, in order, in one scope per page (illustrative
  fragments are ```py blocks, and the pages say they show one option each)."""
  scope: dict = {"__name__": "__docs__"}
  for i, block in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)):
    exec(compile(block, f"docs/{page}[python block {i}]", "exec"), scope)
  assert "nan" not in capsys.readouterr().out.lower()


def test_no_tracker_numbers_or_work_notes_in_user_docs():
  """The README and the docs speak of the software only: no issue numbers, no notes on sessions or machine loans."""
  bad = re.compile(r"\(issue \d+|issue \d+\)|issues? \d+[,:']|this session|was lent|no GPU lent|been lent", re.I)
  for path in (ROOT / "README.md", *DOCS.glob("*.md")):
    found = bad.findall(path.read_text())
    assert not found, f"{path.relative_to(ROOT)}: {found}"


BUILDING_BLOCKS = (
  "AscentTrace",
  "adaptive_xsam_plane",
  "ascent",
  "initial_eigvec",
  "power_iteration",
  "probe_losses",
  "rescaled_combination",
  "sharpness_aware_transform",
  "slerp_coefficients",
  "xsam_plane",
)
METHODS = {  # factory: the name the landing page uses
  "sam": "SAM",
  "xsam": "XSAM",
  "msam": "MSAM",
  "lsam": "LSAM",
  "vasso": "VaSSO",
  "eigen_sam": "eigenvector-corrected SAM",
  "gsam": "GSAM",
  "wsam": "WSAM",
  "friendly_sam": "Friendly SAM",
  "looksam": "LookSAM",
  "momentum_sam": "Momentum-SAM",
  "rwp": "RWP",
  "functional_sam": "Functional SAM",
  "preconditioned_sam": "preconditioned SAM",
}


def test_top_level_is_the_optimizers_and_user_helpers():
  """The building blocks live in xsam_jax.building_blocks, not at the top level."""
  import xsam_jax.building_blocks as blocks

  assert set(blocks.__all__) == set(BUILDING_BLOCKS)
  for name in BUILDING_BLOCKS:
    assert not hasattr(xsam_jax, name), name
  states = [n for n in xsam_jax.__all__ if n.endswith("State")]
  assert len(states) == len(METHODS) - 1  # msam and lsam share MultiStepSAMState


def test_landing_page_and_readme_list_every_method():
  index = (DOCS / "index.md").read_text()
  readme = (ROOT / "README.md").read_text()
  methods_page = (DOCS / "methods.md").read_text()
  factories = {n for n in xsam_jax.__all__ if n in METHODS}
  assert factories == set(METHODS)
  for factory, name in METHODS.items():
    assert name in index, f"docs/index.md does not name {name}"
    assert f"`{factory}(" in readme, f"the README's methods list lacks {factory}"
    assert f"`{factory}(" in methods_page, f"docs/methods.md's table lacks {factory}"
