"""Circuit breakers with ``--concurrency 2``: the limits and gauges are the whole process's.

Strategy: Envoy's ResourceManager is shared by its worker threads, so ``max_requests: 2``
lets 2 requests through per process, whatever the worker. Each case runs real Envoy 1.40
and pyenvoy, both with ``--concurrency 2``, against their own loopback upstream and
compares what they did. To make that deterministic despite SO_REUSEPORT's hashing,
client connections are opened one at a time and *pinned*: after each connect, the
per-worker ``listener.<addr>.worker_<i>.downstream_cx_total`` counters tell which worker
accepted it (connections a worker already has enough of stay open, unused). Requests are
then sent on connections of chosen workers, in a chosen order, so that per-worker
counting (pyenvoy before the shared table) would let more through than Envoy does.

The table itself (pyenvoy.upstream.shared_counts) has unit tests at the end: two
attachments of one fd agree on entries, a full table falls back, a worker's counters are
zeroed alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto
from google.protobuf import json_format

from pyenvoy.stats import Store
from pyenvoy.upstream import shared_counts
from pyenvoy.upstream.circuit_breaker import (
    Resource,
    ResourceManagers,
    SharedResource,
    publish_shared_gauges,
    resource_managers,
)
from pyenvoy.upstream.shared_counts import SharedCounts, key_for
from tests.support.configs import http_listener
from tests.support.procs import (
    EnvoyProcess,
    ProxyProcess,
    PyEnvoyProcess,
    parse_raw_responses,
)
from tests.support.upstream import HttpUpstream

_base_ids = itertools.count((os.getpid() % 3000) * 10 + 70000)

CONFIG = (
    http_listener('{{match: {{prefix: "/"}}, route: {{cluster: cb, timeout: 10s}}}}')
    + """\
  - name: cb
    connect_timeout: {connect_timeout}
    circuit_breakers:
      thresholds: [{thresholds}]
    load_assignment:
      cluster_name: cb
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}
"""
)

CB = "cluster.cb.circuit_breakers.default."
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


class Envoy2(EnvoyProcess):
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--concurrency") + 1] = "2"
        return cmd


class PyEnvoy2(PyEnvoyProcess):
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--concurrency") + 1] = "2"
        return [*cmd, "--base-id", str(next(_base_ids))]


KINDS: dict[str, type[ProxyProcess]] = {"envoy": Envoy2, "pyenvoy": PyEnvoy2}


def start(kind: str, upstream_port: int, thresholds: str, connect_timeout: str = "1s") -> Any:
    text = CONFIG.format(
        # left as placeholders: ProxyProcess picks free ports for them
        admin_port="{admin_port}",
        listener_port="{listener_port}",
        upstream_port=upstream_port,
        thresholds=thresholds,
        connect_timeout=connect_timeout,
    )
    p = KINDS[kind](text, ready_timeout=20.0)
    p.start()
    return p


def worker_cx(proxy: Any) -> list[int]:
    stats = proxy.stats()
    addr = f"listener.127.0.0.1_{proxy.listener_port}"
    return [stats.get(f"{addr}.worker_{i}.downstream_cx_total", 0) for i in (0, 1)]


class Pinned:
    """Client connections by the worker that accepted them."""

    def __init__(self) -> None:
        self.by_worker: dict[int, list[socket.socket]] = {0: [], 1: []}
        self.spare: list[socket.socket] = []

    def close(self) -> None:
        for s in [*self.by_worker[0], *self.by_worker[1], *self.spare]:
            s.close()


def pin(proxy: Any, per_worker: int, tries: int = 60) -> Pinned:
    out = Pinned()
    before = worker_cx(proxy)
    for _ in range(tries):
        if all(len(v) >= per_worker for v in out.by_worker.values()):
            return out
        s = socket.create_connection(("127.0.0.1", proxy.listener_port), timeout=10)
        deadline = time.monotonic() + 5
        now = worker_cx(proxy)
        while sum(now) == sum(before) and time.monotonic() < deadline:
            time.sleep(0.01)
            now = worker_cx(proxy)
        assert sum(now) == sum(before) + 1, (before, now)
        worker = 0 if now[0] > before[0] else 1
        before = now
        (out.by_worker[worker] if len(out.by_worker[worker]) < per_worker else out.spare).append(s)
    out.close()
    raise AssertionError(f"could not get {per_worker} connections on each worker")


@contextlib.contextmanager
def running_upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@contextlib.contextmanager
def pinned_proxy(
    kind: str, upstream_port: int, thresholds: str, per_worker: int, connect_timeout: str = "1s"
) -> Iterator[tuple[Any, Pinned]]:
    """A started proxy (``--concurrency 2``) and ``per_worker`` client connections pinned
    to each of its workers; both closed on exit."""
    proxy = start(kind, upstream_port, thresholds, connect_timeout)
    pinned = Pinned()
    try:
        pinned = pin(proxy, per_worker)
        yield proxy, pinned
    finally:
        pinned.close()
        proxy.stop()


def send(s: socket.socket, path: str) -> None:
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: cb\r\n\r\n".encode())


def read_response(s: socket.socket, timeout: float = 10.0) -> Any:
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except OSError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
        try:
            got = parse_raw_responses(buf)
        except ValueError:
            continue
        if got:
            return got[0]
    return None


class Collector:
    """Reads one response per socket in threads (so slow and fast ones overlap)."""

    def __init__(self) -> None:
        self.results: dict[int, Any] = {}
        self.threads: list[threading.Thread] = []

    def expect(self, tag: int, s: socket.socket, timeout: float = 10.0) -> None:
        def run() -> None:
            self.results[tag] = read_response(s, timeout)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self) -> dict[int, Any]:
        for t in self.threads:
            t.join(15)
        return self.results


def wait_until(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def status_kinds(responses: list[Any]) -> list[str]:
    """'200', 'UO' (overflow local reply) or '503' (another 503), sorted."""
    out = []
    for r in responses:
        if r is None:
            out.append("none")
        elif r.status == 503 and r.body == OVERFLOW_BODY:
            out.append("UO")
        else:
            out.append(str(r.status))
    return sorted(out)


@pytest.fixture()
def upstream() -> Iterator[HttpUpstream]:
    with running_upstream() as up:
        yield up


# --------------------------------------------------------------------------- max_requests


def run_max_requests(kind: str) -> dict[str, Any]:
    with (
        running_upstream() as up,
        pinned_proxy(kind, up.port, "{max_requests: 2, track_remaining: true}", 3) as (
            proxy,
            pinned,
        ),
    ):
        conns = [*pinned.by_worker[0], *pinned.by_worker[1]]
        col = Collector()
        for i, s in enumerate(conns):
            send(s, "/delay/1000")
            col.expect(i, s)
        assert up.wait_requests(2, 5)
        time.sleep(0.3)  # the overflowing ones have been answered by now
        s = proxy.stats()
        in_flight = {
            "upstream_requests": up.request_count,
            "rq_open": s[CB + "rq_open"],
            "remaining_rq": s[CB + "remaining_rq"],
            "upstream_rq_active": s["cluster.cb.upstream_rq_active"],
        }
        results = col.join()
        statuses = status_kinds([results.get(i) for i in range(len(conns))])
        wait_until(lambda: proxy.stats()["cluster.cb.upstream_rq_active"] == 0)
        s = proxy.stats()
        return {
            "statuses": statuses,
            "in_flight": in_flight,
            "after": {
                k: s.get("cluster.cb." + k)
                for k in (
                    "upstream_rq_active_overflow",
                    "upstream_rq_pending_overflow",
                    "upstream_cx_overflow",
                    "upstream_rq_total",
                    "circuit_breakers.default.rq_open",
                    "circuit_breakers.default.remaining_rq",
                )
            },
        }


def test_max_requests_is_process_wide_as_in_envoy() -> None:
    envoy = run_max_requests("envoy")
    py = run_max_requests("pyenvoy")
    assert py == envoy
    assert envoy["statuses"] == ["200", "200", "UO", "UO", "UO", "UO"]


# ------------------------------------------------------------------------ max_connections


def run_max_connections(kind: str) -> dict[str, Any]:
    """max_connections: 2. A request on worker 0, one on worker 1 (2 connections, the
    process is at its limit), then a second one on worker 0: it may not open a third
    connection (upstream_cx_overflow), waits for worker 0's and is served after it."""
    with (
        running_upstream() as up,
        pinned_proxy(kind, up.port, "{max_connections: 2, track_remaining: true}", 2) as (
            proxy,
            pinned,
        ),
    ):
        (a0, a1), (b0, _) = pinned.by_worker[0], pinned.by_worker[1]
        col = Collector()
        for n, s in enumerate((a0, b0)):
            send(s, "/delay/1000")
            col.expect(n, s)
            assert up.wait_requests(n + 1, 5)
        send(a1, "/delay/10")
        col.expect(2, a1)
        assert wait_until(lambda: proxy.stats()["cluster.cb.upstream_rq_pending_active"] == 1)
        s = proxy.stats()
        in_flight = {
            "cx_open": s[CB + "cx_open"],
            "remaining_cx": s[CB + "remaining_cx"],
            "upstream_cx_active": s["cluster.cb.upstream_cx_active"],
            "upstream_cx_overflow": s["cluster.cb.upstream_cx_overflow"],
        }
        results = col.join()
        s = proxy.stats()
        return {
            "statuses": status_kinds([results.get(i) for i in range(3)]),
            "in_flight": in_flight,
            "upstream_connections": len({r.conn_id for r in up.requests}),
            "after": {
                k: s.get("cluster.cb." + k)
                for k in ("upstream_cx_total", "upstream_cx_overflow", "upstream_rq_total")
            },
        }


def test_max_connections_is_process_wide_as_in_envoy() -> None:
    envoy = run_max_connections("envoy")
    py = run_max_connections("pyenvoy")
    assert py == envoy
    assert envoy["after"]["upstream_cx_total"] == 2


# ------------------------------------------------------------------- max_pending_requests


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: connects to it hang (SYNs are dropped)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(lsock.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.05)
    return lsock, fillers


def run_max_pending(kind: str) -> dict[str, Any]:
    """max_pending_requests: 2 in front of an upstream that never completes a connect: a
    request on worker 0 and one on worker 1 wait (the process's 2), a second one on
    worker 0 overflows at once; the waiting ones fail at the connect timeout."""
    lsock, fillers = blackhole()
    try:
        with pinned_proxy(
            kind,
            lsock.getsockname()[1],
            "{max_pending_requests: 2, track_remaining: true}",
            2,
            connect_timeout="2s",
        ) as (proxy, pinned):
            (a0, a1), (b0, _) = pinned.by_worker[0], pinned.by_worker[1]
            col = Collector()
            for n, s in enumerate((a0, b0)):
                send(s, "/")
                col.expect(n, s)
                assert wait_until(
                    lambda n=n: proxy.stats()["cluster.cb.upstream_rq_pending_active"] == n + 1
                )
            send(a1, "/")
            third = read_response(a1, 1.5)
            s = proxy.stats()
            in_flight = {
                "third": status_kinds([third]),
                "rq_pending_open": s[CB + "rq_pending_open"],
                "remaining_pending": s[CB + "remaining_pending"],
                "upstream_rq_pending_overflow": s["cluster.cb.upstream_rq_pending_overflow"],
            }
            results = col.join()
            s = proxy.stats()
            return {
                "statuses": status_kinds([results.get(i) for i in range(2)]),
                "in_flight": in_flight,
                "after": {
                    k: s.get("cluster.cb." + k)
                    for k in (
                        "upstream_rq_pending_overflow",
                        "upstream_cx_connect_timeout",
                        "circuit_breakers.default.rq_pending_open",
                        "circuit_breakers.default.remaining_pending",
                    )
                },
            }
    finally:
        for f in fillers:
            f.close()
        lsock.close()


def test_max_pending_requests_is_process_wide_as_in_envoy() -> None:
    envoy = run_max_pending("envoy")
    py = run_max_pending("pyenvoy")
    assert py == envoy
    assert envoy["in_flight"]["third"] == ["UO"]


# ------------------------------------------------------------------------ worker restart


def worker_pids(pid: int, timeout: float = 15.0, exclude: frozenset[int] = frozenset()) -> set[int]:
    from tests.test_workers import wait_children

    return wait_children(pid, 2 if not exclude else 1, timeout, set(exclude))


def test_killed_worker_leaves_no_counts_behind(upstream: HttpUpstream) -> None:
    """max_requests: 2, one request in flight in each worker; one worker is killed (-9).
    Its count must go (the main process zeroes its counters, the new worker starts from
    zero): the survivor can take exactly one more request, a second one overflows."""
    with pinned_proxy("pyenvoy", upstream.port, "{max_requests: 2, track_remaining: true}", 3) as (
        proxy,
        pinned,
    ):
        col = Collector()
        heads = {w: pinned.by_worker[w][0] for w in (0, 1)}
        for w, s in heads.items():
            send(s, "/delay/4000")
            col.expect(w, s)
        assert upstream.wait_requests(2, 5)
        assert wait_until(lambda: proxy.stats()[CB + "remaining_rq"] == 0)
        assert proxy.stats()[CB + "rq_open"] == 1
        workers = worker_pids(proxy.proc.pid)
        os.kill(min(workers), signal.SIGKILL)
        # The victim's client connection ends; the survivor's request is still in flight.
        deadline = time.monotonic() + 5
        while len(col.results) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(col.results) == 1 and next(iter(col.results.values())) is None
        dead = next(iter(col.results))
        alive = 1 - dead
        # One request (the survivor's) counts now.
        assert wait_until(lambda: proxy.stats()[CB + "remaining_rq"] == 1, 5)
        worker_pids(proxy.proc.pid, exclude=frozenset(workers))  # restarted
        second, third = pinned.by_worker[alive][1:3]
        send(second, "/delay/1000")
        assert upstream.wait_requests(3, 5)
        send(third, "/delay/1000")
        r3 = read_response(third, 5)
        r2 = read_response(second, 5)
        assert status_kinds([r2, r3]) == ["200", "UO"]
        assert col.join()[alive].status == 200
        assert wait_until(lambda: proxy.stats()[CB + "remaining_rq"] == 2)
        s = proxy.stats()
        assert s[CB + "rq_open"] == 0
        assert s["cluster.cb.upstream_rq_active_overflow"] == 1
        assert "exited with status -9; restarting it" in proxy.output()


# ------------------------------------------------------------------------ the table itself


def _proto(name: str = "c", **thresholds: Any) -> Any:
    return json_format.ParseDict(
        {"name": name, "circuit_breakers": {"thresholds": [thresholds]}}, ClusterProto()
    )


@pytest.fixture()
def table() -> Iterator[SharedCounts]:
    t = SharedCounts.create(2, capacity=4)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture()
def workers(table: SharedCounts) -> Iterator[list[SharedCounts]]:
    """Worker 0's and worker 1's attachments to ``table`` (as a worker process opens it)."""
    ws = [SharedCounts.attach(os.dup(table.fileno()), i) for i in (0, 1)]
    try:
        yield ws
    finally:
        for w in ws:
            w.close()


def test_two_attachments_agree_on_entries(table: SharedCounts, workers: list[SharedCounts]) -> None:
    w0, w1 = workers
    ka, kb = key_for(b"cluster a"), key_for(b"cluster b")
    e1 = w1.entry(kb)  # built in a different order in each worker
    e0a, e0b = w0.entry(ka), w0.entry(kb)
    e1a = w1.entry(ka)
    assert e0a is not None and e0b is not None and e1 is not None and e1a is not None
    assert e0b.slot == e1.slot and e0a.slot == e1a.slot != e1.slot
    main_view = table.find(kb)  # the main process finds it, never allocates
    assert main_view is not None and main_view.slot == e1.slot
    assert table.find(key_for(b"never built")) is None
    # What one worker counts, every process sees; each writes its own counter.
    e0b.counters(1, 2)[0] += 3
    e1.counters(1, 2)[1] += 2
    assert [e.total(1, 2) for e in (e0b, e1, main_view)] == [5, 5, 5]
    assert e0b.total(0, 2) == 0 and e0a.total(1, 2) == 0
    with pytest.raises(ValueError):
        SharedCounts.attach(os.dup(table.fileno()), 2)


def test_full_table_falls_back_to_per_worker_counts(
    table: SharedCounts, workers: list[SharedCounts], caplog: pytest.LogCaptureFixture
) -> None:
    w0 = workers[0]
    keys = [key_for(b"c%d" % i) for i in range(5)]
    assert all(w0.entry(k) is not None for k in keys[:4])
    assert w0.entry(keys[4]) is None
    assert w0.entry(keys[2]) is not None  # existing ones are still found
    shared_counts.install(w0)
    try:
        store = Store()
        info = _Info(_proto("late", max_requests=1), store)
        rms = resource_managers(info)
    finally:
        shared_counts.install(None)
    assert rms.shared is None
    assert type(rms.default.requests) is Resource
    assert "shared table is full" in caplog.text and "'late'" in caplog.text


def test_zero_worker_clears_only_its_counters(
    table: SharedCounts, workers: list[SharedCounts]
) -> None:
    w0, w1 = workers
    a0, a1 = w0.entry(key_for(b"a")), w1.entry(key_for(b"a"))
    assert a0 is not None and a1 is not None
    for prio in (0, 1):
        for res in range(5):
            a0.counters(prio, res)[0] += 1
            a1.counters(prio, res)[1] += 10
    table.zero_worker(1)  # e.g. the main process, worker 1 died
    assert all(a0.total(p, r) == 1 for p in (0, 1) for r in range(5))
    w0.zero_worker(0)  # e.g. worker 0 starting again
    assert all(a1.total(p, r) == 0 for p in (0, 1) for r in range(5))
    table.zero_worker(7)  # not a worker of this table: nothing


class _Info:
    """The parts of a ClusterInfo resource_managers() reads."""

    def __init__(self, proto: Any, store: Store, scope_name: str = "") -> None:
        self.proto = proto
        self.name = proto.name
        self.proto_hash = proto.SerializeToString(deterministic=True)
        self.stats = type("S", (), {"scope": store.scope(f"cluster.{scope_name or proto.name}")})()
        self.resource_managers: ResourceManagers | None = None


def test_shared_resources_count_for_the_process(table: SharedCounts) -> None:
    """Two workers' ResourceManagers of one cluster share their limits; the main process
    computes the gauges from the table."""
    proto = _proto("c", max_requests=2, max_connections=3, track_remaining=True)
    rms = []
    for index in (0, 1):
        w = SharedCounts.attach(os.dup(table.fileno()), index)
        shared_counts.install(w)
        try:
            rms.append(resource_managers(_Info(proto, Store())))
        finally:
            shared_counts.install(None)
    r0, r1 = (m.default.requests for m in rms)
    assert isinstance(r0, SharedResource) and r0.fast_limit == 0
    assert r0.acquire() and r1.acquire()
    assert not r0.acquire() and not r1.can_create()
    assert (r0.current, r1.current, r0.count()) == (1, 1, 2)
    # The hot path's release: the caller decrements current, then released().
    r1.current -= 1
    r1.released()
    assert r0.can_create() and r0.count() == 1
    c0, c1 = (m.default.connections for m in rms)
    c0.inc()
    c1.inc()
    c1.inc()
    assert not c0.can_create()
    c1.dec()
    assert c0.can_create()
    # Workers leave the gauges alone ...
    assert r0.open_gauge.value == 0 and r0.remaining is not None and r0.remaining.value == 2
    # ... the main process publishes them from the table.
    main_store = Store()
    main_info = _Info(proto, main_store)
    main_rms = resource_managers(main_info)  # no table installed: plain resources
    entry = table.find(key_for(main_info.proto_hash))
    assert entry is not None
    main_rms.default.requests.inc()  # the main process's own count plays no part
    publish_shared_gauges(main_rms, entry)
    g = {name: v.value for name, v in main_store.gauges.items()}
    assert g["cluster.c.circuit_breakers.default.rq_open"] == 0
    assert g["cluster.c.circuit_breakers.default.remaining_rq"] == 1
    assert g["cluster.c.circuit_breakers.default.cx_open"] == 0
    assert g["cluster.c.circuit_breakers.default.remaining_cx"] == 1
    r1.acquire()
    c1.inc()
    publish_shared_gauges(main_rms, entry)
    g = {name: v.value for name, v in main_store.gauges.items()}
    assert g["cluster.c.circuit_breakers.default.rq_open"] == 1
    assert g["cluster.c.circuit_breakers.default.remaining_rq"] == 0
    assert g["cluster.c.circuit_breakers.default.cx_open"] == 1
    assert g["cluster.c.circuit_breakers.default.remaining_cx"] == 0
    assert g["cluster.c.circuit_breakers.high.rq_open"] == 0
    # A changed cluster config is another entry: it starts from zero, as Envoy's new
    # ResourceManager does.
    assert table.find(key_for(_proto("c", max_requests=5).SerializeToString())) is None


def test_retry_budget_counts_for_the_process(table: SharedCounts) -> None:
    proto = json_format.ParseDict(
        {
            "name": "b",
            "circuit_breakers": {
                "thresholds": [
                    {
                        "track_remaining": True,
                        "retry_budget": {
                            "budget_percent": {"value": 50.0},
                            "min_retry_concurrency": 1,
                        },
                    }
                ]
            },
        },
        ClusterProto(),
    )
    rms = []
    for index in (0, 1):
        w = SharedCounts.attach(os.dup(table.fileno()), index)
        shared_counts.install(w)
        try:
            rms.append(resource_managers(_Info(proto, Store())))
        finally:
            shared_counts.install(None)
    a, b = rms[0].default, rms[1].default
    # 4 active requests over both workers: a budget of 2 retries for the process.
    for rm in (a, a, b, b):
        assert rm.requests.acquire()
    assert a.retries.max() == 2
    assert a.retries.can_create()
    a.retries.inc()
    b.retries.inc()
    assert not a.retries.can_create() and not b.retries.can_create()
    a.retries.dec()
    assert b.retries.can_create() and b.retries.count() == 1
