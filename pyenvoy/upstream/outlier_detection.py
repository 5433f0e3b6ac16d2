"""Outlier detection (passive health checking), as Envoy 1.40's DetectorImpl does it.

Strategy: every upstream result reaches the cluster's detector from the router or tcp_proxy
(``on_upstream_response(host, status)``, ``on_local_origin_failure(host, reason)``,
``on_local_origin_success(host, final)``) and lands in the host's ``DetectorHostMonitor``
(``host.outlier``, made on first use): a few int counters bumped inline. Consecutive-error ejections (5xx, gateway failure, local-origin
failure) happen at once when a counter reaches its threshold (``==``, then the counter is
reset, as in Envoy). Everything else runs on the ``interval`` sweep: un-eject hosts whose
ejection time ``min(base_ejection_time * backoff, max_ejection_time) + jitter`` has passed,
swap each host's two success-rate buckets (the sweep judges the interval that just ended),
run success-rate (mean - stdev_factor * stdev) and failure-percentage ejections, and let the
backoff of hosts that stayed healthy decay. ``max_ejection_percent`` is checked against all
hosts of the cluster (``always_eject_one_host`` lets the first one go regardless), and each
enforcing_* percentage is a coin toss. An ejection sets ``/failed_outlier_check`` and
rebuilds the cluster's load balancer.

Without ``split_external_local_origin_errors`` local-origin failures count as HTTP codes
(a reset or connect failure as 503, a timeout as 504, tcp_proxy's final connect success as
200); with it they feed separate counters and a separate success rate, and each upstream
response also counts as a local-origin success (Envoy records the successful connect).

With worker processes (``--concurrency N``) there is one detector per cluster for the whole
proxy, in the main process, as Envoy's detector lives on its main thread: a worker's
``cluster.outlier`` is a ``RemoteOutlierDetector`` that decides nothing and keeps no state;
each result is one tuple appended to the process's ``RemoteOutlier`` buffer, which goes to
the main process as one ``outlier_events`` frame per loop iteration (by host, runs of equal
results counted once). There ``apply_outlier_events`` hands every result to the main
process's detector through the same ``on_upstream_response`` / ``on_local_origin_*`` methods
as a local result, and that detector runs the interval sweep; its ejections and
un-ejections reach the cluster manager's ``health_observer`` (the WorkerPool's
``HealthPublisher``), which sends each cluster's ejected hosts to every worker
(``host_health`` messages, key ``outlier``), where ``RemoteOutlierDetector.apply_remote``
sets or clears ``/failed_outlier_check`` and rebuilds the load balancer. Single-process mode
never builds any of this.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import StatsStruct
from pyenvoy.upstream.host import FAILED_ACTIVE_HC, FAILED_OUTLIER_CHECK

if TYPE_CHECKING:
    from pyenvoy.upstream.cluster_manager import Cluster
    from pyenvoy.upstream.host import Host

__all__ = [
    "DetectorHostMonitor",
    "OUTLIER_EVENTS_OP",
    "OutlierDetector",
    "OutlierDetectionStats",
    "RemoteOutlier",
    "RemoteOutlierDetector",
    "apply_outlier_events",
    "ejected_hosts",
    "make_outlier_detector",
]

# envoy.data.cluster.v3.OutlierEjectionType
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
SUCCESS_RATE = "success_rate"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE_LOCAL_ORIGIN = "local_origin_success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
FAILURE_PERCENTAGE_LOCAL_ORIGIN = "local_origin_failure_percentage"

# Router reset reasons that are not the host's fault (Envoy ignores overflow resets).
_IGNORED_REASONS = frozenset({"overflow"})
_TIMEOUT_REASONS = frozenset({"timeout", "per_try_timeout"})


class OutlierDetectionStats(StatsStruct):
    """``cluster.<name>.outlier_detection.*`` (Envoy 1.40's ALL_OUTLIER_DETECTION_STATS)."""

    COUNTERS = (
        "ejections_consecutive_5xx",
        "ejections_detected_consecutive_5xx",
        "ejections_detected_consecutive_gateway_failure",
        "ejections_detected_consecutive_local_origin_failure",
        "ejections_detected_degradation",
        "ejections_detected_failure_percentage",
        "ejections_detected_local_origin_failure_percentage",
        "ejections_detected_local_origin_success_rate",
        "ejections_detected_success_rate",
        "ejections_enforced_consecutive_5xx",
        "ejections_enforced_consecutive_gateway_failure",
        "ejections_enforced_consecutive_local_origin_failure",
        "ejections_enforced_failure_percentage",
        "ejections_enforced_local_origin_failure_percentage",
        "ejections_enforced_local_origin_success_rate",
        "ejections_enforced_success_rate",
        "ejections_enforced_total",
        "ejections_overflow",
        "ejections_success_rate",
        "ejections_total",
    )
    GAUGES = ("ejections_active",)


def _ms(d: Any) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


class DetectorConfig:
    """The OutlierDetection proto with Envoy's defaults applied."""

    def __init__(self, proto: Any, path: str) -> None:
        def wrapped(name: str, default: int) -> int:
            return int(getattr(proto, name).value) if proto.HasField(name) else default

        def dur(name: str, default: int) -> int:
            return _ms(getattr(proto, name)) if proto.HasField(name) else default

        if len(proto.monitors):
            raise ConfigError(
                "outlier_detection.monitors is not supported by pyenvoy", f"{path}.monitors"
            )
        self.interval_ms = dur("interval", 10000)
        self.base_ejection_time_ms = dur("base_ejection_time", 30000)
        self.consecutive_5xx = wrapped("consecutive_5xx", 5)
        self.consecutive_gateway_failure = wrapped("consecutive_gateway_failure", 5)
        self.max_ejection_percent = wrapped("max_ejection_percent", 10)
        self.always_eject_one_host = (
            bool(proto.always_eject_one_host.value)
            if proto.HasField("always_eject_one_host")
            else False
        )
        self.success_rate_minimum_hosts = wrapped("success_rate_minimum_hosts", 5)
        self.success_rate_request_volume = wrapped("success_rate_request_volume", 100)
        self.success_rate_stdev_factor = wrapped("success_rate_stdev_factor", 1900)
        self.failure_percentage_threshold = wrapped("failure_percentage_threshold", 85)
        self.failure_percentage_minimum_hosts = wrapped("failure_percentage_minimum_hosts", 5)
        self.failure_percentage_request_volume = wrapped("failure_percentage_request_volume", 50)
        self.split_external_local_origin_errors = bool(proto.split_external_local_origin_errors)
        self.consecutive_local_origin_failure = wrapped("consecutive_local_origin_failure", 5)
        self.max_ejection_time_ms = dur(
            "max_ejection_time", max(300000, self.base_ejection_time_ms)
        )
        self.max_ejection_time_jitter_ms = dur("max_ejection_time_jitter", 0)
        self.successful_active_health_check_uneject_host = (
            bool(proto.successful_active_health_check_uneject_host.value)
            if proto.HasField("successful_active_health_check_uneject_host")
            else True
        )
        self.enforcing = {
            CONSECUTIVE_5XX: wrapped("enforcing_consecutive_5xx", 100),
            CONSECUTIVE_GATEWAY_FAILURE: wrapped("enforcing_consecutive_gateway_failure", 0),
            SUCCESS_RATE: wrapped("enforcing_success_rate", 100),
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: wrapped(
                "enforcing_consecutive_local_origin_failure", 100
            ),
            SUCCESS_RATE_LOCAL_ORIGIN: wrapped("enforcing_local_origin_success_rate", 100),
            FAILURE_PERCENTAGE: wrapped("enforcing_failure_percentage", 0),
            FAILURE_PERCENTAGE_LOCAL_ORIGIN: wrapped(
                "enforcing_failure_percentage_local_origin", 0
            ),
        }
        if self.max_ejection_time_ms < self.base_ejection_time_ms:
            raise ConfigError(
                "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
                path,
            )


class DetectorHostMonitor:
    """Per-host outlier state (``host.outlier``)."""

    __slots__ = (
        "detector",
        "host",
        "consecutive_5xx",
        "consecutive_gateway_failure",
        "consecutive_local_origin_failure",
        "ext_success",
        "ext_total",
        "ext_backup",
        "local_success",
        "local_total",
        "local_backup",
        "num_ejections",
        "last_ejection_time",
        "last_unejection_time",
        "eject_time_backoff",
        "jitter_ms",
        "success_rate",
        "local_origin_success_rate",
    )

    def __init__(self, detector: OutlierDetector, host: Host) -> None:
        self.detector = detector
        self.host = host
        self.consecutive_5xx = 0
        self.consecutive_gateway_failure = 0
        self.consecutive_local_origin_failure = 0
        # Success-rate buckets: the current interval counts here, the sweep reads the backup.
        self.ext_success = 0
        self.ext_total = 0
        self.ext_backup: tuple[int, int] = (0, 0)  # (success, total)
        self.local_success = 0
        self.local_total = 0
        self.local_backup: tuple[int, int] = (0, 0)
        self.num_ejections = 0
        self.last_ejection_time: float | None = None
        self.last_unejection_time: float | None = None
        self.eject_time_backoff = 0
        self.jitter_ms = 0
        # Shown by /clusters: -1 until a sweep had enough requests from this host.
        self.success_rate = -1.0
        self.local_origin_success_rate = -1.0

    def put_http_response_code(self, code: int) -> None:
        self.ext_total += 1
        d = self.detector
        if 500 <= code < 600:
            config = d.config
            if 502 <= code <= 504:
                self.consecutive_gateway_failure += 1
                if self.consecutive_gateway_failure == config.consecutive_gateway_failure:
                    d.on_consecutive_error(self, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                self.consecutive_gateway_failure = 0
            self.consecutive_5xx += 1
            if self.consecutive_5xx == config.consecutive_5xx:
                d.on_consecutive_error(self, CONSECUTIVE_5XX)
        else:
            self.ext_success += 1
            self.consecutive_5xx = 0
            self.consecutive_gateway_failure = 0

    def local_origin_failure(self) -> None:
        self.local_total += 1
        self.consecutive_local_origin_failure += 1
        d = self.detector
        if self.consecutive_local_origin_failure == d.config.consecutive_local_origin_failure:
            d.on_consecutive_error(self, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def local_origin_no_failure(self) -> None:
        self.local_total += 1
        self.local_success += 1
        self.consecutive_local_origin_failure = 0

    def reset_consecutive(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway_failure = 0
        self.consecutive_local_origin_failure = 0

    def swap_buckets(self) -> None:
        self.ext_backup = (self.ext_success, self.ext_total)
        self.ext_success = self.ext_total = 0
        self.local_backup = (self.local_success, self.local_total)
        self.local_success = self.local_total = 0


class OutlierDetector:
    """The cluster's detector (``cluster.outlier``)."""

    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        self.cluster = cluster
        self.config = DetectorConfig(proto, path)
        self.split = self.config.split_external_local_origin_errors
        self.stats = OutlierDetectionStats(cluster.info.stats.scope.scope("outlier_detection"))
        self.random = random.Random()
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        # Cluster-wide success-rate numbers for /clusters (average, ejection threshold).
        self.success_rate_average = -1.0
        self.success_rate_ejection_threshold = -1.0
        self.local_origin_success_rate_average = -1.0
        self.local_origin_success_rate_ejection_threshold = -1.0
        # Hears of every ejection and un-ejection (the cluster manager's health observer:
        # with workers, the main process publishes the cluster's ejected hosts to them).
        self.observer: Callable[[Cluster, Host | None, bool], None] | None = None
        for h in cluster.hosts:
            self.monitor(h)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Arm the interval sweep (needs the running loop)."""
        self._stopped = False
        if self._timer is None:
            self._arm()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.config.interval_ms / 1000.0, self._on_interval)

    def monitor(self, host: Host) -> DetectorHostMonitor:
        m = host.outlier
        if m is None or m.detector is not self:
            old = m
            m = host.outlier = DetectorHostMonitor(self, host)
            if isinstance(old, DetectorHostMonitor):
                # The host came over from the cluster this one replaced: keep its history
                # (an ejection in progress runs its course).
                for name in DetectorHostMonitor.__slots__[2:]:
                    setattr(m, name, getattr(old, name))
        return m

    # --- results from the router (per response: keep lean) -------------------------------
    def on_upstream_response(self, host: Host, status: int) -> None:
        if self._timer is None and not self._stopped:
            self._arm()
        m = host.outlier
        if m is None or m.detector is not self:
            m = self.monitor(host)
        if self.split:
            m.local_origin_no_failure()  # the connection worked (Envoy: LocalOriginConnectSuccess)
        m.put_http_response_code(status)

    def on_local_origin_failure(self, host: Host, reason: str) -> None:
        if reason in _IGNORED_REASONS:
            return
        if self._timer is None and not self._stopped:
            self._arm()
        m = host.outlier
        if m is None or m.detector is not self:
            m = self.monitor(host)
        if self.split:
            m.local_origin_failure()
        else:
            m.put_http_response_code(504 if reason in _TIMEOUT_REASONS else 503)

    def on_local_origin_success(self, host: Host, final: bool = True) -> None:
        """A connection to ``host`` was established.

        ``final`` (tcp_proxy: the connection *is* the transaction, Envoy's
        LocalOriginConnectSuccessFinal) counts as a 200 when results are not split. The HTTP
        router need not call this: ``on_upstream_response`` already counts the connect.
        """
        if self._timer is None and not self._stopped:
            self._arm()
        m = host.outlier
        if m is None or m.detector is not self:
            m = self.monitor(host)
        if self.split:
            m.local_origin_no_failure()
        elif final:
            m.put_http_response_code(200)

    def on_active_health_check_success(self, host: Host) -> None:
        """Active HC passed: an ejected host comes back (successful_active_health_check_uneject_host)."""
        if (
            self.config.successful_active_health_check_uneject_host
            and host.health_flags & FAILED_OUTLIER_CHECK
            and not host.health_flags & FAILED_ACTIVE_HC
        ):
            self._uneject(self.monitor(host), time.monotonic())

    # --- ejection -----------------------------------------------------------------------
    def _ejections_active(self) -> int:
        return sum(1 for h in self.cluster.hosts if h.health_flags & FAILED_OUTLIER_CHECK)

    def on_consecutive_error(self, m: DetectorHostMonitor, type_: str) -> None:
        host = m.host
        if host.health_flags & FAILED_OUTLIER_CHECK or host not in self.cluster.hosts:
            return
        stats = self.stats
        getattr(stats, f"ejections_detected_{type_}").value += 1
        self._eject(m, type_)
        if type_ == CONSECUTIVE_5XX:
            stats.ejections_consecutive_5xx.value += 1  # deprecated twin
            m.consecutive_5xx = 0
        elif type_ == CONSECUTIVE_GATEWAY_FAILURE:
            m.consecutive_gateway_failure = 0
        else:
            m.consecutive_local_origin_failure = 0

    def _eject(self, m: DetectorHostMonitor, type_: str) -> None:
        config = self.config
        stats = self.stats
        total = len(self.cluster.hosts) or 1
        active = self._ejections_active()
        should_eject = 100.0 * (active + 1) / total <= min(100, config.max_ejection_percent)
        if config.always_eject_one_host and active == 0:
            should_eject = True
        if not should_eject:
            stats.ejections_overflow.value += 1
            return
        if type_ in (CONSECUTIVE_5XX, SUCCESS_RATE):
            stats.ejections_total.value += 1  # deprecated
        if self.random.randrange(100) >= config.enforcing[type_]:
            return
        stats.ejections_enforced_total.value += 1
        getattr(stats, f"ejections_enforced_{type_}").value += 1
        host = m.host
        host.health_flags |= FAILED_OUTLIER_CHECK
        m.num_ejections += 1
        m.last_ejection_time = time.monotonic()
        m.jitter_ms = self.random.getrandbits(64) % (config.max_ejection_time_jitter_ms + 1)
        base = config.base_ejection_time_ms
        if m.eject_time_backoff * base < config.max_ejection_time_ms + base:
            m.eject_time_backoff += 1
        stats.ejections_active.set(active + 1)
        self.cluster.refresh_health()
        if self.observer is not None:
            self.observer(self.cluster, None, False)

    def _uneject(self, m: DetectorHostMonitor, now: float) -> None:
        m.host.health_flags &= ~FAILED_OUTLIER_CHECK
        m.reset_consecutive()
        m.last_unejection_time = now
        self.stats.ejections_active.set(self._ejections_active())
        self.cluster.refresh_health()
        if self.observer is not None:
            self.observer(self.cluster, None, False)

    # --- the interval sweep ----------------------------------------------------------------
    def _on_interval(self) -> None:
        self._timer = None
        if self._stopped:
            return
        try:
            self.sweep(time.monotonic())
        finally:
            if not self._stopped:
                self._arm()

    def sweep(self, now: float) -> None:
        """One interval: un-eject, judge success rates, decay backoffs."""
        config = self.config
        hosts = list(self.cluster.hosts)
        monitors = [self.monitor(h) for h in hosts]
        for m in monitors:
            if m.host.health_flags & FAILED_OUTLIER_CHECK:
                self._check_uneject(m, now)
            m.swap_buckets()
            m.success_rate = -1.0
            m.local_origin_success_rate = -1.0
        self._success_rate_ejections(monitors, local=False)
        self._success_rate_ejections(monitors, local=True)
        interval_s = config.interval_ms / 1000.0
        for m in monitors:
            if m.host.health_flags & FAILED_OUTLIER_CHECK:
                continue
            if m.last_unejection_time is not None and now - m.last_unejection_time >= interval_s:
                if m.eject_time_backoff:
                    m.eject_time_backoff -= 1
        self.stats.ejections_active.set(self._ejections_active())

    def _check_uneject(self, m: DetectorHostMonitor, now: float) -> None:
        config = self.config
        if m.last_ejection_time is None:
            self._uneject(m, now)  # ejected by no detector we know of
            return
        eject_ms = min(
            config.base_ejection_time_ms * m.eject_time_backoff, config.max_ejection_time_ms
        )
        if (eject_ms + m.jitter_ms) / 1000.0 <= now - m.last_ejection_time + 1e-9:
            self._uneject(m, now)

    def _success_rate_ejections(self, monitors: list[DetectorHostMonitor], local: bool) -> None:
        config = self.config
        sr_min_hosts = config.success_rate_minimum_hosts
        sr_volume = config.success_rate_request_volume
        fp_min_hosts = config.failure_percentage_minimum_hosts
        fp_volume = config.failure_percentage_request_volume
        if local:
            self.local_origin_success_rate_average = -1.0
            self.local_origin_success_rate_ejection_threshold = -1.0
        else:
            self.success_rate_average = -1.0
            self.success_rate_ejection_threshold = -1.0
        n = len(monitors)
        if n < sr_min_hosts and n < fp_min_hosts:
            return
        sr_hosts: list[tuple[DetectorHostMonitor, float]] = []
        fp_hosts: list[tuple[DetectorHostMonitor, float]] = []
        for m in monitors:
            if m.host.health_flags & FAILED_OUTLIER_CHECK:
                continue
            success, total = m.local_backup if local else m.ext_backup
            if not total:
                continue
            rate = success * 100.0 / total
            if total >= min(sr_volume, fp_volume):
                if local:
                    m.local_origin_success_rate = rate
                else:
                    m.success_rate = rate
            if total >= sr_volume:
                sr_hosts.append((m, rate))
            if total >= fp_volume:
                fp_hosts.append((m, rate))
        if sr_hosts and len(sr_hosts) >= sr_min_hosts:
            mean = sum(r for _, r in sr_hosts) / len(sr_hosts)
            variance = sum((r - mean) ** 2 for _, r in sr_hosts) / len(sr_hosts)
            threshold = mean - (config.success_rate_stdev_factor / 1000.0) * math.sqrt(variance)
            if local:
                self.local_origin_success_rate_average = mean
                self.local_origin_success_rate_ejection_threshold = threshold
            else:
                self.success_rate_average = mean
                self.success_rate_ejection_threshold = threshold
            type_ = SUCCESS_RATE_LOCAL_ORIGIN if local else SUCCESS_RATE
            for m, rate in sr_hosts:
                if rate < threshold and not m.host.health_flags & FAILED_OUTLIER_CHECK:
                    self.stats.ejections_success_rate.value += 1  # deprecated
                    getattr(self.stats, f"ejections_detected_{type_}").value += 1
                    self._eject(m, type_)
        if fp_hosts and len(fp_hosts) >= fp_min_hosts:
            type_ = FAILURE_PERCENTAGE_LOCAL_ORIGIN if local else FAILURE_PERCENTAGE
            for m, rate in fp_hosts:
                if 100.0 - rate >= config.failure_percentage_threshold:
                    getattr(self.stats, f"ejections_detected_{type_}").value += 1
                    if not m.host.health_flags & FAILED_OUTLIER_CHECK:  # not already ejected above
                        self._eject(m, type_)


def make_outlier_detector(
    cluster: Any,
    proto: Any,
    path: str,
    *,
    remote: RemoteOutlier | None = None,
    observer: Callable[[Cluster, Host | None, bool], None] | None = None,
) -> OutlierDetector | RemoteOutlierDetector:
    """The cluster's detector (``observer`` hears of its ejections and un-ejections); in a
    worker process (``remote`` given) one that posts its results to the main process's
    detector and takes its ejections."""
    if remote is not None:
        DetectorConfig(proto, path)  # the same checks and texts as in the main process
        return RemoteOutlierDetector(cluster, remote)
    od = OutlierDetector(cluster, proto, path)
    od.observer = observer
    return od


# --- with worker processes: one detector per cluster, in the main process ------------------

OUTLIER_EVENTS_OP = "outlier_events"
# Event kinds: what the router or tcp_proxy reported (the value is the status code, the
# failure reason, or whether a local-origin success was final).
UPSTREAM_RESPONSE, LOCAL_ORIGIN_FAILURE, LOCAL_ORIGIN_SUCCESS = range(3)

Address = tuple[str, int]


class RemoteOutlierDetector:
    """A worker's ``cluster.outlier``: it decides nothing. Each result is one tuple
    ``(cluster, host address, kind, value)`` appended to the process's ``RemoteOutlier``
    buffer (sent to the main process once per loop iteration); the main process's
    ejections arrive through ``RemoteOutlier.update`` into ``apply_remote``."""

    __slots__ = ("cluster", "name", "remote", "_events")

    def __init__(self, cluster: Cluster, remote: RemoteOutlier) -> None:
        self.cluster = cluster
        self.name = cluster.info.name
        self.remote = remote
        self._events = remote.events

    # --- results from the router (per response: one append) --------------------------------
    def on_upstream_response(self, host: Host, status: int) -> None:
        events = self._events
        if not events:
            self.remote.schedule()
        events.append((self.name, host.address, UPSTREAM_RESPONSE, status))

    def on_local_origin_failure(self, host: Host, reason: str) -> None:
        if reason in _IGNORED_REASONS:
            return
        events = self._events
        if not events:
            self.remote.schedule()
        events.append((self.name, host.address, LOCAL_ORIGIN_FAILURE, reason))

    def on_local_origin_success(self, host: Host, final: bool = True) -> None:
        events = self._events
        if not events:
            self.remote.schedule()
        events.append((self.name, host.address, LOCAL_ORIGIN_SUCCESS, final))

    def on_active_health_check_success(self, host: Host) -> None:
        """The main process's detector un-ejects on its own checks' success."""

    # --- lifecycle: no sweep here, only the main process's word ------------------------------
    def start(self) -> None:
        self.remote.subscribe(self)
        self.apply_remote()

    def stop(self) -> None:
        self.remote.unsubscribe(self)

    def apply_remote(self) -> None:
        """One home for the main process's ejections in a worker: set or clear each host's
        ``/failed_outlier_check`` and rebuild the load balancer if any changed."""
        ejected = self.remote.ejected.get(self.name, ())
        changed = False
        for h in self.cluster.hosts:
            flags = h.health_flags
            if h.address in ejected:
                new = flags | FAILED_OUTLIER_CHECK
            else:
                new = flags & ~FAILED_OUTLIER_CHECK
            if new != flags:
                h.health_flags = new
                changed = True
        if changed:
            self.cluster.refresh_health()


class RemoteOutlier:
    """A worker process's side of outlier detection: the buffer of results for the main
    process and the main process's ejected hosts, by cluster name.

    ``events`` goes out as one ``outlier_events`` frame per loop iteration (``call_soon``
    when it becomes non-empty) through ``report``, which the worker sets once the main
    process reads its frames (until then the events wait). ``update`` takes the
    ``outlier`` part of a ``host_health`` message and applies it to the subscribed
    detectors of those clusters."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.events: list[tuple[str, Address, int, Any]] = []
        self.report = report
        self.ejected: dict[str, frozenset[Address]] = {}
        self._subscribers: dict[str, list[RemoteOutlierDetector]] = {}

    def set_report(self, report: Callable[[dict[str, Any]], None] | None) -> None:
        self.report = report
        if report is not None and self.events:
            self.schedule()

    def schedule(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a test driving detectors by hand): flush() later
            pass

    def flush(self) -> None:
        """Send the buffered results as one frame, by host and in order for each host,
        equal results in a row counted once: ``{"op": "outlier_events", "hosts": [[cluster,
        ip, port, [kind, value, count, kind, value, count, ...]], ...]}``. (Results for
        different hosts are independent in the detector, as they are when Envoy's workers
        post them to its main thread in whatever order; a busy worker's batch is then a
        few runs per host instead of one entry per request.)"""
        report = self.report
        events = self.events
        if report is None or not events:
            return
        hosts: dict[tuple[str, Address], list[Any]] = {}
        for name, address, kind, value in events:
            key = (name, address)
            runs = hosts.get(key)
            if runs is None:
                hosts[key] = [kind, value, 1]
            elif runs[-3] == kind and runs[-2] == value:
                runs[-1] += 1
            else:
                runs += (kind, value, 1)
        events.clear()
        report(
            {
                "op": OUTLIER_EVENTS_OP,
                "hosts": [[n, a[0], a[1], runs] for (n, a), runs in hosts.items()],
            }
        )

    def subscribe(self, d: RemoteOutlierDetector) -> None:
        subs = self._subscribers.setdefault(d.name, [])
        if d not in subs:
            subs.append(d)

    def unsubscribe(self, d: RemoteOutlierDetector) -> None:
        subs = self._subscribers.get(d.name)
        if subs is not None and d in subs:
            subs.remove(d)
            if not subs:
                del self._subscribers[d.name]

    def update(self, msg: dict[str, Any]) -> None:
        """Apply the ejections of one ``host_health`` message (``encode_health``):
        ``"outlier": {cluster: [[ip, port], ...]}`` lists the ejected hosts of each
        cluster whose set changed; a ``full`` message lists every cluster with outlier
        detection (one it leaves out has no ejected host)."""
        state = {
            str(name): frozenset((str(ip), int(port)) for ip, port in addrs)
            for name, addrs in (msg.get("outlier") or {}).items()
        }
        if msg.get("full"):
            names = self.ejected.keys() | state.keys()
            self.ejected = state
        else:
            names = set(state)
            self.ejected.update(state)
        for name in names:
            for d in list(self._subscribers.get(name, ())):
                d.apply_remote()


def apply_outlier_events(cluster_manager: Any, msg: dict[str, Any]) -> int:
    """The main process's side of ``RemoteOutlier.flush``: each result, in order for each
    host, goes to this process's detector of that cluster through the same method a local
    result takes. Returns how many were applied (results for a cluster or host that is
    gone, e.g. after a reload raced them, are dropped)."""
    targets: dict[str, tuple[OutlierDetector | None, dict[Address, Host]]] = {}
    applied = 0
    for entry in msg.get("hosts") or ():
        try:
            name, ip, port, runs = entry
            target = targets.get(name)
            if target is None:
                cluster = cluster_manager.get(name)
                found = getattr(cluster, "outlier", None)
                if isinstance(found, OutlierDetector):
                    by_address = {h.address: h for h in reversed(cluster.hosts)}
                    target = targets[name] = (found, by_address)
                else:
                    target = targets[name] = (None, {})
            od, hosts = target
            host = hosts.get((ip, port))
        except (TypeError, ValueError):  # not an entry of ours
            continue
        if od is None or host is None:
            continue
        for i in range(0, len(runs) - 2, 3):
            kind, value, count = runs[i], runs[i + 1], int(runs[i + 2])
            if kind == UPSTREAM_RESPONSE:
                status = int(value)
                for _ in range(count):
                    od.on_upstream_response(host, status)
            elif kind == LOCAL_ORIGIN_FAILURE:
                reason = str(value)
                for _ in range(count):
                    od.on_local_origin_failure(host, reason)
            elif kind == LOCAL_ORIGIN_SUCCESS:
                final = bool(value)
                for _ in range(count):
                    od.on_local_origin_success(host, final)
            else:
                continue
            applied += count
    return applied


def ejected_hosts(
    cluster_manager: Any, names: Iterable[str] | None = None
) -> dict[str, frozenset[Address]]:
    """The ejected host addresses of every active cluster with outlier detection in this
    process (or of those in ``names``): what the main process publishes to its workers."""
    clusters = cluster_manager.clusters
    out: dict[str, frozenset[Address]] = {}
    for name in clusters if names is None else names:
        c = clusters.get(name)
        if c is not None and isinstance(c.outlier, OutlierDetector):
            out[name] = frozenset(
                h.address for h in c.hosts if h.health_flags & FAILED_OUTLIER_CHECK
            )
    return out
