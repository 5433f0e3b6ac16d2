"""Traffic splitting and mirroring (weighted_clusters, cluster_header,
request_mirror_policies) and the bootstrap runtime, through the embedding API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

import pyenvoy
from pyenvoy.runtime import Runtime, for_server
from tests.support.procs import envoy_local_address, free_port
from tests.support.upstream import HttpUpstream
from tests.test_retries import (
    ScriptedUpstream,
    cluster,
    config,
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


@pytest.fixture(scope="module")
def shadow() -> Any:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


def weighted(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "match": {"prefix": extra.pop("prefix", "/")},
        "route": {"weighted_clusters": {"clusters": list(entries)}, **extra},
    }


# --- weighted clusters ----------------------------------------------------------------------
async def test_weighted_split_distribution(upstream: HttpUpstream, shadow: HttpUpstream) -> None:
    cfg = config(
        [weighted({"name": "a", "weight": 75}, {"name": "b", "weight": 25})],
        [cluster("a", upstream.port), cluster("b", shadow.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        for _ in range(400):
            assert (await request(proxy.port(), "/echo")).status == 200
        a = proxy.stats()["cluster.a.upstream_rq_200"]
        b = proxy.stats()["cluster.b.upstream_rq_200"]
        assert a + b == 400
        assert 240 < a < 360, (a, b)


async def test_weighted_cluster_headers_and_total_weight(upstream: HttpUpstream) -> None:
    split = weighted(
        {
            "name": "a",
            "weight": 10,
            "request_headers_to_add": [{"header": {"key": "x-wc", "value": "a"}}],
            "response_headers_to_add": [{"header": {"key": "x-wc-resp", "value": "a"}}],
        },
        {"name": "b", "weight": 0},
        prefix_rewrite="/echo",
    )
    split["route"]["weighted_clusters"]["total_weight"] = 10
    split["request_headers_to_add"] = [{"header": {"key": "x-route", "value": "r"}}]
    split["response_headers_to_add"] = [{"header": {"key": "x-route-resp", "value": "r"}}]
    cfg = config(
        [split],
        [cluster("a", upstream.port), cluster("b", free_port())],
        vhost={"include_attempt_count_in_response": True},
        flags=False,
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        resp = await request(proxy.port(), "/x")
        assert resp.status == 200
        # Weighted-cluster mutations come before the route's, on both sides.
        sent = [k for k, _ in upstream.last.headers]
        assert sent.index("x-wc") < sent.index("x-route") < sent.index("x-envoy-original-path")
        assert names(resp)[-6:] == [
            "x-envoy-upstream-service-time",
            "x-wc-resp",
            "x-route-resp",
            "x-envoy-attempt-count",
            "date",
            "server",
        ]


async def test_weighted_cluster_header_name_and_cluster_header(upstream: HttpUpstream) -> None:
    split = weighted({"name": "a", "weight": 1}, {"name": "b", "weight": 1}, prefix="/w")
    split["route"]["weighted_clusters"]["header_name"] = "x-pick"
    by_header = {"match": {"prefix": "/h"}, "route": {"cluster_header": "x-cluster"}}
    cfg = config(
        [split, by_header],
        [cluster("a", upstream.port), cluster("b", free_port())],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        assert (await request(proxy.port(), "/w", headers=[("x-pick", "0")])).status == 200
        assert (await request(proxy.port(), "/w", headers=[("x-pick", "1")])).status == 503
        assert (await request(proxy.port(), "/h", headers=[("x-cluster", "a")])).status == 200
        missing = await request(proxy.port(), "/h", headers=[("x-cluster", "nope")])
        assert missing.status == 503 and flags(missing) == {"NC"}


# --- mirroring --------------------------------------------------------------------------------
async def test_mirror_copies_request(upstream: HttpUpstream, shadow: HttpUpstream) -> None:
    r = route("/m", "main", request_mirror_policies=[{"cluster": "shadow"}])
    cfg = config([r], [cluster("main", upstream.port), cluster("shadow", shadow.port)])
    async with pyenvoy.Proxy(cfg) as proxy:
        upstream.reset_counters()
        shadow.reset_counters()
        resp = await request(proxy.port(), "/m/echo", host="svc:8080")
        assert resp.status == 200
        assert shadow.wait_requests(1)
        main, copy = upstream.last, shadow.last
        assert main.header("host") == "svc:8080"
        assert copy.header("host") == "svc-shadow:8080"
        assert copy.header("x-request-id") == main.header("x-request-id")
        assert [k for k, _ in copy.headers][-2:] == ["x-envoy-internal", "x-forwarded-for"]
        assert copy.header("x-forwarded-for") == envoy_local_address()
        assert main.header("x-envoy-internal") is None
        await wait_for(lambda: proxy.stats().get("cluster.shadow.internal.upstream_rq_200") == 1)
        assert "cluster.shadow.external.upstream_rq_200" not in proxy.stats()


async def test_mirror_streams_body(upstream: HttpUpstream, shadow: HttpUpstream) -> None:
    r = route("/", "main", request_mirror_policies=[{"cluster": "shadow"}])
    cfg = config([r], [cluster("main", upstream.port), cluster("shadow", shadow.port)])
    async with pyenvoy.Proxy(cfg) as proxy:
        shadow.reset_counters()
        resp = await request(proxy.port(), "/echo", "POST", body=[b"abc", b"defg"], gap=0.05)
        assert resp.status == 200
        assert shadow.wait_requests(1)
        assert shadow.last.body_length == 7 and shadow.last.method == "POST"
        body = json.loads(resp.body)
        assert body["body_length"] == 7
        shadow.reset_counters()
        chunks = [b"3\r\nabc\r\n", b"0\r\n\r\n"]
        resp = await request(
            proxy.port(),
            "/echo",
            "POST",
            headers=[("transfer-encoding", "chunked")],
            body=chunks,
            gap=0.05,
        )
        assert resp.status == 200
        assert shadow.wait_requests(1)
        assert shadow.last.chunked and shadow.last.body_length == 3


async def test_mirror_failure_never_affects_main(upstream: HttpUpstream) -> None:
    routes = [
        route(
            "/dead", "main", prefix_rewrite="/echo", request_mirror_policies=[{"cluster": "dead"}]
        ),
        route(
            "/unknown",
            "main",
            prefix_rewrite="/echo",
            request_mirror_policies=[{"cluster_header": "x-shadow"}],
        ),
    ]
    cfg = config(routes, [cluster("main", upstream.port), cluster("dead", free_port())])
    async with pyenvoy.Proxy(cfg) as proxy:
        for path in ("/dead", "/unknown"):
            resp = await request(proxy.port(), path, headers=[("x-shadow", "no-such-cluster")])
            assert resp.status == 200 and flags(resp) == {"-"}
        await wait_for(lambda: proxy.stats().get("cluster.dead.internal.upstream_rq_503") == 1)
        assert proxy.stats()["cluster.main.upstream_rq_200"] == 2


async def test_slow_mirror_is_discarded_and_times_out(upstream: HttpUpstream) -> None:
    async with ScriptedUpstream(["hang"]) as slow:
        r = route("/", "main", timeout="0.3s", request_mirror_policies=[{"cluster": "slow"}])
        cfg = config([r], [cluster("main", upstream.port), cluster("slow", slow.port)])
        async with pyenvoy.Proxy(cfg) as proxy:
            t0 = asyncio.get_running_loop().time()
            resp = await request(proxy.port(), "/status/204")
            assert resp.status == 204 and flags(resp) == {"-"}
            assert asyncio.get_running_loop().time() - t0 < 0.25
            await wait_for(lambda: len(slow.requests) == 1)
            # The shadow has the route timeout: it is reset and charged as a 504.
            await wait_for(lambda: proxy.stats().get("cluster.slow.upstream_rq_timeout") == 1)
            assert proxy.stats()["cluster.slow.internal.upstream_rq_504"] == 1
            assert proxy.stats()["cluster.main.upstream_rq_204"] == 1


async def test_mirror_runtime_fraction(upstream: HttpUpstream, shadow: HttpUpstream) -> None:
    policies = [
        {
            "cluster": "shadow",
            "runtime_fraction": {"default_value": {"numerator": 100}, "runtime_key": "m.pct"},
        }
    ]
    rt = {"layered_runtime": {"layers": [{"name": "s", "static_layer": {"m": {"pct": 0}}}]}}
    cfg = config(
        [route("/", "main", request_mirror_policies=policies)],
        [cluster("main", upstream.port), cluster("shadow", shadow.port)],
        bootstrap=rt,
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        shadow.reset_counters()
        for _ in range(5):
            assert (await request(proxy.port(), "/echo")).status == 200
        await asyncio.sleep(0.1)
        assert shadow.request_count == 0
    policies[0]["runtime_fraction"] = {"default_value": {"numerator": 50}}
    cfg = config(
        [route("/", "main", request_mirror_policies=policies)],
        [cluster("main", upstream.port), cluster("shadow", shadow.port)],
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        shadow.reset_counters()
        for _ in range(200):
            assert (await request(proxy.port(), "/echo")).status == 200
        await asyncio.sleep(0.2)
        assert 60 < shadow.request_count < 140


async def test_mirror_abandoned_with_downstream(
    upstream: HttpUpstream, shadow: HttpUpstream
) -> None:
    r = route("/", "main", request_mirror_policies=[{"cluster": "shadow"}])
    cfg = config([r], [cluster("main", upstream.port), cluster("shadow", shadow.port)])
    async with pyenvoy.Proxy(cfg) as proxy:
        shadow.reset_counters()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.2)
        assert shadow.request_count == 0
        # The incomplete copy was cancelled: its upstream connection was reset.
        await wait_for(
            lambda: proxy.stats()["cluster.shadow.upstream_cx_destroy_local_with_active_rq"] == 1
        )
        del reader


# --- runtime ----------------------------------------------------------------------------------
def test_runtime_static_layers_and_lookups() -> None:
    rt = Runtime(
        [
            {
                "a": {"b": 5, "c": "7", "flag": True},
                "frac": {"numerator": 25, "denominator": "TEN_THOUSAND"},
            },
            {"a": {"b": 150}, "txt": "hello"},
        ]
    )
    assert rt.get_integer("a.b", 0) == 150  # later layers override
    assert rt.get_integer("a.c", 0) == 7
    assert rt.get_boolean("a.flag", False) is True
    assert rt.get_integer("missing", 42) == 42
    assert rt.get("txt").raw == "hello"  # type: ignore[union-attr]
    assert rt.fraction("frac", (1, 100)) == (25, 10_000)
    assert rt.fraction("a.b", (1, 100)) == (1, 1)  # integer > 100: always
    assert rt.fraction("a.c", (1, 100)) == (7, 100)  # integer: a percentage
    assert rt.fraction("none", (3, 100)) == (3, 100)
    assert rt.fraction_enabled("frac", 0, 100, 24) and not rt.fraction_enabled("frac", 0, 100, 25)
    assert rt.feature_enabled("a.c", 0, 6) and not rt.feature_enabled("a.c", 0, 7)
    assert not rt.dynamic


def test_runtime_admin_layer() -> None:
    overrides: dict[str, str] = {"k": "3"}
    rt = Runtime([{"k": 1}], admin_layer=True, admin_source=lambda: overrides)
    assert rt.dynamic and rt.get_integer("k", 0) == 3
    overrides.clear()
    assert rt.get_integer("k", 0) == 1


async def test_runtime_for_server() -> None:
    cfg = config(
        [],
        [],
        bootstrap={"layered_runtime": {"layers": [{"name": "s", "static_layer": {"x": {"y": 2}}}]}},
    )
    async with pyenvoy.Proxy(cfg) as proxy:
        assert proxy.server is not None
        rt = for_server(proxy.server)
        assert rt.get_integer("x.y", 0) == 2
        assert for_server(proxy.server) is rt
        assert stats_of(proxy, "runtime.") is not None
