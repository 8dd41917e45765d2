"""The API reference lists every public name, and every example's findings (issue 18, item 7).

Parses the reference's sources (``docs/api/*.rst``, ``docs/examples/*.md``) rather than
building it: ``.ci/run`` builds the HTML with warnings as errors, which is where a listed
name that does not import or a docstring that does not render fails.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: the packages and public submodules whose ``__all__`` the reference must cover
MODULES = [
    "linops",
    "linops.testing",
    "estimators",
    "trainers",
    "trainers.models",
    "trainers.data",
    "trainers.functional",
    "reports",
]
PAGES = {
    "linops": "linops",
    "estimators": "estimators",
    "trainers": "trainers",
    "reports": "reports",
}

_DIRECTIVE = re.compile(
    r"^\.\. (?:auto)?(?:class|function|data|exception|attribute)::\s+([\w.]+)", re.M
)


def _documented() -> set[str]:
    names: set[str] = set()
    for page in (DOCS / "api").glob("*.rst"):
        names.update(_DIRECTIVE.findall(page.read_text()))
    return names


def _covered(module_name: str, name: str, documented: set[str]) -> bool:
    """Whether ``module.name`` is documented, or the same object under its package."""
    if f"{module_name}.{name}" in documented:
        return True
    package = importlib.import_module(module_name.split(".")[0])
    obj = getattr(importlib.import_module(module_name), name)
    return f"{package.__name__}.{name}" in documented and getattr(package, name, None) is obj


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_reference(module_name: str) -> None:
    module = importlib.import_module(module_name)
    documented = _documented()
    missing = [n for n in module.__all__ if not _covered(module_name, n, documented)]
    page = f"docs/api/{PAGES[module_name.split('.')[0]]}.rst"
    assert not missing, f"add to {page}: " + ", ".join(f"{module_name}.{n}" for n in missing)


def test_the_reference_lists_no_name_that_is_not_public() -> None:
    """A renamed or removed name must leave the pages too (the build would fail on it)."""
    public = {f"{m}.{n}" for m in MODULES for n in importlib.import_module(m).__all__}
    stale = sorted(n for n in _documented() if n not in public)
    assert not stale, f"documented but not in any __all__: {stale}"


def test_one_page_per_package_and_every_example_linked() -> None:
    index = (DOCS / "index.rst").read_text()
    for page in ["getting_started", "examples", *(f"api/{p}" for p in PAGES.values())]:
        assert re.search(rf"^\s+{re.escape(page)}$", index, re.M), page
    notes = sorted(p.name for p in (ROOT / "examples").glob("*.md"))
    assert notes, "examples/*.md: none found"
    for note in notes:
        page = DOCS / "examples" / note
        assert page.exists(), f"docs/examples/{note}: missing (include ../../examples/{note})"
        assert f"../../examples/{note}" in page.read_text()


def test_the_getting_started_page_ends_where_the_readme_says() -> None:
    """The page includes the README up to its API reference section, which must exist."""
    page = (DOCS / "getting_started.md").read_text()
    marker = re.search(r':end-before: "([^"]+)"', page)
    assert marker is not None
    assert marker.group(1) in (ROOT / "README.md").read_text()
