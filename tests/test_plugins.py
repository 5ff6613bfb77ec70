"""The plugin manager: built-ins through the same path as third parties, entry points, switches, errors."""

import sys
import textwrap

import pytest

import kd_plugins
from kd_plugins import hookimpl
from kd_plugins.errors import DuplicateComponentError, PluginLoadError, UnknownComponentError
from kd_plugins.plugins import ALLOW_LIST_ENV, DISABLE_AUTOLOAD_ENV, DEFAULT_PLUGINS, get_component

BUILTIN_TERMS = {
    "logit": {"forward_kl", "reverse_kl", "generalized_jsd", "dkd"},
    "alignment": {"contrastive", "mse", "cosine", "attention_relation"},
    "scheduler": {"constant", "linear", "cosine"},
}


def test_builtins_are_registered_as_default_plugins(clean_plugin_manager):
    pm = kd_plugins.get_plugin_manager()
    for module_name in DEFAULT_PLUGINS:
        assert pm.has_plugin(module_name)
    components = kd_plugins.available_components()
    for family, names in BUILTIN_TERMS.items():
        assert names <= set(components[family]), family
    assert components["logit"]["dkd"] == "kd_plugins.components.logit"
    assert components["alignment"]["contrastive"] == "kd_plugins.components.alignment"
    assert components["scheduler"]["linear"] == "kd_plugins.components.schedulers"


class _ExtraTerms:
    @hookimpl
    def register_alignment_terms(self, register):
        register("my_term", lambda student, teacher: None)


def test_plugin_object_registered_in_test(clean_plugin_manager):
    pm = kd_plugins.get_plugin_manager()
    pm.register(_ExtraTerms(), name="extra")
    assert kd_plugins.available_components()["alignment"]["my_term"] == "extra"


def test_duplicate_name_names_both_providers(clean_plugin_manager):
    class Clash:
        @hookimpl
        def register_logit_terms(self, register):
            register("dkd", lambda student, teacher: None)

    pm = kd_plugins.get_plugin_manager()
    pm.register(Clash(), name="clashing_plugin")
    with pytest.raises(DuplicateComponentError) as info:
        kd_plugins.available_components()
    message = str(info.value)
    assert "kd_plugins.components.logit" in message and "clashing_plugin" in message and "'dkd'" in message


def test_unknown_name_lists_available_names(clean_plugin_manager):
    with pytest.raises(UnknownComponentError) as info:
        get_component("scheduler", "nope")
    assert "constant" in str(info.value) and "linear" in str(info.value) and "'nope'" in str(info.value)


def test_invalid_name_is_rejected(clean_plugin_manager):
    class BadName:
        @hookimpl
        def register_schedulers(self, register):
            register("Bad-Name", object)

    kd_plugins.get_plugin_manager().register(BadName(), name="bad")
    with pytest.raises(ValueError, match="Bad-Name"):
        kd_plugins.available_components()


# --- entry points: a real (tiny) distribution on sys.path ---------------------------------------------------


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """Write a minimal installed distribution (dist-info + module) and put it on sys.path."""

    def make(dist_name: str, module_source: str, entry_name: str = "demo_plugin"):
        module = f"{dist_name}_mod"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / f"{dist_name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[kd_plugins]\n{entry_name} = {module}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        return module

    yield make
    for name in list(sys.modules):
        if name.endswith("_mod") and name.startswith("kdp_test"):
            del sys.modules[name]


GOOD_PLUGIN = """
from kd_plugins import hookimpl

@hookimpl
def register_schedulers(register):
    register("from_entry_point", lambda base_weights: None)
"""


def test_entry_point_plugin_is_discovered(clean_plugin_manager, installed_distribution):
    installed_distribution("kdp_test_good", GOOD_PLUGIN)
    components = kd_plugins.available_components()
    assert components["scheduler"]["from_entry_point"] == "demo_plugin"


def test_autoload_switch_disables_entry_points(clean_plugin_manager, installed_distribution):
    installed_distribution("kdp_test_good", GOOD_PLUGIN)
    clean_plugin_manager.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert "from_entry_point" not in kd_plugins.available_components()["scheduler"]


def test_allow_list_filters_entry_points(clean_plugin_manager, installed_distribution):
    installed_distribution("kdp_test_good", GOOD_PLUGIN)
    clean_plugin_manager.setenv(ALLOW_LIST_ENV, "someone_else")
    assert "from_entry_point" not in kd_plugins.available_components()["scheduler"]
    kd_plugins.reset_plugin_manager()
    clean_plugin_manager.setenv(ALLOW_LIST_ENV, "demo_plugin")
    assert "from_entry_point" in kd_plugins.available_components()["scheduler"]


def test_broken_plugin_is_reported_by_name(clean_plugin_manager, installed_distribution):
    installed_distribution("kdp_test_broken", "raise RuntimeError('boom inside plugin')\n", entry_name="broken_one")
    with pytest.raises(PluginLoadError) as info:
        kd_plugins.get_plugin_manager()
    assert "broken_one" in str(info.value) and "boom inside plugin" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
