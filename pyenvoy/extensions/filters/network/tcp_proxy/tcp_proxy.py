"""The tcp_proxy network filter: one downstream Connection piped to one upstream socket.

Strategy: the filter is the terminal read filter of a downstream ``Connection`` and owns
one ``UpstreamConnection`` (a plain ``asyncio.Protocol``). Bytes go straight through:
downstream ``on_data`` -> ``upstream.transport.write``, upstream ``data_received`` ->
``connection.write``; no buffering of our own, so memory is bounded by the two transports'
write buffers. Back-pressure is watermark based, both ways: when the upstream write buffer
passes the cluster's ``per_connection_buffer_limit_bytes`` we ``read_disable`` the
downstream; when the downstream's (listener limit) fills we ``pause_reading`` the upstream.

Lifecycle, as in Envoy's ``TcpProxy::Filter``:

- ``on_new_connection``: enable half-close, disable downstream reads, pick the cluster
  (weighted if configured) and a host, start ``loop.create_connection`` (one task per
  connection attempt) and a ``call_later`` connect timer.
- connect failure / timeout: count the cluster and host stats Envoy's TCP pool counts,
  report the host to the cluster's outlier detector (Envoy's LocalOriginConnectFailed /
  LocalOriginTimeout: a 503 / 504 unless ``split_external_local_origin_errors``), retry up
  to ``max_connect_attempts`` (re-picking cluster and host, optional backoff), then close
  the downstream without data. No cluster -> ``downstream_cx_no_route``; no healthy host
  -> ``upstream_cx_none_healthy``.
- connected: report LocalOriginConnectSuccessFinal (a 200 for the detector), re-enable
  downstream reads, arm the idle timer.
- the TCP pool's request books, as Envoy keeps them for a tcp_proxy session: each attempt
  is a pending request (``upstream_rq_pending_total``/``_active``) that becomes an active
  one when connected (``upstream_rq_total``/``_active``, host ``rq_total``/``rq_active``),
  or ``upstream_rq_pending_failure_eject`` when the connect fails or times out.
- circuit breakers (the cluster's default-priority ResourceManager, shared with the HTTP
  pools): at the ``max_connections`` limit the session is not queued, the downstream is
  closed at once (``upstream_cx_overflow``, flag UO, no retry), as Envoy's tcp_proxy checks
  the limit before asking its pool. The upstream connection then holds the connections
  resource for its life, the pending-requests resource while connecting and the requests
  resource once attached; at the ``max_pending_requests`` limit the attempt fails
  (``upstream_rq_pending_overflow``, no connection made) and is retried like a connect
  failure but without UF, ending in URX.
- host choice: the filter is the LoadBalancerContext; ``compute_hash`` gives ring_hash and
  maglev the ``hash_policy`` hash (source_ip), as Envoy's ``computeHashKey``.
- EOF from one side -> ``write_eof`` on the other; when both directions have ended, both
  sockets close (after flushing). A full close of one side closes the other: the
  upstream closing flushes the downstream; the downstream closing flushes the upstream
  (``upstream_flush_*`` while data is still queued) unless *we* closed the downstream
  (idle timeout, max duration, a local close), which aborts the upstream (Envoy's NoFlush).
- idle timeout: activity just stores ``loop.time()``; one ``call_later`` handle fires at
  the deadline and re-arms itself for the remainder when there was activity since.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from pyenvoy.network import filter as nf
from pyenvoy.network.filter import ReadFilter
from pyenvoy.stream_info import (
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE_FOUND,
    UPSTREAM_CONNECTION_FAILURE,
    UPSTREAM_OVERFLOW,
    UPSTREAM_RETRY_LIMIT_EXCEEDED,
    StreamInfo,
)
from pyenvoy.upstream.circuit_breaker import resource_managers

if TYPE_CHECKING:
    from pyenvoy.extensions.filters.network.tcp_proxy.config import TcpProxyConfig
    from pyenvoy.upstream.circuit_breaker import ResourceManager

log = logging.getLogger("pyenvoy.tcp_proxy")


def _inc(stats: Any, name: str) -> None:
    """Increment an optional cluster stat (not every ClusterStats declares every name)."""
    c = getattr(stats, name, None)
    if c is not None:
        c.inc()


def _add(stats: Any, name: str, n: int) -> None:
    """Move an optional cluster gauge by ``n``."""
    g = getattr(stats, name, None)
    if g is not None:
        g.add(n)


# UpstreamConnection.rq_state: the session as the TCP pool's request
_RQ_PENDING = 0  # waiting for the connection
_RQ_ACTIVE = 1  # connected, counted in upstream_rq_active
_RQ_DONE = 2


class UpstreamConnection(asyncio.Protocol):
    """The upstream socket of one tcp_proxy session (Envoy's TcpUpstream + its pool client)."""

    __slots__ = (
        "parent",
        "config",
        "host",
        "info",
        "outlier",
        "stats",
        "transport",
        "connected",
        "closed",
        "local_close",
        "start",
        "connect_start",
        "draining",
        "drain_timer",
        "tx_buffered",
        "rq_state",
        "rm",
    )

    def __init__(
        self,
        parent: TcpProxyFilter,
        host: Any,
        info: Any,
        outlier: Any = None,
        rm: ResourceManager | None = None,
    ) -> None:
        self.parent: TcpProxyFilter | None = parent
        self.config = parent.config
        self.host = host
        self.info = info
        self.outlier = outlier  # the cluster's OutlierDetector, or None
        self.stats = info.stats
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.closed = False
        self.local_close = False
        self.connect_start = time.monotonic()
        self.start = self.connect_start
        self.draining = False
        self.drain_timer: asyncio.TimerHandle | None = None
        self.tx_buffered = 0  # what we last reported into upstream_cx_tx_bytes_buffered

        stats = self.stats
        stats.upstream_cx_total.inc()
        stats.upstream_cx_active.inc()
        hs = host.stats
        hs.cx_total.inc()
        hs.cx_active.inc()
        # The TCP pool's request books: the session is a pending request until connected.
        self.rq_state = _RQ_PENDING
        _inc(stats, "upstream_rq_pending_total")
        _add(stats, "upstream_rq_pending_active", 1)
        # Circuit breakers: the connection holds max_connections until it is gone, the
        # session max_pending_requests until attached (the caller checked both).
        self.rm = rm
        if rm is not None:
            rm.connections.inc()
            rm.pending_requests.inc()

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's TCPTransport is not an asyncio.Transport subclass.
        t = cast(asyncio.Transport, transport)
        self.transport = t
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        limit = self.info.per_connection_buffer_limit_bytes
        if limit:
            t.set_write_buffer_limits(high=limit, low=limit // 2)
        self.connected = True
        now = time.monotonic()
        self.stats.upstream_cx_connect_ms.record((now - self.connect_start) * 1000)
        self.start = now
        parent = self.parent
        if parent is None:  # the downstream went away while we were connecting
            self.close(flush=False)
            return
        parent.on_upstream_connected(self)

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        parent = self.parent
        if parent is not None:
            parent.on_upstream_data(data)
        else:
            # Draining with no downstream left: like a socket shut for reading, reset
            # (Envoy's Drainer::onData cancels the drain).
            t = self.transport
            if t is not None:
                self.local_close = True
                t.abort()

    def eof_received(self) -> bool:
        parent = self.parent
        if parent is None:
            return False  # draining: the peer is done too, let asyncio close us
        return parent.on_upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport = None
        self._rq_closed()
        self.release_connection()
        stats = self.stats
        stats.upstream_cx_active.dec()
        self.host.stats.cx_active.dec()
        stats.upstream_cx_destroy.inc()
        # The TCP pool counts the session as the connection's active request.
        _inc(stats, "upstream_cx_destroy_with_active_rq")
        if self.local_close:
            stats.upstream_cx_destroy_local.inc()
            _inc(stats, "upstream_cx_destroy_local_with_active_rq")
        else:
            stats.upstream_cx_destroy_remote.inc()
            _inc(stats, "upstream_cx_destroy_remote_with_active_rq")
        stats.upstream_cx_length_ms.record((time.monotonic() - self.start) * 1000)
        self._report_tx_buffered(0)
        if self.draining:
            self.draining = False
            self.config.stats.upstream_flush_active.dec()
            if self.drain_timer is not None:
                self.drain_timer.cancel()
                self.drain_timer = None
        parent = self.parent
        self.parent = None
        if parent is not None:
            parent.on_upstream_closed(self)

    def pause_writing(self) -> None:
        self._report_tx_buffered(self._buffer_size())
        parent = self.parent
        if parent is not None:
            parent.on_upstream_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        self._report_tx_buffered(self._buffer_size())
        parent = self.parent
        if parent is not None:
            parent.on_upstream_below_write_buffer_low_watermark()

    # --- the pool's request books (upstream_rq_*, host rq_*) ------------------------------
    def rq_attached(self) -> None:
        """Connected and handed to the session (Envoy's attachStreamToClient)."""
        if self.rq_state != _RQ_PENDING:
            return
        self.rq_state = _RQ_ACTIVE
        rm = self.rm
        if rm is not None:
            rm.pending_requests.dec()
            rm.requests.inc()
        stats = self.stats
        _add(stats, "upstream_rq_pending_active", -1)
        _inc(stats, "upstream_rq_total")
        _add(stats, "upstream_rq_active", 1)
        hs = self.host.stats
        c = getattr(hs, "rq_total", None)
        if c is not None:
            c.inc()
            hs.rq_active.inc()

    def rq_failed(self) -> None:
        """The connection failed while the session waited (purgePendingStreams)."""
        if self.rq_state == _RQ_PENDING:
            self.rq_state = _RQ_DONE
            if self.rm is not None:
                self.rm.pending_requests.dec()
            _add(self.stats, "upstream_rq_pending_active", -1)
            _inc(self.stats, "upstream_rq_pending_failure_eject")

    def rq_cancelled(self) -> None:
        """The session gave up waiting (the downstream went away)."""
        if self.rq_state == _RQ_PENDING:
            self.rq_state = _RQ_DONE
            if self.rm is not None:
                self.rm.pending_requests.dec()
            _add(self.stats, "upstream_rq_pending_active", -1)
            _inc(self.stats, "upstream_rq_cancelled")

    def _rq_closed(self) -> None:
        state = self.rq_state
        rm = self.rm
        if state == _RQ_ACTIVE:
            if rm is not None:
                rm.requests.dec()
            _add(self.stats, "upstream_rq_active", -1)
            g = getattr(self.host.stats, "rq_active", None)
            if g is not None:
                g.dec()
        elif state == _RQ_PENDING:
            if rm is not None:
                rm.pending_requests.dec()
            _add(self.stats, "upstream_rq_pending_active", -1)
        self.rq_state = _RQ_DONE

    def release_connection(self) -> None:
        """Give back the max_connections resource (once: the connection is gone)."""
        rm = self.rm
        if rm is not None:
            self.rm = None
            rm.connections.dec()

    # --- helpers ------------------------------------------------------------------------
    def _buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def _report_tx_buffered(self, n: int) -> None:
        g = getattr(self.stats, "upstream_cx_tx_bytes_buffered", None)
        if g is not None and n != self.tx_buffered:
            g.add(n - self.tx_buffered)
        self.tx_buffered = n

    def close(self, flush: bool) -> None:
        """Close locally: ``flush`` writes out what is queued first (Envoy's FlushWrite)."""
        t = self.transport
        if t is None or self.local_close:
            return
        self.local_close = True
        if flush:
            t.close()
        else:
            t.abort()

    def drain(self, idle_timeout: float) -> None:
        """The downstream is gone: flush what is queued, then close (Envoy's Drainer)."""
        t = self.transport
        self.parent = None
        if t is None:
            return
        if self.local_close or t.get_write_buffer_size() == 0:
            self.close(flush=True)
            return
        stats = self.config.stats
        stats.upstream_flush_total.inc()
        stats.upstream_flush_active.inc()
        self.draining = True
        if idle_timeout > 0:
            self.drain_timer = asyncio.get_running_loop().call_later(
                idle_timeout, self._drain_timeout
            )
        try:
            t.resume_reading()  # notice a reset or unexpected data while draining
        except RuntimeError:
            pass
        self.close(flush=True)

    def _drain_timeout(self) -> None:
        self.drain_timer = None
        if self.transport is not None:
            self.config.stats.idle_timeout.inc()
            t = self.transport
            t.abort()


class TcpProxyFilter(ReadFilter):
    """One tcp_proxy session (Envoy's ``TcpProxy::Filter``); also the downstream's
    ConnectionCallbacks."""

    __slots__ = (
        "config",
        "stats",
        "loop",
        "stream_info",
        "upstream",
        "upstream_transport",
        "upstream_stats",
        "connect_attempts",
        "connect_failures",
        "_connect_task",
        "_connect_timer",
        "_idle_timer",
        "_last_activity",
        "_max_duration_timer",
        "downstream_eof",
        "upstream_eof",
        "downstream_closed",
        "downstream_read_paused",
        "upstream_read_paused",
        "tx_buffered",
        "_early_data",
    )

    def __init__(self, config: TcpProxyConfig) -> None:
        self.config = config
        self.stats = config.stats
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stream_info: StreamInfo | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_transport: asyncio.Transport | None = None
        self.upstream_stats: Any = None  # the connected cluster's ClusterStats
        self.connect_attempts = 0
        self.connect_failures = 0
        self._connect_task: asyncio.Task[Any] | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._max_duration_timer: asyncio.TimerHandle | None = None
        self.downstream_eof = False
        self.upstream_eof = False
        self.downstream_closed = False
        self.downstream_read_paused = False  # by us, for the upstream's write buffer
        self.upstream_read_paused = False  # by us, for the downstream's write buffer
        self.tx_buffered = 0
        self._early_data: list[bytes] | None = None  # read before the upstream connected

    # --- ReadFilter ---------------------------------------------------------------------
    def on_new_connection(self) -> int:
        conn = self.connection
        self.loop = asyncio.get_running_loop()
        self.stream_info = StreamInfo(conn.remote_address, conn.local_address, protocol="")
        conn.add_connection_callbacks(self)
        conn.enable_half_close(True)
        # No reads until there is an upstream to send them to (re-enabled on connect).
        conn.read_disable(True)
        # uvloop starts reading right after connection_made, ignoring a pause_reading() made
        # inside it: pause again on the next loop turn (a no-op where the first one held).
        self.loop.call_soon(self._reapply_read_disable)
        self.stats.downstream_cx_total.inc()
        d = self.config.max_duration()
        if d:
            self._max_duration_timer = self.loop.call_later(d, self._on_max_duration)
        self._establish()
        return nf.STOP_ITERATION

    def on_data(self, data: bytes, end_stream: bool) -> int:
        if data:
            t = self.upstream_transport
            if t is not None:
                n = len(data)
                self.stats.downstream_cx_rx_bytes_total.value += n
                self.upstream_stats.upstream_cx_tx_bytes_total.value += n
                t.write(data)
                self._last_activity = self.loop.time()  # type: ignore[union-attr]
            elif self.upstream_stats is None and not self.connection.local_close:
                # Still connecting (or between attempts): Envoy has reads disabled, so these
                # bytes count as received only when they go upstream.
                self._hold_early_data(data)
        if end_stream:
            self._on_downstream_eof()
        return nf.STOP_ITERATION

    # --- LoadBalancerContext ------------------------------------------------------------
    def compute_hash(self) -> int | None:
        """The connection's hash for ring_hash / maglev (Envoy's computeHashKey): the
        tcp_proxy hash_policy over the downstream addresses; None picks at random."""
        hp = self.config.hash_policy
        if hp is None:
            return None
        return hp.generate(None, self.stream_info)

    # --- downstream ConnectionCallbacks ----------------------------------------------------
    def on_event(self, event: str) -> None:
        if event != nf.LOCAL_CLOSE and event != nf.REMOTE_CLOSE:
            return
        if self.downstream_closed:
            return
        self.downstream_closed = True
        self._cancel_timers()
        self._report_tx_buffered(0)
        si = self.stream_info
        if si is not None and self.config.access_logs:
            conn = self.connection
            si.bytes_received = conn.bytes_received
            si.bytes_sent = conn.bytes_sent
            for logger in self.config.access_logs:
                logger.log(None, None, si)
        up = self.upstream
        if up is None:
            return
        self.upstream = None
        self.upstream_transport = None
        if not up.connected:
            self._abandon_connect(up)
        elif up.transport is not None and not up.local_close:
            if event == nf.LOCAL_CLOSE:
                up.parent = None
                up.close(flush=False)  # we closed the downstream: NoFlush upstream
            else:
                up.drain(self.config.idle_timeout)  # the peer went away: flush upstream
        else:
            up.parent = None

    def on_above_write_buffer_high_watermark(self) -> None:
        self._report_tx_buffered(self._downstream_buffer_size())
        t = self.upstream_transport
        if t is not None and not self.upstream_read_paused:
            self.upstream_read_paused = True
            try:
                t.pause_reading()
            except RuntimeError:
                return
            _inc(self.upstream_stats, "upstream_flow_control_paused_reading_total")

    def on_below_write_buffer_low_watermark(self) -> None:
        self._report_tx_buffered(self._downstream_buffer_size())
        self._last_activity = self.loop.time()  # type: ignore[union-attr]
        t = self.upstream_transport
        if t is not None and self.upstream_read_paused:
            self.upstream_read_paused = False
            try:
                t.resume_reading()
            except RuntimeError:
                return
            _inc(self.upstream_stats, "upstream_flow_control_resumed_reading_total")

    # --- upstream callbacks (from UpstreamConnection) ------------------------------------
    def on_upstream_connected(self, up: UpstreamConnection) -> None:
        if up is not self.upstream:
            up.close(flush=False)
            return
        timer = self._connect_timer
        if timer is not None:
            timer.cancel()
            self._connect_timer = None
        self._connect_task = None
        self.upstream_transport = up.transport
        self.upstream_stats = up.stats
        up.rq_attached()
        od = up.outlier
        if od is not None:
            # Envoy: LocalOriginConnectSuccessFinal (the connection is the transaction).
            od.on_local_origin_success(up.host, True)
        si = self.stream_info
        if si is not None:
            si.upstream_host = up.host.address
            si.upstream_cluster = up.info.name
            if up.transport is not None:
                local = up.transport.get_extra_info("sockname")
                if isinstance(local, tuple) and len(local) >= 2:
                    si.upstream_local_address = (local[0], local[1])
        t = up.transport
        early = self._early_data
        if early is not None and t is not None:
            self._early_data = None
            n = sum(map(len, early))
            self.stats.downstream_cx_rx_bytes_total.value += n
            up.stats.upstream_cx_tx_bytes_total.value += n
            t.writelines(early)
        if self.downstream_eof and t is not None:
            try:
                t.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                pass
        self.connection.read_disable(False)
        timeout = self.config.idle_timeout
        if timeout > 0:
            loop = self.loop
            assert loop is not None
            self._last_activity = loop.time()
            self._idle_timer = loop.call_later(timeout, self._on_idle_timer)

    def on_upstream_data(self, data: bytes) -> None:
        conn = self.connection
        if conn.local_close:
            return  # we are closing the downstream; nothing more goes out
        self.stats.downstream_cx_tx_bytes_total.value += len(data)
        conn.write(data)
        self._last_activity = self.loop.time()  # type: ignore[union-attr]

    def on_upstream_eof(self) -> bool:
        """Upstream half-closed: pass the FIN downstream; True keeps the socket writable."""
        if self.upstream_eof:
            return True
        self.upstream_eof = True
        conn = self.connection
        if not conn.local_close:
            conn.write(b"", end_stream=True)
        if self.downstream_eof:
            # Both directions are done; the upstream's FIN came last (Envoy: RemoteClose).
            self._finish(upstream_local=False)
        return True

    def on_upstream_closed(self, up: UpstreamConnection) -> None:
        if up is not self.upstream:
            return
        self.upstream = None
        self.upstream_transport = None
        if self.downstream_closed:
            return
        if self.downstream_read_paused:
            self.downstream_read_paused = False
            self.connection.read_disable(False)
        # Envoy: an upstream close (after connect) closes the downstream with FlushWrite.
        self.connection.close(flush=True)

    def on_upstream_above_write_buffer_high_watermark(self) -> None:
        if self.downstream_read_paused or self.downstream_closed:
            return
        self.downstream_read_paused = True
        self.connection.read_disable(True)
        self.stats.downstream_flow_control_paused_reading_total.inc()

    def on_upstream_below_write_buffer_low_watermark(self) -> None:
        self._last_activity = self.loop.time()  # type: ignore[union-attr]
        if not self.downstream_read_paused or self.downstream_closed:
            return
        self.downstream_read_paused = False
        self.connection.read_disable(False)
        self.stats.downstream_flow_control_resumed_reading_total.inc()

    # --- connecting ----------------------------------------------------------------------
    def _establish(self) -> None:
        """Start one connection attempt, or close the downstream if none can be made."""
        if self.downstream_closed:
            return
        config = self.config
        cm = config.cluster_manager
        name = config.pick_cluster()
        cluster = cm.get(name) if cm is not None and name else None
        si = self.stream_info
        if cluster is None:
            self.stats.downstream_cx_no_route.inc()
            if si is not None:
                si.set_response_flag(NO_ROUTE_FOUND)
            self._init_failure()
            return
        info = cluster.info
        if si is not None:
            si.upstream_cluster = info.name
        rm = resource_managers(info, config.runtime).default
        if not rm.connections.can_create():
            # Envoy checks max_connections before asking its pool: no queueing, no retry.
            _inc(info.stats, "upstream_cx_overflow")
            if si is not None:
                si.set_response_flag(UPSTREAM_OVERFLOW)
            self._init_failure()
            return
        if self.connect_attempts >= config.max_connect_attempts:
            _inc(info.stats, "upstream_cx_connect_attempts_exceeded")
            if si is not None:
                si.set_response_flag(UPSTREAM_RETRY_LIMIT_EXCEEDED)
            self._init_failure()
            return
        host = cluster.choose_host(self)
        if host is None:
            info.stats.upstream_cx_none_healthy.inc()
            if si is not None:
                si.set_response_flag(NO_HEALTHY_UPSTREAM)
            self._init_failure()
            return
        self.connect_attempts += 1
        if si is not None:
            si.attempt_count = self.connect_attempts
        if not rm.pending_requests.can_create():
            # The pool refuses to queue the session (PoolFailureReason::Overflow): no
            # connection, no host in the log; tcp_proxy retries, then gives up with URX.
            _inc(info.stats, "upstream_rq_pending_overflow")
            self._retry()
            return
        if si is not None:
            si.upstream_host = host.address
        up = UpstreamConnection(self, host, info, getattr(cluster, "outlier", None), rm)
        self.upstream = up
        loop = self.loop
        assert loop is not None
        self._connect_task = loop.create_task(self._connect(up, host.address))
        self._connect_timer = loop.call_later(info.connect_timeout, self._on_connect_timeout)

    async def _connect(self, up: UpstreamConnection, address: tuple[str, int]) -> None:
        loop = self.loop
        assert loop is not None
        try:
            await loop.create_connection(lambda: up, address[0], address[1])
        except asyncio.CancelledError:
            return  # cancelled by the connect timer or a downstream close; they did the books
        except OSError as e:
            if up is self.upstream and not up.connected:
                self._on_connect_failed(up, e)

    def _on_connect_failed(self, up: UpstreamConnection, exc: BaseException) -> None:
        log.debug("tcp_proxy: connect to %s failed: %s", up.host.address, exc)
        timer = self._connect_timer
        if timer is not None:
            timer.cancel()
            self._connect_timer = None
        self._connect_task = None
        self._destroy_unconnected(up, local=False)
        od = up.outlier
        if od is not None:
            od.on_local_origin_failure(up.host, "connect_failed")  # LocalOriginConnectFailed
        self._retry()

    def _on_connect_timeout(self) -> None:
        self._connect_timer = None
        up = self.upstream
        if up is None or up.connected:
            return
        task = self._connect_task
        self._connect_task = None
        if task is not None:
            task.cancel()
        up.stats.upstream_cx_connect_timeout.inc()
        od = up.outlier
        if od is not None:
            od.on_local_origin_failure(up.host, "timeout")  # LocalOriginTimeout
        self._destroy_unconnected(up, local=True)
        self._retry()

    def _destroy_unconnected(self, up: UpstreamConnection, local: bool) -> None:
        """Books for a connection that never connected (refused: remote, timeout: local)."""
        self.upstream = None
        up.parent = None
        up.closed = True
        up.rq_failed()
        up.release_connection()
        stats = up.stats
        stats.upstream_cx_connect_fail.inc()
        up.host.stats.cx_connect_fail.inc()
        stats.upstream_cx_active.dec()
        up.host.stats.cx_active.dec()
        stats.upstream_cx_destroy.inc()
        if local:
            stats.upstream_cx_destroy_local.inc()
        else:
            stats.upstream_cx_destroy_remote.inc()
        if self.stream_info is not None:
            self.stream_info.set_response_flag(UPSTREAM_CONNECTION_FAILURE)

    def _abandon_connect(self, up: UpstreamConnection) -> None:
        """The downstream closed while we were still connecting: cancel the attempt."""
        up.parent = None
        up.rq_cancelled()
        task = self._connect_task
        self._connect_task = None
        if task is not None:
            task.cancel()
        if up.transport is None and not up.closed:
            up.closed = True
            up.release_connection()
            stats = up.stats
            stats.upstream_cx_active.dec()
            up.host.stats.cx_active.dec()
            stats.upstream_cx_destroy.inc()
            stats.upstream_cx_destroy_local.inc()

    def _retry(self) -> None:
        self.connect_failures += 1
        if self.connect_attempts < self.config.max_connect_attempts:
            delay = self.config.backoff_delay(self.connect_failures - 1)
            if delay > 0:
                assert self.loop is not None
                self._connect_timer = self.loop.call_later(delay, self._establish)
                return
        self._establish()

    def _reapply_read_disable(self) -> None:
        conn = self.connection
        t = conn.transport
        if t is not None and not conn.reading_enabled and not conn.local_close:
            try:
                t.pause_reading()
            except RuntimeError:
                pass

    def _hold_early_data(self, data: bytes) -> None:
        """Bytes that slipped in while connecting: keep them for the upstream, and stop
        reading if they reach the listener's buffer limit."""
        early = self._early_data
        if early is None:
            early = self._early_data = []
        early.append(data)
        if sum(map(len, early)) >= self.connection.buffer_limit:
            self._reapply_read_disable()

    def _init_failure(self) -> None:
        # Envoy's onInitFailure: close the downstream, NoFlush, no data written.
        self.connection.close(flush=False)

    # --- closing -------------------------------------------------------------------------
    def _on_downstream_eof(self) -> None:
        if self.downstream_eof:
            return
        self.downstream_eof = True
        t = self.upstream_transport
        if t is not None:
            try:
                t.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                pass
        if self.upstream_eof:
            # Both directions are done; the downstream's FIN came last (Envoy: LocalClose).
            self._finish(upstream_local=True)

    def _finish(self, upstream_local: bool) -> None:
        """Both directions ended: close both sockets after their queued bytes are out."""
        up = self.upstream
        self.upstream = None
        self.upstream_transport = None
        if up is not None and up.transport is not None:
            up.parent = None
            if upstream_local:
                up.drain(self.config.idle_timeout)
            else:
                t = up.transport
                t.close()  # the upstream's FIN completed it: a remote close in Envoy's books
        self.connection.close(flush=True)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if self.downstream_closed:
            return
        loop = self.loop
        assert loop is not None
        remaining = self.config.idle_timeout - (loop.time() - self._last_activity)
        if remaining > 0.001:
            self._idle_timer = loop.call_later(remaining, self._on_idle_timer)
            return
        log.debug("tcp_proxy: session idle timeout")
        self.stats.idle_timeout.inc()
        self._close_both_no_flush()

    def _on_max_duration(self) -> None:
        self._max_duration_timer = None
        if self.downstream_closed:
            return
        self.stats.max_downstream_connection_duration.inc()
        self._close_both_no_flush()

    def _close_both_no_flush(self) -> None:
        up = self.upstream
        if up is not None and up.connected:
            self.upstream = None
            self.upstream_transport = None
            up.parent = None
            up.close(flush=False)
        self.connection.close(flush=False)

    def _cancel_timers(self) -> None:
        for name in ("_idle_timer", "_max_duration_timer", "_connect_timer"):
            h = getattr(self, name)
            if h is not None:
                h.cancel()
                setattr(self, name, None)

    # --- gauges --------------------------------------------------------------------------
    def _downstream_buffer_size(self) -> int:
        t = self.connection.transport
        return t.get_write_buffer_size() if t is not None else 0

    def _report_tx_buffered(self, n: int) -> None:
        """``downstream_cx_tx_bytes_buffered``, updated at watermark crossings and close."""
        if n != self.tx_buffered:
            self.stats.downstream_cx_tx_bytes_buffered.add(n - self.tx_buffered)
            self.tx_buffered = n
