"""tcp_proxy: config validation, and the filter driven through a real ``Connection`` on real
loopback sockets (echo / sink / slow upstreams), under both asyncio and uvloop.

Strategy: each test builds the filter factory from a TcpProxy proto with a small fake
cluster manager (the contract of pyenvoy.upstream.cluster_manager), serves it with
``loop.create_server(lambda: Connection([factory]))`` and talks to it with plain client
sockets. One test uses the real ClusterManager.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format

from pyenvoy.config.errors import ConfigError
from pyenvoy.extensions import registry
from pyenvoy.extensions.filters.network.tcp_proxy import TYPE_URL, TcpProxyConfig, tcp_proxy_factory
from pyenvoy.extensions.registry import FactoryContext
from pyenvoy.network.connection import Connection
from pyenvoy.stats import Counter, Gauge, StatsStruct, Store

LOOPS = ["asyncio", "uvloop"]
_uvloop_ok: bool | None = None


def _connection_works_on_uvloop() -> bool:
    """Connection.connection_made must accept uvloop's TCPTransport (not an asyncio.Transport
    subclass); probe once so these tests run on uvloop as soon as it does."""
    global _uvloop_ok
    if _uvloop_ok is None:
        made: list[Connection] = []

        async def probe() -> bool:
            loop = asyncio.get_running_loop()

            def make() -> Connection:
                c = Connection([])
                made.append(c)
                return c

            server = await loop.create_server(make, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(50):
                if made:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.02)
            w.close()
            server.close()
            return bool(made) and made[0].transport is not None

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            _uvloop_ok = r.run(probe())
    return _uvloop_ok


def run(kind: str, coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    if kind == "uvloop" and not _connection_works_on_uvloop():
        coro.close()  # type: ignore[attr-defined]
        pytest.skip(
            "pyenvoy.network.connection.Connection asserts isinstance(transport, asyncio.Transport); "
            "uvloop's TCPTransport is not one"
        )
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    with asyncio.Runner(loop_factory=factory) as r:
        return r.run(main())


# --- fakes for the cluster manager contract --------------------------------------------------
class FakeClusterStats(StatsStruct):
    COUNTERS = (
        "upstream_cx_total",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_connect_attempts_exceeded",
        "upstream_cx_none_healthy",
        "upstream_cx_destroy",
        "upstream_cx_destroy_local",
        "upstream_cx_destroy_remote",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_tx_bytes_total",
        "upstream_flow_control_paused_reading_total",
        "upstream_flow_control_resumed_reading_total",
    )
    GAUGES = ("upstream_cx_active",)
    HISTOGRAMS = ("upstream_cx_connect_ms", "upstream_cx_length_ms")


class FakeHostStats:
    def __init__(self) -> None:
        self.cx_total = Counter("cx_total")
        self.cx_connect_fail = Counter("cx_connect_fail")
        self.cx_active = Gauge("cx_active")


class FakeHost:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.stats = FakeHostStats()


class FakeInfo:
    def __init__(self, name: str, store: Store, connect_timeout: float, limit: int) -> None:
        self.name = name
        self.connect_timeout = connect_timeout
        self.per_connection_buffer_limit_bytes = limit
        self.stats = FakeClusterStats(store.scope(f"cluster.{name}"))


class FakeCluster:
    def __init__(self, info: FakeInfo, hosts: list[FakeHost]) -> None:
        self.info = info
        self.hosts = hosts
        self.i = 0

    def choose_host(self, context: Any = None) -> FakeHost | None:
        if not self.hosts:
            return None
        h = self.hosts[self.i % len(self.hosts)]
        self.i += 1
        return h


class FakeClusterManager:
    def __init__(self) -> None:
        self.clusters: dict[str, FakeCluster] = {}

    def add(
        self,
        name: str,
        store: Store,
        ports: list[int],
        connect_timeout: float = 1.0,
        limit: int = 1024 * 1024,
    ) -> FakeCluster:
        c = FakeCluster(
            FakeInfo(name, store, connect_timeout, limit),
            [FakeHost(("127.0.0.1", p)) for p in ports],
        )
        self.clusters[name] = c
        return c

    def get(self, name: str) -> FakeCluster | None:
        return self.clusters.get(name)


def make_proto(**fields: Any) -> tcp_proxy_pb2.TcpProxy:
    return json_format.ParseDict(fields, tcp_proxy_pb2.TcpProxy())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- upstream servers ---------------------------------------------------------------------
class Echo(asyncio.Protocol):
    """Echoes; on EOF optionally sends a late reply after a delay, then its own FIN."""

    late_reply = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        if self.late_reply:
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, self._late)
        else:
            self.t.write_eof()
        return True

    def _late(self) -> None:
        if not self.t.is_closing():
            self.t.write(self.late_reply)
            self.t.write_eof()


class Sink(asyncio.Protocol):
    """Hashes everything it receives; on EOF replies with the hex digest and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.h = hashlib.sha256()
        self.n = 0

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def eof_received(self) -> bool:
        self.t.write(f"{self.n} {self.h.hexdigest()}".encode())
        self.t.close()
        return True


def pause_now(t: asyncio.Transport) -> None:
    """pause_reading() from connection_made, also under uvloop (which starts reading right
    after connection_made returns, so pause once more on the next loop turn)."""
    t.pause_reading()
    asyncio.get_running_loop().call_soon(t.pause_reading)


async def serve(proto_factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proto_factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class Proxy:
    """A real listening socket whose connections run one tcp_proxy filter each."""

    def __init__(self, factory: Callable[[], Any], buffer_limit: int = 1024 * 1024) -> None:
        self.factory = factory
        self.buffer_limit = buffer_limit
        self.connections: list[Connection] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _make(self) -> Connection:
        c = Connection([self.factory], buffer_limit=self.buffer_limit)
        self.connections.append(c)
        return c

    async def start(self) -> Proxy:
        self.server, self.port = await serve(self._make)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def build(proto: Any, cm: Any, store: Store) -> Callable[[], Any]:
    return tcp_proxy_factory(
        proto, FactoryContext(cluster_manager=cm, stats=store, path="filters[0]")
    )


async def read_all(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        d = await reader.read(1 << 16)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


async def settle(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def counter(store: Store, name: str) -> int:
    c = store.counters.get(name)
    return c.value if c is not None else 0


def gauge(store: Store, name: str) -> int:
    g = store.gauges.get(name)
    return g.value if g is not None else 0


# --- config ---------------------------------------------------------------------------------
def test_registered_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing the module registered it; don't import the other built-ins here.
    monkeypatch.setattr(registry, "_loaded", True)
    ext = registry.find(registry.NETWORK_FILTER, "envoy.filters.network.tcp_proxy", TYPE_URL)
    assert ext is not None and ext.terminal and ext.factory is tcp_proxy_factory
    assert registry.find(registry.NETWORK_FILTER, "envoy.filters.network.tcp_proxy") is ext


def test_config_defaults_and_stats_names() -> None:
    store = Store()
    cfg = TcpProxyConfig(make_proto(stat_prefix="p", cluster="c"), FactoryContext(stats=store))
    assert cfg.idle_timeout == 3600.0
    assert cfg.max_connect_attempts == 1
    assert cfg.pick_cluster() == "c"
    for name in (
        "downstream_cx_total",
        "downstream_cx_no_route",
        "downstream_cx_tx_bytes_total",
        "downstream_cx_rx_bytes_total",
        "downstream_flow_control_paused_reading_total",
        "downstream_flow_control_resumed_reading_total",
        "idle_timeout",
        "upstream_flush_total",
        "max_downstream_connection_duration",
    ):
        assert f"tcp.p.{name}" in store.counters
    for name in (
        "downstream_cx_tx_bytes_buffered",
        "downstream_cx_rx_bytes_buffered",
        "upstream_flush_active",
    ):
        assert f"tcp.p.{name}" in store.gauges
    cfg = TcpProxyConfig(
        make_proto(stat_prefix="p", cluster="c", idle_timeout="0s", max_connect_attempts=3),
        FactoryContext(),
    )
    assert cfg.idle_timeout == 0 and cfg.max_connect_attempts == 3


@pytest.mark.parametrize(
    ("fields", "path", "text"),
    [
        ({"cluster": "c"}, "f.stat_prefix", "at least 1"),
        ({"stat_prefix": "p"}, "f.cluster_specifier", "cluster"),
        (
            {"stat_prefix": "p", "cluster": "c", "on_demand": {}},
            "f.on_demand",
            "on_demand",
        ),
        (
            {"stat_prefix": "p", "cluster": "c", "tunneling_config": {"hostname": "h:1"}},
            "f.tunneling_config",
            "tunneling_config",
        ),
        (
            {
                "stat_prefix": "p",
                "cluster": "c",
                "metadata_match": {"filter_metadata": {"envoy.lb": {}}},
            },
            "f.metadata_match",
            "subset",
        ),
        (
            {"stat_prefix": "p", "cluster": "c", "upstream_connect_mode": "ON_DOWNSTREAM_DATA"},
            "f.upstream_connect_mode",
            "ON_DOWNSTREAM_DATA",
        ),
        (
            {"stat_prefix": "p", "cluster": "c", "max_connect_attempts": 0},
            "f.max_connect_attempts",
            "greater than or equal to 1",
        ),
        (
            {"stat_prefix": "p", "weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}},
            "f.weighted_clusters.clusters[0].weight",
            "weight",
        ),
        (
            {"stat_prefix": "p", "cluster": "c", "hash_policy": [{"filter_state": {"key": "k"}}]},
            "f.hash_policy[0].filter_state",
            "filter_state",
        ),
        (
            {"stat_prefix": "p", "cluster": "c", "hash_policy": [{"source_ip": {}}] * 2},
            "f.hash_policy",
            "at most 1",
        ),
    ],
)
def test_config_rejects(fields: dict[str, Any], path: str, text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        TcpProxyConfig(make_proto(**fields), FactoryContext(path="f"))
    assert ei.value.path == path
    assert text in ei.value.message


def test_unknown_cluster_is_not_a_config_error() -> None:
    # Envoy accepts it and counts downstream_cx_no_route per connection.
    build(make_proto(stat_prefix="p", cluster="nosuch"), FakeClusterManager(), Store())


def test_weighted_clusters_pick_by_weight() -> None:
    cfg = TcpProxyConfig(
        make_proto(
            stat_prefix="p",
            weighted_clusters={
                "clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]
            },
        ),
        FactoryContext(),
    )
    picks = [cfg.pick_cluster() for _ in range(4000)]
    assert set(picks) == {"a", "b"}
    assert 0.65 < picks.count("b") / len(picks) < 0.85


# --- data path ------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_echo_bytes_intact_both_ways(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        cm.add("echo", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="e", cluster="echo"), cm, store)).start()
        payload = os.urandom(3 * 1024 * 1024 + 17)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        got = await read_all(reader)
        await sender
        writer.close()
        assert got == payload
        await settle(lambda: gauge(store, "cluster.echo.upstream_cx_active") == 0)
        n = len(payload)
        assert counter(store, "tcp.e.downstream_cx_total") == 1
        assert counter(store, "tcp.e.downstream_cx_rx_bytes_total") == n
        assert counter(store, "tcp.e.downstream_cx_tx_bytes_total") == n
        assert counter(store, "cluster.echo.upstream_cx_tx_bytes_total") == n
        assert counter(store, "cluster.echo.upstream_cx_rx_bytes_total") == n
        assert counter(store, "cluster.echo.upstream_cx_total") == 1
        assert counter(store, "cluster.echo.upstream_cx_destroy") == 1
        assert store.histograms["cluster.echo.upstream_cx_connect_ms"].count == 1
        assert store.histograms["cluster.echo.upstream_cx_length_ms"].count == 1
        host = cm.clusters["echo"].hosts[0]
        assert host.stats.cx_total.value == 1 and host.stats.cx_active.value == 0
        await settle(lambda: all(c.closed for c in proxy.connections))
        assert gauge(store, "tcp.e.downstream_cx_tx_bytes_buffered") == 0
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_upload_to_sink_then_reply(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Sink)
        cm.add("sink", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="s", cluster="sink"), cm, store)).start()
        payload = os.urandom(2 * 1024 * 1024 + 3)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        reply = await read_all(reader)
        writer.close()
        assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
        # The sink closed fully after its reply: Envoy counts that as a remote destroy.
        await settle(lambda: counter(store, "cluster.sink.upstream_cx_destroy") == 1)
        assert counter(store, "cluster.sink.upstream_cx_destroy_remote") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_client_still_gets_late_reply(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()

        class LateEcho(Echo):
            late_reply = b"late-reply"

        up, up_port = await serve(LateEcho)
        cm.add("echo", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="h", cluster="echo"), cm, store)).start()

        def client() -> bytes:
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(b"abc")
            first = s.recv(3)
            s.shutdown(socket.SHUT_WR)
            rest = b""
            while True:
                d = s.recv(100)
                if not d:
                    break
                rest += d
            s.close()
            return first + b"|" + rest

        assert await asyncio.to_thread(client) == b"abc|late-reply"
        # The upstream's FIN came last: a remote close, as Envoy books it.
        await settle(lambda: counter(store, "cluster.echo.upstream_cx_destroy") == 1)
        assert counter(store, "cluster.echo.upstream_cx_destroy_remote") == 1
        await settle(lambda: all(c.closed for c in proxy.connections))
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_upstream_fin_then_downstream_close(loop: str) -> None:
    """The upstream sends and FINs first: the client gets the data then EOF; when the client
    closes too, the proxy closes the upstream (a local close in Envoy's books)."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()

        class Greeter(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.write(b"hello " * 1000)  # type: ignore[attr-defined]
                transport.write_eof()  # type: ignore[attr-defined]

            def eof_received(self) -> bool:
                return False

        up, up_port = await serve(Greeter)
        cm.add("g", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="g", cluster="g"), cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await read_all(reader) == b"hello " * 1000
        assert counter(store, "cluster.g.upstream_cx_destroy") == 0  # still half open
        writer.close()
        await settle(lambda: all(c.closed for c in proxy.connections))
        await settle(lambda: counter(store, "cluster.g.upstream_cx_destroy") == 1)
        assert counter(store, "cluster.g.upstream_cx_destroy_local") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_upstream_reset_closes_downstream_after_flush(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()

        class Resetter(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                t: asyncio.Transport = transport  # type: ignore[assignment]
                t.write(b"bye " * 1000)
                sock = t.get_extra_info("socket")
                linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"

                def rst() -> None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    t.abort()

                asyncio.get_running_loop().call_later(0.1, rst)

        up, up_port = await serve(Resetter)
        cm.add("r", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="rr", cluster="r"), cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await read_all(reader) == b"bye " * 1000
        writer.close()
        await settle(lambda: all(c.closed for c in proxy.connections))
        assert counter(store, "cluster.r.upstream_cx_destroy_remote") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_refused_closes_downstream(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        dead = free_port()
        cm.add("dead", store, [dead])
        proto = make_proto(stat_prefix="d", cluster="dead", max_connect_attempts=3)
        proxy = await Proxy(build(proto, cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await read_all(reader) == b""  # closed without data
        writer.close()
        assert counter(store, "tcp.d.downstream_cx_total") == 1
        assert counter(store, "cluster.dead.upstream_cx_total") == 3
        assert counter(store, "cluster.dead.upstream_cx_connect_fail") == 3
        assert counter(store, "cluster.dead.upstream_cx_destroy") == 3
        assert counter(store, "cluster.dead.upstream_cx_destroy_remote") == 3
        assert counter(store, "cluster.dead.upstream_cx_connect_attempts_exceeded") == 1
        assert gauge(store, "cluster.dead.upstream_cx_active") == 0
        host = cm.clusters["dead"].hosts[0]
        assert host.stats.cx_connect_fail.value == 3 and host.stats.cx_active.value == 0
        proxy.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_timeout(loop: str) -> None:
    async def main() -> None:
        # A listener whose accept queue is full: further SYNs are dropped, connects hang.
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.05)
        try:
            store = Store()
            cm = FakeClusterManager()
            cm.add("bh", store, [port], connect_timeout=0.2)
            proxy = await Proxy(build(make_proto(stat_prefix="t", cluster="bh"), cm, store)).start()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            t0 = time.monotonic()
            assert await read_all(reader) == b""
            assert 0.15 < time.monotonic() - t0 < 2.0
            writer.close()
            assert counter(store, "cluster.bh.upstream_cx_connect_timeout") == 1
            assert counter(store, "cluster.bh.upstream_cx_connect_fail") == 1
            assert counter(store, "cluster.bh.upstream_cx_destroy_local") == 1
            assert counter(store, "cluster.bh.upstream_cx_connect_attempts_exceeded") == 1
            assert gauge(store, "cluster.bh.upstream_cx_active") == 0
            proxy.close()
        finally:
            for s in fillers:
                s.close()
            lsock.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_no_route_and_no_healthy_host(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        cm.add("empty", store, [])
        p1 = await Proxy(build(make_proto(stat_prefix="nr", cluster="nosuch"), cm, store)).start()
        p2 = await Proxy(build(make_proto(stat_prefix="nh", cluster="empty"), cm, store)).start()
        for p in (p1, p2):
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            assert await read_all(reader) == b""
            writer.close()
            p.close()
        assert counter(store, "tcp.nr.downstream_cx_no_route") == 1
        assert counter(store, "tcp.nh.downstream_cx_no_route") == 0
        assert counter(store, "cluster.empty.upstream_cx_none_healthy") == 1
        assert counter(store, "cluster.empty.upstream_cx_total") == 0

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_timeout_resets_on_activity_then_closes(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        cm.add("echo", store, [up_port])
        proto = make_proto(stat_prefix="i", cluster="echo", idle_timeout="0.3s")
        proxy = await Proxy(build(proto, cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        t0 = time.monotonic()
        for _ in range(5):  # 0.5s of activity: longer than the timeout, but never idle
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await asyncio.sleep(0.1)
        assert counter(store, "tcp.i.idle_timeout") == 0
        t1 = time.monotonic()
        assert await read_all(reader) == b""
        waited = time.monotonic() - t1
        assert 0.15 < waited < 1.0, waited
        assert time.monotonic() - t0 > 0.6
        writer.close()
        assert counter(store, "tcp.i.idle_timeout") == 1
        await settle(lambda: counter(store, "cluster.echo.upstream_cx_destroy_local") == 1)
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_max_downstream_connection_duration(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        cm.add("echo", store, [up_port])
        proto = make_proto(
            stat_prefix="m", cluster="echo", max_downstream_connection_duration="0.2s"
        )
        proxy = await Proxy(build(proto, cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert await read_all(reader) == b""
        writer.close()
        assert counter(store, "tcp.m.max_downstream_connection_duration") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_backpressure_slow_downstream_reader(loop: str) -> None:
    """Upstream blasts 24 MB; the client reads nothing for a while: the proxy's own buffer
    stays near the downstream limit and the upstream is paused; then everything arrives."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        total = 24 * 1024 * 1024
        chunk = os.urandom(1 << 16)

        class Blaster(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                t: asyncio.Transport = transport  # type: ignore[assignment]
                t.writelines([chunk] * (total // len(chunk)))
                t.write_eof()

        up, up_port = await serve(Blaster)
        limit = 64 * 1024
        cm.add("b", store, [up_port], limit=limit)
        proxy = await Proxy(
            build(make_proto(stat_prefix="b", cluster="b"), cm, store), buffer_limit=limit
        ).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
        # Don't read; the StreamReader itself pauses at 128 KiB so the kernel buffers fill.
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.01)
            for c in proxy.connections:
                if c.transport is not None:
                    peak = max(peak, c.transport.get_write_buffer_size())
        assert counter(store, "cluster.b.upstream_flow_control_paused_reading_total") >= 1
        # One read chunk past the high watermark at most (uvloop reads up to 256 KiB).
        assert peak <= limit + 300 * 1024, peak
        assert gauge(store, "tcp.b.downstream_cx_tx_bytes_buffered") > 0
        h = hashlib.sha256()
        n = 0
        while True:
            d = await reader.read(1 << 18)
            if not d:
                break
            h.update(d)
            n += len(d)
        assert n == total
        assert h.hexdigest() == hashlib.sha256(chunk * (total // len(chunk))).hexdigest()
        assert counter(store, "cluster.b.upstream_flow_control_resumed_reading_total") >= 1
        writer.close()
        await settle(lambda: all(c.closed for c in proxy.connections))
        assert gauge(store, "tcp.b.downstream_cx_tx_bytes_buffered") == 0
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_backpressure_slow_upstream_reader(loop: str) -> None:
    """The client uploads 24 MB to an upstream that stops reading: downstream reads are
    paused (downstream_flow_control_*) and the upstream write buffer stays bounded."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        total = 24 * 1024 * 1024
        gate = asyncio.Event()
        received = [0]

        class Slow(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t: asyncio.Transport = transport  # type: ignore[assignment]
                pause_now(self.t)
                asyncio.get_running_loop().create_task(self._later())

            async def _later(self) -> None:
                await gate.wait()
                self.t.resume_reading()

            def data_received(self, data: bytes) -> None:
                received[0] += len(data)

            def eof_received(self) -> bool:
                self.t.write(str(received[0]).encode())
                self.t.close()
                return True

        up, up_port = await serve(Slow)
        limit = 64 * 1024
        cm.add("s", store, [up_port], limit=limit)
        proxy = await Proxy(
            build(make_proto(stat_prefix="u", cluster="s"), cm, store), buffer_limit=limit
        ).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        chunk = os.urandom(1 << 16)

        async def upload() -> None:
            for _ in range(total // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        task = asyncio.ensure_future(upload())
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.01)
            for c in proxy.connections:
                for f in c.read_filters:
                    t = f.upstream_transport  # type: ignore[attr-defined]
                    if t is not None:
                        peak = max(peak, t.get_write_buffer_size())
        assert counter(store, "tcp.u.downstream_flow_control_paused_reading_total") >= 1
        assert peak <= limit + 300 * 1024, peak
        assert not task.done()
        gate.set()
        await task
        assert await read_all(reader) == str(total).encode()
        assert counter(store, "tcp.u.downstream_flow_control_resumed_reading_total") >= 1
        writer.close()
        await settle(lambda: all(c.closed for c in proxy.connections))
        assert gauge(store, "tcp.u.upstream_flush_active") == 0
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_downstream_reset_flushes_upstream(loop: str) -> None:
    """The client sends data and vanishes (RST) while the upstream isn't reading: the proxy
    still flushes what it holds to the upstream (upstream_flush_total / _active)."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        gate = asyncio.Event()
        got = [0]
        done = asyncio.Event()

        class Slow(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t: asyncio.Transport = transport  # type: ignore[assignment]
                pause_now(self.t)
                asyncio.get_running_loop().create_task(self._later())

            async def _later(self) -> None:
                await gate.wait()
                self.t.resume_reading()

            def data_received(self, data: bytes) -> None:
                got[0] += len(data)

            def connection_lost(self, exc: Exception | None) -> None:
                done.set()

        up, up_port = await serve(Slow)
        # Limits above the upload: the proxy keeps reading the client (a paused socket would
        # not notice the reset), so bytes pile up in the upstream write buffer.
        limit = 64 * 1024 * 1024
        cm.add("s", store, [up_port], limit=limit)
        proxy = await Proxy(
            build(make_proto(stat_prefix="r", cluster="s"), cm, store), buffer_limit=limit
        ).start()
        total = 16 * 1024 * 1024

        def client() -> None:
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            buf = os.urandom(1 << 16)
            for _ in range(total // len(buf)):
                s.sendall(buf)
            time.sleep(0.2)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # RST

        await asyncio.to_thread(client)
        await settle(lambda: all(c.closed for c in proxy.connections))
        assert counter(store, "tcp.r.upstream_flush_total") == 1
        assert gauge(store, "tcp.r.upstream_flush_active") == 1
        gate.set()
        await asyncio.wait_for(done.wait(), 5)
        await settle(lambda: gauge(store, "tcp.r.upstream_flush_active") == 0)
        assert got[0] == counter(store, "tcp.r.downstream_cx_rx_bytes_total") > 0
        assert counter(store, "cluster.s.upstream_cx_destroy_local") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_many_concurrent_sessions(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        cm.add("echo", store, [up_port])
        proxy = await Proxy(build(make_proto(stat_prefix="c", cluster="echo"), cm, store)).start()

        async def one(i: int) -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            msg = f"session-{i}-".encode() * 100
            writer.write(msg)
            writer.write_eof()
            got = await read_all(reader)
            writer.close()
            return got == msg

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert all(results)
        await settle(lambda: gauge(store, "cluster.echo.upstream_cx_active") == 0)
        assert counter(store, "tcp.c.downstream_cx_total") == 50
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_end_to_end_with_real_cluster_manager(loop: str) -> None:
    try:
        from envoy.config.cluster.v3 import cluster_pb2

        from pyenvoy.upstream.cluster_manager import ClusterManager
    except ImportError as e:  # pragma: no cover - the cluster manager is being written
        pytest.skip(f"real cluster manager not importable: {e}")

    async def main() -> None:
        store = Store()
        up, up_port = await serve(Echo)
        cproto = json_format.ParseDict(
            {
                "name": "echo",
                "connect_timeout": "1s",
                "type": "STATIC",
                "per_connection_buffer_limit_bytes": 32768,
                "load_assignment": {
                    "cluster_name": "echo",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": up_port,
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            },
            cluster_pb2.Cluster(),
        )
        try:
            cm = ClusterManager([cproto], store)
        except ImportError as e:  # pragma: no cover
            pytest.skip(f"real cluster manager not usable yet: {e}")
        await cm.initialize()
        factory = build(make_proto(stat_prefix="real", cluster="echo"), cm, store)
        proxy = await Proxy(factory).start()
        payload = os.urandom(1024 * 1024)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(payload)
        writer.write_eof()
        assert await read_all(reader) == payload
        writer.close()
        await settle(lambda: store.gauges["cluster.echo.upstream_cx_active"].value == 0)
        assert store.counters["cluster.echo.upstream_cx_total"].value == 1
        assert store.counters["cluster.echo.upstream_cx_tx_bytes_total"].value == len(payload)
        assert store.counters["cluster.echo.upstream_cx_destroy_with_active_rq"].value == 1
        assert store.counters["tcp.real.downstream_cx_tx_bytes_total"].value == len(payload)
        host = cm.get("echo").hosts[0]  # type: ignore[union-attr]
        assert host.stats.cx_total.value == 1 and host.stats.cx_active.value == 0
        cm.close()
        proxy.close()
        up.close()

    run(loop, main())


class FakeDownstream:
    """Just enough of Connection to drive the filter by hand (bytes before connect)."""

    def __init__(self) -> None:
        self.remote_address = ("127.0.0.1", 1)
        self.local_address = ("127.0.0.1", 2)
        self.callbacks: list[Any] = []
        self.half_close = False
        self.read_disabled = 0
        self.transport = None
        self.local_close = False
        self.buffer_limit = 1 << 20
        self.written: list[bytes] = []
        self.eof = False
        self.closed_with: bool | None = None

    @property
    def reading_enabled(self) -> bool:
        return self.read_disabled == 0

    def add_connection_callbacks(self, cb: Any) -> None:
        self.callbacks.append(cb)

    def enable_half_close(self, enabled: bool) -> None:
        self.half_close = enabled

    def read_disable(self, disable: bool) -> None:
        self.read_disabled += 1 if disable else -1

    def write(self, data: bytes, end_stream: bool = False) -> None:
        self.written.append(data)
        self.eof = self.eof or end_stream

    def close(self, flush: bool = True) -> None:
        self.local_close = True
        self.closed_with = flush


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bytes_and_eof_before_connect_are_held_then_sent(loop: str) -> None:
    """Bytes read before the upstream connects (uvloop may deliver some, see
    _reapply_read_disable) are kept and sent first, and an early FIN follows them."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        cm.add("echo", store, [up_port])
        f = build(make_proto(stat_prefix="early", cluster="echo"), cm, store)()
        down = FakeDownstream()
        f.initialize_read_filter_callbacks(down)
        f.on_new_connection()
        assert down.half_close and down.read_disabled == 1
        f.on_data(b"early-", False)
        f.on_data(b"bytes", False)
        f.on_data(b"", True)
        await settle(lambda: down.eof)
        assert b"".join(down.written) == b"early-bytes"
        assert down.read_disabled == 0
        assert counter(store, "cluster.echo.upstream_cx_tx_bytes_total") == 11
        assert counter(store, "tcp.early.downstream_cx_rx_bytes_total") == 11
        # Both directions ended: the downstream is closed after flushing.
        assert down.closed_with is True
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_retry_with_backoff_reaches_second_host(loop: str) -> None:
    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        up, up_port = await serve(Echo)
        c = cm.add("mixed", store, [free_port(), up_port])  # first host refuses
        proto = make_proto(
            stat_prefix="rb",
            cluster="mixed",
            max_connect_attempts=2,
            backoff_options={"base_interval": "0.01s", "max_interval": "0.05s"},
        )
        proxy = await Proxy(build(proto, cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hi")
        writer.write_eof()
        assert await read_all(reader) == b"hi"
        writer.close()
        assert counter(store, "cluster.mixed.upstream_cx_connect_fail") == 1
        assert counter(store, "cluster.mixed.upstream_cx_total") == 2
        assert c.hosts[0].stats.cx_connect_fail.value == 1
        assert c.hosts[1].stats.cx_total.value == 1
        proxy.close()
        up.close()

    run(loop, main())


# --- outlier detection, the pool's request books, hash policy --------------------------------
class RecordingDetector:
    """Records what the filter reports (the OutlierDetector calls tcp_proxy makes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []

    def on_local_origin_failure(self, host: FakeHost, reason: str) -> None:
        self.calls.append(("failure", host.address[1], reason))

    def on_local_origin_success(self, host: FakeHost, final: bool = True) -> None:
        self.calls.append(("success", host.address[1], final))


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_results_reach_the_outlier_detector(loop: str) -> None:
    """Refused -> LocalOriginConnectFailed, connect timeout -> LocalOriginTimeout, connected
    -> LocalOriginConnectSuccessFinal (Envoy's TcpProxy::Filter), one report per attempt."""

    async def main() -> None:
        lsock = socket.socket()  # a full accept queue: connects to it time out
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        bh = lsock.getsockname()[1]
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            try:
                f.connect(("127.0.0.1", bh))
            except BlockingIOError:
                pass
            fillers.append(f)
        try:
            store = Store()
            cm = FakeClusterManager()
            up, up_port = await serve(Echo)
            dead = free_port()
            c = cm.add("mixed", store, [dead, bh, up_port], connect_timeout=0.2)
            od = c.outlier = RecordingDetector()  # type: ignore[attr-defined]
            proto = make_proto(stat_prefix="od", cluster="mixed", max_connect_attempts=3)
            proxy = await Proxy(build(proto, cm, store)).start()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hi")
            writer.write_eof()
            assert await read_all(reader) == b"hi"
            writer.close()
            assert od.calls == [
                ("failure", dead, "connect_failed"),
                ("failure", bh, "timeout"),
                ("success", up_port, True),
            ]
            proxy.close()
            up.close()
        finally:
            for f in fillers:
                f.close()
            lsock.close()

    run(loop, main())


def _cluster_proto(name: str, ports: list[int], **extra: Any) -> Any:
    from envoy.config.cluster.v3 import cluster_pb2

    return json_format.ParseDict(
        {
            "name": name,
            "connect_timeout": "1s",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": p,
                                        }
                                    }
                                }
                            }
                            for p in ports
                        ]
                    }
                ],
            },
            **extra,
        },
        cluster_pb2.Cluster(),
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_refusing_host_is_ejected_by_the_real_detector(loop: str) -> None:
    from pyenvoy.upstream.cluster_manager import ClusterManager
    from pyenvoy.upstream.host import FAILED_OUTLIER_CHECK

    async def main() -> None:
        store = Store()
        up, up_port = await serve(Echo)
        dead = free_port()
        od = {"consecutive_5xx": 2, "max_ejection_percent": 50, "interval": "60s"}
        cm = ClusterManager([_cluster_proto("od", [up_port, dead], outlier_detection=od)], store)
        await cm.initialize()
        proxy = await Proxy(build(make_proto(stat_prefix="od", cluster="od"), cm, store)).start()
        results = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            writer.write_eof()
            try:
                results.append(await read_all(reader))
            except ConnectionResetError:  # closed with our byte unread: a reset
                results.append(b"")
            writer.close()
        assert results.count(b"") == 2 and results[-4:] == [b"x"] * 4
        hosts = {h.address[1]: h for h in cm.get("od").hosts}  # type: ignore[union-attr]
        assert hosts[dead].health_flags & FAILED_OUTLIER_CHECK
        assert not hosts[up_port].health_flags
        assert (
            counter(store, "cluster.od.outlier_detection.ejections_enforced_consecutive_5xx") == 1
        )
        # 503 is a gateway failure as well (detected once its count reaches 5: not here).
        assert counter(store, "cluster.od.outlier_detection.ejections_enforced_total") == 1
        # The successes count as 200s for the detector: the good host's 5xx run stays 0.
        assert hosts[up_port].outlier.consecutive_5xx == 0
        assert hosts[up_port].outlier.ext_success == 6
        # The TCP pool's request books (what Envoy shows for the same traffic).
        await settle(lambda: gauge(store, "cluster.od.upstream_rq_active") == 0)
        assert counter(store, "cluster.od.upstream_rq_pending_total") == 8
        assert counter(store, "cluster.od.upstream_rq_pending_failure_eject") == 2
        assert counter(store, "cluster.od.upstream_rq_total") == 6
        assert gauge(store, "cluster.od.upstream_rq_pending_active") == 0
        assert hosts[up_port].stats.rq_total.value == 6
        assert hosts[up_port].stats.rq_active.value == 0
        # A refused connect's byte was never "received": reads wait for the connect.
        assert counter(store, "tcp.od.downstream_cx_rx_bytes_total") == 6
        cm.close()
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_hash_policy_source_ip_picks_a_stable_ring_host(loop: str) -> None:
    from pyenvoy.upstream.cluster_manager import ClusterManager
    from pyenvoy.upstream.hashing import xxhash64

    class Ident(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            t: asyncio.Transport = transport  # type: ignore[assignment]
            t.write(str(t.get_extra_info("sockname")[1]).encode())
            t.close()

    async def main() -> None:
        store = Store()
        servers = [await serve(Ident) for _ in range(4)]
        ports = [p for _, p in servers]
        cm = ClusterManager([_cluster_proto("ring", ports, lb_policy="RING_HASH")], store)
        await cm.initialize()
        proto = make_proto(stat_prefix="h", cluster="ring", hash_policy=[{"source_ip": {}}])
        factory = build(proto, cm, store)
        proxy = await Proxy(factory).start()
        cluster = cm.get("ring")
        assert cluster is not None
        picks = {}
        for last in range(2, 14):
            src = f"127.0.0.{last}"
            got = set()
            for _ in range(2):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", proxy.port, local_addr=(src, 0)
                )
                got.add(int(await read_all(reader)))
                writer.close()
            assert len(got) == 1, src  # the same source IP, the same host
            picks[src] = got.pop()
            # ... the host the ring holds for xxHash64 of the IP text (no port)
            want = cluster.lb.choose_host(_HashOnly(xxhash64(src.encode())))
            assert want is not None and picks[src] == want.address[1]
        assert len(set(picks.values())) >= 2
        # The filter's LoadBalancerContext hash: None without a policy (random pick).
        f = build(make_proto(stat_prefix="n", cluster="ring"), cm, store)()
        assert f.compute_hash() is None
        cm.close()
        proxy.close()
        for srv, _ in servers:
            srv.close()

    run(loop, main())


class _HashOnly:
    """A LoadBalancerContext with a fixed hash."""

    def __init__(self, h: int) -> None:
        self.h = h

    def compute_hash(self) -> int:
        return self.h


# --- the same config against real Envoy and pyenvoy ---------------------------------------
TCP_TEMPLATE = """
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: {admin_port} } }
static_resources:
  listeners:
  - name: tcp
    address: { socket_address: { address: 127.0.0.1, port_value: {listener_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_echo
          cluster: echo
          idle_timeout: 0.5s
  - name: dead
    address: { socket_address: { address: 127.0.0.1, port_value: {dead_listener_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_dead
          cluster: dead
          max_connect_attempts: 2
  - name: noroute
    address: { socket_address: { address: 127.0.0.1, port_value: {noroute_listener_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_nr
          cluster: nosuch
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {upstream_port} } } }
  - name: dead
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: dead
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {dead_port} } } }
"""

# Observed from Envoy 1.40 for exactly the traffic of the test below.
EXPECTED_TCP_STATS = {
    "cluster.dead.upstream_cx_connect_attempts_exceeded": 1,
    "cluster.dead.upstream_cx_connect_fail": 2,
    "cluster.dead.upstream_cx_destroy": 2,
    "cluster.dead.upstream_cx_destroy_remote": 2,
    "cluster.dead.upstream_cx_total": 2,
    "cluster.echo.upstream_cx_destroy": 2,
    "cluster.echo.upstream_cx_destroy_local": 1,
    "cluster.echo.upstream_cx_destroy_local_with_active_rq": 1,
    "cluster.echo.upstream_cx_destroy_remote": 1,
    "cluster.echo.upstream_cx_destroy_remote_with_active_rq": 1,
    "cluster.echo.upstream_cx_destroy_with_active_rq": 2,
    "cluster.echo.upstream_cx_rx_bytes_total": 1048580,
    "cluster.echo.upstream_cx_total": 2,
    "cluster.echo.upstream_cx_tx_bytes_total": 1048577,
    "tcp.tcp_dead.downstream_cx_total": 1,
    "tcp.tcp_echo.downstream_cx_rx_bytes_total": 1048577,
    "tcp.tcp_echo.downstream_cx_total": 2,
    "tcp.tcp_echo.downstream_cx_tx_bytes_total": 1048580,
    "tcp.tcp_echo.idle_timeout": 1,
    "tcp.tcp_nr.downstream_cx_no_route": 1,
    "tcp.tcp_nr.downstream_cx_total": 1,
}


@pytest.mark.parametrize("kind", ["envoy", "pyenvoy"])
def test_same_behaviour_and_stats_as_envoy(kind: str) -> None:
    import shutil

    from tests.support.procs import EnvoyProcess, start_proxy
    from tests.support.upstream import TcpEchoUpstream

    if kind == "envoy" and shutil.which(EnvoyProcess.executable) is None:
        pytest.skip("envoy binary not installed")
    up = TcpEchoUpstream(eof_reply=b"bye")
    up.start()
    try:
        p = start_proxy(kind, TCP_TEMPLATE, upstream_port=up.port)
        try:
            payload = os.urandom(1 << 20)
            with socket.create_connection(("127.0.0.1", p.listener_port), timeout=5) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)  # half-close: the echo and "bye" still arrive
                got = b""
                while d := s.recv(1 << 16):
                    got += d
            assert got == payload + b"bye"
            for port in (p.dead_listener_port, p.noroute_listener_port):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    assert s.recv(10) == b""  # closed without data
            with socket.create_connection(("127.0.0.1", p.listener_port), timeout=5) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                t0 = time.monotonic()
                assert s.recv(10) == b""  # idle_timeout 0.5s
                assert 0.3 < time.monotonic() - t0 < 2.0
            deadline = time.monotonic() + 5
            while True:
                stats = p.stats()
                seen = {
                    k: v
                    for k, v in stats.items()
                    if k.startswith(
                        ("tcp.", "cluster.echo.upstream_cx", "cluster.dead.upstream_cx")
                    )
                    and isinstance(v, int)
                    and v
                    and not k.endswith(("_active", "_buffered"))
                }
                if seen == EXPECTED_TCP_STATS or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert seen == EXPECTED_TCP_STATS
        finally:
            p.stop()
    finally:
        up.stop()


# --- circuit breakers -------------------------------------------------------------------------
class CircuitBreakerClusterStats(StatsStruct):
    COUNTERS = FakeClusterStats.COUNTERS + (
        "upstream_cx_overflow",
        "upstream_rq_pending_overflow",
        "upstream_rq_pending_total",
        "upstream_rq_total",
    )
    GAUGES = FakeClusterStats.GAUGES + ("upstream_rq_pending_active", "upstream_rq_active")
    HISTOGRAMS = FakeClusterStats.HISTOGRAMS


def _with_circuit_breakers(cluster: FakeCluster, store: Store, **threshold: Any) -> None:
    """Give a fake cluster a proto with one default-priority threshold (what
    resource_managers() reads) and the overflow counters."""
    from envoy.config.cluster.v3 import cluster_pb2

    info = cluster.info
    info.proto = json_format.ParseDict(  # type: ignore[attr-defined]
        {"name": info.name, "circuit_breakers": {"thresholds": [threshold]}},
        cluster_pb2.Cluster(),
    )
    info.stats = CircuitBreakerClusterStats(store.scope(f"cluster.{info.name}"))  # type: ignore[assignment]


@pytest.mark.parametrize("loop", LOOPS)
def test_max_connections_closes_the_next_session_at_once(loop: str) -> None:
    """Envoy: no queueing; the session over the limit is closed with no data (UO), and the
    limit is free again once the first session's upstream connection is gone."""

    async def main() -> None:
        store = Store()
        up, up_port = await serve(Echo)
        cm = FakeClusterManager()
        c = cm.add("cb", store, [up_port])
        _with_circuit_breakers(
            c, store, max_connections=1, max_pending_requests=1, track_remaining=True
        )
        proxy = await Proxy(build(make_proto(stat_prefix="cb", cluster="cb"), cm, store)).start()
        pre = "cluster.cb.circuit_breakers.default."
        r1, w1 = await asyncio.open_connection("127.0.0.1", proxy.port)
        w1.write(b"one")
        assert await r1.readexactly(3) == b"one"
        assert gauge(store, pre + "cx_open") == 1
        assert gauge(store, pre + "remaining_cx") == 0
        assert gauge(store, pre + "remaining_pending") == 1
        assert gauge(store, pre + "remaining_rq") == 1023

        r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        start = time.monotonic()
        assert await read_all(r2) == b""  # closed at once, not queued
        assert time.monotonic() - start < 0.5
        w2.close()
        assert counter(store, "cluster.cb.upstream_cx_overflow") == 1
        assert counter(store, "cluster.cb.upstream_cx_total") == 1
        assert counter(store, "cluster.cb.upstream_rq_pending_overflow") == 0
        assert counter(store, "tcp.cb.downstream_cx_total") == 2
        w1.write(b"still")  # the first session is unaffected
        assert await r1.readexactly(5) == b"still"

        w1.close()
        await settle(lambda: gauge(store, "cluster.cb.upstream_cx_active") == 0)
        assert gauge(store, pre + "cx_open") == 0
        assert gauge(store, pre + "remaining_cx") == 1
        assert gauge(store, pre + "remaining_rq") == 1024
        r3, w3 = await asyncio.open_connection("127.0.0.1", proxy.port)
        w3.write(b"three")
        assert await r3.readexactly(5) == b"three"
        w3.close()
        await settle(lambda: gauge(store, "cluster.cb.upstream_cx_active") == 0)
        assert gauge(store, pre + "remaining_cx") == 1
        assert counter(store, "cluster.cb.upstream_cx_overflow") == 1
        proxy.close()
        up.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_pending_overflow_is_retried_then_gives_up(loop: str) -> None:
    """max_pending_requests 0: every attempt overflows in the pool (no connection made);
    tcp_proxy retries up to max_connect_attempts, then closes the downstream."""

    async def main() -> None:
        store = Store()
        up, up_port = await serve(Echo)
        cm = FakeClusterManager()
        c = cm.add("pend", store, [up_port])
        _with_circuit_breakers(c, store, max_pending_requests=0)
        proto = make_proto(stat_prefix="p", cluster="pend", max_connect_attempts=2)
        proxy = await Proxy(build(proto, cm, store)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await read_all(reader) == b""
        writer.close()
        assert counter(store, "cluster.pend.upstream_rq_pending_overflow") == 2
        assert counter(store, "cluster.pend.upstream_cx_connect_attempts_exceeded") == 1
        assert counter(store, "cluster.pend.upstream_cx_total") == 0
        assert counter(store, "cluster.pend.upstream_cx_overflow") == 0
        # As in Envoy: *_open only changes on inc/dec, and nothing was taken.
        assert gauge(store, "cluster.pend.circuit_breakers.default.rq_pending_open") == 0
        proxy.close()
        up.close()

    run(loop, main())


def test_connect_failure_gives_the_connection_back() -> None:
    """A refused connect (and the retry) must not leak the max_connections resource."""

    async def main() -> None:
        store = Store()
        cm = FakeClusterManager()
        c = cm.add("dead", store, [free_port()])
        _with_circuit_breakers(c, store, max_connections=1, track_remaining=True)
        proto = make_proto(stat_prefix="d", cluster="dead", max_connect_attempts=2)
        proxy = await Proxy(build(proto, cm, store)).start()
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await read_all(reader) == b""
            writer.close()
        assert counter(store, "cluster.dead.upstream_cx_connect_fail") == 4
        assert counter(store, "cluster.dead.upstream_cx_overflow") == 0
        pre = "cluster.dead.circuit_breakers.default."
        assert gauge(store, pre + "remaining_cx") == 1
        assert gauge(store, pre + "remaining_pending") == 1024
        assert gauge(store, pre + "cx_open") == 0
        proxy.close()

    run("asyncio", main())
