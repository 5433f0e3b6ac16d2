"""Active health checking (TCP and HTTP) for a cluster's hosts.

Strategy: one asyncio task per host runs the check loop: probe, wait ``interval``
(plus jitter), repeat. A host is marked ``/failed_active_hc`` after
``unhealthy_threshold`` consecutive failures and cleared after ``healthy_threshold``
successes; each change asks the cluster to rebuild its healthy set. Hosts start healthy
here until the first failures are counted (Envoy starts them as pending); the full set of
checkers and Envoy's initial-state semantics come with the traffic-management work.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import StatsStruct
from pyenvoy.upstream.host import FAILED_ACTIVE_HC

if TYPE_CHECKING:
    from pyenvoy.upstream.cluster_manager import Cluster
    from pyenvoy.upstream.host import Host

log = logging.getLogger("pyenvoy.hc")


class HealthCheckStats(StatsStruct):
    """``cluster.<name>.health_check.*``."""

    COUNTERS = ("attempt", "failure", "network_failure", "passive_failure", "success", "verify_cluster")
    GAUGES = ("degraded", "healthy")


def _secs(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)


class HealthChecker:
    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        self.cluster = cluster
        which = proto.WhichOneof("health_checker")
        if which not in ("tcp_health_check", "http_health_check"):
            raise ConfigError(f"{which} is not supported by pyenvoy yet", f"{path}.{which}")
        self.kind = which
        self.proto = proto
        self.timeout = _secs(proto.timeout)
        self.interval = _secs(proto.interval)
        self.jitter = _secs(proto.interval_jitter) if proto.HasField("interval_jitter") else 0.0
        self.unhealthy_threshold = proto.unhealthy_threshold.value or 1
        self.healthy_threshold = proto.healthy_threshold.value or 1
        self.stats = HealthCheckStats(cluster.info.stats.scope.scope("health_check"))
        if which == "tcp_health_check":
            tcp = proto.tcp_health_check
            self.send = bytes.fromhex(tcp.send.text) if tcp.HasField("send") and tcp.send.text else b""
            self.receive = [bytes.fromhex(r.text) for r in tcp.receive if r.text]
        else:
            http = proto.http_health_check
            if not http.path:
                raise ConfigError("http_health_check.path is required", f"{path}.http_health_check.path")
            self.path = http.path.encode()
            self.host_header = http.host.encode() if http.host else cluster.info.name.encode()
            self.expected: list[tuple[int, int]] = [(r.start, r.end) for r in http.expected_statuses] or [(200, 201)]
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.counts: dict[int, list[int]] = {}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for h in self.cluster.hosts:
            if id(h) not in self.tasks:
                self.tasks[id(h)] = loop.create_task(self._run(h))

    def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        self.tasks.clear()

    async def _run(self, host: Host) -> None:
        fails = oks = 0
        while True:
            self.stats.attempt.inc()
            ok, network = await self._probe(host)
            if ok:
                self.stats.success.inc()
                oks += 1
                fails = 0
                if host.health_flags & FAILED_ACTIVE_HC and oks >= self.healthy_threshold:
                    host.health_flags &= ~FAILED_ACTIVE_HC
                    log.info("health check: %s:%d is healthy", *host.address)
                    self._changed()
            else:
                self.stats.failure.inc()
                if network:
                    self.stats.network_failure.inc()
                fails += 1
                oks = 0
                if not host.health_flags & FAILED_ACTIVE_HC and fails >= self.unhealthy_threshold:
                    host.health_flags |= FAILED_ACTIVE_HC
                    log.info("health check: %s:%d is unhealthy", *host.address)
                    self._changed()
            delay = self.interval + (random.uniform(0, self.jitter) if self.jitter else 0.0)
            await asyncio.sleep(delay)

    def _changed(self) -> None:
        self.cluster.refresh_health()
        self.stats.healthy.set(len([h for h in self.cluster.hosts if not h.health_flags]))

    async def _probe(self, host: Host) -> tuple[bool, bool]:
        """(healthy, network_failure)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*host.address), self.timeout)
        except (OSError, TimeoutError):
            return False, True
        try:
            if self.kind == "tcp_health_check":
                if self.send:
                    writer.write(self.send)
                if self.receive:
                    want = b"".join(self.receive)
                    got = await asyncio.wait_for(reader.readexactly(len(want)), self.timeout)
                    return got == want, False
                return True, False
            req = b"GET " + self.path + b" HTTP/1.1\r\nhost: " + self.host_header + b"\r\nuser-agent: Envoy/HC\r\nconnection: close\r\n\r\n"
            writer.write(req)
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                return False, False
            status = int(parts[1])
            return any(lo <= status < hi for lo, hi in self.expected), False
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False, True
        finally:
            writer.close()


class _Multi:
    def __init__(self, checkers: list[HealthChecker]) -> None:
        self.checkers = checkers

    def on_hosts_changed(self) -> None:
        for c in self.checkers:
            if c.tasks:
                c.start()

    def start(self) -> None:
        for c in self.checkers:
            c.start()

    def stop(self) -> None:
        for c in self.checkers:
            c.stop()


def make_health_checker(cluster: Cluster, protos: Any, path: str) -> _Multi:
    return _Multi([HealthChecker(cluster, p, f"{path}[{i}]") for i, p in enumerate(protos)])
