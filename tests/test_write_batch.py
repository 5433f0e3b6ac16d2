"""Writes leave once per loop pass (pyenvoy.network.write_batch): what a downstream
Connection or an upstream ActiveClient is given during one pass reaches the transport as one
write at the end of the pass, in order, and everything that must follow those bytes (FIN,
close) flushes them first."""

from __future__ import annotations

import asyncio
from typing import Any

from pyenvoy.network import write_batch
from pyenvoy.network.connection import Connection
from pyenvoy.upstream.conn_pool import ActiveClient
from tests.support.memory import InMemoryProxy, MemoryTransport


class RecordingTransport(MemoryTransport):
    """MemoryTransport that also records the order of writes, FINs and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.events.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.events.append(("eof",))

    def close(self) -> None:
        super().close()
        self.events.append(("close",))

    def abort(self) -> None:
        super().abort()
        self.events.append(("abort",))


def _connection() -> tuple[Connection, RecordingTransport]:
    conn = Connection([])
    t = RecordingTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


async def _next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_pass_leave_as_one_write_at_its_end() -> None:
    conn, t = _connection()
    conn.write(b"HTTP/1.1 200 OK\r\n")
    conn.write(b"content-length: 2\r\n\r\n")
    conn.write(b"ok")
    assert t.events == []  # nothing before the end of the pass
    assert conn.bytes_sent == len(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await _next_pass()
    assert t.events == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]
    conn.write(b"next")
    await _next_pass()
    assert t.events[1:] == [("write", b"next")]


async def test_one_callback_flushes_every_connection_of_the_pass_in_order() -> None:
    (a, ta), (b, tb) = _connection(), _connection()
    assert a._batch is b._batch is not None
    a.write(b"a1")
    b.write(b"b1")
    a.write(b"a2")
    assert a._batch is not None and a._batch.pending == [a, b]
    await _next_pass()
    assert ta.events == [("write", b"a1a2")] and tb.events == [("write", b"b1")]
    assert a._batch.pending == [] and not a._batch.scheduled


async def test_end_stream_and_close_flush_first() -> None:
    conn, t = _connection()
    conn.write(b"head")
    conn.write(b"body", end_stream=True)
    assert t.events == [("write", b"headbody"), ("eof",)]
    conn2, t2 = _connection()
    conn2.write(b"bye")
    conn2.close()
    assert t2.events == [("write", b"bye"), ("close",)]
    await _next_pass()  # the pass's callback finds nothing left to write
    assert t.events == [("write", b"headbody"), ("eof",)]
    assert t2.events == [("write", b"bye"), ("close",)]


async def test_abort_drops_what_waits() -> None:
    conn, t = _connection()
    conn.write(b"never")
    conn.close(flush=False)
    await _next_pass()
    assert t.events == [("abort",)]


async def test_a_large_chunk_goes_out_at_once() -> None:
    conn, t = _connection()
    conn.write(b"head")
    big = b"x" * write_batch.FLUSH_NOW_BYTES
    conn.write(big)
    assert t.events == [("write", b"head" + big)]  # back-pressure sees it now


def test_outside_a_running_loop_writes_go_out_at_once() -> None:
    conn, t = _connection()
    assert conn._batch is None
    conn.write(b"now")
    assert t.events == [("write", b"now")]


async def test_upstream_request_head_and_body_leave_together() -> None:
    proxy = InMemoryProxy()
    client: ActiveClient = proxy.client
    up = RecordingTransport()
    client.transport = up  # type: ignore[assignment]
    client.encode_headers(b"POST", b"/x", [[b"host", b"h"], [b"content-length", b"4"]], False)
    client.encode_data(b"da", False)
    client.encode_data(b"ta", True)
    assert up.events == []
    proxy.flush()
    ((kind, data),) = up.events
    assert kind == "write" and data.startswith(b"POST /x HTTP/1.1\r\n") and data.endswith(b"data")
    client.encode_data(b"more", False)
    client.close()
    assert up.events[1:] == [("write", b"more"), ("close",)]


async def test_each_loop_gets_its_own_batch() -> None:
    conn, _ = _connection()
    batch = conn._batch
    assert batch is not None and batch.loop is asyncio.get_running_loop()
    assert write_batch.batch_for_running_loop() is batch
