"""HTTP/1.1 upstream connection pool, one per (cluster, host).

Strategy: one request at a time per connection, keep-alive reuse through a LIFO idle list
(the warmest connection first). A request that finds no idle connection is queued as
pending and a new connection is started for it; whichever connection becomes ready first
serves the oldest pending request. Idle connections are reaped by one pool-wide sweep timer
instead of a timer per request. The upstream codec is the same hand-written parser as the
downstream side (``pyenvoy.http.http1.ResponseParser``) and its callbacks go straight to
the router's upstream request object.

Callbacks a stream (the router's UpstreamRequest) provides:
  on_pool_ready(client), on_pool_failure(reason, transport_failure_reason),
  on_upstream_headers(status, headers, keep_alive, end_stream), on_upstream_data(data, end_stream),
  on_upstream_informational(status, headers), on_upstream_reset(reason),
  on_upstream_above_write_buffer_high_watermark(), on_upstream_below_write_buffer_low_watermark()
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from pyenvoy.http import http1

if TYPE_CHECKING:
    from pyenvoy.upstream.cluster_manager import ClusterInfo
    from pyenvoy.upstream.host import Host

log = logging.getLogger("pyenvoy.pool")

# Envoy's reset reason texts (Http::Utility::resetReasonToString).
CONNECTION_FAILURE = "remote connection failure"
CONNECTION_TERMINATION = "connection termination"
LOCAL_RESET = "local reset"
REMOTE_RESET = "remote reset"
OVERFLOW = "overflow"
CONNECTION_TIMEOUT = "connection timeout"
PROTOCOL_ERROR = "protocol error"


def transport_failure_text(exc: BaseException | None) -> str:
    """Envoy-style transport failure reason for a failed connect."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"delayed connect error: {os.strerror(exc.errno)}"
    if isinstance(exc, OSError):
        return f"delayed connect error: {exc}"
    return ""


class ActiveClient(asyncio.Protocol):
    """One upstream HTTP/1.1 connection."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "stream",
        "connected",
        "closed",
        "requests",
        "idle_since",
        "start",
        "remote_close_expected",
        "keep_alive",
        "response_complete",
        "request_complete",
        "stats",
        "local_close",
        "read_disabled",
        "_connect_start",
        "held_body",
    )

    def __init__(self, pool: Http1ConnPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = http1.ResponseParser(self)
        self.stream: Any = None
        self.connected = False
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self.start = time.monotonic()
        self._connect_start = self.start
        self.remote_close_expected = False
        self.keep_alive = True
        self.response_complete = False
        self.request_complete = False
        self.stats = pool.info.stats
        self.local_close = False
        self.read_disabled = False
        self.held_body: bytes | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        limit = self.pool.info.per_connection_buffer_limit_bytes
        self.transport.set_write_buffer_limits(high=limit, low=limit // 2)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        if self.stream is None:
            # Bytes while idle: a protocol error (or an early close notice); drop the connection.
            self.stats.upstream_cx_protocol_error.inc()
            self.close()
            return
        conn = self.stream.downstream_connection
        conn.cork()
        try:
            self.parser.feed(data)
            # Body bytes held back in case the end of the message followed in this read.
            held = self.held_body
            if held is not None:
                self.held_body = None
                stream = self.stream
                if stream is not None:
                    stream.on_upstream_data(held, False)
        except http1.ParseError as e:
            self.held_body = None
            self.stats.upstream_cx_protocol_error.inc()
            log.debug("upstream protocol error from %s: %s", self.pool.host.address, e.details)
            self._fail_stream(PROTOCOL_ERROR)
            self.close()
        finally:
            conn.uncork()

    def eof_received(self) -> bool:
        stream = self.stream
        if stream is not None:
            try:
                self.parser.feed_eof()
            except http1.ParseError:
                pass
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport = None
        stats = self.stats
        stats.upstream_cx_active.dec()
        self.pool.host.stats.cx_active.dec()
        stats.upstream_cx_destroy.inc()
        if self.local_close:
            stats.upstream_cx_destroy_local.inc()
        else:
            stats.upstream_cx_destroy_remote.inc()
        stats.upstream_cx_length_ms.record((time.monotonic() - self.start) * 1000)
        if self.stream is not None:
            stats.upstream_cx_destroy_with_active_rq.inc()
            if self.local_close:
                stats.upstream_cx_destroy_local_with_active_rq.inc()
            else:
                stats.upstream_cx_destroy_remote_with_active_rq.inc()
            self._fail_stream(LOCAL_RESET if self.local_close else CONNECTION_TERMINATION)
        self.pool.on_client_closed(self)

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_below_write_buffer_low_watermark()

    # --- response parser handler ---------------------------------------------------------
    def on_response_headers(
        self, status: int, version: int, headers: list[list[bytes]], keep_alive: bool, has_body: bool
    ) -> None:
        self.keep_alive = keep_alive
        stream = self.stream
        if stream is None:
            self.stats.upstream_cx_protocol_error.inc()
            self.close(abort=True)
            return
        stream.on_upstream_headers(status, headers, keep_alive, not has_body)

    def on_informational(self, status: int, headers: list[list[bytes]]) -> None:
        if self.stream is not None:
            self.stream.on_upstream_informational(status, headers)

    def on_body(self, data: bytes) -> None:
        # Hold the chunk until the parser returns: if the message ends in the same read,
        # body and end of stream go downstream as one call.
        held = self.held_body
        self.held_body = data
        if held is not None:
            stream = self.stream
            if stream is not None:
                stream.on_upstream_data(held, False)

    def on_message_complete(self) -> None:
        self.response_complete = True
        if not self.request_complete:
            # The response finished before the request body: the upstream won't read the
            # rest, so this connection can't be reused (Envoy closes it too).
            self.keep_alive = False
        held = self.held_body
        self.held_body = None
        stream = self.stream
        if stream is not None:
            stream.on_upstream_data(held if held is not None else b"", True)
        self._release()

    # --- API for the router --------------------------------------------------------------
    def encode_headers(self, method: bytes, target: bytes, headers: list[list[bytes]], end_stream: bool) -> None:
        self.requests += 1
        self.request_complete = end_stream
        self.response_complete = False
        self.parser.expect_response(method)
        data = http1.encode_request_head(method, target, headers)
        self.stats.upstream_cx_tx_bytes_total.value += len(data)
        t = self.transport
        if t is not None:
            t.write(data)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        t = self.transport
        if t is None:
            return
        if data:
            self.stats.upstream_cx_tx_bytes_total.value += len(data)
            t.write(data)
        if end_stream:
            self.request_complete = True
            if self.response_complete:
                self._release()

    def read_disable(self, disable: bool) -> None:
        t = self.transport
        if t is None or disable == self.read_disabled:
            return
        self.read_disabled = disable
        try:
            if disable:
                t.pause_reading()
            else:
                t.resume_reading()
        except RuntimeError:
            pass

    def reset(self) -> None:
        """The stream gave up on this request: the connection can't be reused."""
        self.stream = None
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        t = self.transport
        if t is None or self.local_close:
            return
        self.local_close = True
        if abort:
            t.abort()
        else:
            t.close()

    @property
    def above_high_watermark(self) -> bool:
        t = self.transport
        return t is not None and t.get_write_buffer_size() > self.pool.info.per_connection_buffer_limit_bytes

    # --- internals ----------------------------------------------------------------------
    def _release(self) -> None:
        if self.stream is None or not self.response_complete:
            return
        if not self.request_complete and self.keep_alive:
            return
        self.stream = None
        self.pool.host.stats.rq_active.dec()
        if self.read_disabled:
            self.read_disable(False)
        max_rq = self.pool.info.max_requests_per_connection
        if max_rq and self.requests >= max_rq:
            self.stats.upstream_cx_max_requests.inc()
            self.close()
            return
        if not self.keep_alive or not self.request_complete:
            self.close()
            return
        self.pool.on_client_idle(self)

    def _fail_stream(self, reason: str) -> None:
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        self.pool.host.stats.rq_active.dec()
        stream.on_upstream_reset(reason)


class Http1ConnPool:
    __slots__ = (
        "host",
        "info",
        "idle",
        "pending",
        "connecting",
        "clients",
        "_sweep",
        "closed",
        "draining",
    )

    def __init__(self, host: Host, info: ClusterInfo) -> None:
        self.host = host
        self.info = info
        self.idle: list[ActiveClient] = []
        self.pending: deque[Any] = deque()
        self.connecting = 0
        self.clients: set[ActiveClient] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        self.draining = False

    def new_stream(self, stream: Any) -> bool:
        """Attach ``stream`` to a connection. Returns True if it is ready now (``on_pool_ready``
        already called), False if it was queued (call ``cancel(stream)`` to withdraw)."""
        idle = self.idle
        while idle:
            client = idle.pop()
            if client.closed or client.local_close:
                continue
            self._attach(client, stream)
            return True
        stats = self.info.stats
        stats.upstream_rq_pending_total.inc()
        stats.upstream_rq_pending_active.inc()
        self.pending.append(stream)
        if self.connecting < len(self.pending):
            self._connect()
        return False

    def cancel(self, stream: Any) -> None:
        try:
            self.pending.remove(stream)
        except ValueError:
            return
        self.info.stats.upstream_rq_pending_active.dec()
        self.info.stats.upstream_rq_cancelled.inc()

    def _attach(self, client: ActiveClient, stream: Any) -> None:
        client.stream = stream
        client.response_complete = False
        client.request_complete = False
        self.host.stats.rq_active.inc()
        stream.on_pool_ready(client)

    def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        client = ActiveClient(self)
        stats = self.info.stats
        stats.upstream_cx_total.inc()
        stats.upstream_cx_http1_total.inc()
        self.host.stats.cx_total.inc()
        self.connecting += 1
        host, port = self.host.address
        loop.create_task(self._do_connect(loop, client, host, port))

    async def _do_connect(self, loop: asyncio.AbstractEventLoop, client: ActiveClient, host: str, port: int) -> None:
        stats = self.info.stats
        start = time.monotonic()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: client, host, port), self.info.connect_timeout
            )
        except TimeoutError as e:
            self.connecting -= 1
            stats.upstream_cx_connect_timeout.inc()
            stats.upstream_cx_connect_fail.inc()
            self.host.stats.cx_connect_fail.inc()
            self._connect_failed(CONNECTION_TIMEOUT, "", e)
            return
        except OSError as e:
            self.connecting -= 1
            stats.upstream_cx_connect_fail.inc()
            self.host.stats.cx_connect_fail.inc()
            self._connect_failed(CONNECTION_FAILURE, transport_failure_text(e), e)
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            raise
        self.connecting -= 1
        stats.upstream_cx_connect_ms.record((time.monotonic() - start) * 1000)
        stats.upstream_cx_active.inc()
        self.host.stats.cx_active.inc()
        client.connected = True
        client.start = time.monotonic()
        self.clients.add(client)
        if self.closed or self.draining:
            client.close()
            return
        self.on_client_idle(client)

    def _connect_failed(self, reason: str, transport_reason: str, exc: BaseException) -> None:
        log.debug("connect to %s failed: %r", self.host.address, exc)
        if not self.pending:
            return
        # One failed connection attempt fails one pending request (Envoy: all requests that
        # can no longer be served by in-flight connects).
        while self.pending and len(self.pending) > self.connecting:
            stream = self.pending.popleft()
            self.info.stats.upstream_rq_pending_active.dec()
            self.info.stats.upstream_rq_pending_failure_eject.inc()
            stream.on_pool_failure(reason, transport_reason)

    def on_client_idle(self, client: ActiveClient) -> None:
        if self.pending:
            stream = self.pending.popleft()
            self.info.stats.upstream_rq_pending_active.dec()
            self._attach(client, stream)
            return
        if self.draining or self.closed:
            client.close()
            return
        client.idle_since = time.monotonic()
        self.idle.append(client)
        if self._sweep is None:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        timeout = self.info.idle_timeout
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(min(timeout, 30.0) if timeout > 1 else timeout, self._run_sweep)

    def _run_sweep(self) -> None:
        self._sweep = None
        deadline = time.monotonic() - self.info.idle_timeout
        keep = []
        for c in self.idle:
            if c.idle_since <= deadline:
                self.info.stats.upstream_cx_idle_timeout.inc()
                c.close()
            else:
                keep.append(c)
        self.idle = keep
        if keep:
            self._arm_sweep()

    def on_client_closed(self, client: ActiveClient) -> None:
        self.clients.discard(client)
        try:
            self.idle.remove(client)
        except ValueError:
            pass
        if self.pending and self.connecting < len(self.pending) and not self.closed:
            self._connect()

    def drain(self) -> None:
        """Close idle connections and close busy ones when their request completes."""
        self.draining = True
        for c in self.idle:
            c.close()
        self.idle.clear()

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for c in list(self.clients):
            c.close(abort=True)
        self.idle.clear()


__all__ = ["ActiveClient", "Http1ConnPool", "errno"]
