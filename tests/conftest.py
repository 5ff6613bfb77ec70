import collections
import inspect
import sys
from pathlib import Path

import pytest
import torch

import kd_plugins.plugins
from kd_plugins import hookimpl, hookspecs

# Keep CPU tests predictable on the 2-core machines this project runs on.
torch.set_num_threads(min(2, torch.get_num_threads()))

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def clean_plugin_manager(monkeypatch):
    """A plugin manager re-read from the environment, reset again after the test."""
    from kd_plugins import reset_plugin_manager

    reset_plugin_manager()
    yield monkeypatch
    reset_plugin_manager()


def pytest_collection_modifyitems(config, items):
    # the hook-call meta-test reads what every other test made the library call: it runs last
    last = [item for item in items if item.name == "test_every_hookspec_is_called_by_the_library_in_the_suite"]
    items[:] = [item for item in items if item not in last] + last
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (and flash-attn where marked); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- every hook the library declares is called by the library during the suite --------------------------------

SKIPPED_AT_COLLECTION: set[Path] = set()  # test files skipped as a whole (an optional extra is not installed)


def pytest_collectreport(report):
    if report.skipped and report.fspath.endswith(".py"):
        SKIPPED_AT_COLLECTION.add(Path(report.fspath).resolve())



def hookspec_names() -> list[str]:
    return sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
                  if hasattr(obj, "kd_plugins_spec"))


class HookCallRecorder:
    """A plugin implementing every hookspec that counts the calls it receives, by hook and by calling module.

    It is registered in every process-wide plugin manager the suite creates (see ``_recording_create_manager``),
    so each hook the library calls -- through ``pm.hook.<name>(...)`` or, for the contribution hooks, by calling
    each implementation with its own ``register`` -- reaches it. It contributes no component and returns None.
    """

    def __init__(self):
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        for name in hookspec_names():
            setattr(self, name, self._impl(name))

    def _impl(self, name):
        def record(**_arguments):  # takes none of the spec's arguments: pluggy passes none, a direct call any
            self.calls[name, _calling_module()] += 1

        record.__name__ = name
        return hookimpl(record)

    def callers(self, name: str) -> set[str]:
        return {module for (hook, module), count in self.calls.items() if hook == name and count}


def _calling_module() -> str:
    """The module of the first frame outside this file and pluggy: who called the hook."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != __name__ and not module.startswith("pluggy"):
            return module
        frame = frame.f_back
    return "?"


HOOK_CALLS = HookCallRecorder()
_create_manager = kd_plugins.plugins._create_manager


def _recording_create_manager():
    manager = _create_manager()
    manager.register(HOOK_CALLS, name="tests.hook_call_recorder")
    return manager


kd_plugins.plugins._create_manager = _recording_create_manager
