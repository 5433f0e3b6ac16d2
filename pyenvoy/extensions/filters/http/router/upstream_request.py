"""Upstream attempts of a routed request: retry attempts and fire-and-forget shadows.

Strategy: on a route without retries or mirrors the router itself is the connection
pool's stream callbacks (no extra object per request). When a route has a policy, each
attempt is an ``UpstreamRequest``: the pool calls it, and it forwards to the router only
while it is the router's current attempt, so a late callback from an abandoned attempt
(a retried 503 whose connection is being reused, a cancelled connect) is dropped here.
It also owns the attempt's per-try timers.

A ``ShadowRequest`` is a mirror copy (Envoy's request_mirror_policies): its own pool
attempt to the shadow cluster with the request headers as the main upstream request got
them, ``:authority`` suffixed ``-shadow`` and ``x-envoy-internal``/``x-forwarded-for``
added the way Envoy's async client adds them. The request body streams to it; the
response is read and dropped, only the shadow cluster's stats record it. A shadow never
touches the downstream stream, and it is cancelled only if the downstream request is
abandoned before it was complete.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pyenvoy.http import http1

if TYPE_CHECKING:
    from pyenvoy.extensions.filters.http.router.router import Router
    from pyenvoy.upstream.circuit_breaker import ResourceManager
    from pyenvoy.upstream.conn_pool import ActiveClient, Http1ConnPool
    from pyenvoy.upstream.host import Host

__all__ = ["UpstreamRequest", "ShadowRequest", "NullConnection", "shadow_authority"]


class NullConnection:
    """A downstream connection stand-in for requests that have none (shadows)."""

    __slots__ = ()
    above_high_watermark = False

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


NULL_CONNECTION = NullConnection()


class UpstreamRequest:
    """One attempt of a request with a retry policy (the pool's stream callbacks)."""

    __slots__ = (
        "router",
        "ext",
        "host",
        "pool",
        "client",
        "pending",
        "downstream_connection",
        "per_try_timer",
        "idle_timer",
        "idle_timeout",
        "last_activity",
        "awaiting_headers",
        "started",
        "retried",
    )

    def __init__(self, router: Router, host: Host, pool: Http1ConnPool) -> None:
        self.router = router
        self.ext: Any = router.ext
        self.host = host
        self.pool = pool
        self.client: ActiveClient | None = None
        self.pending = False
        self.downstream_connection = router.downstream_connection
        self.per_try_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_timeout = 0.0
        self.last_activity = 0.0
        self.awaiting_headers = True
        # Bytes went upstream (Envoy's first_upstream_tx_byte_sent, for reset-before-request).
        self.started = False
        self.retried = False

    # --- pool callbacks (forwarded while current) -----------------------------------------
    def on_pool_ready(self, client: ActiveClient) -> None:
        self.pending = False
        if self.ext.upstream is not self:
            client.reset()
            return
        self.client = client
        self.router.on_attempt_ready(self, client)

    def on_pool_failure(self, reason: str, transport_failure_reason: str) -> None:
        self.pending = False
        if self.ext.upstream is self:
            self.router.on_attempt_failure(self, reason, transport_failure_reason)

    def on_upstream_informational(self, status: int, headers: list[list[bytes]]) -> None:
        pass

    def on_upstream_headers(
        self, status: int, headers: list[list[bytes]], keep_alive: bool, end_stream: bool
    ) -> None:
        if self.ext.upstream is self:
            self.awaiting_headers = False
            self.last_activity = time.monotonic()
            self.router.on_attempt_headers(self, status, headers, keep_alive, end_stream)

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if self.ext.upstream is self:
            self.last_activity = time.monotonic()
            self.router.on_upstream_data(data, end_stream)

    def on_upstream_reset(self, reason: str) -> None:
        self.client = None
        if self.ext.upstream is self:
            self.router.on_attempt_reset(self, reason)

    def on_upstream_above_write_buffer_high_watermark(self) -> None:
        if self.ext.upstream is self:
            self.router.on_upstream_above_write_buffer_high_watermark()

    def on_upstream_below_write_buffer_low_watermark(self) -> None:
        if self.ext.upstream is self:
            self.router.on_upstream_below_write_buffer_low_watermark()

    # --- per-try timers -----------------------------------------------------------------
    def setup_per_try_timeouts(self, per_try: float, per_try_idle: float) -> None:
        loop = asyncio.get_running_loop()
        if per_try > 0 and self.per_try_timer is None:
            self.per_try_timer = loop.call_later(per_try, self._on_per_try_timeout)
        if per_try_idle > 0 and self.idle_timer is None:
            self.idle_timeout = per_try_idle
            self.last_activity = time.monotonic()
            self.idle_timer = loop.call_later(per_try_idle, self._on_idle_check)

    def _on_per_try_timeout(self) -> None:
        self.per_try_timer = None
        if self.ext.upstream is self:
            self.router.on_per_try_timeout(self)

    def _on_idle_check(self) -> None:
        self.idle_timer = None
        if self.ext.upstream is not self:
            return
        remaining = self.last_activity + self.idle_timeout - time.monotonic()
        if remaining > 0.0005:
            self.idle_timer = asyncio.get_running_loop().call_later(remaining, self._on_idle_check)
            return
        t = self.per_try_timer
        if t is not None:
            t.cancel()
            self.per_try_timer = None
        self.router.on_per_try_idle_timeout(self)

    def cancel_timers(self, idle_too: bool = True) -> None:
        t = self.per_try_timer
        if t is not None:
            t.cancel()
            self.per_try_timer = None
        if idle_too:
            t = self.idle_timer
            if t is not None:
                t.cancel()
                self.idle_timer = None

    # --- abandoning -----------------------------------------------------------------------
    def reset(self) -> None:
        """Give up on this attempt: withdraw it from the pool or drop its connection."""
        self.cancel_timers()
        if self.pending:
            self.pending = False
            self.pool.cancel(self)
        client = self.client
        if client is not None:
            self.client = None
            client.reset()


def shadow_authority(authority: bytes) -> bytes:
    """``host[:port]`` -> ``host-shadow[:port]`` (Envoy's shadowAppendedHost)."""
    colon = authority.rfind(b":")
    if colon >= 0 and authority.rfind(b"]") < colon:
        return authority[:colon] + b"-shadow" + authority[colon:]
    return authority + b"-shadow"


class ShadowRequest:
    """A mirrored copy of a request; its response is discarded."""

    __slots__ = (
        "cluster",
        "host",
        "pool",
        "client",
        "pending",
        "method",
        "path",
        "headers",
        "chunked",
        "buffer",
        "buffered",
        "buffer_limit",
        "request_end",
        "done",
        "timer",
        "start",
        "status",
        "downstream_connection",
        "charge",
    )

    def __init__(
        self,
        cluster: Any,
        host: Host,
        pool: Http1ConnPool,
        method: bytes,
        path: bytes,
        headers: list[list[bytes]],
        chunked: bool,
        buffer_limit: int,
        charge: Any,
    ) -> None:
        self.cluster = cluster
        self.host = host
        self.pool = pool
        self.client: ActiveClient | None = None
        self.pending = False
        self.method = method
        self.path = path
        self.headers = headers
        self.chunked = chunked
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.buffer_limit = buffer_limit
        self.request_end = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.start = time.monotonic()
        self.status = 0
        self.downstream_connection = NULL_CONNECTION
        # charge(info, status, ms): the router's internal-request response stats.
        self.charge = charge

    def start_request(self, end_stream: bool, timeout: float, rm: ResourceManager) -> None:
        self.request_end = end_stream
        if timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout)
        self.pending = True
        self.pool.new_stream(self, rm)

    # --- from the router ------------------------------------------------------------------
    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.done:
            return
        if end_stream:
            self.request_end = True
        client = self.client
        if client is None:
            if data:
                self.buffer.append(data)
                self.buffered += len(data)
                if self.buffered > self.buffer_limit:
                    self.abort()
            return
        self._write(client, data, end_stream)

    def abort(self) -> None:
        """Cancel the shadow (downstream request abandoned, buffer overflow, timeout)."""
        if self.done:
            return
        self._finish()
        if self.pending:
            self.pending = False
            self.pool.cancel(self)
        client = self.client
        if client is not None:
            self.client = None
            client.reset()

    # --- pool callbacks -------------------------------------------------------------------
    def on_pool_ready(self, client: ActiveClient) -> None:
        self.pending = False
        if self.done:
            client.reset()
            return
        self.client = client
        buf = self.buffer
        self.buffer = []
        data = b"".join(buf)
        end = self.request_end
        if self.chunked:
            client.encode_headers(self.method, self.path, self.headers, False)
            if data or end:
                self._write(client, data, end)
        else:
            client.encode_headers(self.method, self.path, self.headers, end and not data)
            if data:
                self._write(client, data, end)

    def _write(self, client: ActiveClient, data: bytes, end_stream: bool) -> None:
        if self.chunked:
            if data:
                client.encode_data(http1.encode_chunk(data), False)
            if end_stream:
                client.encode_data(http1.LAST_CHUNK, True)
        else:
            client.encode_data(data, end_stream)

    def on_pool_failure(self, reason: str, transport_failure_reason: str) -> None:
        self.pending = False
        if self.done:
            return
        self._finish()
        self.charge(self.cluster.info, 502 if reason == "protocol error" else 503, self._ms())

    def on_upstream_informational(self, status: int, headers: list[list[bytes]]) -> None:
        pass

    def on_upstream_headers(
        self, status: int, headers: list[list[bytes]], keep_alive: bool, end_stream: bool
    ) -> None:
        self.status = status
        if end_stream:
            self._completed()

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._completed()

    def on_upstream_reset(self, reason: str) -> None:
        self.client = None
        if self.done:
            return
        self._finish()
        if not self.status:
            self.charge(self.cluster.info, 502 if reason == "protocol error" else 503, self._ms())

    def on_upstream_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_upstream_below_write_buffer_low_watermark(self) -> None:
        pass

    # --- internals ------------------------------------------------------------------------
    def _ms(self) -> float:
        return (time.monotonic() - self.start) * 1000

    def _completed(self) -> None:
        if self.done:
            return
        self._finish()
        self.client = None
        self.charge(self.cluster.info, self.status, self._ms())

    def _finish(self) -> None:
        self.done = True
        t = self.timer
        if t is not None:
            t.cancel()
            self.timer = None

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        info = self.cluster.info
        info.stats.upstream_rq_timeout.inc()
        awaiting = not self.status
        self.abort()
        if awaiting:
            self.charge(info, 504, self._ms())
