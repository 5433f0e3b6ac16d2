"""Clusters and the cluster manager.

Strategy: each Cluster proto is compiled once into a ClusterInfo (immutable settings and
bound stats) and a Cluster (the live host set). STATIC clusters know their hosts at build
time; STRICT_DNS and LOGICAL_DNS resolve in ``initialize()`` (awaited before listeners
open, as Envoy waits for its primary clusters) and then re-resolve every
``dns_refresh_rate``; EDS clusters read their ClusterLoadAssignment from a filesystem
subscription. A host set change rebuilds the load balancer, so choosing a host is one list
index on the hot path. Connection pools hang off each Host.

Clusters change while the server runs (CDS, whole-config reload): a changed cluster is
built anew and warmed (DNS resolved, first EDS answer) while the old one keeps serving,
then swapped into ``clusters`` by name; Host objects of hosts that stay are carried over
(health flags, host stats) and their pools are drained so new requests use the new
settings; the old cluster is retired (timers, health checks, EDS stopped, pools drained so
requests in flight finish). The router looks clusters up by name per request, so it sees
the swap at once.

With worker processes the main process's manager runs the health checks and tells
``health_observer`` (the WorkerPool's HealthPublisher) of every result, host-set change and
cluster added or removed; a worker's manager (``use_remote_health``) never starts checkers
and takes the main process's results instead (pyenvoy.upstream.health_check). Outlier
detection likewise: the main process's detectors tell ``health_observer`` of every ejection
and un-ejection; a worker's (``use_remote_outlier``) only post their results to the main
process's detectors (pyenvoy.upstream.outlier_detection).

DNS works the same way, as Envoy resolves on its main thread: the main process's DNS
clusters resolve and tell ``dns_observer`` (the WorkerPool's ``DnsPublisher``) of every
answer that changes a cluster's addresses; a worker's manager (``use_remote_dns``) starts
no lookups or refresh timers: its DNS clusters take the main process's answers
(``RemoteDns``) through ``Cluster.apply_resolution``, the same function a local lookup ends
in, and warm once the first answer for their config arrived. Answers are matched by cluster
name and a digest of the cluster's proto, so a cluster being replaced (reload, CDS) only
takes answers of the main process's cluster with the same config.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.xds import SubscriptionStats
from pyenvoy.runtime import for_server as runtime_for_server
from pyenvoy.stats import Counter, Histogram, Scope, StatGroups, StatsStruct
from pyenvoy.upstream import host as host_module
from pyenvoy.upstream.circuit_breaker import (
    configured_limits,
    declare_circuit_breaker_stats,
    resource_managers,
    thresholds_by_priority,
)
from pyenvoy.upstream.host import (
    ACTIVE_HC_FLAGS,
    EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
    FAILED_EDS_HEALTH,
    PENDING_ACTIVE_HC,
    Host,
)
from pyenvoy.upstream.load_balancer import LoadBalancer, LoadBalancerFactory

if TYPE_CHECKING:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto

    from pyenvoy.config.xds import DecodedResource, FilesystemSubscription, XdsManager
    from pyenvoy.stats import Store
    from pyenvoy.upstream.health_check import ClusterHealth, RemoteHealth
    from pyenvoy.upstream.outlier_detection import RemoteOutlier

log = logging.getLogger("pyenvoy.upstream")

DEFAULT_BUFFER_LIMIT = 1024 * 1024


class ClusterStats(StatsStruct):
    """``cluster.<name>.*`` (Envoy's ALL_CLUSTER_TRAFFIC_STATS and friends)."""

    COUNTERS = (
        "assignment_stale",
        "assignment_timeout_received",
        "bind_errors",
        "lb_healthy_panic",
        "lb_local_cluster_not_ok",
        "lb_recalculate_zone_structures",
        "lb_subsets_created",
        "lb_subsets_fallback",
        "lb_subsets_fallback_panic",
        "lb_subsets_removed",
        "lb_subsets_selected",
        "lb_zone_cluster_too_small",
        "lb_zone_no_capacity_left",
        "lb_zone_number_differs",
        "lb_zone_routing_all_directly",
        "lb_zone_routing_cross_zone",
        "lb_zone_routing_sampled",
        "membership_change",
        "original_dst_host_invalid",
        "retry_or_shadow_abandoned",
        "update_attempt",
        "update_empty",
        "update_failure",
        "update_no_rebuild",
        "update_success",
        "upstream_cx_close_notify",
        "upstream_cx_connect_attempts_exceeded",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_connect_with_0_rtt",
        "upstream_cx_destroy",
        "upstream_cx_destroy_local",
        "upstream_cx_destroy_local_with_active_rq",
        "upstream_cx_destroy_remote",
        "upstream_cx_destroy_remote_with_active_rq",
        "upstream_cx_destroy_with_active_rq",
        "upstream_cx_http1_total",
        "upstream_cx_http2_total",
        "upstream_cx_http3_total",
        "upstream_cx_idle_timeout",
        "upstream_cx_max_duration_reached",
        "upstream_cx_max_requests",
        "upstream_cx_none_healthy",
        "upstream_cx_overflow",
        "upstream_cx_pool_overflow",
        "upstream_cx_protocol_error",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_total",
        "upstream_cx_tx_bytes_total",
        "upstream_flow_control_backed_up_total",
        "upstream_flow_control_drained_total",
        "upstream_flow_control_paused_reading_total",
        "upstream_flow_control_resumed_reading_total",
        "upstream_http3_broken",
        "upstream_internal_redirect_failed_total",
        "upstream_internal_redirect_succeeded_total",
        "upstream_rq_0rtt",
        "upstream_rq_active_overflow",
        "upstream_rq_cancelled",
        "upstream_rq_completed",
        "upstream_rq_maintenance_mode",
        "upstream_rq_max_duration_reached",
        "upstream_rq_pending_failure_eject",
        "upstream_rq_pending_overflow",
        "upstream_rq_pending_total",
        "upstream_rq_per_try_idle_timeout",
        "upstream_rq_per_try_timeout",
        "upstream_rq_retry",
        "upstream_rq_retry_backoff_exponential",
        "upstream_rq_retry_backoff_ratelimited",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_success",
        "upstream_rq_rx_reset",
        "upstream_rq_timeout",
        "upstream_rq_total",
        "upstream_rq_tx_reset",
    )
    GAUGES = (
        "lb_subsets_active",
        "max_host_weight",
        "membership_degraded",
        "membership_excluded",
        "membership_healthy",
        "membership_total",
        "upstream_cx_active",
        "upstream_cx_rx_bytes_buffered",
        "upstream_cx_tx_bytes_buffered",
        "upstream_rq_active",
        "upstream_rq_pending_active",
        "version",
    )
    HISTOGRAMS = ("upstream_cx_connect_ms", "upstream_cx_length_ms")

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope)
        # Per-code stats, the class counters and upstream_rq_time appear on first use, as
        # in Envoy; each also has an ``external.`` twin (pyenvoy has no internal requests
        # unless internal_address_config says so, like Envoy 1.40).
        self._external = scope.scope("external")
        # ``responses.record(status, rq_time_ms)``: a response's per-code counters and the
        # request time histograms, in one call.
        self.responses = StatGroups(self._response_stats)

    def _response_stats(self, status: int) -> tuple[tuple[Counter, ...], tuple[Histogram, ...]]:
        scope = self.scope
        ext = self._external
        cls = f"upstream_rq_{status // 100}xx"
        return (
            (
                scope.counter(f"upstream_rq_{status}"),
                scope.counter(cls),
                ext.counter(f"upstream_rq_{status}"),
                ext.counter(cls),
                self.upstream_rq_completed,
                ext.counter("upstream_rq_completed"),
            ),
            (scope.histogram("upstream_rq_time"), ext.histogram("upstream_rq_time")),
        )


DEFAULT_CIRCUIT_BREAKERS = [("default", 1024, 1024, 1024, 3), ("high", 1024, 1024, 1024, 3)]


def _duration(d: Any, default: float) -> float:
    """google.protobuf.Duration -> seconds (default when unset)."""
    if d is None:
        return default
    return d.seconds + d.nanos / 1e9


# EDS health_status -> host health flag (Envoy: UNHEALTHY/TIMEOUT fail, DRAINING is
# excluded, DEGRADED is degraded). Flags host.py does not define yet fall back.
_EDS_DRAINING = getattr(host_module, "EDS_STATUS_DRAINING", FAILED_EDS_HEALTH)
_EDS_DEGRADED = getattr(host_module, "DEGRADED_EDS_HEALTH", 0)
_EDS_FLAGS = {2: FAILED_EDS_HEALTH, 3: _EDS_DRAINING, 4: _EDS_DEGRADED, 5: FAILED_EDS_HEALTH}
EDS_HEALTH_MASK = FAILED_EDS_HEALTH | _EDS_DRAINING | _EDS_DEGRADED
_EXCLUDED_FLAGS = PENDING_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL


class EndpointConfig(NamedTuple):
    """One configured lb_endpoint (before DNS resolution)."""

    address: str
    port: int
    weight: int
    priority: int
    locality: tuple[str, str, str]
    locality_weight: int
    hostname: str
    health_status: int = 0

    def host(self, address: tuple[str, int], info: ClusterInfo, hostname: str) -> Host:
        h = Host(address, info, hostname=hostname, weight=self.weight, priority=self.priority)
        h.locality = self.locality
        h.locality_weight = self.locality_weight
        if self.health_status:
            h.health_flags |= _EDS_FLAGS.get(self.health_status, 0)
        return h


def endpoints_from_assignment(la: Any, path: str, ip_only: bool) -> list[EndpointConfig]:
    """The lb_endpoints of a ClusterLoadAssignment (``ip_only``: addresses must be IPs, as
    for STATIC and EDS clusters). ConfigError names the field path."""
    out: list[EndpointConfig] = []
    for pi, locality in enumerate(la.endpoints):
        for ei, lbe in enumerate(locality.lb_endpoints):
            epath = f"{path}.endpoints[{pi}].lb_endpoints[{ei}]"
            if not lbe.HasField("endpoint"):
                raise ConfigError("only endpoint entries are supported", epath)
            sa = lbe.endpoint.address.socket_address
            if not lbe.endpoint.address.HasField("socket_address"):
                raise ConfigError("endpoint address must be a socket_address", epath)
            if sa.protocol != 0:
                raise ConfigError("only TCP endpoints are supported", f"{epath}.endpoint")
            if sa.WhichOneof("port_specifier") != "port_value":
                raise ConfigError("named ports are not supported", f"{epath}.endpoint")
            weight = lbe.load_balancing_weight.value if lbe.HasField("load_balancing_weight") else 1
            if ip_only:
                try:
                    socket.inet_pton(
                        socket.AF_INET6 if ":" in sa.address else socket.AF_INET, sa.address
                    )
                except OSError:
                    raise ConfigError(
                        f"malformed IP address: {sa.address}. Consider setting resolver_name or "
                        "setting cluster type to 'STRICT_DNS' or 'LOGICAL_DNS'",
                        f"{epath}.endpoint.address",
                    ) from None
            loc = locality.locality
            out.append(
                EndpointConfig(
                    sa.address,
                    sa.port_value,
                    weight,
                    locality.priority,
                    (loc.region, loc.zone, loc.sub_zone),
                    locality.load_balancing_weight.value
                    if locality.HasField("load_balancing_weight")
                    else 0,
                    lbe.endpoint.hostname,
                    lbe.health_status,
                )
            )
    return out


class EdsStats(SubscriptionStats):
    """``cluster.<name>.*`` stats of an EDS subscription."""

    COUNTERS: ClassVar[tuple[str, ...]] = SubscriptionStats.COUNTERS + (
        "assignment_stale",
        "assignment_timeout_received",
        "assignment_use_cached",
        "update_empty",
        "update_no_rebuild",
    )


class ClusterInfo:
    """Immutable settings of one cluster, compiled from its proto."""

    def __init__(self, proto: ClusterProto, stats_store: Scope, path: str) -> None:
        self.proto = proto
        self.name = proto.name
        self.path = path
        self.observability_name = proto.alt_stat_name or proto.name
        self.added_via_api = False
        self.version_info = ""
        self.last_updated = time.time()
        self.proto_hash = proto.SerializeToString(deterministic=True)
        self.connect_timeout = _duration(
            proto.connect_timeout if proto.HasField("connect_timeout") else None, 5.0
        )
        self.per_connection_buffer_limit_bytes = (
            proto.per_connection_buffer_limit_bytes.value
            if proto.HasField("per_connection_buffer_limit_bytes")
            else DEFAULT_BUFFER_LIMIT
        )
        self.stats = ClusterStats(stats_store.scope(f"cluster.{self.observability_name}"))
        self.max_requests_per_connection = 0
        self.idle_timeout = 3600.0
        self.upstream_http2 = False
        self._read_protocol_options(proto, path)
        # Circuit breakers: (priority, max_connections, max_pending_requests, max_requests,
        # max_retries) for /clusters (the first threshold of a priority wins, as in Envoy),
        # and their gauges as Envoy shows them from startup.
        by_prio = thresholds_by_priority(proto)
        self.circuit_breakers = []
        for prio, pname in enumerate(("default", "high")):
            lim = configured_limits(by_prio.get(prio))
            self.circuit_breakers.append(
                (
                    pname,
                    lim["max_connections"],
                    lim["max_pending_requests"],
                    lim["max_requests"],
                    lim["max_retries"],
                )
            )
        declare_circuit_breaker_stats(proto, self.stats.scope)

    def _read_protocol_options(self, proto: ClusterProto, path: str) -> None:
        if proto.HasField("max_requests_per_connection"):
            self.max_requests_per_connection = proto.max_requests_per_connection.value
        if proto.HasField("common_http_protocol_options"):
            self._common_options(proto.common_http_protocol_options)
        if proto.HasField("http2_protocol_options"):
            self.upstream_http2 = True
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        if key in proto.typed_extension_protocol_options:
            from pyenvoy.config import unpack_any

            opts = unpack_any(
                proto.typed_extension_protocol_options[key],
                f"{path}.typed_extension_protocol_options['{key}']",
            )
            if opts.HasField("common_http_protocol_options"):
                self._common_options(opts.common_http_protocol_options)
            if opts.HasField("explicit_http_config"):
                if opts.explicit_http_config.HasField("http2_protocol_options"):
                    self.upstream_http2 = True
                elif opts.explicit_http_config.HasField("http3_protocol_options"):
                    raise ConfigError(
                        "upstream HTTP/3 is not supported by pyenvoy",
                        f"{path}.typed_extension_protocol_options",
                    )
            elif opts.HasField("use_downstream_protocol_config") or opts.HasField("auto_config"):
                pass  # HTTP/1.1 upstream is what pyenvoy speaks today
        for k in proto.typed_extension_protocol_options:
            if k != key:
                raise ConfigError(
                    f"{k} is not supported by pyenvoy", f"{path}.typed_extension_protocol_options"
                )

    def _common_options(self, c: Any) -> None:
        if c.HasField("idle_timeout"):
            self.idle_timeout = _duration(c.idle_timeout, 3600.0)
        if c.HasField("max_requests_per_connection"):
            self.max_requests_per_connection = c.max_requests_per_connection.value


class Cluster:
    """The live side of a cluster: hosts, healthy hosts and the load balancer."""

    def __init__(self, info: ClusterInfo, path: str, xds: XdsManager | None = None) -> None:
        self.info = info
        proto = info.proto
        self.type = proto.DiscoveryType.Name(proto.type)
        if proto.HasField("cluster_type"):
            raise ConfigError(
                f"cluster_type {proto.cluster_type.name} is not supported by pyenvoy",
                f"{path}.cluster_type",
            )
        if self.type not in ("STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS"):
            raise ConfigError(
                f"cluster type {self.type} is not supported by pyenvoy yet", f"{path}.type"
            )
        self.lb_factory = LoadBalancerFactory(proto, path)
        self.lb_factory.bind_stats(info.stats.scope)
        self.dns_refresh_rate = _duration(
            proto.dns_refresh_rate if proto.HasField("dns_refresh_rate") else None, 5.0
        )
        self.dns_family = proto.DnsLookupFamily.Name(proto.dns_lookup_family)
        # (hostname, port, weight, priority) per configured endpoint
        self.endpoints: list[EndpointConfig] = []
        self.eds: FilesystemSubscription | None = None
        self.eds_service_name = ""
        self.eds_assignment: Any = None
        if self.type == "EDS":
            self._setup_eds(proto, path, xds)
        else:
            self.endpoints = endpoints_from_assignment(
                proto.load_assignment, f"{path}.load_assignment", self.type == "STATIC"
            )
        if self.type == "LOGICAL_DNS" and len(self.endpoints) != 1:
            raise ConfigError(
                "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
                f"{path}.load_assignment",
            )
        self.panic = True
        self.hosts: list[Host] = []
        self.healthy_hosts: list[Host] = []
        self.lb: LoadBalancer = self.lb_factory.build([])[0]
        self._bind_choose_host()
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._resolving: asyncio.Task[None] | None = None
        self.health_checker: Any = None
        # Outlier detector (or None): the router reports every upstream result to it.
        self.outlier: Any = None
        self.retired = False
        self._hc_started = False
        # DNS: the last answer per configured endpoint (None: none yet); the manager's
        # observer hears of changes (main process); remote_dns brings answers (worker).
        self.dns_resolved: list[list[str]] | None = None
        self.dns_hash = hashlib.sha256(info.proto_hash).hexdigest()[:16]
        self.dns_observer: Callable[[Cluster], None] | None = None
        self.remote_dns: RemoteDns | None = None
        self._dns_ready: asyncio.Future[None] | None = None
        if self.type == "STATIC":
            self.set_hosts([e.host((e.address, e.port), info, e.hostname) for e in self.endpoints])

    def _setup_eds(self, proto: Any, path: str, xds: XdsManager | None) -> None:
        from pyenvoy.config.xds import TYPE_CLA

        ecc = proto.eds_cluster_config
        epath = f"{path}.eds_cluster_config"
        if not ecc.HasField("eds_config"):
            raise ConfigError("EDS clusters need eds_cluster_config.eds_config", epath)
        if xds is None:
            raise ConfigError(
                "EDS needs a pyenvoy Server (filesystem subscriptions)", f"{epath}.eds_config"
            )
        self.eds_service_name = ecc.service_name or proto.name
        stats = EdsStats(self.info.stats.scope)
        self.eds = xds.subscribe(
            ecc.eds_config, TYPE_CLA, self.on_eds_update, stats, f"{epath}.eds_config"
        )

    def on_eds_update(self, resources: list[DecodedResource], version_info: str) -> None:
        """Apply a ClusterLoadAssignment (Envoy's checks and texts)."""
        if self.retired:
            return
        sub = self.eds
        if not resources:
            if sub is not None:
                sub.stats.update_empty.inc()  # type: ignore[attr-defined]
            return
        try:
            if len(resources) != 1:
                raise ConfigError(f"Unexpected EDS resource length: {len(resources)}")
            cla = resources[0].message
            if cla.cluster_name != self.eds_service_name:  # type: ignore[attr-defined]
                raise ConfigError(
                    f"Unexpected EDS cluster (expecting {self.eds_service_name}): {cla.cluster_name}"  # type: ignore[attr-defined]
                )
            endpoints = endpoints_from_assignment(cla, "resources[0]", True)
        except ConfigError as e:
            log.warning("eds: cluster '%s' config rejected: %s", self.info.name, e)
            raise
        self.eds_assignment = cla
        self.endpoints = endpoints
        self.set_hosts([e.host((e.address, e.port), self.info, e.hostname) for e in endpoints])

    # --- host set -------------------------------------------------------------------------
    def set_hosts(self, hosts: list[Host]) -> None:
        """Replace the host set, keeping Host objects (and their health) that stay."""
        old = {(h.address, h.hostname): h for h in self.hosts}
        new: list[Host] = []
        for h in hosts:
            keep = old.pop((h.address, h.hostname), None)
            if keep is not None:
                _update_host(keep, h)
                new.append(keep)
            else:
                new.append(h)
        for gone in old.values():
            pool = gone.http_pool
            if pool is not None:
                pool.drain()
        changed = [id(h) for h in new] != [id(h) for h in self.hosts]
        self.hosts = new
        if changed and self.health_checker is not None:
            self.health_checker.on_hosts_changed()
        if changed:
            self.info.stats.membership_change.inc()
        self.refresh_health()

    def refresh_health(self) -> None:
        """Recompute the healthy set and the load balancer (call after a health change)."""
        stats = self.info.stats
        self.lb, self.panic = self.lb_factory.build(self.hosts)
        self._bind_choose_host()
        self.healthy_hosts = self.lb.hosts
        stats.membership_total.set(len(self.hosts))
        stats.membership_healthy.set(len([h for h in self.hosts if not h.health_flags]))
        # Envoy's excluded hosts: pending their first active check or failed by an upstream's
        # x-envoy-immediate-health-check-fail (and EDS draining, which pyenvoy treats as failed).
        stats.membership_excluded.set(
            len([h for h in self.hosts if h.health_flags & _EXCLUDED_FLAGS])
        )
        stats.max_host_weight.set(max((h.weight for h in self.hosts), default=0))

    def _bind_choose_host(self) -> None:
        """``choose_host(context)``, the host for a request: the load balancer's own method
        (one call per request), or in panic one that first counts ``lb_healthy_panic``.
        Rebound whenever ``lb``/``panic`` change."""
        self.choose_host: Callable[[Any], Host | None] = (
            self._choose_host_in_panic if self.panic else self.lb.choose_host
        )

    def _choose_host_in_panic(self, context: Any = None) -> Host | None:
        self.info.stats.lb_healthy_panic.value += 1
        return self.lb.choose_host(context)

    def adopt_hosts(self, old: Cluster) -> None:
        """Carry over ``old``'s Host objects (health flags, stats) for hosts that stay; their
        pools are drained so new requests get pools with this cluster's settings."""
        by_key = {(h.address, h.hostname): h for h in old.hosts}
        new: list[Host] = []
        for h in self.hosts:
            keep = by_key.pop((h.address, h.hostname), None)
            if keep is None:
                new.append(h)
                continue
            _update_host(keep, h)
            keep.cluster = self.info
            pool = keep.http_pool
            if pool is not None:
                pool.drain()
                keep.http_pool = None
            new.append(keep)
        old.hosts = [h for h in old.hosts if (h.address, h.hostname) in by_key]
        self.hosts = new
        self.refresh_health()

    # --- DNS / EDS ----------------------------------------------------------------------
    async def initialize(self, start_health_checks: bool = True) -> None:
        """Warm the cluster: resolve DNS or read the first EDS answer; then start health
        checks and wait for every host's first check, as Envoy's cluster init does."""
        if self.type in ("STRICT_DNS", "LOGICAL_DNS"):
            if self.remote_dns is not None:
                await self._wait_remote_dns()
            else:
                await self._resolve()
                self._schedule_refresh()
        elif self.eds is not None and not self.eds.initialized:
            self.eds.start()
        if self.outlier is not None and not self.retired:
            self.outlier.start()
        if start_health_checks:
            self.start_health_checks()
            await self.health_checks_initialized()

    def start_health_checks(self) -> None:
        if self.health_checker is not None and not self.retired and not self._hc_started:
            self._hc_started = True
            self.health_checker.start()

    async def health_checks_initialized(self, timeout: float = 60.0) -> None:
        wait = getattr(self.health_checker, "wait_initialized", None)
        if wait is None or not self._hc_started:
            return
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            log.warning(
                "cluster %s: initial health checks did not complete in %.0fs",
                self.info.name,
                timeout,
            )
            self.health_checker.end_initialize_hold()

    def _schedule_refresh(self) -> None:
        if self.retired:
            return
        loop = asyncio.get_running_loop()
        self._refresh_handle = loop.call_later(self.dns_refresh_rate, self._refresh)

    def _refresh(self) -> None:
        async def run() -> None:
            try:
                await self._resolve()
            finally:
                self._schedule_refresh()

        self._resolving = asyncio.get_running_loop().create_task(run())

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        stats = self.info.stats
        resolved: list[list[str]] = []
        failed = False
        for ep in self.endpoints:
            name, port = ep.address, ep.port
            stats.update_attempt.inc()
            try:
                addrs = await self._lookup(loop, name, port)
            except OSError as e:
                log.warning("cluster %s: DNS resolution of %s failed: %s", self.info.name, name, e)
                stats.update_failure.inc()
                failed = True
                resolved.append([])
                continue
            stats.update_success.inc()
            if self.type == "LOGICAL_DNS":
                addrs = addrs[:1]
            resolved.append(addrs)
        if failed and not any(resolved) and self.hosts:
            return  # keep the last good answer
        if not self.retired:
            self.apply_resolution(resolved)

    def apply_resolution(self, resolved: list[list[str]]) -> None:
        """One home for a DNS answer, this process's lookup or the main process's
        (``RemoteDns``): the addresses of each configured endpoint, in order, become hosts."""
        hosts = [
            ep.host((a, ep.port), self.info, ep.hostname or ep.address)
            for ep, addrs in zip(self.endpoints, resolved, strict=False)
            for a in addrs
        ]
        changed = resolved != self.dns_resolved
        self.dns_resolved = resolved
        self.set_hosts(hosts)
        fut = self._dns_ready
        if fut is not None and not fut.done():
            fut.set_result(None)
        observer = self.dns_observer
        if changed and observer is not None:
            observer(self)

    async def _wait_remote_dns(self, timeout: float = 60.0) -> None:
        """A worker: warm once the main process's first answer for this cluster arrived."""
        remote = self.remote_dns
        if remote is None or self.retired:
            return
        remote.subscribe(self)
        if self.dns_resolved is not None or self.retired:
            return
        fut = self._dns_ready = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            log.warning(
                "cluster %s: no DNS answer from the main process in %.0fs",
                self.info.name,
                timeout,
            )

    async def _lookup(self, loop: asyncio.AbstractEventLoop, name: str, port: int) -> list[str]:
        fam = self.dns_family
        family = {"V4_ONLY": socket.AF_INET, "V6_ONLY": socket.AF_INET6}.get(fam, socket.AF_UNSPEC)
        infos = await loop.getaddrinfo(name, port, family=family, type=socket.SOCK_STREAM)
        v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
        v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
        if fam == "AUTO":  # Envoy: prefer IPv6, fall back to IPv4
            ordered = v6 or v4
        elif fam == "V4_PREFERRED":
            ordered = v4 or v6
        elif fam == "ALL":
            ordered = v4 + v6
        else:
            ordered = v4 + v6
        seen: list[str] = []
        for a in ordered:
            if a not in seen:
                seen.append(a)
        if not seen:
            raise OSError(f"no addresses for {name}")
        return seen

    def _stop_updates(self) -> None:
        self.retired = True
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        if self.remote_dns is not None:
            self.remote_dns.unsubscribe(self)
        fut = self._dns_ready
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self.health_checker is not None:
            self.health_checker.stop()
        if self.outlier is not None:
            self.outlier.stop()
        if self.eds is not None:
            self.eds.stop()

    def retire(self) -> None:
        """Removed or replaced: stop DNS/EDS/health checks; requests in flight finish."""
        self._stop_updates()
        for h in self.hosts:
            if h.http_pool is not None:
                h.http_pool.drain()

    def close(self) -> None:
        self._stop_updates()
        for h in self.hosts:
            if h.http_pool is not None:
                h.http_pool.close()


def _update_host(keep: Host, h: Host) -> None:
    """Copy what a new config says about a host onto the Host object that stays."""
    keep.weight = h.weight
    keep.priority = h.priority
    keep.locality = h.locality
    keep.locality_weight = h.locality_weight
    keep.health_flags = (keep.health_flags & ~EDS_HEALTH_MASK) | (h.health_flags & EDS_HEALTH_MASK)


class ClusterManagerStats(StatsStruct):
    COUNTERS = (
        "cluster_added",
        "cluster_modified",
        "cluster_removed",
        "cluster_updated",
        "cluster_updated_via_merge",
        "update_merge_cancelled",
        "update_out_of_merge_window",
    )
    GAUGES = ("active_clusters", "warming_clusters")


class ClusterManager:
    """All clusters of the server, by name (static, and added via CDS)."""

    def __init__(
        self,
        cluster_protos: Any,
        stats: Store,
        path: str = "static_resources.clusters",
        *,
        xds: XdsManager | None = None,
    ) -> None:
        self.stats_store = stats
        self.xds = xds
        self.stats = ClusterManagerStats(stats.scope("cluster_manager"))
        self.clusters: dict[str, Cluster] = {}
        # ``get(name)``: the active cluster of that name, or None. The dict's own method (one
        # C call per routed request); ``clusters`` is never rebound.
        self.get: Callable[[str], Cluster | None] = self.clusters.get
        self.warming: dict[str, Cluster] = {}
        # While a reload builds listeners: the cluster names the new config will have.
        self.staged_names: set[str] | None = None
        self.cds: FilesystemSubscription | None = None
        self.version_info = ""
        # Main process with workers: hears of active health changes (cluster None: clusters
        # came or went). Worker: the main process's health results (no checkers here).
        self.health_observer: Callable[[Cluster | None, Host | None, bool], None] | None = None
        self.remote_health: RemoteHealth | None = None
        # The same for DNS: hears of changed answers (None: clusters came or went) / brings
        # the main process's answers.
        self.dns_observer: Callable[[Cluster | None], None] | None = None
        self.remote_dns: RemoteDns | None = None
        # Worker: outlier detectors post their results to the main process's (no sweep here).
        self.remote_outlier: RemoteOutlier | None = None
        try:
            for i, proto in enumerate(cluster_protos):
                cpath = f"{path}[{i}]"
                if proto.name in self.clusters:
                    raise ConfigError(f"cluster manager: duplicate cluster '{proto.name}'", cpath)
                self.clusters[proto.name] = self.build_cluster(proto, cpath)
                self.stats.cluster_added.inc()
        except BaseException:
            for c in self.clusters.values():
                c.close()
            raise
        self.stats.active_clusters.set(len(self.clusters))

    def build_cluster(
        self, proto: Any, path: str, *, added_via_api: bool = False, version_info: str = ""
    ) -> Cluster:
        """Compile one cluster (not initialized, not in ``clusters``); ConfigError if bad."""
        info = ClusterInfo(proto, self.stats_store, path)
        # Circuit-breaker resource managers now, with the server's runtime: whoever asks first
        # (router, pool, tcp_proxy, admin) then gets the same, runtime-resolved limits.
        resource_managers(info, runtime_for_server(self.xds.server if self.xds is not None else None))
        info.added_via_api = added_via_api
        info.version_info = version_info
        cluster = Cluster(info, path, self.xds)
        cluster.dns_observer = self._on_dns
        cluster.remote_dns = self.remote_dns
        try:
            if len(proto.health_checks):
                from pyenvoy.upstream.health_check import make_health_checker

                hc = cluster.health_checker = make_health_checker(
                    cluster, proto.health_checks, f"{path}.health_checks"
                )
                hc.observer = self._on_health
                hc.remote = self.remote_health
            if proto.HasField("outlier_detection"):
                from pyenvoy.upstream.outlier_detection import make_outlier_detector

                # (ejections are health changes: they reach health_observer too)
                cluster.outlier = make_outlier_detector(
                    cluster,
                    proto.outlier_detection,
                    f"{path}.outlier_detection",
                    remote=self.remote_outlier,
                    observer=self._on_health,
                )
        except BaseException:
            cluster.close()
            raise
        return cluster

    # --- active health across processes ----------------------------------------------------
    def _on_health(self, cluster: Cluster | None, host: Host | None, passed: bool) -> None:
        observer = self.health_observer
        if observer is not None:
            observer(cluster, host, passed)

    def use_remote_health(self, remote: RemoteHealth) -> None:
        """A worker process: health checks run in the main process and ``remote`` brings
        their results; this manager's checkers never start. Call before ``initialize``."""
        self.remote_health = remote
        for c in (*self.clusters.values(), *self.warming.values()):
            if c.health_checker is not None:
                c.health_checker.remote = remote

    def use_remote_outlier(self, remote: RemoteOutlier) -> None:
        """A worker process: outlier detection runs in the main process; every detector here
        posts its results to ``remote`` and takes the main process's ejections. Call
        before ``initialize``."""
        from pyenvoy.upstream.outlier_detection import RemoteOutlierDetector

        self.remote_outlier = remote
        for c in (*self.clusters.values(), *self.warming.values()):
            if c.outlier is not None:
                c.outlier = RemoteOutlierDetector(c, remote)

    def health_state(self, names: Iterable[str] | None = None) -> dict[str, ClusterHealth]:
        """Active health of every health-checked cluster (or of those in ``names``): the
        active cluster of a name, else a new one warming with its checks started; with
        whether its first round is done (or its init stopped waiting for it)."""
        out: dict[str, ClusterHealth] = {}
        if names is None:
            names = self.clusters.keys() | self.warming.keys()
        for name in names:
            c = self.clusters.get(name)
            if c is None:
                c = self.warming.get(name)
            hc = c.health_checker if c is not None else None
            if c is None or hc is None or not c._hc_started:
                continue
            out[name] = (
                hc.initialized,
                {h.address: h.health_flags & ACTIVE_HC_FLAGS for h in c.hosts},
            )
        return out

    # --- DNS across processes ----------------------------------------------------------------
    def _on_dns(self, cluster: Cluster | None) -> None:
        observer = self.dns_observer
        if observer is not None:
            observer(cluster)

    def use_remote_dns(self, remote: RemoteDns) -> None:
        """A worker process: DNS clusters take the main process's answers from ``remote``
        and never resolve here. Call before ``initialize``."""
        self.remote_dns = remote
        for c in (*self.clusters.values(), *self.warming.values()):
            c.remote_dns = remote

    def dns_state(self) -> dict[str, dict[str, list[list[Any]]]]:
        """The current answer of every DNS cluster that has one (active and warming):
        ``{name: {config digest: [[hostname, port, [address, ...]], ...]}}``."""
        out: dict[str, dict[str, list[list[Any]]]] = {}
        for c in (*self.clusters.values(), *self.warming.values()):
            resolved = c.dns_resolved
            if resolved is None or c.retired:
                continue
            out.setdefault(c.info.name, {})[c.dns_hash] = [
                [ep.address, ep.port, list(addrs)]
                for ep, addrs in zip(c.endpoints, resolved, strict=False)
            ]
        return out

    def has_cluster(self, name: str) -> bool:
        staged = self.staged_names
        if staged is not None:
            return name in staged
        return name in self.clusters

    async def initialize(self) -> None:
        """Resolve DNS clusters and start health checks (before listeners open)."""
        await asyncio.gather(*(c.initialize() for c in self.clusters.values()))

    def http_conn_pool(self, host: Host) -> Any:
        pool = host.http_pool
        if pool is None:
            from pyenvoy.upstream.conn_pool import Http1ConnPool

            pool = host.http_pool = Http1ConnPool(host, host.cluster)  # type: ignore[arg-type]
        return pool

    def close(self) -> None:
        if self.cds is not None:
            self.cds.stop()
        for c in list(self.clusters.values()) + list(self.warming.values()):
            c.close()

    # --- changes -------------------------------------------------------------------------
    async def warm(self, clusters: list[Cluster]) -> None:
        """Initialize new clusters (DNS, first EDS answer) while the old ones serve."""
        for c in clusters:
            self.warming[c.info.name] = c
        self.stats.warming_clusters.set(len(self.warming))
        try:
            # A new cluster also waits for its first health checks; a changed one starts
            # checking when it takes over the old one's hosts (commit), keeping their health.
            await asyncio.gather(
                *(
                    c.initialize(start_health_checks=c.info.name not in self.clusters)
                    for c in clusters
                )
            )
        finally:
            for c in clusters:
                if self.warming.get(c.info.name) is c:
                    del self.warming[c.info.name]
            self.stats.warming_clusters.set(len(self.warming))
            self._on_dns(None)

    def commit(self, cluster: Cluster) -> None:
        """Make a warmed cluster active, replacing (and retiring) the one of that name."""
        name = cluster.info.name
        old = self.clusters.get(name)
        cluster.info.last_updated = time.time()
        if old is not None:
            cluster.adopt_hosts(old)
            self.stats.cluster_modified.inc()
        else:
            self.stats.cluster_added.inc()
        self.clusters[name] = cluster
        if old is not None:
            old.retire()
        cluster.start_health_checks()
        self.stats.active_clusters.set(len(self.clusters))
        self._on_health(None, None, False)
        self._on_dns(None)

    def remove(self, name: str) -> None:
        cluster = self.clusters.pop(name, None)
        if cluster is None:
            return
        cluster.retire()
        self.stats.cluster_removed.inc()
        self.stats.active_clusters.set(len(self.clusters))
        self._on_health(None, None, False)
        self._on_dns(None)

    def build_static_changes(
        self, protos: Any, path: str = "static_resources.clusters"
    ) -> tuple[list[Cluster], list[str], set[str]]:
        """For a reload: (built clusters for new/changed static protos, names of static
        clusters to remove, every cluster name of the resulting config). Nothing changes
        here; ConfigError if a cluster is bad (clusters built so far are closed)."""
        built: list[Cluster] = []
        seen: set[str] = set()
        try:
            for i, proto in enumerate(protos):
                cpath = f"{path}[{i}]"
                if proto.name in seen:
                    raise ConfigError(f"cluster manager: duplicate cluster '{proto.name}'", cpath)
                seen.add(proto.name)
                old = self.clusters.get(proto.name)
                if (
                    old is not None
                    and not old.info.added_via_api
                    and old.info.proto_hash == proto.SerializeToString(deterministic=True)
                ):
                    continue
                built.append(self.build_cluster(proto, cpath))
        except BaseException:
            for c in built:
                c.close()
            raise
        removed = [
            n for n, c in self.clusters.items() if not c.info.added_via_api and n not in seen
        ]
        names = (set(self.clusters) - set(removed)) | seen
        return built, removed, names

    # --- CDS ---------------------------------------------------------------------------------
    def subscribe_cds(
        self, config_source: Any, server: Any, path: str = "dynamic_resources.cds_config"
    ) -> None:
        from pyenvoy.config.xds import TYPE_CLUSTER

        assert self.xds is not None
        stats = CdsStats(self.stats_store.scope("cluster_manager.cds"))
        self._server = server
        self.cds = self.xds.subscribe(config_source, TYPE_CLUSTER, self.on_cds_update, stats, path)

    async def start_cds(self) -> None:
        if self.cds is not None:
            await self.cds.start_async()

    async def on_cds_update(self, resources: list[DecodedResource], version_info: str) -> None:
        lock = getattr(getattr(self, "_server", None), "config_lock", None)
        if lock is not None:
            async with lock:
                await self._apply_cds(resources, version_info)
        else:
            await self._apply_cds(resources, version_info)

    async def _apply_cds(self, resources: list[DecodedResource], version_info: str) -> None:
        """A state-of-the-world CDS response, with Envoy's per-cluster semantics: bad clusters
        are rejected, the others apply; clusters no longer listed are removed."""
        wanted: dict[str, DecodedResource] = {}
        for r in resources:
            name = r.message.name  # type: ignore[attr-defined]
            if name in wanted:
                raise ConfigError(
                    f"duplicate cluster {name} found", f"resources[{r.position}].name"
                )
            wanted[name] = r
        removed = [n for n, c in self.clusters.items() if c.info.added_via_api and n not in wanted]
        log.info(
            "cds: response indicates %d added/updated cluster(s), %d removed cluster(s); applying changes",
            len(wanted),
            len(removed),
        )
        for name in removed:
            self.remove(name)
        errors: list[str] = []
        built: list[Cluster] = []
        skipped = 0
        for name, r in wanted.items():
            proto = r.message
            existing = self.clusters.get(name)
            if existing is not None and not existing.info.added_via_api:
                skipped += 1
                continue  # a static cluster of that name wins
            if existing is not None and existing.info.proto_hash == proto.SerializeToString(
                deterministic=True
            ):
                skipped += 1
                continue
            try:
                cluster = self.build_cluster(
                    proto, f"resources[{r.position}]", added_via_api=True, version_info=version_info
                )
            except ConfigError as e:
                log.warning("cds: cluster '%s' config rejected: %s", name, e)
                errors.append(f"{name}: {e}")
                continue
            built.append(cluster)
        await self.warm(built)
        for cluster in built:
            self.commit(cluster)
        s = self.cds.stats if self.cds is not None else None
        if s is not None:
            s.config_reload.inc()  # type: ignore[attr-defined]
            s.config_reload_time_ms.set(int(time.time() * 1000))  # type: ignore[attr-defined]
        log.info(
            "cds: added/updated %d cluster(s) (skipped %d unmodified cluster(s)); removed %d cluster(s)",
            len(built),
            skipped,
            len(removed),
        )
        if errors:
            raise ConfigError("Error adding/updating cluster(s) " + ", ".join(errors))
        self.version_info = version_info


class CdsStats(SubscriptionStats):
    COUNTERS: ClassVar[tuple[str, ...]] = SubscriptionStats.COUNTERS + ("config_reload",)
    GAUGES: ClassVar[tuple[str, ...]] = SubscriptionStats.GAUGES + ("config_reload_time_ms",)


# --- sharing DNS answers with worker processes ------------------------------------------------

DNS_HOSTS_OP = "dns_hosts"


def encode_dns(clusters: dict[str, dict[str, list[list[Any]]]]) -> dict[str, Any]:
    """The control-socket message (JSON), always the whole state: ``{"op": "dns_hosts",
    "clusters": {name: {config digest: [[hostname, port, [address, ...]], ...]}}}``, one
    entry per configured endpoint of the cluster, in order."""
    return {"op": DNS_HOSTS_OP, "clusters": clusters}


class RemoteDns:
    """A worker's copy of the main process's DNS answers; each update goes to this
    process's DNS clusters of that name and config (``Cluster.apply_resolution``)."""

    def __init__(self) -> None:
        self.clusters: dict[str, dict[str, list[list[Any]]]] = {}
        self._subscribers: dict[str, list[Cluster]] = {}

    def subscribe(self, cluster: Cluster) -> None:
        subs = self._subscribers.setdefault(cluster.info.name, [])
        if cluster not in subs:
            subs.append(cluster)
        self._apply(cluster)

    def unsubscribe(self, cluster: Cluster) -> None:
        name = cluster.info.name
        subs = self._subscribers.get(name)
        if subs is not None and cluster in subs:
            subs.remove(cluster)
            if not subs:
                del self._subscribers[name]

    def update(self, msg: dict[str, Any]) -> None:
        """Apply one ``encode_dns`` message."""
        self.clusters = {
            str(name): {str(digest): list(eps) for digest, eps in by_digest.items()}
            for name, by_digest in (msg.get("clusters") or {}).items()
        }
        for subs in list(self._subscribers.values()):
            for cluster in list(subs):
                self._apply(cluster)

    def _apply(self, cluster: Cluster) -> None:
        eps = self.clusters.get(cluster.info.name, {}).get(cluster.dns_hash)
        if eps is None or len(eps) != len(cluster.endpoints) or cluster.retired:
            return
        resolved = [[str(a) for a in addrs] for _, _, addrs in eps]
        if resolved != cluster.dns_resolved:
            cluster.apply_resolution(resolved)


class DnsPublisher:
    """The main process's side: sends the DNS state of its cluster manager through ``send``
    whenever a cluster's answer changed or clusters came or went (batched per loop
    iteration, only if it differs from what was sent)."""

    def __init__(self, cluster_manager: ClusterManager, send: Callable[[dict[str, Any]], None]):
        self.cm = cluster_manager
        self.send = send
        self.sent: dict[str, dict[str, list[list[Any]]]] = {}
        self._handle: asyncio.Handle | None = None
        cluster_manager.dns_observer = self.on_change

    def close(self) -> None:
        if self.cm.dns_observer == self.on_change:
            self.cm.dns_observer = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def on_change(self, cluster: Cluster | None) -> None:
        if self._handle is not None:
            return
        try:
            self._handle = asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        state = self.cm.dns_state()
        if state != self.sent:
            self.sent = state
            self.send(encode_dns(state))

    def snapshot(self) -> dict[str, Any]:
        """The whole current state, for a worker that starts (after a flush to the others)."""
        self.flush()
        return encode_dns(self.sent)
