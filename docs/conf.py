"""Sphinx configuration for the xsam_jax documentation.

Build with ``python3 tasks.py docs`` (``sphinx-build -W -b html docs
docs/_build/html``). Besides the usual settings, this file makes the build
fail when the API reference misses a public symbol: :func:`check_api_reference`
compares the objects documented in the Python domain with the ``__all__``
lists of :data:`PUBLIC_MODULES`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the package must not look for accelerators

import xsam_jax

PUBLIC_MODULES = ("xsam_jax", "xsam_jax.building_blocks", "xsam_jax.sharpness", "xsam_jax.testfns", "xsam_jax.flax")
"""Modules whose ``__all__`` the API reference must cover, name by name."""

# -- Project -------------------------------------------------------------------

project = "xsam_jax"
author = "xsam_jax contributors"
copyright = "2026, xsam_jax contributors"
release = xsam_jax.__version__
version = release

# -- General -------------------------------------------------------------------

extensions = [
  "sphinx.ext.autodoc",  # imports the real objects: signatures are the runtime ones
  "sphinx.ext.napoleon",  # reads the Google-style docstrings (Args:, Returns:, Example:)
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",  # copies MathJax into _static and points mathjax_path at it: no CDN, renders offline
  "myst_parser",  # the guides are Markdown
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show `alphas=DEFAULT_ALPHAS`, not the 21 numbers
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # the Attributes: text says the dtype; jax.Array's path is private

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------

html_theme = "furo"
html_title = f"xsam_jax {release}"
html_static_path: list[str] = []

# -- API completeness ----------------------------------------------------------


def public_symbols(modules: Iterable[str] = PUBLIC_MODULES) -> dict[str, tuple[str, ...]]:
  """The ``__all__`` of every public module, by module name.

  Args:
    modules: dotted module names.

  Returns:
    ``{module: tuple(module.__all__)}``.
  """
  return {name: tuple(importlib.import_module(name).__all__) for name in modules}


def missing_symbols(documented: Collection[str], public: Mapping[str, Iterable[str]]) -> list[str]:
  """Public names with no object of that full name in ``documented``.

  Args:
    documented: full names the reference documents (``"xsam_jax.sam"``).
    public: ``{module: names}``, as :func:`public_symbols` returns.

  Returns:
    The sorted full names (``module.name``) that are not documented.

  Example:
    >>> missing_symbols({"pkg.a", "pkg.sub"}, {"pkg": ["a", "b", "sub"]})
    ['pkg.b']
  """
  return sorted(
    f"{module}.{name}" for module, names in public.items() for name in names if f"{module}.{name}" not in documented
  )


def documented_objects(env) -> set[str]:
  """Full names of every object and module in the environment's Python domain."""
  domain = env.get_domain("py")
  return set(domain.objects) | set(domain.modules)


def check_api_reference(app, env, public: Mapping[str, Iterable[str]] | None = None) -> list[str]:
  """``env-check-consistency`` hook: every public symbol must be documented.

  A missing symbol is reported as a warning that names it, and the build's
  exit status is set to 1, so the build fails with or without ``-W``.

  Args:
    app: the Sphinx application (``None`` when called outside a build).
    env: the build environment, after all documents are read.
    public: ``{module: names}``; default :func:`public_symbols`.

  Returns:
    The missing full names (empty when the reference is complete).
  """
  missing = missing_symbols(documented_objects(env), public_symbols() if public is None else public)
  if missing:
    logging.getLogger(__name__).warning(
      "the API reference (docs/api/) has no entry for these public symbols (from __all__): %s",
      ", ".join(missing),
      type="xsam_jax",
      subtype="api_reference",
    )
    if app is not None:
      app.statuscode = 1
  return missing


# -- Docstrings of re-exported constants ----------------------------------------


def _attribute_doc(obj: Any, name: str) -> list[str]:
  """The attribute docstring of the private module that defines ``name`` as ``obj``.

  Public modules re-export constants (``from xsam_jax._src.xsam import
  DEFAULT_ALPHAS as DEFAULT_ALPHAS``); their docstrings are written where
  they are defined, which autodoc does not look at for data.
  """
  for module in list(sys.modules.values()):
    modname = getattr(module, "__name__", "")
    if not modname.startswith("xsam_jax._src.") or getattr(module, name, None) is not obj:
      continue
    docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    if ("", name) in docs:
      return list(docs[("", name)])
  return []


def _data_docstrings(app, what, name, obj, options, lines) -> None:
  """``autodoc-process-docstring`` hook: a public constant gets the docstring
  written where it is defined, instead of none (or its type's docstring)."""
  del app, options
  if what != "data":
    return
  doc = _attribute_doc(obj, name.rsplit(".", 1)[-1])
  if doc:
    lines[:] = doc


def setup(app):
  app.connect("autodoc-process-docstring", _data_docstrings)
  app.connect("env-check-consistency", check_api_reference)
  return {"parallel_read_safe": True}
