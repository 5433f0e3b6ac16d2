"""Draining: DrainSequence strategies, admin /drain_listeners, SIGTERM and /quitquitquit.

A drained HTTP/1.1 connection is never cut mid-exchange: its next response carries
``connection: close`` and it closes after it (Envoy's drain behaviour).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

from pyenvoy.drain import DrainSequence, drain_connection
from pyenvoy.http.conn_manager import ConnectionManager
from pyenvoy.server import Server
from tests.support.procs import free_port
from tests.support.upstream import HttpUpstream
from tests.test_reload import KeepAlive, Proc, http_get, static_config
from tests.test_xds_filesystem import (
    H1,
    get,
    hcm,
    listener,
    route_config,
    start_server,
    stat,
    static_cluster,
)

# ---- DrainSequence ------------------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.downstream_cx_drain_close = type("C", (), {"value": 0})()


class FakeCM:
    """The HTTP connection manager's drain state, driven by the real drain methods."""

    drain_close = ConnectionManager.drain_close
    apply_pending_drain = ConnectionManager.apply_pending_drain

    def __init__(self, conn: FakeConn) -> None:
        self.connection = conn
        self.closing = False
        self.drain_pending = False
        self.stream: Any = None
        self.stats = _Stats()
        self.drained_at: float | None = None


class FakeConn:
    def __init__(self) -> None:
        self.closed = False
        self.local_close = False
        self.read_filters = [FakeCM(self)]

    @property
    def cm(self) -> FakeCM:
        return self.read_filters[0]

    def close(self, flush: bool = False) -> None:
        self.closed = True


async def test_immediate_strategy_drains_everything_at_once() -> None:
    conns = [FakeConn() for _ in range(10)]
    done: list[bool] = []
    seq = DrainSequence(5.0, "immediate", close_at_end=True, on_done=lambda: done.append(True))
    for c in conns:
        seq.add(c)
    await asyncio.sleep(0.01)
    assert all(c.cm.closing for c in conns)
    assert all(c.cm.stats.downstream_cx_drain_close.value == 1 for c in conns)
    assert not any(c.closed for c in conns) and not done
    seq.finish()
    assert all(c.closed for c in conns) and done == [True]


async def test_gradual_strategy_spreads_over_the_drain_time() -> None:
    conns = [FakeConn() for _ in range(200)]
    seq = DrainSequence(0.4, "gradual", close_at_end=False)
    for c in conns:
        seq.add(c)
    await asyncio.sleep(0.2)
    half = sum(c.cm.closing for c in conns)
    assert 40 < half < 160, half  # about half of them by half time
    await asyncio.sleep(0.3)
    assert all(c.cm.closing for c in conns)
    assert not any(c.closed for c in conns)  # close_at_end=False leaves them open


async def test_busy_connections_drain_early_like_envoys_per_response_coin() -> None:
    conns = [FakeConn() for _ in range(50)]
    for c in conns:  # 100 requests a second so far
        c.cm.requests = 100
        c.cm.start = time.monotonic() - 1.0
    seq = DrainSequence(2.0, "gradual", close_at_end=False)
    for c in conns:
        seq.add(c)
    await asyncio.sleep(0.8)  # Envoy: P(no close by 0.8 s at 100 rps, T=2) = exp(-16)
    assert all(c.cm.closing for c in conns)
    seq.cancel()


async def test_late_connections_join_with_envoys_probability() -> None:
    seq = DrainSequence(0.5, "gradual", close_at_end=False)
    await asyncio.sleep(0.45)  # 90% into the drain: most new connections drain at once
    late = [FakeConn() for _ in range(100)]
    for c in late:
        seq.add(c)
    await asyncio.sleep(0.005)
    assert sum(c.cm.closing for c in late) > 70
    seq.cancel()


async def test_a_response_on_the_wire_is_not_cut() -> None:
    conn = FakeConn()
    stream = type("S", (), {"response_started": True, "response_complete": False})()
    conn.cm.stream = stream
    drain_connection(conn)
    await asyncio.sleep(0.005)
    assert not conn.cm.closing  # still writing the response: not yet
    assert conn.cm.drain_pending
    stream.response_complete = True
    conn.cm.stream = None
    conn.cm.apply_pending_drain()  # what the connection manager does when that response ends
    assert conn.cm.closing


# ---- /drain_listeners (in-process) ---------------------------------------------------------


@pytest.fixture
async def running() -> Any:
    servers: list[Server] = []
    yield servers
    for s in servers:
        await s.stop(0)


def two_listeners(p1: int, p2: int) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [
                listener(
                    "in", p1, hcm("in", routes=route_config("", "in")), traffic_direction="INBOUND"
                ),
                listener(
                    "out",
                    p2,
                    hcm("out", routes=route_config("", "out")),
                    traffic_direction="OUTBOUND",
                ),
            ]
        }
    }


async def test_drain_listeners_stops_at_once_and_drains_connections(running: list[Server]) -> None:
    p1, p2 = free_port(), free_port()
    server = await start_server(two_listeners(p1, p2), drain_time_s=1, drain_strategy="immediate")
    running.append(server)
    c = await H1.connect(p1)
    assert (await c.get("/dr"))[2] == b"in"
    server.drain_listeners()
    with pytest.raises(OSError):
        await get(p1, "/dr")
    with pytest.raises(OSError):
        await get(p2, "/dr")
    status, headers, body = await c.get("/dr")  # the open connection is told to close
    assert (status, body, headers.get("connection")) == (200, b"in", "close")
    assert await c.closed()
    c.close()
    assert stat(server, "listener_manager.listener_stopped") == 2
    assert stat(server, "http.in.downstream_cx_drain_close") == 1
    assert server.state == "LIVE"  # as Envoy: /ready stays LIVE


async def test_drain_listeners_graceful_inboundonly(running: list[Server]) -> None:
    p1, p2 = free_port(), free_port()
    server = await start_server(two_listeners(p1, p2), drain_time_s=1, drain_strategy="immediate")
    running.append(server)
    server.drain_listeners(graceful=True, inbound_only=True)
    # Graceful: still accepting during the drain time, each response says close.
    status, headers, body = await get(p1, "/dr")
    assert (status, body, headers.get("connection")) == (200, b"in", "close")
    assert (await get(p2, "/dr"))[1].get("connection") is None  # outbound: untouched
    await asyncio.sleep(1.2)
    with pytest.raises(OSError):
        await get(p1, "/dr")
    assert (await get(p2, "/dr"))[2] == b"out"
    assert stat(server, "listener_manager.listener_stopped") == 1


async def test_drain_listeners_skip_exit_never_stops(running: list[Server]) -> None:
    p1, p2 = free_port(), free_port()
    server = await start_server(two_listeners(p1, p2), drain_time_s=1, drain_strategy="immediate")
    running.append(server)
    server.drain_listeners(skip_exit=True)
    await asyncio.sleep(1.2)
    assert (await get(p1, "/dr"))[2] == b"in"
    assert stat(server, "listener_manager.listener_stopped") == 0


# ---- SIGTERM / quitquitquit (subprocess) ----------------------------------------------------


def _slow_request(port: int, out: list[Any]) -> None:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /delay/700 HTTP/1.1\r\nhost: t\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        out.append(data)
    except OSError as e:
        out.append(e)


@pytest.mark.parametrize("how", ["sigterm", "quitquitquit"])
def test_shutdown_lets_requests_finish_then_exits(how: str) -> None:
    up = HttpUpstream()
    up.start()
    try:
        admin, p1 = free_port(), free_port()
        text = static_config(
            admin,
            [listener("l1", p1, hcm("l1", routes=route_config("", "x", cluster="up")))],
            [static_cluster("up", [up.port])],
        )
        with Proc(text, "--drain-time-s", "5", admin_port=admin) as proc:
            idle = KeepAlive(p1)
            assert idle.get("/dr")[0] == 200
            out: list[Any] = []
            t = threading.Thread(target=_slow_request, args=(p1, out))
            t.start()
            assert up.wait_requests(1, timeout=3)  # the slow request reached the upstream
            t0 = time.monotonic()
            if how == "sigterm":
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGTERM)
            else:
                req = urllib.request.Request(proc.admin_url + "/quitquitquit", method="POST")
                with urllib.request.urlopen(req, timeout=3) as r:
                    assert r.status == 200
            assert idle.closed(timeout=2)  # an idle keep-alive connection is closed at once
            t.join(5)
            (data,) = out
            assert isinstance(data, bytes) and data.startswith(b"HTTP/1.1 200"), data
            assert b"connection: close" in data.lower()
            assert proc.proc is not None
            proc.proc.wait(5)
            elapsed = time.monotonic() - t0
            assert elapsed < 3.0, elapsed  # it did not wait for the whole drain time
            assert proc.proc.returncode == 0
            with pytest.raises(OSError):
                http_get(p1)
            idle.close()
    finally:
        up.stop()


def test_admin_drain_listeners_endpoint() -> None:
    admin, p1, p2 = free_port(), free_port(), free_port()
    text = static_config(
        admin,
        [
            listener(
                "in", p1, hcm("in", routes=route_config("", "in")), traffic_direction="INBOUND"
            ),
            listener("out", p2, hcm("out", routes=route_config("", "out"))),
        ],
    )
    with Proc(
        text, "--drain-time-s", "1", "--drain-strategy", "immediate", admin_port=admin
    ) as proc:
        ka = KeepAlive(p1)
        assert ka.get()[2] == b"in"
        status, _, body = proc.admin("/drain_listeners?inboundonly", method="POST")
        assert (status, body) == (200, b"OK\n")
        with pytest.raises(OSError):
            http_get(p1)
        assert http_get(p2) == (200, b"out")
        status, headers, body = ka.get()
        assert (status, body, headers.get("connection")) == (200, b"in", "close")
        assert ka.closed()
        ka.close()
        assert proc.admin("/drain_listeners")[0] == 405  # POST only, as Envoy
        stats = proc.stats()
        assert stats["listener_manager.listener_stopped"] == 1
        assert stats["http.in.downstream_cx_drain_close"] == 1
        assert proc.admin("/ready")[0] == 200
