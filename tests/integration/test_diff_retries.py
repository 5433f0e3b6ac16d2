"""Differential tests: retries, per-try timeouts, retry headers, weighted clusters and
mirrors. Every expectation is what real Envoy 1.40 answers with the same config
(configs/retry_basic.yaml and configs/split_basic.yaml)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import (
    ProxyProcess,
    RawResponse,
    envoy_local_address,
    exchange,
    start_proxy,
)
from tests.support.upstream import HttpUpstream

CONFIG = "retry_basic.yaml"

BEFORE = b"upstream connect error or disconnect/reset before headers. "


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def flags(resp: RawResponse) -> set[str]:
    """Response flags (x-flags: %RESPONSE_FLAGS%) as a set: Envoy 1.40 renders them in the
    order they were set (URX before UF here), pyenvoy in Envoy's flag-table order."""
    return set((resp.header("x-flags") or "").split(","))


def delta(proxy: ProxyProcess, before: dict[str, int], name: str) -> int:
    return int(proxy.stats().get(name, 0)) - int(before.get(name, 0))


def test_5xx_retried_until_limit(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    before = proxy.stats()
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/r5xx/503")).response
    assert resp.status == 503 and resp.body == b""
    assert [k for k, _ in resp.headers] == [
        "content-length",
        "x-envoy-upstream-service-time",
        "x-flags",
        "x-envoy-attempt-count",
        "date",
        "server",
    ]
    assert flags(resp) == {"URX"}
    assert resp.header("x-envoy-attempt-count") == "3"
    seen = http_upstream.requests
    assert [r.header("x-envoy-attempt-count") for r in seen] == ["1", "2", "3"]
    names = [k for k, _ in seen[0].headers]
    assert names[-3:] == [
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-attempt-count",
        "x-envoy-original-path",
    ]
    for r in seen[1:]:
        assert int(r.header("x-envoy-expected-rq-timeout-ms") or 0) <= 15000
    proxy.wait_stat(
        "cluster.backend.upstream_rq_retry",
        int(before.get("cluster.backend.upstream_rq_retry", 0)) + 2,
    )
    assert delta(proxy, before, "cluster.backend.upstream_rq_retry") == 2
    assert delta(proxy, before, "cluster.backend.upstream_rq_retry_limit_exceeded") == 1
    assert delta(proxy, before, "cluster.backend.upstream_rq_retry_backoff_exponential") == 2
    assert delta(proxy, before, "cluster.backend.retry.upstream_rq_503") == 2
    assert delta(proxy, before, "cluster.backend.upstream_rq_503") == 1
    assert delta(proxy, before, "cluster.backend.upstream_rq_total") == 3


def test_retry_then_success_and_status_codes(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/rsc/418")).response
    assert resp.status == 418 and resp.header("x-envoy-attempt-count") == "2"
    assert http_upstream.request_count == 2
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/rsc/500")).response  # not a gateway error
    assert resp.status == 500 and resp.header("x-envoy-attempt-count") == "1"
    assert flags(resp) == {"-"}
    assert http_upstream.request_count == 1
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/rsc/504")).response
    assert resp.status == 504 and http_upstream.request_count == 2


def test_connect_failure_text_and_flags(proxy: ProxyProcess) -> None:
    before = proxy.stats()
    resp = exchange(proxy.listener_port, get("/rcf")).response
    assert resp.status == 503
    assert resp.body == BEFORE + b"retried and the latest reset reason: remote connection failure"
    assert flags(resp) == {"UF", "URX"}
    assert [(k, "*" if k == "x-flags" else v) for k, v in resp.headers if k not in ("date",)] == [
        ("x-flags", "*"),
        ("x-envoy-attempt-count", "3"),
        ("content-length", str(len(resp.body))),
        ("content-type", "text/plain"),
        ("server", "envoy"),
    ]
    resp = exchange(proxy.listener_port, get("/dead")).response
    assert resp.body == BEFORE + b"reset reason: remote connection failure"
    assert flags(resp) == {"UF"}
    proxy.wait_stat(
        "cluster.dead.upstream_cx_connect_fail",
        int(before.get("cluster.dead.upstream_cx_connect_fail", 0)) + 4,
    )
    assert delta(proxy, before, "cluster.dead.upstream_rq_pending_failure_eject") == 4
    assert delta(proxy, before, "cluster.dead.upstream_rq_retry") == 2
    assert delta(proxy, before, "cluster.dead.upstream_rq_503") == 2
    assert delta(proxy, before, "cluster.dead.upstream_rq_total") == 0
    assert delta(proxy, before, "cluster.dead.upstream_cx_destroy_remote") == 4


def test_router_local_replies_carry_route_headers(proxy: ProxyProcess) -> None:
    """No cluster (NC): route response headers, but no x-envoy-attempt-count."""
    resp = exchange(proxy.listener_port, get("/nc", b"x-cluster: nope\r\n")).response
    assert resp.status == 503 and resp.body == b""
    assert [(k, "*" if k == "date" else v) for k, v in resp.headers] == [
        ("x-flags", "NC"),
        ("date", "*"),
        ("server", "envoy"),
        ("content-length", "0"),
    ]


def test_reset_retried(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/reset")).response
    assert resp.status == 503
    assert resp.body == BEFORE + b"retried and the latest reset reason: connection termination"
    assert flags(resp) == {"UC", "URX"}
    assert http_upstream.request_count == 2


def test_per_try_timeout(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    before = proxy.stats()
    http_upstream.reset_counters()
    t0 = time.monotonic()
    resp = exchange(proxy.listener_port, get("/pertry/1000"), timeout=5).response
    elapsed = time.monotonic() - t0
    assert resp.status == 504 and resp.body == b"upstream request timeout"
    assert flags(resp) == {"UT", "URX"}
    assert resp.header("x-envoy-attempt-count") == "2"
    assert 0.38 < elapsed < 1.2
    assert [r.header("x-envoy-expected-rq-timeout-ms") for r in http_upstream.requests] == [
        "200",
        "200",
    ]
    proxy.wait_stat(
        "cluster.backend.upstream_rq_per_try_timeout",
        int(before.get("cluster.backend.upstream_rq_per_try_timeout", 0)) + 2,
    )
    assert delta(proxy, before, "cluster.backend.upstream_rq_504") == 1


def test_body_beyond_buffer_limit_not_retried(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    before = proxy.stats()
    http_upstream.reset_counters()
    small = b"POST /buf/503 HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nabcde"
    resp = exchange(proxy.listener_port, small).response
    assert resp.status == 503 and resp.header("x-envoy-attempt-count") == "2"
    assert http_upstream.request_count == 2
    assert all(r.body_length == 5 for r in http_upstream.requests)
    http_upstream.reset_counters()
    big = b"POST /buf/503 HTTP/1.1\r\nHost: a\r\ncontent-length: 20\r\n\r\n" + b"x" * 20
    resp = exchange(proxy.listener_port, big).response
    assert resp.status == 503 and resp.header("x-envoy-attempt-count") == "1"
    assert http_upstream.request_count == 1
    assert delta(proxy, before, "cluster.backend.retry_or_shadow_abandoned") == 1


def test_retry_headers_only_on_internal_requests(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    hdrs = b"x-envoy-retry-on: 5xx\r\nx-envoy-max-retries: 2\r\n"
    http_upstream.reset_counters()
    resp = exchange(proxy.internal_port, get("/status/503", hdrs)).response
    assert resp.status == 503 and http_upstream.request_count == 3
    for r in http_upstream.requests:
        assert r.header("x-envoy-retry-on") is None and r.header("x-envoy-max-retries") is None
        assert r.header("x-envoy-internal") == "true"
    http_upstream.reset_counters()
    resp = exchange(proxy.listener_port, get("/status/503", hdrs)).response
    assert (
        resp.status == 503 and http_upstream.request_count == 1
    )  # stripped from external requests
    http_upstream.reset_counters()
    t0 = time.monotonic()
    resp = exchange(
        proxy.internal_port, get("/delay/1500", b"x-envoy-upstream-rq-timeout-ms: 200\r\n")
    ).response
    assert resp.status == 504 and resp.body == b"upstream request timeout"
    assert time.monotonic() - t0 < 1.2
    assert http_upstream.requests[0].header("x-envoy-expected-rq-timeout-ms") == "200"
    http_upstream.reset_counters()
    hdrs = b"x-envoy-retry-on: 5xx\r\nx-envoy-upstream-rq-per-try-timeout-ms: 150\r\n"
    resp = exchange(proxy.internal_port, get("/delay/1500", hdrs), timeout=5).response
    assert resp.status == 504 and http_upstream.request_count == 2
    assert [r.header("x-envoy-expected-rq-timeout-ms") for r in http_upstream.requests] == [
        "150",
        "150",
    ]
    stats = proxy.stats()
    assert stats.get("cluster.internal_backend.internal.upstream_rq_503") == 1


# --- weighted clusters and mirrors (configs/split_basic.yaml) -----------------------------------
@pytest.fixture(scope="module")
def shadow_upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def split_proxy(
    proxy_kind: str, http_upstream: HttpUpstream, shadow_upstream: HttpUpstream
) -> Iterator[ProxyProcess]:
    p = start_proxy(
        proxy_kind,
        (Path(__file__).parent / "configs" / "split_basic.yaml").read_text(),
        upstream_port=http_upstream.port,
        shadow_port=shadow_upstream.port,
    )
    try:
        yield p
    finally:
        p.stop()


def test_weighted_cluster_header_order(
    split_proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    http_upstream.reset_counters()
    resp = exchange(split_proxy.listener_port, get("/split")).response
    assert resp.status == 200
    assert [k for k, _ in resp.headers] == [
        "content-type",
        "content-length",
        "x-envoy-upstream-service-time",
        "x-wc-resp",
        "x-route-resp",
        "date",
        "server",
    ]
    sent = [k for k, _ in http_upstream.last.headers]
    assert sent[-4:] == [
        "x-envoy-expected-rq-timeout-ms",
        "x-wc",
        "x-route",
        "x-envoy-original-path",
    ]


def test_mirror_copy(
    split_proxy: ProxyProcess, http_upstream: HttpUpstream, shadow_upstream: HttpUpstream
) -> None:
    shadow_upstream.reset_counters()
    http_upstream.reset_counters()
    resp = exchange(
        split_proxy.listener_port,
        b"GET /mirror HTTP/1.1\r\nHost: svc:8080\r\ncontent-length: 0\r\n\r\n",
    ).response
    assert resp.status == 200
    assert shadow_upstream.wait_requests(1)
    main = http_upstream.last
    copy = shadow_upstream.last
    assert copy.path == "/echo"
    assert copy.headers == [
        ("host", "svc-shadow:8080"),
        *[(k, v) for k, v in main.headers if k != "host"],
        ("x-envoy-internal", "true"),
        ("x-forwarded-for", envoy_local_address()),
    ]
    split_proxy.wait_stat("cluster.shadow.internal.upstream_rq_200", 1)
    assert "cluster.shadow.external.upstream_rq_200" not in split_proxy.stats()


def test_mirror_runtime_fraction_off(
    split_proxy: ProxyProcess, shadow_upstream: HttpUpstream
) -> None:
    shadow_upstream.reset_counters()
    for _ in range(3):
        assert exchange(split_proxy.listener_port, get("/mirror_off")).response.status == 200
    time.sleep(0.2)
    assert shadow_upstream.request_count == 0
