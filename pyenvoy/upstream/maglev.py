"""Maglev lookup table (Envoy's MAGLEV load balancer).

Strategy: Envoy's ``MaglevTable`` (Eisenbud et al., "Maglev", NSDI 2016, listing 1 with
weights): hosts sorted by hash key, each with ``offset = xxHash64(key) % M`` and
``skip = xxHash64(key, seed=1) % (M - 1) + 1``; rounds fill the table, a host taking a
turn only when ``round * weight >= target`` (its target grows by the max weight each turn),
walking its permutation ``offset + skip * next`` to the next free slot. Same inputs, same
table as Envoy, so a key picks the same host in both. Each entry keeps its current slot and
adds ``skip`` (mod M) rather than recomputing the permutation, which keeps a 65537-slot
build around 0.1 s in pure Python. A lookup is ``table[hash % M]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pyenvoy.upstream.hashing import xxhash64
from pyenvoy.upstream.ring_hash import host_hash_key

if TYPE_CHECKING:
    from pyenvoy.upstream.host import Host

__all__ = ["MaglevTable", "DEFAULT_TABLE_SIZE", "is_prime"]

DEFAULT_TABLE_SIZE = 65537


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


class MaglevTable:
    __slots__ = ("table", "size", "min_entries_per_host", "max_entries_per_host")

    def __init__(
        self,
        weighted: Sequence[tuple[Host, float]],
        max_normalized_weight: float,
        table_size: int = DEFAULT_TABLE_SIZE,
        key_of: Callable[[Host], bytes] | None = None,
    ) -> None:
        self.size = table_size
        self.table: list[Host] = []
        self.min_entries_per_host = 0
        self.max_entries_per_host = 0
        if not weighted:
            return
        key_fn = key_of or host_hash_key
        m = table_size
        keyed = sorted(((key_fn(h), i, h, w) for i, (h, w) in enumerate(weighted)), key=_key)
        n = len(keyed)
        hosts = [k[2] for k in keyed]
        weights = [k[3] for k in keyed]
        skips = [xxhash64(k[0], 1) % (m - 1) + 1 for k in keyed]
        pos = [xxhash64(k[0]) % m for k in keyed]  # offset + skip * next, kept incrementally
        targets = [0.0] * n
        counts = [0] * n
        owner = [-1] * m
        filled = 0
        iteration = 1
        while filled < m:
            for i in range(n):
                if iteration * weights[i] < targets[i]:
                    continue
                targets[i] += max_normalized_weight
                c = pos[i]
                skip = skips[i]
                while owner[c] >= 0:
                    c += skip
                    if c >= m:
                        c -= m
                owner[c] = i
                c += skip
                pos[i] = c - m if c >= m else c
                counts[i] += 1
                filled += 1
                if filled >= m:
                    break
            iteration += 1
        self.table = [hosts[i] for i in owner]
        self.min_entries_per_host = min(counts)
        self.max_entries_per_host = max(counts)

    def choose(self, h: int, attempt: int = 0) -> Host | None:
        table = self.table
        if not table:
            return None
        if attempt:
            h ^= (0xFFFFFFFFFFFFFFFF - attempt + 1) & 0xFFFFFFFFFFFFFFFF
        return table[h % self.size]


def _key(k: tuple[bytes, int, Host, float]) -> tuple[bytes, int]:
    return (k[0], k[1])
