"""HTTP/1.1 upstream connection pool, one per (cluster, host), with Envoy's circuit breakers.

Strategy: one request at a time per connection, keep-alive reuse through a LIFO idle list
(the warmest connection first). A request that finds no idle connection is queued as
pending and a new connection is started for it; whichever connection becomes ready first
serves the oldest pending request. Idle connections are reaped by one pool-wide sweep timer
instead of a timer per request. The upstream codec is the same hand-written parser as the
downstream side (``pyenvoy.http.http1.ResponseParser``) and its callbacks go straight to
the router's upstream request object.

Circuit breakers follow Envoy's ConnPoolImplBase: a request that would have to wait while
``max_pending_requests`` are already waiting fails at once with reason ``overflow``
(``upstream_rq_pending_overflow``); a request attached to a connection while
``max_requests`` are active fails the same way (``upstream_rq_active_overflow``); a new
connection beyond ``max_connections`` is not opened (``upstream_cx_overflow``) unless the
pool has no connection at all, so waiting requests are served as connections free up.
A failed connect fails every pending request (Envoy purges them so the router can retry).
``upstream_rq_total``/``upstream_rq_active`` count requests attached to a connection, as in
Envoy (a request that never got a connection is not in ``upstream_rq_total``).

Callbacks a stream (the router, or one of its upstream requests) provides:
  on_pool_ready(client), on_pool_failure(reason, transport_failure_reason),
  on_upstream_headers(status, headers, keep_alive, end_stream), on_upstream_data(data, end_stream),
  on_upstream_informational(status, headers), on_upstream_reset(reason),
  on_upstream_above_write_buffer_high_watermark(), on_upstream_below_write_buffer_low_watermark()
and the attribute ``downstream_connection`` (corked while a read is parsed).
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
from pyenvoy.network import write_batch
from pyenvoy.upstream.circuit_breaker import resource_managers

if TYPE_CHECKING:
    from pyenvoy.upstream.circuit_breaker import Resource, ResourceManager
    from pyenvoy.upstream.cluster_manager import ClusterInfo
    from pyenvoy.upstream.host import Host

log = logging.getLogger("pyenvoy.pool")

_monotonic = time.monotonic
_encode_request_head = http1.encode_request_head

# Envoy's reset reason texts (Http::Utility::resetReasonToString).
CONNECTION_FAILURE = "remote connection failure"
LOCAL_CONNECTION_FAILURE = "local connection failure"
CONNECTION_TERMINATION = "connection termination"
LOCAL_RESET = "local reset"
REMOTE_RESET = "remote reset"
OVERFLOW = "overflow"
CONNECTION_TIMEOUT = "connection timeout"
PROTOCOL_ERROR = "protocol error"

# Pool failures that are connection failures (response flag UF, retry-on connect-failure).
CONNECT_FAILURES = frozenset((CONNECTION_FAILURE, LOCAL_CONNECTION_FAILURE, CONNECTION_TIMEOUT))


def transport_failure_text(exc: BaseException | None) -> str:
    """Envoy-style transport failure reason for a failed connect."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"delayed connect error: {os.strerror(exc.errno)}"
    if isinstance(exc, OSError):
        return f"delayed connect error: {exc}"
    return ""


class _PoolTimeouts:
    """Cluster-level connection and stream lifetimes the pool enforces (read once)."""

    __slots__ = ("max_connection_duration", "max_stream_duration")

    def __init__(self, info: Any) -> None:
        self.max_connection_duration = 0.0
        self.max_stream_duration = 0.0
        proto = getattr(info, "proto", None)
        if proto is None:
            return
        sources = []
        if proto.HasField("common_http_protocol_options"):
            sources.append(proto.common_http_protocol_options)
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        if key in proto.typed_extension_protocol_options:
            from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

            opts = http_protocol_options_pb2.HttpProtocolOptions()
            if proto.typed_extension_protocol_options[key].Unpack(opts) and opts.HasField(
                "common_http_protocol_options"
            ):
                sources.append(opts.common_http_protocol_options)
        for c in sources:
            if c.HasField("max_connection_duration"):
                d = c.max_connection_duration
                self.max_connection_duration = d.seconds + d.nanos / 1e9
            if c.HasField("max_stream_duration"):
                d = c.max_stream_duration
                self.max_stream_duration = d.seconds + d.nanos / 1e9


def pool_timeouts(info: Any) -> _PoolTimeouts:
    t = getattr(info, "pool_timeouts", None)
    if t is None:
        t = _PoolTimeouts(info)
        try:
            info.pool_timeouts = t
        except AttributeError:
            pass
    return t


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
        "rq_resource",
        "cx_resource",
        "released",
        "draining",
        "duration_handle",
        "reset_with_active",
        "_out",
        "_batch",
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
        self.rq_resource: Resource | None = None
        self.cx_resource: Resource | None = None
        self.released = False
        self.draining = False
        self.duration_handle: asyncio.TimerHandle | None = None
        self.reset_with_active = False
        # Bytes written during this loop pass, sent as one write at its end (write_batch).
        self._out: list[bytes] | None = None
        self._batch: write_batch.WriteBatch | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._batch = write_batch.batch_for_running_loop()
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
        stream = self.stream
        if stream is None:
            # Bytes while idle: a protocol error (or an early close notice); drop the connection.
            self.stats.upstream_cx_protocol_error.inc()
            self.close()
            return
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
        self._out = None
        h = self.duration_handle
        if h is not None:
            h.cancel()
            self.duration_handle = None
        stats = self.stats
        self._release_resources()
        stats.upstream_cx_destroy.inc()
        if self.local_close:
            stats.upstream_cx_destroy_local.inc()
        else:
            stats.upstream_cx_destroy_remote.inc()
        stats.upstream_cx_length_ms.record((time.monotonic() - self.start) * 1000)
        if self.stream is not None or self.reset_with_active:
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
        self,
        status: int,
        version: int,
        headers: list[list[bytes]],
        keep_alive: bool,
        has_body: bool,
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
        if held is None:
            held = b""
        else:
            self.held_body = None
        stream = self.stream
        if stream is not None:
            stream.on_upstream_data(held, True)
        self._release()

    # --- API for the router --------------------------------------------------------------
    def encode_headers(
        self, method: bytes, target: bytes, headers: list[list[bytes]], end_stream: bool
    ) -> None:
        self.requests += 1
        self.request_complete = end_stream
        self.response_complete = False
        self.parser.expect_response(method)
        data = _encode_request_head(method, target, headers)
        self.stats.upstream_cx_tx_bytes_total.value += len(data)
        t = self.transport
        if t is not None:
            # Queued for the end of this loop pass, as Connection.write does.
            write_batch.send(self, t, data)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        t = self.transport
        if t is None:
            return
        if data:
            self.stats.upstream_cx_tx_bytes_total.value += len(data)
            write_batch.send(self, t, data)
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
        if self.stream is not None:
            self._detach()
            self.reset_with_active = True
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        t = self.transport
        if t is None or self.local_close:
            return
        self.local_close = True
        if abort:
            self._out = None
            t.abort()
        else:
            write_batch.flush(self)
            t.close()

    @property
    def above_high_watermark(self) -> bool:
        t = self.transport
        return (
            t is not None
            and t.get_write_buffer_size() > self.pool.info.per_connection_buffer_limit_bytes
        )

    # --- internals ----------------------------------------------------------------------
    def _detach(self) -> None:
        """The request leaves this connection: active-request accounting."""
        self.stream = None
        self.pool.host.stats.rq_active.value -= 1
        self.stats.upstream_rq_active.value -= 1
        res = self.rq_resource
        if res is not None:
            self.rq_resource = None
            c = res.current
            res.current = c - 1
            if c >= res.fast_limit:
                view = res.view
                if view is not None:  # SharedResource.released(), inlined
                    view[res.me] -= 1
                else:
                    res.released()

    def _release(self) -> None:
        if self.stream is None or not self.response_complete:
            return
        request_complete = self.request_complete
        keep_alive = self.keep_alive
        if not request_complete and keep_alive:
            return
        # _detach(), inlined: this runs once per proxied request.
        self.stream = None
        pool = self.pool
        pool.host_stats.rq_active.value -= 1
        stats = self.stats
        stats.upstream_rq_active.value -= 1
        res = self.rq_resource
        if res is not None:
            self.rq_resource = None
            c = res.current
            res.current = c - 1
            if c >= res.fast_limit:
                view = res.view
                if view is not None:  # SharedResource.released(), inlined
                    view[res.me] -= 1
                else:
                    res.released()
        if self.read_disabled:
            self.read_disable(False)
        max_rq = pool.max_requests_per_connection
        if max_rq and self.requests >= max_rq:
            stats.upstream_cx_max_requests.inc()
            self.close()
            return
        if not keep_alive or not request_complete or self.draining:
            self.close()
            return
        pool.on_client_idle(self)

    def _fail_stream(self, reason: str) -> None:
        stream = self.stream
        if stream is None:
            return
        self._detach()
        stream.on_upstream_reset(reason)

    def _release_resources(self) -> None:
        if self.released:
            return
        self.released = True
        self.stats.upstream_cx_active.value -= 1
        self.pool.host.stats.cx_active.value -= 1
        res = self.cx_resource
        if res is not None:
            self.cx_resource = None
            res.dec()

    def on_duration_timeout(self) -> None:
        """cluster max_connection_duration: drain (close now when idle)."""
        self.duration_handle = None
        if self.closed or self.draining or self.local_close:
            return
        self.stats.upstream_cx_max_duration_reached.inc()
        self.draining = True
        if self.stream is None:
            pool = self.pool
            try:
                pool.idle.remove(self)
            except ValueError:
                pass
            self.close()


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
        "rm",
        "rms",
        "pool_resource",
        "max_connection_duration",
        "max_stream_duration",
        "max_requests_per_connection",
        "stats",
        "host_stats",
    )

    def __init__(self, host: Host, info: ClusterInfo) -> None:
        self.host = host
        self.info = info
        # Read per request: bound once (a pool lives and dies with its host and cluster).
        self.stats = info.stats
        self.host_stats = host.stats
        self.max_requests_per_connection = info.max_requests_per_connection
        self.idle: list[ActiveClient] = []
        # Waiting requests: (stream, resource manager of its priority).
        self.pending: deque[tuple[Any, ResourceManager]] = deque()
        self.connecting = 0
        self.clients: set[ActiveClient] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        self.draining = False
        self.rms = resource_managers(info)
        self.rm = self.rms.default
        # The max_connection_pools resource this pool holds (released when it goes idle).
        self.pool_resource: Resource | None = None
        t = pool_timeouts(info)
        self.max_connection_duration = t.max_connection_duration
        self.max_stream_duration = t.max_stream_duration

    def new_stream(self, stream: Any, rm: ResourceManager | None = None) -> bool:
        """Attach ``stream`` to a connection. Returns True if it is ready now (``on_pool_ready``
        already called), False if it was queued (call ``cancel(stream)`` to withdraw) or
        failed at once with ``on_pool_failure(OVERFLOW, "")``."""
        if rm is None:
            rm = self.rm
        idle = self.idle
        while idle:
            client = idle.pop()
            if client.closed or client.local_close:
                continue
            if self._attach(client, stream, rm):
                return True
            idle.append(client)
            self.rms.upstream_rq_active_overflow.value += 1
            stream.on_pool_failure(OVERFLOW, "")
            return False
        stats = self.info.stats
        if not rm.pending_requests.can_create():
            stats.upstream_rq_pending_overflow.inc()
            stream.on_pool_failure(OVERFLOW, "")
            return False
        stats.upstream_rq_pending_total.inc()
        stats.upstream_rq_pending_active.inc()
        rm.pending_requests.inc()
        self.pending.append((stream, rm))
        if self.connecting < len(self.pending):
            self._maybe_connect(rm)
        return False

    def cancel(self, stream: Any) -> None:
        pending = self.pending
        for i, entry in enumerate(pending):
            if entry[0] is stream:
                del pending[i]
                break
        else:
            return
        entry[1].pending_requests.dec()
        self.info.stats.upstream_rq_pending_active.dec()
        self.info.stats.upstream_rq_cancelled.inc()

    def _attach(self, client: ActiveClient, stream: Any, rm: ResourceManager) -> bool:
        res = rm.requests
        # max_requests: a plain increment while far from the limit (Resource.fast_limit);
        # with worker processes, the process-wide count (SharedResource, fast_limit 0).
        c = res.current + 1
        if c < res.fast_limit:
            res.current = c
        else:
            view = res.view
            if view is not None and res.runtime is None:  # SharedResource.acquire(), inlined
                if sum(view) >= res.limit:
                    return False
                res.current = c
                view[res.me] += 1
            elif not res.acquire():
                return False
        client.stream = stream
        client.response_complete = False
        client.request_complete = False
        client.rq_resource = res
        stats = self.stats
        stats.upstream_rq_total.value += 1
        stats.upstream_rq_active.value += 1
        hs = self.host_stats
        hs.rq_total.value += 1
        hs.rq_active.value += 1
        stream.on_pool_ready(client)
        return True

    def _maybe_connect(self, rm: ResourceManager) -> None:
        if rm.can_create_connection(self.host):
            self._connect(rm)
            return
        self.info.stats.upstream_cx_overflow.inc()
        # At the connection limit because of other hosts: a pool with no connection at
        # all still opens one, or its waiting requests could never be served.
        if not self.clients and not self.connecting:
            self._connect(rm)

    def _connect(self, rm: ResourceManager) -> None:
        loop = asyncio.get_running_loop()
        client = ActiveClient(self)
        stats = self.info.stats
        stats.upstream_cx_total.inc()
        stats.upstream_cx_http1_total.inc()
        stats.upstream_cx_active.inc()
        hs = self.host.stats
        hs.cx_total.inc()
        hs.cx_active.inc()
        client.cx_resource = rm.connections
        rm.connections.inc()
        self.connecting += 1
        host, port = self.host.address
        loop.create_task(self._do_connect(loop, client, host, port))

    async def _do_connect(
        self, loop: asyncio.AbstractEventLoop, client: ActiveClient, host: str, port: int
    ) -> None:
        stats = self.info.stats
        start = time.monotonic()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: client, host, port), self.info.connect_timeout
            )
        except TimeoutError as e:
            self.connecting -= 1
            stats.upstream_cx_connect_timeout.inc()
            self._connect_failed(client, CONNECTION_TIMEOUT, "", e, local=True)
            return
        except OSError as e:
            self.connecting -= 1
            self._connect_failed(
                client, CONNECTION_FAILURE, transport_failure_text(e), e, local=False
            )
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            client._release_resources()
            raise
        self.connecting -= 1
        stats.upstream_cx_connect_ms.record((time.monotonic() - start) * 1000)
        client.connected = True
        client.start = time.monotonic()
        self.clients.add(client)
        if self.closed or self.draining:
            client.close()
            return
        if self.max_connection_duration > 0:
            client.duration_handle = loop.call_later(
                self.max_connection_duration, client.on_duration_timeout
            )
        self.on_client_idle(client)

    def _connect_failed(
        self,
        client: ActiveClient,
        reason: str,
        transport_reason: str,
        exc: BaseException,
        local: bool,
    ) -> None:
        log.debug("connect to %s failed: %r", self.host.address, exc)
        stats = self.info.stats
        stats.upstream_cx_connect_fail.inc()
        self.host.stats.cx_connect_fail.inc()
        stats.upstream_cx_destroy.inc()
        if local:
            stats.upstream_cx_destroy_local.inc()
        else:
            stats.upstream_cx_destroy_remote.inc()
        stats.upstream_cx_length_ms.record((time.monotonic() - client.start) * 1000)
        client.closed = True
        client._release_resources()
        # Envoy purges every pending request on a connect failure, so the router can
        # decide (retry elsewhere, or fail). Requests queued by those callbacks (retries)
        # are not failed by this connect.
        purge = self.pending
        self.pending = deque()
        for stream, rm in purge:
            stats.upstream_rq_pending_active.dec()
            rm.pending_requests.dec()
            stats.upstream_rq_pending_failure_eject.inc()
            stream.on_pool_failure(reason, transport_reason)
        if self.pending and self.connecting < len(self.pending) and not self.closed:
            self._maybe_connect(self.pending[0][1])
        self._check_idle()

    def on_client_idle(self, client: ActiveClient) -> None:
        pending = self.pending
        while pending:
            stream, rm = pending.popleft()
            self.info.stats.upstream_rq_pending_active.dec()
            rm.pending_requests.dec()
            if self._attach(client, stream, rm):
                return
            self.rms.upstream_rq_active_overflow.value += 1
            stream.on_pool_failure(OVERFLOW, "")
            if client.closed or client.local_close or client.stream is not None:
                return
        if self.draining or self.closed or client.draining:
            client.close()
            return
        client.idle_since = _monotonic()
        self.idle.append(client)
        if self._sweep is None:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        timeout = self.info.idle_timeout
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(
            min(timeout, 30.0) if timeout > 1 else timeout, self._run_sweep
        )

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
            self._maybe_connect(self.pending[0][1])
        self._check_idle()

    def _check_idle(self) -> None:
        """An idle pool (no connection, nothing waiting) gives back its max_connection_pools
        slot and leaves the host, as Envoy deletes idle pools."""
        res = self.pool_resource
        if res is None or self.clients or self.pending or self.connecting:
            return
        self.pool_resource = None
        res.dec()
        if self.host.http_pool is self:
            self.host.http_pool = None
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

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


def pool_for(host: Host, cluster_manager: Any, rm: ResourceManager) -> Http1ConnPool | None:
    """The host's pool, created under the max_connection_pools circuit breaker (None and
    ``upstream_cx_pool_overflow`` when the cluster is at its limit)."""
    pool = host.http_pool
    if pool is not None:
        return pool
    res = rm.connection_pools
    if not res.can_create():
        host.cluster.stats.upstream_cx_pool_overflow.inc()  # type: ignore[union-attr]
        return None
    pool = cluster_manager.http_conn_pool(host)
    if pool.pool_resource is None:
        res.inc()
        pool.pool_resource = res
    return pool  # type: ignore[no-any-return]


__all__ = [
    "ActiveClient",
    "CONNECT_FAILURES",
    "Http1ConnPool",
    "OVERFLOW",
    "pool_for",
    "errno",
]
