"""The plugin manager and the component registry.

Built-in components are ordinary plugins (``DEFAULT_PLUGINS``) registered through the same manager and the
same ``register`` callbacks as third-party ones. Third-party plugins are discovered through the
``kd_plugins`` entry-point group.

Environment switches (read when the manager is first created, or when ``reset_plugin_manager()`` is called):

* ``KD_PLUGINS_DISABLE_AUTOLOAD=1`` -- load no entry-point plugins (built-ins only).
* ``KD_PLUGINS_ALLOW=name1,name2`` -- load only the entry points with these names.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from kd_plugins import hookspecs
from kd_plugins.errors import DuplicateComponentError, PluginLoadError, UnknownComponentError

ENTRY_POINT_GROUP = "kd_plugins"
DISABLE_AUTOLOAD_ENV = "KD_PLUGINS_DISABLE_AUTOLOAD"
ALLOW_LIST_ENV = "KD_PLUGINS_ALLOW"

DEFAULT_PLUGINS = (
    "kd_plugins.components.logit",
    "kd_plugins.components.alignment",
    "kd_plugins.components.cross_vocab",
    "kd_plugins.components.schedulers",
    "kd_plugins.components.dynamic_schedulers",
    "kd_plugins.components.curriculum",
)

# family name -> contribution hook name
FAMILIES = {
    "logit": "register_logit_terms",
    "alignment": "register_alignment_terms",
    "scheduler": "register_schedulers",
}

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class Component:
    """One registered component: its family, name, builder and the plugin that provided it."""

    family: str
    name: str
    builder: Callable[..., Any]
    provider: str


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, creating it (and autoloading plugins) on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _create_manager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager, so the next call re-reads the environment and entry points."""
    global _manager
    with _lock:
        _manager = None


def available_components(plugin_manager: pluggy.PluginManager | None = None) -> dict[str, dict[str, str]]:
    """Return ``{family: {name: provider}}`` for every registered component."""
    registry = build_registry(plugin_manager)
    return {family: {name: c.provider for name, c in sorted(comps.items())} for family, comps in registry.items()}


def get_component(family: str, name: str, plugin_manager: pluggy.PluginManager | None = None) -> Component:
    """Look up one component; an unknown name raises an error listing the available names of the family."""
    if family not in FAMILIES:
        raise UnknownComponentError(f"unknown component family {family!r}; families are {sorted(FAMILIES)}")
    components = build_registry(plugin_manager)[family]
    if name not in components:
        raise UnknownComponentError(
            f"unknown {family} component {name!r}; available {family} components: "
            f"{', '.join(sorted(components)) or '(none)'}"
        )
    return components[name]


def family_of(name: str, plugin_manager: pluggy.PluginManager | None = None) -> str:
    """Return the family of a transfer term name (``logit`` or ``alignment``)."""
    registry = build_registry(plugin_manager)
    for family in ("logit", "alignment"):
        if name in registry[family]:
            return family
    available = sorted(set(registry["logit"]) | set(registry["alignment"]))
    raise UnknownComponentError(f"unknown transfer term {name!r}; available terms: {', '.join(available)}")


def build_registry(plugin_manager: pluggy.PluginManager | None = None) -> dict[str, dict[str, Component]]:
    """Call every contribution hook and collect ``{family: {name: Component}}``.

    Each hook implementation gets its own ``register`` callback, so the registry knows which plugin provided
    which name and can name both providers of a duplicate.
    """
    pm = plugin_manager or get_plugin_manager()
    registry: dict[str, dict[str, Component]] = {}
    for family, hook_name in FAMILIES.items():
        components: dict[str, Component] = {}
        caller = getattr(pm.hook, hook_name)
        # pluggy calls the most recently registered first; reverse so built-ins register first and a later
        # duplicate is reported against the built-in.
        for impl in reversed(caller.get_hookimpls()):
            provider = impl.plugin_name
            impl.function(register=_register_callback(family, provider, components))
        registry[family] = components
    return registry


def _register_callback(family: str, provider: str, components: dict[str, Component]):
    def register(name: str, builder: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(
                f"plugin {provider!r} registered an invalid {family} component name {name!r}: names are lowercase "
                "letters, digits and '_', starting with a letter"
            )
        if not callable(builder):
            raise TypeError(f"plugin {provider!r} registered {family} component {name!r} with a non-callable builder")
        if name in components:
            raise DuplicateComponentError(
                f"{family} component {name!r} is registered twice: by {components[name].provider!r} and by "
                f"{provider!r}; uninstall or disable one of them (see {ALLOW_LIST_ENV})"
            )
        components[name] = Component(family=family, name=name, builder=builder, provider=provider)

    return register


def _create_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return pm
    allow = {n.strip() for n in os.environ.get(ALLOW_LIST_ENV, "").split(",") if n.strip()}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow and entry_point.name not in allow:
            continue
        if pm.has_plugin(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # report the plugin by name, keep the original error chained
            raise PluginLoadError(
                f"kd_plugins entry point {entry_point.name!r} ({entry_point.value}) failed to load: "
                f"{type(exc).__name__}: {exc}. Set {DISABLE_AUTOLOAD_ENV}=1 or {ALLOW_LIST_ENV}=... to skip it."
            ) from exc
        pm.register(plugin, name=entry_point.name)
    return pm
