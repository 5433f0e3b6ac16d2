"""Cluster manager, load balancers and host sets."""

from __future__ import annotations

import collections

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf.json_format import ParseDict

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import Store
from pyenvoy.upstream.cluster_manager import ClusterManager
from pyenvoy.upstream.host import FAILED_ACTIVE_HC


def cluster(name: str = "c", type_: str = "STATIC", lb: str = "ROUND_ROBIN", endpoints=None, **extra):
    eps = endpoints if endpoints is not None else [("127.0.0.1", 9000, 1), ("127.0.0.1", 9001, 1)]
    d = {
        "name": name,
        "type": type_,
        "lb_policy": lb,
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}},
                            "load_balancing_weight": w,
                        }
                        for a, p, w in eps
                    ]
                }
            ],
        },
        **extra,
    }
    return ParseDict(d, Cluster())


def test_static_round_robin_spreads_evenly() -> None:
    cm = ClusterManager([cluster()], Store())
    c = cm.get("c")
    assert c is not None and c.info.connect_timeout == 0.25
    counts = collections.Counter(c.choose_host().address[1] for _ in range(1000))
    assert counts == {9000: 500, 9001: 500}


def test_weighted_round_robin_follows_weights() -> None:
    cm = ClusterManager([cluster(endpoints=[("127.0.0.1", 1, 1), ("127.0.0.1", 2, 3)])], Store())
    c = cm.get("c")
    counts = collections.Counter(c.choose_host().address[1] for _ in range(400))
    assert counts == {1: 100, 2: 300}


def test_unhealthy_host_leaves_the_lb_set() -> None:
    cm = ClusterManager([cluster()], Store())
    c = cm.get("c")
    c.hosts[0].health_flags |= FAILED_ACTIVE_HC
    c.refresh_health()
    assert {c.choose_host().address[1] for _ in range(10)} == {9001}
    assert c.hosts[0].health_flags_text() == "/failed_active_hc"
    # Below the 50% healthy_panic_threshold Envoy balances over every host (panic mode).
    c.hosts[1].health_flags |= FAILED_ACTIVE_HC
    c.refresh_health()
    assert {c.choose_host().address[1] for _ in range(10)} == {9000, 9001}
    assert c.info.stats.lb_healthy_panic.value == 10


def test_empty_cluster_has_no_host_and_counts_panic() -> None:
    cm = ClusterManager([cluster(endpoints=[])], Store())
    c = cm.get("c")
    assert c.choose_host() is None
    assert c.info.stats.lb_healthy_panic.value == 1


def test_stats_have_envoy_names() -> None:
    store = Store()
    ClusterManager([cluster("backend")], store)
    assert "cluster.backend.upstream_rq_total" in store.counters
    assert "cluster.backend.upstream_cx_active" in store.gauges
    assert store.gauges["cluster.backend.membership_total"].value == 2
    assert store.gauges["cluster_manager.active_clusters"].value == 1


def test_static_cluster_rejects_hostnames() -> None:
    with pytest.raises(ConfigError) as e:
        ClusterManager([cluster(endpoints=[("localhost", 80, 1)])], Store())
    assert "malformed IP address: localhost" in str(e.value)
    assert "static_resources.clusters[0].load_assignment" in str(e.value)


def test_unsupported_lb_policy_is_an_error() -> None:
    with pytest.raises(ConfigError, match="cluster provided LB specified but cluster 'c' did not provide one"):
        ClusterManager([cluster(lb="CLUSTER_PROVIDED")], Store())


def test_duplicate_cluster_names() -> None:
    with pytest.raises(ConfigError, match="duplicate cluster 'c'"):
        ClusterManager([cluster(), cluster()], Store())


async def test_strict_dns_resolves_localhost() -> None:
    cm = ClusterManager(
        [cluster(type_="STRICT_DNS", endpoints=[("localhost", 8080, 1)], dns_lookup_family="V4_ONLY")],
        Store(),
    )
    c = cm.get("c")
    assert c.hosts == []
    await cm.initialize()
    try:
        assert [h.address for h in c.hosts] == [("127.0.0.1", 8080)]
        assert c.hosts[0].hostname == "localhost"
    finally:
        cm.close()


async def test_logical_dns_keeps_one_host() -> None:
    cm = ClusterManager(
        [cluster(type_="LOGICAL_DNS", endpoints=[("localhost", 8080, 1)], dns_lookup_family="V4_ONLY")],
        Store(),
    )
    await cm.initialize()
    try:
        assert len(cm.get("c").hosts) == 1
    finally:
        cm.close()
