"""Envoy-style logging on top of the standard ``logging`` module.

Strategy: every Envoy log component is a stdlib logger named ``pyenvoy.<component>`` (admin,
config, connection, http, router, upstream, pool, main, ...). Envoy's level names map onto
logging levels (``trace`` is a new level 5, ``off`` sits above CRITICAL), and each component
logger gets an explicit level so ``/logging`` can report and change them one by one. Code on
the hot path asks ``log.isEnabledFor(DEBUG)`` (cached by ``logging``) before formatting.

Output goes through one handler on the ``pyenvoy`` logger, formatted by a compiled spdlog
pattern (``--log-format``), default Envoy's ``[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v``:
the pattern is parsed once into a list of small functions, so a record costs one pass.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = [
    "COMPONENTS",
    "DEFAULT_LOG_FORMAT",
    "TRACE",
    "OFF",
    "configure",
    "get_levels",
    "get_logger",
    "set_all_levels",
    "set_level",
    "level_number",
    "level_name",
    "parse_component_levels",
    "SpdlogFormatter",
]

ROOT = "pyenvoy"
TRACE = 5
OFF = logging.CRITICAL + 10
DEFAULT_LOG_FORMAT = "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"

logging.addLevelName(TRACE, "TRACE")

LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}
_NAMES: dict[int, str] = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
    OFF: "off",
}

# Envoy 1.40's component loggers, in the order its admin /logging lists them.
COMPONENTS: tuple[str, ...] = (
    "a2a",
    "admin",
    "ai_protocol_manager",
    "alternate_protocols_cache",
    "aws",
    "assert",
    "backtrace",
    "basic_auth",
    "cache_filter",
    "client",
    "config",
    "connection",
    "conn_handler",
    "compression",
    "credential_injector",
    "decompression",
    "dns",
    "dubbo",
    "envoy_bug",
    "ext_authz",
    "ext_proc",
    "rocketmq",
    "file",
    "filter",
    "forward_proxy",
    "geolocation",
    "grpc",
    "happy_eyeballs",
    "hc",
    "health_checker",
    "http",
    "http2",
    "hystrix",
    "init",
    "io",
    "jwt",
    "json_rpc",
    "kafka",
    "key_value_store",
    "lua",
    "local_rate_limit",
    "main",
    "matcher",
    "mcp",
    "misc",
    "mongo",
    "multi_connection",
    "notification",
    "oauth2",
    "quic",
    "quic_stream",
    "pool",
    "rate_limit_quota",
    "rbac",
    "rds",
    "redis",
    "router",
    "runtime",
    "stats",
    "secret",
    "sse",
    "tap",
    "testing",
    "thrift",
    "tracing",
    "upstream",
    "udp",
    "wasm",
    "websocket",
    "golang",
    "stats_sinks",
    "dynamic_modules",
    "ip_tagging",
)
_COMPONENT_SET = frozenset(COMPONENTS)

_handler: logging.Handler | None = None


def level_number(level: str) -> int | None:
    """Envoy level name -> logging level number (None if unknown)."""
    return LEVELS.get(level.lower()) if isinstance(level, str) else None


def level_name(number: int) -> str:
    """logging level number -> Envoy level name (nearest lower known level)."""
    name = _NAMES.get(number)
    if name is not None:
        return name
    best = "trace"
    for n in sorted(_NAMES):
        if n <= number:
            best = _NAMES[n]
    return best


def get_logger(component: str) -> logging.Logger:
    """The logger of an Envoy component (``get_logger("upstream")`` -> ``pyenvoy.upstream``)."""
    return logging.getLogger(f"{ROOT}.{component}")


def parse_component_levels(spec: str) -> dict[str, int]:
    """Parse ``upstream:debug,config:trace``; ValueError with Envoy's wording on bad input."""
    out: dict[str, int] = {}
    if not spec:
        return out
    for item in spec.split(","):
        if not item:
            continue
        name, sep, lvl = item.partition(":")
        if not sep or not name or not lvl:
            raise ValueError(f"component log level not correctly specified '{item}'")
        number = level_number(lvl)
        if number is None:
            raise ValueError(f"invalid log level specified '{lvl}'")
        if name not in _COMPONENT_SET:
            raise ValueError(f"invalid component specified '{name}'")
        out[name] = number
    return out


def set_all_levels(level: str) -> None:
    """Set every component (and the ``pyenvoy`` root) to ``level``; ValueError if unknown."""
    number = level_number(level)
    if number is None:
        raise ValueError(f"invalid log level specified '{level}'")
    logging.getLogger(ROOT).setLevel(number)
    for component in COMPONENTS:
        get_logger(component).setLevel(number)


def set_level(component: str, level: str) -> bool:
    """Set one component's level; False for an unknown component or level."""
    number = level_number(level)
    if number is None or component not in _COMPONENT_SET:
        return False
    get_logger(component).setLevel(number)
    return True


def get_levels() -> dict[str, str]:
    """Component -> Envoy level name, in Envoy's /logging order."""
    return {c: level_name(get_logger(c).getEffectiveLevel()) for c in COMPONENTS}


# --------------------------------------------------------------------------------------------
# spdlog patterns.

_Part = Callable[[logging.LogRecord, Any, str], str]
_src_cache: dict[str, str] = {}
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_path(pathname: str) -> str:
    rel = _src_cache.get(pathname)
    if rel is None:
        if pathname.startswith(_PKG_PARENT + os.sep):
            rel = pathname[len(_PKG_PARENT) + 1 :]
        else:
            rel = os.path.basename(pathname)
        _src_cache[pathname] = rel
    return rel


def _component(record: logging.LogRecord) -> str:
    name = record.name
    if name.startswith("pyenvoy."):
        return name[8:]
    if name == ROOT:
        return "main"
    return name


def _escape(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def _tz(tm: Any) -> str:
    off = tm.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}"


_FLAGS: dict[str, _Part] = {
    "v": lambda r, tm, msg: msg,
    "_": lambda r, tm, msg: _escape(msg),
    "j": lambda r, tm, msg: json.dumps(msg)[1:-1],
    "l": lambda r, tm, msg: level_name(r.levelno),
    "L": lambda r, tm, msg: level_name(r.levelno)[:1].upper(),
    "n": lambda r, tm, msg: _component(r),
    "t": lambda r, tm, msg: str(threading.get_native_id()),
    "P": lambda r, tm, msg: str(r.process),
    "Y": lambda r, tm, msg: f"{tm.tm_year:04d}",
    "y": lambda r, tm, msg: f"{tm.tm_year % 100:02d}",
    "m": lambda r, tm, msg: f"{tm.tm_mon:02d}",
    "d": lambda r, tm, msg: f"{tm.tm_mday:02d}",
    "H": lambda r, tm, msg: f"{tm.tm_hour:02d}",
    "I": lambda r, tm, msg: f"{(tm.tm_hour % 12) or 12:02d}",
    "M": lambda r, tm, msg: f"{tm.tm_min:02d}",
    "S": lambda r, tm, msg: f"{tm.tm_sec:02d}",
    "p": lambda r, tm, msg: "AM" if tm.tm_hour < 12 else "PM",
    "e": lambda r, tm, msg: f"{int(r.msecs):03d}",
    "f": lambda r, tm, msg: f"{int((r.created % 1) * 1e6):06d}",
    "F": lambda r, tm, msg: f"{int((r.created % 1) * 1e9):09d}",
    "E": lambda r, tm, msg: str(int(r.created)),
    "T": lambda r, tm, msg: f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}",
    "X": lambda r, tm, msg: f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}",
    "R": lambda r, tm, msg: f"{tm.tm_hour:02d}:{tm.tm_min:02d}",
    "D": lambda r, tm, msg: f"{tm.tm_mon:02d}/{tm.tm_mday:02d}/{tm.tm_year % 100:02d}",
    "x": lambda r, tm, msg: f"{tm.tm_mon:02d}/{tm.tm_mday:02d}/{tm.tm_year % 100:02d}",
    "z": lambda r, tm, msg: _tz(tm),
    "a": lambda r, tm, msg: time.strftime("%a", tm),
    "A": lambda r, tm, msg: time.strftime("%A", tm),
    "b": lambda r, tm, msg: time.strftime("%b", tm),
    "h": lambda r, tm, msg: time.strftime("%b", tm),
    "B": lambda r, tm, msg: time.strftime("%B", tm),
    "c": lambda r, tm, msg: time.strftime("%a %b %d %H:%M:%S %Y", tm),
    "g": lambda r, tm, msg: _source_path(r.pathname),
    "s": lambda r, tm, msg: os.path.basename(r.pathname),
    "#": lambda r, tm, msg: str(r.lineno),
    "!": lambda r, tm, msg: r.funcName,
    "@": lambda r, tm, msg: f"{_source_path(r.pathname)}:{r.lineno}",
    "%": lambda r, tm, msg: "%",
}


def _aligned(part: _Part, align: str, width: int) -> _Part:
    def pad(r: logging.LogRecord, tm: Any, msg: str) -> str:
        text = part(r, tm, msg)
        if align == "-":
            return text.ljust(width)
        if align == "=":
            return text.center(width)
        return text.rjust(width)

    return pad


def compile_pattern(pattern: str) -> list[_Part | str]:
    """Compile an spdlog pattern into literal strings and field functions."""
    out: list[_Part | str] = []
    literal: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch != "%" or i + 1 >= n:
            literal.append(ch)
            i += 1
            continue
        j = i + 1
        align = ""
        if pattern[j] in "-=":
            align = pattern[j]
            j += 1
        digits = ""
        while j < n and pattern[j].isdigit():
            digits += pattern[j]
            j += 1
        if j < n and pattern[j] == "!" and digits and j + 1 < n:
            j += 1  # spdlog's truncate marker: treated as plain padding
        flag = pattern[j] if j < n else ""
        part = _FLAGS.get(flag)
        if part is None:
            literal.append(pattern[i : j + 1])
            i = j + 1
            continue
        if literal:
            out.append("".join(literal))
            literal = []
        out.append(_aligned(part, align, int(digits)) if digits else part)
        i = j + 1
    if literal:
        out.append("".join(literal))
    return out


class SpdlogFormatter(logging.Formatter):
    """A logging.Formatter rendering Envoy/spdlog patterns (``--log-format``)."""

    def __init__(self, pattern: str = DEFAULT_LOG_FORMAT, escape: bool = False) -> None:
        super().__init__()
        self.pattern = pattern
        self.escape = escape
        self._parts = compile_pattern(pattern)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            msg = f"{msg}\n{record.exc_text}"
        if self.escape:
            msg = _escape(msg)
        tm = time.localtime(record.created)
        return "".join(p if isinstance(p, str) else p(record, tm, msg) for p in self._parts)


def _open_stream(log_path: str | None) -> logging.Handler:
    if not log_path or log_path == "/dev/stderr":
        return logging.StreamHandler(sys.stderr)
    if log_path == "/dev/stdout":
        return logging.StreamHandler(sys.stdout)
    stream: IO[str] = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    return logging.StreamHandler(stream)


def configure(
    level: str = "info",
    component_levels: str = "",
    log_path: str | None = None,
    log_format: str | None = None,
    *,
    log_format_escaped: bool = False,
) -> None:
    """Set up pyenvoy logging like Envoy's ``-l``, ``--component-log-level``, ``--log-path``
    and ``--log-format``. Raises ValueError (Envoy's wording) for bad levels or components,
    OSError if ``log_path`` cannot be opened. Calling it again replaces the previous setup."""
    global _handler
    if level_number(level) is None:
        raise ValueError(f"invalid log level specified '{level}'")
    overrides = parse_component_levels(component_levels)
    handler = _open_stream(log_path)
    handler.setFormatter(SpdlogFormatter(log_format or DEFAULT_LOG_FORMAT, log_format_escaped))
    root = logging.getLogger(ROOT)
    if _handler is not None:
        root.removeHandler(_handler)
        if _handler.stream not in (sys.stderr, sys.stdout):  # type: ignore[attr-defined]
            _handler.close()
    root.addHandler(handler)
    root.propagate = False
    _handler = handler
    set_all_levels(level)
    for component, number in overrides.items():
        get_logger(component).setLevel(number)
