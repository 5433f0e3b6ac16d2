"""Envoy's ``%COMMAND%`` substitution formatter (header values, access logs, local replies).

Strategy: a format string is compiled once into two tuples: ``literals`` (n+1 byte strings)
and ``providers`` (n callables). Formatting walks them in lock step, so the per-request work
is one call per command and one ``b"".join``. A provider has the signature
``(stream_info, request_headers, response_headers, response_trailers, local_reply_body)``
and returns ``bytes`` or ``None`` when the value is missing; a missing value renders as ``-``
in access-log mode and as nothing when ``omit_empty_values`` is set (header-value mode, as
Envoy's ``HeaderParser`` does). Header values stay ``bytes`` end to end; ``format`` (``str``)
decodes the same bytes with ``surrogateescape`` so no byte is ever lost.

Parsing follows Envoy's ``SubstitutionFormatParser``: ``%%`` is a literal ``%``; a command is
``%NAME(ARG):LEN%`` matched by Envoy's own regex, and the error texts are Envoy's
("Not supported field in StreamInfo: X", "X requires parameters", ...). Commands Envoy has but
pyenvoy cannot produce yet are rejected by name rather than rendered wrongly.
"""

from __future__ import annotations

import operator
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.http.headers import HeaderMap, RequestHeaders, ResponseHeaders
from pyenvoy.stream_info import RESPONSE_FLAG_NAMES, StreamInfo, format_response_flags

__all__ = [
    "DEFAULT_ACCESS_LOG_FORMAT",
    "Formatter",
    "Provider",
    "compile_format",
    "format_response_flags_long",
]

# Envoy 1.40's default access log line (SubstitutionFormatUtils::DEFAULT_FORMAT); checked
# against real Envoy output, e.g.
# [2026-11-22T02:16:43.050Z] "GET /dr?x=1 HTTP/1.1" 202 - 0 3 0 - "1.2.3.4" "curl/7.88.1" "rid" "foo.com" "-"
DEFAULT_ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Provider = Callable[
    [StreamInfo, "RequestHeaders | None", "ResponseHeaders | None", "HeaderMap | None", bytes],
    "bytes | None",
]

# Envoy's command regex (substitution_formatter.cc), anchored at the current '%'.
_COMMAND_RE = re.compile(r"%([A-Z0-9_]+)(?:\((.*?)\))?(?::([0-9]+))?%")
_HEADER_NAME_RE = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9a-z]+$")

_COMMAND_ONLY = 0
_PARAMS_REQUIRED = 1
_PARAMS_OPTIONAL = 2
_LENGTH_ALLOWED = 4

_RESPONSE_FLAG_LONG_NAMES: dict[str, str] = {
    "LH": "FailedLocalHealthCheck",
    "UH": "NoHealthyUpstream",
    "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset",
    "UR": "UpstreamRemoteReset",
    "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination",
    "UO": "UpstreamOverflow",
    "NR": "NoRouteFound",
    "DI": "DelayInjected",
    "FI": "FaultInjected",
    "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService",
    "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination",
    "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout",
    "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError",
    "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter",
    "NFCF": "NoFilterConfigFound",
    "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError",
    "NC": "NoClusterFound",
    "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed",
    "DO": "DropOverload",
    "DR": "DownstreamRemoteReset",
}
_LONG_FLAGS = tuple((bit, _RESPONSE_FLAG_LONG_NAMES[name]) for bit, name in RESPONSE_FLAG_NAMES)

# Commands real Envoy knows but pyenvoy cannot render faithfully (yet): rejected by name.
_ENVOY_ONLY_COMMANDS = frozenset(
    {
        "REQUEST_TX_DURATION",
        "DOWNSTREAM_HANDSHAKE_DURATION",
        "ROUNDTRIP_DURATION",
        "BYTES_RETRANSMITTED",
        "PACKETS_RETRANSMITTED",
        "UPSTREAM_WIRE_BYTES_RECEIVED",
        "UPSTREAM_HEADER_BYTES_RECEIVED",
        "UPSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
        "DOWNSTREAM_WIRE_BYTES_RECEIVED",
        "DOWNSTREAM_HEADER_BYTES_RECEIVED",
        "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_RECEIVED",
        "UPSTREAM_WIRE_BYTES_SENT",
        "UPSTREAM_HEADER_BYTES_SENT",
        "UPSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
        "DOWNSTREAM_WIRE_BYTES_SENT",
        "DOWNSTREAM_HEADER_BYTES_SENT",
        "DOWNSTREAM_DECOMPRESSED_HEADER_BYTES_SENT",
        "UPSTREAM_PROTOCOL",
        "CONNECTION_TERMINATION_DETAILS",
        "COMMON_DURATION",
        "CUSTOM_FLAGS",
        "UPSTREAM_HOST_NAME",
        "UPSTREAM_HOST_NAME_WITHOUT_PORT",
        "UPSTREAM_CONNECTION_ID",
        "UPSTREAM_TLS_CIPHER",
        "UPSTREAM_TLS_VERSION",
        "UPSTREAM_TLS_SESSION_ID",
        "UPSTREAM_PEER_ISSUER",
        "UPSTREAM_PEER_CERT",
        "UPSTREAM_PEER_SUBJECT",
        "UPSTREAM_PEER_URI_SAN",
        "UPSTREAM_PEER_DNS_SAN",
        "UPSTREAM_PEER_IP_SAN",
        "UPSTREAM_LOCAL_URI_SAN",
        "UPSTREAM_LOCAL_DNS_SAN",
        "UPSTREAM_LOCAL_IP_SAN",
        "DOWNSTREAM_DIRECT_LOCAL_ADDRESS",
        "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_DIRECT_LOCAL_PORT",
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_DIRECT_REMOTE_PORT",
        "CONNECTION_ID",
        "REQUESTED_SERVER_NAME",
        "DOWNSTREAM_PEER_URI_SAN",
        "DOWNSTREAM_PEER_DNS_SAN",
        "DOWNSTREAM_PEER_IP_SAN",
        "DOWNSTREAM_PEER_EMAIL_SAN",
        "DOWNSTREAM_PEER_OTHERNAME_SAN",
        "DOWNSTREAM_LOCAL_URI_SAN",
        "DOWNSTREAM_LOCAL_DNS_SAN",
        "DOWNSTREAM_LOCAL_IP_SAN",
        "DOWNSTREAM_LOCAL_EMAIL_SAN",
        "DOWNSTREAM_LOCAL_OTHERNAME_SAN",
        "DOWNSTREAM_PEER_SUBJECT",
        "DOWNSTREAM_LOCAL_SUBJECT",
        "DOWNSTREAM_TLS_SESSION_ID",
        "DOWNSTREAM_TLS_CIPHER",
        "DOWNSTREAM_TLS_VERSION",
        "DOWNSTREAM_PEER_FINGERPRINT_256",
        "DOWNSTREAM_PEER_FINGERPRINT_1",
        "DOWNSTREAM_PEER_SERIAL",
        "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256",
        "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1",
        "DOWNSTREAM_PEER_CHAIN_SERIALS",
        "DOWNSTREAM_PEER_ISSUER",
        "DOWNSTREAM_PEER_CERT",
        "DOWNSTREAM_TRANSPORT_FAILURE_REASON",
        "FILTER_CHAIN_NAME",
        "VIRTUAL_CLUSTER_NAME",
        "TLS_JA3_FINGERPRINT",
        "TLS_JA4_FINGERPRINT",
        "DYNAMIC_METADATA",
        "CLUSTER_METADATA",
        "UPSTREAM_METADATA",
        "FILTER_STATE",
        "UPSTREAM_FILTER_STATE",
        "DOWNSTREAM_PEER_CERT_V_START",
        "DOWNSTREAM_PEER_CERT_V_END",
        "UPSTREAM_PEER_CERT_V_START",
        "UPSTREAM_PEER_CERT_V_END",
        "UPSTREAM_CONNECTION_POOL_READY_DURATION",
        "GRPC_STATUS",
        "GRPC_STATUS_NUMBER",
        "REQUEST_HEADERS_BYTES",
        "RESPONSE_HEADERS_BYTES",
        "RESPONSE_TRAILERS_BYTES",
        "ACCESS_LOG_TYPE",
        "METADATA",
        "CEL",
        "REQ_WITHOUT_QUERY",
    }
)


def format_response_flags_long(flags: int) -> str:
    """Envoy's ``%RESPONSE_FLAGS_LONG%`` text (``NoRouteFound,...``) or ``-`` when none."""
    if not flags:
        return "-"
    return ",".join(name for bit, name in _LONG_FLAGS if flags & bit)


class Formatter:
    """A compiled format string. Immutable and shareable across streams and workers."""

    __slots__ = ("format_string", "omit_empty_values", "_literals", "_providers", "_empty")

    def __init__(
        self,
        format_string: str,
        literals: tuple[bytes, ...],
        providers: tuple[tuple[Any, bool], ...],
        omit_empty_values: bool,
    ) -> None:
        self.format_string = format_string
        self.omit_empty_values = omit_empty_values
        self._literals = literals
        self._providers = providers
        self._empty = b"" if omit_empty_values else b"-"

    @property
    def is_literal(self) -> bool:
        """True when the format has no commands (its output never changes)."""
        return not self._providers

    @property
    def literal(self) -> bytes:
        """The constant output of a command-free format (only meaningful if ``is_literal``)."""
        return self._literals[0]

    def format_bytes(
        self,
        stream_info: StreamInfo,
        request_headers: RequestHeaders | None = None,
        response_headers: ResponseHeaders | None = None,
        response_trailers: HeaderMap | None = None,
        local_reply_body: bytes = b"",
    ) -> bytes:
        literals = self._literals
        providers = self._providers
        if not providers:
            return literals[0]
        empty = self._empty
        out = [literals[0]]
        append = out.append
        i = 1
        for provider, stream_info_only in providers:
            if stream_info_only:
                value = provider(stream_info)
            else:
                value = provider(
                    stream_info,
                    request_headers,
                    response_headers,
                    response_trailers,
                    local_reply_body,
                )
            append(empty if value is None else value)
            append(literals[i])
            i += 1
        return b"".join(out)

    def format(
        self,
        stream_info: StreamInfo,
        request_headers: RequestHeaders | None = None,
        response_headers: ResponseHeaders | None = None,
        response_trailers: HeaderMap | None = None,
        local_reply_body: bytes = b"",
    ) -> str:
        return self.format_bytes(
            stream_info, request_headers, response_headers, response_trailers, local_reply_body
        ).decode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"Formatter({self.format_string!r})"


def compile_format(fmt: str, omit_empty_values: bool = False, path: str = "") -> Formatter:
    """Compile an Envoy substitution format string.

    ``omit_empty_values=True`` is header-value mode (missing values render empty, as
    Envoy's HeaderParser does); the default is access-log mode (missing values render ``-``).
    Raises ConfigError (with ``path``) for anything Envoy would reject or pyenvoy cannot do.
    """
    literals: list[bytes] = []
    providers: list[tuple[Any, bool]] = []
    token: list[str] = []
    pos = 0
    n = len(fmt)
    while pos < n:
        ch = fmt[pos]
        if ch != "%":
            token.append(ch)
            pos += 1
            continue
        if pos + 1 < n and fmt[pos + 1] == "%":
            token.append("%")
            pos += 2
            continue
        m = _COMMAND_RE.match(fmt, pos)
        if m is None:
            raise ConfigError(
                f"Incorrect configuration: {fmt}. Couldn't find valid command at position {pos}",
                path,
            )
        command, arg, length = m.group(1), m.group(2) or "", m.group(3)
        max_length = int(length) if length is not None else None
        try:
            provider = _build_provider(command, arg, max_length)
        except ConfigError as e:
            raise ConfigError(e.message, path) from None
        literals.append("".join(token).encode("utf-8", "surrogateescape"))
        token = []
        if isinstance(provider, _StreamInfoOnly):
            providers.append((provider.fn, True))
        else:
            providers.append((provider, False))
        pos = m.end()
    literals.append("".join(token).encode("utf-8", "surrogateescape"))
    return Formatter(fmt, tuple(literals), tuple(providers), omit_empty_values)


# --- command table --------------------------------------------------------------------------


def _verify_syntax(flags: int, command: str, arg: str, max_length: int | None) -> None:
    """Envoy's CommandSyntaxChecker::verifySyntax, same texts."""
    if flags == _COMMAND_ONLY and (arg or max_length is not None):
        raise ConfigError(f"{command} does not take any parameters or length")
    if flags & _PARAMS_REQUIRED and not arg:
        raise ConfigError(f"{command} requires parameters")
    if not flags & _LENGTH_ALLOWED and max_length is not None:
        raise ConfigError(f"{command} does not allow length to be specified.")


def _truncate(value: bytes, max_length: int | None) -> bytes:
    return value if max_length is None else value[:max_length]


def _parse_header_names(arg: str) -> tuple[bytes, bytes]:
    parts = arg.split("?")
    if len(parts) > 2:
        raise ConfigError(f"More than 1 alternative header specified in token: {arg}")
    main = parts[0].lower()
    alt = parts[1].lower() if len(parts) == 2 else ""
    for name in (main, alt):
        if name and not _HEADER_NAME_RE.match(name):
            raise ConfigError(
                "Invalid header configuration. Format string contains invalid characters."
            )
    return main.encode(), alt.encode()


_PSEUDO_ATTRS = {
    b":method": "method",
    b":path": "path",
    b":scheme": "scheme",
    b":authority": "authority",
    b"host": "authority",
}


def _find_header(headers: Any, name: bytes, which: int) -> bytes | None:
    if which == 0:
        attr = _PSEUDO_ATTRS.get(name)
        if attr is not None:
            return getattr(headers, attr) or None
    elif which == 1 and name == b":status":
        return str(headers.status).encode()
    for h in headers.headers:
        if h[0] == name:
            return h[1]  # type: ignore[no-any-return]
    return None


def _header_provider(which: int, arg: str, max_length: int | None) -> Provider:
    main, alt = _parse_header_names(arg)
    main_attr = _PSEUDO_ATTRS.get(main) if which == 0 else None
    if main_attr is not None and not alt and max_length is None:
        # The common %REQ(:METHOD)% / %REQ(:AUTHORITY)% case: one attribute read.
        def pseudo(si, req, resp, trailers, body):  # type: ignore[no-untyped-def]
            return None if req is None else getattr(req, main_attr) or None

        return pseudo

    def provide(si, req, resp, trailers, body):  # type: ignore[no-untyped-def]
        headers = req if which == 0 else resp if which == 1 else trailers
        if headers is None:
            return None
        value = _find_header(headers, main, which)
        if value is None and alt:
            value = _find_header(headers, alt, which)
        if value is None:
            return None
        return value if max_length is None else value[:max_length]

    return provide


def _addr_with_port(addr: tuple[str, int] | None) -> bytes | None:
    if not addr:
        return None
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}".encode()
    return f"{host}:{port}".encode()


def _addr_without_port(addr: tuple[str, int] | None) -> bytes | None:
    return addr[0].encode() if addr else None


def _addr_port(addr: tuple[str, int] | None) -> bytes | None:
    return str(addr[1]).encode() if addr else None


class _StreamInfoOnly:
    """Marks a provider that only reads the StreamInfo: called as ``fn(stream_info)``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[StreamInfo], bytes | None]) -> None:
        self.fn = fn


def _address_provider(attr: str, kind: int) -> _StreamInfoOnly:
    render = (_addr_with_port, _addr_without_port, _addr_port)[kind]
    get = operator.attrgetter(attr)
    return _StreamInfoOnly(lambda si: render(get(si)))


def _duration_provider(start_attr: str, end_attr: str) -> _StreamInfoOnly:
    get_start = operator.attrgetter(start_attr)
    get_end = operator.attrgetter(end_attr)

    def provide(si: StreamInfo) -> bytes | None:
        b = get_start(si)
        e = get_end(si)
        if b is None or e is None:
            return None
        return str(int((e - b) * 1000)).encode()

    return _StreamInfoOnly(provide)


class _TimeFormat:
    """Envoy's DateFormatter: strftime plus ``%s``, ``%f``/``%1f``..``%9f``, ``%E#S``, ``%E#f``.

    The format is split once into strftime chunks and sub-second pieces; strftime chunks are
    rendered once per whole second and cached, so a busy log formats each second only once.
    Unknown conversions stay as written (``%Ef`` prints ``%Ef``), as absl does.
    """

    __slots__ = ("_segments", "_local", "_cache_sec", "_cache")

    _TOKEN_RE = re.compile(r"%(?:([1-9]?)f|E([0-9*])([Sf])|Ez|(.)|$)", re.S)
    _STRFTIME = frozenset("aAbBcCdDeFgGhHIjklmMnprRStTuUVwWxXyYzZ")

    # Segment kinds: 0 strftime chunk, 1 fraction digits, 2 seconds + fraction, 3 epoch.
    def __init__(self, fmt: str, local: bool) -> None:
        self._local = local
        segments: list[tuple[int, str, int]] = []
        chunk: list[str] = []

        def flush() -> None:
            if chunk:
                segments.append((0, "".join(chunk), 0))
                chunk.clear()

        pos = 0
        for m in self._TOKEN_RE.finditer(fmt):
            chunk.append(fmt[pos : m.start()].replace("%", "%%"))
            pos = m.end()
            f_digits, e_digits, e_kind, conv = m.groups()
            whole = m.group(0)
            if whole == "%":  # lone trailing '%'
                chunk.append("%%")
            elif whole.endswith("f") and e_digits is None and conv is None:
                flush()
                segments.append((1, "", int(f_digits) if f_digits else 9))
            elif e_digits is not None:
                flush()
                digits = 9 if e_digits == "*" else int(e_digits)
                segments.append((2 if e_kind == "S" else 1, "", digits))
            elif whole == "%Ez":
                chunk.append("%z" if local else "+00:00")
            elif conv == "s":
                flush()
                segments.append((3, "", 0))
            elif conv == "%":
                chunk.append("%%")
            elif conv == "z" and not local:
                chunk.append("+0000")
            elif conv == "Z" and not local:
                chunk.append("UTC")
            elif conv in self._STRFTIME:
                chunk.append("%" + conv)
            else:
                chunk.append("%%" + conv.replace("%", "%%"))
        chunk.append(fmt[pos:].replace("%", "%%"))
        flush()
        self._segments = tuple(segments)
        self._cache_sec = -1
        self._cache: tuple[str, ...] = ()

    def render(self, t: float) -> bytes:
        micros = int(round(t * 1_000_000))
        sec, frac_us = divmod(micros, 1_000_000)
        st = time.localtime(sec) if self._local else time.gmtime(sec)
        if sec != self._cache_sec:
            self._cache = tuple(
                time.strftime(text, st) if kind == 0 else "" for kind, text, _ in self._segments
            )
            self._cache_sec = sec
        nanos = f"{frac_us * 1000:09d}"
        out = []
        for (kind, _, digits), cached in zip(self._segments, self._cache, strict=True):
            if kind == 0:
                out.append(cached)
            elif kind == 1:
                out.append(nanos[:digits])
            elif kind == 2:
                secs = f"{st.tm_sec:02d}"
                out.append(f"{secs}.{nanos[:digits]}" if digits else secs)
            else:
                out.append(str(sec))
        return "".join(out).encode()


class _DefaultTime:
    """``2026-11-22T02:16:43.050Z``: Envoy's AccessLogDateTimeFormatter (UTC, milliseconds).

    Caches the last second's prefix and the last millisecond's whole value.
    """

    __slots__ = ("_sec", "_prefix", "_local", "_ms", "_out")

    def __init__(self, local: bool) -> None:
        self._sec = -1
        self._prefix = b""
        self._local = local
        self._ms = -1
        self._out = b""

    def render(self, t: float) -> bytes:
        millis = int(t * 1000)
        if millis == self._ms:
            return self._out
        sec, ms = divmod(millis, 1000)
        if sec != self._sec:
            if self._local:
                dt = datetime.fromtimestamp(sec).astimezone()
                self._prefix = dt.strftime("%Y-%m-%dT%H:%M:%S").encode()
            else:
                self._prefix = (
                    datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
                )
            self._sec = sec
        if self._local:
            offset = datetime.fromtimestamp(sec).astimezone().strftime("%z").encode()
            out = b"%s.%03d%s" % (self._prefix, ms, offset)
        else:
            out = b"%s.%03dZ" % (self._prefix, ms)
        self._ms = millis
        self._out = out
        return out


def _time_provider(
    arg: str, getter: Callable[[StreamInfo], float | None], local: bool
) -> _StreamInfoOnly:
    if re.search(r"%[-_0^#]*[1-9]*(E|O)?n", arg):
        raise ConfigError("Invalid header configuration. Format string contains newline.")
    renderer: _TimeFormat | _DefaultTime = (
        _DefaultTime(local) if not arg else _TimeFormat(arg, local)
    )
    render = renderer.render

    def provide(si: StreamInfo) -> bytes | None:
        t = getter(si)
        return None if t is None else render(t)

    return _StreamInfoOnly(provide)


def _simple(fn: Callable[[StreamInfo], bytes | None]) -> _StreamInfoOnly:
    return _StreamInfoOnly(fn)


def _opt_str(value: str | None) -> bytes | None:
    return value.encode() if value else None


def _response_code_details(allow_whitespace: bool) -> _StreamInfoOnly:
    def provide(si: StreamInfo) -> bytes | None:
        details = si.response_code_details
        if not details:
            return None
        if not allow_whitespace:
            details = re.sub(r"\s", "_", details)
        return details.encode()

    return _StreamInfoOnly(provide)


def _environment(arg: str, max_length: int | None) -> Provider:
    env = os.environ.get(arg)
    value = _truncate(env.encode(), max_length) if env is not None else b"-"

    def provide(si, req, resp, trailers, body):  # type: ignore[no-untyped-def]
        return value

    return provide


def _hostname() -> Provider:
    try:
        name: bytes | None = socket.gethostname().encode()
    except OSError:
        name = None

    def provide(si, req, resp, trailers, body):  # type: ignore[no-untyped-def]
        return name

    return provide


def _local_reply_body(si, req, resp, trailers, body):  # type: ignore[no-untyped-def]
    return body


def _build_provider(command: str, arg: str, max_length: int | None) -> Provider | _StreamInfoOnly:
    entry = _COMMANDS.get(command)
    if entry is None:
        if command in _ENVOY_ONLY_COMMANDS:
            raise ConfigError(f"%{command}% is not supported by pyenvoy yet")
        raise ConfigError(f"Not supported field in StreamInfo: {command}")
    flags, factory = entry
    _verify_syntax(flags, command, arg, max_length)
    return factory(arg, max_length)


_Factory = Callable[[str, "int | None"], "Provider | _StreamInfoOnly"]


def _const(provider: Provider | _StreamInfoOnly) -> _Factory:
    return lambda arg, max_length: provider


_COMMANDS: dict[str, tuple[int, _Factory]] = {
    "REQ": (_PARAMS_REQUIRED | _LENGTH_ALLOWED, lambda a, n: _header_provider(0, a, n)),
    "RESP": (_PARAMS_REQUIRED | _LENGTH_ALLOWED, lambda a, n: _header_provider(1, a, n)),
    "TRAILER": (_PARAMS_REQUIRED | _LENGTH_ALLOWED, lambda a, n: _header_provider(2, a, n)),
    "LOCAL_REPLY_BODY": (_COMMAND_ONLY, _const(_local_reply_body)),
    "START_TIME": (
        _PARAMS_OPTIONAL,
        lambda a, n: _time_provider(a, lambda si: si.start_time, False),
    ),
    "START_TIME_LOCAL": (
        _PARAMS_OPTIONAL,
        lambda a, n: _time_provider(a, lambda si: si.start_time, True),
    ),
    "EMIT_TIME": (_PARAMS_OPTIONAL, lambda a, n: _time_provider(a, lambda si: time.time(), False)),
    "EMIT_TIME_LOCAL": (
        _PARAMS_OPTIONAL,
        lambda a, n: _time_provider(a, lambda si: time.time(), True),
    ),
    "DURATION": (_COMMAND_ONLY, _const(_simple(lambda si: str(si.duration_ms()).encode()))),
    "REQUEST_DURATION": (
        _COMMAND_ONLY,
        _const(_duration_provider("start_monotonic", "request_complete_monotonic")),
    ),
    "RESPONSE_DURATION": (
        _COMMAND_ONLY,
        _const(_duration_provider("start_monotonic", "first_upstream_rx_monotonic")),
    ),
    "RESPONSE_TX_DURATION": (
        _COMMAND_ONLY,
        _const(_duration_provider("first_upstream_rx_monotonic", "last_downstream_tx_monotonic")),
    ),
    "BYTES_RECEIVED": (_COMMAND_ONLY, _const(_simple(lambda si: str(si.bytes_received).encode()))),
    "BYTES_SENT": (_COMMAND_ONLY, _const(_simple(lambda si: str(si.bytes_sent).encode()))),
    "PROTOCOL": (_COMMAND_ONLY, _const(_simple(lambda si: _opt_str(si.protocol)))),
    "RESPONSE_CODE": (
        _COMMAND_ONLY,
        _const(_simple(lambda si: str(si.response_code or 0).encode())),
    ),
    "RESPONSE_CODE_DETAILS": (
        _PARAMS_OPTIONAL,
        lambda a, n: _response_code_details(a == "ALLOW_WHITESPACES"),
    ),
    "RESPONSE_FLAGS": (
        _COMMAND_ONLY,
        _const(_simple(lambda si: format_response_flags(si.response_flags).encode())),
    ),
    "RESPONSE_FLAGS_LONG": (
        _COMMAND_ONLY,
        _const(_simple(lambda si: format_response_flags_long(si.response_flags).encode())),
    ),
    "UPSTREAM_HOST": (_COMMAND_ONLY, _const(_address_provider("upstream_host", 0))),
    "UPSTREAM_REMOTE_ADDRESS": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_host", 0)),
    ),
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_host", 1)),
    ),
    "UPSTREAM_REMOTE_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_host", 2)),
    ),
    "UPSTREAM_LOCAL_ADDRESS": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_local_address", 0)),
    ),
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_local_address", 1)),
    ),
    "UPSTREAM_LOCAL_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("upstream_local_address", 2)),
    ),
    "UPSTREAM_CLUSTER": (_COMMAND_ONLY, _const(_simple(lambda si: _opt_str(si.upstream_cluster)))),
    "UPSTREAM_CLUSTER_RAW": (
        _COMMAND_ONLY,
        _const(_simple(lambda si: _opt_str(si.upstream_cluster))),
    ),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": (
        _COMMAND_ONLY,
        _const(
            _simple(
                lambda si: (
                    si.upstream_transport_failure_reason.replace(" ", "_").encode()
                    if si.upstream_transport_failure_reason
                    else None
                )
            )
        ),
    ),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": (
        _COMMAND_ONLY,
        _const(_simple(lambda si: str(si.attempt_count or 0).encode())),
    ),
    "DOWNSTREAM_REMOTE_ADDRESS": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_remote_address", 0)),
    ),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_remote_address", 1)),
    ),
    "DOWNSTREAM_REMOTE_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_remote_address", 2)),
    ),
    "DOWNSTREAM_LOCAL_ADDRESS": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_local_address", 0)),
    ),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_local_address", 1)),
    ),
    "DOWNSTREAM_LOCAL_PORT": (
        _COMMAND_ONLY,
        _const(_address_provider("downstream_local_address", 2)),
    ),
    "ROUTE_NAME": (_COMMAND_ONLY, _const(_simple(lambda si: _opt_str(si.route_name)))),
    "STREAM_ID": (_COMMAND_ONLY, _const(_simple(lambda si: si.request_id or None))),
    "UNIQUE_ID": (_COMMAND_ONLY, _const(_simple(lambda si: str(uuid.uuid4()).encode()))),
    "HOSTNAME": (_COMMAND_ONLY, lambda a, n: _hostname()),
    "ENVIRONMENT": (_PARAMS_REQUIRED | _LENGTH_ALLOWED, _environment),
}
