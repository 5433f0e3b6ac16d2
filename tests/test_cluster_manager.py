"""Cluster manager, load balancers and host sets."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf.json_format import ParseDict

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import Store
from pyenvoy.upstream import cluster_manager as cm_mod
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


# --- worker processes: the main process resolves DNS, workers take its answers ----------------


class DnsMainAndWorker:
    """A main-process ClusterManager that resolves and a worker's that does not, linked the
    way WorkerPool links them (a DnsPublisher whose messages go through JSON into the
    worker's RemoteDns), in one process."""

    def __init__(self, proto: Cluster) -> None:
        self.main = ClusterManager([proto], Store())
        self.worker = ClusterManager([proto], Store())
        self.remote = cm_mod.RemoteDns()
        self.worker.use_remote_dns(self.remote)
        self.messages: list[dict[str, Any]] = []
        self.publisher = cm_mod.DnsPublisher(self.main, self._send)

    def _send(self, msg: dict[str, Any]) -> None:
        msg = json.loads(json.dumps(msg))  # what the control socket carries
        self.messages.append(msg)
        self.remote.update(msg)

    def close(self) -> None:
        self.publisher.close()
        self.main.close()
        self.worker.close()


def dns_cluster(type_: str = "STRICT_DNS", **extra: Any) -> Cluster:
    return cluster(
        type_=type_,
        endpoints=[("localhost", 9000, 1)],
        dns_refresh_rate="0.05s",
        dns_lookup_family="V4_ONLY",
        **extra,
    )


async def until(pred: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("type_", ["STRICT_DNS", "LOGICAL_DNS"])
async def test_worker_takes_dns_answers_from_the_main_process(
    type_: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = DnsMainAndWorker(dns_cluster(type_))
    mc, wc = pair.main.get("c"), pair.worker.get("c")
    assert mc is not None and wc is not None
    lookups: list[str] = []
    real_lookup = cm_mod.Cluster._lookup

    async def counting_lookup(self: Any, loop: Any, name: str, port: int) -> list[str]:
        lookups.append("main" if self is mc else "worker")
        return await real_lookup(self, loop, name, port)

    monkeypatch.setattr(cm_mod.Cluster, "_lookup", counting_lookup)
    try:
        # The worker's init holds until the main process's first answer arrived.
        worker_init = asyncio.ensure_future(pair.worker.initialize())
        await asyncio.sleep(0.1)
        assert not worker_init.done() and wc.hosts == []
        await pair.main.initialize()
        await asyncio.wait_for(worker_init, 2)
        assert [h.address for h in wc.hosts] == [("127.0.0.1", 9000)]
        assert wc.hosts[0].hostname == "localhost"
        assert pair.messages[0]["op"] == cm_mod.DNS_HOSTS_OP
        assert list(pair.messages[0]["clusters"]["c"].values()) == [
            [["localhost", 9000, ["127.0.0.1"]]]
        ]
        # The main process refreshes every 50 ms; an unchanged answer sends nothing.
        await until(lambda: lookups.count("main") >= 4)
        assert "worker" not in lookups and wc._refresh_handle is None
        assert len(pair.messages) == 1
        wstats, mstats = wc.info.stats, mc.info.stats
        assert mstats.update_attempt.value >= 4 and mstats.update_success.value >= 3
        assert wstats.update_attempt.value == wstats.update_success.value == 0

        # A changed answer reaches the worker through the same apply_resolution.
        async def moved(self: Any, loop: Any, name: str, port: int) -> list[str]:
            return ["127.0.0.2", "127.0.0.3"]

        monkeypatch.setattr(cm_mod.Cluster, "_lookup", moved)
        want = ["127.0.0.2"] if type_ == "LOGICAL_DNS" else ["127.0.0.2", "127.0.0.3"]
        await until(lambda: [h.address[0] for h in wc.hosts] == want)
        assert [h.address[0] for h in mc.hosts] == want
        assert wc.info.stats.membership_total.value == len(want)
        assert len(pair.messages) == 2

        # A failed lookup keeps the last good answer in both.
        async def failing(self: Any, loop: Any, name: str, port: int) -> list[str]:
            raise OSError("no such host")

        monkeypatch.setattr(cm_mod.Cluster, "_lookup", failing)
        failures = mstats.update_failure.value
        await until(lambda: mstats.update_failure.value >= failures + 2)
        assert [h.address[0] for h in wc.hosts] == want and len(pair.messages) == 2
    finally:
        pair.close()


async def test_worker_dns_answers_follow_the_cluster_config() -> None:
    """A replaced cluster (reload, CDS) takes only answers for its own config; a new
    worker gets the current state in its snapshot and warms at once."""
    pair = DnsMainAndWorker(dns_cluster())
    try:
        await pair.main.initialize()
        await pair.worker.initialize()
        # The worker reloads first: its new cluster (another port) waits for the main's.
        changed = cluster(
            endpoints=[("localhost", 9100, 1)],
            type_="STRICT_DNS",
            dns_refresh_rate="0.05s",
            dns_lookup_family="V4_ONLY",
        )
        wnew = pair.worker.build_cluster(changed, "x")
        warm = asyncio.ensure_future(pair.worker.warm([wnew]))
        await asyncio.sleep(0.1)
        assert not warm.done() and wnew.hosts == []
        mnew = pair.main.build_cluster(changed, "x")
        await pair.main.warm([mnew])
        await asyncio.wait_for(warm, 2)
        assert [h.address for h in wnew.hosts] == [("127.0.0.1", 9100)]
        old = pair.worker.get("c")
        assert old is not None and [h.address for h in old.hosts] == [("127.0.0.1", 9000)]
        pair.main.commit(mnew)
        pair.worker.commit(wnew)
        await asyncio.sleep(0.05)
        assert list(pair.messages[-1]["clusters"]["c"].values()) == [
            [["localhost", 9100, ["127.0.0.1"]]]
        ]
        # A worker that starts now gets the state in its init frame: no wait.
        late = ClusterManager([changed], Store())
        remote = cm_mod.RemoteDns()
        late.use_remote_dns(remote)
        remote.update(json.loads(json.dumps(pair.publisher.snapshot())))
        await asyncio.wait_for(late.initialize(), 1)
        lc = late.get("c")
        assert lc is not None and [h.address for h in lc.hosts] == [("127.0.0.1", 9100)]
        late.close()
    finally:
        pair.close()
