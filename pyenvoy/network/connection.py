"""A downstream connection: the asyncio Protocol that owns one accepted socket.

Strategy: the transport delivers bytes straight to the read filter chain (normally a
single terminal filter, so ``data_received`` is one call). Back-pressure is the
transport's own: when our write buffer passes the high watermark asyncio calls
``pause_writing`` and we tell every registered ConnectionCallbacks, which pause whatever
feeds us (the upstream). ``read_disable`` is counted, as in Envoy, so two independent
reasons to stop reading need two enables.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyenvoy.network import filter as nf
from pyenvoy.network import write_batch

if TYPE_CHECKING:
    from pyenvoy.network.filter import ConnectionCallbacks, ReadFilter

log = logging.getLogger("pyenvoy.connection")

DEFAULT_BUFFER_LIMIT = 1024 * 1024
_ids = itertools.count(1)


def sockname(sock_addr: Any) -> tuple[str, int] | None:
    if isinstance(sock_addr, tuple) and len(sock_addr) >= 2:
        return (sock_addr[0], sock_addr[1])
    return None


class Connection(asyncio.Protocol):
    __slots__ = (
        "id",
        "transport",
        "remote_address",
        "local_address",
        "read_filters",
        "_first_filter",
        "callbacks",
        "closed",
        "local_close",
        "_read_disable_count",
        "above_high_watermark",
        "listener",
        "_filter_factories",
        "buffer_limit",
        "start_monotonic",
        "stats",
        "half_close",
        "bytes_received",
        "bytes_sent",
        "_out",
        "_batch",
        "peer_closed",
    )

    def __init__(
        self,
        filter_factories: Sequence[Callable[[], ReadFilter]],
        listener: Any = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.remote_address: tuple[str, int] | None = None
        self.local_address: tuple[str, int] | None = None
        self.read_filters: list[ReadFilter] = []
        self._first_filter: ReadFilter | None = None
        self.callbacks: list[ConnectionCallbacks] = []
        self.closed = False
        self.local_close = False
        self._read_disable_count = 0
        self.above_high_watermark = False
        self.listener = listener
        self._filter_factories = filter_factories
        self.buffer_limit = buffer_limit
        self.start_monotonic = 0.0
        # Listener-level stats object (or None); see listener.ListenerStats.
        self.stats = getattr(listener, "stats", None)
        self.half_close = False
        # A FIN arrived while half-close was off: whoever closes the socket afterwards, the
        # close is the peer's (Envoy's ConnectionImpl raises RemoteClose for it).
        self.peer_closed = False
        self.bytes_received = 0
        self.bytes_sent = 0
        # Bytes written during this loop pass, sent as one transport write at its end
        # (pyenvoy.network.write_batch); None while nothing waits.
        self._out: list[bytes] | None = None
        self._batch: write_batch.WriteBatch | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._batch = write_batch.batch_for_running_loop()
        self.start_monotonic = time.monotonic()
        self.remote_address = sockname(transport.get_extra_info("peername"))
        self.local_address = sockname(transport.get_extra_info("sockname"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        limit = self.buffer_limit
        self.transport.set_write_buffer_limits(high=limit, low=limit // 2)  # type: ignore[union-attr]
        if self.listener is not None:
            self.listener.on_connection_open(self)
        filters = [make() for make in self._filter_factories]
        self.read_filters = filters
        self._first_filter = filters[0] if len(filters) == 1 else None
        for f in filters:
            f.initialize_read_filter_callbacks(self)
        for f in filters:
            if self.closed:
                break
            if f.on_new_connection() == nf.STOP_ITERATION:
                break

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        first = self._first_filter
        if first is not None:
            first.on_data(data, False)
            return
        for f in self.read_filters:
            if f.on_data(data, False) == nf.STOP_ITERATION:
                return

    def eof_received(self) -> bool:
        if not self.half_close:
            self.peer_closed = True
        for f in self.read_filters:
            if f.on_data(b"", True) == nf.STOP_ITERATION:
                break
        # Keep the transport open (half-close) only if a filter asked for it.
        return self.half_close and not self.closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.transport is None:
            return
        self.closed = True
        self.transport = None
        self._out = None
        event = nf.LOCAL_CLOSE if self.local_close and not self.peer_closed else nf.REMOTE_CLOSE
        for cb in list(self.callbacks):
            try:
                cb.on_event(event)
            except Exception:
                log.exception("connection callback failed on close")
        self.callbacks.clear()
        if self.listener is not None:
            self.listener.on_connection_close(self)

    def pause_writing(self) -> None:
        self.above_high_watermark = True
        for cb in list(self.callbacks):
            cb.on_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        self.above_high_watermark = False
        for cb in list(self.callbacks):
            cb.on_below_write_buffer_low_watermark()

    # --- API for filters ----------------------------------------------------------------
    def add_connection_callbacks(self, cb: ConnectionCallbacks) -> None:
        self.callbacks.append(cb)

    def remove_connection_callbacks(self, cb: ConnectionCallbacks) -> None:
        try:
            self.callbacks.remove(cb)
        except ValueError:
            pass

    def write(self, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` (then a FIN with ``end_stream``): queued until the end of this loop
        pass and sent with whatever else this pass writes here (write_batch)."""
        t = self.transport
        if t is None:
            return
        if data:
            self.bytes_sent += len(data)
            write_batch.send(self, t, data)
        if end_stream:
            self.flush_writes()
            try:
                t.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                pass

    def flush_writes(self) -> None:
        """Hand what this pass wrote to the transport now (one write)."""
        write_batch.flush(self)

    def close(self, flush: bool = True) -> None:
        """Close the connection; ``flush`` writes out what is buffered first."""
        t = self.transport
        if t is None or self.local_close:
            return
        self.local_close = True
        if flush:
            self.flush_writes()
            t.close()
        else:
            self._out = None
            t.abort()

    def read_disable(self, disable: bool) -> None:
        t = self.transport
        if disable:
            self._read_disable_count += 1
            if self._read_disable_count == 1 and t is not None:
                try:
                    t.pause_reading()
                except RuntimeError:
                    pass
        else:
            if self._read_disable_count == 0:
                return
            self._read_disable_count -= 1
            if self._read_disable_count == 0 and t is not None:
                try:
                    t.resume_reading()
                except RuntimeError:
                    pass

    @property
    def reading_enabled(self) -> bool:
        return self._read_disable_count == 0

    def enable_half_close(self, enabled: bool) -> None:
        self.half_close = enabled
