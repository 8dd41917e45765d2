"""Sphinx configuration of the linops API reference.

Build (warnings are errors, as in ``.ci/run``)::

    python3 -m pip install -e ".[docs]"
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages (``docs/api/*.rst``) list every public name of ``linops``, ``estimators``,
``trainers`` and ``reports`` (``tests/test_api_reference.py`` checks they are all there);
autodoc renders their numpy-style docstrings through napoleon.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the packages of this checkout, installed or not

project = "linops"
author = "the linops authors"
copyright = "the linops authors, MIT licence"
try:
    release = metadata.version("linops")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    release = "0+unknown"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

# autodoc: types live in the signatures (STYLE.md: numpy docstrings without types)
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False  # the pages document each name themselves

# napoleon: numpy style only; Attributes as :ivar: so NamedTuple fields are not documented twice
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True
napoleon_use_rtype = False

# markdown (the examples' findings, included from examples/*.md)
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Two checks are off, every other warning is an error: numpy-style References list papers
# whether or not the text cites them as ``[1]_`` (an uncited footnote still renders), and the
# included README and examples/*.md link repository files (``reports/report_schema.json``)
# for reading in the repository, which render here as plain text
suppress_warnings = ["ref.footnote", "myst.xref_missing"]

html_theme = "alabaster"
html_title = f"linops {release}"
html_static_path: list[str] = []


# --------------------------------------------------------------------------- docstring hooks
def _unique_footnotes(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Give each docstring's numbered references page-unique labels.

    numpy-style References (``.. [1]`` cited as ``[1]_``) repeat the same labels in every
    docstring, which docutils reports as duplicate targets once several objects share a
    page; ``[#<object>-1]`` keeps them auto-numbered and distinct (numpydoc does the same).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    for i, line in enumerate(lines):
        line = re.sub(r"^(\s*)\.\. \[(\d+)\]", rf"\1.. [#{slug}-\2]", line)
        lines[i] = re.sub(r"\[(\d+)\]_", rf"[#{slug}-\1]_", line)


def _data_docs(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Document a constant or type alias by its ``#:`` comment, never by its type's docstring.

    A re-exported constant (``estimators.GUESSERS``, a dict) has no doc comment in the
    package's ``__init__``, so autodoc would show ``dict``'s own docstring; this looks the
    comment up in the module that defines the name and otherwise leaves only the value.
    """
    doc = getattr(type(obj), "__doc__", None)
    own = " ".join(doc.split()) if isinstance(doc, str) else ""
    if what not in ("data", "attribute") or not own or " ".join(" ".join(lines).split()) != own:
        return  # a documented name, or one whose docstring is its own
    short = name.rsplit(".", 1)[-1]
    package = name.split(".", 1)[0]
    lines[:] = []
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith(package) or getattr(module, short, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", short) in docs:
            lines[:] = list(docs[("", short)])
            return


def setup(app: Sphinx) -> None:
    """Register the docstring hooks."""
    app.connect("autodoc-process-docstring", _unique_footnotes)
    app.connect("autodoc-process-docstring", _data_docs)
