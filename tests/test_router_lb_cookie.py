"""Differential tests: the cookie a hash policy generates, against real Envoy 1.40 and pyenvoy.

A route ``hash_policy`` ``cookie`` with a ``ttl`` makes the load balancer generate a cookie
when the request has none; the router adds it to the upstream response (never to a local
reply). Requests go over raw sockets so the test knows both connection addresses and can
compute the cookie value exactly: hex(xxHash64("<remote ip:port><local ip:port>")).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pyenvoy.upstream.hashing import xxhash64
from tests.support.procs import ProxyProcess, RawResponse, free_port, parse_raw_responses
from tests.support.upstream import HttpUpstream

CONFIG = """
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {admin_port} }
static_resources:
  listeners:
  - name: main
    address:
      socket_address: { address: 127.0.0.1, port_value: {listener_port} }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: t
          route_config:
            virtual_hosts:
            - name: plain
              domains: ["plain"]
              response_headers_to_add:
              - header: { key: x-vh, value: v }
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rh
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
                response_headers_to_add:
                - header: { key: x-route, value: r }
            - name: retry
              domains: ["retry"]
              include_attempt_count_in_response: true
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rh
                  retry_policy: { retry_on: 5xx, num_retries: 2 }
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
                response_headers_to_add:
                - header: { key: x-route, value: r }
            - name: dead
              domains: ["dead"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rhdead
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
                response_headers_to_add:
                - header: { key: x-route, value: r }
            - name: deadretry
              domains: ["deadretry"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rhdead
                  retry_policy: { retry_on: connect-failure, num_retries: 1 }
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
            - name: timeout
              domains: ["timeout"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rh
                  timeout: 0.2s
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
            - name: rr
              domains: ["rr"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: rr
                  hash_policy:
                  - cookie: { name: sticky, ttl: 60s, path: / }
            - name: attrs
              domains: ["attrs"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: mg
                  hash_policy:
                  - cookie:
                      name: a
                      ttl: 0s
                      attributes: [{ name: SameSite, value: Lax }, { name: Secure }]
                  - cookie: { name: b, ttl: 10s, path: /x }
                  - cookie: { name: c }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: rh
    connect_timeout: 0.5s
    type: STATIC
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: rh
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {up_port} } } }
  - name: mg
    connect_timeout: 0.5s
    type: STATIC
    lb_policy: MAGLEV
    load_assignment:
      cluster_name: mg
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {up_port} } } }
  - name: rhdead
    connect_timeout: 0.25s
    type: STATIC
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: rhdead
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {dead_port} } } }
  - name: rr
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: rr
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {up_port} } } }
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream().start()
    try:
        yield up  # type: ignore[misc]
    finally:
        up.stop()


@pytest.fixture(scope="module")
def proxy(proxy_kind: str, upstream: HttpUpstream) -> Iterator[ProxyProcess]:
    from tests.support.procs import start_proxy

    p = start_proxy(proxy_kind, CONFIG, up_port=upstream.port, dead_port=free_port())
    try:
        yield p
    finally:
        p.stop()


def get(
    proxy: ProxyProcess, host: str, path: str = "/echo", extra: bytes = b""
) -> tuple[RawResponse, str]:
    """One request on a new connection: the response and the cookie value Envoy would
    generate for that connection."""
    port = proxy.listener_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        ip, cport = s.getsockname()[:2]
        s.sendall(b"GET %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra))
        buf = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            try:
                responses = parse_raw_responses(buf)
            except ValueError:
                continue
            if responses:
                break
    responses = parse_raw_responses(buf)
    assert len(responses) == 1, buf
    value = f"{xxhash64(f'{ip}:{cport}127.0.0.1:{port}'.encode()):016x}"
    return responses[0], value


def headers_of(r: RawResponse) -> list[tuple[str, str]]:
    return [(k, v) for k, v in r.headers if k not in ("date", "x-envoy-upstream-service-time")]


def test_generated_cookie_goes_before_the_route_headers(proxy: ProxyProcess) -> None:
    r, value = get(proxy, "plain")
    assert r.status == 200
    assert r.header_names() == [
        "content-type",
        "content-length",
        "x-envoy-upstream-service-time",
        "set-cookie",
        "x-route",
        "x-vh",
        "date",
        "server",
    ]
    assert r.header("set-cookie") == f'sticky="{value}"; Max-Age=60; Path=/; HttpOnly'


def test_no_cookie_when_the_request_has_one(proxy: ProxyProcess) -> None:
    r, _ = get(proxy, "plain", extra=b"cookie: other=1; sticky=abc\r\n")
    assert r.status == 200
    assert r.header("set-cookie") is None
    assert r.header("x-route") == "r"


def test_one_cookie_per_attempt_on_retries(proxy: ProxyProcess) -> None:
    r, value = get(proxy, "retry", "/status/503")
    assert r.status == 503
    cookie = f'sticky="{value}"; Max-Age=60; Path=/; HttpOnly'
    assert headers_of(r) == [
        ("content-length", "0"),
        ("set-cookie", cookie),
        ("set-cookie", cookie),
        ("set-cookie", cookie),
        ("x-route", "r"),
        ("x-envoy-attempt-count", "3"),
        ("server", "envoy"),
    ]
    r, value = get(proxy, "retry")
    assert r.status == 200
    assert [v for k, v in r.headers if k == "set-cookie"] == [
        f'sticky="{value}"; Max-Age=60; Path=/; HttpOnly'
    ]
    assert r.header("x-envoy-attempt-count") == "1"


@pytest.mark.parametrize(
    ("host", "path", "status"),
    [("dead", "/echo", 503), ("deadretry", "/echo", 503), ("timeout", "/delay/1000", 504)],
)
def test_local_replies_carry_no_cookie(
    proxy: ProxyProcess, host: str, path: str, status: int
) -> None:
    r, _ = get(proxy, host, path)
    assert r.status == status
    assert r.header("set-cookie") is None
    if host == "dead":
        assert r.header("x-route") == "r"


def test_no_cookie_from_a_balancer_that_does_not_hash(proxy: ProxyProcess) -> None:
    r, _ = get(proxy, "rr")
    assert r.status == 200
    assert r.header("set-cookie") is None


def test_several_cookie_policies_and_attributes(proxy: ProxyProcess) -> None:
    r, value = get(proxy, "attrs")
    assert r.status == 200
    # ttl 0s: no Max-Age; no path: no Path; attributes before HttpOnly; a policy without a
    # ttl generates nothing. Every generated cookie has the connection's value.
    assert [v for k, v in r.headers if k == "set-cookie"] == [
        f'a="{value}"; SameSite=Lax; Secure; HttpOnly',
        f'b="{value}"; Max-Age=10; Path=/x; HttpOnly',
    ]
