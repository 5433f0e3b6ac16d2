"""The admin listener: a small HTTP/1.1 server for Envoy's admin endpoints.

Strategy: an ``asyncio.Protocol`` per connection feeds bytes to ``h11`` (correctness over
speed: admin is not a hot path). A complete request becomes a ``handlers.Request``; the
synchronous handler's ``Response`` goes out with Envoy's admin headers (content-type,
``cache-control: no-cache, max-age=0``, ``x-content-type-options: nosniff``, date,
``server: envoy``) and chunked framing, like Envoy. HTTP/1.0 is refused with 426, as
Envoy's admin does. Each request is written to the admin access log(s) in Envoy's default
format, and the server's own ``http.admin.*`` / ``listener.admin.*`` stats are kept.

A periodic timer closes the histogram interval every ``stats_flush_interval`` (5 s by
default), which is what gives ``/stats`` its "interval" quantiles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import h11

from pyenvoy.admin.handlers import AdminHandlers, Request, Response
from pyenvoy.extensions.filters.network.http_connection_manager.config import ListenerHttpStats
from pyenvoy.stats import StatsStruct
from pyenvoy.stats_render import StatsRender, TagProducer

log = logging.getLogger("pyenvoy.admin")

# Envoy's default access log format, which the admin log uses.
# [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
# %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
# "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
# "%UPSTREAM_HOST%"
# Envoy's admin appends its internal peer address 192.0.2.2 to x-forwarded-for.
_ADMIN_XFF = "192.0.2.2"


class AdminHttpStats(StatsStruct):
    """The subset of ``http.admin.*`` Envoy keeps for its admin connection manager."""

    COUNTERS = (
        "downstream_cx_destroy",
        "downstream_cx_destroy_remote",
        "downstream_cx_http1_total",
        "downstream_cx_protocol_error",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_total",
        "downstream_cx_tx_bytes_total",
        "downstream_rq_1xx",
        "downstream_rq_2xx",
        "downstream_rq_3xx",
        "downstream_rq_4xx",
        "downstream_rq_5xx",
        "downstream_rq_completed",
        "downstream_rq_http1_total",
        "downstream_rq_total",
    )
    GAUGES = ("downstream_cx_active", "downstream_cx_http1_active", "downstream_rq_active")
    HISTOGRAMS = ("downstream_cx_length_ms", "downstream_rq_time")


class AdminListenerStats(StatsStruct):
    COUNTERS = ("downstream_cx_destroy", "downstream_cx_total")
    GAUGES = ("downstream_cx_active",)
    HISTOGRAMS = ("downstream_cx_length_ms",)


def parse_query(text: str) -> dict[str, list[str]]:
    """Envoy's query parsing: percent-decoded, a ``+`` stays a ``+`` (regex filters)."""
    out: dict[str, list[str]] = {}
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        out.setdefault(unquote(key), []).append(unquote(value))
    return out


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _date() -> str:
    return formatdate(usegmt=True)


def _access_log_time(t: float) -> str:
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class _AdminConnection(asyncio.Protocol):
    __slots__ = ("admin", "transport", "conn", "request", "body", "start", "opened", "closed")

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.start = 0.0
        self.opened = time.monotonic()
        self.closed = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admin._connections.add(self)
        s = self.admin.http_stats
        if s is not None:
            s.downstream_cx_total.inc()
            s.downstream_cx_http1_total.inc()
            s.downstream_cx_active.inc()
            s.downstream_cx_http1_active.inc()
            ls = self.admin.listener_stats
            ls.downstream_cx_total.inc()
            ls.downstream_cx_active.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self.admin._connections.discard(self)
        if self.closed:
            return
        self.closed = True
        s = self.admin.http_stats
        if s is not None:
            length = (time.monotonic() - self.opened) * 1000
            s.downstream_cx_destroy.inc()
            s.downstream_cx_destroy_remote.inc()
            s.downstream_cx_active.dec()
            s.downstream_cx_http1_active.dec()
            s.downstream_cx_length_ms.record(length)
            ls = self.admin.listener_stats
            ls.downstream_cx_destroy.inc()
            ls.downstream_cx_active.dec()
            ls.downstream_cx_length_ms.record(length)

    def data_received(self, data: bytes) -> None:
        s = self.admin.http_stats
        if s is not None:
            s.downstream_cx_rx_bytes_total.add(len(data))
        self.conn.receive_data(data)
        self._drain_events()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._drain_events()
        return None

    # ---- h11 events

    def _drain_events(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self._protocol_error(e)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body = bytearray()
                self.start = time.time()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    self._close()
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    self._close()
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _protocol_error(self, e: h11.RemoteProtocolError) -> None:
        s = self.admin.http_stats
        if s is not None:
            s.downstream_cx_protocol_error.inc()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = getattr(e, "error_status_hint", 400)
            self._send(
                Response(status, "Bad Request" if status == 400 else ""), head=False, close=True
            )
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _dispatch(self) -> None:
        req = self.request
        assert req is not None
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        s = self.admin.http_stats
        if s is not None:
            s.downstream_rq_total.inc()
            s.downstream_rq_http1_total.inc()
        if req.http_version != b"1.1":
            # Envoy's admin codec rejects HTTP/1.0 (426, response flag DPE).
            resp = Response(426, "Upgrade Required")
            self._send(resp, head=False, close=True)
            self.admin.write_access_log(self.start, "-", "-", 426, "DPE", 0, len(resp.body), {})
            return
        split = urlsplit(target)
        path = unquote(split.path) or "/"
        query = parse_query(split.query)
        if method == "POST" and headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            for k, v in parse_query(self.body.decode("latin-1")).items():
                query.setdefault(k, v)
        resp = self.admin.handlers.handle(Request(method, path, query, headers, bytes(self.body)))
        self._send(resp, head=method == "HEAD")
        self.admin.write_access_log(
            self.start, method, target, resp.status, "-", len(self.body), len(resp.body), headers
        )
        if resp.after is not None:
            try:
                resp.after()
            except Exception:
                log.exception("admin post-response action failed")

    def _send(self, resp: Response, head: bool, close: bool = False) -> None:
        """Write the response; h11 tracks the connection state, the bytes are Envoy's.

        Normal replies are chunked with Envoy's admin headers. Codec-level local replies
        (``close=True``: 400, 426) carry content-length, a bare text/plain and
        ``connection: close``, as Envoy's HTTP/1 codec sends them.
        """
        if close:
            headers = [("content-length", str(len(resp.body))), ("content-type", "text/plain")]
        elif resp.headers is not None:
            headers = list(resp.headers)
        else:
            headers = [
                ("content-type", resp.content_type),
                ("cache-control", "no-cache, max-age=0"),
                ("x-content-type-options", "nosniff"),
            ]
        headers += [("date", _date()), ("server", "envoy")]
        headers.append(("connection", "close") if close else ("transfer-encoding", "chunked"))
        reason = _REASONS.get(resp.status, b"")
        try:
            self.conn.send(h11.Response(status_code=resp.status, headers=headers, reason=reason))
            if resp.body and not head:
                self.conn.send(h11.Data(data=resp.body))
            self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close()
            return
        out = bytearray(b"HTTP/1.1 %d %s\r\n" % (resp.status, reason))
        for k, v in headers:
            out += f"{k}: {v}\r\n".encode("latin-1")
        out += b"\r\n"
        if close:
            out += resp.body
        elif not head:
            if resp.body:
                out += b"%x\r\n%s\r\n" % (len(resp.body), resp.body)
            out += b"0\r\n\r\n"
        assert self.transport is not None
        self.transport.write(bytes(out))
        s = self.admin.http_stats
        if s is not None:
            s.downstream_cx_tx_bytes_total.add(len(out))
            s.downstream_rq_completed.inc()
            getattr(s, f"downstream_rq_{min(max(resp.status // 100, 1), 5)}xx").inc()
            s.downstream_rq_time.record((time.time() - self.start) * 1000)
            ls = self.admin.server_listener_http_stats
            if ls is not None:
                ls.downstream_rq_completed.inc()
                getattr(ls, f"downstream_rq_{min(max(resp.status // 100, 1), 5)}xx").inc()


class AdminServer:
    """Envoy's admin endpoint for one ``server`` (see ``pyenvoy.admin.handlers``).

    ``server`` must provide: ``stats`` (Store), ``state``, ``start_time``, ``version``,
    ``node``, ``bootstrap``, ``options``, ``healthcheck_failed`` (settable), ``shutdown()``,
    ``refresh_server_stats()``, ``cluster_manager.clusters``,
    ``listener_manager.listeners`` and ``route_configs()``; optional extras are looked up
    with ``getattr`` (``drain_listeners(...)``, ``original_start_time`` ...).
    """

    def __init__(
        self, server: Any, address: tuple[str, int], access_log_path: str | None = None
    ) -> None:
        self.server = server
        self.address = address
        self.access_log_paths: list[str] = []
        if access_log_path:
            self.access_log_paths.append(access_log_path)
        self.access_log_paths.extend(self._bootstrap_access_logs())
        self._log_files: list[IO[str]] = []
        bootstrap = getattr(server, "bootstrap", None)
        stats_config = None
        if bootstrap is not None and bootstrap.HasField("stats_config"):
            stats_config = bootstrap.stats_config
        cli_tags: list[tuple[str, str]] = []
        tag_map = getattr(getattr(server, "options", None), "stats_tag_map", None)
        if isinstance(tag_map, dict):
            cli_tags = list(tag_map.items())
        try:
            producer = TagProducer(stats_config, cli_tags)
        except ValueError as e:
            log.error("stats_config: %s; using the default tag extractors", e)
            producer = TagProducer()
        self.stats_render = StatsRender(producer)
        self.flush_interval = 5.0
        if bootstrap is not None and bootstrap.HasField("stats_flush_interval"):
            d = bootstrap.stats_flush_interval
            self.flush_interval = max(0.001, d.seconds + d.nanos / 1e9)
        self.handlers = AdminHandlers(self)
        self.recent_lookups = False
        self.runtime_overrides: dict[str, str] = {}
        store = getattr(server, "stats", None)
        self.http_stats: Any = None
        self.listener_stats: Any = None
        self.server_listener_http_stats: Any = None
        if store is not None:
            self.http_stats = AdminHttpStats(store.scope("http.admin"))
            self.listener_stats = AdminListenerStats(store.scope("listener.admin"))
            self.server_listener_http_stats = ListenerHttpStats(
                store.scope("listener.admin.http.admin")
            )
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_AdminConnection] = set()
        self._flush_handle: asyncio.TimerHandle | None = None

    def _bootstrap_access_logs(self) -> list[str]:
        bootstrap = getattr(self.server, "bootstrap", None)
        if bootstrap is None or not bootstrap.HasField("admin"):
            return []
        paths = []
        for entry in bootstrap.admin.access_log:
            tc = entry.typed_config
            if tc.type_url.endswith("envoy.extensions.access_loggers.file.v3.FileAccessLog"):
                from envoy.extensions.access_loggers.file.v3 import file_pb2

                cfg = file_pb2.FileAccessLog()
                tc.Unpack(cfg)
                if cfg.path:
                    paths.append(cfg.path)
            elif tc.type_url.endswith("StdoutAccessLog"):
                paths.append("/dev/stdout")
            elif tc.type_url.endswith("StderrAccessLog"):
                paths.append("/dev/stderr")
        return paths

    # ---- lifecycle

    async def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound ``(host, port)``."""
        loop = asyncio.get_running_loop()
        self._open_access_logs()
        host, port = self.address
        self._server = await loop.create_server(
            lambda: _AdminConnection(self), host or "0.0.0.0", port, reuse_address=True
        )
        sock = self._server.sockets[0]
        bound = sock.getsockname()
        self._schedule_flush(loop)
        return (bound[0], bound[1])

    async def stop(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._server is not None:
            self._server.close()
            for c in list(self._connections):
                c._close()
            await self._server.wait_closed()
            self._server = None
        for f in self._log_files:
            try:
                f.close()
            except OSError:
                pass
        self._log_files = []

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_handle = loop.call_later(self.flush_interval, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        store = getattr(self.server, "stats", None)
        if store is not None:
            self.stats_render.flush_histograms(store)
        self._schedule_flush(loop)

    # ---- access log

    def _open_access_logs(self) -> None:
        self._log_files = []
        for path in self.access_log_paths:
            try:
                self._log_files.append(open(path, "a", buffering=1))  # noqa: SIM115
            except OSError as e:
                log.error("admin access log %s: %s", path, e)

    def reopen_access_logs(self) -> None:
        for f in self._log_files:
            try:
                f.close()
            except OSError:
                pass
        self._open_access_logs()

    def write_access_log(
        self,
        start: float,
        method: str,
        target: str,
        status: int,
        flags: str,
        rx: int,
        tx: int,
        headers: dict[str, str],
    ) -> None:
        if not self._log_files:
            return
        duration = int((time.time() - start) * 1000)
        if method == "-":
            xff = "-"
            authority = "-"
        else:
            forwarded = headers.get("x-forwarded-for")
            xff = f"{forwarded},{_ADMIN_XFF}" if forwarded else _ADMIN_XFF
            authority = headers.get("host", "-") or "-"
        line = (
            f'[{_access_log_time(start)}] "{method} {target} HTTP/1.1" {status} {flags} {rx} {tx} '
            f'{duration} - "{xff}" "{headers.get("user-agent", "-")}" '
            f'"{headers.get("x-request-id", "-")}" "{authority}" "-"\n'
        )
        for f in self._log_files:
            try:
                f.write(line)
            except OSError:
                pass
