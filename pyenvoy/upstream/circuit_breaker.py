"""Circuit breakers: Envoy's per-cluster, per-priority ResourceManager.

Strategy: a cluster has one ResourceManager per routing priority (``default`` and
``high``), built once from ``circuit_breakers.thresholds``. Each limited resource
(connections, pending requests, requests, retries, connection pools) is a slotted
``Resource`` holding a plain ``current`` count and its ``limit``; the connection pool and
the router do ``can_create()``/``inc()``/``dec()`` and nothing else. The
``circuit_breakers.<priority>.<x>_open`` gauge is 1 exactly while ``current >= limit``
(Envoy sets it after every change), and the ``remaining_*`` gauges exist only with
``track_remaining`` (as in Envoy). Limits may be overridden by the runtime keys
``circuit_breakers.<cluster>.<priority>.max_*``: static layers are folded in at build time;
only when the bootstrap has an admin layer is the runtime consulted on each check.

Retries use a budget when ``retry_budget`` is set: the limit is then
``max(min_retry_concurrency, budget_percent% of (active + pending requests))``.

The pool finds its cluster's managers with ``resource_managers(info)``: built on first
use and cached on the ClusterInfo (the cluster manager may build them eagerly instead, so
the gauges exist from startup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyenvoy.runtime import Runtime
    from pyenvoy.stats import Gauge, Scope

__all__ = [
    "Resource",
    "RetryBudget",
    "ResourceManager",
    "ResourceManagers",
    "resource_managers",
    "DEFAULT_PRIORITY",
    "HIGH_PRIORITY",
    "UNLIMITED",
]

DEFAULT_PRIORITY = 0
HIGH_PRIORITY = 1
PRIORITY_NAMES = ("default", "high")
UNLIMITED = 2**64 - 1  # Envoy's max uint64 (max_connection_pools default)

_DEFAULTS = {
    "max_connections": 1024,
    "max_pending_requests": 1024,
    "max_requests": 1024,
    "max_retries": 3,
    "max_connection_pools": UNLIMITED,
}


class Resource:
    """One limited resource (Envoy's ResourceImpl)."""

    __slots__ = (
        "current",
        "limit",
        "fast_limit",
        "configured",
        "open_gauge",
        "remaining",
        "runtime",
        "key",
    )

    def __init__(
        self,
        limit: int,
        open_gauge: Gauge,
        remaining: Gauge | None = None,
        runtime: Runtime | None = None,
        key: str = "",
    ) -> None:
        self.current = 0
        self.configured = limit
        self.open_gauge = open_gauge
        self.remaining = remaining
        # Only an admin layer can change a limit after startup; static layers apply now.
        self.runtime = runtime if runtime is not None and runtime.dynamic else None
        self.key = key
        self.limit = runtime.get_integer(key, limit) if runtime is not None and key else limit
        if remaining is not None:
            remaining.value = self.limit
        # Hot-path shortcut: while ``current + 1 < fast_limit`` taking one is a plain
        # increment (no gauge can change); 0 sends every change through acquire/released.
        self.fast_limit = self.limit if self.runtime is None and remaining is None else 0

    def max(self) -> int:
        rt = self.runtime
        if rt is None:
            return self.limit
        return rt.get_integer(self.key, self.configured)

    def can_create(self) -> bool:
        if self.runtime is None:
            return self.current < self.limit
        return self.current < self.max()

    def inc(self) -> None:
        c = self.current = self.current + 1
        limit = self.limit if self.runtime is None else self.max()
        if c >= limit:
            self.open_gauge.value = 1
        r = self.remaining
        if r is not None:
            r.value = limit - c if limit > c else 0

    def dec(self) -> None:
        self.current -= 1
        self.released()

    def acquire(self) -> bool:
        """can_create() then inc(): False (and nothing taken) at the limit."""
        if not self.can_create():
            return False
        self.inc()
        return True

    def released(self) -> None:
        """Gauges after ``current`` was decremented by the caller."""
        c = self.current
        limit = self.limit if self.runtime is None else self.max()
        if c < limit:
            self.open_gauge.value = 0
        r = self.remaining
        if r is not None:
            r.value = limit - c if limit > c else 0

    def __repr__(self) -> str:
        return f"Resource({self.current}/{self.max()})"


class RetryBudget(Resource):
    """Retries limited by a budget of the active and pending requests (retry_budget)."""

    __slots__ = ("budget_percent", "min_concurrency", "requests", "pending")

    def __init__(
        self,
        budget_percent: float,
        min_concurrency: int,
        requests: Resource,
        pending: Resource,
        open_gauge: Gauge,
        remaining: Gauge | None,
        runtime: Runtime | None,
        key_prefix: str,
    ) -> None:
        super().__init__(min_concurrency, open_gauge, remaining, None, "")
        self.fast_limit = 0
        self.budget_percent = budget_percent
        self.min_concurrency = min_concurrency
        self.requests = requests
        self.pending = pending
        if runtime is not None and key_prefix:
            self.budget_percent = runtime.get_double(key_prefix + "budget_percent", budget_percent)
            self.min_concurrency = runtime.get_integer(
                key_prefix + "min_retry_concurrency", min_concurrency
            )

    def max(self) -> int:
        active = self.requests.current + self.pending.current
        return max(int(self.budget_percent / 100.0 * active), self.min_concurrency)

    def can_create(self) -> bool:
        return self.current < self.max()

    def inc(self) -> None:
        self.current += 1
        limit = self.max()
        self.open_gauge.value = 0 if self.current < limit else 1
        if self.remaining is not None:
            self.remaining.value = limit - self.current if limit > self.current else 0

    def released(self) -> None:
        limit = self.max()
        self.open_gauge.value = 0 if self.current < limit else 1
        if self.remaining is not None:
            self.remaining.value = limit - self.current if limit > self.current else 0


class ResourceManager:
    """The resources of one (cluster, priority)."""

    __slots__ = (
        "priority",
        "connections",
        "pending_requests",
        "requests",
        "retries",
        "connection_pools",
        "max_connections_per_host",
    )

    def __init__(
        self,
        priority: int,
        thresholds: Any,
        scope: Scope,
        runtime: Runtime | None,
        runtime_prefix: str,
        per_host_max_connections: int | None = None,
    ) -> None:
        self.priority = priority
        limits = dict(_DEFAULTS)
        track = False
        budget = None
        if thresholds is not None:
            for name in _DEFAULTS:
                if thresholds.HasField(name):
                    limits[name] = getattr(thresholds, name).value
            track = thresholds.track_remaining
            if thresholds.HasField("retry_budget"):
                budget = thresholds.retry_budget
        cb = scope
        gauges = {
            g: cb.gauge(g)
            for g in ("cx_open", "cx_pool_open", "rq_open", "rq_pending_open", "rq_retry_open")
        }

        def remaining(name: str) -> Gauge | None:
            return cb.gauge(name) if track else None

        self.connections = Resource(
            limits["max_connections"],
            gauges["cx_open"],
            remaining("remaining_cx"),
            runtime,
            runtime_prefix + "max_connections",
        )
        self.pending_requests = Resource(
            limits["max_pending_requests"],
            gauges["rq_pending_open"],
            remaining("remaining_pending"),
            runtime,
            runtime_prefix + "max_pending_requests",
        )
        self.requests = Resource(
            limits["max_requests"],
            gauges["rq_open"],
            remaining("remaining_rq"),
            runtime,
            runtime_prefix + "max_requests",
        )
        self.connection_pools = Resource(
            limits["max_connection_pools"],
            gauges["cx_pool_open"],
            remaining("remaining_cx_pools"),
            runtime,
            runtime_prefix + "max_connection_pools",
        )
        if budget is not None:
            self.retries: Resource = RetryBudget(
                budget.budget_percent.value if budget.HasField("budget_percent") else 20.0,
                budget.min_retry_concurrency.value
                if budget.HasField("min_retry_concurrency")
                else 3,
                self.requests,
                self.pending_requests,
                gauges["rq_retry_open"],
                remaining("remaining_retries"),
                runtime,
                runtime_prefix + "retry_budget.",
            )
        else:
            self.retries = Resource(
                limits["max_retries"],
                gauges["rq_retry_open"],
                remaining("remaining_retries"),
                runtime,
                runtime_prefix + "max_retries",
            )
        self.max_connections_per_host = per_host_max_connections

    def can_create_connection(self, host: Any) -> bool:
        """Envoy's Host::canCreateConnection: the per-host, then the cluster limit."""
        per_host = self.max_connections_per_host
        if per_host is not None and host is not None and host.stats.cx_active.value >= per_host:
            return False
        return self.connections.can_create()


class ResourceManagers:
    """Both priorities of one cluster, plus the cluster-level overflow counter Envoy has
    and pyenvoy's ClusterStats may not declare (``upstream_rq_active_overflow``)."""

    __slots__ = ("default", "high", "by_priority", "upstream_rq_active_overflow")

    def __init__(
        self, proto: Any, name: str, cluster_scope: Scope, runtime: Runtime | None = None
    ) -> None:
        by_prio: dict[int, Any] = {}
        per_host: dict[int, int] = {}
        if proto is not None and proto.HasField("circuit_breakers"):
            for t in proto.circuit_breakers.thresholds:
                by_prio[t.priority] = t  # the last entry of a priority wins
            for t in proto.circuit_breakers.per_host_thresholds:
                if t.HasField("max_connections"):
                    per_host[t.priority] = t.max_connections.value
        managers = []
        for prio, pname in enumerate(PRIORITY_NAMES):
            managers.append(
                ResourceManager(
                    prio,
                    by_prio.get(prio),
                    cluster_scope.scope(f"circuit_breakers.{pname}"),
                    runtime,
                    f"circuit_breakers.{name}.{pname}.",
                    per_host.get(prio),
                )
            )
        self.default = managers[0]
        self.high = managers[1]
        self.by_priority = (managers[0], managers[1])
        self.upstream_rq_active_overflow = cluster_scope.counter("upstream_rq_active_overflow")

    def for_priority(self, priority: int) -> ResourceManager:
        return self.high if priority == HIGH_PRIORITY else self.default


def resource_managers(info: Any, runtime: Runtime | None = None) -> ResourceManagers:
    """The ResourceManagers of a ClusterInfo (built on first use and cached on it)."""
    rms = getattr(info, "resource_managers", None)
    if rms is None:
        rms = ResourceManagers(getattr(info, "proto", None), info.name, info.stats.scope, runtime)
        try:
            info.resource_managers = rms
        except AttributeError:  # a slotted stand-in: no caching
            pass
    return rms
