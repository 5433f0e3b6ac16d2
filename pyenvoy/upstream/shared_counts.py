"""Circuit-breaker counts shared by the worker processes of one pyenvoy process.

Envoy's ResourceManager is one per cluster for the whole process: its worker threads share
the counts, so ``max_requests: 2`` means 2 for the process ("this bound applies to the sum
of connections across all workers threads"). pyenvoy's workers are processes; this table
gives them the same, process-wide counts.

Strategy: the main process creates one shared-memory table (``os.memfd_create`` +
``mmap``) sized for its ``--concurrency`` and hands its fd to every worker in the ``init``
frame, with the listening sockets (pyenvoy.workers). A hot-restarted pyenvoy is another
process with its own table, as Envoy's counts are per process too.

Layout: a 64-byte header (magic, workers, capacity, block size), ``capacity`` 16-byte
keys, then ``capacity`` counter blocks. An entry is one cluster *config*: its key is a
digest of the cluster's serialized proto, so every worker that builds that cluster (at
startup, after a reload or from CDS) finds the same entry, and a modified cluster starts
from zero as Envoy's new ResourceManager does. Its block holds one int64 per (priority,
resource, worker), the ``workers`` counters of one (priority, resource) side by side.
Keys are found by open addressing (linear probing from the key's first 8 bytes); they are
never freed, so a probe stops at the first empty key. The keys sit together so probing
and zeroing read only them: the memfd is sparse and a block's pages are only touched once
its entry is used. Finding or allocating takes an ``fcntl`` lock on the memfd
(POSIX record locks work between processes even though they share one open file): that
happens only when a cluster is built, never per request. A full table answers None: the
caller then counts that cluster per worker (and says so in the log).

Counting: a worker only ever writes its own counter (single writer, no lock): it adds
each +1/-1 it makes, so two live incarnations of one cluster config in a worker (a
cluster changed back while requests of its earlier build still finish) add up correctly. The process-wide count is the sum
of the ``workers`` counters, read without a lock; as between Envoy's threads, a check and
the increment that follows it are not one atomic step. A worker zeroes its counters of
every entry before it builds anything (a restarted worker must not inherit the counts of
the one that died), and the main process zeroes a dead worker's counters as soon as it
sees the exit. The main process attaches no column: it only reads, to compute the
``circuit_breakers.*`` gauges (pyenvoy.upstream.circuit_breaker.publish_shared_gauges).
Entries are never freed: ``DEFAULT_CAPACITY`` distinct cluster configs per process life.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile

__all__ = [
    "RESOURCES",
    "SharedCounts",
    "SharedEntry",
    "install",
    "installed",
    "key_for",
]

MAGIC = b"PYECB\x00\x00\x01"
HEADER_SIZE = 64
KEY_SIZE = 16
DEFAULT_CAPACITY = 4096
PRIORITIES = 2
# The counted resources of one priority, in table order.
RESOURCES = ("connections", "pending_requests", "requests", "retries", "connection_pools")
_HEADER = struct.Struct("<8sIII")
_EMPTY = bytes(KEY_SIZE)


def key_for(config: bytes) -> bytes:
    """The table key of a cluster: a digest of its serialized proto (never all zeros)."""
    k = hashlib.blake2b(config, digest_size=KEY_SIZE).digest()
    return k if k != _EMPTY else b"\x01" + k[1:]


class SharedEntry:
    """One cluster's counters (entry ``slot``), as seen by one process (``index``: the
    worker writing, or None in the main process, which only reads)."""

    __slots__ = ("table", "slot", "index")

    def __init__(self, table: SharedCounts, slot: int, index: int | None) -> None:
        self.table = table
        self.slot = slot
        self.index = index

    def counters(self, priority: int, resource: int) -> memoryview:
        """The ``workers`` int64 counters of one (priority, resource): index it with the
        worker index, ``sum()`` it for the process-wide count."""
        t = self.table
        row = t.workers * 8
        start = t.block_offset(self.slot) + (priority * len(RESOURCES) + resource) * row
        return t.view[start : start + row].cast("q")

    def total(self, priority: int, resource: int) -> int:
        return sum(self.counters(priority, resource))


class SharedCounts:
    """The table of one pyenvoy process: ``create`` in the main process, ``attach`` in a
    worker (with its index)."""

    __slots__ = ("fd", "workers", "capacity", "block_size", "blocks", "size", "mm", "view", "index")

    def __init__(self, fd: int, index: int | None = None) -> None:
        self.fd = fd
        self.index = index
        head = os.pread(fd, _HEADER.size, 0)
        magic, workers, capacity, block_size = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError("not a pyenvoy circuit-breaker table")
        if index is not None and not 0 <= index < workers:
            raise ValueError(f"worker index {index} outside the table's {workers} workers")
        self.workers = workers
        self.capacity = capacity
        self.block_size = block_size
        self.blocks = HEADER_SIZE + capacity * KEY_SIZE  # (a multiple of 8)
        self.size = self.blocks + capacity * block_size
        self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)

    @classmethod
    def create(cls, workers: int, capacity: int = DEFAULT_CAPACITY) -> SharedCounts:
        """A new zeroed table for ``workers`` processes (the main process's; index None)."""
        if workers < 1 or capacity < 1:
            raise ValueError("a table needs at least one worker and one entry")
        block_size = PRIORITIES * len(RESOURCES) * workers * 8
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("pyenvoy-circuit-breakers", 0)
        else:  # not Linux: an unlinked temporary file does the same
            tmp = tempfile.TemporaryFile()
            fd = os.dup(tmp.fileno())
            tmp.close()
        try:
            os.ftruncate(fd, HEADER_SIZE + capacity * (KEY_SIZE + block_size))  # sparse: zeros
            os.pwrite(fd, _HEADER.pack(MAGIC, workers, capacity, block_size), 0)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, index: int) -> SharedCounts:
        """A worker's view of the table whose fd it received (it writes column ``index``)."""
        return cls(fd, index)

    def fileno(self) -> int:
        return self.fd

    def block_offset(self, slot: int) -> int:
        return self.blocks + slot * self.block_size

    # -- entries ---------------------------------------------------------------------------
    def _probe(self, key: bytes, allocate: bool) -> int | None:
        mm = self.mm
        cap = self.capacity
        slot = int.from_bytes(key[:8], "little") % cap
        for _ in range(cap):
            off = HEADER_SIZE + slot * KEY_SIZE
            k = mm[off : off + KEY_SIZE]
            if k == key:
                return slot
            if k == _EMPTY:
                if not allocate:
                    return None
                mm[off : off + KEY_SIZE] = key  # its counters are zero: never used before
                return slot
            slot = (slot + 1) % cap
        return None

    def _locked(self, key: bytes, allocate: bool) -> int | None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            return self._probe(key, allocate)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def entry(self, key: bytes) -> SharedEntry | None:
        """The entry of ``key``, allocated if new; None when the table is full."""
        slot = self._locked(key, True)
        return None if slot is None else SharedEntry(self, slot, self.index)

    def find(self, key: bytes) -> SharedEntry | None:
        """The entry of ``key`` if some process allocated it (never allocates)."""
        slot = self._locked(key, False)
        return None if slot is None else SharedEntry(self, slot, self.index)

    def zero_worker(self, index: int) -> None:
        """Zero worker ``index``'s counters in every entry (a new or dead worker's)."""
        if not 0 <= index < self.workers:
            return
        zero = bytes(8)
        mm = self.mm
        stride = self.workers * 8
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            for slot in range(self.capacity):
                off = HEADER_SIZE + slot * KEY_SIZE
                if mm[off : off + KEY_SIZE] == _EMPTY:
                    continue
                pos = self.block_offset(slot) + index * 8
                for _ in range(PRIORITIES * len(RESOURCES)):
                    mm[pos : pos + 8] = zero
                    pos += stride
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap and close (counter views still in use keep the mapping until dropped)."""
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


# The table of this worker process (None elsewhere): ResourceManagers built while one is
# installed count in it.
_installed: SharedCounts | None = None


def install(table: SharedCounts | None) -> None:
    """Make ``table`` the one this process's ResourceManagers count in (a worker, before
    it builds its clusters); None goes back to per-process counts."""
    global _installed
    _installed = table


def installed() -> SharedCounts | None:
    return _installed
