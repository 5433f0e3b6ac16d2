"""The 64-bit hash functions Envoy's hash-based load balancers use.

Strategy: Envoy hashes everything (hash policy values, ring points, maglev offsets) with
xxHash64 (``HashUtil::xxHash64``), and optionally MurmurHash2-64 (libstdc++'s
``std::hash<std::string>``) for ring points. Bit-for-bit equal results matter: they decide
which host a key lands on, so pyenvoy and Envoy agree on the same upstream for the same
key. ``xxhash64`` uses the C ``xxhash`` package from PyPI when it is installed (about 0.2 µs
a call) and otherwise a pure-Python implementation of the same algorithm (about 10 µs for a
short key; only ring/table builds hash in bulk). Both are tested against each other.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["xxhash64", "xxhash64_py", "murmur_hash2_64", "MURMUR_STD_HASH_SEED", "HAVE_C_XXHASH"]

_M64 = 0xFFFFFFFFFFFFFFFF
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_UNPACK_4Q = struct.Struct("<4Q").unpack_from
_UNPACK_Q = struct.Struct("<Q").unpack_from
_UNPACK_I = struct.Struct("<I").unpack_from


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M64
    acc = ((acc << 31) | (acc >> 33)) & _M64
    return (acc * _P1) & _M64


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _M64


def xxhash64_py(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (pure Python)."""
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _M64
        v2 = (seed + _P2) & _M64
        v3 = seed & _M64
        v4 = (seed - _P1) & _M64
        limit = n - 32
        while p <= limit:
            a, b, c, d = _UNPACK_4Q(data, p)
            v1 = _round(v1, a)
            v2 = _round(v2, b)
            v3 = _round(v3, c)
            v4 = _round(v4, d)
            p += 32
        h = (
            ((v1 << 1) | (v1 >> 63))
            + ((v2 << 7) | (v2 >> 57))
            + ((v3 << 12) | (v3 >> 52))
            + ((v4 << 18) | (v4 >> 46))
        ) & _M64
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while p + 8 <= n:
        k1 = _round(0, _UNPACK_Q(data, p)[0])
        h ^= k1
        h = (((h << 27) | (h >> 37)) & _M64) * _P1 + _P4
        h &= _M64
        p += 8
    if p + 4 <= n:
        h ^= (_UNPACK_I(data, p)[0] * _P1) & _M64
        h = (((h << 23) | (h >> 41)) & _M64) * _P2 + _P3
        h &= _M64
        p += 4
    while p < n:
        h ^= (data[p] * _P5) & _M64
        h = ((((h << 11) | (h >> 53)) & _M64) * _P1) & _M64
        p += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    h ^= h >> 32
    return h


try:
    from xxhash import xxh64_intdigest as _c_xxh64

    def _xxhash64_c(data: bytes, seed: int = 0) -> int:
        return _c_xxh64(data, seed)

    xxhash64: Callable[..., int] = _xxhash64_c
    HAVE_C_XXHASH = True
except ImportError:  # pragma: no cover - depends on the environment
    xxhash64 = xxhash64_py
    HAVE_C_XXHASH = False

MURMUR_STD_HASH_SEED = 0xC70F6907
_MUL = 0xC6A4A7935BD1E995


def murmur_hash2_64(data: bytes, seed: int = MURMUR_STD_HASH_SEED) -> int:
    """libstdc++'s 64-bit ``_Hash_bytes`` (MurmurHash2-64A variant), as Envoy's MurmurHash."""
    n = len(data)
    aligned = n & ~7
    h = (seed ^ (n * _MUL)) & _M64
    for p in range(0, aligned, 8):
        k = (_UNPACK_Q(data, p)[0] * _MUL) & _M64
        k = ((k ^ (k >> 47)) * _MUL) & _M64
        h = ((h ^ k) * _MUL) & _M64
    if n & 7:
        k = int.from_bytes(data[aligned:], "little")
        h = ((h ^ k) * _MUL) & _M64
    h ^= h >> 47
    h = (h * _MUL) & _M64
    h ^= h >> 47
    return h
