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


def _cluster_proto(cbs: dict[str, Any], name: str = "c") -> Any:
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    return json_format.ParseDict({"name": name, "circuit_breakers": cbs}, cluster_pb2.Cluster())


UNLIMITED = 2**64 - 1


def test_first_threshold_of_a_priority_wins() -> None:
    """As Envoy (find_if over thresholds / per_host_thresholds), the first entry counts."""
    proto = _cluster_proto(
        {
            "thresholds": [
                {"max_connections": 3, "track_remaining": True},
                {"max_connections": 4, "max_requests": 9},
                {"priority": "HIGH", "max_requests": 7},
            ],
            "per_host_thresholds": [{"max_connections": 2}, {"max_connections": 5}],
        }
    )
    store = Store()
    rms = ResourceManagers(proto, "c", store.scope("cluster.c"))
    assert rms.default.connections.limit == 3
    assert rms.default.requests.limit == 1024
    assert rms.high.requests.limit == 7
    assert rms.default.max_connections_per_host == 2
    assert store.gauges["cluster.c.circuit_breakers.default.remaining_cx"].value == 3
    assert "cluster.c.circuit_breakers.high.remaining_cx" not in store.gauges


def test_declared_gauges_match_envoy_at_startup() -> None:
    """ClusterInfo's gauges: *_open for both priorities, remaining_* (with
    remaining_cx_pools) only with track_remaining, at the configured limits."""
    from pyenvoy.upstream.cluster_manager import ClusterManager

    tracked = _cluster_proto(
        {
            "thresholds": [
                {"max_connections": 3, "max_pending_requests": 2, "track_remaining": True},
                {"priority": "HIGH", "max_connection_pools": 5, "track_remaining": True},
            ]
        },
        "tracked",
    )
    plain = _cluster_proto({"thresholds": [{"max_connections": 3}]}, "plain")
    store = Store()
    cm = ClusterManager([tracked, plain], store)
    try:

        def gauges(cluster: str) -> dict[str, int]:
            pre = f"cluster.{cluster}.circuit_breakers."
            return {k[len(pre) :]: g.value for k, g in store.gauges.items() if k.startswith(pre)}

        opens = {
            f"{p}.{g}": 0
            for p in ("default", "high")
            for g in ("cx_open", "cx_pool_open", "rq_open", "rq_pending_open", "rq_retry_open")
        }
        assert gauges("plain") == opens
        assert gauges("tracked") == {
            **opens,
            "default.remaining_cx": 3,
            "default.remaining_pending": 2,
            "default.remaining_rq": 1024,
            "default.remaining_retries": 3,
            "default.remaining_cx_pools": UNLIMITED,
            "high.remaining_cx": 1024,
            "high.remaining_pending": 1024,
            "high.remaining_rq": 1024,
            "high.remaining_retries": 3,
            "high.remaining_cx_pools": 5,
        }
        info = cm.get("tracked").info  # type: ignore[union-attr]
        assert [cb[:2] for cb in info.circuit_breakers] == [("default", 3), ("high", 1024)]
    finally:
        cm.close()


def test_remaining_starts_at_the_configured_limit_then_follows_the_runtime() -> None:
    """Envoy sets remaining_* to the configured max in the constructor; every change after
    that uses the limit in effect (here a static runtime override)."""
    rt = Runtime([{"circuit_breakers": {"c": {"default": {"max_connections": 10}}}}])
    proto = _cluster_proto({"thresholds": [{"max_connections": 3, "track_remaining": True}]})
    store = Store()
    rms = ResourceManagers(proto, "c", store.scope("cluster.c"), rt)
    cx = rms.default.connections
    remaining = store.gauges["cluster.c.circuit_breakers.default.remaining_cx"]
    assert cx.limit == 10 and remaining.value == 3
    cx.inc()
    assert remaining.value == 9
    cx.dec()
    assert remaining.value == 10


def test_only_tracked_resources_leave_the_fast_path() -> None:
    """Untracked, runtime-free resources keep the bare-increment fast path (fast_limit);
    tracked ones update remaining_* on every change."""
    proto = _cluster_proto(
        {"thresholds": [{"track_remaining": True}, {"priority": "HIGH", "max_requests": 5}]}
    )
    store = Store()
    rms = ResourceManagers(proto, "c", store.scope("cluster.c"))
    assert rms.high.requests.fast_limit == 5 and rms.high.requests.remaining is None
    rq = rms.default.requests
    assert rq.fast_limit == 0
    rq.inc()
    rq.inc()
    assert store.gauges["cluster.c.circuit_breakers.default.remaining_rq"].value == 1022
    rq.current -= 1  # the pool's own decrement, then released() (conn_pool.py)
    rq.released()
    assert store.gauges["cluster.c.circuit_breakers.default.remaining_rq"].value == 1023


def test_retry_budget_gauges_like_envoy() -> None:
    """With a budget, remaining_retries starts at max_retries and reads 0 once the budget is
    used; rq_retry_open still compares the count with max_retries (Envoy's nested
    max_retries resource)."""
    proto = _cluster_proto(
        {
            "thresholds": [
                {
                    "track_remaining": True,
                    "max_retries": 2,
                    "retry_budget": {"budget_percent": {"value": 100}, "min_retry_concurrency": 5},
                }
            ]
        }
    )
    store = Store()
    rms = ResourceManagers(proto, "c", store.scope("cluster.c"))
    retries = rms.default.retries
    remaining = store.gauges["cluster.c.circuit_breakers.default.remaining_retries"]
    is_open = store.gauges["cluster.c.circuit_breakers.default.rq_retry_open"]
    assert remaining.value == 2
    assert retries.can_create()
    assert remaining.value == 0
    retries.inc()
    assert is_open.value == 0
    retries.inc()
    assert is_open.value == 1  # 2 >= max_retries, though the budget (5) allows more
    assert retries.can_create()
    retries.dec()
    assert is_open.value == 0 and remaining.value == 0
