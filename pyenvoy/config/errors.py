"""The one error type a bad configuration produces.

A ConfigError always says *where* (a field path such as
``static_resources.listeners[0].filter_chains[0].filters[0]``) and *what* is wrong,
so the CLI can print it on one line and exit non-zero without a traceback.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration was rejected. ``path`` names the offending field (may be empty)."""

    def __init__(self, message: str, path: str = "") -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def at(self, prefix: str) -> ConfigError:
        """Return the same error with ``prefix`` prepended to its field path."""
        if not prefix:
            return self
        path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else f"{prefix}{self.path}"
        return ConfigError(self.message, path)
