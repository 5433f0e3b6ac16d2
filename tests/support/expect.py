"""Assertions for what real Envoy 1.40 puts on the wire (see /work/notes/envoy_facts.md).

Strategy: each helper encodes one observed Envoy shape (header order, values, body) and
compares a ``RawResponse`` against it, with messages that show the whole response so a
pyenvoy difference is obvious from the failure alone.
"""

from __future__ import annotations

import re

from tests.support.procs import RawResponse

__all__ = [
    "DATE_RE",
    "UUID4_RE",
    "assert_date",
    "assert_local_reply",
    "assert_proxied",
    "names",
]

# IMF-fixdate, as Envoy's date provider renders it.
DATE_RE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d\d:\d\d:\d\d GMT$"
)
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def names(resp: RawResponse) -> list[str]:
    return [k for k, _ in resp.headers]


def assert_date(resp: RawResponse) -> None:
    date = resp.header("date")
    assert date is not None and DATE_RE.match(date), resp


def assert_local_reply(
    resp: RawResponse,
    status: int,
    reason: str,
    body: bytes,
    *,
    close: bool = False,
    server: str = "envoy",
    after_server: tuple[tuple[str, str], ...] = (),
    version: str = "HTTP/1.1",
) -> None:
    """A local reply: with a body -> content-length, content-type: text/plain, date, server;
    without a body -> date, server, [connection: close], content-length: 0."""
    assert (resp.version, resp.status, resp.reason) == (version, status, reason), resp
    assert resp.body == body, resp
    extra = list(after_server)
    if close:
        extra.append(("connection", "close"))
    if body:
        expected = [
            ("content-length", str(len(body))),
            ("content-type", "text/plain"),
            ("date", "*"),
            ("server", server),
            *extra,
        ]
    else:
        expected = [("date", "*"), ("server", server), *extra, ("content-length", "0")]
    got = [(k, "*" if k == "date" else v) for k, v in resp.headers]
    assert got == expected, resp
    assert_date(resp)


def assert_proxied(
    resp: RawResponse,
    status: int,
    upstream_headers: list[str],
    *,
    close: bool = False,
    server: str = "envoy",
    after_server: tuple[tuple[str, str], ...] = (),
) -> None:
    """A proxied response: the upstream's headers (names given, in order), then
    x-envoy-upstream-service-time, date, server[, after_server...][, connection: close]."""
    assert resp.status == status, resp
    tail: list[str] = ["x-envoy-upstream-service-time", "date", "server"]
    tail += [k for k, _ in after_server]
    if close:
        tail.append("connection")
    assert names(resp) == upstream_headers + tail, resp
    ust = resp.header("x-envoy-upstream-service-time")
    assert ust is not None and ust.isdigit(), resp
    assert resp.header("server") == server, resp
    for k, v in after_server:
        assert resp.header(k) == v, resp
    if close:
        assert resp.headers[-1] == ("connection", "close"), resp
    assert_date(resp)
