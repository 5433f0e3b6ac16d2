"""pyenvoy.timeouts: shared deadline queues used on the request path."""

from __future__ import annotations

import asyncio

from pyenvoy.timeouts import TimeoutQueue


async def test_due_entries_fire_in_order_and_cancelled_ones_never_fire() -> None:
    loop = asyncio.get_running_loop()
    q = TimeoutQueue(loop, 0.05)
    fired: list[int] = []
    entries = [q.add(lambda i=i: fired.append(i)) for i in range(5)]
    entries[1].cancel()
    entries[3].cancel()
    await asyncio.sleep(0.15)
    assert fired == [0, 2, 4]
    assert q.handle is None and not q.entries


async def test_cancelled_entries_do_not_pile_up() -> None:
    # Every request adds a route timeout and cancels it when the response arrives, long
    # before it is due: the queue must stay about as long as the requests in flight.
    loop = asyncio.get_running_loop()
    q = TimeoutQueue(loop, 15.0)
    in_flight = [q.add(lambda: None) for _ in range(3)]
    for _ in range(10_000):
        t = q.add(lambda: None)
        in_flight.append(t)
        in_flight.pop(0).cancel()
    assert len(q.entries) <= 4
    for t in in_flight:
        t.cancel()
    assert q.handle is not None
    q.handle.cancel()
