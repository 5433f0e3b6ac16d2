"""Circuit breakers: Envoy's per-cluster, per-priority ResourceManager.

Strategy: a cluster has one ResourceManager per routing priority (``default`` and
``high``), built once from ``circuit_breakers.thresholds``. Each limited resource
(connections, pending requests, requests, retries, connection pools) is a slotted
``Resource`` holding a plain ``current`` count and its ``limit``; the connection pool and
the router do ``can_create()``/``inc()``/``dec()`` and nothing else. The
``circuit_breakers.<priority>.<x>_open`` gauge is 1 exactly while ``current >= limit``
(Envoy sets it after every change). The ``remaining_*`` gauges (``remaining_cx``,
``remaining_pending``, ``remaining_rq``, ``remaining_retries``, ``remaining_cx_pools``)
exist only for a priority whose threshold has ``track_remaining`` (Envoy binds null gauges
otherwise); they start at the *configured* limits (Envoy's ManagedResourceImpl sets them in
its constructor, before any runtime override) and follow ``limit - current`` on every
change after that. Limits may be overridden by the runtime keys
``circuit_breakers.<cluster>.<priority>.max_*``: static layers are folded in at build time;
only when the bootstrap has an admin layer is the runtime consulted on each check.

As in Envoy, the *first* threshold entry of a priority is the one used.

Hot path: while a resource has neither a runtime nor a ``remaining_*`` gauge, taking and
giving back one far from the limit is a bare ``current`` change (``fast_limit``); only a
tracked (or runtime) resource sends every change through ``inc``/``released``.

Retries use a budget when ``retry_budget`` is set: the limit is then
``max(min_retry_concurrency, budget_percent% of (active + pending requests))``. Envoy keeps
the plain ``max_retries`` resource underneath (it drives ``rq_retry_open``) and, with a
budget, zeroes ``remaining_retries`` on every use (it cannot be known in advance).

The cluster manager declares the gauges when it builds a ClusterInfo
(``declare_circuit_breaker_stats``), so they show from startup. The pool and router find
the managers with ``resource_managers(info)``: built on first use and cached on the
ClusterInfo, bound to those same gauges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyenvoy.runtime import Runtime
    from pyenvoy.stats import Gauge, Scope

__all__ = [
    "declare_circuit_breaker_stats",
    "thresholds_by_priority",
    "configured_limits",
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


_OPEN_GAUGES = ("cx_open", "cx_pool_open", "rq_open", "rq_pending_open", "rq_retry_open")
# remaining_* gauge -> the threshold field whose configured value it starts at
_REMAINING_GAUGES = (
    ("remaining_cx", "max_connections"),
    ("remaining_pending", "max_pending_requests"),
    ("remaining_rq", "max_requests"),
    ("remaining_retries", "max_retries"),
    ("remaining_cx_pools", "max_connection_pools"),
)


def thresholds_by_priority(proto: Any) -> dict[int, Any]:
    """``circuit_breakers.thresholds`` by priority: the first entry of a priority wins
    (Envoy's ClusterInfoImpl looks each priority up with find_if)."""
    out: dict[int, Any] = {}
    if proto is not None and proto.HasField("circuit_breakers"):
        for t in proto.circuit_breakers.thresholds:
            out.setdefault(t.priority, t)
    return out


def configured_limits(thresholds: Any) -> dict[str, int]:
    """max_* of one threshold (None: all defaults), before runtime overrides."""
    limits = dict(_DEFAULTS)
    if thresholds is not None:
        for name in _DEFAULTS:
            if thresholds.HasField(name):
                limits[name] = getattr(thresholds, name).value
    return limits


def declare_circuit_breaker_stats(proto: Any, cluster_scope: Scope) -> None:
    """Create a cluster's ``circuit_breakers.<priority>.*`` gauges as Envoy has them at
    startup: the ``*_open`` gauges for both priorities, the ``remaining_*`` gauges only
    where ``track_remaining`` is set, at the configured limits (a rebuilt cluster starts
    them over, as Envoy's new ResourceManager does). The ResourceManagers built later bind
    the same gauges."""
    by_prio = thresholds_by_priority(proto)
    for prio, pname in enumerate(PRIORITY_NAMES):
        scope = cluster_scope.scope(f"circuit_breakers.{pname}")
        for g in _OPEN_GAUGES:
            scope.gauge(g)
        t = by_prio.get(prio)
        if t is not None and t.track_remaining:
            limits = configured_limits(t)
            for g, field in _REMAINING_GAUGES:
                scope.gauge(g).value = limits[field]


class Resource:
    """One limited resource (Envoy's ManagedResourceImpl)."""

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
            remaining.value = limit  # Envoy: the configured max, runtime or not
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
        self.open_gauge.value = 0 if c < limit else 1
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
        self.open_gauge.value = 0 if c < limit else 1
        r = self.remaining
        if r is not None:
            r.value = limit - c if limit > c else 0

    def __repr__(self) -> str:
        return f"Resource({self.current}/{self.max()})"


class RetryBudget(Resource):
    """Retries limited by a budget of the active and pending requests (retry_budget).

    As Envoy's RetryBudgetImpl: the count lives in the plain ``max_retries`` resource
    underneath (so ``rq_retry_open`` still says ``current >= max_retries``), while
    ``can_create`` checks the budget and every use zeroes ``remaining_retries``."""

    __slots__ = ("budget_percent", "min_concurrency", "requests", "pending")

    def __init__(
        self,
        budget_percent: float,
        min_concurrency: int,
        max_retries: int,
        requests: Resource,
        pending: Resource,
        open_gauge: Gauge,
        remaining: Gauge | None,
        runtime: Runtime | None,
        key_prefix: str,
        max_retries_key: str = "",
    ) -> None:
        super().__init__(max_retries, open_gauge, remaining, runtime, max_retries_key)
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

    def max_retries(self) -> int:
        rt = self.runtime
        return self.limit if rt is None else rt.get_integer(self.key, self.configured)

    def max(self) -> int:
        active = self.requests.current + self.pending.current
        return max(int(self.budget_percent / 100.0 * active), self.min_concurrency)

    def can_create(self) -> bool:
        if self.remaining is not None:
            self.remaining.value = 0
        return self.current < self.max()

    def inc(self) -> None:
        self.current += 1
        self.released()

    def released(self) -> None:
        self.open_gauge.value = 0 if self.current < self.max_retries() else 1
        if self.remaining is not None:
            self.remaining.value = 0


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
        limits = configured_limits(thresholds)
        track = False
        budget = None
        if thresholds is not None:
            track = thresholds.track_remaining
            if thresholds.HasField("retry_budget"):
                budget = thresholds.retry_budget
        cb = scope
        gauges = {g: cb.gauge(g) for g in _OPEN_GAUGES}

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
                limits["max_retries"],
                self.requests,
                self.pending_requests,
                gauges["rq_retry_open"],
                remaining("remaining_retries"),
                runtime,
                runtime_prefix + "retry_budget.",
                runtime_prefix + "max_retries",
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
        by_prio = thresholds_by_priority(proto)
        per_host: dict[int, int] = {}
        if proto is not None and proto.HasField("circuit_breakers"):
            seen: set[int] = set()
            for t in proto.circuit_breakers.per_host_thresholds:
                if t.priority in seen:
                    continue  # the first entry of a priority wins, as for thresholds
                seen.add(t.priority)
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
