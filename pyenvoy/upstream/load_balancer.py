"""Load balancers: pick a host from a cluster's healthy set.

Strategy: a load balancer is rebuilt (cheaply) whenever the host set changes, so
``choose_host`` only indexes into a precomputed list. Weighted round robin expands weights
into a schedule (smooth weighted RR, as Envoy's EDF scheduler yields the same proportions).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyenvoy.upstream.host import Host


class LoadBalancer:
    __slots__ = ("hosts",)

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts

    def choose_host(self, context: Any = None) -> Host | None:
        raise NotImplementedError


class RoundRobinLoadBalancer(LoadBalancer):
    __slots__ = ("schedule", "index")

    def __init__(self, hosts: list[Host]) -> None:
        super().__init__(hosts)
        self.schedule = self._build_schedule(hosts)
        # Envoy starts round robin at a random offset so many proxies don't stampede host 0.
        self.index = random.randrange(len(self.schedule)) if self.schedule else 0

    @staticmethod
    def _build_schedule(hosts: list[Host]) -> list[Host]:
        if not hosts:
            return []
        weights = [max(1, h.weight) for h in hosts]
        if all(w == weights[0] for w in weights):
            return list(hosts)
        # Smooth weighted round robin: each host appears weight times, interleaved.
        total = sum(weights)
        current = [0] * len(hosts)
        out: list[Host] = []
        for _ in range(total):
            for i, w in enumerate(weights):
                current[i] += w
            best = max(range(len(hosts)), key=current.__getitem__)
            current[best] -= total
            out.append(hosts[best])
        return out

    def choose_host(self, context: Any = None) -> Host | None:
        schedule = self.schedule
        if not schedule:
            return None
        i = self.index
        if i >= len(schedule):
            i = 0
        self.index = i + 1
        return schedule[i]


class RandomLoadBalancer(LoadBalancer):
    __slots__ = ()

    def choose_host(self, context: Any = None) -> Host | None:
        hosts = self.hosts
        if not hosts:
            return None
        return hosts[random.randrange(len(hosts))]


class LeastRequestLoadBalancer(LoadBalancer):
    """Power of ``choice_count`` choices on active requests (Envoy's default of 2)."""

    __slots__ = ("choice_count",)

    def __init__(self, hosts: list[Host], choice_count: int = 2) -> None:
        super().__init__(hosts)
        self.choice_count = max(2, choice_count)

    def choose_host(self, context: Any = None) -> Host | None:
        hosts = self.hosts
        n = len(hosts)
        if n == 0:
            return None
        if n == 1:
            return hosts[0]
        best = hosts[random.randrange(n)]
        for _ in range(self.choice_count - 1):
            cand = hosts[random.randrange(n)]
            if cand.stats.rq_active.value < best.stats.rq_active.value:
                best = cand
        return best


LB_POLICIES = {
    "ROUND_ROBIN": RoundRobinLoadBalancer,
    "RANDOM": RandomLoadBalancer,
    "LEAST_REQUEST": LeastRequestLoadBalancer,
}


class LoadBalancerContext:
    """What a request offers a load balancer: headers and stream info (for hash policies).

    The router creates one only when the cluster's load balancer ``uses_hash``."""

    __slots__ = ("headers", "stream_info", "hash_policy")

    def __init__(self, headers: Any, stream_info: Any, hash_policy: Any) -> None:
        self.headers = headers
        self.stream_info = stream_info
        self.hash_policy = hash_policy

    def compute_hash(self) -> int | None:
        """The request's hash from the route's hash_policy (None: no policy produced one)."""
        return None


class LoadBalancerFactory:
    """A cluster's load-balancing settings, compiled once from its proto.

    ``build(hosts)`` turns the cluster's full host list (with health flags and priorities)
    into the load balancer used until the next host or health change, and says whether the
    cluster is in panic mode (too few healthy hosts: balance over all of them)."""

    def __init__(self, proto: Any, path: str) -> None:
        from pyenvoy.config.errors import ConfigError

        if proto.HasField("load_balancing_policy"):
            raise ConfigError(
                "load_balancing_policy is not supported by pyenvoy yet; use lb_policy",
                f"{path}.load_balancing_policy",
            )
        self.policy = proto.LbPolicy.Name(proto.lb_policy)
        if self.policy not in LB_POLICIES:
            raise ConfigError(
                f"lb_policy {self.policy} is not supported by pyenvoy yet", f"{path}.lb_policy"
            )
        self.lb_class = LB_POLICIES[self.policy]
        self.uses_hash = False
        self.choice_count = 2
        if proto.HasField("least_request_lb_config") and proto.least_request_lb_config.HasField(
            "choice_count"
        ):
            self.choice_count = proto.least_request_lb_config.choice_count.value
        self.panic_threshold = 50.0
        cl = proto.common_lb_config
        if cl.HasField("healthy_panic_threshold"):
            self.panic_threshold = cl.healthy_panic_threshold.value

    def build(self, hosts: list[Host]) -> tuple[LoadBalancer, bool]:
        healthy = [h for h in hosts if not h.health_flags]
        total = len(hosts)
        # Panic mode (healthy_panic_threshold, default 50%): too few healthy hosts, so
        # balance over all of them rather than overload the few (Envoy's behaviour).
        panic = total == 0 or len(healthy) * 100 < self.panic_threshold * total
        if panic and total:
            healthy = list(hosts)
        if healthy:
            # Only the highest-priority level with hosts takes traffic (no spillover maths yet).
            top = min(h.priority for h in healthy)
            healthy = [h for h in healthy if h.priority == top]
        if self.lb_class is LeastRequestLoadBalancer:
            return LeastRequestLoadBalancer(healthy, self.choice_count), panic
        return self.lb_class(healthy), panic
