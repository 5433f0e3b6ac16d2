"""An upstream host (endpoint) and its per-host stats.

Strategy: a Host is long-lived across DNS refreshes and health changes; health is a bit
set (Envoy's ``health_flags``) and the cluster keeps a precomputed healthy list, so the
load balancer never filters per request. Host stats are not in the server's stats store
(Envoy shows them only in /clusters), they are plain slotted counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyenvoy.stats import Counter, Gauge

if TYPE_CHECKING:
    from pyenvoy.upstream.cluster_manager import ClusterInfo

FAILED_ACTIVE_HC = 1 << 0
FAILED_OUTLIER_CHECK = 1 << 1
FAILED_EDS_HEALTH = 1 << 2
DEGRADED_ACTIVE_HC = 1 << 3
PENDING_DYNAMIC_REMOVAL = 1 << 4
PENDING_ACTIVE_HC = 1 << 5
EXCLUDED_VIA_IMMEDIATE_HC_FAIL = 1 << 6
ACTIVE_HC_TIMEOUT = 1 << 7
# The flags active health checking owns: with worker processes the main process runs the
# checks and sends exactly these bits to the workers (the others stay each process's own).
ACTIVE_HC_FLAGS = (
    FAILED_ACTIVE_HC
    | DEGRADED_ACTIVE_HC
    | PENDING_ACTIVE_HC
    | EXCLUDED_VIA_IMMEDIATE_HC_FAIL
    | ACTIVE_HC_TIMEOUT
)

_FLAG_TEXT = (
    (FAILED_ACTIVE_HC, "/failed_active_hc"),
    (FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
    (FAILED_EDS_HEALTH, "/failed_eds_health"),
    (DEGRADED_ACTIVE_HC, "/degraded_active_hc"),
    (PENDING_DYNAMIC_REMOVAL, "/pending_dynamic_removal"),
    (PENDING_ACTIVE_HC, "/pending_active_hc"),
    (EXCLUDED_VIA_IMMEDIATE_HC_FAIL, "/excluded_via_immediate_hc_fail"),
    (ACTIVE_HC_TIMEOUT, "/active_hc_timeout"),
)


class HostStats:
    __slots__ = (
        "cx_total",
        "cx_connect_fail",
        "rq_total",
        "rq_error",
        "rq_success",
        "rq_timeout",
        "cx_active",
        "rq_active",
    )

    def __init__(self) -> None:
        self.cx_total = Counter("cx_total")
        self.cx_connect_fail = Counter("cx_connect_fail")
        self.rq_total = Counter("rq_total")
        self.rq_error = Counter("rq_error")
        self.rq_success = Counter("rq_success")
        self.rq_timeout = Counter("rq_timeout")
        self.cx_active = Gauge("cx_active")
        self.rq_active = Gauge("rq_active")

    def items(self) -> list[tuple[str, Counter | Gauge]]:
        return [(n, getattr(self, n)) for n in self.__slots__]


class Host:
    __slots__ = (
        "address",
        "hostname",
        "weight",
        "priority",
        "stats",
        "health_flags",
        "cluster",
        "http_pool",
        "metadata",
        "locality",
        "locality_weight",
        "outlier",
    )

    def __init__(
        self,
        address: tuple[str, int],
        cluster: ClusterInfo | None = None,
        hostname: str = "",
        weight: int = 1,
        priority: int = 0,
    ) -> None:
        self.address = address
        self.hostname = hostname
        self.weight = weight
        self.priority = priority
        self.stats = HostStats()
        self.health_flags = 0
        self.cluster = cluster
        self.http_pool: Any = None  # created lazily by the cluster manager
        self.metadata: Any = None
        self.locality: tuple[str, str, str] = ("", "", "")
        self.locality_weight = 0
        # Per-host outlier detection state (owned by the cluster's outlier detector).
        self.outlier: Any = None

    @property
    def healthy(self) -> bool:
        return not self.health_flags

    def health_flags_text(self) -> str:
        if not self.health_flags:
            return "healthy"
        return "".join(t for bit, t in _FLAG_TEXT if self.health_flags & bit)

    def __repr__(self) -> str:
        return f"Host({self.address[0]}:{self.address[1]})"
