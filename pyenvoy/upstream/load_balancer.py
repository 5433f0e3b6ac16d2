"""Load balancers: pick a host from a cluster's host set, with Envoy's semantics.

Strategy: all the maths happens in ``LoadBalancerFactory.build(hosts)``, which runs on every
host-set or health change; ``choose_host`` only indexes into what it precomputed.

- Priorities (Envoy's ``LoadBalancerBase``): hosts are split per priority into healthy,
  degraded and excluded sets; each level's availability is
  ``min(100, overprovisioning_factor * healthy / total)``; load goes to the highest levels
  first and spills to lower ones; a level is in panic when its healthy+degraded share is
  below ``healthy_panic_threshold`` and the normalized total availability is under 100 (a
  panicking level balances over all its hosts); when every level panics, load follows host
  counts. The result is a 100-entry table: ``table[r % 100]`` is the host source for a
  random (or hash) value ``r``, so choosing a priority is one index.
- A host source is a picker over one host list: round robin (index into the list, or into a
  precomputed earliest-deadline-first schedule when weights differ, as Envoy's EDF
  scheduler orders picks), least request (power of ``choice_count`` choices, or an EDF heap
  on ``weight / (active + 1) ** active_request_bias`` when weights differ), random, or a
  locality chooser (EDF over ``locality_weight * min(1, overprovisioning * healthy share)``)
  in front of per-locality pickers when locality weighted balancing is on.
- Ring hash and Maglev (``ring_hash.py``, ``maglev.py``) build one table per priority over
  the normalized host (and locality) weights; ``choose_host`` hashes the request with the
  route's hash policy (``hash_policy.py``) or picks a random value when none applies.
- The common case (one priority, not in panic, no locality weighting, not hashing) returns
  the bare picker: round robin stays one list index and one increment per request.
- Round robin indexes live across rebuilds per host source, as Envoy's ``rr_indexes_``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.upstream import host as _host_mod
from pyenvoy.upstream.hash_policy import HashPolicy, compile_hash_policy, hash_policy_for
from pyenvoy.upstream.host import (
    DEGRADED_ACTIVE_HC,
    FAILED_ACTIVE_HC,
    FAILED_EDS_HEALTH,
    FAILED_OUTLIER_CHECK,
    PENDING_ACTIVE_HC,
)

if TYPE_CHECKING:
    from pyenvoy.upstream.host import Host

__all__ = [
    "LoadBalancer",
    "RoundRobinLoadBalancer",
    "LeastRequestLoadBalancer",
    "RandomLoadBalancer",
    "PriorityLoadBalancer",
    "HashingLoadBalancer",
    "LoadBalancerContext",
    "LoadBalancerFactory",
    "PriorityState",
    "compute_priority_state",
]

# Envoy's Host::coarseHealth(): any failure flag -> unhealthy, else a degraded flag ->
# degraded, else healthy (PENDING_DYNAMIC_REMOVAL alone stays healthy). Excluded hosts
# (pending their first active check, or excluded after an immediate failure) take no load
# and do not count in a level's health; a panicking level still uses them.
UNHEALTHY_FLAGS = (
    FAILED_ACTIVE_HC
    | FAILED_OUTLIER_CHECK
    | FAILED_EDS_HEALTH
    | getattr(_host_mod, "ACTIVE_HC_TIMEOUT", 1 << 16)
)
DEGRADED_FLAGS = DEGRADED_ACTIVE_HC
EXCLUDED_FLAGS = PENDING_ACTIVE_HC | getattr(_host_mod, "EXCLUDED_VIA_IMMEDIATE_HC_FAIL", 1 << 17)

DEFAULT_OVERPROVISIONING_FACTOR = 140
DEFAULT_PANIC_THRESHOLD = 50
# Weighted round robin precomputes one EDF period when the (gcd-reduced) weights sum to at
# most this many picks; above it an EDF heap runs per pick.
MAX_PRECOMPUTED_SCHEDULE = 1 << 16

_getrandbits = random.getrandbits
_random = random.random


# --------------------------------------------------------------------------------------------
# Pickers: one host list each.


class LoadBalancer:
    """Chooses a host; ``hosts`` is the list it balances over (the cluster's healthy set)."""

    __slots__ = ("hosts",)

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts

    def choose_host(self, context: Any = None) -> Host | None:
        raise NotImplementedError


def _weights_equal(hosts: Sequence[Host]) -> bool:
    if len(hosts) <= 1:
        return True
    w = hosts[0].weight
    for h in hosts:
        if h.weight != w:
            return False
    return True


def edf_schedule(hosts: Sequence[Host]) -> list[Host] | None:
    """One period of Envoy's EDF pick order for static weights (None if too long).

    Host i is due at k / w_i (k = 1..w_i after dividing all weights by their gcd); picks go in
    deadline order, ties to the earlier host, so each period picks host i exactly w_i times."""
    weights = [max(1, h.weight) for h in hosts]
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    weights = [w // g for w in weights]
    if sum(weights) > MAX_PRECOMPUTED_SCHEDULE:
        return None
    due = [(k / w, i) for i, w in enumerate(weights) for k in range(1, w + 1)]
    due.sort()
    return [hosts[i] for _, i in due]


class _Edf:
    """Envoy's EdfScheduler: pick the earliest deadline, re-add at now + 1 / weight."""

    __slots__ = ("heap", "order", "weight_of")

    def __init__(self, items: Sequence[Any], weight_of: Callable[[Any], float]) -> None:
        self.weight_of = weight_of
        self.heap = [(1.0 / weight_of(it), i, it) for i, it in enumerate(items)]
        heapq.heapify(self.heap)
        self.order = len(items)

    def pick(self) -> Any:
        heap = self.heap
        deadline, _, item = heap[0]
        order = self.order
        self.order = order + 1
        heapq.heapreplace(heap, (deadline + 1.0 / self.weight_of(item), order, item))
        return item


class RoundRobinLoadBalancer(LoadBalancer):
    """Unweighted: ``hosts[index++ % n]``. Weighted: the same over one EDF period."""

    __slots__ = ("schedule", "index", "size", "edf")

    def __init__(self, hosts: list[Host], index: int | None = None) -> None:
        super().__init__(hosts)
        self.edf: _Edf | None = None
        schedule: list[Host] = list(hosts)
        if not _weights_equal(hosts):
            weighted = edf_schedule(hosts)
            if weighted is None:  # weights too large to expand: an EDF heap per pick
                self.edf = _Edf(hosts, _static_weight)
                schedule = []
            else:
                schedule = weighted
        self.schedule = schedule
        self.size = len(schedule)
        # Envoy starts every host source at a random seed so proxies don't stampede host 0.
        self.index = _getrandbits(32) if index is None else index

    def choose_host(self, context: Any = None) -> Host | None:
        size = self.size
        if size:
            i = self.index
            self.index = i + 1
            return self.schedule[i % size]
        if self.edf is not None:
            return self.edf.pick()  # type: ignore[no-any-return]
        return None


def _static_weight(h: Host) -> float:
    return float(max(1, h.weight))


class RandomLoadBalancer(LoadBalancer):
    """Uniform over the hosts (Envoy's random LB ignores weights)."""

    __slots__ = ()

    def choose_host(self, context: Any = None) -> Host | None:
        hosts = self.hosts
        if not hosts:
            return None
        return hosts[int(_random() * len(hosts))]


class LeastRequestLoadBalancer(LoadBalancer):
    """Power of ``choice_count`` choices on ``rq_active`` (equal weights), else an EDF heap on
    ``weight / (rq_active + 1) ** active_request_bias``; FULL_SCAN compares every host."""

    __slots__ = ("choice_count", "active_request_bias", "full_scan", "edf")

    def __init__(
        self,
        hosts: list[Host],
        choice_count: int = 2,
        active_request_bias: float = 1.0,
        full_scan: bool = False,
    ) -> None:
        super().__init__(hosts)
        self.choice_count = choice_count
        self.active_request_bias = active_request_bias
        self.full_scan = full_scan
        self.edf: _Edf | None = None
        if not _weights_equal(hosts):
            self.edf = _Edf(hosts, self._host_weight)

    def _host_weight(self, h: Host) -> float:
        bias = self.active_request_bias
        w = float(h.weight)
        if bias == 1.0:
            return w / (h.stats.rq_active.value + 1)
        if bias == 0.0:
            return w
        return w / ((h.stats.rq_active.value + 1) ** bias)

    def choose_host(self, context: Any = None) -> Host | None:
        hosts = self.hosts
        n = len(hosts)
        if n == 0:
            return None
        if self.edf is not None:
            return self.edf.pick()  # type: ignore[no-any-return]
        if self.full_scan:
            return self._full_scan(hosts)
        best = hosts[int(_random() * n)]
        best_active = best.stats.rq_active.value
        for _ in range(self.choice_count - 1):
            cand = hosts[int(_random() * n)]
            active = cand.stats.rq_active.value
            if active < best_active:
                best, best_active = cand, active
        return best

    @staticmethod
    def _full_scan(hosts: list[Host]) -> Host:
        best = hosts[0]
        best_active = best.stats.rq_active.value
        ties = 1
        for h in hosts[1:]:
            active = h.stats.rq_active.value
            if active < best_active:
                best, best_active, ties = h, active, 1
            elif active == best_active:
                ties += 1  # reservoir sampling: every tied host equally likely
                if int(_random() * ties) == 0:
                    best = h
        return best


class _LocalityChooser(LoadBalancer):
    """Locality weighted balancing: EDF over localities, then that locality's picker."""

    __slots__ = ("edf",)

    def __init__(self, hosts: list[Host], entries: list[tuple[float, LoadBalancer]]) -> None:
        super().__init__(hosts)
        self.edf = _Edf(entries, _entry_weight)

    def choose_host(self, context: Any = None) -> Host | None:
        picker: LoadBalancer = self.edf.pick()[1]
        return picker.choose_host(context)


def _entry_weight(e: tuple[float, LoadBalancer]) -> float:
    return e[0]


class _NoHost(LoadBalancer):
    __slots__ = ()

    def choose_host(self, context: Any = None) -> Host | None:
        return None


# --------------------------------------------------------------------------------------------
# Priority levels (Envoy's LoadBalancerBase maths).


class _Level:
    __slots__ = (
        "priority",
        "hosts",
        "healthy",
        "degraded",
        "excluded",
        "health",
        "degraded_health",
    )

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.hosts: list[Host] = []
        self.healthy: list[Host] = []
        self.degraded: list[Host] = []
        self.excluded: list[Host] = []
        self.health = 0
        self.degraded_health = 0


class PriorityState:
    """Per-priority availability, load (percent) and panic, as Envoy computes them."""

    __slots__ = ("levels", "healthy_load", "degraded_load", "panic")

    def __init__(
        self, levels: list[_Level], healthy: list[int], degraded: list[int], panic: list[bool]
    ) -> None:
        self.levels = levels
        self.healthy_load = healthy
        self.degraded_load = degraded
        self.panic = panic

    def table(self) -> list[tuple[int, bool]]:
        """(priority, degraded?) for each value of ``hash % 100`` (Envoy's choosePriority)."""
        out: list[tuple[int, bool]] = []
        for degraded, loads in ((False, self.healthy_load), (True, self.degraded_load)):
            for p, load in enumerate(loads):
                out.extend([(p, degraded)] * load)
        if len(out) < 100:  # cannot happen when loads add up to 100; Envoy falls back to P0
            out.extend([(0, False)] * (100 - len(out)))
        return out[:100]


def _classify(level: _Level) -> None:
    for h in level.hosts:
        flags = h.health_flags
        if flags & EXCLUDED_FLAGS:
            level.excluded.append(h)
        elif not flags & UNHEALTHY_FLAGS:
            if flags & DEGRADED_FLAGS:
                level.degraded.append(h)
            else:
                level.healthy.append(h)


def _distribute(loads: list[int], avail: list[int], total: int, normalized: int) -> tuple[int, int]:
    first = -1
    for i, a in enumerate(avail):
        if first < 0 and a > 0:
            first = i
        loads[i] = min(total, a * 100 // normalized)
        total -= loads[i]
    return first, total


def _in_panic(level: _Level, threshold: int) -> bool:
    count = len(level.hosts) - len(level.excluded)
    if count == 0:
        return 0.0 < threshold
    healthy = 100.0 * len(level.healthy) / count
    degraded = 100.0 * len(level.degraded) / count
    return healthy + degraded < threshold


def compute_priority_state(
    hosts: Sequence[Host],
    overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR,
    panic_threshold: int = DEFAULT_PANIC_THRESHOLD,
    weighted_priority_health: bool = False,
) -> PriorityState:
    """Envoy's recalculatePerPriorityState + recalculatePerPriorityPanic for a host list."""
    nlevels = max((h.priority for h in hosts), default=0) + 1
    levels = [_Level(p) for p in range(nlevels)]
    for h in hosts:
        levels[h.priority].hosts.append(h)
    for lv in levels:
        _classify(lv)
        count = len(lv.hosts) - len(lv.excluded)
        if count <= 0:
            continue
        if weighted_priority_health:
            healthy_w = sum(h.weight for h in lv.healthy)
            degraded_w = sum(h.weight for h in lv.degraded)
            total_w = sum(h.weight for h in lv.hosts) - sum(h.weight for h in lv.excluded)
        else:
            healthy_w, degraded_w, total_w = len(lv.healthy), len(lv.degraded), count
        if total_w <= 0:
            continue
        lv.health = min(100, overprovisioning_factor * healthy_w // total_w)
        lv.degraded_health = min(100, overprovisioning_factor * degraded_w // total_w)
    health = [lv.health for lv in levels]
    degraded = [lv.degraded_health for lv in levels]
    healthy_load = [0] * nlevels
    degraded_load = [0] * nlevels
    normalized = min(100, sum(health) + sum(degraded))
    if normalized > 0:
        first_h, left = _distribute(healthy_load, health, 100, normalized)
        first_d, left = _distribute(degraded_load, degraded, left, normalized)
        if left:
            if first_h >= 0:
                healthy_load[first_h] += left
            else:
                degraded_load[first_d] += left
    threshold = min(100, panic_threshold)
    panic = [False] * nlevels
    if threshold == 0 and normalized == 0:
        # Panic disabled and nothing available: all load to P0, which has no host to give.
        healthy_load = [0] * nlevels
        degraded_load = [0] * nlevels
        healthy_load[0] = 100
        return PriorityState(levels, healthy_load, degraded_load, panic)
    if normalized < 100:
        panic = [_in_panic(lv, threshold) for lv in levels]
    if all(panic):
        # Total panic: load follows the number of hosts per level, healthy or not.
        total = sum(len(lv.hosts) for lv in levels)
        healthy_load = [0] * nlevels
        degraded_load = [0] * nlevels
        if total == 0:
            healthy_load[0] = 100
        else:
            left = 100
            first = -1
            for i, lv in enumerate(levels):
                if first < 0 and lv.hosts:
                    first = i
                healthy_load[i] = 100 * len(lv.hosts) // total
                left -= healthy_load[i]
            healthy_load[first] += left
    return PriorityState(levels, healthy_load, degraded_load, panic)


def _locality_groups(hosts: Sequence[Host]) -> list[tuple[tuple[str, str, str], list[Host]]]:
    groups: dict[tuple[str, str, str], list[Host]] = {}
    for h in hosts:
        groups.setdefault(h.locality, []).append(h)
    return sorted(groups.items())


def _locality_weights(level: _Level) -> dict[tuple[str, str, str], int]:
    weights: dict[tuple[str, str, str], int] = {}
    for h in level.hosts:
        weights[h.locality] = h.locality_weight
    return weights


# --------------------------------------------------------------------------------------------
# Composite balancers.


class PriorityLoadBalancer(LoadBalancer):
    """Several host sources: ``table[random % 100]`` picks one (priority, health, panic)."""

    __slots__ = ("table", "panic_counter")

    def __init__(
        self, hosts: list[Host], table: list[tuple[LoadBalancer, bool]], panic_counter: Any = None
    ) -> None:
        super().__init__(hosts)
        self.table = table
        self.panic_counter = panic_counter

    def choose_host(self, context: Any = None) -> Host | None:
        source, panic = self.table[_getrandbits(64) % 100]
        if panic and self.panic_counter is not None:
            self.panic_counter.value += 1
        return source.choose_host(context)


class HashingLoadBalancer(LoadBalancer):
    """RING_HASH / MAGLEV: hash the request, ``table[hash % 100]`` picks the priority's ring."""

    __slots__ = ("table", "panic_counter", "hash_policy")

    def __init__(
        self,
        hosts: list[Host],
        table: list[tuple[Any, bool]],
        hash_policy: HashPolicy | None = None,
        panic_counter: Any = None,
    ) -> None:
        super().__init__(hosts)
        self.table = table
        self.hash_policy = hash_policy
        self.panic_counter = panic_counter

    def choose_host(self, context: Any = None) -> Host | None:
        h: int | None = None
        if context is not None:
            hp = self.hash_policy
            if hp is not None:
                # The cluster's own policy wins over the route's/tcp_proxy's, as in Envoy; for
                # tcp_proxy (no headers) only connection properties can produce a hash.
                h = hp.generate(
                    getattr(context, "headers", None),
                    getattr(context, "stream_info", None),
                    _adder(context),
                )
            else:
                compute = getattr(context, "compute_hash", None)
                if compute is not None:
                    h = compute()
        if h is None:
            # No hash: behave as a random LB (as Envoy does).
            h = _getrandbits(64)
        ring, panic = self.table[h % 100]
        if panic and self.panic_counter is not None:
            self.panic_counter.value += 1
        if ring is None:
            return None
        # A host re-selection (retry host predicate) moves along the ring/table as Envoy's
        # chooseHost(hash, attempt) does, with the same hash.
        attempt = getattr(context, "attempt", 0) if context is not None else 0
        return ring.choose(h, attempt)  # type: ignore[no-any-return]


def _adder(context: Any) -> Any:
    return getattr(context, "add_response_header", None)


# --------------------------------------------------------------------------------------------
# Request context.


class LoadBalancerContext:
    """What a request offers a load balancer: headers and stream info (for hash policies).

    The router creates one only when the cluster's load balancer ``uses_hash``. A cookie
    hash policy with a ``ttl`` may ask for a cookie to be set on the response: those headers
    collect in ``response_headers_to_add`` (the router adds them to the response)."""

    __slots__ = ("headers", "stream_info", "hash_policy", "response_headers_to_add", "attempt")

    def __init__(self, headers: Any, stream_info: Any, hash_policy: Any) -> None:
        self.headers = headers
        self.stream_info = stream_info
        self.hash_policy = hash_policy
        self.response_headers_to_add: list[tuple[bytes, bytes]] | None = None
        # Host re-selection within one attempt (retry host predicates): 0 for the first pick.
        self.attempt = 0

    def add_response_header(self, name: bytes, value: bytes) -> None:
        if self.response_headers_to_add is None:
            self.response_headers_to_add = []
        self.response_headers_to_add.append((name, value))

    def compute_hash(self) -> int | None:
        """The request's hash from the route's hash_policy (None: no policy produced one)."""
        hp = hash_policy_for(self.hash_policy)
        if hp is None:
            return None
        return hp.generate(self.headers, self.stream_info, self.add_response_header)


# --------------------------------------------------------------------------------------------
# The factory: config -> policy, then host list -> balancer.

_TYPED = "envoy.extensions.load_balancing_policies."
TYPED_POLICIES = {
    f"type.googleapis.com/{_TYPED}round_robin.v3.RoundRobin": "ROUND_ROBIN",
    f"type.googleapis.com/{_TYPED}least_request.v3.LeastRequest": "LEAST_REQUEST",
    f"type.googleapis.com/{_TYPED}random.v3.Random": "RANDOM",
    f"type.googleapis.com/{_TYPED}ring_hash.v3.RingHash": "RING_HASH",
    f"type.googleapis.com/{_TYPED}maglev.v3.Maglev": "MAGLEV",
    f"type.googleapis.com/{_TYPED}wrr_locality.v3.WrrLocality": "WRR_LOCALITY",
}
_TYPED_STRUCT_URLS = (
    "type.googleapis.com/xds.type.v3.TypedStruct",
    "type.googleapis.com/udpa.type.v1.TypedStruct",
)
LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV")


def _percent_to_int(p: Any) -> int:
    # PROTOBUF_PERCENT_TO_ROUNDED_INTEGER: std::round(value), half away from zero.
    return int(math.floor(p.value + 0.5))


class LoadBalancerFactory:
    """A cluster's load-balancing settings, compiled once from its proto.

    ``build(hosts)`` turns the cluster's full host list (with health flags and priorities)
    into the load balancer used until the next host or health change, and says whether the
    cluster is in panic mode (every pick goes to a panicking priority: the cluster counts
    ``lb_healthy_panic`` per pick). When only some priorities panic, the balancer counts
    ``lb_healthy_panic`` itself on ``panic_counter`` (bound by ``bind_stats`` or taken from
    the hosts' cluster)."""

    def __init__(self, proto: Any, path: str) -> None:
        self.name = proto.name
        self.path = path
        self.uses_hash = False
        self.hash_policy: HashPolicy | None = None
        self.choice_count = 2
        self.active_request_bias = 1.0
        self.full_scan = False
        self.min_ring_size = 1024
        self.max_ring_size = 8 * 1024 * 1024
        self.murmur = False
        self.use_hostname_for_hashing = False
        self.table_size = 65537
        self.locality_weighted = False
        cl = proto.common_lb_config
        self.panic_threshold = (
            _percent_to_int(cl.healthy_panic_threshold)
            if cl.HasField("healthy_panic_threshold")
            else DEFAULT_PANIC_THRESHOLD
        )
        policy = proto.load_assignment.policy
        self.overprovisioning_factor = (
            policy.overprovisioning_factor.value
            if policy.HasField("overprovisioning_factor")
            else DEFAULT_OVERPROVISIONING_FACTOR
        )
        self.weighted_priority_health = bool(policy.weighted_priority_health)
        if proto.HasField("lb_subset_config") and len(proto.lb_subset_config.subset_selectors):
            raise ConfigError(
                "lb_subset_config is not supported by pyenvoy", f"{path}.lb_subset_config"
            )
        if proto.HasField("load_balancing_policy"):
            self.policy = self._typed_policy(
                proto.load_balancing_policy, f"{path}.load_balancing_policy"
            )
        else:
            self.policy = self._legacy_policy(proto, path)
        if self.policy in ("RING_HASH", "MAGLEV"):
            self.uses_hash = True
        self.panic_counter: Any = None
        self._scope: Any = None
        self._gauges: dict[str, Any] = {}
        self._rr_seed = _getrandbits(32)
        self._rr_pickers: dict[tuple[int, str, int], RoundRobinLoadBalancer] = {}

    # -- config ----------------------------------------------------------------------------
    def _legacy_policy(self, proto: Any, path: str) -> str:
        name = proto.LbPolicy.Name(proto.lb_policy)
        cl = proto.common_lb_config
        if name == "CLUSTER_PROVIDED":
            raise ConfigError(
                f"cluster manager: cluster provided LB specified but cluster '{proto.name}' did "
                "not provide one. Check cluster documentation.",
                f"{path}.lb_policy",
            )
        if name == "LOAD_BALANCING_POLICY_CONFIG":
            raise ConfigError(
                "cluster: field load_balancing_policy need to be set", f"{path}.lb_policy"
            )
        if name not in LB_POLICIES:
            raise ConfigError(f"lb_policy {name} is not supported by pyenvoy", f"{path}.lb_policy")
        self.locality_weighted = cl.HasField("locality_weighted_lb_config")
        self._consistent_hashing(cl, f"{path}.common_lb_config")
        if name == "ROUND_ROBIN" and proto.HasField("round_robin_lb_config"):
            self._no_slow_start(proto.round_robin_lb_config, f"{path}.round_robin_lb_config")
        elif name == "LEAST_REQUEST" and proto.HasField("least_request_lb_config"):
            c = proto.least_request_lb_config
            self._least_request(c, f"{path}.least_request_lb_config")
        elif name == "RING_HASH" and proto.HasField("ring_hash_lb_config"):
            c = proto.ring_hash_lb_config
            if c.HasField("minimum_ring_size"):
                self.min_ring_size = c.minimum_ring_size.value
            if c.HasField("maximum_ring_size"):
                self.max_ring_size = c.maximum_ring_size.value
            self.murmur = c.HashFunction.Name(c.hash_function) == "MURMUR_HASH_2"
        elif name == "MAGLEV" and proto.HasField("maglev_lb_config"):
            if proto.maglev_lb_config.HasField("table_size"):
                self.table_size = proto.maglev_lb_config.table_size.value
        self._check_hash_config(name, path)
        return name

    def _typed_policy(self, lbp: Any, path: str) -> str:
        from pyenvoy.config import unpack_any

        names = []
        for i, p in enumerate(lbp.policies):
            tec = p.typed_extension_config
            names.append(tec.name)
            url = tec.typed_config.type_url
            ppath = f"{path}.policies[{i}].typed_extension_config.typed_config"
            if url in _TYPED_STRUCT_URLS:
                msg = unpack_any(tec.typed_config, ppath)
                url = "type.googleapis.com/" + msg.DESCRIPTOR.full_name
            kind = TYPED_POLICIES.get(url)
            if kind is None:
                continue  # not a policy pyenvoy has: try the next one, as Envoy does
            msg = unpack_any(tec.typed_config, ppath)
            if kind == "WRR_LOCALITY":
                # Locality weighted round robin over localities, then the endpoint policy.
                inner = self._typed_policy(
                    msg.endpoint_picking_policy, f"{ppath}.endpoint_picking_policy"
                )
                self.locality_weighted = True
                return inner
            self._apply_typed(kind, msg, ppath)
            return kind
        raise ConfigError(
            "cluster: didn't find a registered load balancer factory implementation for "
            f"cluster: '{self.name}' with names from [{', '.join(names)}]",
            path,
        )

    def _apply_typed(self, kind: str, msg: Any, path: str) -> None:
        if kind in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"):
            if msg.HasField("locality_lb_config"):
                self.locality_weighted = msg.locality_lb_config.HasField(
                    "locality_weighted_lb_config"
                )
            if kind == "ROUND_ROBIN":
                self._no_slow_start(msg, path)
            elif kind == "LEAST_REQUEST":
                self._least_request(msg, path)
                if (
                    msg.enable_full_scan.value
                    or msg.SelectionMethod.Name(msg.selection_method) == "FULL_SCAN"
                ):
                    self.full_scan = True
            return
        self.locality_weighted = msg.HasField("locality_weighted_lb_config")
        if msg.HasField("consistent_hashing_lb_config"):
            chc = msg.consistent_hashing_lb_config
            self.use_hostname_for_hashing = chc.use_hostname_for_hashing
            if chc.HasField("hash_balance_factor") and chc.hash_balance_factor.value:
                raise ConfigError(
                    "hash_balance_factor (bounded load) is not supported by pyenvoy",
                    f"{path}.consistent_hashing_lb_config.hash_balance_factor",
                )
            if len(chc.hash_policy):
                self.hash_policy = compile_hash_policy(
                    chc.hash_policy, f"{path}.consistent_hashing_lb_config.hash_policy"
                )
        if kind == "RING_HASH":
            if msg.HasField("minimum_ring_size"):
                self.min_ring_size = msg.minimum_ring_size.value
            if msg.HasField("maximum_ring_size"):
                self.max_ring_size = msg.maximum_ring_size.value
            self.murmur = msg.HashFunction.Name(msg.hash_function) == "MURMUR_HASH_2"
            if not msg.HasField("consistent_hashing_lb_config"):
                self.use_hostname_for_hashing = msg.use_hostname_for_hashing
                if msg.HasField("hash_balance_factor") and msg.hash_balance_factor.value:
                    raise ConfigError(
                        "hash_balance_factor (bounded load) is not supported by pyenvoy",
                        f"{path}.hash_balance_factor",
                    )
        elif kind == "MAGLEV" and msg.HasField("table_size"):
            self.table_size = msg.table_size.value
        self._check_hash_config(kind, path)

    def _consistent_hashing(self, cl: Any, path: str) -> None:
        if cl.HasField("consistent_hashing_lb_config"):
            chc = cl.consistent_hashing_lb_config
            self.use_hostname_for_hashing = chc.use_hostname_for_hashing
            if chc.HasField("hash_balance_factor") and chc.hash_balance_factor.value:
                raise ConfigError(
                    "hash_balance_factor (bounded load) is not supported by pyenvoy",
                    f"{path}.consistent_hashing_lb_config.hash_balance_factor",
                )

    def _least_request(self, c: Any, path: str) -> None:
        self._no_slow_start(c, path)
        if c.HasField("choice_count"):
            self.choice_count = c.choice_count.value
        if c.HasField("active_request_bias"):
            bias = c.active_request_bias.default_value
            self.active_request_bias = bias if bias >= 0.0 and not math.isnan(bias) else 1.0

    @staticmethod
    def _no_slow_start(c: Any, path: str) -> None:
        if c.HasField("slow_start_config"):
            raise ConfigError(
                "slow_start_config is not supported by pyenvoy", f"{path}.slow_start_config"
            )

    def _check_hash_config(self, kind: str, path: str) -> None:
        if kind == "RING_HASH" and self.min_ring_size > self.max_ring_size:
            raise ConfigError(
                f"ring hash: minimum_ring_size ({self.min_ring_size}) > maximum_ring_size "
                f"({self.max_ring_size})",
                path,
            )
        from pyenvoy.upstream.maglev import is_prime

        if kind == "MAGLEV" and not is_prime(self.table_size):
            raise ConfigError("The table size of maglev must be prime number", path)

    # -- stats -----------------------------------------------------------------------------
    def bind_stats(self, scope: Any) -> None:
        """Bind ``cluster.<name>.`` stats: ``lb_healthy_panic`` for partial panics and the
        ``ring_hash_lb.*`` / ``maglev_lb.*`` gauges Envoy's hash balancers publish."""
        self._scope = scope
        self.panic_counter = scope.counter("lb_healthy_panic")
        if self.policy == "RING_HASH":
            ring = ("size", "min_hashes_per_host", "max_hashes_per_host")
            self._gauges = {n: scope.gauge(f"ring_hash_lb.{n}") for n in ring}
        elif self.policy == "MAGLEV":
            maglev = ("min_entries_per_host", "max_entries_per_host")
            self._gauges = {n: scope.gauge(f"maglev_lb.{n}") for n in maglev}

    def _bind_from_hosts(self, hosts: Sequence[Host]) -> None:
        for h in hosts:
            info = h.cluster
            scope = getattr(getattr(info, "stats", None), "scope", None)
            if scope is not None:
                self.bind_stats(scope)
            return

    def _set_gauges(self, values: dict[str, int]) -> None:
        for k, v in values.items():
            g = self._gauges.get(k)
            if g is not None:
                g.set(v)

    # -- build -----------------------------------------------------------------------------
    def build(self, hosts: list[Host]) -> tuple[LoadBalancer, bool]:
        if self._scope is None and hosts:
            self._bind_from_hosts(hosts)
        state = compute_priority_state(
            hosts, self.overprovisioning_factor, self.panic_threshold, self.weighted_priority_health
        )
        table = state.table()
        used = {p for p, _ in table}
        all_panic = all(state.panic[p] for p in used)
        any_panic = any(state.panic[p] for p in used)
        if self.uses_hash:
            return self._build_hashing(state, table), all_panic
        sources: dict[tuple[int, bool], LoadBalancer] = {}
        entries: list[tuple[LoadBalancer, bool]] = []
        for p, degraded in table:
            src = sources.get((p, degraded))
            if src is None:
                src = sources[(p, degraded)] = self._source(state, p, degraded)
            entries.append((src, state.panic[p]))
        balancers = {id(e[0]) for e in entries}
        if len(balancers) == 1:
            return entries[0][0], all_panic
        lb_hosts: list[Host] = []
        for src in sources.values():
            lb_hosts.extend(src.hosts)
        counter = self.panic_counter if any_panic and not all_panic else None
        return PriorityLoadBalancer(lb_hosts, entries, counter), all_panic

    def _picker(self, hosts: list[Host], key: tuple[int, str, int]) -> LoadBalancer:
        policy = self.policy
        if policy == "ROUND_ROBIN":
            # Envoy keeps each host source's round robin index across rebuilds; a weighted
            # (EDF) schedule restarts from the balancer's seed.
            old = self._rr_pickers.get(key)
            index = self._rr_seed
            if old is not None and _weights_equal(hosts) and _weights_equal(old.hosts):
                index = old.index
            rr = RoundRobinLoadBalancer(hosts, index)
            self._rr_pickers[key] = rr
            return rr
        if policy == "LEAST_REQUEST":
            return LeastRequestLoadBalancer(
                hosts, self.choice_count, self.active_request_bias, self.full_scan
            )
        return RandomLoadBalancer(hosts)

    def _source(self, state: PriorityState, p: int, degraded: bool) -> LoadBalancer:
        level = state.levels[p]
        if state.panic[p]:
            return self._picker(level.hosts, (p, "all", 0))
        eligible = level.degraded if degraded else level.healthy
        kind = "degraded" if degraded else "healthy"
        if self.locality_weighted and eligible:
            chooser = self._locality_chooser(level, eligible, p, kind)
            if chooser is not None:
                return chooser
        if not eligible:
            return _NoHost([])
        return self._picker(eligible, (p, kind, 0))

    def _locality_chooser(
        self, level: _Level, eligible: list[Host], p: int, kind: str
    ) -> LoadBalancer | None:
        weights = _locality_weights(level)
        all_by = dict(_locality_groups(level.hosts))
        excluded_by = dict(_locality_groups(level.excluded))
        eligible_by = dict(_locality_groups(eligible))
        factor = self.overprovisioning_factor / 100.0
        entries: list[tuple[float, LoadBalancer]] = []
        for idx, loc in enumerate(sorted(all_by)):
            count = len(all_by[loc]) - len(excluded_by.get(loc, ()))
            if count <= 0:
                continue
            ratio = len(eligible_by.get(loc, ())) / count
            effective = weights.get(loc, 0) * min(1.0, factor * ratio)
            if effective > 0:
                entries.append(
                    (effective, self._picker(eligible_by[loc], (p, kind + "-locality", idx)))
                )
        if not entries:
            return None
        return _LocalityChooser(list(eligible), entries)

    def _build_hashing(
        self, state: PriorityState, table: list[tuple[int, bool]]
    ) -> HashingLoadBalancer:
        from pyenvoy.upstream.maglev import MaglevTable
        from pyenvoy.upstream.ring_hash import Ring, host_hash_key

        use_hostname = self.use_hostname_for_hashing

        def key_of(h: Host) -> bytes:
            return host_hash_key(h, use_hostname)

        rings: list[Any] = []
        lb_hosts: list[Host] = []
        for p, level in enumerate(state.levels):
            panic = state.panic[p]
            weighted, lo, hi = self._normalized_weights(level, panic)
            if self.policy == "RING_HASH":
                ring: Any = Ring(
                    weighted, lo, self.min_ring_size, self.max_ring_size, self.murmur, key_of
                )
                if weighted:
                    self._set_gauges(
                        {
                            "size": ring.size,
                            "min_hashes_per_host": ring.min_hashes_per_host,
                            "max_hashes_per_host": ring.max_hashes_per_host,
                        }
                    )
            else:
                ring = MaglevTable(weighted, hi, self.table_size, key_of)
                if weighted:
                    self._set_gauges(
                        {
                            "min_entries_per_host": ring.min_entries_per_host,
                            "max_entries_per_host": ring.max_entries_per_host,
                        }
                    )
            rings.append(ring if weighted else None)
            if any(pp == p for pp, _ in table):
                lb_hosts.extend(h for h, _ in weighted)
        entries = [(rings[p], state.panic[p]) for p, _ in table]
        used = {p for p, _ in table}
        partial = any(state.panic[p] for p in used) and not all(state.panic[p] for p in used)
        return HashingLoadBalancer(
            lb_hosts, entries, self.hash_policy, self.panic_counter if partial else None
        )

    def _normalized_weights(
        self, level: _Level, panic: bool
    ) -> tuple[list[tuple[Host, float]], float, float]:
        """Envoy's normalizeWeights: (host, weight) summing to 1, and the min/max weight."""
        out: list[tuple[Host, float]] = []
        lo, hi = 1.0, 0.0
        pool = level.hosts if panic else level.healthy
        groups: list[tuple[float, list[Host]]]
        weights = _locality_weights(level)
        if self.locality_weighted and weights:
            by_loc = dict(_locality_groups(pool))
            locs = sorted({h.locality for h in level.hosts})
            total = sum(weights.get(loc, 0) for loc in locs)
            if total == 0:
                return out, lo, hi
            groups = [
                (weights.get(loc, 0) / total, by_loc.get(loc, []))
                for loc in locs
                if weights.get(loc, 0)
            ]
        else:
            groups = [(1.0, pool)]
        for share, hosts in groups:
            wsum = sum(h.weight for h in hosts)
            for h in hosts:
                w = h.weight * share / wsum
                out.append((h, w))
                lo = min(lo, w)
                hi = max(hi, w)
        return out, lo, hi
