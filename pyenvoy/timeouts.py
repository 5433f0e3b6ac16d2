"""Cheap timeouts for the hot path.

Strategy: most timeouts on the request path share a duration (every request on a route
has the same 15 s route timeout), so deadlines added to one ``TimeoutQueue`` arrive in
increasing order. A queue is a deque of entries plus at most one ``loop.call_later`` for
its head: adding is an append (after dropping cancelled entries at the head), cancelling
drops the entry's callback, and no timer handle is created or cancelled per request.
Queues are shared per event loop and duration.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class Timeout:
    """One entry of a TimeoutQueue (made by ``TimeoutQueue.add``): its loop-time
    ``deadline`` and its ``callback``, None once cancelled or fired."""

    __slots__ = ("deadline", "callback")

    deadline: float
    callback: Callable[[], Any] | None

    def cancel(self) -> None:
        self.callback = None

    @property
    def cancelled(self) -> bool:
        return self.callback is None


_new_timeout = object.__new__


class TimeoutQueue:
    __slots__ = ("loop", "seconds", "entries", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = loop
        self.seconds = seconds
        self.entries: deque[Timeout] = deque()
        self.handle: asyncio.TimerHandle | None = None

    def add(self, callback: Callable[[], Any]) -> Timeout:
        # A Timeout has no __init__: its two fields are set here (one Python call per
        # timeout, this one, not two).
        t = _new_timeout(Timeout)
        t.deadline = deadline = self.loop.time() + self.seconds
        t.callback = callback
        entries = self.entries
        # Most entries are cancelled long before they are due (a 15 s route timeout, a
        # response in milliseconds): drop cancelled ones from the head as we go, so the
        # queue holds about the in-flight entries, not every request of the last 15 s
        # (memory, and garbage-collector passes over them).
        while entries and entries[0].callback is None:
            entries.popleft()
        entries.append(t)
        if self.handle is None:
            self.handle = self.loop.call_at(deadline, self._fire)
        return t

    def _fire(self) -> None:
        self.handle = None
        entries = self.entries
        now = self.loop.time()
        while entries:
            t = entries[0]
            callback = t.callback
            if callback is None:
                entries.popleft()
                continue
            if t.deadline > now:
                break
            entries.popleft()
            t.callback = None
            try:
                callback()
            except Exception:  # a failing callback must not stop the others
                import logging

                logging.getLogger("pyenvoy.misc").exception("timeout callback failed")
        # Skip cancelled heads so the next wake-up is for a live entry.
        while entries and entries[0].callback is None:
            entries.popleft()
        if entries:
            self.handle = self.loop.call_at(entries[0].deadline, self._fire)


_queues: dict[tuple[int, float], TimeoutQueue] = {}


def queue_for(seconds: float, loop: asyncio.AbstractEventLoop | None = None) -> TimeoutQueue:
    """The shared queue for ``seconds`` on ``loop`` (the running loop by default)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    key = (id(loop), seconds)
    q = _queues.get(key)
    if q is None or q.loop is not loop:
        q = _queues[key] = TimeoutQueue(loop, seconds)
    return q


def add_timeout(seconds: float, callback: Callable[[], Any]) -> Timeout:
    return queue_for(seconds).add(callback)
