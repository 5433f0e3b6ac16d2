"""Differential tests: stat names and values after a known request sequence (configs/stats.yaml).

A fresh proxy serves, each on its own downstream connection: 3x 200 (upstream), 1x 404
(no route), 1x 503 (cluster without endpoints: "no healthy upstream"), 1x 500 (upstream).
The counters, their JSON form and their Prometheus names must then match what real
Envoy 1.40 reports (see /work/notes/envoy_facts.md sections 19-21).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.procs import ProxyProcess, exchange

CONFIG = "stats.yaml"

SEQUENCE = [
    ("/echo", 200),
    ("/echo", 200),
    ("/echo", 200),
    ("/nothing", 404),
    ("/nohost", 503),
    ("/status/500", 500),
]


@pytest.fixture(scope="module")
def run(proxy: ProxyProcess) -> dict[str, Any]:
    before = proxy.stats()
    for path, status in SEQUENCE:
        ex = exchange(proxy.listener_port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert ex.response.status == status, ex
    # Poll until the counters that are charged at stream end have settled.
    deadline = time.monotonic() + 5
    stats = proxy.stats()
    while time.monotonic() < deadline and (
        stats.get("http.ingress_http.downstream_rq_completed") != 6
        or stats.get("cluster.backend.upstream_rq_completed") != 4
        or stats.get(f"listener.127.0.0.1_{proxy.listener_port}.downstream_cx_destroy") != 6
    ):
        time.sleep(0.02)
        stats = proxy.stats()
    return {
        "before": before,
        "stats": stats,
        "json": proxy.stats_json(),
        "prom": proxy.prometheus(),
        "listener": f"127.0.0.1_{proxy.listener_port}",
    }


def test_cluster_counters(run: dict[str, Any]) -> None:
    s = run["stats"]
    expected = {
        "cluster.backend.upstream_rq_total": 4,
        "cluster.backend.upstream_rq_completed": 4,
        "cluster.backend.upstream_rq_200": 3,
        "cluster.backend.upstream_rq_2xx": 3,
        "cluster.backend.upstream_rq_500": 1,
        "cluster.backend.upstream_rq_5xx": 1,
        "cluster.backend.upstream_rq_pending_total": 1,
        "cluster.backend.upstream_rq_active": 0,
        "cluster.backend.upstream_cx_total": 1,  # one pooled connection for all 4
        "cluster.backend.upstream_cx_http1_total": 1,
        "cluster.backend.upstream_cx_active": 1,
        "cluster.backend.upstream_cx_connect_fail": 0,
        "cluster.backend.external.upstream_rq_200": 3,
        "cluster.backend.external.upstream_rq_2xx": 3,
        "cluster.backend.external.upstream_rq_500": 1,
        "cluster.backend.external.upstream_rq_5xx": 1,
        "cluster.backend.external.upstream_rq_completed": 4,
        "cluster.backend.membership_healthy": 1,
        "cluster.backend.membership_total": 1,
        # The "no healthy upstream" local reply is charged to the cluster as a 503 ...
        "cluster.empty.upstream_rq_503": 1,
        "cluster.empty.upstream_rq_5xx": 1,
        "cluster.empty.upstream_rq_completed": 1,
        "cluster.empty.upstream_cx_none_healthy": 1,
        # ... but it is not an upstream request.
        "cluster.empty.upstream_rq_total": 0,
        "cluster.empty.upstream_cx_total": 0,
        "cluster.empty.membership_total": 0,
    }
    assert {k: s.get(k) for k in expected} == expected


def test_http_connection_manager_counters(run: dict[str, Any]) -> None:
    s = run["stats"]
    expected = {
        "http.ingress_http.downstream_rq_total": 6,
        "http.ingress_http.downstream_rq_http1_total": 6,
        "http.ingress_http.downstream_rq_http2_total": 0,
        "http.ingress_http.downstream_rq_1xx": 0,
        "http.ingress_http.downstream_rq_2xx": 3,
        "http.ingress_http.downstream_rq_3xx": 0,
        "http.ingress_http.downstream_rq_4xx": 1,
        "http.ingress_http.downstream_rq_5xx": 2,
        "http.ingress_http.downstream_rq_completed": 6,
        "http.ingress_http.downstream_rq_active": 0,
        "http.ingress_http.downstream_cx_total": 6,
        "http.ingress_http.downstream_cx_http1_total": 6,
        "http.ingress_http.downstream_cx_active": 0,
        "http.ingress_http.downstream_cx_destroy": 6,
        # Every client closed its idle keep-alive connection: remote closes (Envoy treats
        # a FIN on a connection without half-close as the peer closing).
        "http.ingress_http.downstream_cx_destroy_remote": 6,
        "http.ingress_http.downstream_cx_destroy_local": 0,
        "http.ingress_http.no_route": 1,
        "http.ingress_http.rq_total": 6,
    }
    assert {k: s.get(k) for k in expected} == expected


def test_listener_counters(run: dict[str, Any]) -> None:
    s = run["stats"]
    lst = f"listener.{run['listener']}"
    expected = {
        f"{lst}.downstream_cx_total": 6,
        f"{lst}.downstream_cx_destroy": 6,
        f"{lst}.downstream_cx_active": 0,
        f"{lst}.no_filter_chain_match": 0,
        f"{lst}.worker_0.downstream_cx_total": 6,
        f"{lst}.http.ingress_http.downstream_rq_2xx": 3,
        f"{lst}.http.ingress_http.downstream_rq_4xx": 1,
        f"{lst}.http.ingress_http.downstream_rq_5xx": 2,
        f"{lst}.http.ingress_http.downstream_rq_completed": 6,
        "listener_manager.total_listeners_active": 1,
        "listener_manager.listener_added": 1,
    }
    assert {k: s.get(k) for k in expected} == expected


def test_per_code_stats_are_created_on_first_use(run: dict[str, Any]) -> None:
    before = run["before"]
    assert "cluster.backend.upstream_rq_200" not in before
    assert "cluster.backend.upstream_rq_2xx" not in before
    assert "cluster.backend.external.upstream_rq_completed" not in before
    # HCM per-class counters exist (as 0) from the start
    for cls in "12345":
        assert before[f"http.ingress_http.downstream_rq_{cls}xx"] == 0


def test_fresh_config_stat_names(run: dict[str, Any]) -> None:
    """A core subset of the stats Envoy creates for one listener, one HCM, one cluster."""
    before = run["before"]
    lst = f"listener.{run['listener']}"
    names = [
        "cluster.backend.upstream_cx_total",
        "cluster.backend.upstream_cx_active",
        "cluster.backend.upstream_cx_connect_fail",
        "cluster.backend.upstream_cx_connect_timeout",
        "cluster.backend.upstream_cx_destroy",
        "cluster.backend.upstream_cx_rx_bytes_total",
        "cluster.backend.upstream_cx_tx_bytes_total",
        "cluster.backend.upstream_rq_total",
        "cluster.backend.upstream_rq_active",
        "cluster.backend.upstream_rq_completed",
        "cluster.backend.upstream_rq_pending_total",
        "cluster.backend.upstream_rq_pending_active",
        "cluster.backend.upstream_rq_pending_overflow",
        "cluster.backend.upstream_rq_timeout",
        "cluster.backend.upstream_rq_retry",
        "cluster.backend.upstream_rq_rx_reset",
        "cluster.backend.upstream_rq_tx_reset",
        "cluster.backend.upstream_cx_none_healthy",
        "cluster.backend.membership_healthy",
        "cluster.backend.membership_total",
        "cluster.backend.membership_change",
        "cluster.backend.lb_healthy_panic",
        "cluster.backend.max_host_weight",
        "cluster.backend.circuit_breakers.default.rq_open",
        "cluster.backend.circuit_breakers.high.cx_open",
        "cluster_manager.active_clusters",
        "cluster_manager.cluster_added",
        "http.ingress_http.downstream_cx_total",
        "http.ingress_http.downstream_cx_active",
        "http.ingress_http.downstream_cx_http1_total",
        "http.ingress_http.downstream_cx_destroy",
        "http.ingress_http.downstream_cx_rx_bytes_total",
        "http.ingress_http.downstream_cx_tx_bytes_total",
        "http.ingress_http.downstream_rq_total",
        "http.ingress_http.downstream_rq_active",
        "http.ingress_http.downstream_rq_http1_total",
        "http.ingress_http.downstream_rq_completed",
        "http.ingress_http.downstream_rq_timeout",
        "http.ingress_http.downstream_rq_too_large",
        "http.ingress_http.no_route",
        "http.ingress_http.no_cluster",
        "http.ingress_http.rq_total",
        "http.ingress_http.rq_redirect",
        "http.ingress_http.rq_direct_response",
        f"{lst}.downstream_cx_total",
        f"{lst}.downstream_cx_active",
        f"{lst}.downstream_cx_destroy",
        f"{lst}.no_filter_chain_match",
        f"{lst}.worker_0.downstream_cx_total",
        f"{lst}.http.ingress_http.downstream_rq_2xx",
        f"{lst}.http.ingress_http.downstream_rq_completed",
        "listener_manager.total_listeners_active",
        "server.live",
        "server.concurrency",
    ]
    missing = [n for n in names if n not in before]
    assert not missing, missing
    assert before["server.live"] == 1
    assert before["server.concurrency"] == 1
    assert before["cluster_manager.active_clusters"] == 2


def test_json_stats_agree_with_plain(run: dict[str, Any]) -> None:
    plain, js = run["stats"], run["json"]
    for name in (
        "cluster.backend.upstream_rq_total",
        "cluster.backend.upstream_rq_2xx",
        "http.ingress_http.downstream_rq_5xx",
        f"listener.{run['listener']}.downstream_cx_total",
    ):
        assert js[name] == plain[name], name


def test_prometheus_names(run: dict[str, Any]) -> None:
    prom = run["prom"]
    la = run["listener"]
    expected = {
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"}': 4,
        'envoy_cluster_upstream_rq_completed{envoy_cluster_name="backend"}': 4,
        'envoy_cluster_upstream_cx_total{envoy_cluster_name="backend"}': 1,
        'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="backend"}': 3,
        'envoy_cluster_upstream_rq{envoy_response_code="500",envoy_cluster_name="backend"}': 1,
        'envoy_cluster_upstream_rq{envoy_response_code="503",envoy_cluster_name="empty"}': 1,
        'envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="backend"}': 3,
        'envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="backend"}': 1,
        'envoy_cluster_external_upstream_rq{envoy_response_code="200",envoy_cluster_name="backend"}': 3,
        'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress_http"}': 6,
        'envoy_http_downstream_rq_xx{envoy_response_code_class="2",envoy_http_conn_manager_prefix="ingress_http"}': 3,
        'envoy_http_downstream_rq_xx{envoy_response_code_class="4",envoy_http_conn_manager_prefix="ingress_http"}': 1,
        'envoy_http_downstream_rq_xx{envoy_response_code_class="5",envoy_http_conn_manager_prefix="ingress_http"}': 2,
        'envoy_http_downstream_cx_total{envoy_http_conn_manager_prefix="ingress_http"}': 6,
        'envoy_http_no_route{envoy_http_conn_manager_prefix="ingress_http"}': 1,
        f'envoy_listener_downstream_cx_total{{envoy_listener_address="{la}"}}': 6,
        (
            'envoy_listener_http_downstream_rq_xx{envoy_response_code_class="2",'
            f'envoy_http_conn_manager_prefix="ingress_http",envoy_listener_address="{la}"}}'
        ): 3,
        "envoy_server_live{}": 1,
    }
    assert {k: prom.get(k) for k in expected} == expected


def test_prometheus_type_lines(proxy: ProxyProcess, run: dict[str, Any]) -> None:
    status, headers, body = proxy.admin("/stats/prometheus")
    text = body.decode()
    assert status == 200
    assert "# TYPE envoy_cluster_upstream_rq_total counter\n" in text
    assert "# TYPE envoy_cluster_upstream_cx_active gauge\n" in text
    assert "# TYPE envoy_cluster_upstream_rq_time histogram\n" in text
    assert 'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="backend",le="0.5"}' in text
    assert 'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="backend",le="+Inf"}' in text
    assert 'envoy_cluster_upstream_rq_time_count{envoy_cluster_name="backend"}' in text
