"""Writes that leave once per event-loop pass, as Envoy's ``ConnectionImpl::write`` does.

Strategy: Envoy's ``write()`` only moves the bytes into the connection's write buffer and
activates the socket's write event; the ``writev`` happens when the dispatcher runs that
event, after the other events that were ready in the same pass. So the responses and
upstream requests one pass produces leave together, and the peers (the client, the
upstream) wake once for several of them instead of once for each. Measured on this 2-core
machine with wrk and nginx: writing at once, every proxied request woke nginx 0.56 and wrk
0.63 times; Envoy's burst pattern wakes them about 0.2 times.

pyenvoy does the same with one ``WriteBatch`` per event loop. An owner (a downstream
``Connection``, an upstream HTTP/1 ``ActiveClient``) keeps what it is given in its ``_out``
list and queues itself the first time (``add``); ``run`` is one ``call_soon`` callback per
pass, so it comes after every I/O callback of that pass, and calls each owner's
``flush_writes()``, which hands all its bytes to the transport in one ``write``.
Everything that must keep its order with those bytes (``write_eof``, ``close``) flushes
first. A chunk of ``FLUSH_NOW_BYTES`` or more is flushed at once, so that the transport's
back-pressure (``pause_writing`` at the high watermark) stays as immediate for bulk bodies
as it was. An owner made outside a running loop gets no batch and writes at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["FLUSH_NOW_BYTES", "WriteBatch", "batch_for_running_loop"]

FLUSH_NOW_BYTES = 64 * 1024


class Flushable(Protocol):
    """What ``run`` needs of an owner (both owners also have ``flush_writes()``, the same
    steps, for the paths that must flush early)."""

    _out: list[bytes] | None
    transport: Any


class WriteBatch:
    """The owners with bytes waiting in one loop, flushed by one callback per pass."""

    __slots__ = ("loop", "pending", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[Flushable] = []
        self.scheduled = False

    def add(self, owner: Flushable) -> None:
        """Queue ``owner`` (which has just started an ``_out`` list) for this pass's flush."""
        self.pending.append(owner)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        """Flush every queued owner (in the order they were queued)."""
        self.scheduled = False
        pending = self.pending
        if not pending:
            return
        self.pending = []
        for owner in pending:
            # owner.flush_writes(), inlined: this runs for every write of every pass.
            out = owner._out
            if out is None:
                continue
            owner._out = None
            t = owner.transport
            if t is not None:
                t.write(out[0] if len(out) == 1 else b"".join(out))


_current: WriteBatch | None = None


def batch_for_running_loop() -> WriteBatch | None:
    """The running loop's batch (None outside a running loop: write at once)."""
    global _current
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    b = _current
    if b is None or b.loop is not loop:
        b = _current = WriteBatch(loop)
    return b
