"""Drive a pyenvoy Server without sockets: for tests (yours and ours) and benchmarks that
check the exact bytes and stats of the HTTP path.

Strategy: ``InMemoryProxy`` builds a fresh ``Server`` from a bootstrap with one listener
and one cluster, and wires one downstream ``Connection`` and one upstream HTTP/1
``ActiveClient`` (idle in the cluster's pool) to ``MemoryTransport``s, which keep what is
written in ``out``. ``exchange(request, response)`` feeds the request, ends the loop pass
(``flush``: writes leave once per pass, pyenvoy.network.write_batch), feeds the upstream's
response and returns what each side received. ``proxy_config`` renders such a bootstrap
with your routes and extra HCM or router fields (cluster ``backend``, 127.0.0.1:9, which is
never dialled: the upstream connection is already in the pool).

    from pyenvoy.testing import InMemoryProxy, proxy_config

    async def test_my_route() -> None:   # inside a running loop, as the proxy would be
        proxy = InMemoryProxy(proxy_config(routes='''- match: {prefix: "/"}
      route: {cluster: backend, prefix_rewrite: "/v2/"}'''))
        down, up = proxy.exchange(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        assert up.startswith(b"GET /v2/a HTTP/1.1")
"""

from __future__ import annotations

from typing import Any

from pyenvoy.config import load_bootstrap
from pyenvoy.network.connection import Connection
from pyenvoy.server import Server
from pyenvoy.upstream.conn_pool import ActiveClient

__all__ = ["DEFAULT_ROUTES", "InMemoryProxy", "MemoryTransport", "proxy_config"]

DEFAULT_ROUTES = """\
- match: { prefix: "/" }
  route: { cluster: backend }"""

_CONFIG = """
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
%(hcm_extra)s
          route_config:
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
%(routes)s
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
%(router_extra)s
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9 } } } }] }]
"""


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.strip("\n").splitlines())


def proxy_config(hcm_extra: str = "", routes: str = DEFAULT_ROUTES, router_extra: str = "") -> str:
    """The bootstrap YAML: ``hcm_extra`` HCM fields, ``routes`` the route list (YAML list
    items), ``router_extra`` Router fields; cluster ``backend`` is 127.0.0.1:9."""
    return _CONFIG % {
        "hcm_extra": _indent(hcm_extra, 10),
        "routes": _indent(routes, 14),
        "router_extra": _indent(router_extra, 14),
    }


class MemoryTransport:
    """Just enough of an asyncio transport: writes are kept in ``out``."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 10000)}.get(
            name, default
        )

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class InMemoryProxy:
    """One downstream connection and one idle upstream connection of a fresh Server."""

    def __init__(self, config: str | None = None) -> None:
        self.server = Server(load_bootstrap(yaml_text=config or proxy_config()))
        lm = self.server.listener_manager
        if lm is None or not lm.listeners:
            raise ValueError("InMemoryProxy needs a config with a listener")
        listener: Any = lm.listeners[0]
        self.conn = Connection(listener.filter_factories, listener, listener.buffer_limit)
        self.down = MemoryTransport()
        self.conn.connection_made(self.down)  # type: ignore[arg-type]
        cm: Any = self.server.cluster_manager
        self.pool = cm.http_conn_pool(cm.get("backend").hosts[0])
        self.client = ActiveClient(self.pool)
        self.up = MemoryTransport()
        self.client.connection_made(self.up)  # type: ignore[arg-type]
        self.client.connected = True
        self.pool.clients.add(self.client)
        self.pool.on_client_idle(self.client)

    def exchange(self, request: bytes, response: bytes) -> tuple[bytes, bytes]:
        """(what the client received, what the upstream received) for one exchange."""
        self.down.out.clear()
        self.up.out.clear()
        self.conn.data_received(request)
        self.flush()
        if self.up.out:
            self.client.data_received(response)
            self.flush()
        return b"".join(self.down.out), b"".join(self.up.out)

    def flush(self) -> None:
        """End of a loop pass: what the connections wrote reaches the transports
        (pyenvoy.network.write_batch; nothing waits when built outside a running loop)."""
        for batch in {self.conn._batch, self.client._batch}:
            if batch is not None:
                batch.run()

    def counter(self, name: str) -> int:
        return self.server.stats.counters[name].value
