"""Pins for the upstream side of the per-request path (router filter, HTTP/1 pool, cluster
stats, route timeouts, route matching) that CPU trimming reshapes.

Strategy: unit checks compare each shortcut with the general code it stands for (a
StatGroups record with per-histogram records, the inline prefix match with
``Route._matches``); an end-to-end check pushes keep-alive requests through a real Server
on in-memory transports (as benchmarks/hot_path.py does) and compares the upstream request
bytes and the exact cluster and host stats.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf import json_format

from pyenvoy.http.headers import RequestHeaders
from pyenvoy.router import RouteTable
from pyenvoy.stats import Histogram, StatGroups, Store
from pyenvoy.timeouts import TimeoutQueue
from tests.support.memory import InMemoryProxy, proxy_config

# --- stats ---------------------------------------------------------------------------------------


def test_stat_groups_match_per_stat_recording_across_flushes() -> None:
    # 700 values cross the 256-value flush point twice: a group's histograms must hold the
    # same buckets, count and (batch-summed, so bit-identical) sum as Histogram.record.
    values = [((i * 7919) % 1000) / 7.0 for i in range(700)]
    store = Store()
    a, b = store.counter("a"), store.counter("b")
    h1, h2 = store.histogram("h1"), store.histogram("h2")
    groups = StatGroups(lambda key: ((a, b), (h1, h2)) if key == 1 else ((b,), (h2,)))
    ref = Histogram("ref")
    for v in values:
        groups.record(1, v)
        ref.record(v)
    groups.record(2, 3.0)
    assert (a.value, b.value) == (700, 701)
    assert (h1.counts, h1.sum, h1.count) == (ref.counts, ref.sum, ref.count)
    ref.record(3.0)
    assert (h2.counts, h2.sum, h2.count) == (ref.counts, ref.sum, ref.count)
    assert set(groups.groups) == {1, 2}


def test_cluster_response_stats_are_envoy_named_and_exact() -> None:
    store = Store()
    from pyenvoy.upstream.cluster_manager import ClusterStats

    stats = ClusterStats(store.scope("cluster.c"))
    assert "cluster.c.upstream_rq_200" not in store.counters  # created on first use
    for status in (200, 200, 503):
        stats.responses.record(status, 1.5)
    c = store.counters
    assert c["cluster.c.upstream_rq_200"].value == 2
    assert c["cluster.c.upstream_rq_2xx"].value == 2
    assert c["cluster.c.upstream_rq_503"].value == 1
    assert c["cluster.c.upstream_rq_5xx"].value == 1
    assert c["cluster.c.upstream_rq_completed"].value == 3
    assert c["cluster.c.external.upstream_rq_200"].value == 2
    assert c["cluster.c.external.upstream_rq_5xx"].value == 1
    assert c["cluster.c.external.upstream_rq_completed"].value == 3
    for name in ("cluster.c.upstream_rq_time", "cluster.c.external.upstream_rq_time"):
        h = store.histograms[name]
        assert (h.count, h.sum) == (3, 4.5)


# --- timeouts ------------------------------------------------------------------------------------


async def test_timeout_fires_once_and_cancel_after_firing_is_harmless() -> None:
    q = TimeoutQueue(asyncio.get_running_loop(), 0.01)
    fired: list[str] = []
    a = q.add(lambda: fired.append("a"))
    b = q.add(lambda: fired.append("b"))
    assert not a.cancelled and not b.cancelled
    b.cancel()
    assert b.cancelled
    await asyncio.sleep(0.05)
    assert fired == ["a"]
    assert a.cancelled  # fired entries are done: cancelling them does nothing
    a.cancel()
    c = q.add(lambda: fired.append("c"))
    await asyncio.sleep(0.05)
    assert fired == ["a", "c"] and c.cancelled and not q.entries


# --- route matching ------------------------------------------------------------------------------


def _table(routes: list[dict[str, Any]]) -> RouteTable:
    config = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]}
    return RouteTable.from_proto(json_format.ParseDict(config, RouteConfiguration()))


def _dr(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "match": match, "direct_response": {"status": 200}}


@pytest.mark.parametrize(
    "path",
    ["/api/x", "/api", "/API/x", "/ap", "/api?x=1", "/a#api", "/?/api", "", "*", "/apix#y?z"],
)
@pytest.mark.parametrize("header", [None, "yes"])
def test_inline_prefix_match_agrees_with_route_matches(path: str, header: str | None) -> None:
    routes = [
        _dr("hdr", {"prefix": "/api", "headers": [{"name": "x-t", "exact_match": "yes"}]}),
        _dr("ci", {"prefix": "/API/", "case_sensitive": False}),
        _dr("q", {"prefix": "/ap", "query_parameters": [{"name": "x"}]}),
        _dr("plain", {"prefix": "/api"}),
        _dr("root", {"prefix": "/"}),
    ]
    table = _table(routes)
    assert [r._prefix_only for r in table.virtual_hosts[0].routes] == [
        None,
        None,
        None,
        b"/api",
        b"/",
    ]
    extra = [[b"x-t", header.encode()]] if header else []
    headers = RequestHeaders(b"GET", path.encode(), b"h", b"http", extra)
    got = table.route(headers)
    # The general matcher over the same routes, in order.
    path_only = path.encode().partition(b"?")[0].partition(b"#")[0]
    want = next(
        (r for r in table.virtual_hosts[0].routes if r._matches(headers, path_only, [None], 0)),
        None,
    )
    assert got is want


# --- end to end: router + pool + stats on in-memory transports -----------------------------------

_ROUTES = """\
- match: { prefix: "/none" }
  route: { cluster: backend, timeout: 0s }
- match: { prefix: "/" }
  route: { cluster: backend }"""


_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def _upstream_head(data: bytes) -> list[bytes]:
    """The request head's lines without the generated x-request-id."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return [line for line in head if not line.startswith(b"x-request-id:")]


@pytest.mark.parametrize("suppress", [False, True])
async def test_keep_alive_requests_stats_and_upstream_heads(suppress: bool) -> None:
    proxy = InMemoryProxy(
        proxy_config(
            routes=_ROUTES,
            router_extra=f"suppress_envoy_headers: {'true' if suppress else 'false'}",
        )
    )
    server, conn, down, up, client, pool = (
        proxy.server,
        proxy.conn,
        proxy.down,
        proxy.up,
        proxy.client,
        proxy.pool,
    )
    cm = server.cluster_manager
    assert cm is not None
    cluster = cm.get("backend")
    assert cluster is not None and cm.get("nope") is None
    host = cluster.hosts[0]

    requests = [
        b"GET /a?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /none HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
    heads = []
    for r in requests:
        conn.data_received(r)
        proxy.flush()
        heads.append(_upstream_head(up.out[-1]))
        client.data_received(_RESPONSE)
        proxy.flush()
    timeout = [] if suppress else [b"x-envoy-expected-rq-timeout-ms: 15000"]
    assert heads == [
        [b"GET /a?q=1 HTTP/1.1", b"host: h", b"x-forwarded-proto: http", *timeout],
        [
            b"POST /b HTTP/1.1",
            b"host: h",
            b"x-forwarded-proto: http",
            *timeout,
            b"content-length: 0",
        ],
        [b"GET /none HTTP/1.1", b"host: h", b"x-forwarded-proto: http"],
    ]
    responses = b"".join(down.out)
    assert responses.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert responses.count(b"x-envoy-upstream-service-time:") == (0 if suppress else 3)
    # One connection served all three; every gauge is back to zero.
    assert pool.idle == [client] and client.requests == 3
    counters = {n: c.value for n, c in server.stats.counters.items() if c.value}
    gauges = server.stats.gauges
    assert {n: v for n, v in counters.items() if n.startswith("cluster.backend.")} == {
        "cluster.backend.membership_change": 1,
        "cluster.backend.upstream_cx_rx_bytes_total": 3 * len(_RESPONSE),
        "cluster.backend.upstream_cx_tx_bytes_total": sum(len(b) for b in up.out),
        "cluster.backend.upstream_rq_total": 3,
        "cluster.backend.upstream_rq_200": 3,
        "cluster.backend.upstream_rq_2xx": 3,
        "cluster.backend.upstream_rq_completed": 3,
        "cluster.backend.external.upstream_rq_200": 3,
        "cluster.backend.external.upstream_rq_2xx": 3,
        "cluster.backend.external.upstream_rq_completed": 3,
    }
    assert counters["http.ingress_http.rq_total"] == 3
    assert gauges["cluster.backend.upstream_rq_active"].value == 0
    for name in ("cluster.backend.upstream_rq_time", "cluster.backend.external.upstream_rq_time"):
        assert server.stats.histograms[name].count == 3
    hs = host.stats
    assert (hs.rq_total.value, hs.rq_active.value, hs.rq_success.value) == (3, 0, 3)
