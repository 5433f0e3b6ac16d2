"""RouteTable: virtual host selection, matchers, rewrites, redirects, header mutations, errors.

Expected values marked "observed" were recorded by running real Envoy 1.40 with the same
route configuration (direct_response routes, an echo upstream) and curl; see the report of the
route-table task. They are encoded here so pyenvoy keeps behaving like the binary.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf import json_format

from pyenvoy.config.errors import ConfigError
from pyenvoy.http.headers import RequestHeaders, ResponseHeaders
from pyenvoy.router import RouteTable, compile_regex
from pyenvoy.stream_info import StreamInfo


def build(config: dict[str, Any], **kw: Any) -> RouteTable:
    return RouteTable.from_proto(json_format.ParseDict(config, RouteConfiguration()), **kw)


def req(
    path: str = "/",
    host: str = "example.com",
    headers: list[tuple[str, str]] | tuple[()] = (),
    method: str = "GET",
    scheme: str = "http",
) -> RequestHeaders:
    return RequestHeaders(
        method.encode(),
        path.encode(),
        host.encode(),
        scheme.encode(),
        [[k.lower().encode(), v.encode()] for k, v in headers],
    )


def dr(name: str, match: dict[str, Any], **extra: Any) -> dict[str, Any]:
    d = {
        "name": name,
        "match": match,
        "direct_response": {"status": 200, "body": {"inline_string": name}},
    }
    d.update(extra)
    return d


def one_vhost(routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "rc",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}],
    }
    config.update(extra)
    return config


def route_name(table: RouteTable, headers: RequestHeaders, random_value: int = 0) -> str | None:
    r = table.route(headers, random_value)
    return None if r is None else r.name


def stream_info() -> StreamInfo:
    return StreamInfo(("127.0.0.1", 5555), ("127.0.0.1", 10000))


# --- virtual host selection ---------------------------------------------------------------------


def _vh(name: str, domains: list[str]) -> dict[str, Any]:
    return {"name": name, "domains": domains, "routes": [dr(name, {"prefix": "/"})]}


VHOSTS = {
    "name": "rc",
    "virtual_hosts": [
        _vh("exact", ["foo.com"]),
        _vh("exactport", ["bar.com:8080"]),
        _vh("suffix", ["*.foo.com"]),
        _vh("suffix2", ["*-bar.foo.com"]),
        _vh("prefix", ["foo.*"]),
        _vh("prefix2", ["foo.b*"]),
        _vh("any", ["*"]),
        _vh("upper", ["UP.COM"]),
    ],
}


# Observed: Envoy does not strip the port for vhost matching (foo.com:8080 falls through to the
# prefix wildcard "foo.*"), wildcards never match the bare suffix (".foo.com" -> "*"), the longest
# wildcard wins, and matching is case-insensitive both ways.
@pytest.mark.parametrize(
    "host,vhost",
    [
        ("foo.com", "exact"),
        ("FOO.com", "exact"),
        ("foo.com:8080", "prefix"),
        ("bar.com", "any"),
        ("bar.com:8080", "exactport"),
        ("a.foo.com", "suffix"),
        ("a.foo.com:99", "any"),
        ("x-bar.foo.com", "suffix2"),
        (".foo.com", "any"),
        ("-bar.foo.com", "suffix"),
        ("foo.bar", "prefix2"),
        ("foo.bar:1", "prefix2"),
        ("foo.x", "prefix"),
        ("up.com", "upper"),
        ("zzz", "any"),
        ("[::1]:80", "any"),
        ("foo.com.", "prefix"),
    ],
)
def test_virtual_host_selection(host: str, vhost: str) -> None:
    table = build(VHOSTS)
    r = table.route(req(host=host))
    assert r is not None and r.virtual_host.name == vhost


@pytest.mark.parametrize(
    "host,vhost",
    [
        ("foo.com:8080", "exact"),
        ("bar.com:8080", "any"),  # a domain with a port can never match once ports are stripped
        ("bar.com", "any"),
        ("a.foo.com:99", "suffix"),
        ("[::1]:80", "any"),
        ("foo.com:", "exact"),
    ],
)
def test_ignore_port_in_host_matching(host: str, vhost: str) -> None:  # observed
    table = build(
        {
            "name": "rc",
            "ignore_port_in_host_matching": True,
            "virtual_hosts": [
                _vh("exact", ["foo.com"]),
                _vh("exactport", ["bar.com:8080"]),
                _vh("suffix", ["*.foo.com"]),
                _vh("any", ["*"]),
            ],
        }
    )
    r = table.route(req(host=host))
    assert r is not None and r.virtual_host.name == vhost


def test_no_matching_virtual_host_is_none() -> None:
    table = build({"name": "rc", "virtual_hosts": [_vh("exact", ["foo.com"])]})
    assert table.route(req(host="zzz")) is None
    assert table.route(req(host="")) is None
    assert route_name(table, req(host="foo.com")) == "exact"


def test_only_default_vhost_matches_without_authority() -> None:
    table = build({"name": "rc", "virtual_hosts": [_vh("any", ["*"])]})
    assert route_name(table, req(host="")) == "any"


def test_vhost_header() -> None:  # observed: a missing vhost header is a 404 even with "*"
    table = build(
        {
            "name": "rc",
            "vhost_header": "X-VHost",
            "virtual_hosts": [_vh("any", ["*"]), _vh("other", ["other.com"])],
        }
    )
    assert route_name(table, req(host="other.com", headers=[("x-vhost", "other.com")])) == "other"
    assert route_name(table, req(host="other.com", headers=[("x-vhost", "zz")])) == "any"
    assert table.route(req(host="other.com")) is None


# --- route matchers -----------------------------------------------------------------------------

MATCH_ROUTES = [
    dr(
        "hdr_exact",
        {"prefix": "/h1", "headers": [{"name": "x-a", "string_match": {"exact": "a,b"}}]},
    ),
    dr(
        "hdr_invert_missing",
        {
            "prefix": "/h2",
            "headers": [{"name": "x-a", "string_match": {"exact": "v"}, "invert_match": True}],
        },
    ),
    dr(
        "hdr_present_false", {"prefix": "/h3", "headers": [{"name": "x-a", "present_match": False}]}
    ),
    dr(
        "hdr_present_false_inv",
        {
            "prefix": "/h4",
            "headers": [{"name": "x-a", "present_match": False, "invert_match": True}],
        },
    ),
    dr(
        "hdr_treat_missing",
        {
            "prefix": "/h5",
            "headers": [
                {
                    "name": "x-a",
                    "string_match": {"exact": ""},
                    "treat_missing_header_as_empty": True,
                }
            ],
        },
    ),
    dr(
        "hdr_range",
        {"prefix": "/h6", "headers": [{"name": "x-a", "range_match": {"start": -10, "end": 10}}]},
    ),
    dr("hdr_noop", {"prefix": "/h7", "headers": [{"name": "x-a"}]}),
    dr(
        "hdr_exact_legacy_empty", {"prefix": "/h8", "headers": [{"name": "x-a", "exact_match": ""}]}
    ),
    dr(
        "hdr_path",
        {"prefix": "/h9", "headers": [{"name": ":path", "string_match": {"suffix": "q=1"}}]},
    ),
    dr(
        "hdr_host",
        {"prefix": "/hA", "headers": [{"name": ":authority", "string_match": {"exact": "abc"}}]},
    ),
    dr(
        "hdr_hostlegacy",
        {"prefix": "/hB", "headers": [{"name": "host", "string_match": {"exact": "abc"}}]},
    ),
    dr(
        "hdr_method",
        {"prefix": "/hC", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
    ),
    dr(
        "hdr_ic",
        {
            "prefix": "/hD",
            "headers": [{"name": "x-a", "string_match": {"contains": "BC", "ignore_case": True}}],
        },
    ),
    dr(
        "hdr_regex",
        {
            "prefix": "/hE",
            "headers": [{"name": "x-a", "string_match": {"safe_regex": {"regex": "\\d{3}"}}}],
        },
    ),
    dr(
        "q_exact",
        {"prefix": "/q1", "query_parameters": [{"name": "a", "string_match": {"exact": "1"}}]},
    ),
    dr("q_present", {"prefix": "/q2", "query_parameters": [{"name": "a", "present_match": True}]}),
    dr("q_nothing", {"prefix": "/q3", "query_parameters": [{"name": "a"}]}),
    dr(
        "q_prefix",
        {"prefix": "/q4", "query_parameters": [{"name": "a", "string_match": {"prefix": "x"}}]},
    ),
    dr("q_absent", {"prefix": "/q5", "query_parameters": [{"name": "a", "present_match": False}]}),
    dr("grpc", {"prefix": "/g", "grpc": {}}),
    dr("path_exact", {"path": "/exact"}),
    dr("path_ci", {"path": "/CI", "case_sensitive": False}),
    dr("psp", {"path_separated_prefix": "/psp"}),
    dr("regex", {"safe_regex": {"regex": "/re/[a-z]+"}}),
    dr("prefix_ci", {"prefix": "/PRE", "case_sensitive": False}),
    dr("fallback", {"prefix": "/"}),
]


# Every row was observed on Envoy 1.40 (HTTP/1.1, curl); "-" means an empty-valued header.
@pytest.mark.parametrize(
    "path,headers,method,expected",
    [
        ("/h1", [("x-a", "a"), ("x-a", "b")], "GET", "fallback"),  # values are not joined
        ("/h1", [("x-a", "a,b")], "GET", "hdr_exact"),
        ("/h1", [("x-a", "a, b")], "GET", "fallback"),
        ("/h2", [], "GET", "fallback"),  # invert_match never matches a missing header
        ("/h2", [("x-a", "w")], "GET", "hdr_invert_missing"),
        ("/h2", [("x-a", "v")], "GET", "fallback"),
        ("/h3", [], "GET", "hdr_present_false"),
        ("/h3", [("x-a", "1")], "GET", "fallback"),
        ("/h4", [], "GET", "fallback"),
        ("/h4", [("x-a", "1")], "GET", "hdr_present_false_inv"),
        ("/h5", [], "GET", "hdr_treat_missing"),
        ("/h5", [("x-a", "")], "GET", "hdr_treat_missing"),
        ("/h5", [("x-a", "z")], "GET", "fallback"),
        ("/h6", [("x-a", "-10")], "GET", "hdr_range"),
        ("/h6", [("x-a", "10")], "GET", "fallback"),
        ("/h6", [("x-a", "5x")], "GET", "fallback"),
        ("/h6", [("x-a", "+5")], "GET", "hdr_range"),
        ("/h6", [("x-a", "1_0")], "GET", "fallback"),
        ("/h7", [], "GET", "fallback"),
        ("/h7", [("x-a", "")], "GET", "hdr_noop"),
        ("/h8", [], "GET", "fallback"),
        ("/h8", [("x-a", "anything")], "GET", "hdr_exact_legacy_empty"),
        ("/h9?q=1", [], "GET", "hdr_path"),  # :path header matchers see the query
        ("/hA", [], "GET", "fallback"),
        ("/hC", [], "POST", "hdr_method"),
        ("/hD", [("x-a", "xbcx")], "GET", "hdr_ic"),
        ("/hE", [("x-a", "1234")], "GET", "fallback"),  # safe_regex is a full match
        ("/hE", [("x-a", "123")], "GET", "hdr_regex"),
        ("/q1?a=1", [], "GET", "q_exact"),
        ("/q1?a=2&a=1", [], "GET", "fallback"),  # the first value counts
        ("/q1?a=1&a=2", [], "GET", "q_exact"),
        ("/q1?a=%31", [], "GET", "fallback"),  # values are not percent-decoded
        ("/q1?b=1&a=1#x", [], "GET", "q_exact"),
        ("/q1?A=1", [], "GET", "fallback"),
        ("/q2?a", [], "GET", "q_present"),
        ("/q2?a=", [], "GET", "q_present"),
        ("/q2?b", [], "GET", "fallback"),
        ("/q3?a", [], "GET", "q_nothing"),
        ("/q3?a=x", [], "GET", "q_nothing"),
        ("/q3", [], "GET", "fallback"),
        ("/q4?a=xy", [], "GET", "q_prefix"),
        ("/q5?a=1", [], "GET", "fallback"),
        ("/q5?b", [], "GET", "q_absent"),
        ("/g", [], "GET", "fallback"),
        ("/g", [("content-type", "application/grpc")], "GET", "grpc"),
        ("/g", [("content-type", "application/grpc+proto")], "GET", "grpc"),
        ("/g", [("content-type", "application/grpc;x=y")], "GET", "grpc"),
        ("/g", [("content-type", "application/grpc-web")], "GET", "fallback"),
        ("/g", [("content-type", "Application/GRPC")], "GET", "fallback"),
        ("/exact", [], "GET", "path_exact"),
        ("/exact?x=1", [], "GET", "path_exact"),
        ("/exact#f", [], "GET", "path_exact"),
        ("/exact/", [], "GET", "fallback"),
        ("/EXACT", [], "GET", "fallback"),
        ("/ci", [], "GET", "path_ci"),
        ("/ci?x", [], "GET", "path_ci"),
        ("/psp", [], "GET", "psp"),
        ("/psp/", [], "GET", "psp"),
        ("/psp/x", [], "GET", "psp"),
        ("/pspx", [], "GET", "fallback"),
        ("/psp?x=1", [], "GET", "psp"),
        ("/psp#x", [], "GET", "psp"),
        ("/re/abc", [], "GET", "regex"),
        ("/re/abc?x=1", [], "GET", "regex"),
        ("/re/ABC", [], "GET", "fallback"),  # case_sensitive does not apply to safe_regex
        ("/re/abc/", [], "GET", "fallback"),
        ("/pre", [], "GET", "prefix_ci"),
        ("/PrEfix", [], "GET", "prefix_ci"),
    ],
)
def test_route_matchers(
    path: str, headers: list[tuple[str, str]], method: str, expected: str
) -> None:
    table = build(one_vhost(MATCH_ROUTES))
    assert route_name(table, req(path, headers=headers, method=method)) == expected


def test_header_matcher_on_host_pseudo_headers() -> None:
    table = build(one_vhost(MATCH_ROUTES))
    assert route_name(table, req("/hA", host="abc")) == "hdr_host"
    assert route_name(table, req("/hB", host="abc")) == "hdr_hostlegacy"


MULTI_ROUTES = [
    dr("a", {"prefix": "/h", "headers": [{"name": "x-a", "string_match": {"exact": "a"}}]}),
    dr(
        "xy_joined",
        {"prefix": "/j", "headers": [{"name": "x-a", "string_match": {"exact": "x,yy"}}]},
    ),
    dr("yy_only", {"prefix": "/y", "headers": [{"name": "x-a", "string_match": {"exact": "yy"}}]}),
    dr(
        "inv_x",
        {
            "prefix": "/i",
            "headers": [{"name": "x-a", "string_match": {"exact": "x"}, "invert_match": True}],
        },
    ),
    dr(
        "regex_joined",
        {
            "prefix": "/r",
            "headers": [{"name": "x-a", "string_match": {"safe_regex": {"regex": "x,yy"}}}],
        },
    ),
    dr(
        "contains",
        {"prefix": "/c", "headers": [{"name": "x-a", "string_match": {"contains": ","}}]},
    ),
    dr(
        "range",
        {"prefix": "/n", "headers": [{"name": "x-a", "range_match": {"start": 0, "end": 5}}]},
    ),
    dr("legacy_exact", {"prefix": "/l", "headers": [{"name": "x-a", "exact_match": "yy"}]}),
    dr("fallback", {"prefix": "/"}),
]


# Observed on Envoy 1.40: a multi-valued header matches if ANY value matches; the values are
# not joined with ","; invert_match inverts that overall result.
@pytest.mark.parametrize(
    "path,values,expected",
    [
        ("/h", ["a", "b"], "a"),
        ("/h", ["b", "a"], "a"),
        ("/h", ["c", "a"], "a"),
        ("/j", ["x", "yy"], "fallback"),
        ("/y", ["x", "yy"], "yy_only"),
        ("/i", ["x", "yy"], "fallback"),
        ("/i", ["x", "x"], "fallback"),
        ("/i", ["z", "w"], "inv_x"),
        ("/r", ["x", "yy"], "fallback"),
        ("/c", ["x", "yy"], "fallback"),
        ("/n", ["9", "1"], "range"),
        ("/l", ["x", "yy"], "legacy_exact"),
    ],
)
def test_multi_valued_header_matching(path: str, values: list[str], expected: str) -> None:
    table = build(one_vhost(MULTI_ROUTES))
    assert route_name(table, req(path, headers=[("x-a", v) for v in values])) == expected


def test_runtime_fraction_uses_default_value() -> None:  # observed: 0% never, 100% always
    table = build(
        one_vhost(
            [
                dr(
                    "rt0",
                    {
                        "prefix": "/rt0",
                        "runtime_fraction": {"default_value": {"numerator": 0}, "runtime_key": "k"},
                    },
                ),
                dr(
                    "rt100",
                    {"prefix": "/rt100", "runtime_fraction": {"default_value": {"numerator": 100}}},
                ),
                dr(
                    "rt30",
                    {
                        "prefix": "/rt30",
                        "runtime_fraction": {
                            "default_value": {"numerator": 3000, "denominator": "TEN_THOUSAND"}
                        },
                    },
                ),
                dr("fallback", {"prefix": "/"}),
            ]
        )
    )
    assert route_name(table, req("/rt0"), 0) == "fallback"
    assert route_name(table, req("/rt100"), 12345) == "rt100"
    assert route_name(table, req("/rt30"), 2999) == "rt30"
    assert route_name(table, req("/rt30"), 3000) == "fallback"
    assert route_name(table, req("/rt30"), 12999) == "rt30"


def test_ignore_path_parameters_in_path_matching() -> None:  # observed
    table = build(
        one_vhost([dr("params", {"path": "/pp"})], ignore_path_parameters_in_path_matching=True)
    )
    assert route_name(table, req("/pp;x=1?y")) == "params"
    plain = build(one_vhost([dr("params", {"path": "/pp"})]))
    assert plain.route(req("/pp;x=1")) is None


def test_connect_matcher() -> None:
    table = build(
        one_vhost([dr("connect", {"connect_matcher": {}}), dr("fallback", {"prefix": "/"})])
    )
    assert route_name(table, req("", method="CONNECT")) == "connect"
    assert route_name(table, req("/", method="GET")) == "fallback"
    # Path-less requests only ever match connect routes.
    path_only = build(one_vhost([dr("fallback", {"prefix": "/"})]))
    assert path_only.route(req("", method="CONNECT")) is None


def test_first_matching_route_wins() -> None:
    table = build(one_vhost([dr("first", {"prefix": "/a"}), dr("second", {"prefix": "/a/b"})]))
    assert route_name(table, req("/a/b")) == "first"


# --- route actions -------------------------------------------------------------------------------


def test_cluster_timeouts_and_stored_policies() -> None:
    table = build(
        {
            "name": "rc",
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "retry_policy": {"retry_on": "5xx", "num_retries": 2},
                    "typed_per_filter_config": {
                        "envoy.filters.http.x": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": "vh",
                        },
                        "envoy.filters.http.y": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": "vh",
                        },
                    },
                    "routes": [
                        {
                            "name": "r1",
                            "match": {"prefix": "/a"},
                            "route": {
                                "cluster": "c1",
                                "timeout": "2.5s",
                                "idle_timeout": "1s",
                                "hash_policy": [{"header": {"header_name": "x-user"}}],
                                "retry_policy": {"retry_on": "connect-failure"},
                            },
                            "typed_per_filter_config": {
                                "envoy.filters.http.x": {
                                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                                    "value": "route",
                                }
                            },
                        },
                        {
                            "name": "r2",
                            "match": {"prefix": "/b"},
                            "route": {"cluster_header": "X-Cluster", "timeout": "0s"},
                        },
                        {"name": "r3", "match": {"prefix": "/"}, "route": {"cluster": "c3"}},
                    ],
                }
            ],
        }
    )
    r1 = table.route(req("/a"))
    assert r1 is not None and r1.name == "r1"
    assert r1.cluster_name == "c1" and r1.cluster_header is None
    assert r1.timeout == 2.5 and r1.idle_timeout == 1.0
    assert r1.retry_policy.retry_on == "connect-failure"
    assert len(r1.hash_policy) == 1
    assert r1.per_filter_config["envoy.filters.http.x"].value.endswith(b"route")
    assert r1.per_filter_config["envoy.filters.http.y"].value.endswith(b"vh")
    r2 = table.route(req("/b"))
    assert r2 is not None and r2.cluster_header == b"x-cluster" and r2.cluster_name is None
    assert r2.timeout == 0.0
    r3 = table.route(req("/c"))
    assert r3 is not None and r3.timeout == 15.0 and r3.idle_timeout is None  # Envoy's default
    assert r3.retry_policy.retry_on == "5xx"  # virtual host fallback
    assert r3.cluster_not_found_response_code == 503


def test_weighted_clusters_are_stored_and_picked() -> None:
    table = build(
        one_vhost(
            [
                {
                    "match": {"prefix": "/"},
                    "route": {
                        "weighted_clusters": {
                            "clusters": [{"name": "a", "weight": 10}, {"name": "b", "weight": 30}],
                            "header_name": "x-pick",
                        }
                    },
                }
            ]
        )
    )
    r = table.route(req("/"))
    assert r is not None and r.weighted_clusters is not None
    assert [(c.name, c.weight) for c in r.weighted_clusters] == [("a", 10), ("b", 30)]
    assert r.pick_weighted_cluster(req("/"), 9).name == "a"  # type: ignore[union-attr]
    assert r.pick_weighted_cluster(req("/"), 10).name == "b"  # type: ignore[union-attr]
    assert r.pick_weighted_cluster(req("/"), 45).name == "a"  # type: ignore[union-attr]
    assert r.pick_weighted_cluster(req("/", headers=[("x-pick", "39")]), 0).name == "b"  # type: ignore[union-attr]


# Observed path rewrites (upstream saw "expected_path"; x-envoy-original-path = the original).
@pytest.mark.parametrize(
    "path,expected",
    [
        ("/pr/x?q=1&b=/pr/", "/new/x?q=1&b=/pr/"),
        ("/pr/", "/new/"),
        ("/strip", "/"),
        ("/strip/a", "//a"),  # observed via %REQ(:PATH)% in Envoy's access log
        ("/stripped?x", "/ped?x"),
        ("/ci/a", "/ci-rw/a"),
        ("/Ci/a?z", "/ci-rw/a?z"),
        ("/exactp?x=1", "/ep?x=1"),
        ("/re/abc/12?x=1", "/rx?x=1"),
        ("/rr/a/b/c?x=1", "/b/c/a?x=1"),
        ("/rall/foo/boo?o=o", "/rall/f00/b00?o=o"),
        ("/psp", "/z"),
        ("/psp/q", "/z/q"),
    ],
)
def test_path_rewrites(path: str, expected: str) -> None:
    table = build(
        one_vhost(
            [
                {"match": {"prefix": "/pr/"}, "route": {"cluster": "c", "prefix_rewrite": "/new/"}},
                {"match": {"prefix": "/strip"}, "route": {"cluster": "c", "prefix_rewrite": "/"}},
                {
                    "match": {"prefix": "/CI", "case_sensitive": False},
                    "route": {"cluster": "c", "prefix_rewrite": "/ci-rw"},
                },
                {"match": {"path": "/exactp"}, "route": {"cluster": "c", "prefix_rewrite": "/ep"}},
                {
                    "match": {"safe_regex": {"regex": "/re/([a-z]+)/(\\d+)"}},
                    "route": {"cluster": "c", "prefix_rewrite": "/rx"},
                },
                {
                    "match": {"prefix": "/rr/"},
                    "route": {
                        "cluster": "c",
                        "regex_rewrite": {
                            "pattern": {"regex": "^/rr/([^/]+)/(.*)$"},
                            "substitution": "/\\2/\\1",
                        },
                    },
                },
                {
                    "match": {"prefix": "/rall"},
                    "route": {
                        "cluster": "c",
                        "regex_rewrite": {"pattern": {"regex": "o"}, "substitution": "0"},
                    },
                },
                {
                    "match": {"path_separated_prefix": "/psp"},
                    "route": {"cluster": "c", "prefix_rewrite": "/z"},
                },
            ]
        )
    )
    headers = req(path)
    route = table.route(headers)
    assert route is not None
    route.rewrite_path(headers)
    assert headers.path == expected.encode()
    assert headers.get(b"x-envoy-original-path") == path.encode()
    suppressed = req(path)
    route.rewrite_path(suppressed, insert_envoy_original_path=False)
    assert suppressed.path == expected.encode() and suppressed.get(b"x-envoy-original-path") is None


def test_no_rewrite_leaves_path_and_sets_no_header() -> None:
    table = build(one_vhost([{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]))
    headers = req("/plain?x=1")
    route = table.route(headers)
    assert route is not None
    route.rewrite_path(headers)
    assert headers.path == b"/plain?x=1" and b"x-envoy-original-path" not in headers


def test_host_rewrites() -> None:  # observed (including x-envoy-original-host and x-forwarded-host)
    table = build(
        one_vhost(
            [
                {
                    "match": {"prefix": "/hh"},
                    "route": {"cluster": "c", "host_rewrite_header": "X-Host"},
                },
                {
                    "match": {"prefix": "/hr"},
                    "route": {
                        "cluster": "c",
                        "host_rewrite_path_regex": {
                            "pattern": {"regex": "^/hr/([^/]+)/.*$"},
                            "substitution": "\\1.example",
                        },
                    },
                },
                {
                    "match": {"prefix": "/xfh"},
                    "route": {
                        "cluster": "c",
                        "host_rewrite_literal": "lit.example",
                        "append_x_forwarded_host": True,
                    },
                },
                {
                    "match": {"prefix": "/lit"},
                    "route": {"cluster": "c", "host_rewrite_literal": "lit.example"},
                },
                {
                    "match": {"prefix": "/auto"},
                    "route": {"cluster": "c", "auto_host_rewrite": True},
                },
            ]
        )
    )
    si = stream_info()

    def run(
        path: str, headers: list[tuple[str, str]] = (), envoy_headers: bool = True
    ) -> RequestHeaders:  # type: ignore[assignment]
        h = req(path, host="orig:1", headers=headers)
        r = table.route(h)
        assert r is not None
        r.finalize_request_headers(h, si, insert_envoy_headers=envoy_headers)
        return h

    h = run("/hh", [("x-host", "fromhdr")])
    assert h.authority == b"fromhdr" and h.get(b"x-envoy-original-host") == b"orig:1"
    h = run("/hh")
    assert h.authority == b"orig:1" and h.get(b"x-envoy-original-host") is None
    h = run("/hr/abc/def?x")
    assert h.authority == b"abc.example" and h.get(b"x-envoy-original-host") == b"orig:1"
    h = run("/xfh", [("x-forwarded-host", "a.example")])
    assert h.authority == b"lit.example" and h.get_all(b"x-forwarded-host") == [b"a.example,orig:1"]
    h = run("/xfh", envoy_headers=False)  # suppress_envoy_headers: no x-envoy-original-host
    assert h.get(b"x-forwarded-host") == b"orig:1" and h.get(b"x-envoy-original-host") is None
    h = run("/lit")
    assert h.authority == b"lit.example" and h.get(b"x-forwarded-host") is None
    auto = table.route(req("/auto"))
    assert auto is not None and auto.auto_host_rewrite and auto.host_rewrite_literal is None


# --- redirects and direct responses ---------------------------------------------------------------

REDIRECT_ROUTES = [
    {"match": {"prefix": "/https"}, "redirect": {"https_redirect": True}},
    {"match": {"prefix": "/scheme"}, "redirect": {"scheme_redirect": "ftp"}},
    {"match": {"prefix": "/host"}, "redirect": {"host_redirect": "new.example"}},
    {"match": {"prefix": "/port"}, "redirect": {"port_redirect": 8443}},
    {
        "match": {"prefix": "/hp"},
        "redirect": {"host_redirect": "new.example", "port_redirect": 8443, "https_redirect": True},
    },
    {"match": {"prefix": "/path"}, "redirect": {"path_redirect": "/other"}},
    {"match": {"prefix": "/pq"}, "redirect": {"path_redirect": "/other?a=b", "strip_query": True}},
    {"match": {"prefix": "/nos"}, "redirect": {"path_redirect": "noslash"}},
    {"match": {"prefix": "/strip"}, "redirect": {"strip_query": True}},
    {"match": {"prefix": "/pre/"}, "redirect": {"prefix_rewrite": "/post/"}},
    {"match": {"safe_regex": {"regex": "/rx/.*"}}, "redirect": {"prefix_rewrite": "/rxp"}},
    {
        "match": {"prefix": "/rr/"},
        "redirect": {
            "regex_rewrite": {"pattern": {"regex": "^/rr/(.*)$"}, "substitution": "/x/\\1"}
        },
    },
    {"match": {"prefix": "/c302"}, "redirect": {"response_code": "FOUND"}},
    {"match": {"prefix": "/c303"}, "redirect": {"response_code": "SEE_OTHER"}},
    {"match": {"prefix": "/c307"}, "redirect": {"response_code": "TEMPORARY_REDIRECT"}},
    {"match": {"prefix": "/c308"}, "redirect": {"response_code": "PERMANENT_REDIRECT"}},
]


# Observed Location values and status codes (the request's x-forwarded-proto is "http").
@pytest.mark.parametrize(
    "path,host,xfp,status,location",
    [
        ("/https?x=1", "foo.com", "http", 301, "https://foo.com/https?x=1"),
        ("/https", "foo.com:80", "http", 301, "https://foo.com/https"),
        ("/https", "foo.com:8080", "http", 301, "https://foo.com:8080/https"),
        ("/https", "foo.com:443", "http", 301, "https://foo.com:443/https"),
        ("/https", "foo.com", "https", 301, "https://foo.com/https"),
        ("/scheme", "foo.com:80", "http", 301, "ftp://foo.com/scheme"),
        ("/host?z", "foo.com:8080", "http", 301, "http://new.example/host?z"),
        ("/port", "foo.com:8080", "http", 301, "http://foo.com:8443/port"),
        ("/port", "[::1]:8080", "http", 301, "http://[::1]:8443/port"),
        ("/port", "[::1]", "http", 301, "http://[::1]:8443/port"),
        ("/hp?q", "foo.com:80", "http", 301, "https://new.example:8443/hp?q"),
        ("/path/a?q=1", "foo.com", "http", 301, "http://foo.com/other?q=1"),
        ("/pq?q=1", "foo.com", "http", 301, "http://foo.com/other?a=b"),
        ("/nos", "foo.com", "http", 301, "http://foo.com/noslash"),
        ("/strip/a?q=1", "foo.com", "http", 301, "http://foo.com/strip/a"),
        ("/pre/a/b?q", "foo.com", "http", 301, "http://foo.com/post/a/b?q"),
        ("/rx/a/b?q", "foo.com", "http", 301, "http://foo.com/rxp?q"),
        ("/rr/a/b?q", "foo.com", "http", 301, "http://foo.com/x/a/b?q"),
        ("/c302", "foo.com", "http", 302, "http://foo.com/c302"),
        ("/c303", "foo.com", "http", 303, "http://foo.com/c303"),
        ("/c307", "foo.com", "http", 307, "http://foo.com/c307"),
        ("/c308", "foo.com", "http", 308, "http://foo.com/c308"),
    ],
)
def test_redirects(path: str, host: str, xfp: str, status: int, location: str) -> None:
    table = build(one_vhost(REDIRECT_ROUTES))
    headers = req(path, host=host, headers=[("x-forwarded-proto", xfp)])
    route = table.route(headers)
    assert route is not None and route.redirect is not None
    assert route.redirect.response_code == status
    assert route.redirect.location(headers) == location.encode()
    assert route.location(headers) == location.encode()


def test_redirect_prefix_rewrite_also_rewrites_request_path() -> None:
    # Observed: Envoy's access log showed %REQ(:PATH)% = /post/x?y and
    # %REQ(X-ENVOY-ORIGINAL-PATH)% = /pre/x?y for a prefix_rewrite redirect.
    table = build(one_vhost(REDIRECT_ROUTES))
    headers = req("/pre/x?y", host="foo.com")
    route = table.route(headers)
    assert route is not None
    location = route.location(headers)
    route.rewrite_path(headers)
    assert location == b"http://foo.com/post/x?y"
    assert headers.path == b"/post/x?y" and headers.get(b"x-envoy-original-path") == b"/pre/x?y"


def test_direct_responses_and_location() -> None:  # observed: 201 and 3xx carry a Location
    (tmp_body := __import__("tempfile").NamedTemporaryFile("wb", delete=False)).write(
        b"file-body\n"
    )
    tmp_body.close()
    table = build(
        one_vhost(
            [
                {"match": {"prefix": "/d302"}, "direct_response": {"status": 302}},
                {
                    "match": {"prefix": "/d201"},
                    "direct_response": {"status": 201, "body": {"inline_string": "made"}},
                },
                {"match": {"prefix": "/d200"}, "direct_response": {"status": 200}},
                {
                    "match": {"prefix": "/bytes"},
                    "direct_response": {
                        "status": 200,
                        "body": {"inline_bytes": base64.b64encode(b"hello").decode()},
                    },
                },
                {
                    "match": {"prefix": "/file"},
                    "direct_response": {"status": 503, "body": {"filename": tmp_body.name}},
                },
            ]
        )
    )
    cases = {
        "/d302?q": ((302, b""), b"http://foo.com/d302?q"),
        "/d201": ((201, b"made"), b"http://foo.com/d201"),
        "/d200": ((200, b""), None),
        "/bytes": ((200, b"hello"), None),
        "/file": ((503, b"file-body\n"), None),
    }
    for path, (direct, location) in cases.items():
        headers = req(path, host="foo.com")
        route = table.route(headers)
        assert route is not None and route.direct_response == direct and route.redirect is None
        assert route.location(headers) == location


def test_require_tls() -> None:  # observed
    routes = [
        dr("r", {"prefix": "/"}, response_headers_to_add=[{"header": {"key": "x-r", "value": "1"}}])
    ]
    table = build(
        {
            "name": "rc",
            "virtual_hosts": [
                {
                    "name": "tls",
                    "domains": ["tls.com", "tls.com:*"],
                    "require_tls": "ALL",
                    "routes": routes,
                },
                {
                    "name": "ext",
                    "domains": ["ext.com"],
                    "require_tls": "EXTERNAL_ONLY",
                    "routes": routes,
                },
            ],
        }
    )
    h = req("/d200?q", host="tls.com", headers=[("x-forwarded-proto", "http")])
    r = table.route(h)
    assert r is not None and r.redirect is not None and r.redirect.response_code == 301
    assert r.location(h) == b"https://tls.com/d200?q"
    h = req("/d200", host="tls.com:8080", headers=[("x-forwarded-proto", "http")])
    assert table.route(h).location(h) == b"https://tls.com:8080/d200"  # type: ignore[union-attr]
    rh = ResponseHeaders(301)
    r.finalize_response_headers(rh, stream_info())
    assert rh.get(b"x-r") is None  # the TLS redirect adds no configured headers
    assert (
        route_name(table, req("/", host="tls.com", headers=[("x-forwarded-proto", "https")])) == "r"
    )
    assert (
        table.route(req("/", host="ext.com", headers=[("x-forwarded-proto", "http")])).redirect
        is not None
    )  # type: ignore[union-attr]
    internal = req(
        "/", host="ext.com", headers=[("x-forwarded-proto", "http"), ("x-envoy-internal", "true")]
    )
    assert route_name(table, internal) == "r"


# --- header mutations --------------------------------------------------------------------------------


def _hv(key: str, value: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"header": {"key": key, "value": value}}
    d.update(kw)
    return d


OW = {"append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _mutation_config(most_specific_wins: bool) -> dict[str, Any]:
    return {
        "name": "rc",
        "most_specific_header_mutations_wins": most_specific_wins,
        "request_headers_to_add": [
            _hv("x-lvl", "global"),
            _hv("x-ov", "global", **OW),
            _hv("x-abs", "global", append_action="ADD_IF_ABSENT"),
            _hv("x-g", "g"),
        ],
        "request_headers_to_remove": ["x-rm-global"],
        "response_headers_to_add": [_hv("x-lvl", "global"), _hv("x-ov", "global", **OW)],
        "virtual_hosts": [
            {
                "name": "v",
                "domains": ["*"],
                "request_headers_to_add": [
                    _hv("x-lvl", "vhost"),
                    _hv("x-ov", "vhost", **OW),
                    _hv("x-abs", "vhost", append_action="ADD_IF_ABSENT"),
                ],
                "request_headers_to_remove": ["x-g", "x-rm-vh"],
                "response_headers_to_add": [_hv("x-lvl", "vhost"), _hv("x-ov", "vhost", **OW)],
                "routes": [
                    {
                        "match": {"prefix": "/a"},
                        "route": {"cluster": "echo"},
                        "request_headers_to_add": [
                            _hv("x-lvl", "route"),
                            _hv("x-ov", "route", **OW),
                            _hv("x-abs", "route", append_action="ADD_IF_ABSENT"),
                            _hv("x-oie", "route", append_action="OVERWRITE_IF_EXISTS"),
                            _hv("x-oie2", "route", append_action="OVERWRITE_IF_EXISTS"),
                            _hv("x-empty", "%REQ(x-missing)%"),
                            _hv("x-empty-keep", "%REQ(x-missing)%", keep_empty_value=True),
                            _hv("x-lit-empty", ""),
                            _hv("x-legacy-false", "lf", append=False),
                            _hv("x-legacy-true", "lt", append=True),
                            _hv(
                                "x-fmt",
                                "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|%PROTOCOL%|%REQ(x-in)%|%UPSTREAM_HOST%|"
                                "%RESPONSE_CODE%|%ROUTE_NAME%|%REQ(:path)%|%REQ(host)%|%REQ(:authority)%",
                            ),
                            _hv("x-self", "%REQ(x-in)%-self", **OW),
                            _hv("x-in", "changed", **OW),
                            _hv("x-rm-route", "re-added"),
                            _hv("Upper-Case", "u"),
                        ],
                        "request_headers_to_remove": ["x-rm-route", "x-in-remove"],
                        "response_headers_to_add": [
                            _hv("x-lvl", "route"),
                            _hv("x-ov", "route", **OW),
                            _hv(
                                "x-rfmt",
                                "%RESP(x-up)%|%REQ(x-in)%|%RESPONSE_CODE%|%UPSTREAM_CLUSTER%",
                            ),
                        ],
                        "response_headers_to_remove": ["x-up-rm"],
                    }
                ],
            }
        ],
    }


CLIENT_HEADERS = [
    ("x-lvl", "client"),
    ("x-ov", "client"),
    ("x-abs", "client"),
    ("x-oie2", "client"),
    ("x-in", "original"),
    ("x-in-remove", "1"),
    ("x-rm-global", "1"),
    ("x-rm-vh", "1"),
    ("x-rm-route", "1"),
    ("x-legacy-false", "c"),
    ("x-legacy-true", "c"),
]
FMT = "127.0.0.1|HTTP/1.1|original||0||/a|h.example|h.example"

# The upstream request headers real Envoy sent (minus host and the headers the connection
# manager/router add themselves: user-agent, accept, x-forwarded-proto, x-request-id,
# x-envoy-expected-rq-timeout-ms), in wire order.
EXPECTED_REQUEST_LEAST_SPECIFIC_WINS = [
    ("x-lvl", "client"),
    ("x-abs", "client"),
    ("x-legacy-true", "c"),
    ("x-oie2", "route"),
    ("x-legacy-false", "lf"),
    ("x-self", "original-self"),
    ("x-in", "changed"),
    ("x-lvl", "route"),
    ("x-empty-keep", ""),
    ("x-legacy-true", "lt"),
    ("x-fmt", FMT),
    ("x-rm-route", "re-added"),
    ("upper-case", "u"),
    ("x-lvl", "vhost"),
    ("x-ov", "global"),
    ("x-lvl", "global"),
    ("x-g", "g"),
]
EXPECTED_REQUEST_MOST_SPECIFIC_WINS = [
    ("x-lvl", "client"),
    ("x-abs", "client"),
    ("x-legacy-true", "c"),
    ("x-lvl", "global"),
    ("x-lvl", "vhost"),
    ("x-ov", "route"),
    ("x-oie2", "route"),
    ("x-legacy-false", "lf"),
    ("x-self", "original-self"),
    ("x-in", "changed"),
    ("x-lvl", "route"),
    ("x-empty-keep", ""),
    ("x-legacy-true", "lt"),
    ("x-fmt", FMT),
    ("x-rm-route", "re-added"),
    ("upper-case", "u"),
]


@pytest.mark.parametrize(
    "most_specific_wins,expected_request,expected_response",
    [
        (
            False,
            EXPECTED_REQUEST_LEAST_SPECIFIC_WINS,
            [
                ("x-lvl", "route"),
                ("x-rfmt", "|changed|200|echo"),
                ("x-lvl", "vhost"),
                ("x-ov", "global"),
                ("x-lvl", "global"),
            ],
        ),
        (
            True,
            EXPECTED_REQUEST_MOST_SPECIFIC_WINS,
            [
                ("x-lvl", "global"),
                ("x-lvl", "vhost"),
                ("x-ov", "route"),
                ("x-lvl", "route"),
                ("x-rfmt", "|changed|200|echo"),
            ],
        ),
    ],
)
def test_header_mutation_order_and_precedence(
    most_specific_wins: bool,
    expected_request: list[tuple[str, str]],
    expected_response: list[tuple[str, str]],
) -> None:  # observed with an echo upstream, both settings of most_specific_header_mutations_wins
    table = build(_mutation_config(most_specific_wins))
    headers = req("/a", host="h.example", headers=CLIENT_HEADERS)
    route = table.route(headers)
    assert route is not None
    si = stream_info()
    route.finalize_request_headers(headers, si)
    assert [(k.decode(), v.decode()) for k, v in headers.headers] == expected_request

    si.response_code = 200
    si.upstream_cluster = "echo"
    response = ResponseHeaders(200, [[b"x-up-rm", b"1"]])
    route.finalize_response_headers(response, si, headers)
    assert [(k.decode(), v.decode()) for k, v in response.headers] == expected_response


def test_header_value_formatting_and_literals() -> None:
    table = build(
        one_vhost(
            [
                {
                    "name": "named",
                    "match": {"prefix": "/"},
                    "route": {"cluster": "c"},
                    "request_headers_to_add": [
                        _hv("x-pct", "100%% sure"),
                        _hv("x-route", "%ROUTE_NAME%"),
                        _hv("x-raw", ""),
                    ],
                    "response_headers_to_add": [
                        # raw_value is ignored by Envoy 1.40's route header mutations (observed:
                        # the header is not added at all).
                        {
                            "header": {
                                "key": "x-raw-only",
                                "raw_value": base64.b64encode(b"raw").decode(),
                            }
                        },
                        _hv("x-keep", "", keep_empty_value=True),
                    ],
                }
            ]
        )
    )
    si = stream_info()
    si.route_name = "named"
    headers = req("/")
    route = table.route(headers)
    assert route is not None
    route.finalize_request_headers(headers, si)
    assert headers.get(b"x-pct") == b"100% sure"
    assert headers.get(b"x-route") == b"named"
    assert b"x-raw" not in headers
    response = ResponseHeaders(200)
    route.finalize_response_headers(response, si)
    assert b"x-raw-only" not in response and response.get(b"x-keep") == b""


# --- errors -------------------------------------------------------------------------------------------


def _err(config: dict[str, Any], **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(config, **kw)
    return info.value


def _vhost(
    routes: list[dict[str, Any]], domains: list[str] | None = None, name: str = "v", **kw: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "domains": domains or ["*"], "routes": routes}
    d.update(kw)
    return d


DR = {"direct_response": {"status": 200}}


# Messages are real Envoy 1.40's (``envoy --mode validate``), paths are pyenvoy's.
@pytest.mark.parametrize(
    "config,message,path",
    [
        (
            {
                "name": "rc",
                "virtual_hosts": [_vhost([], ["a.com"], "v1"), _vhost([], ["A.com"], "v2")],
            },
            "Only unique values for domains are permitted. Duplicate entry of domain a.com in route rc",
            "route_config.virtual_hosts[1].domains[0]",
        ),
        (
            {"name": "rc", "virtual_hosts": [_vhost([], ["*"], "v1"), _vhost([], ["*"], "v2")]},
            "Only a single wildcard domain is permitted in route rc",
            "route_config.virtual_hosts[1].domains[0]",
        ),
        (
            {"name": "rc", "virtual_hosts": [_vhost([], ["a.com", "a.com"])]},
            "Only unique values for domains are permitted. Duplicate entry of domain a.com in route rc",
            "route_config.virtual_hosts[0].domains[1]",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}},
                    }
                ]
            ),
            "Sum of weights in the weighted_cluster must be greater than 0.",
            "route_config.virtual_hosts[0].routes[0].route.weighted_clusters",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "weighted_clusters": {
                                "clusters": [{"name": "a", "cluster_header": "x", "weight": 1}]
                            }
                        },
                    }
                ]
            ),
            "Only one of name or cluster_header can be specified",
            "route_config.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0]",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "x" * 5000}},
                    }
                ]
            ),
            "response body size is 5000 bytes; maximum is 4096",
            "route_config.virtual_hosts[0].routes[0].direct_response.body",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"filename": "/nonexistent/x"}},
                    }
                ]
            ),
            "file /nonexistent/x does not exist",
            "route_config.virtual_hosts[0].routes[0].direct_response.body.filename",
        ),
        (
            one_vhost(
                [{"match": {"prefix": "/"}, **DR, "request_headers_to_add": [_hv(":path", "x")]}]
            ),
            ":-prefixed or host headers may not be modified",
            "route_config.virtual_hosts[0].routes[0].request_headers_to_add[0].header.key",
        ),
        (
            one_vhost(
                [{"match": {"prefix": "/"}, **DR, "request_headers_to_add": [_hv("Host", "x")]}]
            ),
            ":-prefixed or host headers may not be modified",
            "route_config.virtual_hosts[0].routes[0].request_headers_to_add[0].header.key",
        ),
        (
            one_vhost([{"match": {"prefix": "/"}, **DR, "request_headers_to_remove": ["host"]}]),
            ":-prefixed or host headers may not be removed",
            "route_config.virtual_hosts[0].routes[0].request_headers_to_remove[0]",
        ),
        (
            one_vhost(
                [{"match": {"prefix": "/"}, **DR, "response_headers_to_remove": [":status"]}]
            ),
            ":-prefixed or host headers may not be removed",
            "route_config.virtual_hosts[0].routes[0].response_headers_to_remove[0]",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        **DR,
                        "request_headers_to_add": [
                            _hv("x", "x", append=True, append_action="ADD_IF_ABSENT")
                        ],
                    }
                ]
            ),
            "Both append and append_action are set and it's not allowed",
            "route_config.virtual_hosts[0].routes[0].request_headers_to_add[0]",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "c",
                            "prefix_rewrite": "/a",
                            "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"},
                        },
                    }
                ]
            ),
            "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
            "route_config.virtual_hosts[0].routes[0].route",
        ),
        (
            one_vhost(
                [{"match": {"prefix": "/"}, **DR, "request_headers_to_add": [_hv("x", "%FOO%")]}]
            ),
            "Not supported field in StreamInfo: FOO",
            "route_config.virtual_hosts[0].routes[0].request_headers_to_add[0].header.value",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {
                            "prefix": "/",
                            "headers": [
                                {
                                    "name": "x",
                                    "string_match": {
                                        "safe_regex": {"regex": "a"},
                                        "ignore_case": True,
                                    },
                                }
                            ],
                        },
                        **DR,
                    }
                ]
            ),
            "ignore_case has no effect for safe_regex.",
            "route_config.virtual_hosts[0].routes[0].match.headers[0].string_match",
        ),
        (
            one_vhost([{"match": {"prefix": "/"}}]),
            'field: "action", reason: is required',
            "route_config.virtual_hosts[0].routes[0]",
        ),
        (
            one_vhost([{"match": {}, **DR}]),
            'field: "path_specifier", reason: is required',
            "route_config.virtual_hosts[0].routes[0].match",
        ),
        (
            {"name": "rc", "virtual_hosts": [{"name": "v", "domains": [], "routes": []}]},
            "domains: value must contain at least 1 item(s)",
            "route_config.virtual_hosts[0].domains",
        ),
        (
            one_vhost([{"match": {"prefix": "/"}, "direct_response": {"status": 99}}]),
            "status: value must be inside range [200, 600)",
            "route_config.virtual_hosts[0].routes[0].direct_response.status",
        ),
        (
            one_vhost([{"match": {"path_separated_prefix": "/a/"}, **DR}]),
            'path_separated_prefix: value does not match regex pattern "^[^?#]+[^?#/]$"',
            "route_config.virtual_hosts[0].routes[0].match.path_separated_prefix",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {
                            "prefix": "/",
                            "headers": [{"name": "x", "string_match": {"prefix": ""}}],
                        },
                        **DR,
                    }
                ]
            ),
            "prefix: value length must be at least 1 characters",
            "route_config.virtual_hosts[0].routes[0].match.headers[0].string_match.prefix",
        ),
    ],
)
def test_config_errors(config: dict[str, Any], message: str, path: str) -> None:
    err = _err(config)
    assert err.message == message
    assert err.path == path


def test_bad_regex_names_the_field() -> None:
    err = _err(one_vhost([{"match": {"safe_regex": {"regex": "("}}, **DR}]))
    assert err.path == "route_config.virtual_hosts[0].routes[0].match.safe_regex.regex"
    assert "invalid regex '('" in err.message


@pytest.mark.parametrize(
    "pattern",
    [
        "a(?=b)",
        "(?<!a)b",
        "(a)\\1",
        "a*+",
        "(?>a)",
        "\\pL",
        "\\p{Greek}",
        "a\\Z",
        "[[:foo:]]",
        "\\x{41}",
    ],
)
def test_regex_constructs_re2_lacks_are_rejected(pattern: str) -> None:
    with pytest.raises(ConfigError):
        compile_regex(pattern)


def test_re2_syntax_is_translated() -> None:
    assert compile_regex("a\\z").fullmatch(b"a")
    assert compile_regex("(?<name>x)y").fullmatch(b"xy")
    assert compile_regex("[[:digit:]]+").fullmatch(b"123")
    assert not compile_regex("[[:digit:]]+").fullmatch(b"12a")
    assert compile_regex("\\d{3}").fullmatch(b"123")
    assert not compile_regex("\\d").fullmatch("٣".encode())  # RE2's \d is ASCII-only


def test_validate_clusters() -> None:
    known = {"c1"}.__contains__
    ok = one_vhost([{"match": {"prefix": "/"}, "route": {"cluster": "c1"}}])
    build(ok, validate_clusters=known)
    bad = one_vhost([{"match": {"prefix": "/"}, "route": {"cluster": "nope"}}])
    err = _err(bad, validate_clusters=known)
    assert err.message == "route: unknown cluster 'nope'"  # real Envoy's text
    assert err.path == "route_config.virtual_hosts[0].routes[0].route.cluster"
    build(dict(bad, validate_clusters=False), validate_clusters=known)  # the config can opt out
    build(bad)  # no validator (e.g. RDS): accepted
    weighted = one_vhost(
        [
            {
                "match": {"prefix": "/"},
                "route": {"weighted_clusters": {"clusters": [{"name": "nope", "weight": 1}]}},
            }
        ]
    )
    assert (
        _err(weighted, validate_clusters=known).message == "route: unknown weighted cluster 'nope'"
    )
    mirror = one_vhost(
        [
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "c1", "request_mirror_policies": [{"cluster": "nope"}]},
            }
        ]
    )
    assert _err(mirror, validate_clusters=known).message == "route: unknown shadow cluster 'nope'"
    # Direct responses and cluster_header routes name no cluster to check.
    build(
        one_vhost(
            [
                {"match": {"prefix": "/"}, "route": {"cluster_header": "x"}},
                {"match": {"prefix": "/"}, **DR},
            ]
        ),
        validate_clusters=known,
    )


@pytest.mark.parametrize(
    "config,path",
    [
        (
            {
                "name": "rc",
                "virtual_hosts": [_vhost([], rate_limits=[{"actions": [{"remote_address": {}}]}])],
            },
            "route_config.virtual_hosts[0].rate_limits",
        ),
        (
            {"name": "rc", "virtual_hosts": [_vhost([], cors={"allow_credentials": True})]},
            "route_config.virtual_hosts[0].cors",
        ),
        (
            {
                "name": "rc",
                "virtual_hosts": [
                    _vhost([], virtual_clusters=[{"name": "vc", "headers": [{"name": ":path"}]}])
                ],
            },
            "route_config.virtual_hosts[0].virtual_clusters",
        ),
        (
            {"name": "rc", "virtual_hosts": [_vhost([], hedge_policy={"initial_requests": 2})]},
            "route_config.virtual_hosts[0].hedge_policy",
        ),
        ({"name": "rc", "vhds": {"config_source": {"ads": {}}}}, "route_config.vhds"),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "c",
                            "rate_limits": [{"actions": [{"remote_address": {}}]}],
                        },
                    }
                ]
            ),
            "route_config.virtual_hosts[0].routes[0].route.rate_limits",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "c",
                            "max_stream_duration": {"grpc_timeout_header_max": "1s"},
                        },
                    }
                ]
            ),
            "route_config.virtual_hosts[0].routes[0].route.max_stream_duration.grpc_timeout_header_max",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "route": {"cluster": "c", "internal_redirect_policy": {}},
                    }
                ]
            ),
            "route_config.virtual_hosts[0].routes[0].route.internal_redirect_policy",
        ),
        (
            one_vhost([{"match": {"prefix": "/", "tls_context": {"presented": True}}, **DR}]),
            "route_config.virtual_hosts[0].routes[0].match.tls_context",
        ),
        (
            one_vhost(
                [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body_format": {"text_format": "x"}},
                    }
                ]
            ),
            "route_config.virtual_hosts[0].routes[0].direct_response.body_format",
        ),
        (
            one_vhost([{"match": {"prefix": "/"}, "stat_prefix": "s", **DR}]),
            "route_config.virtual_hosts[0].routes[0].stat_prefix",
        ),
        (
            one_vhost([{"match": {"prefix": "/"}, "non_forwarding_action": {}}]),
            "route_config.virtual_hosts[0].routes[0].non_forwarding_action",
        ),
    ],
)
def test_unsupported_fields_are_rejected(config: dict[str, Any], path: str) -> None:
    err = _err(config)
    assert err.path == path
    assert "not supported by pyenvoy" in err.message


def test_informational_fields_are_accepted() -> None:
    table = build(
        {
            "name": "rc",
            "metadata": {"filter_metadata": {"a": {"b": 1}}},
            "internal_only_headers": ["X-Internal"],
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "metadata": {"filter_metadata": {"a": {"b": 1}}},
                    "routes": [
                        {
                            "name": "r",
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": "c",
                                "upgrade_configs": [{"upgrade_type": "WebSocket"}],
                            },
                            "decorator": {"operation": "op"},
                            "metadata": {"filter_metadata": {"a": {"b": 1}}},
                        }
                    ],
                }
            ],
        }
    )
    r = table.route(req("/"))
    assert r is not None and r.decorator.operation == "op"
    assert r.upgrade_configs == {"websocket": True}
    assert table.internal_only_headers == (b"x-internal",)


def test_header_formatters_see_the_request_before_rewrites() -> None:
    # Observed: upstream got path /new/x, host lit, and x-p: /pr/x|orig| -- Envoy formats
    # header values before it rewrites :authority and :path.
    table = build(
        one_vhost(
            [
                {
                    "match": {"prefix": "/pr/"},
                    "route": {
                        "cluster": "c",
                        "prefix_rewrite": "/new/",
                        "host_rewrite_literal": "lit",
                    },
                    "request_headers_to_add": [
                        _hv("x-p", "%REQ(:PATH)%|%REQ(:AUTHORITY)%|%REQ(x-envoy-original-path)%")
                    ],
                }
            ]
        )
    )
    headers = req("/pr/x", host="orig")
    route = table.route(headers)
    assert route is not None
    route.finalize_request_headers(headers, stream_info())
    route.rewrite_path(headers)
    assert headers.path == b"/new/x" and headers.authority == b"lit"
    assert headers.get(b"x-p") == b"/pr/x|orig|"
