"""Router retries through the embedding API, against real upstreams failing on purpose.

Each test builds a config dict, starts ``pyenvoy.Proxy`` in the test's event loop and
talks to it over real loopback sockets. Upstreams: ``HttpUpstream`` (behaviour by path:
/status/<code>, /delay/<ms>, /reset, /close) and small flaky servers defined here. The
helpers at the top are shared with test_circuit_breakers.py and test_traffic_split.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest

import pyenvoy
from pyenvoy.config import ConfigError
from pyenvoy.extensions.filters.http.router import retry_state
from pyenvoy.server import Server
from tests.support.procs import RawResponse, free_port, parse_raw_responses
from tests.support.upstream import HttpUpstream

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
# %RESPONSE_FLAGS% in a response header shows the flags of every response, local or not.
FLAGS_HEADER = {"header": {"key": "x-flags", "value": "%RESPONSE_FLAGS%"}}
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}


# --- shared helpers ------------------------------------------------------------------------
def cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": extra.pop("connect_timeout", "1s"),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": p}
                                }
                            }
                        }
                        for p in ports
                    ]
                }
            ],
        },
        **extra,
    }


def config(
    routes: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    *,
    vhost: dict[str, Any] | None = None,
    hcm: dict[str, Any] | None = None,
    bootstrap: dict[str, Any] | None = None,
    flags: bool = True,
) -> dict[str, Any]:
    vh: dict[str, Any] = {"name": "vh", "domains": ["*"], "routes": routes, **(vhost or {})}
    if flags:
        vh.setdefault("response_headers_to_add", []).append(FLAGS_HEADER)
    hcm_cfg = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [vh]},
        "http_filters": [ROUTER],
        **(hcm or {}),
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm_cfg,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        **(bootstrap or {}),
    }


def route(prefix: str, cluster_name: str, **action: Any) -> dict[str, Any]:
    extra = action.pop("route_extra", {})
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name, **action}, **extra}


async def request(
    port: int,
    path: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | list[bytes] = b"",
    gap: float = 0.0,
    timeout: float = 5.0,
    host: str = "a",
) -> RawResponse:
    """One request on a new connection; the parsed response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pieces = body if isinstance(body, list) else [body]
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
        for k, v in headers or []:
            head += f"{k}: {v}\r\n"
        if isinstance(body, list):
            if not any(
                k.lower() in ("content-length", "transfer-encoding") for k, _ in headers or []
            ):
                head += f"content-length: {sum(len(p) for p in pieces)}\r\n"
        elif body or method in ("POST", "PUT"):
            head += f"content-length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n")
        for i, piece in enumerate(pieces):
            if i and gap:
                await asyncio.sleep(gap)
            writer.write(piece)
            await writer.drain()
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no complete response: {buf[:300]!r}")
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), remaining)
            except TimeoutError:
                raise AssertionError(f"no complete response: {buf[:300]!r}") from None
            if not chunk:
                responses = parse_raw_responses(buf, strict=False)
                assert responses, f"connection closed: {buf[:300]!r}"
                return responses[0]
            buf += chunk
            try:
                responses = parse_raw_responses(buf)
            except ValueError:
                continue
            if responses:
                return responses[0]
    finally:
        writer.close()


def names(resp: RawResponse) -> list[str]:
    return [k for k, _ in resp.headers]


def flags(resp: RawResponse) -> set[str]:
    """The response flags (x-flags: %RESPONSE_FLAGS%) as a set: Envoy 1.40 renders them in
    the order they were set, which is not what these tests are about."""
    return set((resp.header("x-flags") or "").split(","))


@pytest.fixture(scope="module")
def upstream() -> Any:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


class ScriptedUpstream:
    """An HTTP/1.1 server answering the n-th request with ``script[n]`` (the last entry
    repeats): ``int`` status (empty body, keep-alive), ``"reset"`` (RST after reading the
    request), ``"hang"`` (never answers), ``"early503"`` (503 and close before reading the
    body). Records method, path, headers and body."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                hdrs = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]
                action = self.script[min(len(self.requests), len(self.script) - 1)]
                if action == "early503":
                    # Answer before reading the body, then close.
                    self.requests.append({"path": path.decode(), "headers": hdrs, "body": None})
                    writer.write(
                        b"HTTP/1.1 503 X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    await writer.drain()
                    return
                hmap: dict[bytes, bytes] = dict(hdrs)  # type: ignore[arg-type]
                if hmap.get(b"transfer-encoding") == b"chunked":
                    body = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                else:
                    length = int(hmap.get(b"content-length", b"0"))
                    body = await reader.readexactly(length) if length else b""
                n = len(self.requests)
                self.requests.append({"path": path.decode(), "headers": hdrs, "body": body})
                action = self.script[min(n, len(self.script) - 1)]
                if action == "reset":
                    import socket
                    import struct

                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if action == "hang":
                    await asyncio.sleep(30)
                    return
                writer.write(f"HTTP/1.1 {action} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def stats_of(proxy: pyenvoy.Proxy, prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in proxy.stats().items() if k.startswith(prefix)}


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


# random % interval == interval - 1 for every interval used in these tests.
MAX_RANDOM = 12_000_000_000 - 1


def fixed_backoff(monkeypatch: pytest.MonkeyPatch, value: int) -> None:
    """Make the jittered back-off deterministic: random % interval with random = value."""
    monkeypatch.setattr(retry_state.random, "getrandbits", lambda bits: value)


# --- retry on responses -----------------------------------------------------------------------
async def test_retry_5xx_until_limit(upstream: HttpUpstream) -> None:
    cfg = config(
        [
            route(
                "/r/",
                "backend",
                prefix_rewrite="/status/",
                retry_policy={"retry_on": "5xx", "num_retries": 2},
            )
        ],
        [cluster("backend", upstream.port)],
        vhost={"include_request_attempt_count": True, "include_attempt_count_in_response": True},
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/r/503")
        assert resp.status == 503
        # Upstream headers, service time, route headers, then the attempt count.
        assert names(resp) == [
            "content-length",
            "x-envoy-upstream-service-time",
            "x-flags",
            "x-envoy-attempt-count",
            "date",
            "server",
        ]
        assert resp.header("x-envoy-attempt-count") == "3"
        assert flags(resp) == {"URX"}
        assert [r.header("x-envoy-attempt-count") for r in upstream.requests] == ["1", "2", "3"]
        s = stats_of(proxy, "cluster.backend.")
        assert s["upstream_rq_retry"] == 2
        assert s["upstream_rq_retry_backoff_exponential"] == 2
        assert s["upstream_rq_retry_limit_exceeded"] == 1
        assert s["upstream_rq_retry_success"] == 0
        assert s["retry.upstream_rq_503"] == 2
        assert s["retry.upstream_rq_5xx"] == 2
        assert s["retry.upstream_rq_completed"] == 2
        assert s["upstream_rq_503"] == 1  # only the final response is charged
        assert s["upstream_rq_total"] == 3
        assert s["circuit_breakers.default.rq_retry_open"] == 0


async def test_retry_success_after_503() -> None:
    async with ScriptedUpstream([503, 200]) as up:
        cfg = config(
            [route("/", "backend", retry_policy={"retry_on": "5xx"})],
            [cluster("backend", up.port)],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            resp = await request(proxy.port(), "/x")
            assert resp.status == 200
            assert flags(resp) == {"-"}
            assert len(up.requests) == 2
            s = stats_of(proxy, "cluster.backend.")
            assert s["upstream_rq_retry"] == 1
            assert s["upstream_rq_retry_success"] == 1
            assert s["upstream_rq_200"] == 1
            assert s["retry.upstream_rq_503"] == 1
            # The retried 503 had no body: its connection was kept and reused.
            assert s["upstream_cx_total"] == 1


@pytest.mark.parametrize(
    ("retry_on", "extra", "status", "attempts"),
    [
        ("gateway-error", {}, 502, 2),
        ("gateway-error", {}, 500, 1),
        ("retriable-4xx", {}, 409, 2),
        ("retriable-4xx", {}, 404, 1),
        ("retriable-status-codes", {"retriable_status_codes": [418]}, 418, 2),
        ("retriable-status-codes", {"retriable_status_codes": [418]}, 503, 1),
        ("5xx", {}, 429, 1),
        ("connect-failure", {}, 503, 1),
        ("reset", {}, 503, 1),
    ],
)
async def test_retry_on_status(
    upstream: HttpUpstream, retry_on: str, extra: dict[str, Any], status: int, attempts: int
) -> None:
    cfg = config(
        [
            route(
                "/r/",
                "backend",
                prefix_rewrite="/status/",
                retry_policy={"retry_on": retry_on, **extra},
            )
        ],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), f"/r/{status}")
        assert resp.status == status
        assert upstream.request_count == attempts


async def test_retriable_headers(upstream: HttpUpstream) -> None:
    policy = {
        "retry_on": "retriable-headers",
        "retriable_headers": [{"name": "x-upstream-retry", "string_match": {"exact": "yes"}}],
    }
    cfg = config(
        [route("/h", "backend", prefix_rewrite="/headers", retry_policy=policy)],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/h?x-upstream-retry=yes")
        assert resp.status == 200 and upstream.request_count == 2
        upstream.reset_counters()
        resp = await request(proxy.port(), "/h?x-upstream-retry=no")
        assert resp.status == 200 and upstream.request_count == 1


async def test_retriable_request_headers_gate_retries(upstream: HttpUpstream) -> None:
    policy = {
        "retry_on": "5xx",
        "retriable_request_headers": [{"name": "x-retry-me"}],
    }
    cfg = config(
        [route("/r/", "backend", prefix_rewrite="/status/", retry_policy=policy)],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        await request(proxy.port(), "/r/503")
        assert upstream.request_count == 1
        upstream.reset_counters()
        await request(proxy.port(), "/r/503", headers=[("x-retry-me", "1")])
        assert upstream.request_count == 2


# --- retry on resets and connect failures ---------------------------------------------------
async def test_connect_failure_retries_then_latest_reason() -> None:
    dead = free_port()
    cfg = config(
        [route("/", "dead", retry_policy={"retry_on": "connect-failure", "num_retries": 2})],
        [cluster("dead", dead)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/x")
        assert resp.status == 503
        assert resp.body == (
            b"upstream connect error or disconnect/reset before headers. "
            b"retried and the latest reset reason: remote connection failure"
        )
        assert names(resp) == ["x-flags", "content-length", "content-type", "date", "server"]
        assert flags(resp) == {"UF", "URX"}
        s = stats_of(proxy, "cluster.dead.")
        assert s["upstream_cx_connect_fail"] == 3
        assert s["upstream_rq_pending_failure_eject"] == 3
        assert s["upstream_rq_retry"] == 2
        assert s["upstream_rq_total"] == 0  # never attached to a connection
        assert s["upstream_rq_503"] == 1
        assert s["upstream_cx_destroy_remote"] == 3


async def test_no_retry_policy_reason_text() -> None:
    cfg = config([route("/", "dead")], [cluster("dead", free_port())])
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/x")
        assert resp.body == (
            b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
        )
        assert flags(resp) == {"UF"}


@pytest.mark.parametrize("path", ["/reset", "/close"])
async def test_reset_retried(upstream: HttpUpstream, path: str) -> None:
    cfg = config(
        [route("/", "backend", retry_policy={"retry_on": "reset", "num_retries": 2})],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), path)
        assert resp.status == 503
        assert resp.body.endswith(b"retried and the latest reset reason: connection termination")
        assert flags(resp) == {"UC", "URX"}
        assert upstream.request_count == 3


async def test_previous_hosts_predicate_avoids_dead_host(upstream: HttpUpstream) -> None:
    policy = {
        "retry_on": "connect-failure",
        "num_retries": 1,
        "retry_host_predicate": [PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": 40,
    }
    cfg = config(
        [route("/", "mixed", retry_policy=policy)],
        [cluster("mixed", free_port(), upstream.port, lb_policy="RANDOM")],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        statuses = [(await request(proxy.port(), "/echo")).status for _ in range(20)]
        assert statuses == [200] * 20
        assert stats_of(proxy, "cluster.mixed.")["upstream_cx_connect_fail"] >= 1


async def test_previous_hosts_predicate_moves_along_the_hash_ring(upstream: HttpUpstream) -> None:
    # With a hashing balancer every re-selection has the same hash: Envoy passes the
    # re-selection number to the ring (next entries) / maglev table (mutated hash), so a
    # request whose key lands on a dead host is retried on another one.
    policy = {
        "retry_on": "connect-failure",
        "num_retries": 1,
        "retry_host_predicate": [PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": 40,
    }
    hash_policy = [{"header": {"header_name": "x-key"}}]
    for lb in ("RING_HASH", "MAGLEV"):
        cfg = config(
            [route("/", "hashed", retry_policy=policy, hash_policy=hash_policy)],
            [cluster("hashed", free_port(), upstream.port, lb_policy=lb)],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            statuses = [
                (await request(proxy.port(), "/echo", headers=[("x-key", f"k{i}")])).status
                for i in range(24)
            ]
            assert statuses == [200] * 24, lb
            # some keys did land on the dead host first
            assert stats_of(proxy, "cluster.hashed.")["upstream_cx_connect_fail"] >= 1, lb


# --- back-off ------------------------------------------------------------------------------
async def test_backoff_is_jittered_exponential(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_backoff(monkeypatch, MAX_RANDOM)  # random % interval -> interval - 1
    async with ScriptedUpstream([503]) as up:
        policy = {
            "retry_on": "5xx",
            "num_retries": 3,
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.12s"},
        }
        cfg = config([route("/", "backend", retry_policy=policy)], [cluster("backend", up.port)])
        async with pyenvoy.Proxy(cfg) as proxy:
            t0 = time.monotonic()
            resp = await request(proxy.port(), "/x")
            total = time.monotonic() - t0
            assert resp.status == 503 and len(up.requests) == 4
            # Back-offs: 49 ms, 99 ms (2x base), then capped at max_interval: 119 ms.
            assert 0.26 < total < 0.6, total


def test_backoff_sequence_bounds() -> None:
    import types

    stats = types.SimpleNamespace()
    rm = types.SimpleNamespace(retries=None)
    policy = retry_state.RetryPolicy()
    policy.base_interval = 0.025
    state = retry_state.RetryState(policy, rm, stats)  # type: ignore[arg-type]
    intervals = []
    for _ in range(6):
        intervals.append(state.next_interval)
        state.next_backoff_ms()
    assert intervals == [25, 50, 100, 200, 250, 250]  # default max: 10x base


async def test_global_timeout_during_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_backoff(monkeypatch, MAX_RANDOM)
    async with ScriptedUpstream([503]) as up:
        policy = {"retry_on": "5xx", "retry_back_off": {"base_interval": "2s"}}
        cfg = config(
            [route("/", "backend", timeout="0.3s", retry_policy=policy)],
            [cluster("backend", up.port)],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            t0 = time.monotonic()
            resp = await request(proxy.port(), "/x")
            assert 0.25 < time.monotonic() - t0 < 1.5
            assert resp.status == 504 and resp.body == b"upstream request timeout"
            assert flags(resp) == {"UT"}
            s = stats_of(proxy, "cluster.backend.")
            # Nothing was in flight: no upstream_rq_timeout, no 504 charged to the cluster.
            assert s["upstream_rq_timeout"] == 0
            assert s.get("upstream_rq_504", 0) == 0
            assert s["circuit_breakers.default.rq_retry_open"] == 0
            assert len(up.requests) == 1


# --- per-try timeouts ----------------------------------------------------------------------------
async def test_per_try_timeout_retries_then_504(upstream: HttpUpstream) -> None:
    policy = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}
    cfg = config(
        [route("/p/", "backend", prefix_rewrite="/delay/", retry_policy=policy, timeout="3s")],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        t0 = time.monotonic()
        resp = await request(proxy.port(), "/p/1000")
        elapsed = time.monotonic() - t0
        assert resp.status == 504 and resp.body == b"upstream request timeout"
        assert 0.39 < elapsed < 1.0
        assert flags(resp) == {"UT", "URX"}
        assert [r.header("x-envoy-expected-rq-timeout-ms") for r in upstream.requests] == [
            "200",
            "200",
        ]
        s = stats_of(proxy, "cluster.backend.")
        assert s["upstream_rq_per_try_timeout"] == 2
        assert s["upstream_rq_504"] == 1
        assert s["upstream_cx_destroy_local_with_active_rq"] == 2
        # A fast answer is not affected.
        resp = await request(proxy.port(), "/p/50")
        assert resp.status == 200


async def test_per_try_timeout_not_retried_on_connect_failure_only(upstream: HttpUpstream) -> None:
    policy = {"retry_on": "connect-failure", "per_try_timeout": "0.2s"}
    cfg = config(
        [route("/p/", "backend", prefix_rewrite="/delay/", retry_policy=policy)],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/p/1000")
        assert resp.status == 504 and upstream.request_count == 1
        assert flags(resp) == {"UT"}


async def test_per_try_idle_timeout(upstream: HttpUpstream) -> None:
    policy = {"retry_on": "reset", "num_retries": 1, "per_try_idle_timeout": "0.2s"}
    cfg = config(
        [route("/p/", "backend", prefix_rewrite="/delay/", retry_policy=policy)],
        [cluster("backend", upstream.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/p/1000")
        assert resp.status == 504
        assert upstream.request_count == 2
        assert stats_of(proxy, "cluster.backend.")["upstream_rq_per_try_idle_timeout"] == 2
        # The second attempt's expected timeout is the global one minus the time spent.
        second = int(upstream.requests[1].header("x-envoy-expected-rq-timeout-ms") or 0)
        assert 14600 < second < 14900


# --- request bodies ------------------------------------------------------------------------------
async def test_body_is_replayed_on_retry() -> None:
    async with ScriptedUpstream(["reset", 200]) as up:
        cfg = config(
            [route("/", "backend", retry_policy={"retry_on": "reset"})],
            [cluster("backend", up.port)],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            resp = await request(proxy.port(), "/x", "POST", body=[b"hello ", b"world"], gap=0.02)
            assert resp.status == 200
            assert [r["body"] for r in up.requests] == [b"hello world", b"hello world"]


async def test_chunked_body_is_replayed_on_retry() -> None:
    async with ScriptedUpstream([503, 200]) as up:
        cfg = config(
            [route("/", "backend", retry_policy={"retry_on": "5xx"})], [cluster("backend", up.port)]
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            chunks = [b"5\r\nhello\r\n", b"0\r\n\r\n"]
            resp = await request(
                proxy.port(),
                "/x",
                "POST",
                headers=[("transfer-encoding", "chunked")],
                body=chunks,
                gap=0.02,
            )
            assert resp.status == 200
            assert [r["body"] for r in up.requests] == [b"hello", b"hello"]


async def test_retry_while_body_still_streaming() -> None:
    async with ScriptedUpstream(["early503", 200]) as up:
        cfg = config(
            [route("/", "backend", retry_policy={"retry_on": "5xx"})], [cluster("backend", up.port)]
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            resp = await request(proxy.port(), "/x", "POST", body=[b"part1-", b"part2"], gap=0.2)
            assert resp.status == 200
            assert [r["body"] for r in up.requests] == [None, b"part1-part2"]
            s = stats_of(proxy, "cluster.backend.")
            assert s["upstream_rq_retry"] == 1 and s["upstream_rq_retry_success"] == 1


async def test_body_beyond_buffer_limit_is_not_retried(upstream: HttpUpstream) -> None:
    r = route(
        "/b/",
        "backend",
        prefix_rewrite="/status/",
        retry_policy={"retry_on": "5xx"},
        route_extra={"request_body_buffer_limit": 10},
    )
    cfg = config([r], [cluster("backend", upstream.port)])
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/b/503", "POST", body=b"12345")
        assert resp.status == 503 and upstream.request_count == 2
        upstream.reset_counters()
        resp = await request(proxy.port(), "/b/503", "POST", body=b"x" * 20)
        assert resp.status == 503 and upstream.request_count == 1
        assert upstream.requests[0].body_sha256 == hashlib.sha256(b"x" * 20).hexdigest()
        assert stats_of(proxy, "cluster.backend.")["retry_or_shadow_abandoned"] == 1


async def test_buffer_limit_exceeded_during_backoff_is_507(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_backoff(monkeypatch, MAX_RANDOM)
    dead = free_port()
    policy = {"retry_on": "connect-failure", "retry_back_off": {"base_interval": "1s"}}
    r = route("/", "dead", retry_policy=policy, route_extra={"request_body_buffer_limit": 10})
    cfg = config([r], [cluster("dead", dead)])
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/x", "POST", body=[b"12345", b"x" * 20], gap=0.2)
        assert resp.status == 507
        assert resp.body == b"exceeded request buffer limit while retrying upstream"
        assert stats_of(proxy, "cluster.dead.")["retry_or_shadow_abandoned"] == 1


# --- request headers Envoy honours ---------------------------------------------------------------
def _internal(cidr: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "use_remote_address": True,
        "internal_address_config": {"cidr_ranges": [{"address_prefix": cidr, "prefix_len": 32}]},
    }


async def test_retry_headers_on_internal_requests(upstream: HttpUpstream) -> None:
    cfg = config([route("/", "backend")], [cluster("backend", upstream.port)], hcm=_internal())
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        hdrs = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")]
        resp = await request(proxy.port(), "/status/503", headers=hdrs)
        assert resp.status == 503 and upstream.request_count == 3
        for r in upstream.requests:
            assert r.header("x-envoy-retry-on") is None and r.header("x-envoy-max-retries") is None
            assert r.header("x-envoy-internal") == "true"
        s = stats_of(proxy, "cluster.backend.")
        assert s["internal.upstream_rq_503"] == 1  # internal requests use internal. stats
        upstream.reset_counters()
        hdrs = [
            ("x-envoy-retry-on", "retriable-status-codes"),
            ("x-envoy-retriable-status-codes", "418"),
        ]
        await request(proxy.port(), "/status/418", headers=hdrs)
        assert upstream.request_count == 2
        upstream.reset_counters()
        t0 = time.monotonic()
        resp = await request(
            proxy.port(), "/delay/2000", headers=[("x-envoy-upstream-rq-timeout-ms", "200")]
        )
        assert resp.status == 504 and time.monotonic() - t0 < 1.5
        assert upstream.requests[0].header("x-envoy-expected-rq-timeout-ms") == "200"
        assert upstream.requests[0].header("x-envoy-upstream-rq-timeout-ms") is None
        upstream.reset_counters()
        hdrs = [("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-per-try-timeout-ms", "150")]
        resp = await request(proxy.port(), "/delay/2000", headers=hdrs)
        assert resp.status == 504 and upstream.request_count == 2


async def test_retry_headers_ignored_on_external_requests(upstream: HttpUpstream) -> None:
    cfg = config([route("/", "backend")], [cluster("backend", upstream.port)])
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        hdrs = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")]
        resp = await request(proxy.port(), "/status/503", headers=hdrs)
        assert resp.status == 503 and upstream.request_count == 1
        assert upstream.requests[0].header("x-envoy-retry-on") is None


async def test_timeout_retry_header(upstream: HttpUpstream) -> None:
    policy = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.15s"}
    cfg = config(
        [route("/p/", "backend", prefix_rewrite="/delay/", retry_policy=policy)],
        [cluster("backend", upstream.port)],
        vhost={"include_is_timeout_retry_header": True},
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        await request(proxy.port(), "/p/1000")
        assert [r.header("x-envoy-is-timeout-retry") for r in upstream.requests] == [None, "true"]


# --- config ------------------------------------------------------------------------------------
def test_retry_policy_config_errors() -> None:
    bad = {"retry_on": "5xx", "retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}}
    cfg = config([route("/", "c", retry_policy=bad)], [cluster("c", 1)])
    with pytest.raises(
        ConfigError, match="max_interval must greater than or equal to the base_interval"
    ):
        Server(pyenvoy.Proxy(cfg).bootstrap)
    pred = {
        "retry_on": "5xx",
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.omit_canary_hosts"}],
    }
    cfg = config([route("/", "c", retry_policy=pred)], [cluster("c", 1)])
    with pytest.raises(ConfigError) as e:
        Server(pyenvoy.Proxy(cfg).bootstrap)
    assert "retry_host_predicate[0]" in str(e.value)
    # Envoy finds the predicate by its type URL: a bare name is an error there too.
    bare = {
        "retry_on": "5xx",
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
    }
    cfg = config([route("/", "c", retry_policy=bare)], [cluster("c", 1)])
    with pytest.raises(ConfigError, match="Didn't find a registered implementation"):
        Server(pyenvoy.Proxy(cfg).bootstrap)


def test_parse_retry_on() -> None:
    bits, ok = retry_state.parse_retry_on("5xx, connect-failure,bogus")
    assert not ok
    assert bits == retry_state.RETRY_ON_5XX | retry_state.RETRY_ON_CONNECT_FAILURE
    assert retry_state.parse_retry_grpc_on("cancelled,unavailable") == (
        retry_state.RETRY_ON_GRPC_CANCELLED | retry_state.RETRY_ON_GRPC_UNAVAILABLE,
        True,
    )


async def test_vhost_retry_policy_applies(upstream: HttpUpstream) -> None:
    cfg = config(
        [route("/r/", "backend", prefix_rewrite="/status/")],
        [cluster("backend", upstream.port)],
        vhost={"retry_policy": {"retry_on": "5xx", "num_retries": 1}},
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        await request(proxy.port(), "/r/503")
        assert upstream.request_count == 2


async def test_plain_route_attempt_count_in_stream_info(upstream: HttpUpstream) -> None:
    cfg = config(
        [route("/", "backend")],
        [cluster("backend", upstream.port)],
        vhost={
            "response_headers_to_add": [
                {"header": {"key": "x-attempts", "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"}}
            ]
        },
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/echo")
        assert resp.header("x-attempts") == "1"
