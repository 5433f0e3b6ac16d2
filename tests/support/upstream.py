"""Test upstreams: an HTTP/1.1 origin and a TCP echo server on ephemeral loopback ports.

Strategy: each server owns an asyncio event loop running in a daemon thread, so the
synchronous test code (httpx, raw sockets, subprocess proxies) can talk to it freely.
The HTTP server parses requests by hand from the raw bytes (not with h11) so that it can
record exactly what the proxy sent: header order and casing, the request line, the body
length and digest. The behaviour is chosen by path (see ``HttpUpstream`` docstring).
Every accepted connection and every request is recorded, so tests can assert upstream
connection reuse. ``stop()`` closes the listener and every open connection, stops the
loop and joins the thread; all waits are bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["HttpUpstream", "RecordedRequest", "TcpEchoUpstream", "pattern_bytes"]

_PATTERN = bytes(range(ord("a"), ord("z") + 1)) * 2521 + b"0123456789"  # 65556 bytes


def pattern_bytes(n: int) -> bytes:
    """The deterministic body of ``/bytes/<n>`` and ``/chunked/<n>``."""
    reps = n // len(_PATTERN) + 1
    return (_PATTERN * reps)[:n]


@dataclass
class RecordedRequest:
    """One request as the upstream saw it on the wire."""

    conn_id: int
    index_on_conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # original order and casing
    raw_head: bytes
    body_length: int = 0
    body_sha256: str = ""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.target

    def header(self, name: str) -> str | None:
        """First value of a header (case-insensitive), or None."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "index_on_conn": self.index_on_conn,
            "method": self.method,
            "path": self.target,
            "version": self.version,
            "headers": [[k, v] for k, v in self.headers],
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
            "chunked": self.chunked,
            "trailers": [[k, v] for k, v in self.trailers],
        }


class _BadRequest(Exception):
    pass


class _ThreadLoopServer:
    """A server running on its own asyncio loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted connections
        self.active_connections = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> _ThreadLoopServer:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._on_connection, self.host, self.port, limit=1 << 20)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                error.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("upstream did not start")
        if error:
            raise error[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                _abort(w)
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            fut.result(timeout)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> _ThreadLoopServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop and return its result."""
        assert self._loop is not None
        fut: Any = asyncio.run_coroutine_threadsafe(_as_coro(fn), self._loop)
        return fut.result(5)

    # -- connections ---------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        with self._lock:
            self.connections += 1
            self.active_connections += 1
            conn_id = self.connections
        try:
            await self.handle(conn_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, _BadRequest):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with self._lock:
                self.active_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            if not writer.is_closing():
                writer.close()

    async def handle(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()


async def _as_coro(fn: Callable[[], Any]) -> Any:
    return fn()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    try:
        transport.abort()
    except Exception:  # noqa: BLE001
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0 then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    _abort(writer)


_REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    418: "I'm a teapot",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class HttpUpstream(_ThreadLoopServer):
    """A keep-alive HTTP/1.1 origin whose behaviour is chosen by the request path.

    - ``/echo...``: 200, JSON body describing the request (``RecordedRequest.to_json``).
      Any path not listed below behaves as ``/echo``.
    - ``/status/<code>``: that status, empty body (``content-length: 0`` except 1xx/204/304).
    - ``/delay/<ms>``: waits, then echoes.
    - ``/bytes/<n>``: ``content-length`` body of n pattern bytes (``pattern_bytes``).
    - ``/chunked/<n>``: chunked body of n pattern bytes (16 KiB chunks).
    - ``/close``: reads the request, closes without responding (FIN).
    - ``/reset``: reads the request, closes with RST.
    - ``/headers?k=v&k2=v2``: 200 echo, with each query pair added as a response header.
    - ``/raw?...``: the test-provided bytes in ``raw_responses[path]`` are written verbatim.
    - HEAD on any path: the headers GET would produce, no body.
    - Query ``?close=1`` on any path: ``connection: close`` and close after responding.
    Requests with ``connection: close`` (or HTTP/1.0 without keep-alive) close after the
    response. Every request is recorded in ``requests`` (a list of ``RecordedRequest``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.requests: list[RecordedRequest] = []
        self.raw_responses: dict[str, bytes] = {}

    # -- test helpers --------------------------------------------------------------------
    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def wait_requests(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: len(self.requests) >= n, timeout)

    # -- protocol ------------------------------------------------------------------------
    async def handle(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        index = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError:
                raise _BadRequest() from None
            req = self._parse_head(conn_id, index, head)
            index += 1
            await self._read_body(req, reader, writer)
            with self._lock:
                self.requests.append(req)
            keep = await self._respond(req, writer)
            if not keep:
                await _drain_close(writer)
                return

    @staticmethod
    def _parse_head(conn_id: int, index: int, head: bytes) -> RecordedRequest:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3:
            raise _BadRequest()
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadRequest()
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return RecordedRequest(conn_id, index, method, target, version, headers, head)

    @staticmethod
    async def _read_body(
        req: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        digest = hashlib.sha256()
        te = (req.header("transfer-encoding") or "").lower()
        if (req.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in te:
            req.chunked = True
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        if line == b"\r\n":
                            break
                        k, _, v = line[:-2].partition(b":")
                        req.trailers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
                    break
                remaining = size
                while remaining:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    digest.update(data)
                    req.body_length += len(data)
                    remaining -= len(data)
                await reader.readexactly(2)
        else:
            remaining = int(req.header("content-length") or 0)
            while remaining:
                data = await reader.read(min(remaining, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                digest.update(data)
                req.body_length += len(data)
                remaining -= len(data)
        req.body_sha256 = digest.hexdigest()

    async def _respond(self, req: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        url = urlsplit(req.target)
        path = url.path
        query = parse_qsl(url.query, keep_blank_values=True)
        conn_hdr = (req.header("connection") or "").lower()
        keep = "close" not in conn_hdr
        if req.version == "HTTP/1.0" and "keep-alive" not in conn_hdr:
            keep = False
        if ("close", "1") in query:
            keep = False
        is_head = req.method == "HEAD"
        extra: list[tuple[str, str]] = []
        status = 200
        body = b""
        chunked = False

        if path == "/close":
            writer.close()
            return False
        if path == "/reset":
            _reset(writer)
            return False
        if path in self.raw_responses:
            writer.write(self.raw_responses[path])
            await writer.drain()
            return keep
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path.startswith("/bytes/"):
            body = pattern_bytes(int(path.rsplit("/", 1)[1]))
            extra.append(("content-type", "application/octet-stream"))
        elif path.startswith("/chunked/"):
            body = pattern_bytes(int(path.rsplit("/", 1)[1]))
            extra.append(("content-type", "application/octet-stream"))
            chunked = True
        else:
            if path.startswith("/delay/"):
                await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000.0)
            if path == "/headers":
                extra.extend((k, v) for k, v in query if k != "close")
            body = json.dumps(req.to_json()).encode()
            extra.append(("content-type", "application/json"))

        out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()]
        for k, v in extra:
            out.append(f"{k}: {v}\r\n".encode("latin-1"))
        no_body_status = status < 200 or status in (204, 304)
        if not no_body_status:
            if chunked:
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                out.append(b"content-length: %d\r\n" % len(body))
        if not keep:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        writer.write(b"".join(out))
        if not is_head and not no_body_status:
            if chunked:
                for i in range(0, len(body), 16384):
                    piece = body[i : i + 16384]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                for i in range(0, len(body), 1 << 18):
                    writer.write(body[i : i + (1 << 18)])
                    await writer.drain()
        await writer.drain()
        return keep


async def _drain_close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except ConnectionError:
        pass
    if not writer.is_closing():
        writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (TimeoutError, ConnectionError, OSError):
        pass


class TcpEchoUpstream(_ThreadLoopServer):
    """Echoes every byte back; on the client's FIN it finishes echoing and sends FIN.

    Records per connection the number of bytes received (``received``) and whether the
    client half-closed (``half_closed``), so tests can check data integrity and half-close.
    ``eof_reply`` (bytes) is written after the client's FIN and before our own FIN, which
    proves that data still flows server->client on a half-closed connection.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, eof_reply: bytes = b"") -> None:
        super().__init__(host, port)
        self.received: dict[int, int] = {}
        self.half_closed: dict[int, bool] = {}
        self.eof_reply = eof_reply

    async def handle(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.received[conn_id] = 0
        self.half_closed[conn_id] = False
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            self.received[conn_id] += len(data)
            writer.write(data)
            await writer.drain()
        self.half_closed[conn_id] = True
        if self.eof_reply:
            await asyncio.sleep(0.05)  # the reply travels after the FIN, not with the echo
            writer.write(self.eof_reply)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await _drain_close(writer)
