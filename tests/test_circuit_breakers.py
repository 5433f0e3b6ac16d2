"""Circuit breakers (per-priority thresholds) and connection limits, through the
embedding API with real loopback upstreams (helpers from test_retries.py)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from typing import Any

import pytest

import pyenvoy
from pyenvoy.runtime import Runtime
from pyenvoy.stats import Store
from pyenvoy.upstream.circuit_breaker import ResourceManagers
from tests.support.procs import free_port
from tests.support.upstream import HttpUpstream
from tests.test_retries import (
    ScriptedUpstream,
    cluster,
    config,
    fixed_backoff,
    flags,
    names,
    request,
    route,
    stats_of,
    wait_for,
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


def cb(**thresholds: Any) -> dict[str, Any]:
    return {"circuit_breakers": {"thresholds": [thresholds]}}


async def test_pending_overflow_and_connection_limit(upstream: HttpUpstream) -> None:
    cfg = config(
        [route("/", "cb", prefix_rewrite="/delay/300")],
        [
            cluster(
                "cb",
                upstream.port,
                **cb(max_connections=1, max_pending_requests=1, track_remaining=True),
            )
        ],
        vhost={"include_attempt_count_in_response": True},
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        prefix = "cluster.cb.circuit_breakers.default."
        first = asyncio.ensure_future(request(proxy.port(), "/?a"))
        await wait_for(lambda: proxy.stats()["cluster.cb.upstream_rq_active"] == 1)
        second = asyncio.ensure_future(request(proxy.port(), "/?b"))
        await wait_for(lambda: proxy.stats()["cluster.cb.upstream_rq_pending_active"] == 1)
        s = proxy.stats()
        assert s[prefix + "cx_open"] == 1
        assert s[prefix + "rq_pending_open"] == 1
        assert s[prefix + "remaining_cx"] == 0
        assert s[prefix + "remaining_pending"] == 0
        assert s[prefix + "remaining_rq"] == 1023
        assert (
            s["cluster.cb.upstream_cx_overflow"] == 1
        )  # the 2nd request did not open a 2nd connection
        third = await request(proxy.port(), "/?c")
        assert third.status == 503
        assert third.body == OVERFLOW_BODY
        assert names(third) == [
            "x-flags",
            "x-envoy-overloaded",
            "x-envoy-attempt-count",
            "content-length",
            "content-type",
            "date",
            "server",
        ]
        assert third.header("x-envoy-overloaded") == "true"
        assert flags(third) == {"UO"}
        r1, r2 = await asyncio.gather(first, second)
        assert (r1.status, r2.status) == (200, 200)  # the waiting one got the freed connection
        s = stats_of(proxy, "cluster.cb.")
        assert s["upstream_rq_pending_overflow"] == 1
        assert s["upstream_cx_total"] == 1
        assert s["upstream_rq_503"] == 1
        assert s["upstream_rq_total"] == 2
        assert s["circuit_breakers.default.rq_pending_open"] == 0
        assert s["circuit_breakers.default.remaining_pending"] == 1


async def test_max_requests_overflow(upstream: HttpUpstream) -> None:
    cfg = config(
        [route("/", "cb", prefix_rewrite="/delay/300")],
        [cluster("cb", upstream.port, **cb(max_requests=1))],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        first = asyncio.ensure_future(request(proxy.port(), "/?a"))
        await wait_for(lambda: proxy.stats()["cluster.cb.upstream_rq_active"] == 1)
        assert proxy.stats()["cluster.cb.circuit_breakers.default.rq_open"] == 1
        second = await request(proxy.port(), "/?b")
        assert second.status == 503 and second.body == OVERFLOW_BODY
        assert second.header("x-envoy-overloaded") == "true"
        assert (await first).status == 200
        s = stats_of(proxy, "cluster.cb.")
        assert s["upstream_rq_active_overflow"] == 1
        assert s["upstream_rq_pending_overflow"] == 0
        assert s["circuit_breakers.default.rq_open"] == 0


async def test_overflow_is_not_retried(upstream: HttpUpstream) -> None:
    cfg = config(
        [
            route(
                "/",
                "cb",
                prefix_rewrite="/delay/300",
                retry_policy={"retry_on": "5xx,reset", "num_retries": 3},
            )
        ],
        [cluster("cb", upstream.port, **cb(max_requests=1))],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        first = asyncio.ensure_future(request(proxy.port(), "/?a"))
        await wait_for(lambda: proxy.stats()["cluster.cb.upstream_rq_active"] == 1)
        second = await request(proxy.port(), "/?b")
        assert second.status == 503 and flags(second) == {"UO"}
        await first
        assert stats_of(proxy, "cluster.cb.")["upstream_rq_retry"] == 0


async def test_max_retries_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_retries import MAX_RANDOM

    fixed_backoff(monkeypatch, MAX_RANDOM)
    async with ScriptedUpstream([503]) as up:
        policy = {"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.2s"}}
        cfg = config(
            [route("/", "cb", retry_policy=policy)],
            [cluster("cb", up.port, **cb(max_retries=1))],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            first = asyncio.ensure_future(request(proxy.port(), "/?a"))
            await wait_for(lambda: proxy.stats()["cluster.cb.upstream_rq_retry"] == 1)
            assert proxy.stats()["cluster.cb.circuit_breakers.default.rq_retry_open"] == 1
            second = await request(proxy.port(), "/?b")
            assert second.status == 503 and flags(second) == {"UO"}
            assert second.header("x-envoy-overloaded") is None  # a response, not a local reply
            r1 = await first
            assert r1.status == 503 and flags(r1) == {"URX"}
            s = stats_of(proxy, "cluster.cb.")
            assert s["upstream_rq_retry_overflow"] == 1
            assert s["upstream_rq_retry"] == 3
            assert s["circuit_breakers.default.rq_retry_open"] == 0


async def test_retry_budget_limits_concurrent_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_retries import MAX_RANDOM

    fixed_backoff(monkeypatch, MAX_RANDOM)
    async with ScriptedUpstream([503]) as up:
        policy = {"retry_on": "5xx", "num_retries": 1, "retry_back_off": {"base_interval": "0.3s"}}
        budget = {"retry_budget": {"budget_percent": {"value": 0.0}, "min_retry_concurrency": 1}}
        cfg = config(
            [route("/", "cb", retry_policy=policy)], [cluster("cb", up.port, **cb(**budget))]
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            results = await asyncio.gather(*(request(proxy.port(), f"/?{i}") for i in range(3)))
            assert all(r.status == 503 for r in results)
            s = stats_of(proxy, "cluster.cb.")
            assert s["upstream_rq_retry"] == 1
            assert s["upstream_rq_retry_overflow"] == 2


async def test_max_connection_pools(upstream: HttpUpstream) -> None:
    other = HttpUpstream().start()
    try:
        cfg = config(
            [route("/", "two")],
            [
                cluster(
                    "two",
                    upstream.port,
                    other.port,
                    lb_policy="ROUND_ROBIN",
                    **cb(max_connection_pools=1),
                )
            ],
        )
        async with pyenvoy.Proxy(cfg) as proxy:
            a = await request(proxy.port(), "/echo")
            b = await request(proxy.port(), "/echo")
            statuses = sorted([a.status, b.status])
            assert statuses == [200, 503]
            bad = a if a.status == 503 else b
            assert bad.body == b"no healthy upstream"
            assert flags(bad) == {"UH"}
            s = stats_of(proxy, "cluster.two.")
            assert s["upstream_cx_pool_overflow"] == 1
            assert s["upstream_cx_none_healthy"] == 0
            assert s["circuit_breakers.default.cx_pool_open"] == 1
    finally:
        other.stop()


async def test_idle_pool_gives_back_its_slot() -> None:
    dead = free_port()
    cfg = config([route("/", "dead")], [cluster("dead", dead, **cb(max_connection_pools=1))])
    async with pyenvoy.Proxy(cfg) as proxy:
        for _ in range(3):  # each failed connect leaves the pool idle: it is deleted
            resp = await request(proxy.port(), "/")
            assert resp.status == 503 and b"remote connection failure" in resp.body
        s = stats_of(proxy, "cluster.dead.")
        assert s["upstream_cx_pool_overflow"] == 0
        assert s["circuit_breakers.default.cx_pool_open"] == 0


async def test_connection_limit_queues_instead_of_connecting(upstream: HttpUpstream) -> None:
    cfg = config(
        [route("/", "cb", prefix_rewrite="/delay/100")],
        [cluster("cb", upstream.port, **cb(max_connections=2))],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        results = await asyncio.gather(*(request(proxy.port(), f"/?{i}") for i in range(6)))
        assert [r.status for r in results] == [200] * 6
        s = stats_of(proxy, "cluster.cb.")
        assert s["upstream_cx_total"] == 2
        assert s["upstream_cx_overflow"] >= 1
        assert s["upstream_rq_total"] == 6


async def test_per_host_connection_limit(upstream: HttpUpstream) -> None:
    per_host = {"circuit_breakers": {"per_host_thresholds": [{"max_connections": 1}]}}
    cfg = config(
        [route("/", "cb", prefix_rewrite="/delay/100")], [cluster("cb", upstream.port, **per_host)]
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        results = await asyncio.gather(*(request(proxy.port(), f"/?{i}") for i in range(3)))
        assert [r.status for r in results] == [200] * 3
        assert stats_of(proxy, "cluster.cb.")["upstream_cx_total"] == 1


async def test_runtime_overrides_threshold(upstream: HttpUpstream) -> None:
    layers = {
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        "circuit_breakers": {"cb": {"default": {"max_pending_requests": 0}}}
                    },
                }
            ]
        }
    }
    cfg = config([route("/", "cb")], [cluster("cb", upstream.port)], bootstrap=layers)
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/echo")
        assert resp.status == 503 and resp.body == OVERFLOW_BODY
        assert stats_of(proxy, "cluster.cb.")["upstream_rq_pending_overflow"] == 1


async def test_high_priority_route_uses_high_thresholds(upstream: HttpUpstream) -> None:
    thresholds = {
        "circuit_breakers": {"thresholds": [{"max_pending_requests": 0}, {"priority": "HIGH"}]}
    }
    cfg = config(
        [route("/high", "cb", priority="HIGH"), route("/", "cb")],
        [cluster("cb", upstream.port, **thresholds)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        assert (await request(proxy.port(), "/default")).status == 503
        assert (await request(proxy.port(), "/high")).status == 200


async def test_max_connection_duration(upstream: HttpUpstream) -> None:
    opts = {"common_http_protocol_options": {"max_connection_duration": "0.3s"}}
    cfg = config([route("/", "c")], [cluster("c", upstream.port, **opts)])
    async with pyenvoy.Proxy(cfg) as proxy:
        assert (await request(proxy.port(), "/echo")).status == 200
        await wait_for(lambda: proxy.stats()["cluster.c.upstream_cx_max_duration_reached"] == 1)
        await wait_for(lambda: proxy.stats()["cluster.c.upstream_cx_active"] == 0)
        assert (await request(proxy.port(), "/echo")).status == 200
        assert stats_of(proxy, "cluster.c.")["upstream_cx_total"] == 2


async def test_max_requests_per_connection(upstream: HttpUpstream) -> None:
    cfg = config([route("/", "c")], [cluster("c", upstream.port, max_requests_per_connection=2)])
    async with pyenvoy.Proxy(cfg) as proxy:
        for _ in range(4):
            assert (await request(proxy.port(), "/echo")).status == 200
        s = stats_of(proxy, "cluster.c.")
        assert s["upstream_cx_total"] == 2
        assert s["upstream_cx_max_requests"] == 2


async def test_upstream_max_stream_duration(upstream: HttpUpstream) -> None:
    opts = {"common_http_protocol_options": {"max_stream_duration": "0.2s"}}
    cfg = config([route("/", "c")], [cluster("c", upstream.port, **opts)])
    async with pyenvoy.Proxy(cfg) as proxy:
        resp = await request(proxy.port(), "/delay/1000")
        assert resp.status == 504 and resp.body == b"upstream max stream duration reached"
        assert flags(resp) == {"UMSDR"}
        assert stats_of(proxy, "cluster.c.")["upstream_rq_max_duration_reached"] == 1
        assert (await request(proxy.port(), "/delay/50")).status == 200


def test_resource_manager_gauges_and_defaults() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    proto = json_format.ParseDict(
        {
            "name": "c",
            "circuit_breakers": {"thresholds": [{"max_requests": 2, "track_remaining": True}]},
        },
        cluster_pb2.Cluster(),
    )
    store = Store()
    rms = ResourceManagers(proto, "c", store.scope("cluster.c"))
    rq = rms.default.requests
    assert (
        rms.default.connections.limit,
        rms.default.pending_requests.limit,
        rms.default.retries.limit,
    ) == (
        1024,
        1024,
        3,
    )
    assert rms.default.connection_pools.limit == 2**64 - 1
    assert store.gauges["cluster.c.circuit_breakers.default.remaining_rq"].value == 2
    rq.inc()
    rq.inc()
    assert not rq.can_create()
    assert store.gauges["cluster.c.circuit_breakers.default.rq_open"].value == 1
    assert store.gauges["cluster.c.circuit_breakers.default.remaining_rq"].value == 0
    rq.dec()
    assert rq.can_create()
    assert store.gauges["cluster.c.circuit_breakers.default.rq_open"].value == 0
    # remaining_* exist only with track_remaining (high priority has no thresholds here).
    assert "cluster.c.circuit_breakers.high.remaining_rq" not in store.gauges
    assert "cluster.c.upstream_rq_active_overflow" in store.counters


def test_resource_limit_follows_admin_layer() -> None:
    overrides: dict[str, str] = {}
    rt = Runtime([], admin_layer=True, admin_source=lambda: overrides)
    store = Store()
    rms = ResourceManagers(None, "c", store.scope("cluster.c"), rt)
    res = rms.default.pending_requests
    assert res.can_create()
    overrides["circuit_breakers.c.default.max_pending_requests"] = "0"
    assert not res.can_create()
    del overrides["circuit_breakers.c.default.max_pending_requests"]
    assert res.can_create()
    assert isinstance(rms.for_priority(1), type(rms.default)) and rms.for_priority(1) is rms.high


def test_per_host_can_create_connection() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    proto = json_format.ParseDict(
        {"name": "c", "circuit_breakers": {"per_host_thresholds": [{"max_connections": 1}]}},
        cluster_pb2.Cluster(),
    )
    rms = ResourceManagers(proto, "c", Store().scope("cluster.c"))
    host = types.SimpleNamespace(
        stats=types.SimpleNamespace(cx_active=types.SimpleNamespace(value=0))
    )
    assert rms.default.can_create_connection(host)
    host.stats.cx_active.value = 1
    assert not rms.default.can_create_connection(host)
