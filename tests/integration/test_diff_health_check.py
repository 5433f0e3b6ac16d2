"""Differential tests: envoy.filters.http.health_check (pass_through_mode: false, /healthz).

Expected values are what real Envoy 1.40 does (see /work/notes/envoy_facts.md section 22).
"""

from __future__ import annotations

import json

from tests.support.expect import assert_date
from tests.support.procs import ProxyProcess, exchange
from tests.support.upstream import HttpUpstream

CONFIG = "health_check.yaml"

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"


def stat(proxy: ProxyProcess, name: str) -> int:
    return int(proxy.stats()[f"http.hc_http.{name}"])


def test_healthz_answered_locally(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    before = http_upstream.request_count
    ok_before = stat(proxy, "health_check.ok")
    ex = exchange(proxy.listener_port, HEALTHZ)
    resp = ex.response
    assert (resp.status, resp.reason, resp.body) == (200, "OK", b"")
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == [
        ("x-envoy-upstream-healthchecked-cluster", ""),
        ("date", "*"),
        ("server", "envoy"),
        ("content-length", "0"),
    ]
    assert_date(resp)
    assert not ex.closed
    assert http_upstream.request_count == before
    proxy.wait_stat("http.hc_http.health_check.ok", ok_before + 1)
    assert stat(proxy, "health_check.ok") == ok_before + 1


def test_healthz_head(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n", head=frozenset({0})
    )
    resp = ex.response
    assert resp.status == 200 and resp.body == b""
    assert [k for k, _ in resp.headers] == [
        "x-envoy-upstream-healthchecked-cluster",
        "date",
        "server",
        "transfer-encoding",
    ]


def test_other_paths_pass_through(proxy: ProxyProcess) -> None:
    for path in ("/echo", "/healthz?x=1", "/healthz/"):
        resp = exchange(
            proxy.listener_port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        ).response
        assert resp.status == 200
        assert json.loads(resp.body)["path"] == path
        assert resp.header("x-envoy-upstream-healthchecked-cluster") is None


def test_health_check_responses_not_counted_as_downstream_codes(proxy: ProxyProcess) -> None:
    rq_2xx = stat(proxy, "downstream_rq_2xx")
    total = stat(proxy, "downstream_rq_total")
    hc_total = stat(proxy, "health_check.request_total")
    exchange(proxy.listener_port, HEALTHZ + HEALTHZ, responses=2)
    proxy.wait_stat("http.hc_http.downstream_rq_total", total + 2)
    stats = proxy.stats()
    assert stats["http.hc_http.downstream_rq_total"] == total + 2
    assert stats["http.hc_http.health_check.request_total"] == hc_total + 2
    assert stats["http.hc_http.downstream_rq_2xx"] == rq_2xx


def test_fail_and_ok_via_admin(proxy: ProxyProcess) -> None:
    failed_before = stat(proxy, "health_check.failed")
    status, headers, body = proxy.admin("/healthcheck/fail", method="POST")
    try:
        assert (status, body) == (200, b"OK\n")
        assert headers["content-type"] == "text/plain; charset=UTF-8"
        # The server is draining now: Envoy adds connection: close but only closes after
        # drain_timeout (5 s) + delayed close (1 s), so the test does not wait for the close.
        ex = exchange(proxy.listener_port, HEALTHZ)
        resp = ex.response
        assert (resp.status, resp.reason, resp.body) == (503, "Service Unavailable", b"")
        got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
        assert got == [
            ("x-envoy-upstream-healthchecked-cluster", ""),
            ("x-envoy-immediate-health-check-fail", "true"),
            ("date", "*"),
            ("server", "envoy"),
            ("connection", "close"),
            ("content-length", "0"),
        ]
        # Ordinary requests are still proxied, but marked and closed (the server drains).
        ex = exchange(proxy.listener_port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = ex.response
        assert resp.status == 200
        assert [k for k, _ in resp.headers] == [
            "content-type",
            "content-length",
            "x-envoy-upstream-service-time",
            "x-envoy-immediate-health-check-fail",
            "date",
            "server",
            "connection",
        ]
        assert resp.header("x-envoy-immediate-health-check-fail") == "true"
        assert resp.header("connection") == "close"
        assert stat(proxy, "health_check.failed") == failed_before + 1
    finally:
        status, _, body = proxy.admin("/healthcheck/ok", method="POST")
    assert (status, body) == (200, b"OK\n")
    resp = exchange(proxy.listener_port, HEALTHZ).response
    assert resp.status == 200
    assert resp.header("x-envoy-immediate-health-check-fail") is None
