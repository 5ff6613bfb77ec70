"""Module-level transfer terms and schedulers; each module is a built-in plugin registered through pluggy."""
