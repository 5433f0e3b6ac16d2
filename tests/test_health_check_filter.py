"""health_check HTTP filter: config validation, header matchers, and the filter driven with
fake stream callbacks. Expected headers, details, flags and stats are what Envoy 1.40 does
(observed with curl against real Envoy; see the module docstring of health_check.py).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2
from google.protobuf import json_format

from pyenvoy.config.errors import ConfigError
from pyenvoy.extensions import registry
from pyenvoy.extensions.filters.http.health_check import (
    TYPE_URL,
    HealthCheckConfig,
    HealthCheckFilter,
    health_check_factory,
)
from pyenvoy.extensions.filters.http.health_check.matcher import compile_header_matcher
from pyenvoy.extensions.registry import FactoryContext
from pyenvoy.http import filter as hf
from pyenvoy.http.headers import RequestHeaders, ResponseHeaders
from pyenvoy.stats import StatsStruct, Store
from pyenvoy.stream_info import FAILED_LOCAL_HEALTH_CHECK, StreamInfo, format_response_flags


class FakeServer:
    def __init__(self, cluster: str = "mysvc") -> None:
        self.healthcheck_failed = False
        self.local_info = SimpleNamespace(cluster_name=cluster)


class FakeCallbacks:
    def __init__(self) -> None:
        self.stream_info = StreamInfo()
        self.replies: list[dict[str, Any]] = []

    def send_local_reply(
        self,
        status: int,
        body: str | bytes,
        details: str = "",
        flags: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.stream_info.response_code = status
        self.stream_info.response_code_details = details
        self.stream_info.set_response_flag(flags)
        self.replies.append(
            {"status": status, "body": body, "details": details, "headers": list(headers or [])}
        )

    def route(self) -> Any:
        return None


class Env:
    """One factory (config) plus helpers to run requests through fresh filters."""

    def __init__(self, cm: Any = None, server: Any = None, **fields: Any) -> None:
        fields.setdefault("pass_through_mode", False)
        fields.setdefault("headers", [{"name": ":path", "string_match": {"exact": "/healthz"}}])
        self.store = Store()
        self.server = server if server is not None else FakeServer()
        proto = json_format.ParseDict(fields, health_check_pb2.HealthCheck())
        ctx = FactoryContext(
            cluster_manager=cm,
            stats=self.store,
            server=self.server,
            path="hf[0]",
            extra={"stats_prefix": "http.hc."},
        )
        self.make = health_check_factory(proto, ctx)

    def new(self) -> tuple[HealthCheckFilter, FakeCallbacks]:
        f = self.make()
        cb = FakeCallbacks()
        f.set_decoder_filter_callbacks(cb)
        f.set_encoder_filter_callbacks(cb)  # type: ignore[arg-type]
        return f, cb

    def stat(self, name: str) -> int:
        return self.store.counters[f"http.hc.health_check.{name}"].value


def req(path: bytes = b"/healthz", headers: list[list[bytes]] | None = None) -> RequestHeaders:
    return RequestHeaders(b"GET", path, b"host", b"http", headers or [])


# --- registration and config ---------------------------------------------------------------
def test_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_loaded", True)  # don't import other built-ins here
    ext = registry.find(registry.HTTP_FILTER, "envoy.filters.http.health_check", TYPE_URL)
    assert ext is not None and ext.factory is health_check_factory and not ext.terminal


@pytest.mark.parametrize(
    ("fields", "path", "text"),
    [
        ({}, "hf[0].pass_through_mode", "PassThroughMode: value is required"),
        (
            {"pass_through_mode": False, "cache_time": "1s"},
            "hf[0].cache_time",
            "cache_time_ms must not be set when path_through_mode is disabled",
        ),
        (
            {"pass_through_mode": False, "cluster_min_healthy_percentages": {"up": {"value": 150}}},
            "hf[0].cluster_min_healthy_percentages['up']",
            "value must be inside range [0, 100]",
        ),
        (
            {
                "pass_through_mode": False,
                "headers": [{"name": ":path", "safe_regex_match": {"regex": "("}}],
            },
            "hf[0].headers[0].safe_regex_match",
            "invalid regex",
        ),
        (
            {
                "pass_through_mode": False,
                "headers": [{"name": ":path", "string_match": {"custom": {"name": "x"}}}],
            },
            "hf[0].headers[0].string_match.custom",
            "not supported",
        ),
    ],
)
def test_config_rejects(fields: dict[str, Any], path: str, text: str) -> None:
    proto = json_format.ParseDict(fields, health_check_pb2.HealthCheck())
    with pytest.raises(ConfigError) as ei:
        HealthCheckConfig(proto, FactoryContext(path="hf[0]"))
    assert ei.value.path == path
    assert text in ei.value.message


def test_stats_names_under_hcm_prefix() -> None:
    env = Env()
    names = sorted(n for n in env.store.counters if n.startswith("http.hc.health_check."))
    assert names == [
        f"http.hc.health_check.{n}"
        for n in sorted(
            (
                "cached_response",
                "degraded",
                "failed",
                "failed_cluster_empty",
                "failed_cluster_not_found",
                "failed_cluster_unhealthy",
                "ok",
                "request_total",
            )
        )
    ]
    # The raw HCM stat_prefix works too.
    store = Store()
    proto = health_check_pb2.HealthCheck()
    proto.pass_through_mode.value = True
    HealthCheckConfig(proto, FactoryContext(stats=store, extra={"stat_prefix": "ingress"}))
    assert "http.ingress.health_check.ok" in store.counters


# --- header matchers -----------------------------------------------------------------------
def hm(**fields: Any) -> Any:
    fields.setdefault("name", "x-a")
    return compile_header_matcher(
        json_format.ParseDict(fields, route_components_pb2.HeaderMatcher()), "h"
    )


@pytest.mark.parametrize(
    ("fields", "headers", "expected"),
    [
        ({"name": ":path", "exact_match": "/healthz"}, [], True),
        ({"name": ":path", "exact_match": "/healthz/"}, [], False),
        ({"name": ":path", "prefix_match": "/health"}, [], True),
        ({"name": ":path", "string_match": {"prefix": "/HEALTH", "ignore_case": True}}, [], True),
        ({"name": ":path", "string_match": {"suffix": "thz"}}, [], True),
        ({"name": ":path", "string_match": {"contains": "alt"}}, [], True),
        ({"name": ":path", "string_match": {"safe_regex": {"regex": "/he.*z"}}}, [], True),
        (
            {"name": ":path", "string_match": {"safe_regex": {"regex": "/he"}}},
            [],
            False,
        ),  # full match
        ({"name": ":method", "exact_match": "GET"}, [], True),
        ({"present_match": True}, [[b"x-a", b"1"]], True),
        ({"present_match": True}, [], False),
        ({"present_match": False}, [], True),
        ({"present_match": False}, [[b"x-a", b"1"]], False),
        ({"present_match": True, "invert_match": True}, [], True),
        ({"exact_match": "1", "invert_match": True}, [[b"x-a", b"2"]], True),
        ({"exact_match": "1", "invert_match": True}, [], False),  # missing never matches
        ({"exact_match": "", "treat_missing_header_as_empty": True}, [], True),
        ({"string_match": {"exact": ""}, "treat_missing_header_as_empty": True}, [], True),
        ({"string_match": {"exact": "a,b"}}, [[b"x-a", b"a"], [b"x-a", b"b"]], True),  # joined
        ({"range_match": {"start": 10, "end": 20}}, [[b"x-a", b"19"]], True),
        ({"range_match": {"start": 10, "end": 20}}, [[b"x-a", b"20"]], False),
        ({"range_match": {"start": 10, "end": 20}}, [[b"x-a", b"x"]], False),
        ({}, [[b"x-a", b"anything"]], True),  # no specifier: present with any value
    ],
)
def test_header_matchers(
    fields: dict[str, Any], headers: list[list[bytes]], expected: bool
) -> None:
    assert hm(**fields)(req(headers=headers)) is expected


def test_no_matchers_means_every_request_is_a_health_check() -> None:
    env = Env(headers=[])
    f, cb = env.new()
    assert f.decode_headers(req(b"/anything"), True) == hf.STOP_ITERATION
    assert cb.replies[0]["status"] == 200


def test_all_matchers_must_match() -> None:
    env = Env(
        headers=[
            {"name": ":path", "string_match": {"exact": "/healthz"}},
            {"name": "x-envoy-livenesscheck", "present_match": True},
        ]
    )
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.CONTINUE
    f, cb = env.new()
    assert (
        f.decode_headers(req(headers=[[b"x-envoy-livenesscheck", b"1"]]), True) == hf.STOP_ITERATION
    )
    assert cb.replies and cb.replies[0]["status"] == 200


# --- non pass-through ------------------------------------------------------------------------
def test_healthy_answers_200_empty_with_cluster_header() -> None:
    env = Env()
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.STOP_ITERATION
    assert cb.replies == [
        {
            "status": 200,
            "body": b"",
            "details": "health_check_ok",
            "headers": [(b"x-envoy-upstream-healthchecked-cluster", b"mysvc")],
        }
    ]
    assert format_response_flags(cb.stream_info.response_flags) == "-"
    # The local reply's headers pass back through encode_headers: same header, once.
    rh = ResponseHeaders(200)
    for n, v in cb.replies[0]["headers"]:
        rh.add(n, v)
    assert f.encode_headers(rh, True) == hf.CONTINUE
    assert rh.headers == [[b"x-envoy-upstream-healthchecked-cluster", b"mysvc"]]
    assert (env.stat("request_total"), env.stat("ok"), env.stat("failed")) == (1, 1, 0)


def test_failing_answers_503_lh_with_both_headers() -> None:
    env = Env()
    env.server.healthcheck_failed = True
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.STOP_ITERATION
    r = cb.replies[0]
    assert (r["status"], r["body"], r["details"]) == (503, b"", "health_check_failed")
    assert r["headers"] == [
        (b"x-envoy-upstream-healthchecked-cluster", b"mysvc"),
        (b"x-envoy-immediate-health-check-fail", b"true"),
    ]
    assert cb.stream_info.response_flags & FAILED_LOCAL_HEALTH_CHECK
    assert format_response_flags(cb.stream_info.response_flags) == "LH"
    assert (env.stat("request_total"), env.stat("ok"), env.stat("failed")) == (1, 0, 1)


def test_health_state_read_at_request_time() -> None:
    env = Env()
    statuses = []
    for failed in (False, True, False):
        env.server.healthcheck_failed = failed
        f, cb = env.new()
        f.decode_headers(req(), True)
        statuses.append(cb.replies[0]["status"])
    assert statuses == [200, 503, 200]


def test_other_requests_pass_and_get_fail_header_only_when_failing() -> None:
    env = Env()
    f, cb = env.new()
    assert f.decode_headers(req(b"/other"), True) == hf.CONTINUE
    assert f.decode_data(b"x", True) == hf.CONTINUE
    rh = ResponseHeaders(200, [[b"content-length", b"2"]])
    f.encode_headers(rh, False)
    assert rh.headers == [[b"content-length", b"2"]]
    env.server.healthcheck_failed = True
    f, cb = env.new()
    assert f.decode_headers(req(b"/other"), True) == hf.CONTINUE
    rh = ResponseHeaders(200, [[b"content-length", b"2"]])
    f.encode_headers(rh, False)
    assert rh.headers == [
        [b"content-length", b"2"],
        [b"x-envoy-immediate-health-check-fail", b"true"],
    ]
    assert not cb.replies
    assert env.stat("request_total") == 0


def test_request_with_body_answers_at_end_of_stream() -> None:
    env = Env()
    f, cb = env.new()
    assert f.decode_headers(req(), False) == hf.STOP_ITERATION
    assert not cb.replies
    assert f.decode_data(b"part", False) == hf.STOP_ITERATION_NO_BUFFER
    assert not cb.replies
    assert f.decode_data(b"end", True) == hf.STOP_ITERATION_NO_BUFFER
    assert [r["status"] for r in cb.replies] == [200]
    f, cb = env.new()
    f.decode_headers(req(), False)
    assert f.decode_trailers(None) == hf.STOP_ITERATION
    assert [r["status"] for r in cb.replies] == [200]


def test_no_server_and_no_service_cluster() -> None:
    proto = json_format.ParseDict(
        {"pass_through_mode": False, "headers": [{"name": ":path", "exact_match": "/hc"}]},
        health_check_pb2.HealthCheck(),
    )
    f = health_check_factory(proto, FactoryContext())()
    cb = FakeCallbacks()
    f.set_decoder_filter_callbacks(cb)
    f.decode_headers(req(b"/hc"), True)
    # Envoy sends the header with an empty value when no --service-cluster is set.
    assert cb.replies[0]["headers"] == [(b"x-envoy-upstream-healthchecked-cluster", b"")]


# --- pass-through ----------------------------------------------------------------------------
def test_pass_through_healthy_continues_and_stamps_response() -> None:
    env = Env(pass_through_mode=True)
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.CONTINUE
    assert not cb.replies
    rh = ResponseHeaders(200, [[b"content-length", b"18"]])
    f.encode_headers(rh, False)
    assert rh.headers == [
        [b"content-length", b"18"],
        [b"x-envoy-upstream-healthchecked-cluster", b"mysvc"],
    ]
    assert env.stat("request_total") == 0  # Envoy counts only health checks it answers


def test_pass_through_failing_answers_503() -> None:
    env = Env(pass_through_mode=True)
    env.server.healthcheck_failed = True
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.STOP_ITERATION
    assert (cb.replies[0]["status"], cb.replies[0]["details"]) == (503, "health_check_failed")
    assert (env.stat("request_total"), env.stat("failed")) == (1, 1)


def test_pass_through_cache() -> None:
    env = Env(pass_through_mode=True, cache_time="0.2s")
    # First: goes upstream; the upstream's answer (degraded) is cached.
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.CONTINUE
    f.encode_headers(ResponseHeaders(200, [[b"x-envoy-degraded", b""]]), True)
    # Second: answered from the cache.
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.STOP_ITERATION
    r = cb.replies[0]
    assert (r["status"], r["details"]) == (200, "health_check_cached")
    assert (b"x-envoy-degraded", b"") in r["headers"]
    assert (env.stat("cached_response"), env.stat("ok"), env.stat("degraded")) == (1, 1, 1)
    # After the cache period ends, the next check goes upstream again.
    cache = env.make.args[0].cache  # type: ignore[attr-defined]
    cache.epoch -= 0.4
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.CONTINUE
    f.encode_headers(ResponseHeaders(503), True)
    f, cb = env.new()
    assert f.decode_headers(req(), True) == hf.STOP_ITERATION
    assert (cb.replies[0]["status"], cb.replies[0]["details"]) == (503, "health_check_cached")
    assert format_response_flags(cb.stream_info.response_flags) == "LH"


def test_cache_period_boundaries_without_timer() -> None:
    env = Env(pass_through_mode=True, cache_time="0.05s")
    cache = env.make.args[0].cache  # type: ignore[attr-defined]
    assert not cache.use_cached()
    cache.set(200, False)
    assert cache.use_cached()
    time.sleep(0.11)
    assert not cache.use_cached()


# --- cluster_min_healthy_percentages -----------------------------------------------------------
class MembershipStats(StatsStruct):
    GAUGES = ("membership_total", "membership_healthy", "membership_degraded")


class FakeCM:
    def __init__(self, store: Store, **clusters: tuple[int, int, int]) -> None:
        self.clusters = {}
        for name, (total, healthy, degraded) in clusters.items():
            stats = MembershipStats(store.scope(f"cluster.{name}"))
            stats.membership_total.set(total)  # type: ignore[attr-defined]
            stats.membership_healthy.set(healthy)  # type: ignore[attr-defined]
            stats.membership_degraded.set(degraded)  # type: ignore[attr-defined]
            self.clusters[name] = SimpleNamespace(info=SimpleNamespace(stats=stats))

    def get(self, name: str) -> Any:
        return self.clusters.get(name)


@pytest.mark.parametrize(
    ("mins", "status", "details", "stat"),
    [
        ({"up": 50, "empty": 0}, 200, "health_check_ok_cluster_healthy", "ok"),
        ({"nosuch": 50}, 503, "health_check_failed_no_cluster_found", "failed_cluster_not_found"),
        ({"empty": 1}, 503, "health_check_failed_cluster_empty", "failed_cluster_empty"),
        ({"half": 51}, 503, "health_check_failed_cluster_unhealthy", "failed_cluster_unhealthy"),
        ({"half": 50}, 200, "health_check_ok_cluster_healthy", "ok"),
        ({"half": 50.9}, 200, "health_check_ok_cluster_healthy", "ok"),  # truncated to 50
        (
            {"degr": 100},
            200,
            "health_check_ok_cluster_healthy",
            "ok",
        ),  # degraded count as available
    ],
)
def test_cluster_min_healthy(mins: dict[str, float], status: int, details: str, stat: str) -> None:
    store = Store()
    cm = FakeCM(store, up=(1, 1, 0), empty=(0, 0, 0), half=(4, 2, 0), degr=(2, 1, 1))
    env = Env(
        cm=cm,
        cluster_min_healthy_percentages={k: {"value": v} for k, v in mins.items()},
    )
    f, cb = env.new()
    f.decode_headers(req(), True)
    r = cb.replies[0]
    assert (r["status"], r["details"]) == (status, details)
    assert env.stat(stat) == 1
    assert env.stat("request_total") == 1
    if status == 503:
        assert env.stat("failed") == 1
        assert format_response_flags(cb.stream_info.response_flags) == "LH"


# --- the same config against real Envoy and pyenvoy ---------------------------------------
HC_TEMPLATE = """
node: { cluster: mysvc }
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: {admin_port} } }
static_resources:
  listeners:
  - name: main
    address: { socket_address: { address: 127.0.0.1, port_value: {listener_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hc
          route_config:
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend }
          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers:
              - name: ":path"
                string_match: { exact: "/healthz" }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: pt
    address: { socket_address: { address: 127.0.0.1, port_value: {pt_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: pt
          route_config:
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend }
          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: true
              headers:
              - name: ":path"
                string_match: { exact: "/healthz" }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {upstream_port} } } }
"""

HC = "x-envoy-upstream-healthchecked-cluster"
FAIL = "x-envoy-immediate-health-check-fail"


@pytest.mark.parametrize("kind", ["envoy", "pyenvoy"])
def test_same_answers_and_stats_as_envoy(kind: str) -> None:
    """/healthz and another path on a non-pass-through and a pass-through listener, before
    and after ``POST /healthcheck/fail``: what Envoy 1.40 answers, header by header."""
    import shutil
    import urllib.request

    from tests.support.procs import EnvoyProcess, parse_raw_responses, raw_request, start_proxy
    from tests.support.upstream import HttpUpstream

    if kind == "envoy" and shutil.which(EnvoyProcess.executable) is None:
        pytest.skip("envoy binary not installed")
    up = HttpUpstream()
    up.start()
    try:
        p = start_proxy(kind, HC_TEMPLATE, upstream_port=up.port)
        try:

            def get(port: int, path: str) -> Any:
                data, _ = raw_request(
                    port,
                    f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode(),
                    until_closed=False,
                    expect_responses=1,
                    timeout=5,
                )
                return parse_raw_responses(data)[0]

            main, pt = p.listener_port, p.pt_port
            r = get(main, "/healthz")
            assert (r.status, r.body, r.header(HC), r.header(FAIL)) == (200, b"", "mysvc", None)
            assert r.header_names()[0] == HC  # added before date/server
            r = get(pt, "/healthz")  # pass-through: answered by the upstream, stamped
            assert (r.status, r.header(HC), r.header(FAIL)) == (200, "mysvc", None)
            assert b"/healthz" in r.body
            assert get(main, "/other").header(FAIL) is None

            req = urllib.request.Request(p.admin_url + "/healthcheck/fail", method="POST")
            urllib.request.urlopen(req, timeout=5).read()
            for port in (main, pt):
                r = get(port, "/healthz")
                assert (r.status, r.body, r.header(HC), r.header(FAIL)) == (
                    503,
                    b"",
                    "mysvc",
                    "true",
                )
                assert r.header_names()[:2] == [HC, FAIL]
                assert get(port, "/other").header(FAIL) == "true"

            stats = p.stats()
            seen = {k: v for k, v in stats.items() if ".health_check." in k and v}
            assert seen == {
                "http.hc.health_check.request_total": 2,
                "http.hc.health_check.ok": 1,
                "http.hc.health_check.failed": 1,
                "http.pt.health_check.request_total": 1,
                "http.pt.health_check.failed": 1,
            }
        finally:
            p.stop()
    finally:
        up.stop()
