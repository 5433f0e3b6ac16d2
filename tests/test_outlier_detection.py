"""Outlier detection (pyenvoy/upstream/outlier_detection.py).

End-to-end tests embed a pyenvoy.Proxy in front of upstreams that fail on purpose (503s,
refused connections, hanging responses) and check ejection, un-ejection, the
``cluster.<c>.outlier_detection.*`` stats and the admin /clusters page. The sweep's
arithmetic (success rate, failure percentage, backoff) is driven directly with a fake clock.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto
from google.protobuf.json_format import ParseDict

import pyenvoy
from pyenvoy.config import ConfigError
from pyenvoy.stats import Store
from pyenvoy.upstream.cluster_manager import Cluster, ClusterManager
from pyenvoy.upstream.host import FAILED_OUTLIER_CHECK
from pyenvoy.upstream.outlier_detection import OutlierDetectionStats, OutlierDetector
from tests.support.upstream import HttpUpstream

R503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
R500 = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def cluster_dict(ports: list[int], od: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "c",
        "connect_timeout": "0.5s",
        "type": "STATIC",
        "outlier_detection": od,
        "load_assignment": {
            "cluster_name": "c",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": p}
                                }
                            }
                        }
                        for p in ports
                    ]
                }
            ],
        },
        **extra,
    }


def bootstrap(cluster: dict[str, Any], route_timeout: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": "c"}
    if route_timeout:
        route["timeout"] = route_timeout
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "front",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {"match": {"prefix": "/"}, "route": route}
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


class Running:
    def __init__(self, proxy: pyenvoy.Proxy) -> None:
        self.proxy = proxy
        self.client = httpx.AsyncClient(timeout=5)

    async def get(self, path: str = "/x") -> int:
        return (await self.client.get(f"http://127.0.0.1:{self.proxy.port()}{path}")).status_code

    async def clusters_text(self) -> str:
        r = await self.client.get(f"http://127.0.0.1:{self.proxy.admin_port}/clusters")
        assert r.status_code == 200
        return r.text

    async def flags(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for line in (await self.clusters_text()).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "c" and parts[2] == "health_flags":
                out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
        return out

    def od(self) -> dict[str, int]:
        prefix = "cluster.c.outlier_detection."
        return {
            k[len(prefix) :]: v for k, v in self.proxy.stats().items() if k.startswith(prefix) and v
        }

    async def eventually(self, pred: Callable[[], Any], timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = pred()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            if loop.time() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            await asyncio.sleep(0.01)


@pytest.fixture
async def running() -> Any:
    made: list[Running] = []

    async def factory(cluster: dict[str, Any], route_timeout: str | None = None) -> Running:
        proxy = pyenvoy.Proxy(bootstrap(cluster, route_timeout))
        await proxy.start()
        r = Running(proxy)
        made.append(r)
        return r

    yield factory
    for r in made:
        await r.client.aclose()
        await r.proxy.stop()


@pytest.fixture
def upstreams() -> Iterator[Callable[[], HttpUpstream]]:
    made: list[HttpUpstream] = []

    def make() -> HttpUpstream:
        u = HttpUpstream()
        u.start()
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- end to end -------------------------------------------------------------------------------


async def test_consecutive_5xx_ejection_and_return(running: Any, upstreams: Any) -> None:
    good, bad = upstreams(), upstreams()
    bad.raw_responses["/x"] = R503
    r: Running = await running(
        cluster_dict(
            [good.port, bad.port],
            {
                "consecutive_5xx": 3,
                "interval": "0.1s",
                "base_ejection_time": "0.3s",
                "max_ejection_percent": 50,
            },
        )
    )
    codes = [await r.get() for _ in range(8)]
    assert codes.count(503) == 3  # ejected right after the third 503
    assert codes[6:] == [200, 200]
    assert r.od() == {
        "ejections_active": 1,
        "ejections_consecutive_5xx": 1,
        "ejections_detected_consecutive_5xx": 1,
        "ejections_enforced_consecutive_5xx": 1,
        "ejections_enforced_total": 1,
        "ejections_total": 1,
    }
    text = await r.clusters_text()
    assert f"c::127.0.0.1:{bad.port}::health_flags::/failed_outlier_check\n" in text
    assert f"c::127.0.0.1:{good.port}::health_flags::healthy\n" in text
    stats = r.proxy.stats()
    assert stats["cluster.c.membership_healthy"] == 1
    before = bad.request_count
    assert [await r.get() for _ in range(4)] == [200] * 4
    assert bad.request_count == before
    # Back after base_ejection_time (checked on the 100 ms sweep).
    await r.eventually(lambda: "ejections_active" not in r.od())
    assert (await r.flags())[bad.port] == "healthy"
    # The counters were reset on return: 2 more 503s do not eject, a third does (ejected
    # twice now, so for 2 x base_ejection_time).
    codes = [await r.get() for _ in range(6)]
    assert codes.count(503) == 3
    assert r.od()["ejections_enforced_consecutive_5xx"] == 2


async def test_default_max_ejection_percent_overflows_with_two_hosts(
    running: Any, upstreams: Any
) -> None:
    good, bad = upstreams(), upstreams()
    bad.raw_responses["/x"] = R503
    r: Running = await running(
        cluster_dict([good.port, bad.port], {"consecutive_5xx": 2, "interval": "1s"})
    )
    codes = [await r.get() for _ in range(8)]
    assert codes.count(503) == 4
    # 503 is a gateway failure too (default threshold 5: not reached); both tries overflow.
    assert r.od() == {
        "ejections_consecutive_5xx": 2,
        "ejections_detected_consecutive_5xx": 2,
        "ejections_overflow": 2,
    }
    assert await r.flags() == {good.port: "healthy", bad.port: "healthy"}


async def test_always_eject_one_host(running: Any, upstreams: Any) -> None:
    good, bad = upstreams(), upstreams()
    bad.raw_responses["/x"] = R500
    r: Running = await running(
        cluster_dict(
            [good.port, bad.port],
            {"consecutive_5xx": 2, "interval": "1s", "always_eject_one_host": True},
        )
    )
    codes = [await r.get() for _ in range(6)]
    assert codes.count(500) == 2
    assert r.od()["ejections_active"] == 1
    assert "ejections_detected_consecutive_gateway_failure" not in r.od()  # 500 is no gateway error


async def test_connect_failures_count_as_503(running: Any, upstreams: Any) -> None:
    good = upstreams()
    dead = dead_port()
    r: Running = await running(
        cluster_dict(
            [good.port, dead],
            {
                "consecutive_5xx": 100,
                "consecutive_gateway_failure": 2,
                "enforcing_consecutive_gateway_failure": 100,
                "interval": "1s",
                "max_ejection_percent": 50,
            },
        )
    )
    codes = [await r.get() for _ in range(6)]
    assert codes.count(503) == 2
    assert r.od() == {
        "ejections_active": 1,
        "ejections_detected_consecutive_gateway_failure": 1,
        "ejections_enforced_consecutive_gateway_failure": 1,
        "ejections_enforced_total": 1,
    }
    assert (await r.flags())[dead] == "/failed_outlier_check"


async def test_split_local_origin_errors(running: Any, upstreams: Any) -> None:
    good, bad = upstreams(), upstreams()
    bad.raw_responses["/x"] = R503
    dead = dead_port()
    r: Running = await running(
        cluster_dict(
            [good.port, bad.port, dead],
            {
                "split_external_local_origin_errors": True,
                "consecutive_local_origin_failure": 2,
                "consecutive_5xx": 100,
                "consecutive_gateway_failure": 100,
                "interval": "1s",
                "max_ejection_percent": 100,
            },
        )
    )
    codes = [await r.get() for _ in range(9)]
    assert codes.count(503) >= 5  # two refused, the rest from "bad"
    od = r.od()
    assert od["ejections_detected_consecutive_local_origin_failure"] == 1
    assert od["ejections_enforced_consecutive_local_origin_failure"] == 1
    flags = await r.flags()
    assert flags[dead] == "/failed_outlier_check"
    assert flags[bad.port] == "healthy"  # 503 responses are no local-origin failures


async def test_route_timeouts_are_gateway_failures(running: Any, upstreams: Any) -> None:
    a, b = upstreams(), upstreams()
    r: Running = await running(
        cluster_dict(
            [a.port, b.port],
            {
                "consecutive_gateway_failure": 2,
                "enforcing_consecutive_gateway_failure": 100,
                "interval": "1s",
                "max_ejection_percent": 50,
            },
        ),
        route_timeout="0.1s",
    )
    # Both hosts answer too slowly for the 100 ms route timeout (504 = gateway failure).
    assert [await r.get("/delay/400") for _ in range(4)] == [504] * 4
    # Both hosts timed out twice: one is ejected, the second would exceed 50%.
    od = r.od()
    assert od["ejections_detected_consecutive_gateway_failure"] == 2
    assert od["ejections_enforced_consecutive_gateway_failure"] == 1
    assert od["ejections_overflow"] == 1


async def test_success_rate_value_on_clusters_page(running: Any, upstreams: Any) -> None:
    ups = [upstreams() for _ in range(3)]
    ups[2].raw_responses["/x"] = R500
    r: Running = await running(
        cluster_dict(
            [u.port for u in ups],
            {
                "consecutive_5xx": 1000,
                "interval": "0.2s",
                "success_rate_minimum_hosts": 3,
                "success_rate_request_volume": 3,
                "success_rate_stdev_factor": 1000,
                "max_ejection_percent": 100,
            },
        )
    )
    server = r.proxy.server
    assert server is not None and server.cluster_manager is not None
    detector = server.cluster_manager.clusters["c"].outlier
    # Enough traffic inside one interval: 100%, 100%, 0% -> mean 66.7, stdev 47.1,
    # threshold 66.7 - 1.0 * 47.1 = 19.5: the third host is ejected on the sweep.
    for _ in range(12):
        await r.get()
    await r.eventually(lambda: r.od().get("ejections_enforced_success_rate") == 1, 2)
    assert r.od()["ejections_detected_success_rate"] == 1
    assert (await r.flags())[ups[2].port] == "/failed_outlier_check"
    assert round(detector.success_rate_average, 3) == 66.667
    assert round(detector.success_rate_ejection_threshold, 3) == 19.526


# --- the sweep, driven directly ------------------------------------------------------------------


def make_cluster(n: int, od: dict[str, Any]) -> tuple[Cluster, OutlierDetector]:
    cm = ClusterManager(
        [ParseDict(cluster_dict([9000 + i for i in range(n)], od), ClusterProto())], Store()
    )
    c = cm.get("c")
    assert c is not None
    return c, c.outlier


def feed(d: OutlierDetector, c: Cluster, per_host: list[tuple[int, int]]) -> None:
    """per_host[i] = (successes, failures) for host i, reported as 200 / 500."""
    for host, (ok, bad) in zip(c.hosts, per_host, strict=True):
        for _ in range(ok):
            d.on_upstream_response(host, 200)
        for _ in range(bad):
            d.on_upstream_response(host, 500)


def test_success_rate_ejection_math() -> None:
    c, d = make_cluster(
        5, {"consecutive_5xx": 1000, "success_rate_request_volume": 10, "max_ejection_percent": 100}
    )
    feed(d, c, [(10, 0), (10, 0), (10, 0), (10, 0), (5, 5)])
    d.sweep(1000.0)
    # Envoy's documented example: rates {50,100,100,100,100}: mean 90, stdev 20,
    # threshold 90 - 1.9 * 20 = 52.
    assert d.success_rate_average == 90.0
    assert d.success_rate_ejection_threshold == pytest.approx(52.0)
    assert c.hosts[4].health_flags & FAILED_OUTLIER_CHECK
    assert c.hosts[4].outlier.success_rate == 50.0
    assert c.hosts[0].outlier.success_rate == 100.0
    st = d.stats
    assert (st.ejections_detected_success_rate.value, st.ejections_enforced_success_rate.value) == (
        1,
        1,
    )
    assert st.ejections_success_rate.value == 1 and st.ejections_total.value == 1
    # The next sweep judges the (empty) interval after it: nothing to say.
    d.sweep(1000.1)
    assert d.success_rate_average == -1.0
    assert c.hosts[0].outlier.success_rate == -1.0


def test_success_rate_needs_volume_and_hosts() -> None:
    c, d = make_cluster(5, {"consecutive_5xx": 1000, "success_rate_request_volume": 10})
    feed(d, c, [(9, 0), (9, 0), (9, 0), (9, 0), (0, 9)])
    d.sweep(1000.0)
    assert d.success_rate_average == -1.0
    assert not any(h.health_flags for h in c.hosts)
    c, d = make_cluster(4, {"consecutive_5xx": 1000, "success_rate_request_volume": 10})
    feed(d, c, [(10, 0), (10, 0), (10, 0), (0, 10)])
    d.sweep(1000.0)
    assert d.success_rate_average == -1.0  # only 4 hosts (< success_rate_minimum_hosts 5)


def test_failure_percentage_ejection_and_enforcement() -> None:
    od = {
        "consecutive_5xx": 1000,
        "failure_percentage_minimum_hosts": 2,
        "failure_percentage_request_volume": 4,
        "failure_percentage_threshold": 50,
        "max_ejection_percent": 100,
    }
    c, d = make_cluster(3, od)
    feed(d, c, [(4, 0), (2, 2), (1, 3)])
    d.sweep(1000.0)
    st = d.stats
    # enforcing_failure_percentage defaults to 0: detected, not ejected.
    assert st.ejections_detected_failure_percentage.value == 2
    assert st.ejections_enforced_total.value == 0
    assert not any(h.health_flags for h in c.hosts)
    c, d = make_cluster(3, {**od, "enforcing_failure_percentage": 100})
    feed(d, c, [(4, 0), (2, 2), (1, 3)])
    d.sweep(1000.0)
    assert [bool(h.health_flags) for h in c.hosts] == [False, True, True]
    assert d.stats.ejections_enforced_failure_percentage.value == 2
    assert d.stats.ejections_active.value == 2


def test_ejection_time_grows_caps_and_decays() -> None:
    c, d = make_cluster(
        2,
        {
            "consecutive_5xx": 1,
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_time": "25s",
            "max_ejection_percent": 100,
        },
    )
    h = c.hosts[0]
    m = h.outlier

    def eject() -> float:
        d.on_upstream_response(h, 500)
        assert h.health_flags & FAILED_OUTLIER_CHECK
        return float(m.last_ejection_time)

    t = eject()
    assert m.eject_time_backoff == 1 and m.num_ejections == 1
    d.sweep(t + 9.9)
    assert h.health_flags & FAILED_OUTLIER_CHECK
    d.sweep(t + 10.0)
    assert not h.health_flags & FAILED_OUTLIER_CHECK
    t = eject()  # again at once: 2 x base
    assert m.eject_time_backoff == 2
    d.sweep(t + 19.9)
    assert h.health_flags & FAILED_OUTLIER_CHECK
    d.sweep(t + 20.0)
    assert not h.health_flags
    t = eject()  # 3 x base = 30 s, capped at max_ejection_time 25 s
    assert m.eject_time_backoff == 3
    d.sweep(t + 24.9)
    assert h.health_flags & FAILED_OUTLIER_CHECK
    d.sweep(t + 25.0)
    assert not h.health_flags
    # Healthy sweeps at least one interval after the return decay the backoff.
    back = t + 25.0
    d.sweep(back + 0.5)
    assert m.eject_time_backoff == 3
    d.sweep(back + 1.0)
    d.sweep(back + 2.0)
    assert m.eject_time_backoff == 1
    d.sweep(back + 3.0)
    d.sweep(back + 4.0)
    assert m.eject_time_backoff == 0
    assert m.num_ejections == 3


def test_jitter_bounds() -> None:
    c, d = make_cluster(
        2, {"consecutive_5xx": 1, "max_ejection_percent": 100, "max_ejection_time_jitter": "0.05s"}
    )
    h = c.hosts[0]
    seen = set()
    for _ in range(60):
        d.on_upstream_response(h, 500)
        seen.add(h.outlier.jitter_ms)
        d.sweep(h.outlier.last_ejection_time + 1000)
        assert not h.health_flags
    assert min(seen) >= 0 and max(seen) <= 50 and len(seen) > 5


def test_enforcing_zero_detects_without_ejecting() -> None:
    c, d = make_cluster(
        2, {"consecutive_5xx": 2, "enforcing_consecutive_5xx": 0, "max_ejection_percent": 100}
    )
    h = c.hosts[0]
    for _ in range(4):
        d.on_upstream_response(h, 502)
    st = d.stats
    assert st.ejections_detected_consecutive_5xx.value == 2
    assert st.ejections_total.value == 2  # the deprecated counter counts before enforcement
    assert st.ejections_enforced_total.value == 0
    assert not h.health_flags


def test_success_resets_consecutive_counters() -> None:
    c, d = make_cluster(2, {"consecutive_5xx": 3, "max_ejection_percent": 100})
    h = c.hosts[0]
    for code in (500, 500, 200, 500, 500):
        d.on_upstream_response(h, code)
    assert not h.health_flags
    d.on_upstream_response(h, 500)
    assert h.health_flags & FAILED_OUTLIER_CHECK


def test_local_origin_failures_without_split() -> None:
    c, d = make_cluster(
        2,
        {
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "max_ejection_percent": 100,
        },
    )
    h = c.hosts[0]
    d.on_local_origin_failure(h, "remote connection failure")
    d.on_local_origin_failure(h, "overflow")  # circuit breaking is not the host's fault
    d.on_local_origin_failure(h, "timeout")
    assert not h.health_flags
    d.on_local_origin_failure(h, "connection termination")
    assert h.health_flags & FAILED_OUTLIER_CHECK
    assert d.stats.ejections_enforced_consecutive_gateway_failure.value == 1
    assert h.outlier.ext_total == 3


def test_removed_host_is_not_counted() -> None:
    c, d = make_cluster(3, {"consecutive_5xx": 1, "max_ejection_percent": 100})
    h0, h1, h2 = c.hosts
    d.on_upstream_response(h0, 500)
    assert d.stats.ejections_active.value == 1
    c.set_hosts([h1, h2])
    d.sweep(0.0)
    assert d.stats.ejections_active.value == 0
    d.on_upstream_response(h0, 500)  # a straggler response from a removed host
    assert d.stats.ejections_detected_consecutive_5xx.value == 1


def test_stat_names_match_envoy() -> None:
    c, d = make_cluster(1, {})
    names = sorted(n for n in c.info.stats.scope.store.counters if ".outlier_detection." in n)
    assert names == sorted(
        f"cluster.c.outlier_detection.{n}" for n in OutlierDetectionStats.COUNTERS
    )
    assert "cluster.c.outlier_detection.ejections_active" in c.info.stats.scope.store.gauges
    assert len(OutlierDetectionStats.COUNTERS) == 20


def test_config_defaults_and_errors() -> None:
    c, d = make_cluster(1, {})
    cfg = d.config
    assert (cfg.interval_ms, cfg.base_ejection_time_ms, cfg.max_ejection_time_ms) == (
        10000,
        30000,
        300000,
    )
    assert (cfg.consecutive_5xx, cfg.consecutive_gateway_failure, cfg.max_ejection_percent) == (
        5,
        5,
        10,
    )
    assert (
        cfg.enforcing["consecutive_gateway_failure"] == 0 and cfg.enforcing["success_rate"] == 100
    )
    c, d = make_cluster(1, {"base_ejection_time": "400s"})
    assert d.config.max_ejection_time_ms == 400000
    with pytest.raises(
        ConfigError, match="max_ejection_time cannot be smaller than base_ejection_time"
    ):
        make_cluster(1, {"base_ejection_time": "10s", "max_ejection_time": "5s"})


def test_tcp_style_connect_results() -> None:
    """tcp_proxy reports connect success (final) and connect failures."""
    c, d = make_cluster(2, {"consecutive_5xx": 2, "max_ejection_percent": 100})
    h = c.hosts[0]
    d.on_local_origin_failure(h, "remote connection failure")
    d.on_local_origin_success(h)  # a 200: resets the consecutive counters
    d.on_local_origin_failure(h, "remote connection failure")
    assert not h.health_flags
    d.on_local_origin_failure(h, "connection timeout")  # a connect timeout is a 503 too
    assert h.health_flags & FAILED_OUTLIER_CHECK
    assert (h.outlier.ext_success, h.outlier.ext_total) == (1, 4)
    c, d = make_cluster(
        2,
        {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "max_ejection_percent": 100,
        },
    )
    h = c.hosts[0]
    d.on_local_origin_failure(h, "remote connection failure")
    d.on_local_origin_success(h)
    d.on_local_origin_failure(h, "remote connection failure")
    assert not h.health_flags
    d.on_local_origin_failure(h, "timeout")
    assert h.health_flags & FAILED_OUTLIER_CHECK
    assert h.outlier.ext_total == 0 and h.outlier.local_total == 4


async def test_tcp_proxy_results_map_like_envoy() -> None:
    """The results tcp_proxy reports, as Envoy's putResultNoLocalExternalSplit maps them:
    LocalOriginConnectFailed -> 503 (a 5xx and a gateway failure), LocalOriginTimeout -> 504,
    LocalOriginConnectSuccessFinal -> 200. The first report arms the interval sweep."""
    c, d = make_cluster(
        2,
        {"consecutive_5xx": 3, "consecutive_gateway_failure": 2, "max_ejection_percent": 100},
    )
    d.stop()
    d._stopped = False  # as before start(): the first result arms the timer
    h = c.hosts[0]
    d.on_local_origin_success(h, True)
    assert d._timer is not None
    m = h.outlier
    assert (m.ext_success, m.ext_total) == (1, 1)
    d.on_local_origin_failure(h, "connect_failed")
    assert (m.consecutive_5xx, m.consecutive_gateway_failure) == (1, 1)
    d.on_local_origin_failure(h, "timeout")
    assert (m.consecutive_5xx, m.consecutive_gateway_failure) == (2, 0)  # reset on detection
    assert d.stats.ejections_detected_consecutive_gateway_failure.value == 1
    assert not h.health_flags  # enforcing_consecutive_gateway_failure defaults to 0
    d.on_local_origin_failure(h, "connect_failed")
    assert h.health_flags & FAILED_OUTLIER_CHECK
    assert d.stats.ejections_enforced_consecutive_5xx.value == 1
    assert m.ext_total == 4 and m.local_total == 0
    d.stop()
