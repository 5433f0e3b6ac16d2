"""Active health checking (pyenvoy/upstream/health_check.py) with real sockets.

Each test embeds a pyenvoy.Proxy (listener + admin on port 0) in front of upstreams that
fail on purpose, and watches host health through the admin /clusters page, the
``cluster.<c>.health_check.*`` stats and where traffic goes. Intervals are 50-100 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import httpx
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto
from google.protobuf.json_format import ParseDict

import pyenvoy
from pyenvoy.config import ConfigError
from pyenvoy.stats import Store
from pyenvoy.upstream import health_check as hc_mod
from pyenvoy.upstream.cluster_manager import ClusterManager
from pyenvoy.upstream.health_check import payload_match
from pyenvoy.upstream.host import FAILED_ACTIVE_HC, FAILED_OUTLIER_CHECK, Host
from tests.support.upstream import HttpUpstream, TcpEchoUpstream

R503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
R500 = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


# --- config and proxy helpers ------------------------------------------------------------------


def endpoints(*ports: int) -> dict[str, Any]:
    return {
        "cluster_name": "c",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                        }
                    }
                    for p in ports
                ]
            }
        ],
    }


def cluster(
    ports: list[int], health_check: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "c",
        "connect_timeout": "0.5s",
        "type": "STATIC",
        "load_assignment": endpoints(*ports),
        **extra,
    }
    if health_check is not None:
        hc = {
            "timeout": "0.5s",
            "interval": "0.05s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 2,
        }
        hc.update(health_check)
        c["health_checks"] = [hc]
    return c


def bootstrap(cluster_cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "front",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "c"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [ROUTER],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster_cfg],
        },
    }


class Running:
    """A started proxy plus helpers to read /clusters and stats."""

    def __init__(self, proxy: pyenvoy.Proxy) -> None:
        self.proxy = proxy
        self.client = httpx.AsyncClient(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port()}"

    async def get(self, path: str = "/x") -> int:
        return (await self.client.get(self.url + path)).status_code

    async def flags(self) -> dict[int, str]:
        """Port -> health_flags text, read through the admin endpoint."""
        r = await self.client.get(f"http://127.0.0.1:{self.proxy.admin_port}/clusters")
        assert r.status_code == 200
        out: dict[int, str] = {}
        for line in r.text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "c" and parts[2] == "health_flags":
                out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
        return out

    def hc(self) -> dict[str, int]:
        prefix = "cluster.c.health_check."
        return {k[len(prefix) :]: v for k, v in self.proxy.stats().items() if k.startswith(prefix)}

    def cluster_stat(self, name: str) -> int:
        return self.proxy.stats()[f"cluster.c.{name}"]

    async def eventually(self, pred: Callable[[], Any], timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = pred()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            if loop.time() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            await asyncio.sleep(0.01)

    async def flags_are(self, want: dict[int, str], timeout: float = 3.0) -> None:
        async def check() -> bool:
            return await self.flags() == want

        try:
            await self.eventually(check, timeout)
        except AssertionError:
            raise AssertionError(f"flags {await self.flags()} != {want}") from None

    def health_checker(self) -> Any:
        server = self.proxy.server
        assert server is not None and server.cluster_manager is not None
        return server.cluster_manager.clusters["c"].health_checker


async def start(cluster_cfg: dict[str, Any]) -> Running:
    proxy = pyenvoy.Proxy(bootstrap(cluster_cfg))
    await proxy.start()
    return Running(proxy)


@pytest.fixture
async def running() -> Any:
    holder: list[Running] = []

    async def factory(cluster_cfg: dict[str, Any]) -> Running:
        r = await start(cluster_cfg)
        holder.append(r)
        return r

    yield factory
    for r in holder:
        await r.client.aclose()
        await r.proxy.stop()


@pytest.fixture
def upstreams() -> Iterator[Callable[[], HttpUpstream]]:
    made: list[Any] = []

    def make() -> HttpUpstream:
        u = HttpUpstream().start()
        made.append(u)
        return u  # type: ignore[return-value]

    yield make
    for u in made:
        u.stop()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HangServer:
    """Accepts and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(2)


HTTP_HC = {"http_health_check": {"path": "/healthz"}, "no_traffic_interval": "0.05s"}


# --- HTTP ---------------------------------------------------------------------------------------


async def test_http_initial_state_and_first_round(running: Any, upstreams: Any) -> None:
    good, bad = upstreams(), upstreams()
    bad.raw_responses["/healthz"] = R503
    r: Running = await running(
        cluster([good.port, bad.port], {"http_health_check": {"path": "/healthz"}})
    )
    # Hosts start failed; the first passing check makes a host healthy at once (healthy
    # threshold 2 notwithstanding), a 503 fails it at once (unhealthy threshold 2).
    await r.health_checker().wait_initialized()
    await r.flags_are({good.port: "healthy", bad.port: "/failed_active_hc"})
    assert r.hc() == {
        "attempt": 2,
        "success": 1,
        "failure": 1,
        "network_failure": 0,
        "passive_failure": 0,
        "verify_cluster": 0,
        "healthy": 1,
        "degraded": 0,
    }
    assert r.cluster_stat("membership_healthy") == 1
    assert r.cluster_stat("membership_total") == 2
    assert (
        good.requests[0].raw_head
        == b"GET /healthz HTTP/1.1\r\nhost: c\r\nuser-agent: Envoy/HC\r\n\r\n"
    )
    # Traffic avoids the failed host. No no_traffic_interval: the next check is 60 s away.
    assert [await r.get() for _ in range(4)] == [200] * 4
    assert bad.request_count == 1 and good.request_count == 5
    assert r.hc()["attempt"] == 2


async def test_http_fail_and_recover_with_thresholds(running: Any, upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    r: Running = await running(cluster([a.port, b.port], HTTP_HC))
    await r.flags_are({a.port: "healthy", b.port: "healthy"})
    b.raw_responses["/healthz"] = R503
    await r.flags_are({a.port: "healthy", b.port: "/failed_active_hc"})
    assert r.hc()["healthy"] == 1
    # The failed host gets no traffic.
    before = b.request_count
    assert [await r.get() for _ in range(4)] == [200] * 4
    assert [q.path for q in b.requests[before:]].count("/x") == 0
    # Back to 200: it takes healthy_threshold (2) passing checks.
    del b.raw_responses["/healthz"]
    successes = r.hc()["success"]
    await r.flags_are({a.port: "healthy", b.port: "healthy"})
    assert r.hc()["success"] - successes >= 3  # at least 2 from b (plus a's)
    assert r.hc()["healthy"] == 2


async def test_network_failures_need_unhealthy_threshold(running: Any, upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    r: Running = await running(cluster([a.port, b.port], {**HTTP_HC, "unhealthy_threshold": 3}))
    await r.flags_are({a.port: "healthy", b.port: "healthy"})
    hc = r.health_checker().checkers[0]
    b.stop()  # connection refused from now on
    session = hc.sessions[next(h for h in hc.sessions if h.address[1] == b.port)]
    await r.eventually(lambda: session.num_unhealthy >= 1)
    assert (await r.flags())[b.port] == "healthy"  # one network failure is not enough
    await r.flags_are({a.port: "healthy", b.port: "/failed_active_hc"})
    st = r.hc()
    assert st["network_failure"] >= 3 and st["healthy"] == 1


async def test_timeout_is_a_network_failure(running: Any) -> None:
    hang = HangServer()
    try:
        r: Running = await running(
            cluster([hang.port], {**HTTP_HC, "timeout": "0.1s", "unhealthy_threshold": 1})
        )
        await r.eventually(lambda: r.hc()["network_failure"] >= 1)
        host = r.health_checker().checkers[0].cluster.hosts[0]
        assert host.health_flags & FAILED_ACTIVE_HC
        assert host.health_flags & hc_mod.ACTIVE_HC_TIMEOUT
        assert r.hc()["failure"] == r.hc()["network_failure"]
    finally:
        hang.stop()


async def test_retriable_statuses_and_expected_statuses(running: Any, upstreams: Any) -> None:
    a = upstreams()
    a.raw_responses["/healthz"] = b"HTTP/1.1 204 No Content\r\n\r\n"
    r: Running = await running(
        cluster(
            [a.port],
            {
                **HTTP_HC,
                "unhealthy_threshold": 3,
                "http_health_check": {
                    "path": "/healthz",
                    "expected_statuses": [{"start": 200, "end": 300}],
                    "retriable_statuses": [{"start": 500, "end": 501}],
                },
            },
        )
    )
    await r.flags_are({a.port: "healthy"})  # 204 is expected
    a.raw_responses["/healthz"] = R500
    hc = r.health_checker().checkers[0]
    session = next(iter(hc.sessions.values()))
    await r.eventually(lambda: session.num_unhealthy == 2)
    assert (await r.flags())[a.port] == "healthy"  # retriable: counts towards the threshold
    await r.flags_are({a.port: "/failed_active_hc"})
    assert r.hc()["network_failure"] == 0


async def test_request_headers_method_body_and_receive(running: Any, upstreams: Any) -> None:
    a = upstreams()
    a.raw_responses["/hc"] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nstatus: UP!"
    r: Running = await running(
        cluster(
            [a.port],
            {
                **HTTP_HC,
                "http_health_check": {
                    "path": "/hc",
                    "host": "health.example",
                    "method": "POST",
                    "send": {"text": "70696e67"},
                    "receive": [{"text": "5550"}],  # "UP"
                    "request_headers_to_add": [
                        {"header": {"key": "x-a", "value": "1"}},
                        {"header": {"key": "user-agent", "value": "extra"}},
                    ],
                    "request_headers_to_remove": ["x-gone"],
                },
            },
        )
    )
    await r.flags_are({a.port: "healthy"})
    req = a.requests[0]
    assert req.raw_head == (
        b"POST /hc HTTP/1.1\r\nhost: health.example\r\nuser-agent: Envoy/HC,extra\r\n"
        b"x-a: 1\r\ncontent-length: 4\r\n\r\n"
    )
    assert req.body_length == 4
    # The body no longer contains the expected bytes: a non-retriable failure.
    a.raw_responses["/hc"] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nDOWN"
    await r.flags_are({a.port: "/failed_active_hc"})


async def test_connection_reuse(running: Any, upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    r: Running = await running(cluster([a.port], HTTP_HC))
    await r.eventually(lambda: a.request_count >= 4)
    assert {q.conn_id for q in a.requests} == {1}
    await r.client.aclose()
    await r.proxy.stop()
    r2: Running = await running(cluster([b.port], {**HTTP_HC, "reuse_connection": False}))
    await r2.eventually(lambda: b.request_count >= 3)
    assert len({q.conn_id for q in b.requests}) == b.request_count


async def test_connection_close_response_reconnects(running: Any, upstreams: Any) -> None:
    a = upstreams()
    a.raw_responses["/healthz"] = (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    r: Running = await running(cluster([a.port], HTTP_HC))
    await r.eventually(lambda: a.request_count >= 3)
    assert len({q.conn_id for q in a.requests}) == a.request_count
    assert r.hc()["failure"] == 0


async def test_degraded_and_immediate_fail_headers(running: Any, upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    a.raw_responses["/healthz"] = (
        b"HTTP/1.1 200 OK\r\nx-envoy-degraded: 1\r\ncontent-length: 0\r\n\r\n"
    )
    b.raw_responses["/healthz"] = (
        b"HTTP/1.1 503 Service Unavailable\r\nx-envoy-immediate-health-check-fail: true\r\n"
        b"content-length: 0\r\n\r\n"
    )
    r: Running = await running(cluster([a.port, b.port], HTTP_HC))
    await r.eventually(lambda: r.hc()["degraded"] == 1 and r.hc()["failure"] >= 1)
    ha, hb = r.health_checker().checkers[0].cluster.hosts
    assert (await r.flags())[a.port] == "/degraded_active_hc"
    assert hb.health_flags & FAILED_ACTIVE_HC
    assert hb.health_flags & hc_mod.EXCLUDED_VIA_IMMEDIATE_HC_FAIL


async def test_no_traffic_interval_until_traffic(running: Any, upstreams: Any) -> None:
    a = upstreams()
    r: Running = await running(
        cluster(
            [a.port], {"http_health_check": {"path": "/healthz"}, "no_traffic_interval": "1s"}
        )
    )
    await r.flags_are({a.port: "healthy"})
    await asyncio.sleep(0.2)
    assert r.hc()["attempt"] == 1  # no traffic yet: the next check waits no_traffic_interval
    assert await r.get() == 200
    await r.eventually(lambda: r.hc()["attempt"] >= 2, 2)
    attempts = r.hc()["attempt"]
    await asyncio.sleep(0.3)
    assert r.hc()["attempt"] >= attempts + 3  # now every 50 ms


async def test_interval_jitter_stays_in_range(running: Any, upstreams: Any) -> None:
    a = upstreams()
    r: Running = await running(
        cluster([a.port], {**HTTP_HC, "interval_jitter": "0.02s", "interval_jitter_percent": 50})
    )
    checker = r.health_checker().checkers[0]
    values = {checker.interval(True, hc_mod.UNCHANGED) for _ in range(200)}
    assert min(values) >= 50 and max(values) < 50 + 25 + 20
    assert len(values) > 5
    assert checker.interval_with_jitter(0, 0) == 1  # never zero


# --- TCP -----------------------------------------------------------------------------------------


async def test_tcp_connect_only_and_refused(running: Any) -> None:
    echo = TcpEchoUpstream()
    echo.start()
    dead = dead_port()
    try:
        r: Running = await running(
            cluster(
                [echo.port, dead],
                {"tcp_health_check": {"send": {"text": "50"}}, "no_traffic_interval": "0.05s"},
            )
        )
        await r.flags_are({echo.port: "healthy", dead: "/failed_active_hc"})
        await r.eventually(lambda: echo.connections >= 3)
        # Connect-only (no ``receive``): even ``send`` is never written (as in Envoy), and
        # each check uses a new connection.
        assert all(n == 0 for n in echo.received.values())
        assert r.hc()["network_failure"] >= 1
    finally:
        echo.stop()


async def test_tcp_send_receive_reuses_connection(running: Any) -> None:
    echo = TcpEchoUpstream()
    echo.start()
    try:
        r: Running = await running(
            cluster(
                [echo.port],
                {
                    "tcp_health_check": {
                        "send": {"text": "50494e47"},
                        "receive": [{"text": "50"}, {"text": "4e47"}],
                    },
                    "no_traffic_interval": "0.05s",
                },
            )
        )
        await r.flags_are({echo.port: "healthy"})
        await r.eventually(lambda: r.hc()["success"] >= 3)
        assert echo.connections == 1
        assert echo.received[1] >= 12
    finally:
        echo.stop()


async def test_tcp_wrong_reply_times_out(running: Any, upstreams: Any) -> None:
    a = upstreams()  # an HTTP server never answers "PING"
    r: Running = await running(
        cluster(
            [a.port],
            {
                "tcp_health_check": {
                    "send": {"text": "50494e47"},
                    "receive": [{"text": "504f4e47"}],
                },
                "timeout": "0.1s",
                "unhealthy_threshold": 1,
                "no_traffic_interval": "0.05s",
            },
        )
    )
    await r.eventually(lambda: r.hc()["network_failure"] >= 1)
    assert (await r.flags())[a.port] == "/failed_active_hc/active_hc_timeout"


def test_payload_match_searches_in_order() -> None:
    assert payload_match([b"ab", b"ef"], b"xxabcdefyy")
    assert not payload_match([b"ef", b"ab"], b"xxabcdefyy")
    assert payload_match([], b"")
    assert not payload_match([b"a"], b"")


# --- gRPC ---------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


class GrpcHealth:
    def __init__(self) -> None:
        import grpc

        self.status: dict[str, int] = {}
        self.calls: list[tuple[str, dict[str, str]]] = []

        def check(request: bytes, context: Any) -> bytes:
            service = request[2 : 2 + request[1]].decode() if request[:1] == b"\x0a" else ""
            self.calls.append((service, {m.key: m.value for m in context.invocation_metadata()}))
            return b"\x08" + _varint(self.status.get(service, 1))

        handler = grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    check, request_deserializer=lambda b: b, response_serializer=lambda b: b
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


async def test_grpc_serving_and_not_serving(running: Any) -> None:
    g = GrpcHealth()
    try:
        r: Running = await running(
            cluster(
                [g.port],
                {
                    "grpc_health_check": {
                        "service_name": "svc",
                        "authority": "grpc.example",
                        "initial_metadata": [{"header": {"key": "x-md", "value": "v"}}],
                    },
                    "no_traffic_interval": "0.05s",
                },
                http2_protocol_options={},
            )
        )
        await r.flags_are({g.port: "healthy"})
        service, metadata = g.calls[0]
        assert service == "svc"
        assert metadata["user-agent"] == "Envoy/HC"
        assert metadata["x-md"] == "v"
        g.status["svc"] = 2  # NOT_SERVING fails at once
        await r.flags_are({g.port: "/failed_active_hc"})
        g.status["svc"] = 1
        await r.flags_are({g.port: "healthy"})
        assert r.hc()["network_failure"] == 0
    finally:
        g.stop()


async def test_grpc_server_gone_is_network_failure(running: Any) -> None:
    g = GrpcHealth()
    r: Running = await running(
        cluster(
            [g.port],
            {"grpc_health_check": {}, "no_traffic_interval": "0.05s"},
            http2_protocol_options={},
        )
    )
    await r.flags_are({g.port: "healthy"})
    assert g.calls[0][0] == ""
    g.stop()
    await r.flags_are({g.port: "/failed_active_hc"})
    assert r.hc()["network_failure"] >= 2


def test_grpc_health_response_parsing() -> None:
    assert hc_mod.parse_health_check_response(b"\x08\x01") == 1
    assert hc_mod.parse_health_check_response(b"") == 0
    assert hc_mod.parse_health_check_response(b"\x12\x02hi\x08\x02") == 2
    with pytest.raises(ValueError):
        hc_mod.parse_health_check_response(b"\x08")
    assert hc_mod._grpc_timeout(1000) == b"1000m"
    assert hc_mod._grpc_timeout(200_000_000) == b"200000S"


# --- host set changes and the cluster seams --------------------------------------------------------


def _cluster_proto(
    ports: list[int], hc: dict[str, Any] | None = None, **extra: Any
) -> ClusterProto:
    return ParseDict(cluster(ports, hc, **extra), ClusterProto())


async def test_new_hosts_start_failed_and_get_checked(upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    cm = ClusterManager([_cluster_proto([a.port], HTTP_HC)], Store())
    c = cm.get("c")
    assert c is not None
    assert c.hosts[0].health_flags & FAILED_ACTIVE_HC  # before any check
    try:
        await c.initialize()
        await c.health_checker.wait_initialized()
        assert c.hosts[0].healthy
        newcomer = Host(("127.0.0.1", b.port), c.info)
        c.set_hosts([c.hosts[0], newcomer])
        assert newcomer.health_flags & FAILED_ACTIVE_HC
        assert c.choose_host() is c.hosts[0]
        for _ in range(100):
            if newcomer.healthy:
                break
            await asyncio.sleep(0.02)
        assert newcomer.healthy
        # Removing a host stops its session and its checks.
        c.set_hosts([newcomer])
        assert len(c.health_checker.checkers[0].sessions) == 1
        assert c.info.stats.scope.gauge("health_check.healthy").value == 1
    finally:
        cm.close()


async def test_immediate_health_check_fail_hook(upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    cm = ClusterManager(
        [_cluster_proto([a.port, b.port], {"http_health_check": {"path": "/h"}})], Store()
    )
    c = cm.get("c")
    assert c is not None
    try:
        await c.initialize()
        await c.health_checker.wait_initialized()
        ha = c.hosts[0]
        assert ha.healthy
        c.health_checker.on_immediate_health_check_fail(ha)
        assert ha.health_flags & FAILED_ACTIVE_HC
        assert ha.health_flags & hc_mod.EXCLUDED_VIA_IMMEDIATE_HC_FAIL
        assert c.info.stats.scope.counter("health_check.passive_failure").value == 1
        assert ha not in c.healthy_hosts
    finally:
        cm.close()


async def test_passing_check_unejects_outlier(upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    proto = _cluster_proto(
        [a.port, b.port],
        HTTP_HC,
        outlier_detection={"max_ejection_percent": 100, "base_ejection_time": "300s"},
    )
    cm = ClusterManager([proto], Store())
    c = cm.get("c")
    assert c is not None
    try:
        await c.initialize()
        await c.health_checker.wait_initialized()
        hb = c.hosts[1]
        for _ in range(5):
            c.outlier.on_upstream_response(hb, 500)
        assert hb.health_flags & FAILED_OUTLIER_CHECK
        for _ in range(100):
            if not hb.health_flags & FAILED_OUTLIER_CHECK:
                break
            await asyncio.sleep(0.02)
        assert not hb.health_flags & FAILED_OUTLIER_CHECK
    finally:
        cm.close()


# --- config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hc", "extra", "message"),
    [
        ({"tcp_health_check": {"send": {"text": "zz"}}}, {}, "invalid hex string 'zz'"),
        (
            {
                "http_health_check": {
                    "path": "/h",
                    "expected_statuses": [{"start": 200, "end": 200}],
                }
            },
            {},
            "Invalid http expected status range: expecting start < end, but found start=200 and end=200",
        ),
        (
            {
                "http_health_check": {
                    "path": "/h",
                    "retriable_statuses": [{"start": 500, "end": 601}],
                }
            },
            {},
            "Invalid http retriable status range: expecting end <= 600, but found end=601",
        ),
        (
            {"http_health_check": {"path": "/h", "send": {"text": "00"}}},
            {},
            "HTTP health check cannot specify a request payload with method 'GET'",
        ),
        (
            {
                "http_health_check": {
                    "path": "/h",
                    "receive": [{"text": "6f6b"}],
                    "response_buffer_size": 1,
                }
            },
            {},
            "The expected response length '2' is over than http health response buffer size '1'",
        ),
        ({"grpc_health_check": {}}, {}, "c cluster must support HTTP/2 for gRPC healthchecking"),
        (
            {"http_health_check": {"path": "/h"}, "event_log_path": "/dev/null"},
            {},
            "event_log_path",
        ),
    ],
)
def test_config_errors(hc: dict[str, Any], extra: dict[str, Any], message: str) -> None:
    full = {
        "timeout": "1s",
        "interval": "1s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        **hc,
    }
    d = cluster([1])
    d["health_checks"] = [full]
    with pytest.raises(ConfigError) as e:
        ClusterManager([ParseDict(d, ClusterProto())], Store())
    assert message in str(e.value)


def test_multiple_health_checks_need_names() -> None:
    d = cluster([1])
    one = {
        "timeout": "1s",
        "interval": "1s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "tcp_health_check": {},
    }
    d["health_checks"] = [one, one]
    with pytest.raises(ConfigError, match="all health checks must have a name"):
        ClusterManager([ParseDict(d, ClusterProto())], Store())


# --- worker processes: the main process checks, workers follow ------------------------------------


class MainAndWorker:
    """A main-process ClusterManager that health-checks and a worker's that does not, linked
    the way WorkerPool links them (a HealthPublisher whose messages go through JSON into the
    worker's RemoteHealth), in one process."""

    def __init__(self, proto: ClusterProto) -> None:
        self.main = ClusterManager([proto], Store())
        self.worker = ClusterManager([proto], Store())
        self.remote = hc_mod.RemoteHealth()
        self.worker.use_remote_health(self.remote)
        self.messages: list[dict[str, Any]] = []
        self.publisher = hc_mod.HealthPublisher(self.main, self._send)

    def _send(self, msg: dict[str, Any]) -> None:
        msg = json.loads(json.dumps(msg))  # what the control socket carries
        self.messages.append(msg)
        self.remote.update(msg)

    def hosts(self, cm: ClusterManager) -> dict[int, Host]:
        c = cm.get("c")
        assert c is not None
        return {h.address[1]: h for h in c.hosts}

    def close(self) -> None:
        self.publisher.close()
        self.main.close()
        self.worker.close()


async def until(pred: Callable[[], Any], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.01)


async def test_worker_takes_health_from_the_main_process(upstreams: Any) -> None:
    a, b, x = upstreams(), upstreams(), upstreams()
    pair = MainAndWorker(_cluster_proto([a.port, b.port], HTTP_HC))
    wc = pair.worker.get("c")
    assert wc is not None
    try:
        # The worker's init holds until the main process's first round is done.
        worker_init = asyncio.ensure_future(pair.worker.initialize())
        await asyncio.sleep(0.2)
        assert not worker_init.done()
        assert a.request_count == b.request_count == 0  # the worker checks nothing itself
        await pair.main.initialize()
        await asyncio.wait_for(worker_init, 2)
        assert all(h.healthy for h in pair.hosts(pair.worker).values())
        assert wc.health_checker.checkers[0].sessions == {}
        # One checker: every check the upstreams saw is one of the main process's.
        await asyncio.sleep(0.2)
        main_attempts = pair.main.stats_store.scope("cluster.c").counter("health_check.attempt")
        seen = a.request_count + b.request_count
        assert seen <= main_attempts.value <= seen + 2
        assert pair.worker.stats_store.scope("cluster.c").counter("health_check.attempt").value == 0
        # b fails in the main process: the worker's load balancer drops it at once.
        b.raw_responses["/healthz"] = R503
        wb = pair.hosts(pair.worker)[b.port]
        await until(lambda: wb.health_flags & FAILED_ACTIVE_HC)
        assert pair.hosts(pair.main)[b.port].health_flags & FAILED_ACTIVE_HC
        assert {wc.choose_host().address[1] for _ in range(20)} == {a.port}  # type: ignore[union-attr]
        assert wc.info.stats.membership_healthy.value == 1
        del b.raw_responses["/healthz"]
        await until(lambda: wb.healthy)
        # A host the main process has not checked (not in its config yet) stays failed in
        # the worker; once the main process has it and checks it, the worker follows.
        wc.set_hosts([*wc.hosts, Host(("127.0.0.1", x.port), wc.info)])
        wx = pair.hosts(pair.worker)[x.port]
        assert wx.health_flags & FAILED_ACTIVE_HC
        await asyncio.sleep(0.1)
        assert wx.health_flags & FAILED_ACTIVE_HC and x.request_count == 0
        mc = pair.main.get("c")
        assert mc is not None
        mc.set_hosts([*mc.hosts, Host(("127.0.0.1", x.port), mc.info)])
        await until(lambda: wx.healthy)
        assert x.request_count >= 1
        # Messages carry whole clusters, only when something changed.
        last = pair.messages[-1]
        assert last["op"] == "host_health" and last["full"] is False
        assert sorted(p for _, p, _ in last["clusters"]["c"]["hosts"]) == sorted(
            [a.port, b.port, x.port]
        )
        count = len(pair.messages)
        await asyncio.sleep(0.2)  # checks keep passing: nothing to send
        assert len(pair.messages) == count
    finally:
        pair.close()


async def test_main_process_check_unejects_in_the_worker(upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    proto = _cluster_proto(
        [a.port, b.port],
        HTTP_HC,
        outlier_detection={"max_ejection_percent": 100, "base_ejection_time": "300s"},
    )
    pair = MainAndWorker(proto)
    try:
        await pair.main.initialize()
        await pair.worker.initialize()
        wc = pair.worker.get("c")
        assert wc is not None
        wb = pair.hosts(pair.worker)[b.port]
        for _ in range(5):  # the worker's own outlier detector ejects b
            wc.outlier.on_upstream_response(wb, 500)
        assert wb.health_flags & FAILED_OUTLIER_CHECK
        assert not pair.hosts(pair.main)[b.port].health_flags & FAILED_OUTLIER_CHECK
        # The main process's next passing check of b brings it back (Envoy's
        # successful_active_health_check_uneject_host), within PASSED_FLUSH_S.
        await until(lambda: not wb.health_flags & FAILED_OUTLIER_CHECK, 2)
        assert any(m["passed"].get("c") for m in pair.messages)
    finally:
        pair.close()


async def test_worker_snapshot_and_cluster_changes(upstreams: Any) -> None:
    a = upstreams()
    pair = MainAndWorker(_cluster_proto([a.port], HTTP_HC))
    try:
        await pair.main.initialize()
        # A worker that starts gets the whole state (every health-checked cluster).
        snap = pair.publisher.snapshot()
        assert snap == {
            "op": "host_health",
            "full": True,
            "clusters": {"c": {"initialized": True, "hosts": [["127.0.0.1", a.port, 0]]}},
            "passed": {},
        }
        pair.remote.update(snap)
        await asyncio.wait_for(pair.worker.initialize(), 1)
        assert pair.hosts(pair.worker)[a.port].healthy
        # The cluster goes away in the main process: a full resync forgets it.
        pair.main.remove("c")
        await until(lambda: "c" not in pair.remote.clusters)
        assert pair.messages[-1]["full"] is True and pair.messages[-1]["clusters"] == {}
    finally:
        pair.close()


async def test_immediate_fail_in_a_worker_is_local_and_temporary(upstreams: Any) -> None:
    """A worker has no sessions: the router's immediate fail excludes the host in that
    worker only, until healthy_threshold intervals have passed (or the main process says
    otherwise); the main process hears nothing of it."""
    a, b = upstreams(), upstreams()
    pair = MainAndWorker(_cluster_proto([a.port, b.port], {**HTTP_HC, "interval": "0.2s"}))
    try:
        await pair.main.initialize()
        await pair.worker.initialize()
        wc = pair.worker.get("c")
        assert wc is not None
        wb = pair.hosts(pair.worker)[b.port]
        sent = len(pair.messages)
        wc.health_checker.on_immediate_health_check_fail(wb)
        both = FAILED_ACTIVE_HC | hc_mod.EXCLUDED_VIA_IMMEDIATE_HC_FAIL
        assert wb.health_flags & both == both
        assert {wc.choose_host().address[1] for _ in range(20)} == {a.port}  # type: ignore[union-attr]
        assert pair.hosts(pair.main)[b.port].healthy
        assert wc.info.stats.scope.counter("health_check.passive_failure").value == 0
        # healthy_threshold (2) x interval (0.2 s): the main process's state comes back.
        await asyncio.sleep(0.15)
        assert not wb.healthy
        await until(lambda: wb.healthy, 2)
        assert {wc.choose_host().address[1] for _ in range(20)} == {a.port, b.port}  # type: ignore[union-attr]
        assert len(pair.messages) == sent
    finally:
        pair.close()


# --- x-envoy-immediate-health-check-fail on proxied responses, against real Envoy ---------------

IMMEDIATE_CONFIG = """
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {admin_port} }
static_resources:
  listeners:
  - name: main
    address:
      socket_address: { address: 127.0.0.1, port_value: {listener_port} }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: t
          route_config:
            virtual_hosts:
            - name: plain
              domains: ["plain"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: hc1 }
            - name: retry
              domains: ["retry"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: hc2
                  retry_policy: { retry_on: 5xx, num_retries: 1 }
            - name: nohc
              domains: ["nohc"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: nohc }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: hc1
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: hc1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a_port} } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {b_port} } } }
    health_checks:
    - timeout: 1s
      interval: 0.4s
      no_traffic_interval: 0.4s
      unhealthy_threshold: 2
      healthy_threshold: 2
      http_health_check: { path: /healthz }
  - name: hc2
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: hc2
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a_port} } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {b_port} } } }
    health_checks:
    - timeout: 1s
      interval: 60s
      unhealthy_threshold: 2
      healthy_threshold: 2
      http_health_check: { path: /healthz }
  - name: nohc
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: nohc
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a_port} } } }
"""
IMMEDIATE = "x-envoy-immediate-health-check-fail"
_imm_ids = itertools.count()
EXCLUDED = "/failed_active_hc/excluded_via_immediate_hc_fail"


@pytest.fixture(scope="module")
def imm_upstreams() -> Iterator[tuple[HttpUpstream, HttpUpstream]]:
    a, b = HttpUpstream().start(), HttpUpstream().start()
    try:
        yield a, b  # type: ignore[misc]
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def imm_proxy(proxy_kind: str, imm_upstreams: tuple[HttpUpstream, HttpUpstream]) -> Iterator[Any]:
    from tests.support.procs import start_proxy

    a, b = imm_upstreams
    p = start_proxy(proxy_kind, IMMEDIATE_CONFIG, a_port=a.port, b_port=b.port)
    try:
        for name in ("hc1", "hc2"):
            p.wait_stat(f"cluster.{name}.membership_healthy", 2, timeout=10)
        yield p
    finally:
        p.stop()


def _flags(proxy: Any, cluster_name: str) -> dict[int, str]:
    status, _, body = proxy.admin("/clusters")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster_name and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def _served(ups: tuple[HttpUpstream, HttpUpstream], tid: str) -> int:
    for u in ups:
        if any(q.header("x-test-id") == tid for q in list(u.requests)):
            return u.port
    raise AssertionError(f"{tid} reached no upstream")


def _hc_stats(proxy: Any, name: str) -> dict[str, int]:
    prefix = f"cluster.{name}.health_check."
    return {k[len(prefix) :]: v for k, v in proxy.stats().items() if k.startswith(prefix)}


def test_proxied_immediate_fail_excludes_the_host_until_checks_pass(
    imm_proxy: Any, imm_upstreams: tuple[HttpUpstream, HttpUpstream]
) -> None:
    before = _hc_stats(imm_proxy, "hc1")
    # (the upstreams outlive one proxy kind: every request gets its own id)
    ids = [f"imm-{next(_imm_ids)}" for _ in range(5)]
    with httpx.Client(base_url=imm_proxy.url("/"), timeout=5) as client:
        r = client.get(f"/headers?{IMMEDIATE}=true", headers={"host": "plain", "x-test-id": ids[0]})
        assert r.status_code == 200
        assert r.headers.get(IMMEDIATE) == "true"  # forwarded downstream as it came
        failed = _served(imm_upstreams, ids[0])
        other = next(u.port for u in imm_upstreams if u.port != failed)
        assert _flags(imm_proxy, "hc1") == {failed: EXCLUDED, other: "healthy"}
        after = _hc_stats(imm_proxy, "hc1")
        assert after["failure"] - before["failure"] == 1
        assert after["passive_failure"] - before["passive_failure"] == 1
        assert after["healthy"] == 1
        assert after["attempt"] - before["attempt"] <= 1  # no extra probe
        assert imm_proxy.stats()["cluster.hc1.membership_excluded"] == 1
        for tid in ids[1:]:
            client.get("/echo", headers={"host": "plain", "x-test-id": tid})
            assert _served(imm_upstreams, tid) == other
        # Two passing checks (healthy_threshold) bring it back.
        deadline = time.monotonic() + 5
        while _flags(imm_proxy, "hc1")[failed] != "healthy" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _flags(imm_proxy, "hc1") == {failed: "healthy", other: "healthy"}
        assert _hc_stats(imm_proxy, "hc1")["healthy"] == 2
        assert imm_proxy.stats()["cluster.hc1.membership_excluded"] == 0


def test_a_retried_response_fails_its_host_too(
    imm_proxy: Any, imm_upstreams: tuple[HttpUpstream, HttpUpstream]
) -> None:
    a, b = imm_upstreams
    a.raw_responses["/imm503"] = (
        f"HTTP/1.1 503 Service Unavailable\r\n{IMMEDIATE}: true\r\ncontent-length: 0\r\n\r\n"
    ).encode()
    try:
        with httpx.Client(base_url=imm_proxy.url("/"), timeout=5) as client:
            for _ in range(3):  # round robin: a within two requests
                seen = sum(q.path == "/imm503" for q in list(a.requests))
                r = client.get("/imm503", headers={"host": "retry"})
                assert r.status_code == 200  # b answered the retry (or the request)
                assert IMMEDIATE not in r.headers
                if sum(q.path == "/imm503" for q in list(a.requests)) > seen:
                    break
        assert _flags(imm_proxy, "hc2") == {a.port: EXCLUDED, b.port: "healthy"}
        stats = _hc_stats(imm_proxy, "hc2")
        assert (stats["passive_failure"], stats["healthy"]) == (1, 1)
        assert imm_proxy.stats()["cluster.hc2.upstream_rq_retry"] == 1
    finally:
        del a.raw_responses["/imm503"]


def test_without_active_health_checking_the_header_only_passes_through(imm_proxy: Any) -> None:
    with httpx.Client(base_url=imm_proxy.url("/"), timeout=5) as client:
        r = client.get(f"/headers?{IMMEDIATE}=true", headers={"host": "nohc"})
    assert r.status_code == 200
    assert r.headers.get(IMMEDIATE) == "true"
    assert _flags(imm_proxy, "nohc") == {next(iter(_flags(imm_proxy, "nohc"))): "healthy"}
