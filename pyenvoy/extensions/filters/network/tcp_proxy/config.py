"""tcp_proxy configuration: the TcpProxy proto, validated once into a shared TcpProxyConfig.

Strategy: the factory reads every field of
``envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`` exactly once. Fields pyenvoy
implements become plain slotted attributes (seconds as floats, the weighted-cluster table
as a cumulative list for one ``bisect`` per connection); fields that would change
behaviour but are not implemented (``on_demand``, ``tunneling_config``, ``metadata_match``,
non-immediate ``upstream_connect_mode``) are a ConfigError naming the field; fields with
no observable effect in pyenvoy today (periodic ``access_log`` flushing) are accepted with
a log line. ``hash_policy`` (``source_ip``) compiles into the HashPolicy a ring_hash or
maglev cluster hashes each connection with (``TcpProxyFilter.compute_hash``). Stats are
Envoy's ``tcp.<stat_prefix>.*``, bound here, so a connection only ever does
``stats.x.value += n``.

Like Envoy, an unknown cluster name is *not* a config error: each connection looks the
cluster up again and an unknown one counts ``downstream_cx_no_route`` and closes.
"""

from __future__ import annotations

import bisect
import logging
import random
from typing import TYPE_CHECKING, Any

from pyenvoy import runtime as runtime_mod
from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import Counter, Gauge, StatsStruct, Store
from pyenvoy.upstream.hash_policy import compile_network_hash_policy

if TYPE_CHECKING:
    from pyenvoy.extensions.registry import FactoryContext

log = logging.getLogger("pyenvoy.tcp_proxy")

DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy: 1h when idle_timeout is unset, disabled when 0s


class TcpProxyStats(StatsStruct):
    """``tcp.<stat_prefix>.*`` (Envoy's ALL_TCP_PROXY_STATS)."""

    downstream_cx_drain_close: Counter
    downstream_cx_no_route: Counter
    downstream_cx_overload_close: Counter
    downstream_cx_rx_bytes_total: Counter
    downstream_cx_total: Counter
    downstream_cx_tx_bytes_total: Counter
    downstream_flow_control_paused_reading_total: Counter
    downstream_flow_control_resumed_reading_total: Counter
    early_data_received_count_total: Counter
    idle_timeout: Counter
    max_downstream_connection_duration: Counter
    route_delayed_total: Counter
    upstream_flush_total: Counter
    downstream_cx_rx_bytes_buffered: Gauge
    downstream_cx_tx_bytes_buffered: Gauge
    upstream_flush_active: Gauge

    COUNTERS = (
        "downstream_cx_drain_close",
        "downstream_cx_no_route",
        "downstream_cx_overload_close",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_total",
        "downstream_cx_tx_bytes_total",
        "downstream_flow_control_paused_reading_total",
        "downstream_flow_control_resumed_reading_total",
        "early_data_received_count_total",
        "idle_timeout",
        "max_downstream_connection_duration",
        "route_delayed_total",
        "upstream_flush_total",
    )
    GAUGES = (
        "downstream_cx_rx_bytes_buffered",
        "downstream_cx_tx_bytes_buffered",
        "upstream_flush_active",
    )


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def _field(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class TcpProxyConfig:
    """Everything a TcpProxyFilter needs, shared by all its connections."""

    __slots__ = (
        "stat_prefix",
        "cluster_name",
        "weighted_names",
        "weighted_cumulative",
        "weighted_total",
        "idle_timeout",
        "max_connect_attempts",
        "backoff_base",
        "backoff_max",
        "max_downstream_connection_duration",
        "max_duration_jitter",
        "stats",
        "cluster_manager",
        "runtime",
        "access_logs",
        "hash_policy",
    )

    def __init__(self, proto: Any, ctx: FactoryContext) -> None:
        path = ctx.path
        if not proto.stat_prefix:
            raise ConfigError(
                "stat_prefix: value length must be at least 1 characters",
                _field(path, "stat_prefix"),
            )
        self.stat_prefix: str = proto.stat_prefix

        self.cluster_name = ""
        self.weighted_names: tuple[str, ...] = ()
        self.weighted_cumulative: tuple[int, ...] = ()
        self.weighted_total = 0
        which = proto.WhichOneof("cluster_specifier")
        if which == "cluster":
            self.cluster_name = proto.cluster
        elif which == "weighted_clusters":
            wpath = _field(path, "weighted_clusters.clusters")
            entries = proto.weighted_clusters.clusters
            if not entries:
                raise ConfigError("value must contain at least 1 item(s)", wpath)
            names: list[str] = []
            cumulative: list[int] = []
            total = 0
            for i, cw in enumerate(entries):
                if not cw.name:
                    raise ConfigError(
                        "name: value length must be at least 1 characters", f"{wpath}[{i}].name"
                    )
                if cw.weight < 1:
                    raise ConfigError(
                        "weight: value must be greater than or equal to 1", f"{wpath}[{i}].weight"
                    )
                if cw.HasField("metadata_match"):
                    raise ConfigError(
                        "metadata_match (subset load balancing) is not supported by pyenvoy",
                        f"{wpath}[{i}].metadata_match",
                    )
                total += cw.weight
                names.append(cw.name)
                cumulative.append(total)
            self.weighted_names = tuple(names)
            self.weighted_cumulative = tuple(cumulative)
            self.weighted_total = total
        else:
            raise ConfigError(
                "value is required: one of cluster or weighted_clusters must be set",
                _field(path, "cluster_specifier"),
            )

        # Behaviour-changing features pyenvoy does not implement: refuse, never ignore.
        if proto.HasField("on_demand"):
            raise ConfigError(
                "on_demand cluster discovery (ODCDS) is not supported by pyenvoy's tcp_proxy",
                _field(path, "on_demand"),
            )
        if proto.HasField("tunneling_config"):
            raise ConfigError(
                "tunneling_config (TCP over HTTP CONNECT/POST) is not supported by pyenvoy's tcp_proxy",
                _field(path, "tunneling_config"),
            )
        if proto.HasField("metadata_match"):
            raise ConfigError(
                "metadata_match (subset load balancing) is not supported by pyenvoy",
                _field(path, "metadata_match"),
            )
        if proto.upstream_connect_mode != 0:
            mode = (
                proto.DESCRIPTOR.fields_by_name["upstream_connect_mode"]
                .enum_type.values_by_number[proto.upstream_connect_mode]
                .name
            )
            raise ConfigError(
                f"upstream_connect_mode {mode} is not supported by pyenvoy's tcp_proxy (only IMMEDIATE)",
                _field(path, "upstream_connect_mode"),
            )
        if proto.HasField("max_early_data_bytes"):
            raise ConfigError(
                "max_early_data_bytes is not supported by pyenvoy's tcp_proxy",
                _field(path, "max_early_data_bytes"),
            )

        if proto.HasField("idle_timeout"):
            self.idle_timeout = _seconds(proto.idle_timeout)  # 0 disables
        else:
            self.idle_timeout = DEFAULT_IDLE_TIMEOUT

        self.max_connect_attempts = 1
        if proto.HasField("max_connect_attempts"):
            if proto.max_connect_attempts.value < 1:
                raise ConfigError(
                    "value must be greater than or equal to 1", _field(path, "max_connect_attempts")
                )
            self.max_connect_attempts = proto.max_connect_attempts.value

        self.backoff_base = 0.0
        self.backoff_max = 0.0
        if proto.HasField("backoff_options"):
            bo = proto.backoff_options
            bpath = _field(path, "backoff_options")
            if not bo.HasField("base_interval") or _seconds(bo.base_interval) < 0.001:
                raise ConfigError(
                    "base_interval: value must be greater than or equal to 1ms",
                    f"{bpath}.base_interval",
                )
            self.backoff_base = _seconds(bo.base_interval)
            self.backoff_max = (
                _seconds(bo.max_interval) if bo.HasField("max_interval") else 10 * self.backoff_base
            )
            if self.backoff_max < self.backoff_base:
                raise ConfigError(
                    "max_interval must be greater than or equal to base_interval",
                    f"{bpath}.max_interval",
                )

        self.max_downstream_connection_duration = 0.0
        self.max_duration_jitter = 0.0
        if proto.HasField("max_downstream_connection_duration"):
            d = _seconds(proto.max_downstream_connection_duration)
            if d < 0.001:
                raise ConfigError(
                    "value must be greater than or equal to 1ms",
                    _field(path, "max_downstream_connection_duration"),
                )
            self.max_downstream_connection_duration = d
            if proto.HasField("max_downstream_connection_duration_jitter_percentage"):
                pct = proto.max_downstream_connection_duration_jitter_percentage.value
                if not 0.0 <= pct <= 100.0:
                    raise ConfigError(
                        "value must be inside range [0, 100]",
                        _field(path, "max_downstream_connection_duration_jitter_percentage"),
                    )
                self.max_duration_jitter = pct / 100.0

        # Access logs: one line per TCP session, written when the downstream closes.
        self.access_logs: list[Any] = []
        if len(proto.access_log):
            from pyenvoy.access_log import build_access_logs

            self.access_logs = build_access_logs(proto.access_log, _field(path, "access_log"))
        if proto.HasField("access_log_options") or proto.HasField("access_log_flush_interval"):
            log.warning(
                "%s: tcp_proxy periodic access logging is not supported; lines are written at close",
                _field(path, "access_log_options"),
            )
        # hash_policy: the hash a ring_hash / maglev cluster picks the host by (source_ip).
        self.hash_policy = compile_network_hash_policy(
            proto.hash_policy, _field(path, "hash_policy")
        )
        # downstream_idle_timeout / upstream_idle_timeout are [#not-implemented-hide:] in Envoy
        # itself; proxy_protocol_tlvs only matter with an upstream PROXY protocol transport socket.

        scope = ctx.stats if ctx.stats is not None else Store()
        self.stats = TcpProxyStats(scope.scope(f"tcp.{self.stat_prefix}"))
        self.cluster_manager = ctx.cluster_manager
        # The runtime the clusters' circuit breakers read (as the router's).
        self.runtime = runtime_mod.for_server(ctx.server)

    def pick_cluster(self) -> str:
        """The cluster for one connection (attempt): fixed, or by weight."""
        total = self.weighted_total
        if not total:
            return self.cluster_name
        return self.weighted_names[
            bisect.bisect_right(self.weighted_cumulative, random.randrange(total))
        ]

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait before retry number ``failures`` (Envoy's jittered exponential backoff)."""
        base = self.backoff_base
        if not base:
            return 0.0
        ceiling = min(base * (1 << min(failures, 30)), self.backoff_max)
        return random.uniform(0.0, ceiling)

    def max_duration(self) -> float:
        d = self.max_downstream_connection_duration
        if d and self.max_duration_jitter:
            d += random.uniform(0.0, d * self.max_duration_jitter)
        return d
