"""Embedding: start and stop a pyenvoy proxy inside a running event loop.

Strategy: ``Proxy`` wraps a ``Server`` built from a config given as a dict, a YAML/JSON
string, a file path or a Bootstrap message; ``start()`` binds everything on the caller's
loop (port 0 listeners get ephemeral ports) and ``port(name)`` reports what was bound, so a
test suite can put pyenvoy in front of the service under test::

    async with Proxy({"static_resources": {...}}) as proxy:
        url = f"http://127.0.0.1:{proxy.port('listener_0')}/"
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyenvoy.server import Server


class Proxy:
    def __init__(self, config: dict[str, Any] | str | os.PathLike[str] | Any, **options: Any) -> None:
        from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

        from pyenvoy.config import load_bootstrap
        from pyenvoy.options import ServerOptions

        if isinstance(config, Bootstrap):
            bootstrap = config
        elif isinstance(config, dict):
            bootstrap = load_bootstrap(data=config)
        elif isinstance(config, os.PathLike):
            bootstrap = load_bootstrap(path=os.fspath(config))
        elif isinstance(config, str):
            if "\n" not in config and os.path.exists(config):
                bootstrap = load_bootstrap(path=config)
            else:
                bootstrap = load_bootstrap(yaml_text=config)
        else:
            raise TypeError("config must be a dict, a YAML/JSON string, a path or a Bootstrap")
        self.bootstrap = bootstrap
        self.options = ServerOptions(**options) if options else ServerOptions()
        self.server: Server | None = None

    async def start(self) -> Proxy:
        from pyenvoy.server import Server

        self.server = Server(self.bootstrap, self.options)
        await self.server.start()
        return self

    async def stop(self, drain_time: float = 0.0) -> None:
        if self.server is not None:
            await self.server.stop(drain_time)
            self.server = None

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what was bound ----------------------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        """Listener name -> bound port."""
        assert self.server is not None and self.server.listener_manager is not None, "not started"
        return {
            listener.name: listener.local_address[1]
            for listener in self.server.listener_manager.listeners
            if listener.local_address is not None
        }

    def port(self, listener_name: str | None = None) -> int:
        """The bound port of ``listener_name`` (or of the only/first listener)."""
        ports = self.ports
        if listener_name is None:
            return next(iter(ports.values()))
        return ports[listener_name]

    @property
    def admin_port(self) -> int | None:
        assert self.server is not None, "not started"
        addr = self.server.admin_address
        return addr[1] if addr else None

    def stats(self) -> dict[str, int]:
        """Counters and gauges by Envoy name."""
        assert self.server is not None, "not started"
        self.server.refresh_server_stats()
        s = self.server.stats
        out = {n: c.value for n, c in s.counters.items()}
        out.update({n: g.value for n, g in s.gauges.items()})
        return out
