import os

import pytest
import torch

# Keep CPU tests predictable on the 2-core machines this project runs on.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def clean_plugin_manager(monkeypatch):
    """A plugin manager re-read from the environment, reset again after the test."""
    from kd_plugins import reset_plugin_manager

    reset_plugin_manager()
    yield monkeypatch
    reset_plugin_manager()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (and flash-attn where marked); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
