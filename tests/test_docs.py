"""Docs cannot drift from the code: every hook and every public name is documented."""

import inspect
from pathlib import Path

import pytest

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


def test_every_hookspec_is_called_by_the_library_in_the_suite(request):
    """Every hook is called at least once, by kd_plugins itself (not by a test calling ``pm.hook``), while the suite
    runs: the recording plugin of ``tests/conftest.py`` sits in every plugin manager the suite creates. Runs last,
    and only when the whole suite is collected (a subset may legitimately call fewer hooks)."""
    from tests.conftest import HOOK_CALLS, SKIPPED_AT_COLLECTION, hookspec_names

    collected = {Path(str(item.path)).resolve() for item in request.session.items} | SKIPPED_AT_COLLECTION
    missing_files = sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if p not in collected)
    if missing_files:
        pytest.skip(f"checks the hooks the whole suite calls; this run left out {len(missing_files)} test files "
                    f"(e.g. {missing_files[0]})")
    names = hookspec_names()
    assert names == _hook_names() and len(names) >= 5
    uncalled = {name: sorted(HOOK_CALLS.callers(name)) for name in names
                if not any(module.startswith("kd_plugins") for module in HOOK_CALLS.callers(name))}
    assert not uncalled, f"hooks the library never called during the suite (callers seen: {uncalled})"


def test_every_public_name_is_documented():
    page = (DOCS / "api.md").read_text()
    missing = [name for name in kd_plugins.__all__ if f"`{name}`" not in page]
    assert not missing, f"public names missing from docs/api.md: {missing}"
