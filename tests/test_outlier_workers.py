"""``--concurrency 2``: outlier detection is one detector per cluster, in the main process.

Strategy: a real ``python -m pyenvoy`` with two workers and two upstream hosts, one of them
answering 503. Which worker serves a request is told by the per-worker listener stats
(``listener.<addr>.worker_<i>.downstream_cx_total``) read right after it; to send a request
through a chosen worker the test keeps one keep-alive connection per worker (found over
new connections to a route whose cluster has no outlier detection, so finding them costs
the detector nothing). The consecutive 5xx are then split over both workers (3 + 2): the
main process must eject the host after 5 in total, count it once, show it in /clusters,
and every worker must stop sending it anything; after ``base_ejection_time`` it comes back
in every worker. Everything is killed in ``finally`` and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto
from google.protobuf.json_format import ParseDict

from pyenvoy.stats import Store
from pyenvoy.upstream.cluster_manager import ClusterManager
from pyenvoy.upstream.health_check import HealthPublisher
from pyenvoy.upstream.host import FAILED_OUTLIER_CHECK, Host
from pyenvoy.upstream.outlier_detection import (
    OUTLIER_EVENTS_OP,
    OutlierDetectionStats,
    OutlierDetector,
    RemoteOutlier,
    apply_outlier_events,
)
from tests.support.configs import http_listener
from tests.support.procs import free_port, read_stats
from tests.support.upstream import HttpUpstream
from tests.test_hot_restart import PyEnvoy, wait_stat
from tests.test_workers import (
    R503,
    _base_ids,
    get_close,
    host_flags,
    per_worker_cx,
    two_upstreams,  # noqa: F401 - the fixture
    wait_children,
    wait_flags,
    wait_live,
)

CONFIG = (
    http_listener(
        '{{match: {{prefix: "/probe"}}, route: {{cluster: probe}}}}',
        '{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}',
    )
    + """\
  - name: backend
    connect_timeout: 1s
    outlier_detection:
      consecutive_5xx: 5
      interval: {interval}
      base_ejection_time: {base_ejection_time}
      max_ejection_percent: 50
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {a}}}}}}}
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {b}}}}}}}
  - name: probe
    connect_timeout: 1s
    load_assignment:
      cluster_name: probe
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {a}}}}}}}
"""
)

OD = "cluster.backend.outlier_detection."


def od_stats(admin: int) -> dict[str, int]:
    stats = read_stats(f"http://127.0.0.1:{admin}")
    return {k[len(OD) :]: v for k, v in stats.items() if k.startswith(OD)}


def to_b(b: HttpUpstream) -> int:
    """Requests the proxy sent the failing host."""
    return sum(1 for q in list(b.requests) if q.path == "/echo")


def worker_connections(admin: int, port: int) -> list[http.client.HTTPConnection]:
    """One open keep-alive connection per worker (index = worker), found by opening new
    connections to the /probe route until each worker has accepted one."""
    found: list[http.client.HTTPConnection | None] = [None, None]
    spare: list[http.client.HTTPConnection] = []
    before = per_worker_cx(admin, port)
    try:
        for _ in range(40):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            assert request(conn, "/probe") == 200
            after = per_worker_cx(admin, port)
            grew = [i for i in (0, 1) if after[i] > before[i]]
            before = after
            assert len(grew) == 1, (before, after)
            if found[grew[0]] is None:
                found[grew[0]] = conn
            else:
                spare.append(conn)
            if all(c is not None for c in found):
                return [c for c in found if c is not None]
    finally:
        for c in spare:
            c.close()
    raise AssertionError(f"SO_REUSEPORT sent 40 new connections to one worker: {before}")


def request(conn: http.client.HTTPConnection, path: str = "/echo") -> int:
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    return r.status


def fail_via(conn: http.client.HTTPConnection, b: HttpUpstream, n: int) -> None:
    """Send requests on ``conn`` (one worker) until the failing host answered ``n`` more."""
    want = to_b(b) + n
    for _ in range(4 * n):
        if to_b(b) == want:
            return
        request(conn)
    assert to_b(b) == want


def start(tmp_path: Path, a: int, b: int, **od: str) -> tuple[PyEnvoy, int, int]:
    admin, port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG.format(admin_port=admin, listener_port=port, a=a, b=b, **od))
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    wait_live(admin, p)
    return p, admin, port


def test_main_process_ejects_after_five_5xx_over_all_workers(
    two_upstreams: tuple[HttpUpstream, HttpUpstream],  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = two_upstreams
    b.raw_responses["/echo"] = R503
    p, admin, port = start(tmp_path, a.port, b.port, interval="1s", base_ejection_time="300s")
    conns: list[http.client.HTTPConnection] = []
    try:
        conns = worker_connections(admin, port)
        assert to_b(b) == 0
        # 3 consecutive 5xx through worker 0, 1 through worker 1: no worker saw 5 on its
        # own, nor the main process yet.
        fail_via(conns[0], b, 3)
        fail_via(conns[1], b, 1)
        time.sleep(0.3)  # what the workers posted has arrived
        assert od_stats(admin).get("ejections_enforced_total", 0) == 0
        assert host_flags(admin) == {a.port: "healthy", b.port: "healthy"}
        # The fifth, through worker 1: the main process ejects b, once for the whole proxy.
        fail_via(conns[1], b, 1)
        wait_stat(admin, OD + "ejections_enforced_total", 1, p, timeout=5)
        wait_flags(admin, {a.port: "healthy", b.port: "/failed_outlier_check"}, p)
        # What real Envoy 1.40 shows for this (--concurrency 2, 3 + 2 503s over its two
        # workers): one ejection; 503 is a gateway failure too (detected, not enforced).
        ones = {
            "ejections_active",
            "ejections_consecutive_5xx",
            "ejections_detected_consecutive_5xx",
            "ejections_detected_consecutive_gateway_failure",
            "ejections_enforced_consecutive_5xx",
            "ejections_enforced_total",
            "ejections_total",
        }
        stats = od_stats(admin)
        assert stats == {
            n: int(n in ones) for n in OutlierDetectionStats.COUNTERS + ("ejections_active",)
        }
        whole = read_stats(f"http://127.0.0.1:{admin}")
        assert whole["cluster.backend.membership_healthy"] == 1
        # No worker sends b anything more: not on the kept connections, not on new ones.
        time.sleep(0.2)
        sent = to_b(b)
        for conn in conns:
            for _ in range(5):
                assert request(conn) == 200
        cx = per_worker_cx(admin, port)
        for _ in range(30):
            assert get_close(port) == 200
        cx2 = per_worker_cx(admin, port)
        assert all(n > m for n, m in zip(cx2, cx, strict=True)), (cx, cx2)  # both workers
        assert to_b(b) == sent
        # Still one ejection, counted once (not summed over workers).
        stats = od_stats(admin)
        assert stats["ejections_enforced_total"] == 1 and stats["ejections_active"] == 1
        # A worker that replaces a dead one starts with the ejection.
        for conn in conns:
            conn.close()
        workers = wait_children(p.proc.pid, 2)
        os.kill(min(workers), signal.SIGKILL)
        wait_children(p.proc.pid, 1, exclude=workers)
        cx = per_worker_cx(admin, port)
        for _ in range(30):
            assert get_close(port) == 200
        cx2 = per_worker_cx(admin, port)
        assert all(n > m for n, m in zip(cx2, cx, strict=True)), (cx, cx2)
        assert to_b(b) == sent
        assert od_stats(admin)["ejections_enforced_total"] == 1
    finally:
        for conn in conns:
            conn.close()
        p.kill()


def test_ejected_host_comes_back_in_every_worker(
    two_upstreams: tuple[HttpUpstream, HttpUpstream],  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = two_upstreams
    b.raw_responses["/echo"] = R503
    p, admin, port = start(tmp_path, a.port, b.port, interval="0.3s", base_ejection_time="2s")
    conns: list[http.client.HTTPConnection] = []
    try:
        conns = worker_connections(admin, port)
        fail_via(conns[0], b, 2)
        fail_via(conns[1], b, 3)
        wait_flags(admin, {a.port: "healthy", b.port: "/failed_outlier_check"}, p, timeout=5)
        ejected_at = time.monotonic()
        del b.raw_responses["/echo"]  # b is fine again
        time.sleep(0.1)
        sent = to_b(b)
        for conn in conns:
            for _ in range(4):
                assert request(conn) == 200
        assert to_b(b) == sent
        assert time.monotonic() - ejected_at < 1.5  # all of that within the ejection
        # The main process's sweep un-ejects b after base_ejection_time, in every worker.
        wait_flags(admin, {a.port: "healthy", b.port: "healthy"}, p, timeout=5)
        assert time.monotonic() - ejected_at >= 1.5
        assert od_stats(admin)["ejections_active"] == 0
        time.sleep(0.2)
        for i, conn in enumerate(conns):
            before = to_b(b)
            for _ in range(4):  # round robin over a and b in this worker
                assert request(conn) == 200
            assert to_b(b) - before == 2, f"worker {i} sent b {to_b(b) - before} of 4"
        stats = od_stats(admin)
        assert stats["ejections_enforced_total"] == 1 and stats["ejections_active"] == 0
    finally:
        for conn in conns:
            conn.close()
        p.kill()


# --- the same links in one process: frames, batching, snapshots ------------------------------


class MainAndWorkers:
    """A main-process ClusterManager with a real detector and two workers' managers whose
    detectors post to it, linked as WorkerPool links them (JSON both ways)."""

    def __init__(self, proto: ClusterProto, workers: int = 2) -> None:
        self.main = ClusterManager([proto], Store())
        self.frames: list[dict[str, Any]] = []  # worker -> main
        self.messages: list[dict[str, Any]] = []  # main -> workers
        self.workers: list[ClusterManager] = []
        self.remotes: list[RemoteOutlier] = []
        for _ in range(workers):
            self.add_worker(proto)
        self.publisher = HealthPublisher(self.main, self._publish, send_passed=False)

    def add_worker(self, proto: ClusterProto) -> ClusterManager:
        cm = ClusterManager([proto], Store())
        remote = RemoteOutlier()
        cm.use_remote_outlier(remote)
        remote.set_report(self._post)
        self.workers.append(cm)
        self.remotes.append(remote)
        return cm

    def _post(self, msg: dict[str, Any]) -> None:
        msg = json.loads(json.dumps(msg))  # what the control socket carries
        self.frames.append(msg)
        apply_outlier_events(self.main, msg)

    def _publish(self, msg: dict[str, Any]) -> None:
        msg = json.loads(json.dumps(msg))
        self.messages.append(msg)
        for r in self.remotes:
            r.update(msg)

    def host(self, cm: ClusterManager, port: int) -> Host:
        c = cm.get("c")
        assert c is not None
        return next(h for h in c.hosts if h.address[1] == port)

    def close(self) -> None:
        self.publisher.close()
        for cm in (self.main, *self.workers):
            cm.close()


def _od_cluster(ports: list[int]) -> ClusterProto:
    return ParseDict(
        {
            "name": "c",
            "connect_timeout": "0.5s",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "c",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": p}
                                    }
                                }
                            }
                            for p in ports
                        ]
                    }
                ],
            },
            "outlier_detection": {
                "consecutive_5xx": 5,
                "max_ejection_percent": 50,
                "base_ejection_time": "30s",
                "interval": "60s",
            },
        },
        ClusterProto(),
    )


async def test_workers_post_results_and_take_the_main_process_ejections() -> None:
    pa, pb = 40001, 40002  # never connected to
    links = MainAndWorkers(_od_cluster([pa, pb]))
    try:
        await links.main.initialize()
        for cm in links.workers:
            await cm.initialize()
        w0, w1 = (cm.get("c") for cm in links.workers)
        assert w0 is not None and w1 is not None
        assert not isinstance(w0.outlier, OutlierDetector)  # posts, never decides
        main_c = links.main.get("c")
        assert main_c is not None
        main_od = main_c.outlier
        # Results of one loop iteration: one frame, by host, in order, runs counted once.
        wa0, wb0 = links.host(links.workers[0], pa), links.host(links.workers[0], pb)
        wb1 = links.host(links.workers[1], pb)
        w0.outlier.on_upstream_response(wb0, 503)
        w0.outlier.on_upstream_response(wa0, 200)
        w0.outlier.on_local_origin_failure(wb0, "connection_failure")
        w0.outlier.on_local_origin_failure(wb0, "overflow")  # not the host's fault: dropped
        w0.outlier.on_upstream_response(wa0, 200)
        w0.outlier.on_upstream_response(wb0, 502)
        assert links.frames == []
        await asyncio.sleep(0)
        assert links.frames == [
            {
                "op": OUTLIER_EVENTS_OP,
                "hosts": [
                    ["c", "127.0.0.1", pb, [0, 503, 1, 1, "connection_failure", 1, 0, 502, 1]],
                    ["c", "127.0.0.1", pa, [0, 200, 2]],
                ],
            }
        ]
        assert links.host(links.main, pa).outlier.ext_success == 2
        mb = links.host(links.main, pb)
        assert mb.outlier.consecutive_5xx == 3  # the main process's detector counted them
        assert mb.health_flags == wb0.health_flags == 0
        # Two more through the other worker: 5 in total ejects b, in the main process.
        w1.outlier.on_upstream_response(wb1, 500)
        w1.outlier.on_upstream_response(wb1, 500)
        await asyncio.sleep(0)
        assert mb.health_flags & FAILED_OUTLIER_CHECK
        assert main_od.stats.ejections_enforced_total.value == 1
        worker_stats = links.workers[0].stats_store.counters
        enforced = worker_stats.get("cluster.c.outlier_detection.ejections_enforced_total")
        assert enforced is None or enforced.value == 0  # (and /stats takes the main's only)
        await asyncio.sleep(0)  # the publisher's flush
        assert links.messages[-1]["outlier"] == {"c": [["127.0.0.1", pb]]}
        for cm in links.workers:
            c = cm.get("c")
            assert c is not None
            assert links.host(cm, pb).health_flags & FAILED_OUTLIER_CHECK
            assert {c.choose_host().address[1] for _ in range(10)} == {pa}  # type: ignore[union-attr]
        # A worker that starts gets the ejection in the snapshot (init frame / once ready).
        snap = json.loads(json.dumps(links.publisher.snapshot()))
        assert snap["full"] is True and snap["outlier"] == {"c": [["127.0.0.1", pb]]}
        late = links.add_worker(_od_cluster([pa, pb]))
        links.remotes[-1].update(snap)
        await late.initialize()
        assert links.host(late, pb).health_flags & FAILED_OUTLIER_CHECK
        # The main process's sweep un-ejects b once the ejection time is over: every
        # worker follows.
        main_od.sweep(time.monotonic() + 31)
        assert not mb.health_flags & FAILED_OUTLIER_CHECK
        await asyncio.sleep(0)
        assert links.messages[-1]["outlier"] == {"c": []}
        for cm in links.workers:
            assert not links.host(cm, pb).health_flags & FAILED_OUTLIER_CHECK
        # An ejected host of a cluster the main process drops is forgotten (full resync).
        for _ in range(5):
            w0.outlier.on_upstream_response(wb0, 503)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert all(links.host(cm, pb).health_flags & FAILED_OUTLIER_CHECK for cm in links.workers)
        links.main.remove("c")
        await asyncio.sleep(0)
        assert links.messages[-1]["full"] is True and "outlier" not in links.messages[-1]
        assert not any(
            links.host(cm, pb).health_flags & FAILED_OUTLIER_CHECK for cm in links.workers
        )
        # Results for a cluster the main process no longer has are dropped.
        w0.outlier.on_upstream_response(wb0, 503)
        await asyncio.sleep(0)
        assert links.frames[-1]["hosts"] == [["c", "127.0.0.1", pb, [0, 503, 1]]]
    finally:
        links.close()


async def test_results_wait_until_the_main_process_reads() -> None:
    """Before the worker is ready (no ``report``) results are kept, and go out at once
    when it is set."""
    cm = ClusterManager([_od_cluster([40001])], Store())
    remote = RemoteOutlier()
    cm.use_remote_outlier(remote)
    sent: list[dict[str, Any]] = []
    try:
        c = cm.get("c")
        assert c is not None
        await cm.initialize()
        c.outlier.on_upstream_response(c.hosts[0], 200)
        await asyncio.sleep(0)
        assert sent == [] and len(remote.events) == 1
        remote.set_report(sent.append)
        await asyncio.sleep(0)
        assert [m["hosts"] for m in sent] == [[["c", "127.0.0.1", 40001, [0, 200, 1]]]]
        assert remote.events == []
    finally:
        cm.close()
