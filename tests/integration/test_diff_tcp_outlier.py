"""Differential tests: tcp_proxy reports connect results to outlier detection
(configs/tcp_outlier.yaml).

Each cluster round-robins over a good echo host and a bad one. As in Envoy 1.40, a refused
connect is LocalOriginConnectFailed (a 503 for the detector: consecutive 5xx and gateway
failure; a local-origin failure with ``split_external_local_origin_errors``), a connect
timeout is LocalOriginTimeout (a 504) and a connect is LocalOriginConnectSuccessFinal (a
200). The bad host is ejected after the configured number of consecutive failures and gets
no more connections. Expected numbers are what real Envoy shows for exactly this traffic,
including the TCP pool's ``upstream_rq_*`` counters.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import load_config
from tests.support.procs import ProxyProcess, free_port, start_proxy
from tests.support.upstream import TcpEchoUpstream

CONNECTIONS = 10


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[TcpEchoUpstream]:
    up = TcpEchoUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, connects time out."""
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
    time.sleep(0.05)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        lsock.close()


@pytest.fixture(scope="module")
def proxy(
    proxy_kind: str, echo_upstream: TcpEchoUpstream, blackhole: int
) -> Iterator[ProxyProcess]:
    p = start_proxy(
        proxy_kind,
        load_config("tcp_outlier.yaml"),
        upstream_port=echo_upstream.port,
        dead_port=free_port(),
        bh_port=blackhole,
    )
    try:
        yield p
    finally:
        p.stop()


def one_session(port: int) -> bool:
    """Connect, send a byte, expect its echo: True if it went through."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"x")
            return s.recv(1) == b"x"
        except OSError:
            return False


def sessions(port: int, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        out.append(one_session(port))
        time.sleep(0.05)  # Envoy ejects on its main thread: let the worker see it
    return out


def host_flags(proxy: ProxyProcess, cluster: str) -> dict[int, str]:
    out = {}
    for line in proxy.admin("/clusters")[2].decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def nonzero(stats: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        k[len(prefix) :]: v
        for k, v in stats.items()
        if k.startswith(prefix) and isinstance(v, int) and v
    }


def wait_for(proxy: ProxyProcess, name: str, value: int) -> dict[str, Any]:
    return proxy.wait_stat(name, value)


def test_refused_host_is_ejected(proxy: ProxyProcess, echo_upstream: TcpEchoUpstream) -> None:
    results = sessions(proxy.listener_port, CONNECTIONS)
    assert results.count(False) == 3 and results[-4:] == [True] * 4
    stats = wait_for(proxy, "cluster.od.outlier_detection.ejections_active", 1)
    assert nonzero(stats, "cluster.od.outlier_detection.") == {
        "ejections_active": 1,
        "ejections_consecutive_5xx": 1,
        "ejections_detected_consecutive_5xx": 1,
        # 503 is a gateway failure too: detected, not enforced (enforcing default 0)
        "ejections_detected_consecutive_gateway_failure": 1,
        "ejections_enforced_consecutive_5xx": 1,
        "ejections_enforced_total": 1,
        "ejections_total": 1,
    }
    stats = wait_for(proxy, "cluster.od.upstream_rq_total", 7)
    cluster = nonzero(stats, "cluster.od.")
    for name, value in {
        "upstream_cx_connect_fail": 3,
        "upstream_cx_connect_attempts_exceeded": 3,
        "upstream_cx_total": 10,
        "upstream_rq_pending_total": 10,
        "upstream_rq_pending_failure_eject": 3,
        "upstream_rq_total": 7,
        "membership_healthy": 1,
    }.items():
        assert cluster.get(name) == value, name
    # The byte of a session whose connect failed was never read (reads wait for the connect).
    assert stats["tcp.od.downstream_cx_rx_bytes_total"] == 7
    flags = host_flags(proxy, "od")
    assert flags.pop(echo_upstream.port) == "healthy"
    assert list(flags.values()) == ["/failed_outlier_check"]


def test_split_local_origin_failures(proxy: ProxyProcess) -> None:
    results = sessions(proxy.split_listener_port, CONNECTIONS)
    assert results.count(False) == 2 and results[-6:] == [True] * 6
    stats = wait_for(proxy, "cluster.split.outlier_detection.ejections_active", 1)
    assert nonzero(stats, "cluster.split.outlier_detection.") == {
        "ejections_active": 1,
        "ejections_detected_consecutive_local_origin_failure": 1,
        "ejections_enforced_consecutive_local_origin_failure": 1,
        "ejections_enforced_total": 1,
    }
    assert stats["cluster.split.upstream_cx_connect_fail"] == 2


def test_connect_timeouts_are_gateway_failures(proxy: ProxyProcess) -> None:
    results = sessions(proxy.bh_listener_port, 6)
    assert results.count(False) == 2 and results[-2:] == [True] * 2
    stats = wait_for(proxy, "cluster.bh.outlier_detection.ejections_active", 1)
    assert nonzero(stats, "cluster.bh.outlier_detection.") == {
        "ejections_active": 1,
        "ejections_detected_consecutive_gateway_failure": 1,
        "ejections_enforced_consecutive_gateway_failure": 1,
        "ejections_enforced_total": 1,
    }
    assert stats["cluster.bh.upstream_cx_connect_timeout"] == 2
    assert stats["cluster.bh.upstream_rq_pending_failure_eject"] == 2
