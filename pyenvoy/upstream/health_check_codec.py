"""Health-check connections: a raw TCP client and small HTTP/1.1 and HTTP/2 codec clients.

Strategy: active health checks are few and slow (one probe per host per interval), so
clarity beats speed here, but they still follow the proxy's I/O style: every connection is
an ``asyncio.Protocol`` whose events are forwarded to the owning session as plain method
calls, the way Envoy's CodecClient calls a health-check session. ``RawConnection`` connects
(bounded by the cluster's connect_timeout), buffers writes until connected and reports
``on_connected`` / ``on_data`` / ``on_close``; closing it locally never calls back, so a
session that closes its own client just forgets it. The HTTP clients put one request stream
on top and report ``on_headers`` / ``on_data`` / ``on_trailers`` / ``on_reset`` / ``on_goaway``:
HTTP/1.1 writes the request bytes itself (Envoy's header order: ``host`` first) and lets
h11 frame the response; HTTP/2 uses the h2 state machine, one stream at a time. A reset on
HTTP/1.1 closes the connection, as in Envoy.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol, cast

import h11

__all__ = [
    "CodecCallbacks",
    "Http1Client",
    "Http2Client",
    "RawCallbacks",
    "RawConnection",
]


class RawCallbacks(Protocol):
    def on_connected(self) -> None: ...
    def on_data(self, data: bytes) -> None: ...
    def on_close(self) -> None: ...


class CodecCallbacks(Protocol):
    """What an HTTP health-check session hears from its codec client."""

    def on_headers(
        self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None: ...
    def on_body(self, data: bytes, end_stream: bool) -> None: ...
    def on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def on_reset(self) -> None: ...
    def on_goaway(self, error_code: int) -> None: ...
    def on_connection_closed(self) -> None: ...


class RawConnection(asyncio.Protocol):
    """One outgoing TCP connection; events go to ``callbacks``."""

    def __init__(
        self, address: tuple[str, int], connect_timeout: float, callbacks: RawCallbacks
    ) -> None:
        self.address = address
        self.callbacks = callbacks
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self.connected = False
        loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = loop.create_task(
            self._connect(loop, connect_timeout)
        )

    async def _connect(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, self.address[0], self.address[1]), timeout
            )
        except asyncio.CancelledError:
            self._abort_transport()
            raise
        except (OSError, TimeoutError, ValueError):
            self._abort_transport()
            if not self.closed:
                self.closed = True
                self.callbacks.on_close()
        finally:
            self._task = None

    def _abort_transport(self) -> None:
        t = self.transport
        if t is not None:
            self.transport = None
            t.abort()

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a subclass
        if self.closed:
            transport.abort()
            return
        self.transport = transport
        self.connected = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending = []
        self.callbacks.on_connected()

    def data_received(self, data: bytes) -> None:
        if not self.closed:
            self.callbacks.on_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed:
            self.closed = True
            self.callbacks.on_close()

    # --- session side -------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        t = self.transport
        if t is not None:
            t.write(data)
        else:
            self.pending.append(data)

    def close(self) -> None:
        """Abort the connection (Envoy's ConnectionCloseType::Abort); no callback."""
        if self.closed:
            return
        self.closed = True
        task = self._task
        if task is not None:
            task.cancel()
        self._abort_transport()


class Http1Client:
    """An HTTP/1.1 codec client carrying one request at a time."""

    protocol = "HTTP/1.1"

    def __init__(
        self, address: tuple[str, int], connect_timeout: float, callbacks: CodecCallbacks
    ) -> None:
        self.callbacks = callbacks
        self.conn = h11.Connection(h11.CLIENT)
        self.active = False
        # Envoy's HeaderUtility::shouldCloseConnection for the last response.
        self.close_after = False
        self._headers: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.raw = RawConnection(address, connect_timeout, self)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def new_stream(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> None:
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        self.active = True
        self._headers = None
        out = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
        h11_headers = [(b"host", authority)]
        for k, v in headers:
            out += [k, b": ", v, b"\r\n"]
            h11_headers.append((k, v))
        out.append(b"\r\n")
        try:
            conn.send(h11.Request(method=method, target=path, headers=h11_headers))
            if body:
                conn.send(h11.Data(data=body))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass  # h11 only tracks the framing; the bytes below are what goes out
        if body:
            out.append(body)
        self.raw.write(b"".join(out))

    def reset_stream(self) -> None:
        """HTTP/1.1 has no stream reset: close the connection."""
        self.active = False
        self.raw.close()

    def close(self) -> None:
        self.active = False
        self.raw.close()

    # --- RawCallbacks -----------------------------------------------------------------
    def on_connected(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        self._drain_events()

    def _drain_events(self) -> None:
        conn = self.conn
        cb = self.callbacks
        while self.active:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                # Codec error: Envoy closes the connection, the stream sees a reset.
                self.active = False
                self.raw.close()
                cb.on_reset()
                cb.on_connection_closed()
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                if self._headers is not None:
                    status, hdrs = self._headers
                    self._headers = None
                    cb.on_headers(status, hdrs, False)
                return
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                hdrs = [(bytes(k), bytes(v)) for k, v in ev.headers]
                self._headers = (ev.status_code, hdrs)
                self.close_after = _should_close(ev.http_version, hdrs)
                continue
            if isinstance(ev, h11.Data):
                if self._headers is not None:
                    status, hdrs = self._headers
                    self._headers = None
                    cb.on_headers(status, hdrs, False)
                if self.active:
                    cb.on_body(bytes(ev.data), False)
                continue
            if isinstance(ev, h11.EndOfMessage):
                self.active = False
                headers = self._headers
                if headers is not None:
                    self._headers = None
                    cb.on_headers(headers[0], headers[1], True)
                else:
                    cb.on_body(b"", True)
                if not self.raw.closed and not (
                    conn.our_state is h11.DONE and conn.their_state is h11.DONE
                ):
                    self.raw.close()  # the response used up the connection (close-delimited)
                    cb.on_connection_closed()
                return
            if isinstance(ev, h11.ConnectionClosed):
                return

    def on_close(self) -> None:
        cb = self.callbacks
        if self.active:
            # A close-delimited body ends here; anything else is a reset.
            try:
                self.conn.receive_data(b"")
            except h11.RemoteProtocolError:
                pass
            self._drain_events()
            if self.active:
                self.active = False
                cb.on_reset()
        cb.on_connection_closed()


class Http2Client:
    """An HTTP/2 codec client (h2) carrying one stream at a time."""

    protocol = "HTTP/2"
    close_after = False

    def __init__(
        self, address: tuple[str, int], connect_timeout: float, callbacks: CodecCallbacks
    ) -> None:
        import h2.config
        import h2.connection

        self.callbacks = callbacks
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.stream_id: int | None = None
        self.raw = RawConnection(address, connect_timeout, self)
        self._flush()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    @property
    def active(self) -> bool:
        return self.stream_id is not None

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.raw.write(data)

    def new_stream(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> None:
        h = self.h2
        sid = h.get_next_available_stream_id()
        self.stream_id = sid
        hdrs = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
            *headers,
        ]
        h.send_headers(sid, hdrs, end_stream=not body)
        if body:
            h.send_data(sid, body, end_stream=True)
        self._flush()

    def reset_stream(self) -> None:
        sid = self.stream_id
        if sid is None:
            return
        self.stream_id = None
        import h2.errors
        import h2.exceptions

        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.H2Error:
            pass
        self._flush()

    def close(self) -> None:
        self.stream_id = None
        self.raw.close()

    # --- RawCallbacks -----------------------------------------------------------------
    def on_connected(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        cb = self.callbacks
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.H2Error:
            self._flush()
            self.raw.close()
            if self.stream_id is not None:
                self.stream_id = None
                cb.on_reset()
            cb.on_connection_closed()
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                if ev.stream_id != self.stream_id:
                    continue
                status = 0
                hdrs: list[tuple[bytes, bytes]] = []
                for k, v in ev.headers or ():
                    kb, vb = bytes(k), bytes(v)
                    if kb == b":status":
                        status = int(vb) if vb.isdigit() else 0
                    elif not kb.startswith(b":"):
                        hdrs.append((kb, vb))
                end = ev.stream_ended is not None
                if end:
                    self.stream_id = None
                cb.on_headers(status, hdrs, end)
            elif isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    try:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    except h2.exceptions.H2Error:
                        pass
                if ev.stream_id != self.stream_id:
                    continue
                end = ev.stream_ended is not None
                if end:
                    self.stream_id = None
                cb.on_body(bytes(ev.data or b""), end)
            elif isinstance(ev, h2.events.TrailersReceived):
                if ev.stream_id != self.stream_id:
                    continue
                self.stream_id = None
                cb.on_trailers([(bytes(k), bytes(v)) for k, v in ev.headers or ()])
            elif isinstance(ev, h2.events.StreamReset):
                if ev.stream_id == self.stream_id:
                    self.stream_id = None
                    cb.on_reset()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                cb.on_goaway(int(ev.error_code or 0))
            if self.raw.closed:
                return
        self._flush()

    def on_close(self) -> None:
        cb = self.callbacks
        if self.stream_id is not None:
            self.stream_id = None
            cb.on_reset()
        cb.on_connection_closed()


def _should_close(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    tokens: list[bytes] = []
    for k, v in headers:
        if k == b"connection":
            tokens += [t.strip().lower() for t in v.split(b",")]
    if version == b"1.0":
        return b"keep-alive" not in tokens
    return b"close" in tokens


def codec_client(
    http2: bool, address: tuple[str, int], connect_timeout: float, callbacks: CodecCallbacks
) -> Any:
    """An HTTP/1.1 or HTTP/2 health-check client connecting to ``address``."""
    if http2:
        return Http2Client(address, connect_timeout, callbacks)
    return Http1Client(address, connect_timeout, callbacks)
