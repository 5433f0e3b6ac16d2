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
