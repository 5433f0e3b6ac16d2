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
pass, so it comes after every I/O callback of that pass, and ``flush``es each owner: all its
bytes go to the transport in one ``write``. ``send`` and ``flush`` are the only code that
queues or writes an owner's ``_out`` (an abort just drops it).
Everything that must keep its order with those bytes (``write_eof``, ``close``) flushes
first. A chunk of ``FLUSH_NOW_BYTES`` or more is flushed at once, so that the transport's
back-pressure (``pause_writing`` at the high watermark) stays as immediate for bulk bodies
as it was. An owner made outside a running loop gets no batch and writes at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["FLUSH_NOW_BYTES", "WriteBatch", "batch_for_running_loop", "flush", "send"]

FLUSH_NOW_BYTES = 64 * 1024


class Flushable(Protocol):
    """An owner of a transport whose writes wait here: its bytes of this pass (``_out``),
    its loop's batch (``_batch``, None: write at once) and the transport."""

    _out: list[bytes] | None
    _batch: WriteBatch | None
    transport: Any


def send(owner: Flushable, transport: Any, data: bytes) -> None:
    """Queue ``data`` (non-empty) for the end of this pass, after what ``owner`` already
    queued; a chunk of FLUSH_NOW_BYTES or more goes out at once, with them."""
    out = owner._out
    if out is not None:
        out.append(data)
    else:
        batch = owner._batch
        if batch is None:
            transport.write(data)
            return
        owner._out = [data]
        batch.add(owner)
    if len(data) >= FLUSH_NOW_BYTES:
        flush(owner)


def flush(owner: Flushable) -> None:
    """Hand what ``owner`` queued to its transport now, as one write."""
    out = owner._out
    if out is None:
        return
    owner._out = None
    t = owner.transport
    if t is not None:
        t.write(out[0] if len(out) == 1 else b"".join(out))


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
            flush(owner)


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
