"""The HTTP connection manager: one per downstream connection, streams in, filters, codec out.

Strategy: the ConnectionManager is the network read filter that owns the HTTP/1 codec
(``pyenvoy.http.http1.RequestParser``); it is the parser's handler. Each request becomes an
ActiveStream that runs the HTTP filter chain (decode in order, encode in reverse), and whose
response the manager frames back onto the connection. The stream is codec-neutral: it sees
RequestHeaders/ResponseHeaders and bytes; only ``_write_response_*`` know HTTP/1 framing.

HTTP/1 allows one request at a time: pipelined requests stay buffered in the paused parser
until the current response completes. Local replies (404 NR, 503 UH, 400 ...) use Envoy's
texts and headers. No ``await`` lives here: everything is callbacks; timers are shared
``TimeoutQueue`` entries (see pyenvoy/timeouts.py) or one per-connection handle.
"""

from __future__ import annotations

import logging
import random
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from pyenvoy import stream_info as sinfo
from pyenvoy.http import filter as hf
from pyenvoy.http import http1
from pyenvoy.http.headers import RequestHeaders, ResponseHeaders
from pyenvoy.network import filter as nf
from pyenvoy.stream_info import StreamInfo
from pyenvoy.timeouts import Timeout, queue_for

if TYPE_CHECKING:
    from pyenvoy.extensions.filters.network.http_connection_manager.config import HcmConfig
    from pyenvoy.network.connection import Connection

log = logging.getLogger("pyenvoy.http")

_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """RFC 7231 date, cached per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


class ConnectionManager(nf.ReadFilter):
    """``envoy.filters.network.http_connection_manager`` for one downstream connection."""

    __slots__ = (
        "config",
        "connection",
        "parser",
        "stream",
        "stats",
        "closing",
        "_idle_handle",
        "last_activity",
        "remote_closed",
        "requests",
        "start",
        "drain_pending",
    )

    def __init__(self, config: HcmConfig) -> None:
        self.config = config
        self.parser = http1.RequestParser(
            self,
            max_header_bytes=config.max_request_headers_bytes,
            max_headers_count=config.max_headers_count,
        )
        self.stream: ActiveStream | None = None
        self.stats = config.stats
        self.closing = False
        self._idle_handle: Any = None
        self.last_activity = 0.0
        self.remote_closed = False
        self.requests = 0
        self.start = 0.0
        self.drain_pending = False

    # --- network filter ---------------------------------------------------------------
    def initialize_read_filter_callbacks(self, connection: Connection) -> None:
        self.connection = connection
        connection.add_connection_callbacks(self)

    def on_new_connection(self) -> int:
        s = self.stats
        s.downstream_cx_total.value += 1
        s.downstream_cx_http1_total.value += 1
        s.downstream_cx_active.value += 1
        s.downstream_cx_http1_active.value += 1
        self.start = self.last_activity = time.monotonic()
        self._arm_idle_check(self.config.idle_check_interval)
        return nf.STOP_ITERATION

    def on_data(self, data: bytes, end_stream: bool) -> int:
        self.last_activity = _monotonic()
        if data:
            self.stats.downstream_cx_rx_bytes_total.value += len(data)
            try:
                self.parser.feed(data)
            except http1.ParseError as e:
                self._on_codec_error(e)
                return nf.STOP_ITERATION
        if end_stream:
            self.remote_closed = True
            stream = self.stream
            if stream is None:
                self.connection.close()
            elif not stream.request_complete:
                # Client went away mid-request: Envoy's connection raises RemoteClose with
                # the stream still active (on_event's accounting), then resets it.
                s = self.stats
                s.downstream_cx_destroy_active_rq.value += 1
                s.downstream_cx_destroy_remote_active_rq.value += 1
                stream.stream_info.set_response_flag(sinfo.DOWNSTREAM_CONNECTION_TERMINATION)
                stream.reset(remote=True)
                self.connection.close()
            # else: finish the response, then close (see on_stream_complete).
        return _STOP_ITERATION

    # --- connection callbacks -------------------------------------------------------------
    def on_event(self, event: str) -> None:
        s = self.stats
        s.downstream_cx_active.value -= 1
        s.downstream_cx_http1_active.value -= 1
        s.downstream_cx_destroy.value += 1
        if event == nf.REMOTE_CLOSE:
            s.downstream_cx_destroy_remote.value += 1
        else:
            s.downstream_cx_destroy_local.value += 1
        s.downstream_cx_length_ms.record((time.monotonic() - self.start) * 1000)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        stream = self.stream
        if stream is not None:
            s.downstream_cx_destroy_active_rq.value += 1
            if event == nf.REMOTE_CLOSE:
                s.downstream_cx_destroy_remote_active_rq.value += 1
            else:
                s.downstream_cx_destroy_local_active_rq.value += 1
            stream.stream_info.set_response_flag(sinfo.DOWNSTREAM_CONNECTION_TERMINATION)
            stream.reset(remote=True)

    def on_above_write_buffer_high_watermark(self) -> None:
        stream = self.stream
        if stream is not None:
            for cb in stream.watermark_callbacks:
                cb.on_above_write_buffer_high_watermark()

    def on_below_write_buffer_low_watermark(self) -> None:
        stream = self.stream
        if stream is not None:
            for cb in stream.watermark_callbacks:
                cb.on_below_write_buffer_low_watermark()

    # --- RequestParser handler ---------------------------------------------------------
    def on_request_headers(
        self,
        method: bytes,
        target: bytes,
        version: int,
        headers: list[list[bytes]],
        keep_alive: bool,
        has_body: bool,
    ) -> None:
        config = self.config
        self.requests += 1
        # Host/:authority (clients put Host first: look there before scanning) and the
        # absolute-form request target.
        authority = b""
        if headers and headers[0][0] == b"host":
            authority = headers[0][1]
            del headers[0]
        else:
            for i, h in enumerate(headers):
                if h[0] == b"host":
                    authority = h[1]
                    del headers[i]
                    break
        path = target
        if target[:1] != b"/":
            if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
                rest = target.split(b"://", 1)[1]
                slash = rest.find(b"/")
                authority = rest if slash < 0 else rest[:slash]
                path = b"/" if slash < 0 else rest[slash:]
            elif method == b"CONNECT" or (method == b"OPTIONS" and target == b"*"):
                pass
            else:
                raise http1.ParseError("http1.invalid_url", 400)
        if version == 10 and not authority and config.default_host_for_http_10:
            authority = config.default_host_for_http_10
        rh = RequestHeaders(method, path, authority, b"http", headers)
        stream = ActiveStream(self, rh, version, keep_alive and not self.closing)
        self.stream = stream
        if version != 11:
            if version != 10 or not config.accept_http_10:
                stream.version = 11  # Envoy answers this one as HTTP/1.1
                stream.request_complete = not has_body
                stream.send_local_reply(426, b"Upgrade Required", "low_version", close=True)
                return
        elif not authority:
            stream.request_complete = not has_body
            stream.send_local_reply(400, b"", "missing_host_header", close=True)
            return
        if b"#" in path:
            stream.request_complete = not has_body
            stream.send_local_reply(400, b"", "invalid_url", close=True)
            return
        if has_body and version == 11 and not config.proxy_100_continue:
            expect = rh.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue":
                # Envoy answers 100-continue itself and does not forward the Expect header.
                rh.remove(b"expect")
                self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                s = self.stats
                s.downstream_rq_1xx.value += 1
                s.downstream_rq_completed.value += 1
                ls = config.listener_stats
                if ls is not None:
                    ls.downstream_rq_1xx.value += 1
                    ls.downstream_rq_completed.value += 1
        stream.decode_headers(rh, not has_body)

    def on_body(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None and not stream.request_complete:
            stream.decode_data(data, False)

    def on_message_complete(self) -> None:
        stream = self.stream
        if stream is None:
            return
        if not stream.request_complete:
            stream.decode_data(b"", True)
        if self.stream is stream and not stream.response_complete:
            # Pipelined requests wait in the parser until this response is done.
            self.parser.pause()

    # --- stream lifecycle ----------------------------------------------------------------
    def on_stream_complete(self, stream: ActiveStream) -> None:
        """Response fully written (or stream reset)."""
        if self.stream is stream:
            self.stream = None
        request_complete = stream.request_complete
        if not request_complete:
            # Responded before the request was fully read (the reply said connection: close,
            # see send_local_reply): HTTP/1 can't resync, so the connection closes below.
            self.stats.downstream_rq_response_before_rq_complete.value += 1
        conn = self.connection
        if conn.closed or conn.local_close:
            return
        if (
            stream.close_connection
            or not stream.keep_alive
            or self.remote_closed
            or self.closing
            or not request_complete
        ):
            conn.close()
            return
        if self.drain_pending:
            # This response went out keep-alive, so the client may send another request:
            # the drain's connection: close goes on the next response, not a close now.
            self.apply_pending_drain()
        if self.parser.paused:
            try:
                self.parser.resume()
            except http1.ParseError as e:
                self._on_codec_error(e)

    def _on_codec_error(self, e: http1.ParseError) -> None:
        self.stats.downstream_cx_protocol_error.value += 1
        stream = self.stream
        if stream is not None and stream.response_started:
            stream.reset(remote=False)
            self.connection.close()
            return
        if stream is None:
            stream = ActiveStream(self, RequestHeaders(b"", b"", b""), 11, False)
            self.stream = stream
        stream.stream_info.set_response_flag(sinfo.DOWNSTREAM_PROTOCOL_ERROR)
        if e.status == 431:
            body = b"Request Header Fields Too Large"
        elif e.status == 413:
            body = b"Payload Too Large"
        elif e.status == 501:
            body = b"Not Implemented"
        else:
            body = b"Bad Request"
        stream.request_complete = True
        stream.send_local_reply(e.status, body, e.details, close=True)
        self.parser.pause()

    # --- idle timeouts ----------------------------------------------------------------
    # One timer per connection covers both the connection idle_timeout (no stream) and the
    # stream idle timeout (a stream with no bytes either way). Activity only stamps
    # ``last_activity``; the timer re-arms itself for what is left, so no timer is created
    # or cancelled per request or per chunk.
    def _arm_idle_check(self, delay: float) -> None:
        if delay <= 0:
            return
        h = self._idle_handle
        if h is not None:
            h.cancel()
        self._idle_handle = _loop().call_later(delay, self._on_idle_check)

    def set_stream_idle_timeout(self, seconds: float) -> None:
        """A route's idle_timeout overrides the HCM's stream_idle_timeout."""
        stream = self.stream
        if stream is None:
            return
        stream.idle_timeout = seconds
        if seconds > 0:
            self._arm_idle_check(seconds)

    def _on_idle_check(self) -> None:
        self._idle_handle = None
        conn = self.connection
        if conn.closed:
            return
        config = self.config
        stream = self.stream
        now = time.monotonic()
        if stream is not None:
            timeout = stream.idle_timeout
            if timeout <= 0:
                self._arm_idle_check(config.idle_check_interval)
                return
            remaining = self.last_activity + timeout - now
            if remaining > 0:
                self._arm_idle_check(remaining)
                return
            stream.on_idle_timeout()
            self.last_activity = now
            self._arm_idle_check(config.idle_check_interval)
            return
        idle = config.idle_timeout
        if not idle:
            self._arm_idle_check(config.idle_check_interval)
            return
        remaining = self.last_activity + idle - now
        if remaining > 0:
            self._arm_idle_check(min(remaining, config.idle_check_interval))
            return
        self.stats.downstream_cx_idle_timeout.value += 1
        conn.close()

    def drain(self) -> None:
        """Stop keep-alive and close now if idle (shutdown)."""
        self.closing = True
        if self.stream is None:
            self.connection.close()

    def apply_pending_drain(self) -> None:
        """The response that was on the wire at drain time is done: close after the next."""
        self.drain_pending = False
        self.closing = True

    def drain_close(self) -> bool:
        """Drain gently: the next response carries ``connection: close``; an idle connection
        is never closed under a request that may be on its way. False if already draining."""
        if self.closing or self.drain_pending or self.connection.closed:
            return False
        stream = self.stream
        if stream is not None and stream.response_started and not stream.response_complete:
            self.drain_pending = True  # this response went out keep-alive: mark the next
        else:
            self.closing = True
        self.stats.downstream_cx_drain_close.value += 1
        return True


_monotonic = time.monotonic
_getrandbits = random.getrandbits
_encode_response_head = http1.encode_response_head
_CONTINUE = hf.CONTINUE
_STOP_ITERATION = nf.STOP_ITERATION


def _loop() -> Any:
    import asyncio

    return asyncio.get_running_loop()


class ActiveStream:
    """One request/response exchange and its filter chain."""

    __slots__ = (
        "cm",
        "connection",
        "request_headers",
        "version",
        "keep_alive",
        "stream_info",
        "_route",
        "decoder_filters",
        "encoder_filters",
        "request_complete",
        "response_complete",
        "response_started",
        "close_connection",
        "is_head",
        "chunked",
        "_decode_stopped",
        "_decode_headers_pending",
        "_decode_buffer",
        "_decode_end",
        "_encode_stopped",
        "_encode_buffer",
        "_encode_end",
        "_pending_response_headers",
        "watermark_callbacks",
        "_timer",
        "destroyed",
        "response_headers",
        "local_reply",
        "_upstream_above",
        "idle_timeout",
    )

    def __init__(
        self, cm: ConnectionManager, headers: RequestHeaders, version: int, keep_alive: bool
    ) -> None:
        self.cm = cm
        conn = cm.connection
        # The downstream connection (fixed for the manager's life), for filters too.
        self.connection: Connection = conn
        self.request_headers = headers
        self.version = version
        self.keep_alive = keep_alive
        si = StreamInfo(
            conn.remote_address, conn.local_address, "HTTP/1.1" if version == 11 else "HTTP/1.0"
        )
        self.stream_info = si
        self._route: Any = _UNSET
        # Filled by HcmConfig.create_filter_chain; never mutated in place (see _finish).
        self.decoder_filters: list[Any] = _EMPTY
        self.encoder_filters: list[Any] = _EMPTY
        self.request_complete = False
        self.response_complete = False
        self.response_started = False
        self.close_connection = False
        self.is_head = headers.method == b"HEAD"
        self.chunked = False
        self._decode_stopped = -1  # index of the filter that stopped decoding, -1 none
        self._decode_headers_pending = False
        self._decode_buffer: list[bytes] | None = None
        self._decode_end = False
        self._encode_stopped = -1
        self._encode_buffer: list[bytes] | None = None
        self._encode_end = False
        self._pending_response_headers: ResponseHeaders | None = None
        self.watermark_callbacks: list[Any] = []
        self._timer: Timeout | None = None
        self.destroyed = False
        self.response_headers: ResponseHeaders | None = None
        self.local_reply = False
        self._upstream_above = False
        self.idle_timeout = cm.config.stream_idle_timeout
        s = cm.stats
        s.downstream_rq_total.value += 1
        s.downstream_rq_http1_total.value += 1
        s.downstream_rq_active.value += 1

    # --- decoding ------------------------------------------------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> None:
        config = self.cm.config
        self.request_complete = end_stream
        if end_stream:
            self.stream_info.request_complete_monotonic = _monotonic()
        config.mutate_request_headers(headers, self)
        if config.request_timeout:
            self._timer = queue_for(config.request_timeout).add(self._on_request_timeout)
        filters = config.create_filter_chain(self)
        if self.destroyed or self.response_complete:
            return
        i = 0  # a counter, not enumerate(): cheaper for the usual one or two filters
        for f in filters:
            status = f.decode_headers(headers, end_stream)
            if self.destroyed or self.local_reply:
                return
            if status != _CONTINUE:
                self._decode_stopped = i
                self._decode_headers_pending = True
                self._decode_end = end_stream
                return
            i += 1

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.request_complete = True
            self.stream_info.request_complete_monotonic = time.monotonic()
            t = self._timer
            if t is not None:
                t.cancel()
                self._timer = None
        self.stream_info.bytes_received += len(data)
        if self._decode_stopped >= 0 and not self._decode_headers_pending:
            # A filter holds the body (StopIterationAndBuffer): keep it until it continues.
            buf = self._decode_buffer
            if buf is None:
                buf = self._decode_buffer = []
            if data:
                buf.append(data)
            if end_stream:
                self._decode_end = True
            self._check_decode_buffer()
            return
        self._decode_data_from(0, data, end_stream)

    def _decode_data_from(self, start: int, data: bytes, end_stream: bool) -> None:
        """Run ``decode_data`` from filter ``start``. While a filter holds the headers
        (stopped in decode_headers), body data still reaches it and the filters before it,
        as in Envoy; its CONTINUE on data releases the headers to the rest of the chain."""
        filters = self.decoder_filters
        k = start
        n = len(filters)
        while k < n:
            status = filters[k].decode_data(data, end_stream)
            if self.destroyed or self.local_reply:
                return
            if status == hf.CONTINUE:
                if self._decode_headers_pending and k == self._decode_stopped:
                    self._decode_headers_pending = False
                    self._decode_stopped = -1
                    end_at_headers = self._decode_end and not data and end_stream
                    for j in range(k + 1, n):
                        hs = filters[j].decode_headers(self.request_headers, end_at_headers)
                        if self.destroyed or self.local_reply:
                            return
                        if hs != hf.CONTINUE:
                            self._decode_stopped = j
                            self._decode_headers_pending = True
                            if data:
                                self._decode_buffer = [data]
                            self._decode_end = end_stream
                            return
                k += 1
                continue
            if status == hf.STOP_ITERATION_NO_BUFFER:
                return
            # STOP_ITERATION / STOP_ITERATION_AND_BUFFER: hold the body at this filter.
            self._decode_stopped = k
            self._decode_headers_pending = False
            buf = self._decode_buffer
            if buf is None:
                buf = self._decode_buffer = []
            if data:
                buf.append(data)
            self._decode_end = end_stream
            self._check_decode_buffer()
            return

    def _check_decode_buffer(self) -> None:
        buf = self._decode_buffer
        if buf and sum(len(b) for b in buf) > self.connection.buffer_limit:
            if self.response_started:
                self.reset(remote=False)
                self.connection.close()
            else:
                self.cm.stats.downstream_rq_too_large.value += 1
                self.send_local_reply(413, b"Payload Too Large", "request_payload_too_large")

    def continue_decoding(self) -> None:
        """Resume the decode chain after the filter that stopped it.

        While a filter holds the chain, later data is buffered (Envoy's
        StopAllIterationAndBuffer); on continue the held headers, then the buffered body,
        go to the filters after it.
        """
        i = self._decode_stopped
        if i < 0 or self.destroyed:
            return
        self._decode_stopped = -1
        filters = self.decoder_filters
        buf = self._decode_buffer
        self._decode_buffer = None
        data = b"".join(buf) if buf else b""
        end = self._decode_end
        start = i + 1
        if self._decode_headers_pending:
            self._decode_headers_pending = False
            end_at_headers = end and not data
            for j in range(start, len(filters)):
                status = filters[j].decode_headers(self.request_headers, end_at_headers)
                if self.destroyed or self.local_reply:
                    return
                if status != hf.CONTINUE:
                    self._decode_stopped = j
                    self._decode_headers_pending = True
                    if data:
                        self._decode_buffer = [data]
                    return
            if end_at_headers or (not data and not end):
                return
        self._decode_data_from(start, data, end)

    # --- routing ---------------------------------------------------------------------
    def route(self) -> Any:
        r = self._route
        if r is _UNSET:
            table = self.cm.config.route_table
            # A fresh random value per stream drives runtime_fraction matches and weighted
            # clusters, as in Envoy.
            r = self._route = (
                table.route(self.request_headers, _getrandbits(64)) if table is not None else None
            )
            if r is not None:
                si = self.stream_info
                si.route_name = r.name
                si.virtual_host_name = r.virtual_host.name
        return r

    def clear_route_cache(self) -> None:
        self._route = _UNSET

    # --- encoding -----------------------------------------------------------------------
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        if self.destroyed or self.response_started:
            return
        self.response_headers = headers
        filters = self.encoder_filters
        if filters:
            for i, f in enumerate(filters):
                status = f.encode_headers(headers, end_stream)
                if status != _CONTINUE:
                    self._encode_stopped = i
                    self._pending_response_headers = headers
                    self._encode_end = end_stream
                    return
        self._write_response_headers(headers, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.destroyed:
            return
        if self._encode_stopped >= 0:
            buf = self._encode_buffer
            if buf is None:
                buf = self._encode_buffer = []
            if data:
                buf.append(data)
            if end_stream:
                self._encode_end = True
            return
        filters = self.encoder_filters
        if filters:
            for i, f in enumerate(filters):
                status = f.encode_data(data, end_stream)
                if status != _CONTINUE:
                    self._encode_stopped = i
                    buf = self._encode_buffer
                    if buf is None:
                        buf = self._encode_buffer = []
                    if data:
                        buf.append(data)
                    self._encode_end = end_stream
                    return
        self._write_response_data(data, end_stream)

    def encode_trailers(self, trailers: Any) -> None:
        # HTTP/1 responses carry no trailers downstream unless enabled; end the body.
        self.encode_data(b"", True)

    def continue_encoding(self) -> None:
        i = self._encode_stopped
        if i < 0 or self.destroyed:
            return
        self._encode_stopped = -1
        filters = self.encoder_filters
        headers = self._pending_response_headers
        buf = self._encode_buffer
        self._encode_buffer = None
        data = b"".join(buf) if buf else b""
        end = self._encode_end
        if headers is not None and not self.response_started:
            self._pending_response_headers = None
            for j in range(i + 1, len(filters)):
                status = filters[j].encode_headers(headers, end and not data)
                if status != hf.CONTINUE:
                    self._encode_stopped = j
                    self._pending_response_headers = headers
                    if data:
                        self._encode_buffer = [data]
                    return
            self._write_response_headers(headers, end and not data)
            if data or (end and not self.response_complete):
                self._write_response_data(data, end)
            return
        for j in range(i + 1, len(filters)):
            status = filters[j].encode_data(data, end)
            if status != hf.CONTINUE:
                self._encode_stopped = j
                if data:
                    self._encode_buffer = [data]
                return
        self._write_response_data(data, end)

    # --- codec (HTTP/1 framing) ------------------------------------------------------------
    def _write_response_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        cm = self.cm
        self.response_started = True
        self.stream_info.response_code = status = headers.status
        # The HCM drops the hop-by-hop headers: connection management and framing are the
        # codec's, below.
        has_length = cm.config.mutate_response_headers(headers, self)
        hl = headers.headers
        no_body_status = status < 200 or status == 204 or status == 304
        if no_body_status:
            headers.headers = hl = [x for x in hl if x[0] != b"content-length"]
            has_length = True
        http10 = self.version == 10
        close = self.close_connection or not self.keep_alive or cm.closing or cm.remote_closed
        framing: list[bytes] | None = None
        if not has_length:
            if end_stream and not self.is_head:
                framing = [b"content-length", b"0"]
            elif http10:
                close = True  # body delimited by the connection close
            else:
                # Envoy's codec chunks any response without a length, HEAD included.
                self.chunked = not self.is_head
                framing = [b"transfer-encoding", b"chunked"]
        if close:
            self.close_connection = True
            hl.append([b"connection", b"close"])
        elif http10:
            hl.append([b"connection", b"keep-alive"])
        if framing is not None:
            hl.append(framing)
        head = _encode_response_head(status, hl, self.version)
        cm.last_activity = _monotonic()
        cm.stats.downstream_cx_tx_bytes_total.value += len(head)
        self.connection.write(head)
        if end_stream or self.is_head or no_body_status:
            self._on_response_complete()

    def _write_response_data(self, data: bytes, end_stream: bool) -> None:
        if self.response_complete:
            return
        n = len(data)
        if n:
            cm = self.cm
            cm.last_activity = _monotonic()
            self.stream_info.bytes_sent += n
            # chunked is never set for HEAD, whose body is dropped.
            if self.chunked:
                chunk = http1.encode_chunk(data)
                cm.stats.downstream_cx_tx_bytes_total.value += len(chunk)
                self.connection.write(chunk)
            elif not self.is_head:
                cm.stats.downstream_cx_tx_bytes_total.value += n
                self.connection.write(data)
        if end_stream:
            if self.chunked:
                self.connection.write(http1.LAST_CHUNK)
            self._on_response_complete()

    def _on_response_complete(self) -> None:
        self.response_complete = True
        self._finish()
        self.cm.on_stream_complete(self)

    # --- local replies ---------------------------------------------------------------
    def send_local_reply(
        self,
        status: int,
        body: str | bytes,
        details: str = "",
        flags: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
        modify_headers: Any = None,
    ) -> None:
        """Envoy's local reply: text/plain body, content-length, through the encoder filters."""
        if self.destroyed:
            return
        si = self.stream_info
        if flags:
            si.set_response_flag(flags)
        if details:
            si.response_code_details = details
        if close or not self.request_complete:
            # HTTP/1 can't skip the rest of an unread request body: close after the reply.
            self.close_connection = True
        if self.response_started:
            # Too late for a reply: reset (HTTP/1 closes the connection).
            self.reset(remote=False)
            self.connection.close()
            return
        self.local_reply = True
        b = body.encode() if isinstance(body, str) else body
        rh = ResponseHeaders(status, [[n, v] for n, v in headers] if headers else [])
        if modify_headers is not None:
            modify_headers(rh)
        if b:
            rh.headers.append([b"content-length", str(len(b)).encode()])
            rh.headers.append([b"content-type", b"text/plain"])
        self._decode_stopped = -1
        self.encode_headers(rh, not b)
        if b:
            self.encode_data(b, True)

    # --- watermarks (back-pressure) -------------------------------------------------------
    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        """The upstream can't take more: stop reading the downstream."""
        if not self._upstream_above:
            self._upstream_above = True
            self.connection.read_disable(True)

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        if self._upstream_above:
            self._upstream_above = False
            self.connection.read_disable(False)

    def add_downstream_watermark_callbacks(self, cb: Any) -> None:
        self.watermark_callbacks.append(cb)
        if self.connection.above_high_watermark:
            cb.on_above_write_buffer_high_watermark()

    def remove_downstream_watermark_callbacks(self, cb: Any) -> None:
        try:
            self.watermark_callbacks.remove(cb)
        except ValueError:
            pass

    # --- end of stream ---------------------------------------------------------------------
    def _on_request_timeout(self) -> None:
        self._timer = None
        if self.destroyed or self.request_complete:
            return
        self.cm.stats.downstream_rq_timeout.value += 1
        self.send_local_reply(408, b"request timeout", "request_overall_timeout", close=True)

    def on_idle_timeout(self) -> None:
        """No bytes either way for the stream idle timeout: Envoy answers ``stream timeout``
        with 504 once the request is complete, 408 while it is still arriving."""
        self.cm.stats.downstream_rq_idle_timeout.value += 1
        self.stream_info.set_response_flag(sinfo.STREAM_IDLE_TIMEOUT)
        if self.response_started:
            self.reset_stream()
            return
        status = 504 if self.request_complete else 408
        self.send_local_reply(status, b"stream timeout", "stream_idle_timeout")

    def set_idle_timeout(self, seconds: float) -> None:
        self.cm.set_stream_idle_timeout(seconds)

    def reset_stream(self) -> None:
        """A filter aborts the stream after the response started: HTTP/1 closes the connection."""
        self.reset(remote=False)
        self.connection.close(flush=True)

    def reset(self, remote: bool = True) -> None:
        """Abort the stream: filters are told, the upstream request (if any) is cancelled."""
        if self.destroyed:
            return
        s = self.cm.stats
        if remote:
            s.downstream_rq_rx_reset.value += 1
        else:
            s.downstream_rq_tx_reset.value += 1
        self._finish()
        if self.cm.stream is self:
            self.cm.stream = None

    def _finish(self) -> None:
        if self.destroyed:
            return
        self.destroyed = True
        t = self._timer
        if t is not None:
            t.cancel()
        if self._upstream_above:
            self._upstream_above = False
            self.connection.read_disable(False)
        decoders = self.decoder_filters
        for f in decoders:
            f.on_destroy()
        encoders = self.encoder_filters
        if encoders:
            for f in encoders:
                if f not in decoders:
                    f.on_destroy()
        self.cm.config.on_stream_complete(self)
        # Break stream <-> filter reference cycles so refcounting frees a finished stream
        # at once (no garbage-collector work per request).
        self.decoder_filters = self.encoder_filters = _EMPTY
        self.watermark_callbacks = _EMPTY


_UNSET = object()
_EMPTY: list[Any] = []
