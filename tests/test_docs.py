"""Docs cannot drift from the code: every hook and every public name is documented."""

import inspect
import re
from pathlib import Path

import kd_plugins
from kd_plugins import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
TESTS = Path(__file__).resolve().parent


def _hook_names():
    return [name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(obj, "kd_plugins_spec")]


def test_every_hookspec_is_documented():
    page = (DOCS / "hooks.md").read_text()
    names = _hook_names()
    assert len(names) >= 5
    missing = [name for name in names if f"`{name}(" not in page]
    assert not missing, f"hooks missing from docs/hooks.md: {missing}"


def test_every_hookspec_is_exercised_by_a_test():
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_docs.py")
    untested = [name for name in _hook_names() if not re.search(rf"def {name}\(", sources)]
    assert not untested, f"hooks without a test implementing them: {untested}"


def test_every_public_name_is_documented():
    page = (DOCS / "api.md").read_text()
    missing = [name for name in kd_plugins.__all__ if f"`{name}`" not in page]
    assert not missing, f"public names missing from docs/api.md: {missing}"
