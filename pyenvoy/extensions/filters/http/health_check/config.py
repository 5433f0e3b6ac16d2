"""health_check configuration: the HealthCheck proto, validated once into HealthCheckConfig.

Strategy: the factory compiles the ``headers`` matchers into closures, turns
``cluster_min_healthy_percentages`` into a sorted tuple (Envoy iterates a std::map, so by
name), and for ``cache_time`` builds one shared HealthCheckCache. Envoy's cache is cleared
by a timer every ``cache_time``; here the same periods are computed from the monotonic
clock (a response cached in period N is used until period N ends), so there is no timer.
Stats are Envoy's ``http.<HCM stat_prefix>.health_check.*``; the prefix comes from the
connection manager through ``ctx.extra`` (see ``_stats_prefix``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.extensions.filters.http.health_check.matcher import (
    HeaderPredicate,
    compile_header_matcher,
)
from pyenvoy.stats import Counter, StatsStruct, Store

if TYPE_CHECKING:
    from pyenvoy.extensions.registry import FactoryContext

# Response code details (Envoy's RcDetails in health_check.cc).
HEALTH_CHECK_OK = "health_check_ok"
HEALTH_CHECK_FAILED = "health_check_failed"
HEALTH_CHECK_CACHED = "health_check_cached"
HEALTH_CHECK_NO_CLUSTER = "health_check_failed_no_cluster_found"
HEALTH_CHECK_CLUSTER_EMPTY = "health_check_failed_cluster_empty"
HEALTH_CHECK_CLUSTER_HEALTHY = "health_check_ok_cluster_healthy"
HEALTH_CHECK_CLUSTER_UNHEALTHY = "health_check_failed_cluster_unhealthy"


class HealthCheckStats(StatsStruct):
    """``<stats_prefix>health_check.*`` (Envoy's ALL_HEALTH_CHECK_FILTER_STATS)."""

    request_total: Counter
    failed: Counter
    ok: Counter
    cached_response: Counter
    failed_cluster_not_found: Counter
    failed_cluster_empty: Counter
    failed_cluster_unhealthy: Counter
    degraded: Counter

    COUNTERS = (
        "request_total",
        "failed",
        "ok",
        "cached_response",
        "failed_cluster_not_found",
        "failed_cluster_empty",
        "failed_cluster_unhealthy",
        "degraded",
    )


class HealthCheckCache:
    """The last health check response, reused until the current ``cache_time`` period ends."""

    __slots__ = ("period", "epoch", "cached_period", "status", "degraded")

    def __init__(self, period: float) -> None:
        self.period = period
        self.epoch = time.monotonic()
        self.cached_period = -1
        self.status = 200
        self.degraded = False

    def _now_period(self) -> int:
        return int((time.monotonic() - self.epoch) / self.period)

    def use_cached(self) -> bool:
        return self.cached_period == self._now_period()

    def set(self, status: int, degraded: bool) -> None:
        self.status = status
        self.degraded = degraded
        self.cached_period = self._now_period()


def _field(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _stats_prefix(ctx: FactoryContext) -> str:
    """Envoy passes HTTP filter factories ``http.<hcm stat_prefix>.``: taken from
    ``ctx.extra["stats_prefix"]``, else from the HCM config in ``ctx.extra["hcm"]`` (or a
    raw ``ctx.extra["stat_prefix"]``); with none of them the stats live at the root."""
    extra = ctx.extra
    prefix = extra.get("stats_prefix")
    if prefix is not None:
        return str(prefix)
    sp = extra.get("stat_prefix")
    if sp is None:
        sp = getattr(extra.get("hcm"), "stat_prefix", None)
    return f"http.{sp}." if sp is not None else ""


class HealthCheckConfig:
    __slots__ = (
        "pass_through",
        "matchers",
        "cache",
        "min_healthy",
        "stats",
        "server",
        "cluster_manager",
    )

    def __init__(self, proto: Any, ctx: FactoryContext) -> None:
        path = ctx.path
        if not proto.HasField("pass_through_mode"):
            raise ConfigError(
                "Proto constraint validation failed (HealthCheckValidationError.PassThroughMode: "
                "value is required)",
                _field(path, "pass_through_mode"),
            )
        self.pass_through: bool = proto.pass_through_mode.value

        self.cache: HealthCheckCache | None = None
        if proto.HasField("cache_time"):
            period = proto.cache_time.seconds + proto.cache_time.nanos / 1e9
            ms = int(period * 1000)
            if ms > 0:
                if not self.pass_through:
                    # Envoy's own text (sic).
                    raise ConfigError(
                        "cache_time_ms must not be set when path_through_mode is disabled",
                        _field(path, "cache_time"),
                    )
                self.cache = HealthCheckCache(ms / 1000.0)

        mins: list[tuple[str, int]] = []
        for name in sorted(proto.cluster_min_healthy_percentages):
            pct = proto.cluster_min_healthy_percentages[name].value
            if not 0.0 <= pct <= 100.0:
                raise ConfigError(
                    "Proto constraint validation failed (HealthCheckValidationError."
                    f"ClusterMinHealthyPercentages[{name}]: embedded message failed validation | "
                    "caused by PercentValidationError.Value: value must be inside range [0, 100])",
                    f"{_field(path, 'cluster_min_healthy_percentages')}['{name}']",
                )
            mins.append((name, int(pct)))  # Envoy truncates to an integer percentage
        self.min_healthy: tuple[tuple[str, int], ...] = tuple(mins)

        self.matchers: tuple[HeaderPredicate, ...] = tuple(
            compile_header_matcher(hm, f"{_field(path, 'headers')}[{i}]")
            for i, hm in enumerate(proto.headers)
        )

        root = ctx.stats if ctx.stats is not None else Store()
        prefix = _stats_prefix(ctx)
        self.stats = HealthCheckStats(root.scope(f"{prefix}health_check"))
        self.server = ctx.server
        self.cluster_manager = ctx.cluster_manager

    def matches(self, headers: Any) -> bool:
        """All matchers must match (no matchers: every request is a health check, as in Envoy)."""
        for m in self.matchers:
            if not m(headers):
                return False
        return True

    def check_clusters(self) -> tuple[int, str]:
        """``cluster_min_healthy_percentages``: (status, details), counting the failure stats."""
        cm = self.cluster_manager
        stats = self.stats
        details = HEALTH_CHECK_OK
        for name, pct in self.min_healthy:
            details = HEALTH_CHECK_CLUSTER_HEALTHY
            cluster = cm.get(name) if cm is not None else None
            if cluster is None:
                stats.failed_cluster_not_found.inc()
                return 503, HEALTH_CHECK_NO_CLUSTER
            cstats = cluster.info.stats
            total = cstats.membership_total.value
            if total == 0:
                if pct == 0:
                    continue
                stats.failed_cluster_empty.inc()
                return 503, HEALTH_CHECK_CLUSTER_EMPTY
            available = cstats.membership_healthy.value
            degraded = getattr(cstats, "membership_degraded", None)
            if degraded is not None:
                available += degraded.value
            if 100 * available < total * pct:
                stats.failed_cluster_unhealthy.inc()
                return 503, HEALTH_CHECK_CLUSTER_UNHEALTHY
        return 200, details
