"""Access logs: ``envoy.access_loggers.file`` / ``stdout`` / ``stderr``.

Strategy: the format is compiled once (pyenvoy.formatter); a log call formats one line
and appends it to an in-memory buffer that is written out at most once a second (Envoy's
default flush interval) or when it grows past 64 KiB, so logging costs no syscall per
request.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from pyenvoy.config.errors import ConfigError

FILE_URL = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT_URL = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR_URL = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"

_FLUSH_BYTES = 64 * 1024


class _Sink:
    """A buffered writer shared by every logger writing to the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.buffer: list[bytes] = []
        self.size = 0
        self.handle: asyncio.TimerHandle | None = None
        self.file: Any = None

    def write(self, line: bytes) -> None:
        self.buffer.append(line)
        self.size += len(line)
        if self.size >= _FLUSH_BYTES:
            self.flush()
        elif self.handle is None:
            try:
                self.handle = asyncio.get_running_loop().call_later(1.0, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        self.buffer.clear()
        self.size = 0
        try:
            if self.path == "/dev/stdout":
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            elif self.path == "/dev/stderr":
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()
            else:
                if self.file is None:
                    self.file = open(self.path, "ab")  # noqa: SIM115 - kept open like Envoy
                self.file.write(data)
                self.file.flush()
        except OSError:
            pass


_sinks: dict[str, _Sink] = {}


def sink_for(path: str) -> _Sink:
    s = _sinks.get(path)
    if s is None:
        s = _sinks[path] = _Sink(path)
    return s


class AccessLogger:
    __slots__ = ("sink", "text", "json_fields")

    def __init__(self, sink: _Sink, text: Any = None, json_fields: dict[str, Any] | None = None) -> None:
        self.sink = sink
        self.text = text
        self.json_fields = json_fields

    def log(self, request_headers: Any, response_headers: Any, stream_info: Any) -> None:
        if self.json_fields is not None:
            out = {}
            for k, f in self.json_fields.items():
                out[k] = f.format(stream_info, request_headers, response_headers)
            line = (json.dumps(out) + "\n").encode("utf-8", "surrogateescape")
        else:
            line = self.text.format_bytes(stream_info, request_headers, response_headers)
        self.sink.write(line)


def _compile_substitution(fmt: Any, path: str) -> tuple[Any, dict[str, Any] | None]:
    from pyenvoy.formatter import compile_format

    which = fmt.WhichOneof("format")
    if which == "text_format":
        return compile_format(fmt.text_format), None
    if which == "text_format_source":
        src = fmt.text_format_source
        if src.WhichOneof("specifier") != "inline_string":
            raise ConfigError("only inline_string format sources are supported", f"{path}.text_format_source")
        return compile_format(src.inline_string), None
    if which == "json_format":
        from google.protobuf.json_format import MessageToDict

        d = MessageToDict(fmt.json_format)
        return None, {k: compile_format(str(v)) for k, v in d.items()}
    raise ConfigError("log_format must set text_format, text_format_source or json_format", path)


def build_access_logs(protos: Any, path: str) -> list[AccessLogger]:
    from pyenvoy.config import unpack_any
    from pyenvoy.formatter import DEFAULT_ACCESS_LOG_FORMAT, compile_format

    out = []
    for i, al in enumerate(protos):
        apath = f"{path}[{i}]"
        if al.HasField("filter"):
            raise ConfigError("access log filters are not supported by pyenvoy yet", f"{apath}.filter")
        url = al.typed_config.type_url
        cfg = unpack_any(al.typed_config, f"{apath}.typed_config")
        text: Any = None
        fields = None
        if url == FILE_URL:
            target = cfg.path
            if cfg.HasField("log_format"):
                text, fields = _compile_substitution(cfg.log_format, f"{apath}.typed_config.log_format")
            elif cfg.format:
                text = compile_format(cfg.format)
            elif cfg.HasField("json_format"):
                from google.protobuf.json_format import MessageToDict

                fields = {k: compile_format(str(v)) for k, v in MessageToDict(cfg.json_format).items()}
        elif url in (STDOUT_URL, STDERR_URL):
            target = "/dev/stdout" if url == STDOUT_URL else "/dev/stderr"
            if cfg.HasField("log_format"):
                text, fields = _compile_substitution(cfg.log_format, f"{apath}.typed_config.log_format")
        else:
            raise ConfigError(f"{al.name or url} is not supported by pyenvoy", f"{apath}.typed_config")
        if text is None and fields is None:
            text = compile_format(DEFAULT_ACCESS_LOG_FORMAT)
        out.append(AccessLogger(sink_for(target), text, fields))
    return out


def flush_all() -> None:
    for s in _sinks.values():
        s.flush()
