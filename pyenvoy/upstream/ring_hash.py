"""Ketama-style consistent hash ring (Envoy's RING_HASH load balancer).

Strategy: built once per host-set change from (host, normalized weight) pairs exactly as
Envoy's ``RingHashLoadBalancer::Ring`` does, so a key maps to the same host in pyenvoy and
in Envoy: the scale makes the lightest host get ``ceil(min_weight * minimum_ring_size)``
points (capped at ``maximum_ring_size`` in total), each host's points are the hashes of
``"<address>_<i>"`` (xxHash64 or MurmurHash2-64), running sums keep fractional shares
stable, and the points are sorted. A lookup is ``bisect_left`` on the sorted hashes
(the first point >= the key's hash, wrapping to the first point).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pyenvoy.upstream.hashing import murmur_hash2_64, xxhash64

if TYPE_CHECKING:
    from pyenvoy.upstream.host import Host

__all__ = ["Ring", "DEFAULT_MIN_RING_SIZE", "DEFAULT_MAX_RING_SIZE"]

DEFAULT_MIN_RING_SIZE = 1024
DEFAULT_MAX_RING_SIZE = 1024 * 1024 * 8


class Ring:
    """A sorted ring of (hash, host) points."""

    __slots__ = ("hashes", "hosts", "size", "min_hashes_per_host", "max_hashes_per_host")

    def __init__(
        self,
        weighted: Sequence[tuple[Host, float]],
        min_normalized_weight: float,
        min_ring_size: int = DEFAULT_MIN_RING_SIZE,
        max_ring_size: int = DEFAULT_MAX_RING_SIZE,
        murmur: bool = False,
        key_of: Callable[[Host], bytes] | None = None,
    ) -> None:
        self.hashes: list[int] = []
        self.hosts: list[Host] = []
        self.size = 0
        self.min_hashes_per_host = 0
        self.max_hashes_per_host = 0
        if not weighted:
            return
        scale = min(
            math.ceil(min_normalized_weight * min_ring_size) / min_normalized_weight,
            float(max_ring_size),
        )
        ring_size = math.ceil(scale)
        hash_fn = murmur_hash2_64 if murmur else xxhash64
        key_fn = key_of or host_hash_key
        points: list[tuple[int, int]] = []
        owners: list[Host] = []
        current = 0.0
        target = 0.0
        min_hashes = ring_size
        max_hashes = 0
        for host, weight in weighted:
            prefix = key_fn(host) + b"_"
            owner = len(owners)
            owners.append(host)
            target += scale * weight
            i = 0
            while current < target:
                points.append((hash_fn(prefix + str(i).encode()), owner))
                i += 1
                current += 1
            min_hashes = min(min_hashes, i)
            max_hashes = max(max_hashes, i)
        points.sort(key=_first)
        self.hashes = [p[0] for p in points]
        self.hosts = [owners[p[1]] for p in points]
        self.size = ring_size
        self.min_hashes_per_host = min_hashes
        self.max_hashes_per_host = max_hashes

    def choose(self, h: int, attempt: int = 0) -> Host | None:
        hashes = self.hashes
        if not hashes:
            return None
        i = bisect_left(hashes, h)
        if i == len(hashes):
            i = 0
        if attempt:
            i = (i + attempt) % len(hashes)
        return self.hosts[i]


def _first(p: tuple[int, int]) -> int:
    return p[0]


def host_hash_key(host: Host, use_hostname: bool = False) -> bytes:
    """What a host is hashed by: ``envoy.lb`` metadata ``hash_key``, else address or hostname."""
    md = host.metadata
    if md is not None:
        try:
            lb = md.filter_metadata["envoy.lb"] if "envoy.lb" in md.filter_metadata else None
        except (AttributeError, TypeError):
            lb = None
        if lb is not None and "hash_key" in lb.fields:
            v = lb.fields["hash_key"]
            if v.WhichOneof("kind") == "string_value" and v.string_value:
                return v.string_value.encode()
    if use_hostname:
        return host.hostname.encode()
    host_ip, port = host.address[0], host.address[1]
    return (f"[{host_ip}]:{port}" if ":" in host_ip else f"{host_ip}:{port}").encode()
