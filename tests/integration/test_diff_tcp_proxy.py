"""Differential tests: the envoy.filters.network.tcp_proxy network filter.

An echo upstream checks bytes both ways, half-close (client FIN -> upstream EOF, then the
upstream still sends data and its own FIN), and an upstream connect failure (the downstream
connection is closed with no data). Expected values are what real Envoy 1.40 does (see
/work/notes/envoy_facts.md section 23).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import load_config
from tests.support.procs import ProxyProcess, start_proxy
from tests.support.upstream import TcpEchoUpstream

EOF_REPLY = b"BYE-AFTER-EOF\n"


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[TcpEchoUpstream]:
    up = TcpEchoUpstream(eof_reply=EOF_REPLY)
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def proxy(proxy_kind: str, echo_upstream: TcpEchoUpstream) -> Iterator[ProxyProcess]:
    p = start_proxy(proxy_kind, load_config("tcp_proxy.yaml"), upstream_port=echo_upstream.port)
    try:
        yield p
    finally:
        p.stop()


def transfer(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``data`` concurrently with reading, then SHUT_WR; read until EOF."""
    got = bytearray()
    eof = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def reader() -> None:
            try:
                while True:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        eof.set()
                        return
                    got.extend(chunk)
            except OSError:
                return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(timeout)
    return bytes(got), eof.is_set()


def test_bytes_intact_both_ways_and_half_close(
    proxy: ProxyProcess, echo_upstream: TcpEchoUpstream
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    before = echo_upstream.connections
    got, eof = transfer(proxy.listener_port, data)
    assert eof, "downstream never saw the upstream's FIN"
    assert len(got) == len(data) + len(EOF_REPLY)
    assert got[: len(data)] == data
    assert got[len(data) :] == EOF_REPLY  # sent by the upstream AFTER it saw our FIN
    assert echo_upstream.connections == before + 1
    conn = echo_upstream.connections
    assert echo_upstream.half_closed[conn] is True
    assert echo_upstream.received[conn] == len(data)


def test_small_exchanges_keep_order(proxy: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxy.listener_port), timeout=5) as s:
        for i in range(20):
            msg = f"line {i}\n".encode()
            s.sendall(msg)
            buf = b""
            while len(buf) < len(msg):
                chunk = s.recv(100)
                assert chunk
                buf += chunk
            assert buf == msg
        # Finish cleanly (the upstream answers our FIN with EOF_REPLY and its own FIN), so no
        # bytes of this connection are still in flight when the next test reads the stats.
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            rest += chunk
        assert rest == EOF_REPLY


def test_tcp_stats(proxy: ProxyProcess) -> None:
    before = proxy.stats()
    data = b"x" * 1000
    got, eof = transfer(proxy.listener_port, data)
    assert eof and got == data + EOF_REPLY
    total = before["tcp.tcp_echo.downstream_cx_total"] + 1
    stats = proxy.wait_stat("tcp.tcp_echo.downstream_cx_total", total)
    deadline = time.monotonic() + 5
    want_tx = before["tcp.tcp_echo.downstream_cx_tx_bytes_total"] + len(data) + len(EOF_REPLY)
    while (
        stats["tcp.tcp_echo.downstream_cx_tx_bytes_total"] != want_tx
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
        stats = proxy.stats()
    assert stats["tcp.tcp_echo.downstream_cx_total"] == total
    assert stats["tcp.tcp_echo.downstream_cx_rx_bytes_total"] == (
        before["tcp.tcp_echo.downstream_cx_rx_bytes_total"] + len(data)
    )
    assert stats["tcp.tcp_echo.downstream_cx_tx_bytes_total"] == want_tx
    assert stats["cluster.echo.upstream_cx_total"] == before["cluster.echo.upstream_cx_total"] + 1
    for name in (
        "tcp.tcp_echo.downstream_cx_no_route",
        "tcp.tcp_echo.downstream_cx_rx_bytes_buffered",
        "tcp.tcp_echo.downstream_cx_tx_bytes_buffered",
        "tcp.tcp_echo.idle_timeout",
        "tcp.tcp_echo.upstream_flush_total",
    ):
        assert name in stats, name
    samples = proxy.prometheus()
    assert samples['envoy_tcp_downstream_cx_total{envoy_tcp_prefix="tcp_echo"}'] == total


def test_upstream_connect_failure_closes_downstream(proxy: ProxyProcess) -> None:
    before = proxy.stats()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.dead_listener_port), timeout=5) as s:
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
    assert data == b""
    assert time.monotonic() - start < 2.0  # connect_timeout is 1s; refusal is immediate
    stats = proxy.wait_stat(
        "cluster.dead.upstream_cx_connect_fail", before["cluster.dead.upstream_cx_connect_fail"] + 1
    )
    assert stats["cluster.dead.upstream_cx_connect_fail"] == (
        before["cluster.dead.upstream_cx_connect_fail"] + 1
    )
    assert (
        stats["tcp.tcp_dead.downstream_cx_total"] == before["tcp.tcp_dead.downstream_cx_total"] + 1
    )
    assert stats["tcp.tcp_dead.downstream_cx_rx_bytes_total"] == 0


# --- circuit breakers (configs/tcp_proxy_cb.yaml) -------------------------------------------
@pytest.fixture(scope="module")
def cb_proxy(proxy_kind: str, echo_upstream: TcpEchoUpstream) -> Iterator[ProxyProcess]:
    p = start_proxy(proxy_kind, load_config("tcp_proxy_cb.yaml"), upstream_port=echo_upstream.port)
    try:
        yield p
    finally:
        p.stop()


def _recv_or_reset(s: socket.socket) -> bytes:
    try:
        return s.recv(100)
    except ConnectionResetError:
        return b""


def _gauges(stats: dict[str, Any], cluster: str) -> dict[str, Any]:
    pre = f"cluster.{cluster}.circuit_breakers.default."
    return {k[len(pre) :]: v for k, v in stats.items() if k.startswith(pre)}


def test_max_connections_closes_second_session_at_once(cb_proxy: ProxyProcess) -> None:
    """max_connections 1 and two long-lived clients: Envoy does not queue the second one; it
    closes it at once with no data (upstream_cx_overflow, UO), the first keeps working."""
    before = cb_proxy.stats()
    port = cb_proxy.listener_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as a:
        a.sendall(b"first")
        assert a.recv(100) == b"first"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as b:
            start = time.monotonic()
            assert _recv_or_reset(b) == b""
            assert time.monotonic() - start < 0.5
        stats = cb_proxy.wait_stat(
            "cluster.cb.upstream_cx_overflow", before["cluster.cb.upstream_cx_overflow"] + 1
        )
        g = _gauges(stats, "cb")
        assert (g["cx_open"], g["remaining_cx"], g["remaining_pending"]) == (1, 0, 1)
        assert (g["rq_open"], g["rq_pending_open"], g["remaining_rq"]) == (0, 0, 1023)
        for name, delta in (
            ("cluster.cb.upstream_cx_overflow", 1),
            ("cluster.cb.upstream_cx_total", 1),
            ("cluster.cb.upstream_rq_pending_total", 1),
            ("cluster.cb.upstream_rq_total", 1),
            ("cluster.cb.upstream_rq_pending_overflow", 0),
            ("tcp.tcp_cb.downstream_cx_total", 2),
            ("tcp.tcp_cb.upstream_flush_total", 0),
        ):
            assert stats[name] == before[name] + delta, name
        assert stats["cluster.cb.upstream_cx_active"] == 1
        a.sendall(b"again")
        assert a.recv(100) == b"again"
    stats = cb_proxy.wait_stat("cluster.cb.upstream_cx_active", 0)
    g = _gauges(stats, "cb")
    assert (g["cx_open"], g["remaining_cx"], g["remaining_rq"]) == (0, 1, 1024)


def test_pending_overflow_retries_then_closes(cb_proxy: ProxyProcess) -> None:
    """max_pending_requests 0: each attempt overflows in the pool without a connection;
    tcp_proxy tries max_connect_attempts times, then closes the downstream."""
    before = cb_proxy.stats()
    with socket.create_connection(("127.0.0.1", cb_proxy.pending_listener_port), timeout=5) as s:
        assert _recv_or_reset(s) == b""
    stats = cb_proxy.wait_stat(
        "cluster.cb_pending.upstream_cx_connect_attempts_exceeded",
        before["cluster.cb_pending.upstream_cx_connect_attempts_exceeded"] + 1,
    )
    for name, delta in (
        ("cluster.cb_pending.upstream_rq_pending_overflow", 2),
        ("cluster.cb_pending.upstream_cx_connect_attempts_exceeded", 1),
        ("cluster.cb_pending.upstream_cx_total", 0),
        ("cluster.cb_pending.upstream_cx_overflow", 0),
        ("tcp.tcp_pending.downstream_cx_total", 1),
    ):
        assert stats[name] == before[name] + delta, name
    assert _gauges(stats, "cb_pending")["rq_pending_open"] == 0


def test_clusters_prints_runtime_resolved_limits(cb_proxy: ProxyProcess) -> None:
    with urllib.request.urlopen(cb_proxy.admin_url + "/clusters", timeout=5) as r:
        lines = set(r.read().decode().splitlines())
    for line in (
        "cb_runtime::default_priority::max_connections::2",  # runtime over the static 5
        "cb_runtime::default_priority::max_pending_requests::1024",
        "cb_runtime::default_priority::max_retries::7",
        "cb_runtime::high_priority::max_connections::1024",
        "cb_runtime::high_priority::max_requests::9",
        "cb::default_priority::max_connections::1",
        "cb::default_priority::max_pending_requests::1",
    ):
        assert line in lines, line
    with urllib.request.urlopen(cb_proxy.admin_url + "/clusters?format=json", timeout=5) as r:
        doc = json.loads(r.read())
    (status,) = [c for c in doc["cluster_statuses"] if c["name"] == "cb_runtime"]
    assert status["circuit_breakers"]["thresholds"][0]["max_connections"] == 2
