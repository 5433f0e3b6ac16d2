"""Stats rendering: Envoy's /stats text, JSON and Prometheus formats and tag extraction.

Expected strings come from real Envoy 1.40 output (see test_matches_real_envoy, which
scrapes a live envoy when one is installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from envoy.config.metrics.v3 import stats_pb2

from pyenvoy import stats_render
from pyenvoy.stats import Store
from pyenvoy.stats_render import (
    StatsParams,
    StatsParamsError,
    StatsRender,
    TagProducer,
    fmt_double,
    json_number,
)


def q(**kw: str) -> dict[str, list[str]]:
    return {k: [v] for k, v in kw.items()}


@pytest.fixture
def store() -> Store:
    s = Store()
    s.counter_from_name("cluster.svc.backend.upstream_rq_total").value = 5
    s.counter_from_name("cluster.svc.backend.upstream_rq_200").value = 5
    s.counter_from_name("http.ingress_http.downstream_rq_2xx").value = 3
    s.counter_from_name("http.ingress_http.downstream_rq_5xx")
    s.gauge_from_name("cluster.svc.backend.upstream_cx_active").value = 2
    s.gauge_from_name("server.live").value = 1
    h = s.histogram_from_name("cluster.svc.backend.upstream_rq_time")
    for v in (0, 0, 0, 1, 2):
        h.record(v)
    s.histogram_from_name("http.ingress_http.downstream_rq_time")
    return s


# ---- number formatting ---------------------------------------------------------------


def test_json_number_is_std_to_chars() -> None:
    # Observed in Envoy's /stats?format=json&histogram_buckets=cumulative.
    assert json_number(300000.0) == "3e+05"
    assert json_number(600000.0) == "6e+05"
    assert json_number(1800000.0) == "1800000"
    assert json_number(10000.0) == "10000"
    assert json_number(0.5) == "0.5"
    assert json_number(1.0) == "1"
    assert json_number(0.0) == "0"
    assert json_number(1.0333333333333334) == "1.0333333333333334"
    assert json_number(0.0001) == "1e-04"
    assert json_number(float("nan")) == "null"
    assert json_number(-2.5) == "-2.5"


def test_fmt_double_is_fmt_braces() -> None:
    assert fmt_double(0.0) == "0"
    assert fmt_double(2.05) == "2.05"
    assert fmt_double(18.0) == "18"
    assert fmt_double(float("nan")) == "nan"
    assert fmt_double(1e16) == "1e+16"


# ---- /stats text ---------------------------------------------------------------------


def test_text_sorted_counters_gauges_then_histograms(store: Store) -> None:
    text = StatsRender().text(store)
    lines = text.splitlines()
    assert lines[:6] == [
        "cluster.svc.backend.upstream_cx_active: 2",
        "cluster.svc.backend.upstream_rq_200: 5",
        "cluster.svc.backend.upstream_rq_total: 5",
        "http.ingress_http.downstream_rq_2xx: 3",
        "http.ingress_http.downstream_rq_5xx: 0",
        "server.live: 1",
    ]
    assert lines[6].startswith("cluster.svc.backend.upstream_rq_time: P0(nan,0) P25(nan,")
    assert " P99.5(nan," in lines[6] and lines[6].endswith(")")
    assert lines[7] == "http.ingress_http.downstream_rq_time: No recorded values"
    assert text.endswith("\n") and len(lines) == 8


def test_text_interval_after_flush(store: Store) -> None:
    r = StatsRender()
    r.flush_histograms(store)  # interval = everything so far
    line = r.text(store, StatsParams.parse(q(filter="upstream_rq_time$"))).strip()
    assert line.startswith("cluster.svc.backend.upstream_rq_time: P0(0,0) ")
    r.flush_histograms(store)  # nothing new in the last interval
    line = r.text(store, StatsParams.parse(q(filter="upstream_rq_time$"))).strip()
    assert line.startswith("cluster.svc.backend.upstream_rq_time: P0(nan,0) ")


def test_text_filters(store: Store) -> None:
    r = StatsRender()
    assert r.text(store, StatsParams.parse(q(filter="server"))) == "server.live: 1\n"
    used = r.text(store, StatsParams.parse({"usedonly": [""], "filter": ["ingress"]}))
    assert used == "http.ingress_http.downstream_rq_2xx: 3\n"
    gauges = r.text(store, StatsParams.parse(q(type="Gauges")))
    assert gauges == "cluster.svc.backend.upstream_cx_active: 2\nserver.live: 1\n"
    inverted = r.text(store, StatsParams.parse({"filter": ["cluster"], "invert_filter": [""]}))
    assert "cluster." not in inverted and "server.live: 1\n" in inverted
    assert r.text(store, StatsParams.parse(q(filter="nomatch"))) == ""


def test_text_bucket_modes(store: Store) -> None:
    r = StatsRender()
    p = StatsParams.parse(
        q(type="Histograms", filter="upstream_rq_time", histogram_buckets="cumulative")
    )
    line = r.text(store, p)
    assert line.startswith(
        "cluster.svc.backend.upstream_rq_time: B0.5(0,3) B1(0,4) B5(0,5) B10(0,5)"
    )
    assert line.rstrip().endswith("B1.8e+06(0,5) B3.6e+06(0,5)")
    p = StatsParams.parse(
        q(type="Histograms", filter="upstream_rq_time", histogram_buckets="disjoint")
    )
    assert r.text(store, p).startswith(
        "cluster.svc.backend.upstream_rq_time: B0.5(0,3) B1(0,1) B5(0,1) B10(0,0)"
    )


def test_used_only_counts_a_reset_counter_as_used() -> None:
    s = Store()
    c = s.counter_from_name("a.b")
    c.used = True
    s.counter_from_name("a.c")
    assert StatsRender().text(s, StatsParams.parse({"usedonly": [""]})) == "a.b: 0\n"


# ---- params --------------------------------------------------------------------------


def test_param_errors_use_envoys_texts() -> None:
    with pytest.raises(StatsParamsError) as e:
        StatsParams.parse(q(filter="("))
    assert e.value.message == "Invalid re2 regex: missing ): ("
    with pytest.raises(StatsParamsError) as e:
        StatsParams.parse(q(type="Bogus"))
    assert e.value.message == "invalid &type= param"
    with pytest.raises(StatsParamsError) as e:
        StatsParams.parse(q(format="bogus"))
    assert e.value.message == "usage: /stats?format=(html|active-html|json|prometheus|text)\n\n"
    with pytest.raises(StatsParamsError) as e:
        StatsParams.parse(q(histogram_buckets="bogus"))
    assert e.value.message == (
        "usage: /stats?histogram_buckets=(cumulative|disjoint|detailed|summary|prometheusnative)\n"
    )
    with pytest.raises(StatsParamsError) as e:
        StatsParams.parse(q(histogram_buckets="disjoint"), prometheus=True)
    assert e.value.message == "unsupported prometheus histogram bucket mode"
    # Flags count by presence, only the first value of a parameter counts.
    p = StatsParams.parse({"usedonly": ["false"], "filter": ["a", "b"]})
    assert p.used_only and p.filter is not None and p.filter.pattern == "a"


# ---- JSON ----------------------------------------------------------------------------


def test_json_exact(store: Store) -> None:
    r = StatsRender()
    out = r.json(store, StatsParams.parse(q(filter="server|cluster_added")))
    assert out == '{"stats":[{"name":"server.live","value":1}]}'
    assert r.json(store, StatsParams.parse(q(filter="nomatch"))) == '{"stats":[]}'
    full = json.loads(r.json(store))
    stats = full["stats"]
    assert stats[0] == {"name": "cluster.svc.backend.upstream_cx_active", "value": 2}
    hist = stats[-1]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    names = [h["name"] for h in hist["computed_quantiles"]]
    assert names == ["cluster.svc.backend.upstream_rq_time", "http.ingress_http.downstream_rq_time"]
    first = hist["computed_quantiles"][0]["values"][0]
    assert first == {"cumulative": 0, "interval": None}
    unused = hist["computed_quantiles"][1]["values"]
    assert unused == [{"cumulative": None, "interval": None}] * 10


def test_json_cumulative_buckets(store: Store) -> None:
    p = StatsParams.parse(
        q(type="Histograms", filter="upstream_rq_time", histogram_buckets="cumulative")
    )
    out = StatsRender().json(store, p)
    assert out.startswith(
        '{"stats":[{"histograms":[{"name":"cluster.svc.backend.upstream_rq_time","buckets":['
        '{"upper_bound":0.5,"interval":0,"cumulative":3},{"upper_bound":1,"interval":0,"cumulative":4}'
    )
    assert '{"upper_bound":3e+05,"interval":0,"cumulative":5}' in out
    assert out.endswith('{"upper_bound":3600000,"interval":0,"cumulative":5}]}]}]}')


# ---- tag extraction ------------------------------------------------------------------

# (stat name, Prometheus metric, labels) as printed by Envoy 1.40.
ENVOY_NAMES = [
    ("cluster.x.upstream_rq_total", "envoy_cluster_upstream_rq_total", 'envoy_cluster_name="x"'),
    # A cluster name with dots: Envoy takes the first token only.
    (
        "cluster.svc.backend.upstream_rq_total",
        "envoy_cluster_backend_upstream_rq_total",
        'envoy_cluster_name="svc"',
    ),
    (
        "cluster.svc.backend.external.upstream_rq_200",
        "envoy_cluster_backend_external_upstream_rq",
        'envoy_response_code="200",envoy_cluster_name="svc"',
    ),
    (
        "http.ingress_http.downstream_rq_2xx",
        "envoy_http_downstream_rq_xx",
        'envoy_response_code_class="2",envoy_http_conn_manager_prefix="ingress_http"',
    ),
    (
        "http.in.http.downstream_cx_total",
        "envoy_http_http_downstream_cx_total",
        'envoy_http_conn_manager_prefix="in"',
    ),
    (
        "listener.127.0.0.1_0.http.ingress_http.downstream_rq_2xx",
        "envoy_listener_http_downstream_rq_xx",
        'envoy_response_code_class="2",envoy_http_conn_manager_prefix="ingress_http",'
        'envoy_listener_address="127.0.0.1_0"',
    ),
    (
        "listener.127.0.0.1_0.worker_0.downstream_cx_total",
        "envoy_listener_worker_downstream_cx_total",
        'envoy_worker_id="0",envoy_listener_address="127.0.0.1_0"',
    ),
    (
        "listener.[__1]_8080.downstream_cx_total",
        "envoy_listener_downstream_cx_total",
        'envoy_listener_address="[__1]_8080"',
    ),
    (
        "listener.my.listener.worker_0.downstream_cx_total",
        "envoy_listener_listener_worker_0_downstream_cx_total",
        'envoy_listener_address="my"',
    ),
    ("listener.admin.downstream_cx_total", "envoy_listener_admin_downstream_cx_total", ""),
    (
        "listener.admin.http.admin.downstream_rq_completed",
        "envoy_listener_admin_http_downstream_rq_completed",
        'envoy_http_conn_manager_prefix="admin"',
    ),
    (
        "tcp.tcp.stats.downstream_cx_total",
        "envoy_tcp_stats_downstream_cx_total",
        'envoy_tcp_prefix="tcp"',
    ),
    (
        "vhost.vh.one.vcluster.vc1.upstream_rq_200",
        "envoy_vhost_one_vcluster_vc1_upstream_rq",
        'envoy_response_code="200",envoy_virtual_host="vh"',
    ),
    (
        "thread_local_cluster_manager.worker_0.clusters_inflated",
        "envoy_thread_local_cluster_manager_worker_clusters_inflated",
        'envoy_worker_id="0"',
    ),
    ("server.worker_0.watchdog_miss", "envoy_server_worker_watchdog_miss", 'envoy_worker_id="0"'),
    (
        "http.async-client.no_route",
        "envoy_http_no_route",
        'envoy_http_conn_manager_prefix="async-client"',
    ),
    (
        "envoy.overload_actions.reset_high_memory_stream.count",
        "envoy_envoy_overload_actions_reset_high_memory_stream_count",
        "",
    ),
    ("cluster_manager.cluster_added", "envoy_cluster_manager_cluster_added", ""),
    # From Envoy's tag extractor tests.
    (
        "http.egress_dynamodb_iad.dynamodb.table.bar_table.capacity.Query.__partition_id=ABC1234",
        "envoy_http_dynamodb_table_capacity",
        'envoy_dynamo_partition_id="ABC1234",envoy_dynamo_operation="Query",'
        'envoy_dynamo_table="bar_table",envoy_http_conn_manager_prefix="egress_dynamodb_iad"',
    ),
    (
        "http.rds_connection_manager.rds.agg/route_config.1-23.update_success",
        "envoy_http_rds_update_success",
        'envoy_rds_route_config="agg/route_config.1-23",'
        'envoy_http_conn_manager_prefix="rds_connection_manager"',
    ),
    (
        "cluster.grpc_cluster.grpc.grpc_service_1.grpc_method_1.success",
        "envoy_cluster_grpc_success",
        'envoy_grpc_bridge_method="grpc_method_1",envoy_grpc_bridge_service="grpc_service_1",'
        'envoy_cluster_name="grpc_cluster"',
    ),
    (
        "foo_ratelimiter.http_local_rate_limit.ok",
        "envoy_http_local_rate_limit_ok",
        'envoy_local_http_ratelimit_prefix="foo_ratelimiter"',
    ),
    (
        "mongo.mongo_filter.collection.bar_collection.callsite.baz_callsite.query.scatter_get",
        "envoy_mongo_collection_callsite_query_scatter_get",
        'envoy_mongo_callsite="baz_callsite",envoy_mongo_collection="bar_collection",'
        'envoy_mongo_prefix="mongo_filter"',
    ),
]


@pytest.mark.parametrize(("name", "metric", "labels"), ENVOY_NAMES)
def test_prometheus_names_like_envoy(name: str, metric: str, labels: str) -> None:
    assert StatsRender().prometheus_name(name) == (metric, labels)


def test_token_patterns_remove_the_right_dots() -> None:
    tp = TagProducer()
    assert tp.produce("dns_filter.my_dns_prefix.local_a_record_answers") == (
        "dns_filter.local_a_record_answers",
        (("envoy.dns_filter_prefix", "my_dns_prefix"),),
    )
    assert tp.produce("http.http_prefix.ext_authz.authpfx.denied") == (
        "http.ext_authz.denied",
        (("envoy.ext_authz_prefix", "authpfx"), ("envoy.http_conn_manager_prefix", "http_prefix")),
    )


def test_custom_and_fixed_stats_tags() -> None:
    cfg = stats_pb2.StatsConfig()
    t = cfg.stats_tags.add()
    t.tag_name = "my.tag"
    t.regex = r"^custom\.((.*?)\.)"
    f = cfg.stats_tags.add()
    f.tag_name = "region"
    f.fixed_value = "eu"
    r = StatsRender(TagProducer(cfg, cli_tags=[("foo", "bar")]))
    assert r.prometheus_name("custom.v1.requests") == (
        "envoy_custom_requests",
        'foo="bar",region="eu",my_tag="v1"',
    )
    # Fixed tags come before the prefix-specific ones (checked against envoy --stats-tag).
    assert r.prometheus_name("cluster.svc.upstream_rq_total") == (
        "envoy_cluster_upstream_rq_total",
        'foo="bar",region="eu",envoy_cluster_name="svc"',
    )
    cfg2 = stats_pb2.StatsConfig()
    cfg2.use_all_default_tags.value = False
    bare = StatsRender(TagProducer(cfg2))
    assert bare.prometheus_name("cluster.x.upstream_rq_total") == (
        "envoy_cluster_x_upstream_rq_total",
        "",
    )


def test_label_values_are_escaped() -> None:
    cfg = stats_pb2.StatsConfig()
    t = cfg.stats_tags.add()
    t.tag_name = "odd-name"
    t.fixed_value = 'a"b\\c\nd'
    r = StatsRender(TagProducer(cfg))
    assert r.prometheus_name("x.y") == ("envoy_x_y", 'odd_name="a\\"b\\\\c\\nd"')


def test_extraction_is_cached(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    r = StatsRender()
    first = r.prometheus(store)

    def boom(*a: object, **k: object) -> bool:
        raise AssertionError("regex ran again for a known stat")

    monkeypatch.setattr(stats_render._RegexExtractor, "extract", boom)
    monkeypatch.setattr(stats_render._TokenExtractor, "extract", boom)
    assert r.prometheus(store) == first


# ---- Prometheus output ---------------------------------------------------------------


def test_prometheus_exact(store: Store) -> None:
    out = StatsRender().prometheus(store, StatsParams.parse(q(filter="^cluster|^server")))
    bucket = 'envoy_cluster_backend_upstream_rq_time_bucket{envoy_cluster_name="svc",le="%s"} %d\n'
    buckets = [("0.5", 3), ("1", 4)] + [
        (b, 5)
        for b in "5 10 25 50 100 250 500 1000 2500 5000 10000 30000 60000 300000 600000 "
        "1800000 3600000 +Inf".split()
    ]
    assert out == (
        "# TYPE envoy_cluster_backend_upstream_rq counter\n"
        'envoy_cluster_backend_upstream_rq{envoy_response_code="200",envoy_cluster_name="svc"} 5\n'
        "# TYPE envoy_cluster_backend_upstream_rq_total counter\n"
        'envoy_cluster_backend_upstream_rq_total{envoy_cluster_name="svc"} 5\n'
        "# TYPE envoy_cluster_backend_upstream_cx_active gauge\n"
        'envoy_cluster_backend_upstream_cx_active{envoy_cluster_name="svc"} 2\n'
        "# TYPE envoy_server_live gauge\n"
        "envoy_server_live{} 1\n"
        "# TYPE envoy_cluster_backend_upstream_rq_time histogram\n"
        + "".join(bucket % b for b in buckets)
        + 'envoy_cluster_backend_upstream_rq_time_sum{envoy_cluster_name="svc"} 3\n'
        'envoy_cluster_backend_upstream_rq_time_count{envoy_cluster_name="svc"} 5\n'
    )


def test_prometheus_groups_families_and_sorts_members(store: Store) -> None:
    out = StatsRender().prometheus(store, StatsParams.parse(q(filter="downstream_rq_.xx")))
    assert out == (
        "# TYPE envoy_http_downstream_rq_xx counter\n"
        'envoy_http_downstream_rq_xx{envoy_response_code_class="2",'
        'envoy_http_conn_manager_prefix="ingress_http"} 3\n'
        'envoy_http_downstream_rq_xx{envoy_response_code_class="5",'
        'envoy_http_conn_manager_prefix="ingress_http"} 0\n'
    )


def test_prometheus_summary_mode_uses_interval(store: Store) -> None:
    r = StatsRender()
    p = StatsParams.parse(
        q(filter="downstream_rq_time", histogram_buckets="summary"), prometheus=True
    )
    out = r.prometheus(store, p)
    lines = out.splitlines()
    assert lines[0] == "# TYPE envoy_http_downstream_rq_time summary"
    assert lines[1] == (
        'envoy_http_downstream_rq_time{envoy_http_conn_manager_prefix="ingress_http",quantile="0"} nan'
    )
    assert lines[10].endswith('quantile="1"} nan')
    assert lines[11:] == [
        'envoy_http_downstream_rq_time_sum{envoy_http_conn_manager_prefix="ingress_http"} 0',
        'envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix="ingress_http"} 0',
    ]


def test_prometheus_type_and_usedonly(store: Store) -> None:
    r = StatsRender()
    out = r.prometheus(store, StatsParams.parse({"type": ["Gauges"], "usedonly": [""]}, True))
    assert out.count("# TYPE") == 2 and "counter" not in out and "histogram" not in out


# ---- against a live Envoy ------------------------------------------------------------

ENVOY_CONFIG = """
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: l.one
    stat_prefix: my.listener
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in.http
          route_config:
            name: rc.with.dots
            virtual_hosts:
            - name: vh.one
              domains: ["*"]
              virtual_clusters:
              - name: vc1
                headers: [{name: ":path", string_match: {prefix: "/"}}]
              routes:
              - match: {prefix: "/"}
                route: {cluster: a-b}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: l2
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp.stats
          cluster: svc.backend
  clusters:
  - name: svc.backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: svc.backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}
  - name: a-b
    alt_stat_name: alt.name
    connect_timeout: 1s
    type: STATIC
    load_assignment: {cluster_name: a-b}
"""


def _free_base_id() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_envoy(tmp_path_factory: pytest.TempPathFactory):
    exe = shutil.which("envoy")
    if exe is None:
        pytest.skip("envoy not installed")
    d = tmp_path_factory.mktemp("envoy")
    cfg = d / "envoy.yaml"
    cfg.write_text(ENVOY_CONFIG)
    addr_file = d / "admin.addr"
    proc = subprocess.Popen(
        [
            exe,
            "-c",
            str(cfg),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            str(_free_base_id()),
            "-l",
            "error",
            "--admin-address-path",
            str(addr_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("envoy did not start")
            time.sleep(0.05)
        yield "http://" + addr_file.read_text().strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _names(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in text.splitlines()]  # type: ignore[misc]


def test_matches_real_envoy(live_envoy: str) -> None:
    """Rebuild Envoy's own stats in a Store; our Prometheus rendering must match its."""
    store = Store()
    for name, value in _names(_get(live_envoy + "/stats?type=Counters")):
        store.counter_from_name(name).value = int(value)
    for name, value in _names(_get(live_envoy + "/stats?type=Gauges")):
        store.gauge_from_name(name).value = int(value)
    for name, _ in _names(_get(live_envoy + "/stats?type=Histograms")):
        store.histogram_from_name(name)
    theirs = _get(live_envoy + "/stats/prometheus")
    mine = StatsRender().prometheus(store)

    def shape(text: str) -> list[str]:  # values change between scrapes; names must not
        return [re.sub(r"\} \S+$", "}", line) for line in text.splitlines()]

    assert shape(mine) == shape(theirs)
    assert len(store.counters) > 100
    # And the text format of the same names (sorted the same way).
    text = _get(live_envoy + "/stats?type=Counters&filter=cluster")
    assert [n for n, _ in _names(text)] == [
        n
        for n, _ in _names(
            StatsRender().text(store, StatsParams.parse(q(type="Counters", filter="cluster")))
        )
    ]


def test_json_shape_matches_real_envoy(live_envoy: str) -> None:
    theirs = _get(live_envoy + "/stats?format=json&filter=cluster_manager.cluster_added")
    s = Store()
    s.counter_from_name("cluster_manager.cluster_added").value = 2
    mine = StatsRender().json(s, StatsParams.parse(q(filter="cluster_manager.cluster_added")))
    assert theirs == mine


def test_unused_histogram_text_matches_real_envoy(live_envoy: str) -> None:
    text = _get(live_envoy + "/stats?type=Histograms&filter=refresh_interval_delay")
    s = Store()
    s.histogram_from_name("overload.refresh_interval_delay")
    assert text == StatsRender().text(s) == "overload.refresh_interval_delay: No recorded values\n"
