"""Differential tests: HTTP/1.1 connection manager + router, default and "edge" HCM.

Each test runs against real Envoy 1.40 and against pyenvoy with the same config
(configs/basic.yaml) and asserts the SAME expected values, hard-coded from what Envoy
does on the wire (see /work/notes/envoy_facts.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.support.expect import UUID4_RE, assert_local_reply, assert_proxied, names
from tests.support.procs import (
    Exchange,
    ProxyProcess,
    envoy_local_address,
    exchange,
    exchange_many,
)
from tests.support.upstream import HttpUpstream, pattern_bytes

CONFIG = "basic.yaml"

GET_ECHO = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
CONNECT_FAILURE = (
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: remote connection failure"
)
CONNECTION_TERMINATION = (
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination"
)


def echo_of(ex: Exchange, index: int = 0) -> dict[str, Any]:
    return json.loads(ex.responses[index].body)


def upstream_headers(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in doc["headers"]]


def without_request_id(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        if k == "x-request-id":
            assert UUID4_RE.match(v), headers
            v = "<uuid4>"
        out.append((k, v))
    return out


# -- proxied requests ------------------------------------------------------------------------


def test_proxied_response_headers(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, GET_ECHO)
    resp = ex.response
    assert (resp.version, resp.status, resp.reason) == ("HTTP/1.1", 200, "OK")
    assert_proxied(resp, 200, ["content-type", "content-length"])
    assert resp.header("content-type") == "application/json"
    assert int(resp.header("content-length") or -1) == len(resp.body)
    assert not ex.closed


def test_upstream_sees_request_headers(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"GET /echo/x?q=1 HTTP/1.1\r\nHost: Example.COM\r\nUser-Agent: X\r\nAccept: */*\r\n"
        b"X-Mixed-Case: Value\r\n\r\n",
    )
    doc = echo_of(ex)
    assert (doc["method"], doc["path"], doc["version"]) == ("GET", "/echo/x?q=1", "HTTP/1.1")
    assert without_request_id(upstream_headers(doc)) == [
        ("host", "Example.COM"),
        ("user-agent", "X"),
        ("accept", "*/*"),
        ("x-mixed-case", "Value"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "<uuid4>"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]


def test_request_ids_are_unique(proxy: ProxyProcess) -> None:
    ids = set()
    for _ in range(3):
        doc = echo_of(exchange(proxy.listener_port, GET_ECHO))
        ids.add(dict(upstream_headers(doc))["x-request-id"])
    assert len(ids) == 3


def test_client_request_id_and_forwarding_headers_kept(proxy: ProxyProcess) -> None:
    """use_remote_address false: x-request-id, XFF and x-forwarded-proto are passed as sent."""
    ex = exchange(
        proxy.listener_port,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nx-request-id: my-id-1\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n\r\n",
    )
    assert upstream_headers(echo_of(ex)) == [
        ("host", "a"),
        ("x-request-id", "my-id-1"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-proto", "https"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]


def test_client_x_envoy_headers_sanitized(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nx-envoy-internal: true\r\n"
        b"x-envoy-expected-rq-timeout-ms: 5\r\nx-envoy-foo: bar\r\n\r\n",
    )
    assert without_request_id(upstream_headers(echo_of(ex))) == [
        ("host", "a"),
        ("x-envoy-foo", "bar"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "<uuid4>"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]


def test_connection_close_from_client(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        wait_close=3,
    )
    assert_proxied(ex.response, 200, ["content-type", "content-length"], close=True)
    assert ex.closed
    assert ex.elapsed < 0.9  # closed right after the response, not after the delayed-close timer
    doc = echo_of(ex)
    assert "connection" not in dict(upstream_headers(doc))
    # The upstream connection stays pooled: the next request reuses it.
    doc2 = echo_of(exchange(proxy.listener_port, GET_ECHO))
    assert doc2["conn_id"] == doc["conn_id"]
    assert doc2["index_on_conn"] > doc["index_on_conn"]


def test_upstream_response_headers_pass_through(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"GET /headers?X-Custom=abc&Set-Cookie=a%3D1&Set-Cookie=b%3D2&cache-control=no-store "
        b"HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    resp = ex.response
    assert_proxied(
        resp,
        200,
        ["x-custom", "set-cookie", "set-cookie", "cache-control", "content-type", "content-length"],
    )
    assert resp.headers[:4] == [
        ("x-custom", "abc"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("cache-control", "no-store"),
    ]


def test_upstream_date_kept_server_overwritten_hop_by_hop_removed(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    http_upstream.raw_responses["/raw/date"] = (
        b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\nServer: upstream-x\r\n"
        b"X-Foo: Bar\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    )
    resp = exchange(proxy.listener_port, b"GET /raw/date HTTP/1.1\r\nHost: a\r\n\r\n").response
    assert resp.status == 200
    assert resp.body == b"hi"
    assert [(k, v) for k, v in resp.headers if k != "x-envoy-upstream-service-time"] == [
        ("date", "Mon, 01 Jan 2001 00:00:00 GMT"),
        ("server", "envoy"),
        ("x-foo", "Bar"),
        ("content-length", "2"),
    ]
    assert names(resp)[-1] == "x-envoy-upstream-service-time"


def test_hop_by_hop_request_headers_stripped(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Custom\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Custom: 1\r\n"
        b"TE: gzip, trailers\r\nUpgrade: foo\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    doc = echo_of(ex)
    assert without_request_id(upstream_headers(doc)) == [
        ("host", "a"),
        ("te", "trailers"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "<uuid4>"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
        ("transfer-encoding", "chunked"),
    ]
    assert doc["body_length"] == 5
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


def test_absolute_form_target(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, b"GET http://foo.com/echo HTTP/1.1\r\nHost: a\r\n\r\n")
    doc = echo_of(ex)
    assert doc["path"] == "/echo"
    assert upstream_headers(doc)[0] == ("host", "foo.com")


@pytest.mark.parametrize(
    "data, header",
    [
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", ("x-a", "b c")),
        (b"GET /echo HTTP/1.1\nHost: a\nX-Lf: 1\n\n", ("x-lf", "1")),
    ],
    ids=["obs-fold", "bare-lf"],
)
def test_lenient_parsing_accepted(
    proxy: ProxyProcess, data: bytes, header: tuple[str, str]
) -> None:
    ex = exchange(proxy.listener_port, data)
    assert ex.response.status == 200
    assert header in upstream_headers(echo_of(ex))


# -- local replies ---------------------------------------------------------------------------


def test_no_route_404(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, b"GET /nothing/here HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_local_reply(ex.response, 404, "Not Found", b"")
    # keep-alive: the same connection serves another request
    ex2 = exchange(
        proxy.listener_port,
        b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n" + GET_ECHO,
        responses=2,
    )
    assert [r.status for r in ex2.responses] == [404, 200]


def test_reply_before_request_body_complete_closes(proxy: ProxyProcess) -> None:
    # A local reply while the request body is still arriving: connection: close, the
    # connection closes after it, and Envoy counts downstream_rq_response_before_rq_complete.
    name = "http.ingress_http.downstream_rq_response_before_rq_complete"
    before = proxy.stats().get(name, 0)
    with socket.create_connection(("127.0.0.1", proxy.listener_port), timeout=5) as s:
        s.sendall(b"POST /nothing/here HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        head = data.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 404 not found")
        assert b"\r\nconnection: close" in head
    proxy.wait_stat(name, before + 1)


def test_no_healthy_upstream_503(proxy: ProxyProcess) -> None:
    before = proxy.stats().get("cluster.empty.upstream_rq_503", 0)
    ex = exchange(proxy.listener_port, b"GET /nohost HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_local_reply(ex.response, 503, "Service Unavailable", b"no healthy upstream")
    assert not ex.closed
    # The 503 is counted (and completed), but no request went out: no upstream_rq_time.
    stats = proxy.wait_stat("cluster.empty.upstream_rq_503", before + 1)
    assert stats["cluster.empty.upstream_rq_completed"] >= 1
    assert stats["cluster.empty.external.upstream_rq_5xx"] >= 1
    assert stats.get("cluster.empty.upstream_rq_time", "No recorded values") in (
        "No recorded values",
        None,
    )


def test_upstream_connection_refused_503(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, b"GET /dead HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_local_reply(ex.response, 503, "Service Unavailable", CONNECT_FAILURE)


@pytest.mark.parametrize("path", ["/close", "/reset"])
def test_upstream_disconnect_before_headers_503(proxy: ProxyProcess, path: str) -> None:
    ex = exchange(proxy.listener_port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert_local_reply(ex.response, 503, "Service Unavailable", CONNECTION_TERMINATION)


def test_route_timeout_504(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    start = time.monotonic()
    ex = exchange(proxy.listener_port, b"GET /slow/2000 HTTP/1.1\r\nHost: a\r\n\r\n")
    elapsed = time.monotonic() - start
    assert_local_reply(ex.response, 504, "Gateway Timeout", b"upstream request timeout")
    assert 0.45 <= elapsed < 1.8
    seen = [r for r in http_upstream.requests if r.target == "/delay/2000"]
    assert seen and seen[-1].header("x-envoy-expected-rq-timeout-ms") == "500"


# -- message framing -------------------------------------------------------------------------


def test_head_response_has_no_body(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"HEAD /bytes/100 HTTP/1.1\r\nHost: a\r\n\r\n" + GET_ECHO,
        responses=2,
        head=frozenset({0}),
    )
    head, nxt = ex.responses
    assert_proxied(head, 200, ["content-type", "content-length"])
    assert head.header("content-length") == "100"
    assert head.body == b""
    assert nxt.status == 200 and json.loads(nxt.body)["method"] == "GET"


@pytest.mark.parametrize("code, reason", [(204, "No Content"), (304, "Not Modified")])
def test_bodiless_statuses(proxy: ProxyProcess, code: int, reason: str) -> None:
    ex = exchange(
        proxy.listener_port,
        f"GET /status/{code} HTTP/1.1\r\nHost: a\r\n\r\n".encode() + GET_ECHO,
        responses=2,
    )
    resp = ex.responses[0]
    assert (resp.status, resp.reason) == (code, reason)
    assert_proxied(resp, code, [])
    assert resp.header("content-length") is None and resp.header("transfer-encoding") is None
    assert ex.responses[1].status == 200


def test_upstream_status_passes_through(proxy: ProxyProcess) -> None:
    resp = exchange(proxy.listener_port, b"GET /status/503 HTTP/1.1\r\nHost: a\r\n\r\n").response
    assert (resp.status, resp.reason, resp.body) == (503, "Service Unavailable", b"")
    assert_proxied(resp, 503, ["content-length"])
    assert resp.header("content-length") == "0"


def test_chunked_response_passthrough(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, b"GET /chunked/10 HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = ex.response
    assert names(resp) == [
        "content-type",
        "x-envoy-upstream-service-time",
        "date",
        "server",
        "transfer-encoding",
    ]
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.body == b"abcdefghij"
    assert ex.raw.endswith(b"\r\n\r\na\r\nabcdefghij\r\n0\r\n\r\n")


@pytest.mark.parametrize("kind", ["bytes", "chunked"])
def test_large_download(proxy: ProxyProcess, kind: str) -> None:
    n = 4_000_000
    with httpx.Client(timeout=10) as c:
        r = c.get(proxy.url(f"/{kind}/{n}"))
    assert r.status_code == 200
    assert len(r.content) == n
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(pattern_bytes(n)).hexdigest()
    if kind == "bytes":
        assert r.headers["content-length"] == str(n)
    else:
        assert r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.headers


def test_large_content_length_upload(proxy: ProxyProcess) -> None:
    body = pattern_bytes(3 * 1024 * 1024)
    with httpx.Client(timeout=10) as c:
        r = c.post(proxy.url("/echo"), content=body)
    doc = r.json()
    assert r.status_code == 200
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    hdrs = dict(upstream_headers(doc))
    assert hdrs["content-length"] == str(len(body))
    assert "transfer-encoding" not in hdrs


def test_large_chunked_upload(proxy: ProxyProcess) -> None:
    body = pattern_bytes(3 * 1024 * 1024)

    def gen():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    with httpx.Client(timeout=10) as c:
        r = c.post(proxy.url("/echo"), content=gen())
    doc = r.json()
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["chunked"] is True
    assert upstream_headers(doc)[-1] == ("transfer-encoding", "chunked")
    assert "content-length" not in dict(upstream_headers(doc))


def test_expect_100_continue(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    with socket.create_connection(("127.0.0.1", proxy.listener_port), timeout=3) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        first = s.recv(1000)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        buf = b""
        while b"\r\n\r\n" not in buf or not buf.endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    doc = json.loads(body)
    assert doc["body_length"] == 5
    hdrs = dict(upstream_headers(doc))
    assert "expect" not in hdrs
    assert hdrs["content-length"] == "5"


def test_pipelined_requests(proxy: ProxyProcess) -> None:
    # Only the FIRST request is a local reply: Envoy 1.40 closes the connection after a local
    # reply to a request that was pipelined behind another one (see envoy_facts.md).
    ex = exchange(
        proxy.listener_port,
        b"GET /nohost HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/404 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /bytes/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        responses=4,
        wait_close=3,
    )
    assert [r.status for r in ex.responses] == [503, 200, 404, 200]
    assert ex.responses[0].body == b"no healthy upstream"
    assert json.loads(ex.responses[1].body)["path"] == "/echo?n=1"
    assert ex.responses[3].body == b"abc"
    assert ex.responses[3].headers[-1] == ("connection", "close")
    assert ex.closed and ex.elapsed < 0.9
    assert ex.raw.endswith(b"abc")


def test_keepalive_reuse_both_sides(proxy: ProxyProcess) -> None:
    name = f"listener.127.0.0.1_{proxy.listener_port}.downstream_cx_total"
    before = proxy.stats()[name]
    with httpx.Client(timeout=5) as c:
        docs = [c.get(proxy.url(f"/echo?i={i}")).json() for i in range(5)]
    after = proxy.wait_stat(name, before + 1)[name]
    assert after == before + 1
    assert len({d["conn_id"] for d in docs}) == 1
    idx = [d["index_on_conn"] for d in docs]
    assert idx == sorted(idx) and len(set(idx)) == 5


# -- malformed requests (run concurrently once per proxy: Envoy delays closes by ~1 s) -----

BAD_REQUEST = (400, "Bad Request", b"Bad Request")
EMPTY_400 = (400, "Bad Request", b"")
UPGRADE_REQUIRED = (426, "Upgrade Required", b"Upgrade Required")

MALFORMED: dict[str, tuple[bytes, tuple[int, str, bytes]]] = {
    "cl-and-te": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        BAD_REQUEST,
    ),
    "bad-chunk-size": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
        b"0\r\n\r\n",
        BAD_REQUEST,
    ),
    "ctl-char-in-value": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n", BAD_REQUEST),
    "space-in-name": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX Bad: ab\r\n\r\n", BAD_REQUEST),
    "space-before-colon": (b"GET /echo HTTP/1.1\r\nHost : a\r\n\r\n", BAD_REQUEST),
    "no-colon": (b"GET /echo HTTP/1.1\r\nHost: a\r\nXBad\r\n\r\n", BAD_REQUEST),
    "garbage-request-line": (b"HELLO\r\n\r\n", BAD_REQUEST),
    "bad-method-token": (b"G@T /echo HTTP/1.1\r\nHost: a\r\n\r\n", BAD_REQUEST),
    "conflicting-content-length": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        BAD_REQUEST,
    ),
    "non-numeric-content-length": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
        BAD_REQUEST,
    ),
    "target-without-slash": (b"GET echo HTTP/1.1\r\nHost: a\r\n\r\n", BAD_REQUEST),
    "missing-host": (b"GET /echo HTTP/1.1\r\n\r\n", EMPTY_400),
    "fragment-in-target": (b"GET /echo#frag HTTP/1.1\r\nHost: a\r\n\r\n", EMPTY_400),
    "http-1.0-not-accepted": (b"GET /echo HTTP/1.0\r\nHost: a\r\n\r\n", UPGRADE_REQUIRED),
    "http-9.9": (b"GET /echo HTTP/9.9\r\nHost: a\r\n\r\n", UPGRADE_REQUIRED),
    "te-gzip": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        (501, "Not Implemented", b"Not Implemented"),
    ),
    "connect-without-route": (
        b"CONNECT foo:443 HTTP/1.1\r\nHost: foo:443\r\n\r\n",
        (404, "Not Found", b""),
    ),
}


@pytest.fixture(scope="module")
def malformed_results(proxy: ProxyProcess) -> dict[str, Exchange]:
    cases: dict[str, dict[str, Any]] = {
        name: {"data": data, "wait_close": 3.0} for name, (data, _) in MALFORMED.items()
    }
    big = b"X-Big: " + b"a" * 1100 + b"\r\n"
    edge_cases: dict[str, dict[str, Any]] = {
        "431": {"data": b"GET /echo HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n", "wait_close": 3.0}
    }
    results = exchange_many(proxy.listener_port, cases)
    results.update(exchange_many(proxy.edge_port, edge_cases))
    return results


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request(
    malformed_results: dict[str, Exchange], http_upstream: HttpUpstream, case: str
) -> None:
    status, reason, body = MALFORMED[case][1]
    ex = malformed_results[case]
    assert len(ex.responses) == 1, ex
    assert_local_reply(ex.response, status, reason, body, close=True)
    assert ex.closed, f"connection not closed: {ex}"


def test_request_headers_too_large_431(malformed_results: dict[str, Exchange]) -> None:
    ex = malformed_results["431"]
    assert_local_reply(
        ex.response,
        431,
        "Request Header Fields Too Large",
        b"Request Header Fields Too Large",
        close=True,
        server="edge-proxy",
        after_server=(("via", "test-via"),),
    )
    assert ex.closed


def test_no_route_options_star(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.listener_port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_local_reply(ex.response, 404, "Not Found", b"")


# -- the "edge" HCM: use_remote_address, server_name, via, HTTP/1.0 ---------------------------

EDGE_TAIL = (("via", "test-via"),)


def test_edge_forwarding_headers(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.edge_port, GET_ECHO)
    assert_proxied(
        ex.response,
        200,
        ["content-type", "content-length"],
        server="edge-proxy",
        after_server=EDGE_TAIL,
    )
    assert without_request_id(upstream_headers(echo_of(ex))) == [
        ("host", "a"),
        ("x-forwarded-for", envoy_local_address()),
        ("x-forwarded-proto", "http"),
        ("via", "test-via"),
        ("x-envoy-external-address", "127.0.0.1"),
        ("x-request-id", "<uuid4>"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]


def test_edge_appends_and_replaces_client_headers(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.edge_port,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nx-request-id: abc\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: https\r\nVia: 1.0 other\r\nx-envoy-retry-on: 5xx\r\n"
        b"x-envoy-upstream-rq-timeout-ms: 100\r\n\r\n",
    )
    assert without_request_id(upstream_headers(echo_of(ex))) == [
        ("host", "a"),
        ("x-request-id", "<uuid4>"),
        ("x-forwarded-for", f"1.2.3.4,{envoy_local_address()}"),
        ("x-forwarded-proto", "http"),
        ("via", "1.0 other, test-via"),
        ("x-envoy-external-address", "127.0.0.1"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]


def test_edge_http10_accepted(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.edge_port, b"GET /echo HTTP/1.0\r\n\r\n", wait_close=3)
    resp = ex.response
    assert (resp.version, resp.status, resp.reason) == ("HTTP/1.0", 200, "OK")
    assert_proxied(
        resp,
        200,
        ["content-type", "content-length"],
        close=True,
        server="edge-proxy",
        after_server=EDGE_TAIL,
    )
    doc = json.loads(resp.body)
    assert doc["version"] == "HTTP/1.1"
    assert upstream_headers(doc)[0] == ("host", "legacy.test")
    assert ex.closed and ex.elapsed < 0.9


def test_edge_http10_keep_alive(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.edge_port,
        b"GET /echo HTTP/1.0\r\nHost: h10\r\nConnection: keep-alive\r\n\r\n"
        b"GET /echo HTTP/1.0\r\nHost: h10b\r\n\r\n",
        responses=2,
        wait_close=3,
    )
    first, second = ex.responses
    assert first.version == "HTTP/1.0" and first.headers[-1] == ("connection", "keep-alive")
    assert second.headers[-1] == ("connection", "close")
    assert upstream_headers(json.loads(first.body))[0] == ("host", "h10")
    assert upstream_headers(json.loads(second.body))[0] == ("host", "h10b")
    assert ex.closed


def test_edge_http10_chunked_upstream_is_close_delimited(proxy: ProxyProcess) -> None:
    ex = exchange(proxy.edge_port, b"GET /chunked/5 HTTP/1.0\r\nHost: x\r\n\r\n", wait_close=3)
    assert ex.closed
    resp = ex.response
    assert resp.version == "HTTP/1.0"
    assert resp.header("transfer-encoding") is None and resp.header("content-length") is None
    assert resp.headers[-1] == ("connection", "close")
    assert resp.body == b"abcde"


# -- a real client: curl ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_large_upload_with_expect(proxy: ProxyProcess, tmp_path: Any) -> None:
    """curl sends Expect: 100-continue for a 2 MiB POST; Envoy answers 100 itself."""
    body = pattern_bytes(2 * 1024 * 1024)
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    out = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "10", "--data-binary", f"@{f}", proxy.url("/echo")],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert b"> Expect: 100-continue" in out.stderr
    assert b"< HTTP/1.1 100 Continue" in out.stderr
    doc = json.loads(out.stdout)
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in dict(upstream_headers(doc))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_http10(proxy: ProxyProcess) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-0", "-i", "--max-time", "5", proxy.url("/echo", "edge_port")],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr.decode()
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert head.endswith(b"\r\nconnection: close")
    doc = json.loads(body)
    assert doc["version"] == "HTTP/1.1"


# -- odd upstream responses ------------------------------------------------------------------

PROTOCOL_ERROR = (
    b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["cl-and-te", "bad-status", "bad-header-name"],
)
def test_invalid_upstream_response_502(
    proxy: ProxyProcess, http_upstream: HttpUpstream, raw: bytes
) -> None:
    http_upstream.raw_responses["/raw/invalid"] = raw
    ex = exchange(proxy.listener_port, b"GET /raw/invalid HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_local_reply(ex.response, 502, "Bad Gateway", PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"HTTP/1.1 200 Everything Fine\r\nContent-Length: 2\r\n\r\nok", "OK"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "OK"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "OK"),
        (b"HTTP/1.1 599 Weird\r\nContent-Length: 2\r\n\r\nok", "Last Unassigned Server Error Code"),
    ],
    ids=["custom-reason", "http10-upstream", "unsolicited-100", "status-599"],
)
def test_upstream_status_line_normalized(
    proxy: ProxyProcess, http_upstream: HttpUpstream, raw: bytes, reason: str
) -> None:
    """Envoy writes its own status line: HTTP/1.1, the standard reason phrase; an
    unsolicited upstream 100 is swallowed."""
    http_upstream.raw_responses["/raw/status"] = raw
    ex = exchange(proxy.listener_port, b"GET /raw/status HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(ex.responses) == 1, ex
    resp = ex.response
    assert resp.version == "HTTP/1.1" and resp.reason == reason
    assert resp.body == b"ok"
    assert_proxied(resp, resp.status, ["content-length"])


def test_close_delimited_upstream_body_is_rechunked(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    http_upstream.raw_responses["/raw/nolength"] = (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nbody-until-close"
    )
    ex = exchange(
        proxy.listener_port,
        b"GET /raw/nolength?close=1 HTTP/1.1\r\nHost: a\r\n\r\n" + GET_ECHO,
        responses=2,
    )
    resp = ex.responses[0]
    assert names(resp) == [
        "x-a",
        "x-envoy-upstream-service-time",
        "date",
        "server",
        "transfer-encoding",
    ]
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.body == b"body-until-close"
    # the downstream connection stays usable
    assert ex.responses[1].status == 200
    assert not ex.closed


def test_response_trailers_dropped_for_http1(
    proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    http_upstream.raw_responses["/raw/trailers"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n"
        b"2\r\nok\r\n0\r\nx-t: v\r\n\r\n"
    )
    ex = exchange(proxy.listener_port, b"GET /raw/trailers HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = ex.response
    assert names(resp) == [
        "trailer",
        "x-envoy-upstream-service-time",
        "date",
        "server",
        "transfer-encoding",
    ]
    assert resp.body == b"ok"
    assert ex.raw.endswith(b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")


def test_request_trailers_not_forwarded(proxy: ProxyProcess) -> None:
    ex = exchange(
        proxy.listener_port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: tv\r\n\r\n",
    )
    doc = echo_of(ex)
    assert doc["body_length"] == 3 and doc["trailers"] == []


def test_upstream_closes_mid_body(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    """Headers were already sent: the client gets the partial body, then the connection
    is closed (no local reply)."""
    http_upstream.raw_responses["/raw/partial"] = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    )
    ex = exchange(
        proxy.listener_port,
        b"GET /raw/partial?close=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        timeout=3,
    )
    assert ex.closed
    head, _, rest = ex.raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n")
    assert rest == b"abc"
