"""Differential tests: circuit breakers (configs/cb_basic.yaml). Every expectation is what
real Envoy 1.40 answers with the same config: the overflow local reply (503,
``x-envoy-overloaded: true``, flag UO), the overflow counters and the
``circuit_breakers.<priority>.*`` gauges (``remaining_*`` only with ``track_remaining``,
starting at the configured limits), and limits overridden by the runtime."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.support.procs import Exchange, ProxyProcess, RawResponse, exchange

CONFIG = "cb_basic.yaml"

OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


def get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n\r\n"


def in_background(port: int, path: str) -> tuple[threading.Thread, list[Exchange]]:
    out: list[Exchange] = []
    t = threading.Thread(
        target=lambda: out.append(exchange(port, get(path), timeout=5)), daemon=True
    )
    t.start()
    return t, out


def wait_stats(proxy: ProxyProcess, want: dict[str, int], timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = proxy.stats()
        if all(stats.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def assert_overflow_reply(resp: RawResponse) -> None:
    assert (resp.status, resp.reason) == (503, "Service Unavailable")
    assert resp.body == OVERFLOW
    assert [(k, "*" if k == "date" else v) for k, v in resp.headers] == [
        ("x-flags", "UO"),
        ("x-envoy-overloaded", "true"),
        ("x-envoy-attempt-count", "1"),
        ("content-length", str(len(OVERFLOW))),
        ("content-type", "text/plain"),
        ("date", "*"),
        ("server", "envoy"),
    ]


UNLIMITED = 2**64 - 1  # max_connection_pools' default, shown as remaining_cx_pools


def circuit_breaker_gauges(stats: dict[str, Any], cluster: str) -> dict[str, Any]:
    pre = f"cluster.{cluster}.circuit_breakers."
    return {k[len(pre) :]: v for k, v in stats.items() if k.startswith(pre)}


OPEN_GAUGES = {
    f"{prio}.{g}": 0
    for prio in ("default", "high")
    for g in ("cx_open", "cx_pool_open", "rq_open", "rq_pending_open", "rq_retry_open")
}


def test_remaining_gauges_at_startup(proxy: ProxyProcess) -> None:
    stats = proxy.stats()
    # The first threshold of a priority wins (max_connections 3, tracked); remaining_* start
    # at the configured limits even where the runtime overrides one (max_connections: 1).
    assert circuit_breaker_gauges(stats, "cb_tracked") == {
        **OPEN_GAUGES,
        "default.remaining_cx": 3,
        "default.remaining_pending": 2,
        "default.remaining_rq": 1024,
        "default.remaining_retries": 3,
        "default.remaining_cx_pools": UNLIMITED,
        "high.remaining_cx": 1024,
        "high.remaining_pending": 1024,
        "high.remaining_rq": 7,
        "high.remaining_retries": 3,
        "high.remaining_cx_pools": 5,
    }
    # With a retry budget remaining_retries starts at max_retries (Envoy's nested resource).
    assert circuit_breaker_gauges(stats, "cb_budget") == {
        **OPEN_GAUGES,
        "default.remaining_cx": 1024,
        "default.remaining_pending": 1024,
        "default.remaining_rq": 1024,
        "default.remaining_retries": 3,
        "default.remaining_cx_pools": UNLIMITED,
    }
    # Untracked clusters have the *_open gauges only.
    assert circuit_breaker_gauges(stats, "cb_runtime") == OPEN_GAUGES
    prom = proxy.prometheus()
    key = (
        'envoy_cluster_circuit_breakers_default_remaining_cx_pools{envoy_cluster_name="cb_tracked"}'
    )
    assert prom[key] == float(UNLIMITED)
    assert not [k for k in prom if "remaining" in k and "cb_runtime" in k]


def test_pending_overflow(proxy: ProxyProcess) -> None:
    pre = "cluster.cb_pending."
    gauges = pre + "circuit_breakers.default."
    stats = proxy.stats()
    assert stats[gauges + "remaining_pending"] == 1
    assert stats[gauges + "remaining_cx"] == 1
    assert stats[gauges + "remaining_rq"] == 1024
    assert stats[gauges + "remaining_cx_pools"] == UNLIMITED
    assert stats[gauges + "rq_pending_open"] == 0
    t1, r1 = in_background(proxy.listener_port, "/pending")
    # (Envoy's gauges follow the counters a moment later: wait for both.)
    stats = wait_stats(proxy, {pre + "upstream_rq_active": 1, gauges + "remaining_rq": 1023})
    assert stats[gauges + "remaining_rq"] == 1023
    assert stats[gauges + "remaining_cx_pools"] == UNLIMITED - 1
    t2, r2 = in_background(proxy.listener_port, "/pending")
    stats = wait_stats(proxy, {pre + "upstream_rq_pending_active": 1})
    assert stats[gauges + "cx_open"] == 1
    assert stats[gauges + "rq_pending_open"] == 1
    assert stats[gauges + "remaining_pending"] == 0
    assert stats[gauges + "remaining_cx"] == 0
    assert stats[gauges + "remaining_retries"] == 3
    assert stats[pre + "upstream_cx_overflow"] == 1
    third = exchange(proxy.listener_port, get("/pending")).response
    assert_overflow_reply(third)
    t1.join(5)
    t2.join(5)
    assert r1[0].response.status == 200 and r2[0].response.status == 200
    stats = wait_stats(proxy, {gauges + "rq_pending_open": 0, gauges + "remaining_rq": 1024})
    assert stats[gauges + "rq_pending_open"] == 0
    assert stats[gauges + "remaining_pending"] == 1
    assert stats[gauges + "remaining_rq"] == 1024
    assert stats[pre + "upstream_rq_pending_overflow"] == 1
    assert stats[pre + "upstream_rq_503"] == 1
    assert stats[pre + "upstream_rq_total"] == 2
    assert stats[pre + "upstream_cx_total"] == 1


def test_requests_overflow(proxy: ProxyProcess) -> None:
    pre = "cluster.cb_requests."
    t1, r1 = in_background(proxy.listener_port, "/requests")
    stats = wait_stats(proxy, {pre + "upstream_rq_active": 1})
    assert stats[pre + "circuit_breakers.default.rq_open"] == 1
    second = exchange(proxy.listener_port, get("/requests")).response
    assert_overflow_reply(second)
    t1.join(5)
    assert r1[0].response.status == 200
    stats = wait_stats(proxy, {pre + "circuit_breakers.default.rq_open": 0})
    assert stats[pre + "upstream_rq_active_overflow"] == 1
    assert stats[pre + "upstream_rq_pending_overflow"] == 0
    # Envoy has no remaining_* gauges without track_remaining.
    assert not [k for k in stats if k.startswith(pre + "circuit_breakers.") and "remaining" in k]


def test_runtime_overrides_limit(proxy: ProxyProcess) -> None:
    resp = exchange(proxy.listener_port, get("/runtime")).response
    assert_overflow_reply(resp)
    stats = proxy.stats()
    assert stats["cluster.cb_runtime.upstream_rq_pending_overflow"] == 1


def test_retry_overflow(proxy: ProxyProcess) -> None:
    resp = exchange(proxy.listener_port, get("/retries/503")).response
    # The upstream's 503 is passed on; no retry could be made (max_retries 0).
    assert resp.status == 503 and resp.body == b""
    assert resp.header("x-flags") == "UO"
    assert resp.header("x-envoy-overloaded") is None
    assert resp.header("x-envoy-attempt-count") == "1"
    stats = proxy.stats()
    assert stats["cluster.cb_retries.upstream_rq_retry_overflow"] == 1
    assert stats.get("cluster.cb_retries.upstream_rq_retry", 0) == 0
    # The open gauge only moves on inc/dec: a limit of 0 never shows it open.
    assert stats["cluster.cb_retries.circuit_breakers.default.rq_retry_open"] == 0
