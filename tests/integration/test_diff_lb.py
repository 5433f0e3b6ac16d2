"""Differential tests: load balancing against real Envoy 1.40 and pyenvoy.

One listener, one virtual host per cluster (tests/integration/configs/lb_basic.yaml), three
HTTP upstreams shared by both proxies. Every request carries a unique ``x-test-id`` so the
upstream that served it can be looked up afterwards.

Hash-based balancers are checked exactly, not statistically: for each key the expected
upstream is computed with pyenvoy's own Ring / MaglevTable over ``127.0.0.1:<port>`` and
xxHash64 of the key. Real Envoy passing these tests is what shows that the ring, the maglev
table and the hash policies (header, multi-value header, cookie, query parameter, source
IP, combined, terminal) are bit-for-bit Envoy's.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pyenvoy.upstream.hashing import xxhash64
from pyenvoy.upstream.host import Host
from pyenvoy.upstream.maglev import MaglevTable
from pyenvoy.upstream.ring_hash import Ring
from tests.conftest import load_config
from tests.support.procs import ProxyProcess, start_proxy
from tests.support.upstream import HttpUpstream

CONFIG = "lb_basic.yaml"
_ids = itertools.count()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[HttpUpstream]]:
    ups = [HttpUpstream().start() for _ in range(3)]
    try:
        yield ups  # type: ignore[misc]
    finally:
        for u in ups:
            u.stop()


@pytest.fixture(scope="module")
def proxy(proxy_kind: str, upstreams: list[HttpUpstream]) -> Iterator[ProxyProcess]:
    values = {f"up{i + 1}_port": u.port for i, u in enumerate(upstreams)}
    p = start_proxy(proxy_kind, load_config(CONFIG), **values)
    try:
        # Envoy waits for the first health check round before it is ready; pyenvoy's hosts
        # may need one more interval to be marked down.
        for name, healthy in (("prio", 2), ("panic", 1), ("nopanic", 0)):
            stats = p.wait_stat(f"cluster.{name}.membership_healthy", healthy, timeout=10)
            assert stats[f"cluster.{name}.membership_healthy"] == healthy, name
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url("/"), timeout=5) as c:
        yield c


def send(
    client: httpx.Client,
    host: str,
    path: str = "/echo",
    n: int = 1,
    headers: dict[str, str] | None = None,
) -> list[tuple[str, int]]:
    """n requests; returns (test id, status) for each."""
    out = []
    for _ in range(n):
        tid = f"t{next(_ids)}"
        h = {"host": host, "x-test-id": tid, **(headers or {})}
        r = client.get(path, headers=h)
        out.append((tid, r.status_code))
    return out


def served_by(upstreams: list[HttpUpstream], ids: list[str]) -> dict[str, int]:
    """test id -> the port of the upstream that got it."""
    want = set(ids)
    out: dict[str, int] = {}
    for u in upstreams:
        for req in list(u.requests):
            tid = req.header("x-test-id")
            if tid in want:
                out[tid] = u.port
    return out


def counts(upstreams: list[HttpUpstream], sent: list[tuple[str, int]]) -> collections.Counter[int]:
    by = served_by(upstreams, [t for t, _ in sent])
    return collections.Counter(by.values())


def ring_for(upstreams: list[HttpUpstream]) -> Ring:
    hosts = [Host(("127.0.0.1", u.port)) for u in upstreams]
    return Ring([(h, 1 / 3) for h in hosts], 1 / 3)


def chosen_port(table: Ring | MaglevTable, h: int) -> int:
    host = table.choose(h)
    assert host is not None
    return int(host.address[1])


def maglev_for(upstreams: list[HttpUpstream], size: int = 65537) -> MaglevTable:
    hosts = [Host(("127.0.0.1", u.port)) for u in upstreams]
    return MaglevTable([(h, 1 / 3) for h in hosts], 1 / 3, size)


# -- round robin, least request, random -------------------------------------------------------
def test_weighted_round_robin_exact(client: httpx.Client, upstreams: list[HttpUpstream]) -> None:
    sent = send(client, "rr", n=600)
    assert all(s == 200 for _, s in sent)
    c = counts(upstreams, sent)
    assert [c[u.port] for u in upstreams] == [100, 200, 300]


def test_least_request_spreads_idle_hosts(
    client: httpx.Client, upstreams: list[HttpUpstream]
) -> None:
    sent = send(client, "lr", n=600)
    c = counts(upstreams, sent)
    assert sum(c.values()) == 600
    assert all(140 < c[u.port] < 260 for u in upstreams), c


def test_random(client: httpx.Client, upstreams: list[HttpUpstream]) -> None:
    sent = send(client, "rand", n=600)
    c = counts(upstreams, sent)
    assert all(140 < c[u.port] < 260 for u in upstreams), c


def test_locality_weighted(client: httpx.Client, upstreams: list[HttpUpstream]) -> None:
    # zone a (up1) weight 1, zone b (up2, up3) weight 3: EDF over localities is exact.
    sent = send(client, "locality", n=800)
    c = counts(upstreams, sent)
    assert c[upstreams[0].port] == 200
    assert c[upstreams[1].port] == c[upstreams[2].port] == 300


# -- priorities and panic ---------------------------------------------------------------------
def test_priority_spillover(
    client: httpx.Client, upstreams: list[HttpUpstream], proxy: ProxyProcess
) -> None:
    # P0 = {up1, dead}: 50% healthy -> health 70 -> 70% of the load, P1 = {up2} the rest.
    sent = send(client, "prio", n=1000)
    assert all(s == 200 for _, s in sent)
    c = counts(upstreams, sent)
    assert abs(c[upstreams[0].port] / 1000 - 0.70) < 0.05, c
    assert c[upstreams[0].port] + c[upstreams[1].port] == 1000
    assert proxy.stats()["cluster.prio.lb_healthy_panic"] == 0


def test_panic_spreads_over_all_hosts(
    client: httpx.Client, upstreams: list[HttpUpstream], proxy: ProxyProcess
) -> None:
    # {up3, 3 dead}: 25% healthy < 50% -> panic: round robin over all four hosts.
    before = proxy.stats()
    sent = send(client, "panic", n=400)
    statuses = collections.Counter(s for _, s in sent)
    assert statuses == {200: 100, 503: 300}
    assert counts(upstreams, sent) == {upstreams[2].port: 100}
    stats = proxy.wait_stat(
        "cluster.panic.lb_healthy_panic", before["cluster.panic.lb_healthy_panic"] + 400
    )
    assert stats["cluster.panic.lb_healthy_panic"] - before["cluster.panic.lb_healthy_panic"] == 400
    assert stats["cluster.panic.membership_healthy"] == 1
    assert stats["cluster.panic.membership_total"] == 4


def test_panic_threshold_zero_means_no_healthy_upstream(
    client: httpx.Client, proxy: ProxyProcess
) -> None:
    before = proxy.stats()
    r = client.get("/echo", headers={"host": "nopanic"})
    assert r.status_code == 503 and r.text == "no healthy upstream"
    stats = proxy.wait_stat(
        "cluster.nopanic.upstream_cx_none_healthy",
        before["cluster.nopanic.upstream_cx_none_healthy"] + 1,
    )
    assert (
        stats["cluster.nopanic.upstream_cx_none_healthy"]
        == before["cluster.nopanic.upstream_cx_none_healthy"] + 1
    )
    assert stats["cluster.nopanic.lb_healthy_panic"] == 0


# -- hash policies: exact host per key --------------------------------------------------------
def expect_hosts(
    client: httpx.Client,
    upstreams: list[HttpUpstream],
    host: str,
    path: str,
    cases: list[tuple[dict[str, str], int]],
    table: Any,
) -> None:
    ids = []
    want = {}
    for headers, h in cases:
        for tid, status in send(client, host, path, headers=headers):
            assert status == 200
            ids.append(tid)
            want[tid] = table.choose(h).address[1]
    got = served_by(upstreams, ids)
    assert got == want


@pytest.mark.parametrize("host", ["rh", "mg"])
def test_header_hash_picks_envoys_host(
    client: httpx.Client, upstreams: list[HttpUpstream], host: str
) -> None:
    table = ring_for(upstreams) if host == "rh" else maglev_for(upstreams)
    cases = [({"x-user": f"user-{i}"}, xxhash64(f"user-{i}".encode())) for i in range(90)]
    expect_hosts(client, upstreams, host, "/echo", cases, table)
    assert len({chosen_port(table, h) for _, h in cases}) == 3


def test_ring_hash_stats(proxy: ProxyProcess) -> None:
    stats = proxy.stats()
    assert stats["cluster.rh.ring_hash_lb.size"] == 1026
    assert stats["cluster.rh.ring_hash_lb.min_hashes_per_host"] == 342
    assert stats["cluster.rh.ring_hash_lb.max_hashes_per_host"] == 342
    assert stats["cluster.mg.maglev_lb.min_entries_per_host"] == 21845
    assert stats["cluster.mg.maglev_lb.max_entries_per_host"] == 21846
    assert stats["cluster.typed_mg.maglev_lb.min_entries_per_host"] == 1667
    assert stats["cluster.typed_mg.maglev_lb.max_entries_per_host"] == 1668


def test_cookie_query_and_source_ip_hashes(
    client: httpx.Client, upstreams: list[HttpUpstream]
) -> None:
    ring = ring_for(upstreams)
    cookies = [({"cookie": f"a=1; session=s{i}"}, xxhash64(f"s{i}".encode())) for i in range(30)]
    cookies.append(({"cookie": 'session="quoted"'}, xxhash64(b"quoted")))
    expect_hosts(client, upstreams, "rh", "/cookie", cookies, ring)
    ids = []
    want = {}
    for i in range(30):
        for tid, _ in send(client, "rh", f"/query?a=1&u=q{i}&u=other"):
            ids.append(tid)
            want[tid] = chosen_port(ring, xxhash64(f"q{i}".encode()))
    for path in ("/query?u", "/query?a&u=&u=x"):  # no value: the hash of ""
        for tid, _ in send(client, "rh", path):
            ids.append(tid)
            want[tid] = chosen_port(ring, xxhash64(b""))
    assert served_by(upstreams, ids) == want
    expect_hosts(client, upstreams, "rh", "/ip", [({}, xxhash64(b"127.0.0.1"))] * 5, ring)
    # header_name "host" is the HTTP/1 Host, i.e. :authority.
    expect_hosts(client, upstreams, "rh", "/hosthdr", [({}, xxhash64(b"rh"))] * 5, ring)


def test_multi_value_header_and_combined_policies(
    client: httpx.Client, upstreams: list[HttpUpstream]
) -> None:
    ring = ring_for(upstreams)
    m64 = 0xFFFFFFFFFFFFFFFF
    cases = []
    for i in range(30):
        a, b = xxhash64(f"a{i}".encode()), xxhash64(f"b{i}".encode())
        cases.append(({"x-a": f"a{i}", "x-b": f"b{i}"}, (((a << 1) | (a >> 63)) & m64) ^ b))
    expect_hosts(client, upstreams, "rh", "/multi", cases, ring)
    cases = [({"x-a": f"a{i}", "x-b": f"b{i}"}, xxhash64(f"a{i}".encode())) for i in range(20)]
    cases += [({"x-b": f"b{i}"}, xxhash64(f"b{i}".encode())) for i in range(20)]
    expect_hosts(client, upstreams, "rh", "/terminal", cases, ring)
    # Two x-user header lines: the values are sorted, then each is hashed with the previous
    # hash as seed.
    ids, want = [], {}
    for i in range(30):
        tid = f"t{next(_ids)}"
        headers = [("host", "rh"), ("x-test-id", tid), ("x-user", f"z{i}"), ("x-user", f"m{i}")]
        r = client.get("/echo", headers=headers)
        assert r.status_code == 200
        ids.append(tid)
        want[tid] = chosen_port(ring, xxhash64(f"z{i}".encode(), xxhash64(f"m{i}".encode())))
    assert served_by(upstreams, ids) == want


def test_typed_maglev_with_its_own_hash_policy(
    client: httpx.Client, upstreams: list[HttpUpstream]
) -> None:
    table = maglev_for(upstreams, 5003)
    cases = [({"x-lb-key": f"k{i}"}, xxhash64(f"k{i}".encode())) for i in range(60)]
    expect_hosts(client, upstreams, "typedmg", "/echo", cases, table)


def test_no_hash_is_random(client: httpx.Client, upstreams: list[HttpUpstream]) -> None:
    sent = send(client, "rh", "/none", n=300)
    c = counts(upstreams, sent)
    assert all(60 < c[u.port] < 140 for u in upstreams), c


@pytest.mark.parametrize("host", ["rh", "mg"])
def test_cookie_with_ttl_is_generated(
    client: httpx.Client, upstreams: list[HttpUpstream], host: str
) -> None:
    table = ring_for(upstreams) if host == "rh" else maglev_for(upstreams)
    tid = f"t{next(_ids)}"
    client.cookies.clear()  # httpx keeps cookies: this request must have none
    r = client.get("/cookie_ttl", headers={"host": host, "x-test-id": tid})
    client.cookies.clear()
    assert r.status_code == 200
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 1
    name, _, rest = cookies[0].partition("=")
    value, _, attrs = rest.partition(";")
    assert name == "sticky"
    assert len(value) == 18 and value[0] == value[-1] == '"'
    int(value[1:-1], 16)
    assert attrs == " Max-Age=60; Path=/; HttpOnly"
    # The request that generated the cookie was hashed on it, and sending the cookie back
    # sticks to that host (and generates no new cookie).
    want = {tid: chosen_port(table, xxhash64(value[1:-1].encode()))}
    for _ in range(3):
        tid = f"t{next(_ids)}"
        r = client.get(
            "/cookie_ttl", headers={"host": host, "x-test-id": tid, "cookie": f"sticky={value}"}
        )
        assert r.status_code == 200
        assert "set-cookie" not in r.headers
        want[tid] = want[next(iter(want))]
    assert served_by(upstreams, list(want)) == want
