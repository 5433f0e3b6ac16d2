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

Worker processes (``--concurrency N``): Envoy's limits are per cluster for the whole
process, shared by its worker threads. A worker has a shared table installed
(pyenvoy.upstream.shared_counts) and builds ``SharedResource``s: ``current`` stays the
local count the hot path changes, every change also goes to the worker's own counter in
the cluster's table entry, and ``can_create`` compares the sum over all workers with the
limit (``fast_limit`` 0; the pool inlines ``acquire``/``released`` for max_requests). The
workers leave the ``*_open``/``remaining_*`` gauges alone; the main process computes them
from the table when ``/stats`` is read (``publish_shared_gauges``). Without a table
(``--concurrency 1``, embedding) nothing of this runs: plain ``Resource``s as above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyenvoy.upstream import shared_counts

if TYPE_CHECKING:
    from pyenvoy.runtime import Runtime
    from pyenvoy.stats import Gauge, Scope
    from pyenvoy.upstream.shared_counts import SharedEntry

log = logging.getLogger("pyenvoy.upstream")

__all__ = [
    "declare_circuit_breaker_stats",
    "thresholds_by_priority",
    "configured_limits",
    "Resource",
    "SharedResource",
    "RetryBudget",
    "ResourceManager",
    "ResourceManagers",
    "resource_managers",
    "publish_shared_gauges",
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
        "view",
        "me",
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
        # Shared mode (SharedResource, RetryBudget): this worker's counters in the table.
        self.view: Any = None  # a memoryview of int64 counters, or None
        self.me = 0

    def count(self) -> int:
        """How many are taken: here ``current``; the process-wide sum in shared mode."""
        return self.current

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


class SharedResource(Resource):
    """A Resource whose count is the whole process's (worker processes sharing a table,
    pyenvoy.upstream.shared_counts): ``current`` stays this incarnation's own count (the
    pool and router change it directly), every change is also added to this worker's
    counter ``view[me]``, and ``can_create`` compares the sum of all workers' counters
    with the limit. ``fast_limit`` is 0, so the pool's hot path always takes its
    ``acquire``/``released`` branch, where it inlines both for max_requests (no call per
    request). The ``*_open`` / ``remaining_*`` gauges are left alone here: the main
    process computes them from the table when ``/stats`` is read
    (``publish_shared_gauges``)."""

    __slots__ = ()

    def __init__(
        self,
        limit: int,
        open_gauge: Gauge,
        remaining: Gauge | None,
        runtime: Runtime | None,
        key: str,
        view: memoryview,
        me: int,
    ) -> None:
        super().__init__(limit, open_gauge, remaining, runtime, key)
        self.view = view
        self.me = me
        self.fast_limit = 0

    def count(self) -> int:
        return sum(self.view)

    def can_create(self) -> bool:
        limit = self.limit if self.runtime is None else self.max()
        return sum(self.view) < limit

    def acquire(self) -> bool:
        view = self.view
        if sum(view) >= (self.limit if self.runtime is None else self.max()):
            return False
        self.current += 1
        view[self.me] += 1
        return True

    def inc(self) -> None:
        self.current += 1
        self.view[self.me] += 1

    def dec(self) -> None:
        self.current -= 1
        self.view[self.me] -= 1

    def released(self) -> None:
        """After the caller decremented ``current``: this worker's counter follows."""
        self.view[self.me] -= 1


class RetryBudget(Resource):
    """Retries limited by a budget of the active and pending requests (retry_budget).

    As Envoy's RetryBudgetImpl: the count lives in the plain ``max_retries`` resource
    underneath (so ``rq_retry_open`` still says ``current >= max_retries``), while
    ``can_create`` checks the budget and every use zeroes ``remaining_retries``. With a
    shared table (``view``) the retries, active and pending requests it compares are the
    whole process's."""

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
        view: memoryview | None = None,
        me: int = 0,
    ) -> None:
        super().__init__(max_retries, open_gauge, remaining, runtime, max_retries_key)
        self.fast_limit = 0
        self.view = view
        self.me = me
        self.budget_percent = budget_percent
        self.min_concurrency = min_concurrency
        self.requests = requests
        self.pending = pending
        if runtime is not None and key_prefix:
            self.budget_percent = runtime.get_double(key_prefix + "budget_percent", budget_percent)
            self.min_concurrency = runtime.get_integer(
                key_prefix + "min_retry_concurrency", min_concurrency
            )

    def count(self) -> int:
        view = self.view
        return self.current if view is None else sum(view)

    def max_retries(self) -> int:
        rt = self.runtime
        return self.limit if rt is None else rt.get_integer(self.key, self.configured)

    def max(self) -> int:
        active = self.requests.count() + self.pending.count()
        return max(int(self.budget_percent / 100.0 * active), self.min_concurrency)

    def can_create(self) -> bool:
        if self.remaining is not None:
            self.remaining.value = 0
        return self.count() < self.max()

    def inc(self) -> None:
        self.current += 1
        if self.view is not None:
            self.view[self.me] += 1
        self._update_gauges()

    def released(self) -> None:
        if self.view is not None:
            self.view[self.me] -= 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.open_gauge.value = 0 if self.count() < self.max_retries() else 1
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
        shared: SharedEntry | None = None,
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
        me = shared.index if shared is not None and shared.index is not None else None

        def remaining(name: str) -> Gauge | None:
            return cb.gauge(name) if track else None

        def resource(field: str, gauge: str, remaining_name: str) -> Resource:
            args = (
                limits[field],
                gauges[gauge],
                remaining(remaining_name),
                runtime,
                runtime_prefix + field,
            )
            if shared is None or me is None:
                return Resource(*args)
            view = shared.counters(priority, shared_counts.RESOURCES.index(_RESOURCE_OF[field]))
            return SharedResource(*args, view, me)

        self.connections = resource("max_connections", "cx_open", "remaining_cx")
        self.pending_requests = resource(
            "max_pending_requests", "rq_pending_open", "remaining_pending"
        )
        self.requests = resource("max_requests", "rq_open", "remaining_rq")
        self.connection_pools = resource(
            "max_connection_pools", "cx_pool_open", "remaining_cx_pools"
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
                None
                if shared is None or me is None
                else shared.counters(priority, shared_counts.RESOURCES.index("retries")),
                me or 0,
            )
        else:
            self.retries = resource("max_retries", "rq_retry_open", "remaining_retries")
        self.max_connections_per_host = per_host_max_connections

    def resources(self) -> tuple[Resource, ...]:
        """In the shared table's order (shared_counts.RESOURCES)."""
        return (
            self.connections,
            self.pending_requests,
            self.requests,
            self.retries,
            self.connection_pools,
        )

    def can_create_connection(self, host: Any) -> bool:
        """Envoy's Host::canCreateConnection: the per-host, then the cluster limit."""
        per_host = self.max_connections_per_host
        if per_host is not None and host is not None and host.stats.cx_active.value >= per_host:
            return False
        return self.connections.can_create()


# threshold field -> its resource in the shared table
_RESOURCE_OF = {
    "max_connections": "connections",
    "max_pending_requests": "pending_requests",
    "max_requests": "requests",
    "max_retries": "retries",
    "max_connection_pools": "connection_pools",
}


class ResourceManagers:
    """Both priorities of one cluster, plus the cluster-level overflow counter Envoy has
    and pyenvoy's ClusterStats may not declare (``upstream_rq_active_overflow``).
    ``shared``: the cluster's entry in this worker's shared table (process-wide counts)."""

    __slots__ = ("default", "high", "by_priority", "upstream_rq_active_overflow", "shared")

    def __init__(
        self,
        proto: Any,
        name: str,
        cluster_scope: Scope,
        runtime: Runtime | None = None,
        *,
        shared: SharedEntry | None = None,
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
                    shared,
                )
            )
        self.default = managers[0]
        self.high = managers[1]
        self.by_priority = (managers[0], managers[1])
        self.upstream_rq_active_overflow = cluster_scope.counter("upstream_rq_active_overflow")
        self.shared = shared

    def for_priority(self, priority: int) -> ResourceManager:
        return self.high if priority == HIGH_PRIORITY else self.default


def _table_key(info: Any) -> bytes:
    config = getattr(info, "proto_hash", None)
    if not isinstance(config, bytes):
        config = str(info.name).encode()
    return shared_counts.key_for(config)


def resource_managers(info: Any, runtime: Runtime | None = None) -> ResourceManagers:
    """The ResourceManagers of a ClusterInfo (built on first use and cached on it). In a
    worker with a shared table they count in the cluster's entry there (per worker if the
    table is full)."""
    rms = getattr(info, "resource_managers", None)
    if rms is None:
        shared = None
        table = shared_counts.installed()
        if table is not None:
            shared = table.entry(_table_key(info))
            if shared is None:
                log.warning(
                    "circuit breakers: the shared table is full (%d cluster configs); "
                    "cluster '%s' counts its limits in each worker separately",
                    table.capacity,
                    info.name,
                )
        rms = ResourceManagers(
            getattr(info, "proto", None), info.name, info.stats.scope, runtime, shared=shared
        )
        try:
            info.resource_managers = rms
        except AttributeError:  # a slotted stand-in: no caching
            pass
    return rms


def publish_shared_gauges(
    rms: ResourceManagers,
    entry: SharedEntry,
    workers_min: Callable[[str], int | None] | None = None,
) -> None:
    """In the main process: set a cluster's ``*_open`` and ``remaining_*`` gauges (those
    its own ``rms`` are bound to) from the process-wide counts in ``entry``, as Envoy's one
    ResourceManager has them: open while ``count >= limit``, remaining ``limit - count``.
    A retry budget's ``remaining_retries`` is zeroed by any worker's use: ``workers_min``
    gives the workers' lowest value of a gauge (None: no worker reported it)."""
    for prio, rm in enumerate(rms.by_priority):
        for i, res in enumerate(rm.resources()):
            total = entry.total(prio, i)
            if isinstance(res, RetryBudget):
                res.open_gauge.value = 0 if total < res.max_retries() else 1
                r = res.remaining
                if r is not None and workers_min is not None:
                    low = workers_min(r.name)
                    if low is not None:
                        r.value = low
                continue
            limit = res.max()
            res.open_gauge.value = 0 if total < limit else 1
            r = res.remaining
            if r is not None:
                r.value = limit - total if limit > total else 0
            if total:
                res.open_gauge.used = True
                if r is not None:
                    r.used = True
