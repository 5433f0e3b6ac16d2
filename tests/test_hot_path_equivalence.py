"""Byte-exact pins for the HTTP/1 hot path of the connection manager and the HCM's header
mutations (the code that per-request CPU work keeps reshaping).

Strategy: a real Server built from YAML, a downstream Connection and one pooled upstream
client on in-memory transports (as benchmarks/hot_path.py does), so a request and its
upstream response run through the real objects synchronously; the test compares what each
side saw on the wire. The expected texts were recorded from the code before the hot-path
rewrites; generated request ids, the current date and upstream service times are
normalized.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.support.memory import InMemoryProxy, proxy_config

GET = b"GET /hello HTTP/1.1\r\nHost: a.example\r\n\r\n"
DATE = b"Date: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    + DATE
    + b"Content-Type: application/octet-stream"
    b"\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)
PLAIN = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-type: text/plain\r\n\r\nhello world\n"
UPSTREAM_GET = (
    "GET /hello HTTP/1.1\r\nhost: a.example\r\nx-forwarded-proto: http\r\n"
    "x-request-id: <uuid>\r\nx-envoy-expected-rq-timeout-ms: 15000\r\n\r\n"
)
PLAIN_OUT = (
    "HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-type: text/plain\r\n"
    "x-envoy-upstream-service-time: <n>\r\ndate: <now>\r\nserver: envoy\r\n\r\nhello world\n"
)

_UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _norm(b: bytes) -> str:
    b = _UUID4.sub(b"<uuid>", b)
    b = re.sub(rb"date: (?!Sun, 22 Nov 2026 07:00:00 GMT)[^\r]*", b"date: <now>", b)
    b = re.sub(rb"x-envoy-upstream-service-time: \d+", b"x-envoy-upstream-service-time: <n>", b)
    return b.decode("latin-1")


class _Proxy(InMemoryProxy):
    """InMemoryProxy with extra HCM fields, exchanges compared as normalised text."""

    def __init__(self, hcm_extra: str = "") -> None:
        super().__init__(proxy_config(hcm_extra=hcm_extra))

    def exchange(self, request: bytes, response: bytes) -> tuple[str, str]:  # type: ignore[override]
        down, up = super().exchange(request, response)
        return _norm(down), _norm(up)


CASES = {
    # server replaced in place, upstream date kept, connection management is the codec's
    "nginx": (
        "",
        GET,
        NGINX,
        "HTTP/1.1 200 OK\r\nserver: envoy\r\ndate: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
        "content-type: application/octet-stream\r\ncontent-length: 12\r\n"
        "x-envoy-upstream-service-time: <n>\r\n\r\nhello world\n",
        UPSTREAM_GET,
    ),
    "two_servers_keep_alive": (
        "",
        GET,
        b"HTTP/1.1 200 OK\r\nServer: a\r\nX-Y: 1\r\nServer: b\r\nContent-Length: 2\r\n"
        b"Keep-Alive: timeout=5\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nserver: envoy\r\nx-y: 1\r\ncontent-length: 2\r\n"
        "x-envoy-upstream-service-time: <n>\r\ndate: <now>\r\n\r\nok",
        UPSTREAM_GET,
    ),
    "hop_by_hop_response": (
        "",
        GET,
        b"HTTP/1.1 404 Not Found\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nContent-Length: 1\r\n\r\nx",
        "HTTP/1.1 404 Not Found\r\ncontent-length: 1\r\nx-envoy-upstream-service-time: <n>\r\n"
        "date: <now>\r\nserver: envoy\r\n\r\nx",
        UPSTREAM_GET,
    ),
    "chunked_upstream": (
        "",
        GET,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + DATE + b"\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\ndate: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
        "x-envoy-upstream-service-time: <n>\r\nserver: envoy\r\ntransfer-encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        UPSTREAM_GET,
    ),
    "204": (
        "",
        GET,
        b"HTTP/1.1 204 No Content\r\n" + DATE + b"Server: up\r\n\r\n",
        "HTTP/1.1 204 No Content\r\ndate: Sun, 22 Nov 2026 07:00:00 GMT\r\nserver: envoy\r\n"
        "x-envoy-upstream-service-time: <n>\r\n\r\n",
        UPSTREAM_GET,
    ),
    "304_drops_content_length": (
        "",
        GET,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: x\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\netag: x\r\nx-envoy-upstream-service-time: <n>\r\n"
        "date: <now>\r\nserver: envoy\r\n\r\n",
        UPSTREAM_GET,
    ),
    "head": (
        "",
        b"HEAD /hello HTTP/1.1\r\nHost: a.example\r\n\r\n",
        NGINX,
        "HTTP/1.1 200 OK\r\nserver: envoy\r\ndate: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
        "content-type: application/octet-stream\r\ncontent-length: 12\r\n"
        "x-envoy-upstream-service-time: <n>\r\n\r\n",
        UPSTREAM_GET.replace("GET", "HEAD"),
    ),
    "append_if_absent_keeps_upstream_server": (
        "server_header_transformation: APPEND_IF_ABSENT\nserver_name: pyx",
        GET,
        NGINX,
        "HTTP/1.1 200 OK\r\nserver: nginx/1.22.1\r\ndate: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
        "content-type: application/octet-stream\r\ncontent-length: 12\r\n"
        "x-envoy-upstream-service-time: <n>\r\n\r\nhello world\n",
        UPSTREAM_GET,
    ),
    "append_if_absent_adds_server": (
        "server_header_transformation: APPEND_IF_ABSENT\nserver_name: pyx",
        GET,
        PLAIN,
        PLAIN_OUT.replace("server: envoy", "server: pyx"),
        UPSTREAM_GET,
    ),
    "pass_through": (
        "server_header_transformation: PASS_THROUGH",
        GET,
        PLAIN,
        PLAIN_OUT.replace("server: envoy\r\n", ""),
        UPSTREAM_GET,
    ),
    "via_and_request_id_in_response": (
        "via: proxy-a\nalways_set_request_id_in_response: true\nserver_name: srv",
        b"GET /hello?x=1 HTTP/1.1\r\nUser-Agent: t\r\nHost: a.example\r\nAccept: */*\r\n"
        b"X-Forwarded-Proto: https\r\nX-Request-Id: my-id\r\n\r\n",
        b"HTTP/1.1 500 Internal Server Error\r\nX-Request-Id: upstream-rid\r\nVia: 1.1 up\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nerr",
        "HTTP/1.1 500 Internal Server Error\r\nx-request-id: my-id\r\nvia: 1.1 up, proxy-a\r\n"
        "content-length: 3\r\nx-envoy-upstream-service-time: <n>\r\ndate: <now>\r\n"
        "server: srv\r\n\r\nerr",
        "GET /hello?x=1 HTTP/1.1\r\nhost: a.example\r\nuser-agent: t\r\naccept: */*\r\n"
        "x-forwarded-proto: https\r\nx-request-id: my-id\r\nvia: proxy-a\r\n"
        "x-envoy-expected-rq-timeout-ms: 15000\r\n\r\n",
    ),
    "request_hop_by_hop_and_envoy_headers": (
        "",
        b"GET /hello HTTP/1.1\r\nHost: a.example\r\nX-Envoy-Retry-On: 5xx\r\nX-Envoy-Custom: 1\r\n"
        b"Connection: keep-alive, x-foo\r\nX-Foo: bar\r\nTE: trailers, gzip\r\n"
        b"X-Forwarded-For: 9.9.9.9\r\nVia: old\r\n\r\n",
        PLAIN,
        PLAIN_OUT,
        "GET /hello HTTP/1.1\r\nhost: a.example\r\nx-envoy-custom: 1\r\nte: trailers\r\n"
        "x-forwarded-for: 9.9.9.9\r\nvia: old\r\nx-forwarded-proto: http\r\n"
        "x-request-id: <uuid>\r\nx-envoy-expected-rq-timeout-ms: 15000\r\n\r\n",
    ),
    "host_after_other_headers": (
        "",
        b"GET /hello HTTP/1.1\r\nUser-Agent: t\r\nAccept: x\r\nHost: late.example\r\n\r\n",
        PLAIN,
        PLAIN_OUT,
        "GET /hello HTTP/1.1\r\nhost: late.example\r\nuser-agent: t\r\naccept: x\r\n"
        "x-forwarded-proto: http\r\nx-request-id: <uuid>\r\n"
        "x-envoy-expected-rq-timeout-ms: 15000\r\n\r\n",
    ),
    "absolute_form": (
        "",
        b"GET http://abs.example:8080/p/q HTTP/1.1\r\nHost: ignored\r\n\r\n",
        PLAIN,
        PLAIN_OUT,
        UPSTREAM_GET.replace("/hello", "/p/q").replace("a.example", "abs.example:8080"),
    ),
    "http10_default_host": (
        "http_protocol_options: { accept_http_10: true, default_host_for_http_10: dflt.example }",
        b"GET /hello HTTP/1.0\r\n\r\n",
        PLAIN,
        PLAIN_OUT.replace("HTTP/1.1", "HTTP/1.0").replace(
            "server: envoy\r\n", "server: envoy\r\nconnection: close\r\n"
        ),
        UPSTREAM_GET.replace("a.example", "dflt.example"),
    ),
    "http10_rejected": (
        "",
        b"GET /hello HTTP/1.0\r\n\r\n",
        PLAIN,
        "HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\ncontent-type: text/plain\r\n"
        "date: <now>\r\nserver: envoy\r\nconnection: close\r\n\r\nUpgrade Required",
        "",
    ),
    "edge": (
        "use_remote_address: true",
        GET,
        PLAIN,
        PLAIN_OUT,
        None,  # x-forwarded-for carries this machine's address: checked below
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_exchange_is_byte_exact(name: str) -> None:
    hcm_extra, request, response, want_down, want_up = CASES[name]
    proxy = _Proxy(hcm_extra)
    down, up = proxy.exchange(request, response)
    assert down == want_down
    if want_up is None:
        assert up.startswith("GET /hello HTTP/1.1\r\nhost: a.example\r\nx-forwarded-for: ")
        assert up.endswith(
            "\r\nx-forwarded-proto: http\r\nx-envoy-external-address: 127.0.0.1\r\n"
            "x-request-id: <uuid>\r\nx-envoy-expected-rq-timeout-ms: 15000\r\n\r\n"
        )
    else:
        assert up == want_up


async def test_keep_alive_reuse_and_stats() -> None:
    proxy = _Proxy()
    for _ in range(3):
        assert proxy.exchange(GET, PLAIN) == (PLAIN_OUT, UPSTREAM_GET)
    assert proxy.exchange(GET, NGINX)[0].endswith("\r\n\r\nhello world\n")
    assert not proxy.down.closed
    assert proxy.counter("http.ingress_http.downstream_rq_2xx") == 4
    assert proxy.counter("http.ingress_http.downstream_rq_completed") == 4
    assert proxy.counter("http.ingress_http.downstream_rq_total") == 4
    assert proxy.counter("listener.127.0.0.1_0.http.ingress_http.downstream_rq_2xx") == 4
    assert proxy.server.stats.gauges["http.ingress_http.downstream_rq_active"].value == 0
    # downstream_cx_tx_bytes_total counts heads and bodies as written
    sent = 3 * len(PLAIN_OUT.replace("<n>", "0").replace("<now>", "Sun, 22 Nov 2026 07:00:00 GMT"))
    assert proxy.counter("http.ingress_http.downstream_cx_tx_bytes_total") >= sent


async def test_client_close_closes_after_the_response() -> None:
    proxy = _Proxy()
    down, _ = proxy.exchange(
        b"GET /hello HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n", PLAIN
    )
    assert down == PLAIN_OUT.replace("server: envoy\r\n", "server: envoy\r\nconnection: close\r\n")
    assert proxy.down.closed


async def test_generated_request_ids_are_unique_uuid4_across_pool_refills() -> None:
    proxy = _Proxy()
    ids = []
    for _ in range(150):  # more than one refill of the 64-id pool
        proxy.down.out.clear()
        proxy.up.out.clear()
        proxy.conn.data_received(GET)
        proxy.flush()
        head = b"".join(proxy.up.out)
        proxy.client.data_received(PLAIN)
        proxy.flush()
        m = re.search(rb"x-request-id: ([^\r]*)\r\n", head)
        assert m is not None
        ids.append(m.group(1))
    assert len(set(ids)) == len(ids)
    for rid in ids:
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == rid
