"""HTTP/1.1 codec: incremental request/response parsers and head serializers.

Strategy: a parser owns one byte buffer and a small integer state (head, CL body, chunk-size
line, chunk data, chunk CRLF, trailers, stream, message-done). ``feed()`` runs a loop over the
buffer that never walks single bytes in Python. A read that holds one whole message of the
usual shape (a keep-alive GET; a response head with its Content-Length body) while the parser
is idle goes through ``_fast()`` instead: llhttp (``httptools``, C) tokenizes and validates the
head, and the same checks and callbacks as the general path run in one step, without the state
machine; anything else (pipelined bytes, partial heads, odd framing, anything llhttp rejects
or would read differently) falls back to it, so the general path stays the reference and
reports every error. The llhttp parser only ever sees whole messages that start at a message
boundary, and is dropped (re-created on the next fast message) whenever it was left anywhere
but between two keep-alive messages. General path for a head: ``find(b"\r\n\r\n")``,
``split(b" ")`` of the request line, then ONE ``findall`` of a line-anchored regex over the
header block; the block is accepted only if every line matched (match count == LF count) and
``translate()`` finds no forbidden byte. Anything unusual (bare LF, obs-fold, trailing OWS,
bad bytes, limits) re-parses the head on the general path, whose regex has a catch-all
alternative so each malformed line is seen and classified the way Envoy reports it. Body bytes
are handed on as slices of the fed buffer (the fed ``bytes`` object itself when a feed is all
body). Only an incomplete head/line is kept: a ``bytearray`` grown by amortised appends,
re-scanned only when a LF arrives and only past the part already known to hold no blank line.

Acceptance follows real Envoy 1.40 (BalsaParser + HTTP/1 codec, measured with raw sockets):
the method must be one of Envoy's known methods (custom ones need ``allow_custom_methods``),
Content-Length must be one plain decimal below 2**64 (several CL headers are rejected even
when equal), any Content-Length together with Transfer-Encoding is a 400
(``http1.content_length_and_chunked_not_allowed``), Transfer-Encoding other than exactly one
``chunked`` is a 501 (``http1.invalid_transfer_encoding``), a head over ``max_header_bytes``
(request line through blank line) or with more than ``max_headers_count`` fields is a 431.
Like Envoy (and h11) we accept bare LF line ends in the head and trailers, obs-fold lines
(each fold becomes one SP), empty lines before a request, several SP/HTAB between
request-line tokens. Where Envoy is lax in a way that invites smuggling we are strict like
h11: a bare CR in a field value (Envoy drops the CR), anything but CRLF after chunk data
(Envoy skips to the next LF), 4-digit response status codes (Envoy forwards them).

Envoy treats any version other than HTTP/1.1 as HTTP/1.0 (and sends 426 unless
``accept_http_10``); we report ``version=10`` for every ``HTTP/d.d`` that is not 1.1 and for
the version-less HTTP/0.9 request line, so the connection manager answers like Envoy.

CONNECT requests, upgrade requests (``Upgrade`` + ``Connection: upgrade``, except h2c) and
101 / CONNECT-2xx responses switch the parser to stream mode: everything after the head is
passed through ``on_body`` unparsed and ``on_message_complete`` fires at ``feed_eof()``
(as does a response body delimited by connection close).

Callbacks run synchronously inside ``feed()``/``resume()``/``feed_eof()``. ``pause()`` from a
callback stops after that callback; bytes fed meanwhile are buffered (``buffered_bytes``,
meaningful outside callbacks) until ``resume()``. ``feed()`` from a callback is queued behind
the unparsed bytes. A ``ParseError`` may follow callbacks of earlier complete messages from the
same ``feed()`` (e.g. garbage after a response); the parser is dead afterwards.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import httptools

__all__ = [
    "LAST_CHUNK",
    "ParseError",
    "RequestParser",
    "ResponseParser",
    "encode_chunk",
    "encode_request_head",
    "encode_response_head",
    "reason_phrase",
]


class ParseError(Exception):
    """A malformed message. ``status`` is what Envoy answers, ``details`` its response code
    details (``%RESPONSE_CODE_DETAILS%``). The parser is dead after raising one."""

    __slots__ = ("status", "details")

    def __init__(self, details: str, status: int = 400) -> None:
        super().__init__(details)
        self.details = details
        self.status = status

    def __repr__(self) -> str:
        return f"ParseError({self.details!r}, {self.status})"


CODEC_ERROR = "http1.codec_error"
INVALID_CHARACTERS = "http1.invalid_characters"
CL_AND_CHUNKED = "http1.content_length_and_chunked_not_allowed"
HEADERS_TOO_LARGE = "http1.headers_too_large"
TOO_MANY_HEADERS = "http1.too_many_headers"
INVALID_TE = "http1.invalid_transfer_encoding"
INVALID_URL = "http1.invalid_url"
# Envoy's access-log details for a peer that closes in the middle of a message.
DOWNSTREAM_EOF = "downstream_remote_disconnect"
UPSTREAM_EOF_BEFORE_HEADERS = "upstream_reset_before_response_started{protocol_error}"
UPSTREAM_EOF_AFTER_HEADERS = "upstream_reset_after_response_started{protocol_error}"

# Envoy's BalsaParser method list (plus QUERY, accepted by Envoy 1.40).
ENVOY_METHODS = frozenset(
    b"ACL BIND CHECKOUT CONNECT COPY DELETE GET HEAD LINK LOCK MERGE MKACTIVITY MKCALENDAR "
    b"MKCOL MOVE MSEARCH NOTIFY OPTIONS PATCH POST PROPFIND PROPPATCH PURGE PUT QUERY REBIND "
    b"REPORT SEARCH SOURCE SUBSCRIBE TRACE UNBIND UNLINK UNLOCK UNSUBSCRIBE".split()
)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# One header line. Group 1/2: a valid "name: value" (value without surrounding OWS; obs-text
# allowed). Group 3: anything else up to the LF, i.e. a bad line (findall cannot skip it).
_FIELD_LINE = re.compile(
    rb"(?:(" + _TOKEN + rb"):[ \t]*((?:[^\x00-\x20\x7f]+(?:[ \t]+[^\x00-\x20\x7f]+)*)?)[ \t]*"
    rb"|([^\n]*))\r?\n"
)
_findall_fields = _FIELD_LINE.findall
# Fast path line regex: validity of the characters is checked separately with translate().
# Anchored at line starts, so a line that does not match is skipped and the line count check
# fails. A value with trailing OWS does not match (the general path strips it); CTLs, bare
# CR/LF inside a value make the line count or the translate() check fail.
_findall_crlf_fields = re.compile(rb"(?m)^(" + _TOKEN + rb"):[ \t]*([^\r]*(?<![ \t]))\r\n").findall
_FIELD_CHARS = bytes(c for c in range(256) if c in (9, 10, 13) or 32 <= c < 127 or c >= 128)
_NAME_COLON = re.compile(_TOKEN + rb":").match
_OBS_FOLD = re.compile(rb"[ \t]*\r?\n[ \t]+")
_HEAD_END = re.compile(rb"\n\r?\n").search
_TOKEN_FULL = re.compile(_TOKEN).fullmatch
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*").fullmatch
_ASTERISK_FORM = re.compile(rb"\*[\x21-\x7e]*").fullmatch
_HOST = rb"[A-Za-z0-9!$%&'()*+,\-.:;=@\[\]_~]*"
_ABSOLUTE_FORM = re.compile(
    rb"[A-Za-z][A-Za-z0-9+\-.]*://(" + _HOST + rb")(?:[/?][\x21-\x7e]*)?"
).fullmatch
_AUTHORITY_FORM = re.compile(rb"(" + _HOST + rb")").fullmatch
_CTL = re.compile(rb"[\x00-\x1f\x7f]").search
_REQUEST_LINE = re.compile(rb"([^ \t]+)[ \t]+([^ \t]+)(?:[ \t]+([^ \t]+))?[ \t]*").fullmatch
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]").fullmatch
_STATUS_LINE = re.compile(
    rb"HTTP/([0-9]\.[0-9])[ \t]+([0-9]{3})(?:[ \t]+([^\x00-\x08\x0a-\x1f\x7f]*))?"
).fullmatch
_REASON_OK = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*").fullmatch
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r\n").fullmatch
_MAX_U64 = (1 << 64) - 1

_METHOD_FIRST_BYTES = frozenset(m[0] for m in ENVOY_METHODS)

# Header names the parsers look at for framing / connection management.
_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"connection", b"upgrade"))

# Parser states.
_HEAD = 0  # waiting for / parsing a start line + header block
_BODY = 1  # Content-Length body, _remaining bytes left
_CHUNK_SIZE = 2  # waiting for a chunk-size line
_CHUNK_DATA = 3  # inside chunk data, _remaining bytes left
_CHUNK_CRLF = 4  # CRLF after chunk data
_TRAILERS = 5  # trailer section after the last chunk
_STREAM = 6  # read-until-close body or upgrade/CONNECT tunnel: all bytes are body
_DONE = 7  # message complete, on_message_complete not yet delivered
_CLOSED = 8  # after feed_eof

_LINE_STATES = (_HEAD, _CHUNK_SIZE, _TRAILERS)


def _field_error(line: bytes) -> ParseError:
    """Classify a header/trailer line the field regex rejected, the way Envoy reports it."""
    if _NAME_COLON(line) is not None:
        return ParseError(INVALID_CHARACTERS)  # good "name:" so the value is at fault
    return ParseError(CODEC_ERROR)


def _parse_fields(
    block: bytes, max_count: int
) -> tuple[list[list[bytes]], list[list[bytes]] | None]:
    """Header block (lines each ending in LF) -> ([name, value] list, framing headers or None)."""
    found = _findall_fields(block)
    if len(found) > max_count:
        if any(f[2][:1] in (b" ", b"\t") for f in found):
            found = _findall_fields(_unfold(block))
        if len(found) > max_count:
            for f in found[: max_count + 1]:  # an earlier malformed line wins, as in Envoy
                if f[2] or not f[0]:
                    raise _field_error(f[2])
            raise ParseError(TOO_MANY_HEADERS, 431)
    headers: list[list[bytes]] = []
    append = headers.append
    special: list[list[bytes]] | None = None
    for name, value, bad in found:
        if bad or not name:
            if bad[:1] in (b" ", b"\t"):
                return _parse_fields(_unfold(block), max_count)
            raise _field_error(bad)
        h = [name.lower(), value]
        if h[0] in _SPECIAL:
            if special is None:
                special = []
            special.append(h)
        append(h)
    return headers, special


def _unfold(block: bytes) -> bytes:
    """Replace each obs-fold (OWS CRLF RWS) with one SP; a fold on the first line is an error."""
    if block[:1] in (b" ", b"\t"):
        raise ParseError(CODEC_ERROR)
    return _OBS_FOLD.sub(b" ", block)


def _check_lines(buf: bytes, start: int, stop: int) -> None:
    """Validate the complete header lines in buf[start:stop] (used before reporting 431, so an
    earlier malformed line wins as it does in Envoy's line-by-line parser)."""
    last_nl = buf.rfind(b"\n", start, stop)
    if last_nl < start:
        return
    block = buf[start : last_nl + 1]
    if block[:1] in (b" ", b"\t"):
        raise ParseError(CODEC_ERROR)
    for name, _value, bad in _findall_fields(block):
        if (bad or not name) and bad[:1] not in (b" ", b"\t") and bad not in (b"", b"\r"):
            raise _field_error(bad)


def _find_head_end(buf: bytes, pos: int, start: int) -> tuple[int, int]:
    """(end of last header line incl. its LF, end of head incl. blank line), or (-1, -1).
    ``start`` >= pos skips a prefix already known to hold no blank line."""
    hend = buf.find(b"\r\n\r\n", start)
    if hend >= 0 and buf.count(b"\n", pos, hend) == buf.count(b"\r\n", pos, hend):
        return hend + 2, hend + 4
    m = _HEAD_END(buf, start)
    if m is None:
        return -1, -1
    return m.start() + 1, m.end()


_KEEP_ALIVE_TOKENS = frozenset((b"keep-alive",))
_CLOSE_TOKENS = frozenset((b"close",))


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    if len(values) == 1:
        v = values[0].lower()
        if v == b"keep-alive":
            return _KEEP_ALIVE_TOKENS
        if v == b"close":
            return _CLOSE_TOKENS
    tokens: set[bytes] = set()
    for v in values:
        for t in v.lower().split(b","):
            t = t.strip(b" \t")
            if t:
                tokens.add(t)
    return frozenset(tokens)


def _framing(
    special: list[list[bytes]], status: int
) -> tuple[int, bool, bool, frozenset[bytes] | None, bytes | None]:
    """Framing headers -> (content_length or -1, chunked, has TE, Connection tokens, Upgrade).

    Check order follows Envoy: repeated Content-Length (Balsa, even "2, 2" or equal copies)
    -> any CL with TE (400 content_length_and_chunked_not_allowed) -> CL syntax -> TE other
    than one "chunked" (501 invalid_transfer_encoding)."""
    cls: list[bytes] = []
    tes: list[bytes] = []
    conn: list[bytes] = []
    upgrade: bytes | None = None
    for name, value in special:
        if name == b"connection":
            conn.append(value)
        elif name == b"content-length":
            cls.append(value)
        elif name == b"transfer-encoding":
            tes.append(value)
        else:
            upgrade = value
    content_length = -1
    chunked = False
    if cls:
        if len(cls) > 1:
            raise ParseError(CODEC_ERROR, status)
        if tes:
            raise ParseError(CL_AND_CHUNKED, status)
        v = cls[0]
        if not (v.isdigit() and v.isascii()):
            raise ParseError(CODEC_ERROR, status)
        content_length = int(v)
        if content_length > _MAX_U64:
            raise ParseError(CODEC_ERROR, status)
    elif tes:
        if len(tes) != 1 or tes[0].lower() != b"chunked":
            raise ParseError(INVALID_TE, 501 if status == 400 else status)
        chunked = True
    return content_length, chunked, bool(tes), _connection_tokens(conn) if conn else None, upgrade


class _LLHead:
    """llhttp callbacks for one fast-path head: collects, never acts (``_fast`` decides
    afterwards whether the message is used or left to the general path, and resets the
    fields before each message)."""

    __slots__ = ("url", "headers", "special", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[list[bytes]] = []
        self.special: list[list[bytes]] | None = None
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        h = [name, value]
        self.headers.append(h)
        if name in _SPECIAL:
            if self.special is None:
                self.special = [h]
            else:
                self.special.append(h)

    def on_message_complete(self) -> None:
        self.done = True


# Every llhttp outcome that is not a plain message (errors, upgrades, CONNECT).
_LLError = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class _Parser:
    __slots__ = (
        "_handler",
        "_on_body",
        "_on_complete",
        "_max_header_bytes",
        "_max_headers_count",
        "_buf",
        "_state",
        "_remaining",
        "_error",
        "_running",
        "_eof",
        "paused",
        "_status",
        "_scan",
        "_ll",
        "_llh",
    )

    def __init__(
        self, handler: Any, max_header_bytes: int, max_headers_count: int, status: int
    ) -> None:
        self._handler = handler
        self._on_body = handler.on_body
        self._on_complete = handler.on_message_complete
        self._max_header_bytes = max_header_bytes
        self._max_headers_count = max_headers_count
        self._buf: bytes | bytearray = b""
        self._state = _HEAD
        self._remaining = 0
        self._error: ParseError | None = None
        self._running = False
        self._eof = False
        self.paused = False
        self._status = status  # HTTP status carried by this parser's ParseErrors
        self._scan = 0  # bytes of an incomplete head/trailer section known to hold no end
        self._ll: Any = None  # llhttp parser of the fast path, between two messages
        self._llh = _LLHead()

    # -- public ---------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not parsed yet (partial head, or everything while paused)."""
        return len(self._buf)

    @property
    def tunnel(self) -> bool:
        """True once the message body is an unparsed stream (upgrade/CONNECT, read-until-close)."""
        return self._state == _STREAM

    def feed(self, data: bytes) -> None:
        """Parse as far as possible, invoking handler callbacks; raises ParseError."""
        if self._error is not None:
            raise self._error
        if not data or self._state == _CLOSED:
            return
        if data.__class__ is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            if buf.__class__ is bytes:
                buf = self._buf = bytearray(buf)
            buf += data  # type: ignore[operator]
            if self.paused or self._running:
                return
            # A line-based state can only progress once a new LF arrived.
            if (
                self._state in _LINE_STATES
                and b"\n" not in data
                and len(buf) <= self._max_header_bytes
            ):
                return
        else:
            if self.paused or self._running:
                self._buf = data
                return
            if self._state == _HEAD:
                self._running = True
                try:
                    tail = self._fast(data)
                except ParseError as e:
                    self._error = e
                    self._buf = b""
                    raise
                finally:
                    self._running = False
                if tail is not None:
                    if tail or self._buf or self._eof or self._state == _DONE:
                        self._fast_done(tail)
                    return
            self._buf = data
        self._run()

    def pause(self) -> None:
        """Stop delivering callbacks after the current one; further bytes are buffered."""
        self.paused = True

    def resume(self) -> None:
        """Unpause and parse buffered bytes (callbacks may fire before this returns)."""
        if not self.paused:
            return
        self.paused = False
        if (
            not self._running
            and self._error is None
            and (self._buf or self._eof or self._state == _DONE)
        ):
            self._run()

    def feed_eof(self) -> None:
        """The peer closed. Completes a read-until-close body or a tunnel; raises ParseError if
        the peer closed in the middle of a message. Idle (between messages) is fine. While
        paused the EOF is remembered and handled by resume() after the buffered bytes."""
        if self._error is not None or self._state == _CLOSED:
            return
        self._eof = True
        if not self.paused and not self._running:
            self._run()

    # -- machinery -----------------------------------------------------------------------

    def _run(self) -> None:
        self._running = True
        try:
            while True:
                buf = self._buf
                if buf.__class__ is not bytes:
                    buf = bytes(buf)
                self._buf = b""
                pos = self._parse(buf)
                rest = buf[pos:] if pos else buf
                if self._buf:  # fed from inside a callback: keep arrival order
                    self._buf = rest + bytes(self._buf)
                    if not self.paused:
                        continue
                else:
                    self._buf = rest
                break
            if self._eof and not self.paused:
                self._at_eof()
        except ParseError as e:
            self._error = e
            self._buf = b""
            raise
        finally:
            self._running = False

    def _parse(self, buf: bytes) -> int:
        pos = 0
        end = len(buf)
        while not self.paused:
            state = self._state
            if state == _HEAD:
                if pos >= end:
                    break
                r = self._parse_head(buf, pos, end)
                if r < 0:
                    return ~r
                pos = r
                if self._state == _DONE and not self.paused:  # a bodyless message
                    self._state = _HEAD
                    self._on_complete()
            elif state == _DONE:
                self._state = _HEAD
                self._on_complete()
            elif state == _BODY or state == _CHUNK_DATA:
                avail = end - pos
                if avail <= 0:
                    break
                rem = self._remaining
                if avail < rem:
                    self._remaining = rem - avail
                    chunk = buf[pos:] if pos else buf
                    pos = end
                else:
                    chunk = buf if (pos == 0 and rem == end) else buf[pos : pos + rem]
                    pos += rem
                    self._remaining = 0
                    self._state = _DONE if state == _BODY else _CHUNK_CRLF
                self._on_body(chunk)
            elif state == _CHUNK_SIZE:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if end - pos > self._max_header_bytes:
                        raise ParseError(CODEC_ERROR, self._status)
                    break
                m = _CHUNK_LINE(buf, pos, nl + 1)
                if m is None:
                    raise ParseError(CODEC_ERROR, self._status)
                size = int(m.group(1), 16)
                if size > _MAX_U64:
                    raise ParseError(CODEC_ERROR, self._status)
                pos = nl + 1
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_CRLF:
                if end - pos >= 2:
                    if buf[pos] != 13 or buf[pos + 1] != 10:
                        raise ParseError(CODEC_ERROR, self._status)
                    pos += 2
                    self._state = _CHUNK_SIZE
                else:
                    if end - pos == 1 and buf[pos] != 13:
                        raise ParseError(CODEC_ERROR, self._status)
                    break
            elif state == _TRAILERS:
                if pos >= end:
                    break
                c = buf[pos]
                if c == 10:
                    pos += 1
                    self._state = _DONE
                    continue
                if c == 13:
                    if end - pos < 2:
                        break
                    if buf[pos + 1] == 10:
                        pos += 2
                        self._state = _DONE
                        continue
                    raise ParseError(CODEC_ERROR, self._status)
                block_end, tail = _find_head_end(buf, pos, pos + self._scan)
                if tail < 0 or tail - pos > self._max_header_bytes:
                    self._scan = max(0, end - pos - 3)
                    if end - pos > self._max_header_bytes:
                        _check_lines(buf, pos, pos + self._max_header_bytes)
                        raise ParseError(
                            HEADERS_TOO_LARGE, 431 if self._status == 400 else self._status
                        )
                    break
                # Trailers are validated like headers, then dropped (Envoy's default).
                try:
                    _parse_fields(buf[pos:block_end], 1 << 30)
                except ParseError as e:
                    raise ParseError(e.details, self._status) from None
                pos = tail
                self._scan = 0
                self._state = _DONE
            elif state == _STREAM:
                if pos >= end:
                    break
                chunk = buf[pos:] if pos else buf
                pos = end
                self._on_body(chunk)
            else:  # _CLOSED: ignore anything after EOF
                return end
        return pos

    def _at_eof(self) -> None:
        """Called by _run once the buffer is parsed as far as it goes and we are not paused."""
        state = self._state
        if state == _STREAM:
            self._state = _DONE
            self._parse(b"")  # delivers on_message_complete
            if self.paused:
                return  # resume() comes back here
            state = self._state
        if state == _HEAD:
            if self._buf.strip(b"\r\n"):
                raise self._eof_error(False)
            self._state = _CLOSED
            self._eof = False
        elif state != _DONE:
            raise self._eof_error(True)

    def _eof_error(self, headers_done: bool) -> ParseError:
        raise NotImplementedError

    def _parse_head(self, buf: bytes, pos: int, end: int) -> int:
        raise NotImplementedError

    def _fast(self, data: bytes) -> bytes | None:
        """Parse ``data`` (fed while idle between messages) in one step if it has the usual
        shape, running the callbacks (``feed`` marks the parser running and turns a
        ParseError into the parser's error); returns the bytes after that message for the
        state machine, or None, with nothing done, to leave all of ``data`` to it."""
        return None

    def _ll_feed(self, data: bytes, make: Any) -> Any:
        """Feed one whole message (starting at a message boundary) to this parser's llhttp
        parser, made by ``make(collector)`` when there is none; the head lands in
        ``self._llh``. None, with the llhttp parser dropped, when llhttp refused the bytes:
        the general path then decides (and reports the exact error)."""
        ll = self._ll
        if ll is None:
            ll = self._ll = make(self._llh)
        head = self._llh
        head.headers = []
        head.special = None
        head.done = False
        try:
            ll.feed_data(data)
        except _LLError:
            self._ll = None
            return None
        return ll

    def _fast_done(self, tail: bytes) -> None:
        """After a fast-path message: bytes after it, bytes fed from its callbacks, an EOF
        seen meanwhile and an undelivered message end go to the state machine."""
        fed = self._buf
        if fed:
            tail += bytes(fed)
        if tail or self._eof or self._state == _DONE:
            self._buf = tail
            if not self.paused:
                self._run()


class RequestParser(_Parser):
    """Incremental HTTP/1 request parser (the downstream side of the connection manager).

    Callbacks: ``on_request_headers(method, target, version, headers, keep_alive, has_body)``,
    ``on_body(data)``, ``on_message_complete()``. ``target`` is the raw request-target (origin,
    absolute, authority or asterisk form; absolute-form is NOT rewritten to a path here).
    """

    __slots__ = ("_on_headers", "_methods")

    def __init__(
        self,
        handler: Any,
        max_header_bytes: int = 60 * 1024,
        max_headers_count: int = 100,
        allow_custom_methods: bool = False,
    ) -> None:
        super().__init__(handler, max_header_bytes, max_headers_count, 400)
        self._on_headers = handler.on_request_headers
        self._methods: frozenset[bytes] | None = None if allow_custom_methods else ENVOY_METHODS

    def _eof_error(self, headers_done: bool) -> ParseError:
        return ParseError(DOWNSTREAM_EOF, 400)

    def _request_line(self, line: bytes) -> tuple[bytes, bytes, int]:
        parts = line.split(b" ")
        if len(parts) == 3:
            method, target, vers = parts
            if vers == b"HTTP/1.1":
                version = 11
            elif vers == b"HTTP/1.0":
                version = 10
            else:
                return self._request_line_slow(line)
        else:
            return self._request_line_slow(line)
        methods = self._methods
        if (
            (method not in methods if methods is not None else _TOKEN_FULL(method) is None)
            or _ORIGIN_FORM(target) is None
            or method == b"CONNECT"
        ):
            # Other target forms, HTABs in the line, errors: the general path decides.
            return self._request_line_slow(line)
        return method, target, version

    def _fast(self, data: bytes) -> bytes | None:
        # Shape: exactly one CRLF head and nothing after it, the usual request line; no
        # trailing OWS in a field value (llhttp keeps it, the general path strips it).
        n = len(data)
        if (
            data.find(b"\r\n\r\n") != n - 4
            or n > self._max_header_bytes
            or self._methods is None
            or b" \r\n" in data
            or b"\t\r\n" in data
        ):
            return None
        ll = self._ll_feed(data, httptools.HttpRequestParser)
        if ll is None:
            return None
        head = self._llh
        headers = head.headers
        method = ll.get_method()
        target = head.url
        vers = ll.get_http_version()
        # The request line is exactly "method SP target SP HTTP/1.x" and every header line
        # was one field (no fold, no bare LF).
        if (
            (vers != "1.1" and vers != "1.0")
            or method not in ENVOY_METHODS
            or method == b"CONNECT"
            or _ORIGIN_FORM(target) is None
            or data.find(b"\r\n") != len(method) + len(target) + 10
            or data.count(b"\r\n") != len(headers) + 2
            or len(headers) > self._max_headers_count
        ):
            self._ll = None
            return None
        version = 11 if vers == "1.1" else 10
        special = head.special
        if special is None and head.done:  # no body, keep-alive by version (see _finish_head)
            if version == 10:
                self._ll = None  # llhttp closes after a 1.0 message
            self._state = _DONE
            self._on_headers(method, target, version, headers, version == 11, False)
        else:
            self._ll = None  # framing headers: the general path's rules, llhttp forgets
            self._finish_head(method, target, version, headers, special)
        if self._state == _DONE and not self.paused:
            self._state = _HEAD
            self._on_complete()
        return b""

    def _request_line_slow(self, line: bytes) -> tuple[bytes, bytes, int]:
        if b"\r" in line:
            raise ParseError(CODEC_ERROR)
        m = _REQUEST_LINE(line)
        if m is None:
            raise ParseError(CODEC_ERROR)
        method, target, vers = m.groups()
        methods = self._methods
        if (methods is not None and method not in methods) or _TOKEN_FULL(method) is None:
            raise ParseError(CODEC_ERROR)
        _check_target(method, target)
        if vers is None:  # HTTP/0.9 request line: Envoy handles it as HTTP/1.0
            return method, target, 10
        if _VERSION(vers) is None:
            raise ParseError(CODEC_ERROR)
        return method, target, 11 if vers == b"HTTP/1.1" else 10

    def _parse_head(self, buf: bytes, pos: int, end: int) -> int:
        # Empty lines before the request line are skipped (RFC 9112 2.2; Envoy skips any).
        c = buf[pos]
        while c == 13 or c == 10:
            if c == 10:
                pos += 1
            elif pos + 1 < end:
                if buf[pos + 1] != 10:
                    raise ParseError(CODEC_ERROR)
                pos += 2
            else:
                return ~pos
            if pos >= end:
                return ~pos
            c = buf[pos]
        # Fast path: CRLF head. Anything unusual (bare LF, obs-fold, bad bytes, limits) falls
        # through to the general path, which re-parses the head and reports the exact error.
        hend = buf.find(b"\r\n\r\n", pos + self._scan)
        if hend >= 0 and hend + 4 - pos <= self._max_header_bytes:
            self._scan = 0
            le = buf.find(b"\n", pos)
            method, target, version = self._request_line(
                buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le]
            )
            if hend >= le:
                block = buf[le + 1 : hend + 2]
                found = _findall_crlf_fields(block)
                if (
                    len(found) == block.count(b"\n")
                    and len(found) <= self._max_headers_count
                    and not block.translate(None, _FIELD_CHARS)
                ):
                    headers = [[n.lower(), v] for n, v in found]
                    special = [h for h in headers if h[0] in _SPECIAL]
                    self._finish_head(method, target, version, headers, special or None)
                    return hend + 4
            else:
                self._finish_head(method, target, version, [], None)
                return hend + 4
        return self._parse_head_general(buf, pos, end)

    def _parse_head_general(self, buf: bytes, pos: int, end: int) -> int:
        scanned = self._scan
        block_end, head_end = _find_head_end(buf, pos, pos + scanned)
        if head_end < 0 or head_end - pos > self._max_header_bytes:
            self._scan = max(0, end - pos - 3)
            self._incomplete_head(buf, pos, end, scanned)
            return ~pos
        self._scan = 0
        le = buf.find(b"\n", pos)
        method, target, version = self._request_line(
            buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le]
        )
        if block_end > le + 1:
            headers, special = _parse_fields(buf[le + 1 : block_end], self._max_headers_count)
        else:
            headers = []
            special = None
        self._finish_head(method, target, version, headers, special)
        return head_end

    def _finish_head(
        self,
        method: bytes,
        target: bytes,
        version: int,
        headers: list[list[bytes]],
        special: list[list[bytes]] | None,
    ) -> None:
        tunnel = method == b"CONNECT"
        if special is None:
            keep_alive = version == 11
            has_body = tunnel
            self._state = _STREAM if tunnel else _DONE
        elif (
            len(special) == 1
            and not tunnel
            and special[0][0] == b"connection"
            and ((v := special[0][1].lower()) == b"keep-alive" or v == b"close")
        ):
            # The most common framing header alone: skip the general evaluation.
            keep_alive = v == b"keep-alive"
            has_body = False
            self._state = _DONE
        else:
            content_length, chunked, _te, conn, upgrade = _framing(special, 400)
            if conn is None:
                keep_alive = version == 11
            elif b"close" in conn:
                keep_alive = False
            else:
                keep_alive = version == 11 or b"keep-alive" in conn
            if (
                upgrade is not None
                and conn is not None
                and b"upgrade" in conn
                and not upgrade.lower().startswith(b"h2c")
            ):
                tunnel = True
            if tunnel:
                has_body = True
                self._state = _STREAM
            elif chunked:
                has_body = True
                self._state = _CHUNK_SIZE
            elif content_length > 0:
                has_body = True
                self._remaining = content_length
                self._state = _BODY
            else:
                has_body = False
                self._state = _DONE
        self._on_headers(method, target, version, headers, keep_alive, has_body)

    def _incomplete_head(self, buf: bytes, pos: int, end: int, scanned: int) -> None:
        """No complete head yet (or one that is too big): report errors Envoy would report
        already, else 431 once the limit is passed. The request line is validated once, when
        its LF arrives (``scanned``: bytes already looked at by an earlier call)."""
        limit = self._max_header_bytes
        le = buf.find(b"\n", pos, pos + limit)
        if le >= 0:
            if le - pos >= scanned or end - pos > limit:
                self._request_line(buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le])
        elif (
            buf[pos] not in _METHOD_FIRST_BYTES
            if self._methods is not None
            else _TOKEN_FULL(buf, pos, pos + 1) is None
        ):
            raise ParseError(CODEC_ERROR)  # Envoy rejects on the first byte already
        if end - pos > limit:
            if le >= 0:
                _check_lines(buf, le + 1, pos + limit)
            raise ParseError(HEADERS_TOO_LARGE, 431)


def _check_target(method: bytes, target: bytes) -> None:
    """Envoy's request-target rules (BalsaParser isUrlValid + HCM checks)."""
    if method == b"CONNECT":
        m = _AUTHORITY_FORM(target)
        if m is None or not target or b"@@" in target:
            if _CTL(target) is not None:
                raise ParseError(INVALID_CHARACTERS)
            raise ParseError(INVALID_URL)
        return
    if _ORIGIN_FORM(target) is not None or _ASTERISK_FORM(target) is not None:
        return
    m = _ABSOLUTE_FORM(target)
    if m is not None and b"@@" not in m.group(1):
        return
    if _CTL(target) is not None:
        raise ParseError(INVALID_CHARACTERS)
    raise ParseError(CODEC_ERROR)


class ResponseParser(_Parser):
    """Incremental HTTP/1 response parser (the upstream side of the connection pool).

    Call ``expect_response(method)`` before sending each request. Callbacks:
    ``on_response_headers(status, version, headers, keep_alive, has_body)`` for final
    responses (and 101), ``on_informational(status, headers)`` for other 1xx,
    ``on_body(data)``, ``on_message_complete()``. Errors carry status 502 (what Envoy's
    router answers for an upstream protocol error).
    """

    __slots__ = ("_on_headers", "_on_info", "_expected")

    def __init__(
        self, handler: Any, max_header_bytes: int = 80 * 1024, max_headers_count: int = 100
    ) -> None:
        # Envoy 1.40 accepts an upstream response head of 81920 bytes and rejects 81921
        # (requests: 61440), and 100 response header fields.
        super().__init__(handler, max_header_bytes, max_headers_count, 502)
        self._on_headers = handler.on_response_headers
        self._on_info = handler.on_informational
        self._expected: deque[bytes] = deque()

    def expect_response(self, method: bytes) -> None:
        """Register the method of the next request sent (HEAD/CONNECT change the framing)."""
        self._expected.append(method)

    def _eof_error(self, headers_done: bool) -> ParseError:
        return ParseError(
            UPSTREAM_EOF_AFTER_HEADERS if headers_done else UPSTREAM_EOF_BEFORE_HEADERS, 502
        )

    def _fast(self, data: bytes) -> bytes | None:
        # Shape: an HTTP/1.1 final response with a CRLF head and no trailing OWS in a field
        # value, to a request that was not HEAD/CONNECT (llhttp would expect a body); any
        # body after it is left to the state machine unless it is exactly the
        # Content-Length body.
        hend = data.find(b"\r\n\r\n")
        expected = self._expected
        if hend < 0 or hend + 4 > self._max_header_bytes or not expected:
            return None
        le = data.find(b"\r\n")
        code = data[9:12]
        method = expected[0]
        if (
            data[:9] != b"HTTP/1.1 "
            or not code.isdigit()
            or code[0] < 50  # 1xx and malformed codes: the general path
            or not (le == 12 or (data[12] == 32 and _REASON_OK(data, 13, le) is not None))
            or method == b"HEAD"
            or method == b"CONNECT"
            or data.find(b" \r\n", 0, hend + 2) >= 0
            or data.find(b"\t\r\n", 0, hend + 2) >= 0
        ):
            return None
        ll = self._ll_feed(data, httptools.HttpResponseParser)
        if ll is None:
            return None
        head = self._llh
        headers = head.headers
        # Every header line was one field of THIS message (llhttp may have gone on into
        # bytes after it).
        if (
            data.count(b"\r\n", 0, hend + 2) != len(headers) + 1
            or len(headers) > self._max_headers_count
        ):
            self._ll = None
            return None
        special = head.special
        body_at = hend + 4
        tail = b""
        status = int(code)
        # The usual framing inline: one Content-Length and/or Connection keep-alive|close,
        # on a response that may have a body; everything else follows _finish_head's rules.
        content_length = -1
        keep_alive = True
        if special is not None:
            for name, value in special:
                if (
                    name == b"content-length"
                    and content_length < 0
                    and value.isdigit()
                    and len(value) < 19
                ):
                    content_length = int(value)
                elif name == b"connection" and (
                    (v := value.lower()) == b"keep-alive" or v == b"close"
                ):
                    keep_alive = keep_alive and v == b"keep-alive"
                else:
                    content_length = -2
                    break
        if content_length >= 0 and status != 204 and status != 304:
            self._expected.popleft()
            if content_length:
                self._remaining = content_length
                self._state = _BODY
            else:
                self._state = _DONE
            self._on_headers(status, 11, headers, keep_alive, content_length > 0)
        else:
            keep_alive = False
            self._finish_head(status, 11, headers, special)
        if self._state == _BODY and len(data) - body_at == self._remaining and not self.paused:
            self._remaining = 0
            self._state = _DONE
            self._on_body(data[body_at:])
        elif len(data) > body_at:
            tail = data[body_at:]
        if tail or not keep_alive or not head.done:
            self._ll = None  # llhttp is not between two keep-alive messages
        if self._state == _DONE and not tail and not self.paused:
            self._state = _HEAD
            self._on_complete()
        return tail

    def _status_line(self, line: bytes) -> tuple[int, int]:
        if (
            line[:9] == b"HTTP/1.1 "
            and (len(line) == 12 or line[12:13] == b" ")
            and line[9:12].isdigit()
        ):
            status = int(line[9:12])
            if len(line) > 13 and _REASON_OK(line, 13) is None:
                raise ParseError(CODEC_ERROR, 502)
            version = 11
        else:
            m = _STATUS_LINE(line.rstrip(b" \t"))
            if m is None:
                raise ParseError(CODEC_ERROR, 502)
            status = int(m.group(2))
            version = 11 if m.group(1) == b"1.1" else 10
        if status < 100:
            raise ParseError(CODEC_ERROR, 502)
        return status, version

    def _parse_head(self, buf: bytes, pos: int, end: int) -> int:
        if buf[pos] != 72:  # Envoy: a response must start with "H"
            raise ParseError(CODEC_ERROR, 502)
        hend = buf.find(b"\r\n\r\n", pos + self._scan)
        if hend >= 0 and hend + 4 - pos <= self._max_header_bytes:
            self._scan = 0
            le = buf.find(b"\n", pos)
            status, version = self._status_line(
                buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le]
            )
            if hend >= le:
                block = buf[le + 1 : hend + 2]
                found = _findall_crlf_fields(block)
                if (
                    len(found) == block.count(b"\n")
                    and len(found) <= self._max_headers_count
                    and not block.translate(None, _FIELD_CHARS)
                ):
                    headers = [[n.lower(), v] for n, v in found]
                    special = [h for h in headers if h[0] in _SPECIAL]
                    self._finish_head(status, version, headers, special or None)
                    return hend + 4
            else:
                self._finish_head(status, version, [], None)
                return hend + 4
        return self._parse_head_general(buf, pos, end)

    def _parse_head_general(self, buf: bytes, pos: int, end: int) -> int:
        scanned = self._scan
        block_end, head_end = _find_head_end(buf, pos, pos + scanned)
        if head_end < 0 or head_end - pos > self._max_header_bytes:
            self._scan = max(0, end - pos - 3)
            limit = self._max_header_bytes
            le = buf.find(b"\n", pos, pos + limit)
            if le >= 0 and (le - pos >= scanned or end - pos > limit):
                self._status_line(buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le])
            if end - pos > limit:
                if le >= 0:
                    try:
                        _check_lines(buf, le + 1, pos + limit)
                    except ParseError as e:
                        raise ParseError(e.details, 502) from None
                raise ParseError(HEADERS_TOO_LARGE, 502)
            return ~pos
        self._scan = 0
        le = buf.find(b"\n", pos)
        status, version = self._status_line(buf[pos : le - 1] if buf[le - 1] == 13 else buf[pos:le])
        if block_end > le + 1:
            try:
                headers, special = _parse_fields(buf[le + 1 : block_end], self._max_headers_count)
            except ParseError as e:
                raise ParseError(e.details, 502) from None
        else:
            headers = []
            special = None
        self._finish_head(status, version, headers, special)
        return head_end

    def _finish_head(
        self,
        status: int,
        version: int,
        headers: list[list[bytes]],
        special: list[list[bytes]] | None,
    ) -> None:
        if special is not None:
            content_length, chunked, te, conn, _upgrade = _framing(special, 502)
        else:
            content_length, chunked, te, conn = -1, False, False, None
        if status < 200 and status != 101:
            # 1xx: no body allowed (Envoy rejects CL/TE on them); the final response follows.
            if content_length >= 0 or te:
                raise ParseError(CODEC_ERROR, 502)
            self._on_info(status, headers)
            return
        expected = self._expected
        method = expected.popleft() if expected else b""
        if conn is None:
            keep_alive = version == 11
        elif b"close" in conn:
            keep_alive = False
        else:
            keep_alive = version == 11 or b"keep-alive" in conn
        if status == 101 or (method == b"CONNECT" and status < 300):
            has_body = True
            keep_alive = False
            state = _STREAM
        elif method == b"HEAD" or status == 304:
            has_body = False
            state = _DONE
        elif status == 204:
            if te or content_length > 0:
                raise ParseError(CODEC_ERROR, 502)
            has_body = False
            state = _DONE
        elif chunked:
            has_body = True
            state = _CHUNK_SIZE
        elif content_length >= 0:
            has_body = content_length > 0
            self._remaining = content_length
            state = _BODY if has_body else _DONE
        else:
            has_body = True  # delimited by connection close
            keep_alive = False
            state = _STREAM
        self._state = state
        self._on_headers(status, version, headers, keep_alive, has_body)


# -- serializers ----------------------------------------------------------------------------

# Envoy's CodeUtility::toString table; every other code is "Unknown".
_REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    203: b"Non-Authoritative Information",
    204: b"No Content",
    205: b"Reset Content",
    206: b"Partial Content",
    207: b"Multi-Status",
    208: b"Already Reported",
    226: b"IM Used",
    300: b"Multiple Choices",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    305: b"Use Proxy",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    402: b"Payment Required",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    406: b"Not Acceptable",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    422: b"Unprocessable Entity",
    423: b"Locked",
    424: b"Failed Dependency",
    425: b"Too Early",
    426: b"Upgrade Required",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    506: b"Variant Also Negotiates",
    507: b"Insufficient Storage",
    508: b"Loop Detected",
    510: b"Not Extended",
    511: b"Network Authentication Required",
    599: b"Last Unassigned Server Error Code",
}
_STATUS_LINES_11 = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}


def reason_phrase(status: int) -> bytes:
    """Envoy's reason phrase for ``status`` (b"Unknown" for codes Envoy does not name)."""
    return _REASONS.get(status, b"Unknown")


_join_name_value = b": ".join


def _join_fields(first: bytes, headers: list[list[bytes]]) -> bytes:
    if headers:
        data = first + b"\r\n".join(map(_join_name_value, headers)) + b"\r\n\r\n"
    else:
        data = first + b"\r\n"
    # Two C passes guard against CR/LF smuggled into a name or value (response splitting).
    n = len(headers) + 2
    if data.count(b"\n") != n or data.count(b"\r") != n:
        raise ValueError("CR or LF in an HTTP/1 start line, header name or value")
    return data


def encode_request_head(method: bytes, target: bytes, headers: list[list[bytes]]) -> bytes:
    """``METHOD target HTTP/1.1`` + header lines + blank line (headers must include host)."""
    return _join_fields(b"%s %s HTTP/1.1\r\n" % (method, target), headers)


def encode_response_head(status: int, headers: list[list[bytes]], version: int = 11) -> bytes:
    """Status line with Envoy's reason phrase + header lines + blank line."""
    if version == 11:
        line = _STATUS_LINES_11.get(status)
        if line is None:
            line = b"HTTP/1.1 %d Unknown\r\n" % status
    else:
        line = b"HTTP/1.0 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
    return _join_fields(line, headers)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data encodes to b"" (LAST_CHUNK ends the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
