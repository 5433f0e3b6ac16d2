"""Draining: asking downstream connections to finish, then closing what is left.

Strategy: Envoy drains a connection by answering its next request with
``connection: close`` (HTTP/1) rather than cutting it, so a client never sees a reset
mid-exchange. ``drain_connection`` does exactly that for pyenvoy's HTTP connection
manager: it marks the connection closing when no response is being written (the next
response carries ``connection: close`` and the connection then closes); if a response is
already on the wire it tries again a millisecond later. Idle connections are left open
for their next request (or for the end of the drain). Filters without that notion
(tcp_proxy) are only closed at the end.

A ``DrainSequence`` drains a set of connections over ``drain_time`` seconds: with the
``immediate`` strategy every connection at once; with ``gradual`` (the default) each one at
the moment Envoy's per-response coin (probability elapsed/T) would first say "close", sampled
from the connection's request rate so far (busy connections drain early, well before the end
of the period, where closing what is left could race a request); a connection with no
requests yet drains at a uniformly random moment of the period. Connections that arrive
while the sequence runs (a graceful /drain_listeners keeps accepting) join it: with
probability elapsed/T at once (Envoy would close their first response with that chance),
else at a random moment of what is left. When the period ends the sequence closes the
remaining connections (LDS removal/modification) or leaves them (/drain_listeners).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DrainSequence", "drain_connection", "hard_drain_connection"]


def _request_rate(conn: Any, now: float) -> float:
    """Requests per second the connection has served so far (0 if unknown)."""
    for f in conn.read_filters:
        n = getattr(f, "requests", None)
        start = getattr(f, "start", None)
        if isinstance(n, int) and isinstance(start, float) and n > 0:
            return n / max(0.05, now - start)
    return 0.0


def drain_connection(conn: Any) -> None:
    """Ask ``conn`` to finish: HTTP/1 answers its next request with ``connection: close``."""
    if conn.closed:
        return
    for f in conn.read_filters:
        soft = getattr(f, "drain_close", None)  # the HTTP connection manager
        if soft is not None:
            soft()


def hard_drain_connection(conn: Any) -> None:
    """Shutdown drain: idle HTTP connections close now, busy ones after their response."""
    if conn.closed:
        return
    for f in conn.read_filters:
        drain = getattr(f, "drain", None)
        if drain is not None:
            drain()


class DrainSequence:
    """Drain a listener's connections over ``drain_time`` seconds."""

    def __init__(
        self,
        drain_time: float,
        strategy: str = "gradual",
        close_at_end: bool = True,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.drain_time = max(0.0, drain_time)
        self.immediate = strategy == "immediate" or self.drain_time == 0
        self.close_at_end = close_at_end
        self.on_done = on_done
        self.start = time.monotonic()
        self.done = False
        self._loop = asyncio.get_running_loop()
        self._handles: list[asyncio.TimerHandle] = []
        self._end: asyncio.TimerHandle | None = self._loop.call_later(self.drain_time, self.finish)
        self.connections: set[Any] = set()

    def add(self, conn: Any) -> None:
        """Drain ``conn`` at its moment of the sequence (now if immediate)."""
        if self.done:
            return
        self.connections.add(conn)
        if self.immediate:
            self._loop.call_soon(drain_connection, conn)
            return
        now = time.monotonic()
        elapsed = now - self.start
        remaining = max(0.0, self.drain_time - elapsed)
        rate = _request_rate(conn, now)
        if rate > 0.0:
            # Envoy closes a response with probability t/T: a connection answering ``rate``
            # responses a second survives to t with probability exp(-rate (t² - e²) / 2T).
            # Sample that moment (busy connections drain early, well before the end).
            u = 1.0 - random.random()
            t = math.sqrt(elapsed * elapsed + 2.0 * self.drain_time * -math.log(u) / rate)
            delay = min(t - elapsed, remaining)
        elif random.random() * self.drain_time < elapsed:
            # Envoy's chance for a response at this point of the drain: close now.
            self._loop.call_soon(drain_connection, conn)
            return
        else:
            delay = random.uniform(0.0, remaining)
        self._handles.append(self._loop.call_later(delay, drain_connection, conn))

    def discard(self, conn: Any) -> None:
        self.connections.discard(conn)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for h in self._handles:
            h.cancel()
        self._handles.clear()
        if self._end is not None:
            self._end.cancel()
            self._end = None
        if self.close_at_end:
            for c in list(self.connections):
                if not c.closed:
                    c.close(flush=True)
        self.connections.clear()
        if self.on_done is not None:
            self.on_done()

    def cancel(self) -> None:
        """Stop the sequence without closing anything or calling ``on_done``."""
        self.on_done = None
        self.close_at_end = False
        self.finish()
