"""``--concurrency N``: N worker processes behind one admin endpoint that sums their stats.

Strategy: real ``python -m pyenvoy`` processes on free loopback ports (the process and load
helpers come from tests/test_hot_restart.py). Requests go on
new connections so that SO_REUSEPORT spreads them over both workers; the admin endpoint of
the main process must report the sum, per-worker listener stats and server.concurrency.
Worker pids come from /proc (children of the main process). Everything is killed in
``finally`` and every wait is bounded.
"""

from __future__ import annotations

import http.client
import itertools
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import http_listener
from tests.support.procs import free_port, prometheus_samples, read_stats
from tests.support.upstream import HttpUpstream
from tests.test_hot_restart import CONFIG, PyEnvoy, hot_restart_under_load, wait_stat

_base_ids = itertools.count((os.getpid() % 4000) * 10 + 60000)


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.add(int(entry))
    return out


def wait_children(
    pid: int, n: int, timeout: float = 15.0, exclude: set[int] = frozenset()
) -> set[int]:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = children(pid) - exclude
        if len(kids) == n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} has children {children(pid)}, wanted {n}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def get_close(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/echo", headers={"Connection": "close"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


@pytest.fixture()
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture()
def setup(upstream: HttpUpstream, tmp_path: Path) -> dict[str, Any]:
    ports = {
        "admin_port": free_port(),
        "listener_port": free_port(),
        "upstream_port": upstream.port,
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG.format(**ports))
    return {"config": config, "base_id": str(next(_base_ids)), **ports}


def test_two_workers_serve_and_admin_sums_them(
    setup: dict[str, Any], upstream: HttpUpstream
) -> None:
    admin, port = setup["admin_port"], setup["listener_port"]
    p = PyEnvoy(setup["config"], "--concurrency", "2", "--base-id", setup["base_id"])
    try:
        wait_stat(admin, "listener_manager.workers_started", 1, p)
        workers = wait_children(p.proc.pid, 2)
        n = 40
        for _ in range(n):
            assert get_close(port) == 200
        stats = read_stats(f"http://127.0.0.1:{admin}")
        addr = f"127.0.0.1_{port}"
        assert stats["http.ingress.downstream_rq_total"] == n == upstream.request_count
        assert stats["http.ingress.downstream_rq_2xx"] == n
        assert stats[f"listener.{addr}.downstream_cx_total"] == n
        per_worker = [stats[f"listener.{addr}.worker_{i}.downstream_cx_total"] for i in (0, 1)]
        assert sum(per_worker) == n and min(per_worker) > 0, per_worker  # SO_REUSEPORT spreads them
        assert stats["server.concurrency"] == 2
        assert stats["cluster.backend.membership_total"] == 1  # same in each worker: not summed
        # Config events are counted once per process, as real Envoy 1.40 does with
        # --concurrency 2 (same config): listener_create_success is per worker there too.
        assert stats["listener_manager.listener_added"] == 1
        assert stats["listener_manager.listener_create_success"] == 2
        assert stats["cluster_manager.cluster_added"] == 1
        assert stats["cluster.backend.membership_change"] == 1
        assert stats["http.admin.downstream_rq_total"] >= 1  # the main process's own
        assert stats["http.ingress.downstream_rq_time"] != "No recorded values"  # merged buckets
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
            prom = prometheus_samples(r.read().decode())
        assert prom['envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"}'] == n
        # SIGTERM to the main process alone stops the workers too.
        os.kill(p.proc.pid, signal.SIGTERM)
        assert p.wait(15) == 0, p.output()
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        p.kill()


def test_dead_worker_is_restarted(setup: dict[str, Any]) -> None:
    admin, port = setup["admin_port"], setup["listener_port"]
    p = PyEnvoy(setup["config"], "--concurrency", "2", "--base-id", setup["base_id"])
    try:
        wait_stat(admin, "listener_manager.workers_started", 1, p)
        workers = wait_children(p.proc.pid, 2)
        for _ in range(20):
            assert get_close(port) == 200
        before = read_stats(f"http://127.0.0.1:{admin}")["http.ingress.downstream_rq_total"]
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # Requests keep working while the worker is replaced (its socket's queue waits).
        for _ in range(10):
            assert get_close(port) == 200
        replacement = wait_children(p.proc.pid, 1, exclude=workers)
        assert len(replacement) == 1 and victim not in replacement
        for _ in range(20):
            assert get_close(port) == 200
        after = read_stats(f"http://127.0.0.1:{admin}")["http.ingress.downstream_rq_total"]
        assert after == before + 30  # the dead worker's counts are kept
        assert "exited with status -9; restarting it" in p.output()
    finally:
        p.kill()


def test_hot_restart_with_workers_fails_no_request(
    setup: dict[str, Any], upstream: HttpUpstream
) -> None:
    load, stats = hot_restart_under_load(setup, upstream, "--concurrency", "2")
    assert load.failures == []
    assert load.ok > 100
    assert stats["http.ingress.downstream_rq_total"] == load.ok + 1 == upstream.request_count
    assert stats["server.hot_restart_generation"] == 2


def test_bind_listen_sockets_follows_enable_reuse_port() -> None:
    from pyenvoy.config.loader import load_bootstrap
    from pyenvoy.server import Server
    from pyenvoy.workers import bind_listen_sockets

    port = free_port()
    text = CONFIG.format(admin_port=0, listener_port=port, upstream_port=1)
    server = Server(load_bootstrap(None, text))
    assert server.listener_manager is not None
    listeners = server.listener_manager.listeners
    socks = bind_listen_sockets(listeners, 3)[("127.0.0.1", port)]
    try:
        assert len(socks) == 3 and len({s.fileno() for s in socks}) == 3
        assert {s.getsockname()[1] for s in socks} == {port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
    finally:
        for s in socks:
            s.close()
    shared_text = text.replace("  - name: http\n", "  - name: http\n    enable_reuse_port: false\n")
    server = Server(load_bootstrap(None, shared_text))
    assert server.listener_manager is not None
    socks = bind_listen_sockets(server.listener_manager.listeners, 3)[("127.0.0.1", port)]
    try:
        assert len(socks) == 1  # one socket all workers accept from
    finally:
        for s in socks:
            s.close()


def post(admin_port: int, path: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.status)


def test_admin_changes_reach_the_workers(setup: dict[str, Any]) -> None:
    admin, port = setup["admin_port"], setup["listener_port"]
    p = PyEnvoy(setup["config"], "--concurrency", "2", "--base-id", setup["base_id"])
    try:
        wait_stat(admin, "listener_manager.workers_started", 1, p)
        for _ in range(10):
            assert get_close(port) == 200
        url = f"http://127.0.0.1:{admin}"
        assert read_stats(url)["http.ingress.downstream_rq_total"] == 10
        assert post(admin, "/reset_counters") == 200
        assert read_stats(url)["http.ingress.downstream_rq_total"] == 0
        for _ in range(3):
            assert get_close(port) == 200
        assert read_stats(url)["http.ingress.downstream_rq_total"] == 3
        # /healthcheck/fail drains: keep-alive responses from every worker say close.
        assert post(admin, "/healthcheck/fail") == 200
        time.sleep(0.6)
        for _ in range(6):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/echo")
                r = conn.getresponse()
                r.read()
                assert r.status == 200 and r.getheader("connection") == "close"
            finally:
                conn.close()
    finally:
        p.kill()


# --- active health checking: one checker (the main process), every worker follows it -------

HC_CONFIG = (
    http_listener('{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}')
    + """\
  - name: backend
    connect_timeout: 1s
    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: 1
      healthy_threshold: 1
      http_health_check: {{path: /healthz}}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
{endpoints}
"""
)
R503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


def hc_config(admin_port: int, listener_port: int, *upstream_ports: int) -> str:
    eps = "".join(
        "        - endpoint: {address: {socket_address: {address: 127.0.0.1, "
        f"port_value: {p}}}}}}}\n"
        for p in upstream_ports
    )
    return HC_CONFIG.format(
        admin_port=admin_port, listener_port=listener_port, endpoints=eps.rstrip("\n")
    )


def health_checks(up: HttpUpstream) -> list[Any]:
    return [q for q in list(up.requests) if q.path == "/healthz"]


def proxied(up: HttpUpstream) -> int:
    return sum(1 for q in list(up.requests) if q.path != "/healthz")


def host_flags(admin: int) -> dict[int, str]:
    """Upstream port -> health_flags of cluster ``backend`` in admin /clusters."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=5) as r:
        text = r.read().decode()
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "backend" and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def wait_flags(admin: int, want: dict[int, str], p: PyEnvoy, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    got: dict[int, str] = {}
    while time.monotonic() < deadline:
        got = host_flags(admin)
        if got == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"/clusters flags {got} != {want}:\n{p.output()}")


def wait_live(admin: int, p: PyEnvoy, timeout: float = 15.0) -> None:
    """Admin /ready says LIVE once every worker serves (and SIGHUP reaches the workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not LIVE:\n{p.output()}")


def per_worker_cx(admin: int, port: int) -> list[int]:
    stats = read_stats(f"http://127.0.0.1:{admin}")
    return [
        stats.get(f"listener.127.0.0.1_{port}.worker_{i}.downstream_cx_total", 0) for i in (0, 1)
    ]


@pytest.fixture()
def two_upstreams() -> Iterator[tuple[HttpUpstream, HttpUpstream]]:
    a, b = HttpUpstream(), HttpUpstream()
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_health_checks_run_once_and_every_worker_follows(
    two_upstreams: tuple[HttpUpstream, HttpUpstream], tmp_path: Path
) -> None:
    a, b = two_upstreams
    admin, port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(hc_config(admin, port, a.port, b.port))
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    try:
        wait_live(admin, p)
        workers = wait_children(p.proc.pid, 2)
        wait_flags(admin, {a.port: "healthy", b.port: "healthy"}, p)
        # One checker (the main process's): one health-check connection per upstream and
        # about one check per 0.2 s interval, not one stream per process.
        before = len(health_checks(a))
        time.sleep(1.0)
        checks = len(health_checks(a)) - before
        assert 2 <= checks <= 8, checks
        assert {q.conn_id for q in health_checks(a)} == {q.conn_id for q in health_checks(b)} == {1}
        # health_check.* are the main process's own counts (not summed over processes).
        seen = len(health_checks(a)) + len(health_checks(b))
        stats = read_stats(f"http://127.0.0.1:{admin}")
        seen_after = len(health_checks(a)) + len(health_checks(b))
        attempts = stats["cluster.backend.health_check.attempt"]
        assert seen <= attempts <= seen_after + 2, (seen, attempts, seen_after)
        assert stats["cluster.backend.health_check.success"] <= attempts
        assert stats["cluster.backend.health_check.healthy"] == 2
        assert stats["cluster.backend.membership_healthy"] == 2

        # b fails its check: no worker sends it anything from then on.
        b.raw_responses["/healthz"] = R503
        wait_flags(admin, {a.port: "healthy", b.port: "/failed_active_hc"}, p)
        # membership_healthy is the workers' maximum: 1 once every worker has b failed.
        wait_stat(admin, "cluster.backend.membership_healthy", 1, p)
        to_b, cx = proxied(b), per_worker_cx(admin, port)
        for _ in range(30):
            assert get_close(port) == 200
        assert proxied(b) == to_b
        cx2 = per_worker_cx(admin, port)
        assert all(n > m for n, m in zip(cx2, cx, strict=True)), (cx, cx2)  # both workers
        stats = read_stats(f"http://127.0.0.1:{admin}")
        assert stats["cluster.backend.health_check.healthy"] == 1
        assert stats["cluster.backend.membership_healthy"] == 1
        assert stats["cluster.backend.health_check.failure"] >= 1

        # A restarted worker starts with the current state (a healthy, b failed): were it
        # to start with every host failed, its panic mode would send requests to b.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_children(p.proc.pid, 1, exclude=workers)
        cx = per_worker_cx(admin, port)
        for _ in range(30):
            assert get_close(port) == 200
        assert proxied(b) == to_b
        cx2 = per_worker_cx(admin, port)
        assert all(n > m for n, m in zip(cx2, cx, strict=True)), (cx, cx2)

        # b recovers: traffic comes back to it.
        del b.raw_responses["/healthz"]
        wait_flags(admin, {a.port: "healthy", b.port: "healthy"}, p)
        time.sleep(0.1)
        for _ in range(20):
            assert get_close(port) == 200
        assert proxied(b) > to_b
    finally:
        p.kill()


def test_immediate_health_check_fail_in_one_worker_reaches_all(
    two_upstreams: tuple[HttpUpstream, HttpUpstream], tmp_path: Path
) -> None:
    """A response with x-envoy-immediate-health-check-fail seen by ONE worker fails the host
    in the main process's checker, and from there in every worker (Envoy's main thread does
    the same for all its workers)."""
    a, b = two_upstreams
    admin, port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    # Checks every 30 s: after the first round nothing but the immediate failure changes b.
    config.write_text(
        hc_config(admin, port, a.port, b.port)
        .replace("interval: 0.2s", "interval: 30s")
        .replace("no_traffic_interval: 0.2s", "no_traffic_interval: 30s")
    )
    b.raw_responses["/echo"] = (
        b"HTTP/1.1 200 OK\r\nx-envoy-immediate-health-check-fail: true\r\ncontent-length: 0\r\n\r\n"
    )
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    try:
        wait_live(admin, p)
        wait_flags(admin, {a.port: "healthy", b.port: "healthy"}, p)
        # Until one request reached b, whichever worker served it.
        for _ in range(20):
            assert get_close(port) == 200
            if proxied(b):
                break
        assert proxied(b) == 1
        wait_flags(
            admin,
            {a.port: "healthy", b.port: "/failed_active_hc/excluded_via_immediate_hc_fail"},
            p,
        )
        stats = read_stats(f"http://127.0.0.1:{admin}")
        assert stats["cluster.backend.health_check.failure"] == 1
        assert stats["cluster.backend.health_check.passive_failure"] == 1
        wait_stat(admin, "cluster.backend.membership_healthy", 1, p)
        cx = per_worker_cx(admin, port)
        for _ in range(30):
            assert get_close(port) == 200
        assert proxied(b) == 1  # no worker sends b anything
        cx2 = per_worker_cx(admin, port)
        assert all(n > m for n, m in zip(cx2, cx, strict=True)), (cx, cx2)  # both workers
    finally:
        p.kill()


def test_reload_changes_hosts_and_workers_follow_the_main_checker(
    two_upstreams: tuple[HttpUpstream, HttpUpstream], tmp_path: Path
) -> None:
    a, b = two_upstreams
    c = HttpUpstream()
    c.start()
    admin, port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(hc_config(admin, port, a.port, b.port))
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    try:
        wait_live(admin, p)
        wait_flags(admin, {a.port: "healthy", b.port: "healthy"}, p)
        # Reload: b goes, c (new) comes, failing its checks from the start.
        c.raw_responses["/healthz"] = R503
        config.write_text(hc_config(admin, port, a.port, c.port))
        os.kill(p.proc.pid, signal.SIGHUP)
        wait_flags(admin, {a.port: "healthy", c.port: "/failed_active_hc"}, p)
        # Both workers reloaded (cluster_modified counts once per process, as in Envoy):
        # until 20 new connections in a row send nothing to b, which only the old config has.
        wait_stat(admin, "cluster_manager.cluster_modified", 1, p)
        deadline = time.monotonic() + 10
        while True:
            before_b = proxied(b)
            for _ in range(20):
                assert get_close(port) == 200
            if proxied(b) == before_b:
                break
            assert time.monotonic() < deadline, f"a worker kept the old config:\n{p.output()}"
        for _ in range(20):
            assert get_close(port) == 200
        assert proxied(c) == 0  # new and failed in the main process: failed in every worker
        del c.raw_responses["/healthz"]
        wait_flags(admin, {a.port: "healthy", c.port: "healthy"}, p)
        time.sleep(0.1)
        to_b = proxied(b)
        for _ in range(30):
            assert get_close(port) == 200
        assert proxied(c) > 0 and proxied(b) == to_b
        assert len({q.conn_id for q in health_checks(c)}) == 1  # checked by one process
        # Workers that restart after the reload build the reloaded config (with c), not
        # the one the process started with.
        workers = wait_children(p.proc.pid, 2)
        for w in workers:
            os.kill(w, signal.SIGKILL)
        wait_children(p.proc.pid, 2, exclude=workers)
        to_c = proxied(c)
        for _ in range(30):
            assert get_close(port) == 200
        assert proxied(c) > to_c and proxied(b) == to_b
    finally:
        p.kill()
        c.stop()


# --- filesystem xDS with workers: the main process reads, the workers apply what it sends ---

XDS_CONFIG = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
node: {{id: n1, cluster: c1}}
dynamic_resources:
  cds_config: {{path_config_source: {{path: {cds}}}}}
  lds_config: {{path_config_source: {{path: {lds}}}}}
static_resources:
  listeners:
  - name: static
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          rds:
            route_config_name: local_route
            config_source: {{path_config_source: {{path: {rds}}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _route_response(version: str, name: str, body: str) -> str:
    return (
        f"version_info: {version}\n"
        "resources:\n"
        '- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n'
        f"  name: {name}\n"
        '  virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, '
        f"direct_response: {{status: 200, body: {{inline_string: {body}}}}}}}]}}]\n"
    )


def _replace(path: Path, text: str) -> None:
    """An atomic replace: write a temporary file, rename it over the watched one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def _bodies(port: int, n: int) -> list[str]:
    out = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            out.append(conn.getresponse().read().decode())
        finally:
            conn.close()
    return out


def _wait_bodies(port: int, body: str, timeout: float = 5.0) -> float:
    """Seconds until 20 requests on new connections all answer ``body``."""
    t0 = time.monotonic()
    while True:
        got = _bodies(port, 20)
        if set(got) == {body}:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"still {sorted(set(got))} after {timeout}s, wanted {body}")
        time.sleep(0.05)


def test_xds_files_read_by_main_process_and_pushed_to_workers(tmp_path: Path) -> None:
    admin, port, lds_port = free_port(), free_port(), free_port()
    rds, rds2 = tmp_path / "rds.yaml", tmp_path / "rds2.yaml"
    cds, lds = tmp_path / "cds.yaml", tmp_path / "lds.yaml"
    rds.write_text(_route_response("r1", "local_route", "one"))
    rds2.write_text(_route_response("s1", "lds_route", "lds-one"))
    cds.write_text(
        "version_info: c1\nresources:\n"
        '- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
        "  name: dyn\n  connect_timeout: 1s\n"
    )
    lds.write_text(
        "version_info: l1\nresources:\n"
        '- "@type": type.googleapis.com/envoy.config.listener.v3.Listener\n'
        "  name: from_lds\n"
        f"  address: {{socket_address: {{address: 127.0.0.1, port_value: {lds_port}}}}}\n"
        "  filter_chains:\n  - filters:\n"
        "    - name: envoy.filters.network.http_connection_manager\n"
        f'      typed_config: {{"@type": {_HCM}, stat_prefix: lds_ingress, '
        f"rds: {{route_config_name: lds_route, config_source: "
        f"{{path_config_source: {{path: {rds2}}}}}}}, "
        f'http_filters: [{{name: router, typed_config: {{"@type": {_ROUTER}}}}}]}}\n'
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(XDS_CONFIG.format(admin_port=admin, port=port, rds=rds, cds=cds, lds=lds))
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    stopped = False
    try:
        wait_stat(admin, "listener_manager.workers_started", 1, p)
        workers = wait_children(p.proc.pid, 2)
        assert set(_bodies(port, 20)) == {"one"}
        _wait_bodies(lds_port, "lds-one")
        stats = read_stats(f"http://127.0.0.1:{admin}")
        # Each update counts once (the workers' maximum), not once per worker.
        assert stats["cluster_manager.cds.update_success"] == 1
        assert stats["cluster_manager.cds.update_attempt"] == 1
        assert stats["listener_manager.lds.update_success"] == 1
        assert stats["http.ingress.rds.local_route.update_success"] == 1
        assert stats["http.lds_ingress.rds.lds_route.update_success"] == 1
        assert stats["cluster_manager.active_clusters"] == 1

        # With the main process stopped, a changed file reaches no worker: they do not
        # watch files themselves.
        os.kill(p.proc.pid, signal.SIGSTOP)
        stopped = True
        _replace(rds, _route_response("r2", "local_route", "two"))
        _replace(rds2, _route_response("s2", "lds_route", "lds-two"))
        time.sleep(1.2)  # well over the 250 ms poll interval
        assert set(_bodies(port, 20)) == {"one"}
        assert set(_bodies(lds_port, 10)) == {"lds-one"}
        os.kill(p.proc.pid, signal.SIGCONT)
        stopped = False
        assert _wait_bodies(port, "two") < 2.0
        _wait_bodies(lds_port, "lds-two")
        stats = read_stats(f"http://127.0.0.1:{admin}")
        assert stats["http.ingress.rds.local_route.update_success"] == 2
        assert stats["http.ingress.rds.local_route.update_attempt"] == 2
        assert stats["http.ingress.rds.local_route.config_reload"] == 2
        assert stats["http.lds_ingress.rds.lds_route.update_success"] == 2

        # A worker killed and restarted builds the current (updated) config.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_children(p.proc.pid, 2, exclude={victim})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            s = read_stats(f"http://127.0.0.1:{admin}")
            if s.get("listener_manager.workers_started") == 1 and len(children(p.proc.pid)) == 2:
                try:
                    if set(_bodies(port, 40)) == {"two"}:
                        break
                except OSError:
                    pass
            time.sleep(0.1)
        got = _bodies(port, 40)  # spread over both workers by SO_REUSEPORT
        assert set(got) == {"two"}, got
        _wait_bodies(lds_port, "lds-two")
        stats = read_stats(f"http://127.0.0.1:{admin}")
        assert stats["http.ingress.rds.local_route.update_success"] == 2
        assert stats["cluster_manager.cds.update_success"] == 1
    finally:
        if stopped:
            os.kill(p.proc.pid, signal.SIGCONT)
        p.kill()


DNS_CONFIG = CONFIG.replace(
    "    connect_timeout: 1s\n",
    "    connect_timeout: 1s\n    type: STRICT_DNS\n    dns_refresh_rate: 0.1s\n"
    "    dns_lookup_family: V4_ONLY\n",
).replace(
    "address: 127.0.0.1, port_value: {upstream_port}",
    "address: localhost, port_value: {upstream_port}",
)


def test_dns_resolved_once_in_the_main_process(upstream: HttpUpstream, tmp_path: Path) -> None:
    admin, port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(
        DNS_CONFIG.format(admin_port=admin, listener_port=port, upstream_port=upstream.port)
    )
    p = PyEnvoy(config, "--concurrency", "2", "--base-id", str(next(_base_ids)))
    stopped = False
    try:
        wait_stat(admin, "listener_manager.workers_started", 1, p)
        n = 30
        for _ in range(n):
            assert get_close(port) == 200
        assert upstream.request_count == n
        assert min(per_worker_cx(admin, port)) > 0  # both workers use the pushed host
        stats = read_stats(f"http://127.0.0.1:{admin}")
        assert stats["cluster.backend.membership_total"] == 1
        assert stats["cluster.backend.update_success"] >= 1
        # With the main process stopped nobody resolves: the workers run no DNS timers of
        # their own (before, each worker kept resolving every 100 ms).
        before = stats["cluster.backend.update_attempt"]
        os.kill(p.proc.pid, signal.SIGSTOP)
        stopped = True
        time.sleep(1.5)
        assert get_close(port) == 200  # the workers still serve the last answer
        os.kill(p.proc.pid, signal.SIGCONT)
        stopped = False
        after = read_stats(f"http://127.0.0.1:{admin}")["cluster.backend.update_attempt"]
        assert before <= after <= before + 4, (before, after)
    finally:
        if stopped:
            os.kill(p.proc.pid, signal.SIGCONT)
        p.kill()
