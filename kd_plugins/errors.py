"""Exception types. Every error message names the problem and how to fix it."""


class KDError(Exception):
    """Base class of kd_plugins errors."""


class ConfigError(KDError, ValueError):
    """A configuration value is invalid. The message names the field, the bad value and what is allowed."""


class UnknownComponentError(KDError, KeyError):
    """A component name is not registered. The message lists the available names of that family."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(KDError):
    """Two plugins registered the same component name. The message names both providers."""


class PluginLoadError(KDError, ImportError):
    """An entry-point plugin failed to import. The message names it; the original error is chained."""


class IncompatibleModelsError(KDError, ValueError):
    """Teacher and student cannot be distilled as configured (vocabulary, layers, heads)."""
