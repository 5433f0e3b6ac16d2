"""Micro-benchmark of pyenvoy's per-request Python cost, without sockets.

Strategy: build a real Server from a small config, then push a keep-alive GET through the
real objects (Connection -> HTTP connection manager -> router -> pool -> upstream codec and
back) using in-memory fake transports, so only pyenvoy's own code is timed. Run it before
and after touching the hot path:

    python benchmarks/hot_path.py            # us per request
    python benchmarks/hot_path.py --profile  # cProfile, top functions
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = """
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
          route_config:
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9 } } } }] }]
"""

REQUEST = b"GET /hello HTTP/1.1\r\nHost: localhost:10000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-type: text/plain\r\n\r\nhello world\n"


class FakeTransport:
    """Just enough of an asyncio transport for the hot path."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peername":
            return ("127.0.0.1", 40000)
        if name == "sockname":
            return ("127.0.0.1", 10000)
        return default

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


async def run(n: int, profile: bool) -> float:
    from pyenvoy.config import load_bootstrap
    from pyenvoy.network.connection import Connection
    from pyenvoy.server import Server
    from pyenvoy.upstream.conn_pool import ActiveClient

    server = Server(load_bootstrap(yaml_text=CONFIG))
    listener = server.listener_manager.listeners[0]  # type: ignore[union-attr]
    conn = Connection(listener.filter_factories, listener, listener.buffer_limit)
    down = FakeTransport()
    conn.connection_made(down)  # type: ignore[arg-type]
    cluster = server.cluster_manager.get("backend")  # type: ignore[union-attr]
    host = cluster.hosts[0]
    pool = server.cluster_manager.http_conn_pool(host)  # type: ignore[union-attr]
    # One established upstream connection, idle in the pool.
    client = ActiveClient(pool)
    up = FakeTransport()
    client.connection_made(up)  # type: ignore[arg-type]
    client.connected = True
    pool.clients.add(client)
    pool.on_client_idle(client)

    batch = conn._batch  # the loop's WriteBatch: one run() per loop pass, as in a server
    assert batch is not None

    def one() -> None:
        conn.data_received(REQUEST)
        batch.run()
        client.data_received(RESPONSE)
        batch.run()

    for _ in range(1000):
        one()
    assert down.out and down.out[-1].startswith(b"HTTP/1.1 200 OK"), down.out[-1:]
    assert up.out[-1].startswith(b"GET /hello HTTP/1.1"), up.out[-1:]
    down.out.clear()
    up.out.clear()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    # Best of several rounds: the machine is shared, the minimum is the honest figure.
    best = float("inf")
    rounds = 1 if profile else 7
    for _ in range(rounds):
        down.out.clear()
        up.out.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, time.perf_counter() - t0)
    if prof:
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        print(f"{'calls/rq':>8} {'own us':>7} {'cum us':>7}  function")
        for (fn, ln, name), (_cc, nc, tt, ct, _callers) in sorted(
            stats.items(), key=lambda kv: -kv[1][2]
        )[:60]:
            where = fn.split("pyenvoy/")[-1] if "pyenvoy/" in fn else fn
            print(f"{nc / n:8.1f} {tt / n * 1e6:7.2f} {ct / n * 1e6:7.2f}  {where}:{ln} {name}")
    assert len(down.out) == n
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import uvloop

    us = uvloop.run(run(args.n, args.profile))
    print(f"{us:.1f} us per proxied request (Python only, no syscalls)")


if __name__ == "__main__":
    main()
