"""Worker processes: ``--concurrency N`` runs N copies of the data plane, one uvloop each.

Strategy: the main process binds every listener's socket(s) *before* any worker exists and
keeps them open for its whole life; it runs the admin endpoint (``Server.start(listen=False)``)
and starts workers as fresh interpreters (``python -m pyenvoy.workers <fd>``, never fork() from
a running event loop). Each worker gets, over its own socketpair, the serialized bootstrap, the
options and its listening sockets (SCM_RIGHTS), builds its own ``Server`` and serves with
``Server.start(inherited_sockets=..., admin=False)``.

Sockets, as Envoy's ``enable_reuse_port`` (default true on Linux): one SO_REUSEPORT socket
per listener per worker, all bound by the main process, so the kernel spreads new connections
evenly by 4-tuple hash; with ``enable_reuse_port: false`` all workers accept from one shared
socket. Measured here (2 uvloop workers, wrk -c32 keep-alive): reuse_port splits connections
153/170 and requests 51/49 %; a shared socket 237/86 and 31/69 %, because every worker is
woken for each new connection and the first one awake accepts the whole burst. Because the
main process holds the sockets, a restarted worker resumes the same accept queue (nothing is
refused while it starts) and a hot restart hands over exactly these sockets.

Stats: ``WorkerPool.refresh_stats`` is a ``Server.stats_refreshers`` entry: before admin
renders ``/stats`` it asks every worker for a snapshot (counters and gauges that are used
or non-zero, histogram buckets) over the control socket and writes the SUM into the main
store; gauges that are the same configuration state in every worker (cluster membership,
listener counts) take the maximum instead. Counters of a worker that
died are kept (``retired``) so totals never go backwards. ``listener.<addr>.worker_<i>.*``
come from worker i. ``server.*`` is the main process's own, except ``total_connections``
and the memory gauges, which add up all processes.

Circuit breakers count for the whole process, as Envoy's ResourceManager is shared by its
worker threads: the pool creates one shared-memory table (pyenvoy.upstream.shared_counts)
whose fd goes to every worker in the ``init`` frame after the listening sockets; a worker
zeroes its own counters in it and installs it before it builds any cluster, so its
ResourceManagers check the sum over all workers. The main process computes the
``circuit_breakers.*`` gauges from the table at ``/stats`` time (``publish_shared_gauges``,
with its own clusters' limits); a cluster that found no room in the table keeps per-worker
limits and the workers' maximum, as before. The table is created once per pyenvoy process
(a hot-restarted one has its own); a dead worker's counters are zeroed when its exit is
seen, before it is restarted.

A worker that exits unexpectedly is restarted (same index, same sockets); more than
``MAX_RESTARTS`` deaths within ``RESTART_WINDOW_S`` stop the whole process with status 1.

Active health checking lives in the main process only, as in Envoy: its ClusterManager runs
the checkers (admin ``/clusters`` shows their flags, ``cluster.<c>.health_check.*`` are its
own, never summed over workers) and a ``HealthPublisher`` sends every change of a cluster's
active health flags over the control sockets (op ``host_health``, see
``pyenvoy.upstream.health_check.encode_health``); a worker's ClusterManager never starts
checkers and applies what arrives (``RemoteHealth``). A worker gets the whole state in its
``init`` frame and again once ready; until the main process's first round for a cluster is
done the worker's init holds as Envoy's does. What a worker learns itself, a proxied response
with ``x-envoy-immediate-health-check-fail``, goes the other way (op
``host_immediate_hc_fail``): the main process fails that host's session and the result
reaches every worker like any other check result. The main loop reads worker frames from
ready on; replies to its own requests (stats) carry a ``seq``. Config reloads still run in every worker
(each owns its ClusterManager); hosts are matched by address.

Outlier detection (passive health) is one detector per cluster too, the main process's, as
Envoy's workers post to their main thread: a worker's detectors (``use_remote_outlier``)
decide nothing and buffer every result (cluster, host address, kind, code or reason); the
buffer goes out once per loop iteration as one frame (op ``outlier_events``, see
``pyenvoy.upstream.outlier_detection.RemoteOutlier.flush``) and the main process feeds each
result, in order for each host, to its own detector (``apply_outlier_events``), which ejects,
runs the interval sweep and un-ejects. Each cluster's ejected hosts go to every worker in the
``host_health`` messages (key ``outlier``; in the ``init`` frame and the snapshot once ready
too), which set or clear ``/failed_outlier_check`` there. ``cluster.<c>.outlier_detection.*``
are therefore the main process's alone, as ``.health_check.*`` are (``_main_only``); passing
active checks need not go to the workers for un-ejection (``send_passed=False``).

DNS (STRICT_DNS / LOGICAL_DNS clusters) is resolved in the main process only, as Envoy
resolves on its main thread: a ``DnsPublisher`` sends the whole DNS state whenever a
cluster's answer changes or clusters come or go (op ``dns_hosts``, see
``pyenvoy.upstream.cluster_manager.encode_dns``); a worker's ClusterManager
(``use_remote_dns``) starts no lookups or refresh timers and applies the answers
(``RemoteDns``) through the same ``Cluster.apply_resolution`` as a local lookup; its DNS
cluster warms once the first answer for it arrived. The ``init`` frame carries the current
state (so a starting worker does not wait), and the worker gets it again once ready. DNS
stats (``cluster.<c>.update_attempt|success|failure``) are therefore the main process's
alone (workers never count them for DNS clusters).

Filesystem xDS (LDS/CDS/EDS/RDS files) is watched and read in the main process only: its
XdsManager records the bytes of every read and a ``FilePublisher`` sends each new read
(after a change of the file, or new content) to every worker (op ``xds_file``, see
``pyenvoy.config.xds.encode_file``); a worker's XdsManager watches no file and runs the
pushed bytes through the same parse/validate/apply steps as a local read. A worker's
``init`` frame carries the current content of every file (so it builds the same config),
and once ready it gets what was read meanwhile. The main process does not take LDS
listeners (they are the workers'); it reads the LDS file and mirrors the RDS files its
listeners name, so the workers get those too. Config-update stats
(``*.update_attempt|success|rejected|failure|empty``, ``config_reload``, ``update_time``
...) count each update once, as Envoy's single subscription does: every worker applies
the same update, so ``/stats`` shows their maximum, not their sum.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.xds import XDS_FILE_OP, FilePublisher, decode_file
from pyenvoy.hot_restart import (
    FrameDecoder,
    drain_listeners,
    encode_frame,
    recv_frame,
    send_frame,
)
from pyenvoy.stats import Histogram
from pyenvoy.upstream import shared_counts
from pyenvoy.upstream.circuit_breaker import (
    ResourceManagers,
    publish_shared_gauges,
    resource_managers,
)
from pyenvoy.upstream.cluster_manager import DNS_HOSTS_OP, DnsPublisher, RemoteDns
from pyenvoy.upstream.health_check import (
    HOST_HEALTH_OP,
    IMMEDIATE_HC_FAIL_OP,
    HealthPublisher,
    RemoteHealth,
    apply_immediate_fail,
)
from pyenvoy.upstream.outlier_detection import (
    OUTLIER_EVENTS_OP,
    RemoteOutlier,
    apply_outlier_events,
)

if TYPE_CHECKING:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy.hot_restart import ParentStats
    from pyenvoy.options import ServerOptions
    from pyenvoy.server import Server
    from pyenvoy.upstream.shared_counts import SharedCounts, SharedEntry

__all__ = ["WorkerPool", "bind_listen_sockets", "worker_main", "reuse_port", "SocketMap"]

log = logging.getLogger("pyenvoy.main")

SocketMap = dict[tuple[str, int], list[socket.socket]]

START_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 2.0
STATS_PERIOD_S = 5.0
MONITOR_PERIOD_S = 0.2
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0

# Gauges that hold the same configuration state in every worker: max, not sum.
_SAME_IN_EVERY_WORKER = frozenset(
    (
        "membership_healthy",
        "membership_degraded",
        "membership_excluded",
        "membership_total",
        "max_host_weight",
        "total_listeners_active",
        "total_listeners_draining",
        "total_listeners_warming",
        "total_filter_chains_draining",
        "active_clusters",
        "warming_clusters",
        "lb_subsets_active",
        "workers_started",
        "version",
    )
)
# server.* gauges that add up over processes; the rest of server.* is the main's own.
_SUMMED_SERVER_GAUGES = (
    "server.total_connections",
    "server.memory_allocated",
    "server.memory_heap_size",
    "server.memory_physical_size",
)


def _max_gauge(name: str) -> bool:
    # circuit_breakers.*: overwritten from the shared table (_publish_circuit_breakers);
    # the maximum stays for a cluster the full table left counting per worker.
    return name.rpartition(".")[2] in _SAME_IN_EVERY_WORKER or ".circuit_breakers." in name


# Config-update stats of xDS subscriptions (lds/cds/rds/eds): every worker applies the same
# pushed update, so the process counts it once (the maximum over workers), as Envoy does.
_CONFIG_UPDATE_STATS = frozenset(
    (
        "update_attempt",
        "update_failure",
        "update_rejected",
        "update_success",
        "update_empty",
        "update_no_rebuild",
        "update_time",
        "init_fetch_timeout",
        "config_reload",
        "config_reload_time_ms",
        "update_duration",
    )
)
# Config events every worker goes through once per process event (Envoy counts them on its
# main thread); listener_create_success/failure are per worker in Envoy too, and summed.
_ONCE_PER_PROCESS = frozenset(
    [
        f"listener_manager.listener_{n}"
        for n in ("added", "modified", "removed", "in_place_updated", "stopped")
    ]
    + [
        f"cluster_manager.{n}"
        for n in (
            "cluster_added",
            "cluster_modified",
            "cluster_removed",
            "cluster_updated",
            "cluster_updated_via_merge",
            "update_merge_cancelled",
            "update_out_of_merge_window",
        )
    ]
)


def _once_per_update(name: str) -> bool:
    """Counted (or recorded) once per config event by every worker: the process's value is
    the maximum over workers, not their sum."""
    last = name.rpartition(".")[2]
    if last not in _CONFIG_UPDATE_STATS:
        if last == "membership_change":
            return name.startswith("cluster.")
        return name in _ONCE_PER_PROCESS
    return (
        name.startswith(("listener_manager.lds.", "cluster_manager.cds.", "cluster."))
        or ".rds." in name
    )


def _main_only(name: str) -> bool:
    """Stats only the main process keeps (its health checkers' and outlier detectors'):
    never taken from workers."""
    return ".health_check." in name or ".outlier_detection." in name


# --------------------------------------------------------------------------- sockets


def reuse_port(listener: Any) -> bool:
    """Envoy's ``enable_reuse_port``: default true on Linux."""
    proto = listener.proto
    if proto.HasField("enable_reuse_port"):
        return bool(proto.enable_reuse_port.value)
    return sys.platform.startswith("linux")


def _bind_reuse_port(listener: Any, port: int) -> socket.socket:
    host = listener.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if listener.ipv4_compat else 1
            )
        sock.bind((host, port))
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_listen_sockets(
    listeners: list[Any],
    workers: int,
    inherited: dict[tuple[str, int, int], socket.socket] | None = None,
) -> SocketMap:
    """Every listener's sockets, index = worker: inherited ones first (hot restart), then
    newly bound. One socket when ``enable_reuse_port`` is false (workers share it), else one
    SO_REUSEPORT socket per worker; if an extra one cannot be bound (the inherited socket
    lacks SO_REUSEPORT) the remaining workers share socket 0. Raises ConfigError."""
    inherited = inherited or {}
    out: SocketMap = {}
    try:
        for listener in listeners:
            host, port = listener.host, listener.port
            reuse = reuse_port(listener)
            socks: list[socket.socket] = []
            for i in range(workers if reuse else 1):
                sock = inherited.pop((host, port, i), None)
                if sock is None:
                    try:
                        if i == 0:
                            sock = (
                                _bind_reuse_port(listener, port)
                                if reuse
                                else listener.make_socket()
                            )
                        else:
                            sock = _bind_reuse_port(listener, socks[0].getsockname()[1])
                    except OSError as e:
                        if i == 0:
                            raise ConfigError(
                                f"cannot bind '{host}:{port}': {e.strerror or e}",
                                f"{listener.path}.address",
                            ) from None
                        log.info(
                            "listener '%s': workers %d..%d share one socket (%s)",
                            listener.name,
                            i,
                            workers - 1,
                            e.strerror or e,
                        )
                        break
                socks.append(sock)
            out[(host, port)] = socks
            # Admin /listeners in the main process shows the bound address.
            name = socks[0].getsockname()
            listener.local_address = (name[0], name[1])
    except BaseException:
        for socks in out.values():
            for s in socks:
                s.close()
        raise
    finally:
        for s in inherited.values():  # offered by the parent but not configured here
            s.close()
    return out


# --------------------------------------------------------------------------- main side


class _MergedHistogram(Histogram):
    """A histogram in the main process whose totals are the workers' sums."""

    __slots__ = ()

    def set_totals(self, counts: list[int], hsum: float, count: int) -> None:
        if len(counts) != len(self.bounds) + 1:
            return
        self.reset()
        self._counts = list(counts)
        self._sum = hsum
        self._count = count
        self._used = True


class _Worker:
    __slots__ = (
        "index",
        "proc",
        "ctl",
        "decoder",
        "seq",
        "snapshot",
        "ready",
        "started",
        "xds_generation",
        "on_message",
        "reading",
    )

    def __init__(self, index: int, proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.ctl: socket.socket | None = ctl
        self.decoder = FrameDecoder()
        self.seq = 0
        self.snapshot: dict[str, Any] = {}
        self.ready = False
        self.started = time.monotonic()
        self.xds_generation: dict[str, int] = {}
        # Frames the worker sends on its own (not replies), and whether the main loop reads
        # them (from ready on).
        self.on_message: Callable[[_Worker, dict[str, Any]], None] | None = None
        self.reading = False

    def send(self, msg: dict[str, Any]) -> bool:
        if self.ctl is None:
            return False
        try:
            self.ctl.sendall(encode_frame(msg))
            return True
        except OSError:
            self.close()
            return False

    def read_reply(self, seq: int, deadline: float) -> dict[str, Any] | None:
        """Frames until the reply to ``seq`` (late replies to older requests are dropped)."""
        while self.ctl is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self.ctl], [], [], remaining)
            if not readable:
                return None
            try:
                data = self.ctl.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.close()
                return None
            for frame in self.decoder.feed(data):
                if frame.get("seq") == seq:
                    return frame
                self.dispatch(frame)
        return None

    def dispatch(self, frame: dict[str, Any]) -> None:
        """A frame that is no awaited reply: the worker's own report, or a late reply to an
        older request (dropped)."""
        if "seq" not in frame and self.on_message is not None:
            self.on_message(self, frame)

    def on_readable(self) -> None:
        ctl = self.ctl
        if ctl is None:
            return
        try:
            data = ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; the pool's watch notices its exit
            self.close()
            return
        for frame in self.decoder.feed(data):
            self.dispatch(frame)

    def close(self) -> None:
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            if self.reading:
                self.reading = False
                try:
                    asyncio.get_running_loop().remove_reader(ctl.fileno())
                except (RuntimeError, ValueError, OSError):
                    pass
            ctl.close()


class WorkerPool:
    """The main process's view of its workers."""

    def __init__(
        self,
        server: Server,
        bootstrap: Bootstrap,
        options: ServerOptions,
        sockets: SocketMap,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.options = options
        self.count = max(1, int(options.concurrency))
        self.sockets = sockets
        self.on_fatal = on_fatal
        self._bootstrap = bootstrap
        self._bootstrap_b64 = base64.b64encode(bootstrap.SerializeToString()).decode()
        self.workers: list[_Worker | None] = [None] * self.count
        self.stopping = False
        self.draining = False
        self.failed = False
        self.parent_stats: ParentStats | None = None
        self.retired_counters: dict[str, int] = {}
        self.retired_histograms: dict[str, list[Any]] = {}
        self._restarts: list[float] = []
        self._monitor: asyncio.Task[None] | None = None
        self._gauges_set: set[str] = set()
        self._counters_set: dict[str, int] = {}
        self._server_sums: dict[str, int] = {}
        self._last_refresh = 0.0
        self._sent_state: dict[str, Any] = {}
        self.health: HealthPublisher | None = None
        self.dns: DnsPublisher | None = None
        if server.cluster_manager is not None:
            # (the workers' outlier detectors post to ours: no passed checks to send)
            self.health = HealthPublisher(
                server.cluster_manager, self._send_ready, send_passed=False
            )
            self.dns = DnsPublisher(server.cluster_manager, self._send_ready)
        self.xds_files: FilePublisher | None = None
        if server.xds.record:
            self.xds_files = FilePublisher(server.xds, self._send_ready)
        # Circuit-breaker counts of the whole process (pyenvoy.upstream.shared_counts).
        self.shared_counts: SharedCounts | None = None
        self._cb_entries: dict[bytes, SharedEntry] = {}
        try:
            self.shared_counts = shared_counts.SharedCounts.create(self.count)
        except OSError as e:
            log.warning("circuit breakers: no shared table (%s); each worker counts alone", e)

    def _watch_lds_files(self) -> None:
        """The workers run the LDS listeners; this process reads the LDS file for them and
        mirrors the RDS files those listeners name (without applying either)."""
        lm = self.server.listener_manager
        lds = getattr(lm, "lds", None)
        if lds is None or self.xds_files is None or lds in self.server.xds.subscriptions:
            return
        xds = self.server.xds

        def route_files(resources: list[Any], version_info: str) -> None:
            xds.mirror(_rds_files(resources))

        lds.callback = route_files
        lds.start()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every worker and wait until each serves; ConfigError if one cannot."""
        self._watch_lds_files()
        for i in range(self.count):
            self.workers[i] = self._spawn(i)
        results = await asyncio.gather(
            *(self._wait_ready(w, timeout) for w in self.workers if w is not None),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop(0)
            err = errors[0]
            raise err if isinstance(err, ConfigError) else ConfigError(f"worker failed: {err}", "")
        self.server.listener_manager.stats.workers_started.set(1)  # type: ignore[union-attr]
        log.info("%d workers started", self.count)
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyenvoy.workers", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        keys = list(self.sockets)
        fds = [
            (socks[index] if index < len(socks) else socks[0]).fileno()
            for socks in self.sockets.values()
        ]
        if self.shared_counts is not None:  # after the sockets
            fds.append(self.shared_counts.fileno())
        ours.settimeout(STATS_TIMEOUT_S * 5)
        xds_files: list[dict[str, Any]] = []
        generation: dict[str, int] = {}
        if self.xds_files is not None:
            xds_files, generation = self.xds_files.snapshot()
        try:
            send_frame(
                ours,
                {
                    "op": "init",
                    "index": index,
                    "options": self.options.to_dict(),
                    "bootstrap": self._current_bootstrap(),
                    "sockets": [list(k) for k in keys],
                    "host_health": self.health.snapshot() if self.health is not None else None,
                    "dns_hosts": self.dns.snapshot() if self.dns is not None else None,
                    "xds_files": xds_files,
                    "shared_counts": self.shared_counts is not None,
                },
                fds,
            )
        except OSError as e:
            log.error("worker %d: cannot send its configuration: %s", index, e)
        log.debug("worker %d started (pid %d)", index, proc.pid)
        w = _Worker(index, proc, ours)
        w.xds_generation = generation
        return w

    def _current_bootstrap(self) -> str:
        """What a (re)started worker builds: the main process's current config (a reload
        replaces ``server.bootstrap``), so its clusters and hosts match the main process's."""
        current = getattr(self.server, "bootstrap", None)
        if current is not None and current is not self._bootstrap:
            self._bootstrap = current
            self._bootstrap_b64 = base64.b64encode(current.SerializeToString()).decode()
        return self._bootstrap_b64

    async def _wait_ready(self, w: _Worker, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        assert w.ctl is not None
        w.ctl.settimeout(timeout)
        try:
            msg, _ = await loop.run_in_executor(None, recv_frame, w.ctl)
        except (OSError, EOFError) as e:
            w.close()
            raise ConfigError(
                f"worker {w.index} (pid {w.proc.pid}) did not start: "
                f"{'timed out' if isinstance(e, TimeoutError) else 'it exited'}",
                "",
            ) from None
        if msg.get("op") != "ready":
            w.close()
            raise ConfigError(str(msg.get("error", f"worker {w.index} failed")), "")
        if w.ctl is not None:
            w.ctl.setblocking(False)
            w.on_message = self._on_worker_message
            loop.add_reader(w.ctl.fileno(), w.on_readable)
            w.reading = True
        w.ready = True
        if self.health is not None:  # what changed while it started
            w.send(self.health.snapshot())
        if self.dns is not None:
            w.send(self.dns.snapshot())
        if self.xds_files is not None:  # files read while it started
            for msg in self.xds_files.since(w.xds_generation):
                w.send(msg)
        if self._sent_state:
            self.sync_admin_state(force_worker=w)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(MONITOR_PERIOD_S)
            for i, w in enumerate(self.workers):
                if w is None or w.proc.poll() is None or self.stopping:
                    continue
                self._retire(w)
                self.workers[i] = None
                if self.shared_counts is not None:  # its requests and connections are gone
                    self.shared_counts.zero_worker(i)
                if self.draining:
                    continue
                # A SIGTERM to the whole process group reaches the workers and us at once:
                # give our own handler a moment before treating this as a crash.
                await asyncio.sleep(0.3)
                if self.stopping:
                    return
                log.error(
                    "worker %d (pid %d) exited with status %s; restarting it",
                    i,
                    w.proc.pid,
                    w.proc.returncode,
                )
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
                self._restarts.append(now)
                if len(self._restarts) > MAX_RESTARTS:
                    log.critical(
                        "workers died %d times within %ds; shutting down",
                        len(self._restarts),
                        int(RESTART_WINDOW_S),
                    )
                    self.failed = True
                    if self.on_fatal is not None:
                        self.on_fatal()
                    return
                nw = self._spawn(i)
                self.workers[i] = nw
                loop.create_task(self._ready_or_log(nw))
            self.sync_admin_state()
            if time.monotonic() - self._last_refresh > STATS_PERIOD_S:
                self.refresh_stats()

    def _on_worker_message(self, w: _Worker, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == OUTLIER_EVENTS_OP:
            cm = self.server.cluster_manager
            if cm is not None:
                apply_outlier_events(cm, msg)
        elif op == IMMEDIATE_HC_FAIL_OP:
            cm = self.server.cluster_manager
            if cm is None or not apply_immediate_fail(cm, msg):
                log.debug("worker %d: immediate health check failure for a gone host", w.index)
        else:
            log.debug("worker %d: unexpected control frame %r", w.index, msg.get("op"))

    async def _ready_or_log(self, w: _Worker) -> None:
        try:
            await self._wait_ready(w, START_TIMEOUT_S)
        except ConfigError as e:
            log.error("%s", e)

    def _retire(self, w: _Worker) -> None:
        """Keep a dead worker's counters and histograms in the totals."""
        snap = w.snapshot
        for name, v in snap.get("c", {}).items():
            if _once_per_update(name):  # the other workers counted the same updates
                self.retired_counters[name] = max(self.retired_counters.get(name, 0), v)
                continue
            self.retired_counters[name] = self.retired_counters.get(name, 0) + v
        for name, (counts, hsum, count) in snap.get("h", {}).items():
            prev = self.retired_histograms.get(name)
            if prev is None or (_once_per_update(name) and count > prev[2]):
                self.retired_histograms[name] = [list(counts), hsum, count]
            elif _once_per_update(name):
                continue
            else:
                prev[0] = [a + b for a, b in zip(prev[0], counts, strict=False)]
                prev[1] += hsum
                prev[2] += count
        w.snapshot = {}
        w.close()

    def admin_state(self) -> dict[str, Any]:
        """Admin-made changes the workers must follow: /healthcheck/fail|ok, /logging."""
        from pyenvoy import log as envoy_log

        return {
            "healthcheck_failed": bool(getattr(self.server, "healthcheck_failed", False)),
            "log_levels": envoy_log.get_levels(),
        }

    def sync_admin_state(self, force_worker: _Worker | None = None) -> None:
        state = self.admin_state()
        if state == self._sent_state and force_worker is None:
            return
        msg = {"op": "admin_state", **state}
        for w in [force_worker] if state == self._sent_state else self.workers:
            if w is not None and w.ready:
                w.send(msg)
        self._sent_state = state

    def forward(self, op: str, **args: Any) -> None:
        """Send an admin operation (``drain_listeners``, ``reset_counters``) to every worker."""
        self._send_ready({"op": op, **args})

    def _send_ready(self, msg: dict[str, Any]) -> None:
        for w in self.workers:
            if w is not None and w.ready:
                w.send(msg)

    def drain(self, drain_time: float, strategy: str) -> None:
        """Hot restart parent: every worker stops accepting and drains; none is restarted."""
        self.draining = True
        for w in self.workers:
            if w is not None:
                w.send({"op": "drain", "drain_time": drain_time, "strategy": strategy})

    async def stop(self, drain_time: float | None = None) -> None:
        """Stop every worker gracefully (each drains up to ``drain_time``), then reap."""
        self.stopping = True
        if self._monitor is not None and self._monitor is not asyncio.current_task():
            self._monitor.cancel()
        if self.health is not None:
            self.health.close()
        if self.dns is not None:
            self.dns.close()
        if self.xds_files is not None:
            self.xds_files.close()
        for w in self.workers:
            if w is not None:
                w.send({"op": "stop", "drain_time": drain_time})
        if drain_time is None:  # the workers' own default: Server.stop's --drain-time-s
            drain_time = float(self.options.drain_time_s)
        deadline = time.monotonic() + drain_time + 5.0
        procs = [w.proc for w in self.workers if w is not None]
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                log.warning("worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()
        for w in self.workers:
            if w is not None:
                w.close()
        self.close_sockets()
        if self.shared_counts is not None:
            self._cb_entries.clear()
            self.shared_counts.close()
            self.shared_counts = None

    def close_sockets(self, keep: set[int] | None = None) -> None:
        """Close our copies of the listening sockets (except those in ``keep``, by fd)."""
        for socks in self.sockets.values():
            for s in socks:
                if keep is None or s.fileno() not in keep:
                    s.close()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w is not None]

    def signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w is not None and w.proc.poll() is None:
                try:
                    os.kill(w.proc.pid, sig)
                except ProcessLookupError:
                    pass

    # -- stats ---------------------------------------------------------------------------------
    def refresh_stats(self) -> None:
        """Pull every worker's stats and write their sum into the main store (synchronous:
        the admin handler calls it before rendering; replies take a few ms)."""
        self._last_refresh = time.monotonic()
        self._forward_counter_reset()
        asked: list[tuple[_Worker, int]] = []
        for w in self.workers:
            if w is None or not w.ready:
                continue
            w.seq += 1
            if w.send({"op": "stats", "seq": w.seq}):
                asked.append((w, w.seq))
        deadline = time.monotonic() + STATS_TIMEOUT_S
        for w, seq in asked:
            reply = w.read_reply(seq, deadline)
            if reply is not None:
                w.snapshot = reply
        self._aggregate()
        self._publish_circuit_breakers()

    def _publish_circuit_breakers(self) -> None:
        """``circuit_breakers.*`` gauges from the shared table: exact process-wide counts
        (a cluster without an entry, the table being full, keeps the workers' maximum)."""
        table = self.shared_counts
        cm = self.server.cluster_manager
        if table is None or cm is None:
            return
        from pyenvoy.runtime import for_server

        runtime = for_server(self.server)
        entries = self._cb_entries
        for cluster in cm.clusters.values():
            info = cluster.info
            key = shared_counts.key_for(info.proto_hash)
            entry = entries.get(key)
            if entry is None:
                entry = table.find(key)
                if entry is None:
                    continue
                entries[key] = entry
            rms: ResourceManagers = resource_managers(info, runtime)
            publish_shared_gauges(rms, entry, self._workers_min_gauge)

    def _workers_min_gauge(self, name: str) -> int | None:
        """The lowest value of gauge ``name`` over the workers' last snapshots (a gauge a
        worker left out is 0 there); None without any snapshot."""
        values = [
            w.snapshot.get("g", {}).get(name, 0)
            for w in self.workers
            if w is not None and w.snapshot
        ]
        return min(values) if values else None

    def _forward_counter_reset(self) -> None:
        """Admin /reset_counters zeroed the main store: zero the workers' counters too."""
        counters = self.server.stats.counters
        for name, v in self._counters_set.items():
            c = counters.get(name)
            if c is not None and v and c.value == 0:
                break
        else:
            return
        self.forward("reset_counters")
        self.retired_counters.clear()
        for w in self.workers:
            if w is not None:
                w.snapshot = {}
        if self.parent_stats is not None:
            self.parent_stats.counters.clear()
        self._counters_set = {}

    def _aggregate(self) -> None:
        store = self.server.stats
        snaps = [w.snapshot for w in self.workers if w is not None and w.snapshot]
        counters = dict(self.retired_counters)
        gauges: dict[str, int] = {}
        histograms: dict[str, list[Any]] = {
            k: [list(v[0]), v[1], v[2]] for k, v in self.retired_histograms.items()
        }
        server_sums: dict[str, int] = {}
        used: set[str] = set()
        for snap in snaps:
            for name, v in snap.get("c", {}).items():
                if name in counters and _once_per_update(name):
                    counters[name] = max(counters[name], v)
                    continue
                counters[name] = counters.get(name, 0) + v
            for name, v in snap.get("g", {}).items():
                if name.startswith("server."):
                    if name in _SUMMED_SERVER_GAUGES:
                        server_sums[name] = server_sums.get(name, 0) + v
                    continue
                if name in gauges and (_max_gauge(name) or _once_per_update(name)):
                    gauges[name] = max(gauges[name], v)
                else:
                    gauges[name] = gauges.get(name, 0) + v
            for name, (counts, hsum, count) in snap.get("h", {}).items():
                h = histograms.get(name)
                if h is None or (_once_per_update(name) and count > h[2]):
                    histograms[name] = [list(counts), hsum, count]
                elif _once_per_update(name):
                    continue
                else:
                    h[0] = [a + b for a, b in zip(h[0], counts, strict=False)]
                    h[1] += hsum
                    h[2] += count
            used.update(snap.get("u", ()))
        ps = self.parent_stats
        if ps is not None:  # hot restart: what the parent process contributed
            for name, v in ps.counters.items():
                counters[name] = counters.get(name, 0) + v
            for name, v in ps.gauges.items():
                gauges[name] = gauges.get(name, 0) + v
        counters_set: dict[str, int] = {}
        for name, v in counters.items():
            if name.startswith("server.") or _main_only(name):
                continue
            c = store.counter_from_name(name)
            c.value = v
            if v or name in used:
                c.used = True
            if v:
                counters_set[name] = v
        self._counters_set = counters_set
        for name in [n for n in gauges if _main_only(n)]:
            del gauges[name]
        for name in self._gauges_set - gauges.keys():
            g = store.gauges.get(name)
            if g is not None:
                g.value = 0
        for name, v in gauges.items():
            g = store.gauge_from_name(name)
            g.value = v
            if v or name in used:
                g.used = True
        self._gauges_set = set(gauges)
        for name, (counts, hsum, count) in histograms.items():
            hist = store.histograms.get(name)
            if not isinstance(hist, _MergedHistogram):
                if name.startswith("server."):
                    continue
                unit = hist.unit if hist is not None else "ms"
                hist = store.histograms[name] = _MergedHistogram(name, unit)
            hist.set_totals(counts, hsum, count)
        self._server_sums = server_sums

    def apply_server_totals(self) -> None:
        """After ``Server.refresh_server_stats``: process-wide sums for ``server.*``."""
        s = self.server.server_stats
        sums = self._server_sums
        s.total_connections.set(sums.get("server.total_connections", 0))
        for name in ("memory_allocated", "memory_heap_size", "memory_physical_size"):
            gauge = getattr(s, name)
            gauge.set(gauge.value + sums.get(f"server.{name}", 0))


# --------------------------------------------------------------------------- worker side


def snapshot(server: Any) -> dict[str, Any]:
    """This worker's stats for the main process (used/non-zero ones only)."""
    server.refresh_server_stats()
    store = server.stats
    c: dict[str, int] = {}
    u: list[str] = []
    for name, x in store.counters.items():
        if x.value:
            c[name] = x.value
        elif x.used:
            u.append(name)
    g: dict[str, int] = {}
    for name, y in store.gauges.items():
        if y.value or y.used:
            g[name] = y.value
            if y.used:
                u.append(name)
    h = {name: [z.counts, z.sum, z.count] for name, z in store.histograms.items() if z.count}
    return {"c": c, "g": g, "h": h, "u": u}


_HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _rds_files(resources: list[Any]) -> dict[str, tuple[str | None, str]]:
    """The RDS files named by the HTTP connection managers of LDS listener resources,
    ``{path: (watched_directory, type_url)}`` (what a worker applying them subscribes to)."""
    from pyenvoy.config import unpack_any
    from pyenvoy.config.xds import TYPE_ROUTE, path_source

    out: dict[str, tuple[str | None, str]] = {}
    for r in resources:
        listener = r.message
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if not f.HasField("typed_config") or not f.typed_config.type_url.endswith(
                    _HCM_TYPE
                ):
                    continue
                try:
                    hcm = unpack_any(f.typed_config)
                    if hcm.HasField("rds"):  # type: ignore[attr-defined]
                        path, wd = path_source(hcm.rds.config_source, "rds")  # type: ignore[attr-defined]
                        out[path] = (wd, TYPE_ROUTE)
                except Exception:  # the workers reject it with the reason
                    continue
    return out


def _bind_later_listeners_with_reuse_port() -> None:
    """In a worker, a listener added later (LDS, reload) is bound by each worker itself:
    with SO_REUSEPORT (Envoy's default) they can all bind its address."""
    from pyenvoy.listener import Listener

    original = Listener.make_socket

    def make_socket(self: Any) -> socket.socket:
        if reuse_port(self):
            return _bind_reuse_port(self, self.port)
        return original(self)

    Listener.make_socket = make_socket  # type: ignore[method-assign]


def _rename_worker_stats(server: Any, index: int) -> None:
    """``listener.<addr>.worker_<index>.*`` instead of the single-process ``worker_0``."""
    if index == 0:
        return
    try:
        from pyenvoy.listener import ListenerWorkerStats
    except ImportError:
        return
    store = server.stats
    lm = server.listener_manager
    for listener in getattr(lm, "listeners", ()):
        old = getattr(listener, "worker_stats", None)
        if old is None:
            continue
        prefix = old.scope.prefix
        for name in ListenerWorkerStats.COUNTERS:
            store.counters.pop(f"{prefix}.{name}", None)
        for name in ListenerWorkerStats.GAUGES:
            store.gauges.pop(f"{prefix}.{name}", None)
        listener.worker_stats = ListenerWorkerStats(listener.scope.scope(f"worker_{index}"))


class _Control:
    """The worker's end of the control socket, read on the event loop."""

    def __init__(self, server: Server, ctl: socket.socket) -> None:
        self.server = server
        self.ctl = ctl
        self.decoder = FrameDecoder()
        self.stopping = False

    def on_readable(self) -> None:
        try:
            data = self.ctl.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the main process is gone
            asyncio.get_running_loop().remove_reader(self.ctl.fileno())
            log.warning("worker: the main process went away; stopping")
            self.stop(None)
            return
        for msg in self.decoder.feed(data):
            self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "stats":
            reply = snapshot(self.server)
            reply["seq"] = msg.get("seq")
            self.reply(reply)
        elif op == "drain":
            drain_listeners(self.server, float(msg.get("drain_time", 0)), str(msg.get("strategy")))
        elif op == "stop":
            t = msg.get("drain_time")
            self.stop(None if t is None else float(t))
        elif op == "admin_state":
            self.server.healthcheck_failed = bool(msg.get("healthcheck_failed"))
            from pyenvoy import log as envoy_log

            for component, level in msg.get("log_levels", {}).items():
                envoy_log.set_level(component, level)
        elif op == XDS_FILE_OP:
            self.server.xds.push(msg)
        elif op == DNS_HOSTS_OP:
            remote_dns = getattr(self.server.cluster_manager, "remote_dns", None)
            if remote_dns is not None:
                remote_dns.update(msg)
        elif op == HOST_HEALTH_OP:
            cm = self.server.cluster_manager
            remote = getattr(cm, "remote_health", None)
            if remote is not None:
                remote.update(msg)
            remote_outlier = getattr(cm, "remote_outlier", None)
            if remote_outlier is not None:
                remote_outlier.update(msg)
        elif op == "reset_counters":
            self.server.stats.reset_counters()
        elif op == "drain_listeners":
            drain = getattr(self.server, "drain_listeners", None)
            if callable(drain):
                drain(**msg.get("args", {}))

    def reply(self, msg: dict[str, Any]) -> None:
        """Send one frame: a non-blocking send first (the whole frame, as a rule), the rest
        blocking, so frames never interleave."""
        data = encode_frame(msg)
        try:
            sent = self.ctl.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return
        if sent == len(data):
            return
        try:
            self.ctl.setblocking(True)
            self.ctl.settimeout(10.0)
            self.ctl.sendall(data[sent:])
        except OSError:
            pass
        finally:
            try:
                self.ctl.setblocking(False)
            except OSError:
                pass

    def stop(self, drain_time: float | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        asyncio.get_running_loop().create_task(self.server.stop(drain_time))


async def _worker_serve(
    index: int,
    ctl: socket.socket,
    bootstrap: Bootstrap,
    options: ServerOptions,
    sockets: dict[tuple[str, int], socket.socket],
    host_health: dict[str, Any] | None = None,
    xds_files: list[dict[str, Any]] | None = None,
    dns_hosts: dict[str, Any] | None = None,
) -> int:
    from pyenvoy.server import Server

    loop = asyncio.get_running_loop()
    _bind_later_listeners_with_reuse_port()
    try:
        # xDS files come from the main process (op xds_file), never read here.
        files = {str(m.get("path", "")): decode_file(m) for m in xds_files or ()}
        server = Server(bootstrap, options, remote_xds_files=files)
        _rename_worker_stats(server, index)
        if server.cluster_manager is not None:
            # The main process runs the health checks; we take its results.
            remote = RemoteHealth()
            server.cluster_manager.use_remote_health(remote)
            if host_health:
                remote.update(host_health)
            # ... and resolves DNS; we take its answers.
            remote_dns = RemoteDns()
            server.cluster_manager.use_remote_dns(remote_dns)
            if dns_hosts:
                remote_dns.update(dns_hosts)
            # ... and detects outliers: we post our results and take its ejections.
            remote_outlier = RemoteOutlier()
            server.cluster_manager.use_remote_outlier(remote_outlier)
            if host_health:
                remote_outlier.update(host_health)
        await server.start(inherited_sockets=sockets, admin=False)
    except Exception as e:
        send_frame(ctl, {"op": "failed", "error": f"worker {index}: {e}"})
        return 1
    control = _Control(server, ctl)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, control.stop, None)
    ctl.setblocking(False)
    _send_blocking(ctl, {"op": "ready", "pid": os.getpid()})
    remote_health = getattr(server.cluster_manager, "remote_health", None)
    if remote_health is not None:  # from now on the main process reads what we send
        remote_health.report = control.reply
    outlier_posts = getattr(server.cluster_manager, "remote_outlier", None)
    if outlier_posts is not None:
        outlier_posts.set_report(control.reply)
    loop.add_reader(ctl.fileno(), control.on_readable)
    gc.collect()
    gc.freeze()
    await server.wait_closed()
    return 0


def _send_blocking(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.setblocking(True)
    try:
        sock.sendall(encode_frame(msg))
    finally:
        sock.setblocking(False)


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: ``python -m pyenvoy.workers <control fd>``."""
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy import log as envoy_log
    from pyenvoy.options import ServerOptions

    ctl = socket.socket(fileno=int(argv[0]))
    ctl.settimeout(START_TIMEOUT_S)
    msg, fds = recv_frame(ctl)
    options = ServerOptions(**msg["options"])
    envoy_log.configure(
        options.log_level,
        options.component_log_level,
        options.log_path or None,
        options.log_format,
        log_format_escaped=options.log_format_escaped,
    )
    bootstrap = Bootstrap.FromString(base64.b64decode(msg["bootstrap"]))
    if msg.get("shared_counts") and fds:
        # Circuit breakers count process-wide: our column of the main process's table,
        # zeroed before any cluster is built (a restarted worker starts from nothing).
        index = int(msg["index"])
        table = shared_counts.SharedCounts.attach(fds.pop(), index)
        table.zero_worker(index)
        shared_counts.install(table)
    sockets: dict[tuple[str, int], socket.socket] = {}
    for (host, port), fd in zip(msg["sockets"], fds, strict=True):
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        sockets[(str(host), int(port))] = s
    import uvloop

    try:
        return uvloop.run(
            _worker_serve(
                int(msg["index"]),
                ctl,
                bootstrap,
                options,
                sockets,
                msg.get("host_health"),
                msg.get("xds_files"),
                msg.get("dns_hosts"),
            )
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
