"""The extension registry: Envoy names and type URLs -> factories.

Strategy: every extension module calls ``register(...)`` at import time with its category
(``"network_filter"``, ``"http_filter"``, ...), its Envoy name and the type URL of its
``typed_config``. Lookup goes by type URL first (as Envoy does), then by name. A user's
own extensions register the same way through the ``pyenvoy.extensions`` entry point group.

A factory is called once per config with the unpacked typed_config message and a
``FactoryContext``; it validates, builds a shared config object, and returns a callable
that creates one filter instance per connection or stream.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError

if TYPE_CHECKING:
    from pyenvoy.stats import Scope

log = logging.getLogger("pyenvoy.extensions")

NETWORK_FILTER = "network_filter"
HTTP_FILTER = "http_filter"
LISTENER_FILTER = "listener_filter"
ACCESS_LOGGER = "access_logger"
TRANSPORT_SOCKET = "transport_socket"

FactoryFn = Callable[[Any, "FactoryContext"], Any]


@dataclass
class FactoryContext:
    """What a factory may use while building its shared config.

    ``cluster_manager`` is None only in unit tests; ``stats`` is the server's root scope.
    ``path`` is the config field path of the extension (for ConfigError messages).
    """

    cluster_manager: Any = None
    stats: Scope | None = None
    server: Any = None
    path: str = ""
    listener_scope: Scope | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Extension:
    category: str
    name: str
    type_urls: tuple[str, ...]
    factory: FactoryFn
    # True for filters that must be last in their chain (router, tcp_proxy, HCM).
    terminal: bool = False


_by_type: dict[tuple[str, str], Extension] = {}
_by_name: dict[tuple[str, str], Extension] = {}
_loaded = False

# Built-in extension modules, imported on first lookup.
BUILTIN_MODULES = (
    "pyenvoy.extensions.filters.network.http_connection_manager",
    "pyenvoy.extensions.filters.network.tcp_proxy",
    "pyenvoy.extensions.filters.http.router",
    "pyenvoy.extensions.filters.http.health_check",
)


def register(
    category: str,
    name: str,
    type_urls: str | tuple[str, ...],
    factory: FactoryFn,
    *,
    terminal: bool = False,
    aliases: tuple[str, ...] = (),
) -> Extension:
    urls = (type_urls,) if isinstance(type_urls, str) else tuple(type_urls)
    ext = Extension(category, name, urls, factory, terminal)
    for url in urls:
        _by_type[(category, url)] = ext
    for n in (name, *aliases):
        _by_name[(category, n)] = ext
    return ext


def load_builtin() -> None:
    """Import built-in extensions and the ``pyenvoy.extensions`` entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # an extension not built yet must not break the rest
            if e.name and mod.startswith(e.name):
                log.debug("built-in extension %s not present", mod)
            else:
                raise
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="pyenvoy.extensions"):
            try:
                ep.load()
            except Exception as e:  # a broken plugin is reported, not fatal for the rest
                log.error("failed to load extension entry point %s: %s", ep.name, e)
    except Exception:  # pragma: no cover - importlib.metadata oddities
        pass


def find(category: str, name: str, type_url: str = "") -> Extension | None:
    load_builtin()
    if type_url:
        ext = _by_type.get((category, type_url))
        if ext is not None:
            return ext
    return _by_name.get((category, name))


def require(category: str, name: str, type_url: str = "", path: str = "") -> Extension:
    """Like ``find`` but a missing extension is a ConfigError naming it."""
    ext = find(category, name, type_url)
    if ext is None:
        what = name or type_url_of(type_url)
        detail = f" (typed_config {type_url_of(type_url)})" if name and type_url else ""
        raise ConfigError(f"{what} is not supported by pyenvoy{detail}", path)
    return ext


def type_url_of(type_url: str) -> str:
    """``type.googleapis.com/a.b.C`` -> ``a.b.C``."""
    return type_url.rsplit("/", 1)[-1]
