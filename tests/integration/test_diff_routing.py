"""Differential tests: route table semantics (configs/routing.yaml) against Envoy and pyenvoy.

Virtual host selection, route matchers, direct_response, redirect, rewrites and
request/response header mutations at the three levels. Expected values are what real
Envoy 1.40 does (see /work/notes/envoy_facts.md sections 9-14).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.expect import UUID4_RE, assert_date, names
from tests.support.procs import ProxyProcess, RawResponse, exchange

CONFIG = "routing.yaml"

# response_headers_to_add of the default virtual host, then of the route_config.
VH_RESP = [("x-resp-level", "vhost"), ("x-resp-level", "global")]
GLOBAL_RESP = [("x-resp-level", "global")]


def get(
    proxy: ProxyProcess,
    host: str,
    path: str,
    headers: tuple[tuple[str, str], ...] = (),
    method: str = "GET",
) -> RawResponse:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    data = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
    ex = exchange(
        proxy.listener_port, data, head=frozenset({0}) if method == "HEAD" else frozenset()
    )
    return ex.response


def direct_body(resp: RawResponse) -> str:
    """The inline body of a direct_response, or 'upstream' when it was proxied."""
    if resp.header("x-envoy-upstream-service-time") is not None:
        return "upstream"
    return resp.body.decode()


def echo(resp: RawResponse) -> dict[str, Any]:
    assert resp.status == 200, resp
    return json.loads(resp.body)


# -- virtual hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, expected",
    [
        ("exact.example.com", "vh=exact"),
        ("EXACT.Example.COM", "vh=exact"),
        ("exact.example.com:1234", "upstream"),  # the port is part of the match
        ("a.example.com", "vh=suffix"),
        ("deep.example.com", "vh=suffix"),
        ("x.deep.example.com", "vh=longer_suffix"),
        ("example.com", "upstream"),
        ("api.foo", "vh=prefix"),
        ("api.", "upstream"),  # the wildcard matches at least one character
        ("api.example.com", "vh=suffix"),  # suffix wildcards beat prefix wildcards
        ("port.test:8080", "vh=withport"),
        ("port.test", "upstream"),
        ("other", "upstream"),
    ],
)
def test_virtual_host_selection(proxy: ProxyProcess, host: str, expected: str) -> None:
    resp = get(proxy, host, "/")
    assert resp.status == 200, resp
    assert direct_body(resp) == expected


# -- route matchers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, headers, expected",
    [
        ("/exact", (), "route=path"),
        ("/exact?q=1", (), "route=path"),
        ("/exact/", (), "upstream"),
        ("/exact%2F", (), "upstream"),  # no path normalization by default
        ("/re/123", (), "route=regex"),
        ("/re/123?x=y", (), "route=regex"),
        ("/re/12a", (), "upstream"),  # the regex must match the whole path
        ("/hdr", (), "route=hdr_absent"),
        ("/hdr", (("x-tenant", "blue"),), "route=hdr_exact"),
        ("/hdr", (("x-tenant", "red"),), "route=hdr_present"),
        ("/hdr", (("x-tenant", ""),), "route=hdr_present"),
        ("/hdr", (("x-tenant", "blue,red"),), "route=hdr_present"),
        ("/hdr", (("X-Tenant", "blue"), ("x-tenant", "red")), "route=hdr_exact"),
        ("/hdr", (("x-tenant", "red"), ("x-tenant", "blue")), "route=hdr_exact"),
        ("/qp?debug=1", (), "route=qp_exact"),
        ("/qp?debug=1&debug=2", (), "route=qp_exact"),
        ("/qp?debug=2&debug=1", (), "route=qp_none"),  # only the first occurrence counts
        ("/qp?debug=%31", (), "route=qp_none"),  # values are not percent-decoded
        ("/qp?debug=2&mode", (), "route=qp_present"),
        ("/qp?mode=", (), "route=qp_present"),
        ("/qp?x", (), "route=qp_none"),
        ("/case/x", (), "route=case_insensitive"),
        ("/CASE", (), "route=case_insensitive"),
        ("/Sens", (), "route=case_sensitive"),
        ("/sens", (), "upstream"),
    ],
)
def test_route_matching(
    proxy: ProxyProcess, path: str, headers: tuple[tuple[str, str], ...], expected: str
) -> None:
    resp = get(proxy, "other", path, headers)
    assert resp.status == 200, resp
    assert direct_body(resp) == expected


# -- direct_response -------------------------------------------------------------------------


def test_direct_response_with_body(proxy: ProxyProcess) -> None:
    resp = get(proxy, "other", "/exact")
    assert (resp.status, resp.reason, resp.body) == (200, "OK", b"route=path")
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == VH_RESP + [
        ("content-length", "10"),
        ("content-type", "text/plain"),
        ("date", "*"),
        ("server", "envoy"),
    ]
    assert_date(resp)


def test_direct_response_virtual_host_without_vhost_headers(proxy: ProxyProcess) -> None:
    resp = get(proxy, "exact.example.com", "/")
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == GLOBAL_RESP + [
        ("content-length", "8"),
        ("content-type", "text/plain"),
        ("date", "*"),
        ("server", "envoy"),
    ]


def test_direct_response_without_body(proxy: ProxyProcess) -> None:
    resp = get(proxy, "other", "/direct404")
    assert (resp.status, resp.reason, resp.body) == (404, "Not Found", b"")
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == VH_RESP + [("date", "*"), ("server", "envoy"), ("content-length", "0")]


def test_direct_response_503_with_body(proxy: ProxyProcess) -> None:
    resp = get(proxy, "other", "/direct503")
    assert (resp.status, resp.reason, resp.body) == (503, "Service Unavailable", b"custom down")
    assert resp.header("content-type") == "text/plain"
    assert resp.header("content-length") == "11"


def test_direct_response_to_head(proxy: ProxyProcess) -> None:
    resp = get(proxy, "other", "/exact", method="HEAD")
    assert resp.status == 200 and resp.body == b""
    assert resp.header("content-length") == "10"


def test_direct_response_before_request_body_closes(proxy: ProxyProcess) -> None:
    """A direct response sent while the request body is unread ends the connection."""
    ex = exchange(
        proxy.listener_port,
        b"POST /exact HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\n\r\nabc",
        wait_close=3,
    )
    resp = ex.response
    assert (resp.status, resp.body) == (200, b"route=path")
    assert resp.headers[-1] == ("connection", "close")
    assert ex.closed


def test_no_route_in_virtual_host_has_no_added_headers(proxy: ProxyProcess) -> None:
    resp = get(proxy, "redirect.test", "/nomatch")
    assert (resp.status, resp.body) == (404, b"")
    assert names(resp) == ["date", "server", "content-length"]


# -- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, path, headers, status, reason, location",
    [
        ("redirect.test", "/https", (), 301, "Moved Permanently", "https://redirect.test/https"),
        (
            "redirect.test",
            "/https?a=b",
            (),
            301,
            "Moved Permanently",
            "https://redirect.test/https?a=b",
        ),
        ("REDIRECT.test", "/https", (), 301, "Moved Permanently", "https://REDIRECT.test/https"),
        ("redirect.test", "/host?a=1", (), 308, "Permanent Redirect", "http://new.test/host?a=1"),
        ("redirect.test", "/path?a=1", (), 302, "Found", "http://redirect.test/new/path?a=1"),
        (
            "redirect.test",
            "/path",
            (("X-Forwarded-Proto", "https"),),
            302,
            "Found",
            "https://redirect.test/new/path",
        ),
        ("redirect.test", "/strip?a=1", (), 303, "See Other", "http://redirect.test/stripped"),
        (
            "redirect.test",
            "/pre/x/y?z=1",
            (),
            307,
            "Temporary Redirect",
            "http://redirect.test/post/x/y?z=1",
        ),
        ("redirect.test", "/port", (), 301, "Moved Permanently", "https://redirect.test:8443/port"),
    ],
)
def test_redirect(
    proxy: ProxyProcess,
    host: str,
    path: str,
    headers: tuple[tuple[str, str], ...],
    status: int,
    reason: str,
    location: str,
) -> None:
    resp = get(proxy, host, path, headers)
    assert (resp.status, resp.reason, resp.body) == (status, reason, b""), resp
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == [("location", location)] + GLOBAL_RESP + [
        ("date", "*"),
        ("server", "envoy"),
        ("content-length", "0"),
    ]


# -- rewrites --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, upstream_path",
    [
        ("/rewrite/a/b?q=1", "/echo/a/b?q=1"),
        ("/rewrite/%41b", "/echo/%41b"),
        ("/rewrite_root/a", "/a"),
        ("/regex_rewrite/abc/123", "/echo/123/abc"),
        ("/regex_rewrite/abc/123?k=v", "/echo/123/abc?k=v"),
    ],
)
def test_path_rewrites(proxy: ProxyProcess, path: str, upstream_path: str) -> None:
    doc = echo(get(proxy, "other:99", path))
    assert doc["path"] == upstream_path
    hdrs = [tuple(h) for h in doc["headers"]]
    assert hdrs[0] == ("host", "other:99")
    assert hdrs[-1] == ("x-envoy-original-path", path)


def test_host_rewrite_literal(proxy: ProxyProcess) -> None:
    doc = echo(get(proxy, "other:99", "/host_rewrite"))
    hdrs = [tuple(h) for h in doc["headers"]]
    assert doc["path"] == "/echo"
    assert hdrs[0] == ("host", "rewritten.test")
    assert hdrs[-2:] == [
        ("x-envoy-original-host", "other:99"),
        ("x-envoy-original-path", "/host_rewrite"),
    ]


# -- header mutations ------------------------------------------------------------------------


def test_request_and_response_header_mutations(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"GET /headers_route?x-drop-route=1&x-drop-global=1&x-keep=1&x-resp-level=upstream"
        b" HTTP/1.1\r\nHost: other\r\nx-level: client\r\nx-route-overwrite: client\r\n"
        b"x-route-if-absent: client\r\nx-vh-overwrite: client\r\nx-remove-route: 1\r\n"
        b"x-remove-vhost: 1\r\nx-remove-global: 1\r\n\r\n",
    )
    resp = ex.response
    doc = echo(resp)
    client_port = None
    upstream = []
    for k, v in doc["headers"]:
        if k == "x-request-id":
            assert UUID4_RE.match(v)
            v = "<uuid4>"
        if k == "x-global-client":
            ip, _, client_port = v.rpartition(":")
            assert ip == "127.0.0.1" and client_port.isdigit()
            v = "127.0.0.1:<port>"
        upstream.append((k, v))
    assert upstream == [
        ("host", "other"),
        ("x-level", "client"),
        ("x-route-if-absent", "client"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "<uuid4>"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
        ("x-route-overwrite", "route"),
        ("x-level", "route"),
        ("x-client-nop", "127.0.0.1"),
        ("x-vh-overwrite", "vhost"),
        ("x-level", "vhost"),
        ("x-level", "global"),
        ("x-global-client", "127.0.0.1:<port>"),
        (
            "x-envoy-original-path",
            "/headers_route?x-drop-route=1&x-drop-global=1&x-keep=1&x-resp-level=upstream",
        ),
    ]
    got = [
        (k, "*" if k in ("date", "content-length", "x-envoy-upstream-service-time") else v)
        for k, v in resp.headers
    ]
    assert got == [
        ("x-keep", "1"),
        ("x-resp-level", "upstream"),
        ("content-type", "application/json"),
        ("content-length", "*"),
        ("x-envoy-upstream-service-time", "*"),
        ("x-resp-level", "route"),
        ("x-resp-client", f"127.0.0.1:{client_port}"),
        ("x-resp-level", "vhost"),
        ("x-resp-level", "global"),
        ("date", "*"),
        ("server", "envoy"),
    ]


def test_vhost_and_global_headers_on_default_route(proxy: ProxyProcess) -> None:
    resp = get(proxy, "other", "/plain", (("x-vh-overwrite", "client"),))
    doc = echo(resp)
    hdrs = [(k, v) for k, v in doc["headers"] if k not in ("x-request-id", "x-global-client")]
    assert hdrs == [
        ("host", "other"),
        ("x-forwarded-proto", "http"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
        ("x-vh-overwrite", "vhost"),
        ("x-level", "vhost"),
        ("x-level", "global"),
    ]
    assert names(resp)[-4:] == ["x-resp-level", "x-resp-level", "date", "server"]
    assert resp.headers[-4:-2] == VH_RESP
