"""Differential tests: stream idle timeouts (HCM and route level), route timeout, request
timeout. Expected values are what real Envoy 1.40 answers with the same config."""

from __future__ import annotations

import time

from tests.support.expect import assert_local_reply
from tests.support.procs import ProxyProcess, exchange

CONFIG = "timeouts.yaml"


def get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n\r\n"


def test_stream_idle_timeout_waiting_for_upstream(proxy: ProxyProcess) -> None:
    """No bytes for stream_idle_timeout (0.6 s) once the request is in: 504 stream timeout."""
    t0 = time.monotonic()
    ex = exchange(proxy.listener_port, get("/delay/1500"))
    elapsed = time.monotonic() - t0
    assert_local_reply(ex.response, 504, "Gateway Timeout", b"stream timeout")
    assert 0.5 < elapsed < 1.4
    assert not ex.closed
    proxy.wait_stat("http.to_http.downstream_rq_idle_timeout", 1)


def test_route_idle_timeout_overrides_hcm(proxy: ProxyProcess) -> None:
    t0 = time.monotonic()
    ex = exchange(proxy.listener_port, get("/route_idle"))
    elapsed = time.monotonic() - t0
    assert_local_reply(ex.response, 504, "Gateway Timeout", b"stream timeout")
    assert 0.2 < elapsed < 0.55


def test_route_timeout(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, get("/route_timeout"))
    assert_local_reply(ex.response, 504, "Gateway Timeout", b"upstream request timeout")


def test_request_body_never_finished_gets_408(proxy: ProxyProcess) -> None:
    """The request body stalls: the stream idle timer (0.6 s) fires before request_timeout
    (1 s) and the answer is 408 with the connection closed."""
    ex = exchange(
        proxy.listener_port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\ncontent-length: 10\r\n\r\nabc",
        wait_close=3,
    )
    assert_local_reply(ex.response, 408, "Request Timeout", b"stream timeout", close=True)
    assert ex.closed


def test_fast_requests_unaffected(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, get("/delay/100"))
    assert ex.response.status == 200


def test_route_max_stream_duration(proxy: ProxyProcess) -> None:
    """Route max_stream_duration replaces the route timeout: 504 downstream duration timeout."""
    t0 = time.monotonic()
    ex = exchange(proxy.listener_port, get("/msd"))
    assert_local_reply(ex.response, 504, "Gateway Timeout", b"downstream duration timeout")
    assert 0.2 < time.monotonic() - t0 < 0.9
    proxy.wait_stat("http.to_http.downstream_rq_max_duration_reached", 1)
