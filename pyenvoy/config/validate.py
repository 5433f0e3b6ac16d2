"""A generic protoc-gen-validate (PGV) checker driven by the descriptors' ``validate.rules``.

Strategy: the xds-protos descriptors carry Envoy's PGV annotations as field/message/oneof
options. The first time a message type is seen, its options are compiled into a *plan*: an
ordered tuple of entries (non-oneof fields first, then each oneof's members followed by its
``(validate.required)`` check, as PGV's generated C++ does), each entry holding a list of
``(violates(value), reason)`` closures and how to recurse (singular / repeated / map values).
Fields with neither rules nor sub-messages are left out, so walking a message only touches
what can fail. ``google.protobuf.Any`` values are unpacked (TypedStruct converted) and their
content validated too, which Envoy does when it instantiates each extension.

Reasons use PGV's C++ texts (``ClusterValidationError.Name: value length must be at least 1
characters``); the first failure wins, like the generated code. The ConfigError carries the
full field path separately, so only the innermost reason is kept instead of PGV's chain of
"embedded message failed validation | caused by ...".

Deprecated fields that are set are logged once per field on ``pyenvoy.misc`` with Envoy's
wording; ``envoy.annotations.disallowed_by_default`` fields are rejected as Envoy does.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from envoy.annotations import deprecation_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from validate import validate_pb2

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.loader import (
    _STRICT,
    TYPED_STRUCT_TYPES,
    PathError,
    _Key,
    _line_of,
    _merge_message,
    _struct_to_py,
    format_path,
    message_class_for_type_url,
)

__all__ = ["validate_message", "set_skip_deprecated_logs"]

misc_log = logging.getLogger("pyenvoy.misc")

_DEPRECATION_TAIL = (
    "This configuration will be removed from Envoy soon. Please see "
    "https://www.envoyproxy.io/docs/envoy/latest/version_history/version_history for details. "
    "If continued use of this field is absolutely necessary, see "
    "https://www.envoyproxy.io/docs/envoy/latest/configuration/operations/runtime"
    "#using-runtime-overrides-for-deprecated-features for how to apply a temporary and highly "
    "discouraged override."
)

_skip_deprecated_logs = False
_warned_deprecated: set[str] = set()


def set_skip_deprecated_logs(skip: bool) -> None:
    """``--skip-deprecated-logs``: do not log deprecated-field warnings."""
    global _skip_deprecated_logs
    _skip_deprecated_logs = skip


class _PgvError(PathError):
    """A PGV rule violation (rendered as "Proto constraint validation failed (...)")."""


Check = tuple[Callable[..., bool], str]

# --------------------------------------------------------------------------------------------
# Value formatting as PGV's Go templates print rule values.


def _go_num(v: Any) -> str:
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e21:
            return str(int(v))
        return repr(v)
    return str(v)


def _go_quote(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_list(values: Any, fmt: Callable[[Any], str] = _go_num) -> str:
    return "[" + " ".join(fmt(v) for v in values) + "]"


def _go_duration(ns: int) -> str:
    """Go's time.Duration.String()."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_trim(u / 1_000)}µs"
    if u < 1_000_000_000:
        return f"{sign}{_trim(u / 1_000_000)}ms"
    secs_total, frac_ns = divmod(u, 1_000_000_000)
    hours, rem = divmod(secs_total, 3600)
    minutes, secs = divmod(rem, 60)
    sec_text = str(secs)
    if frac_ns:
        sec_text += "." + f"{frac_ns:09d}".rstrip("0")
    if hours:
        return f"{sign}{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{sign}{minutes}m{sec_text}s"
    return f"{sign}{sec_text}s"


def _trim(x: float) -> str:
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _dur_ns(d: Any) -> int:
    return int(d.seconds) * 1_000_000_000 + int(d.nanos)


# --------------------------------------------------------------------------------------------
# Rule compilers: each returns a list of (violates(value), reason).


def _range_checks(r: Any, conv: Callable[[Any], Any], fmt: Callable[[Any], str]) -> list[Check]:
    """PGV's ltgt template (const first), shared by numbers, durations and timestamps."""
    has = r.HasField
    checks: list[Check] = []
    if has("const"):
        c = conv(r.const)
        checks.append((lambda v, c=c: v != c, f"value must equal {fmt(c)}"))
    lt = conv(r.lt) if has("lt") else None
    lte = conv(r.lte) if has("lte") else None
    gt = conv(r.gt) if has("gt") else None
    gte = conv(r.gte) if has("gte") else None
    if lt is not None:
        if gt is not None:
            if lt > gt:
                checks.append(
                    (
                        lambda v, a=gt, b=lt: v <= a or v >= b,
                        f"value must be inside range ({fmt(gt)}, {fmt(lt)})",
                    )
                )
            else:
                checks.append(
                    (
                        lambda v, a=gt, b=lt: b <= v <= a,
                        f"value must be outside range [{fmt(lt)}, {fmt(gt)}]",
                    )
                )
        elif gte is not None:
            if lt > gte:
                checks.append(
                    (
                        lambda v, a=gte, b=lt: v < a or v >= b,
                        f"value must be inside range [{fmt(gte)}, {fmt(lt)})",
                    )
                )
            else:
                checks.append(
                    (
                        lambda v, a=gte, b=lt: b <= v < a,
                        f"value must be outside range [{fmt(lt)}, {fmt(gte)})",
                    )
                )
        else:
            checks.append((lambda v, b=lt: v >= b, f"value must be less than {fmt(lt)}"))
    elif lte is not None:
        if gt is not None:
            if lte > gt:
                checks.append(
                    (
                        lambda v, a=gt, b=lte: v <= a or v > b,
                        f"value must be inside range ({fmt(gt)}, {fmt(lte)}]",
                    )
                )
            else:
                checks.append(
                    (
                        lambda v, a=gt, b=lte: b < v <= a,
                        f"value must be outside range ({fmt(lte)}, {fmt(gt)}]",
                    )
                )
        elif gte is not None:
            if lte > gte:
                checks.append(
                    (
                        lambda v, a=gte, b=lte: v < a or v > b,
                        f"value must be inside range [{fmt(gte)}, {fmt(lte)}]",
                    )
                )
            else:
                checks.append(
                    (
                        lambda v, a=gte, b=lte: b < v < a,
                        f"value must be outside range ({fmt(lte)}, {fmt(gte)})",
                    )
                )
        else:
            checks.append(
                (lambda v, b=lte: v > b, f"value must be less than or equal to {fmt(lte)}")
            )
    elif gt is not None:
        checks.append((lambda v, a=gt: v <= a, f"value must be greater than {fmt(gt)}"))
    elif gte is not None:
        checks.append(
            (lambda v, a=gte: v < a, f"value must be greater than or equal to {fmt(gte)}")
        )
    return checks


def _in_checks(r: Any, conv: Callable[[Any], Any], fmt: Callable[[Any], str]) -> list[Check]:
    checks: list[Check] = []
    values_in = [conv(x) for x in getattr(r, "in")]
    if values_in:
        allowed = frozenset(values_in)
        checks.append(
            (lambda v, s=allowed: v not in s, f"value must be in list {_go_list(values_in, fmt)}")
        )
    else:
        values_out = [conv(x) for x in r.not_in]
        if values_out:
            banned = frozenset(values_out)
            checks.append(
                (
                    lambda v, s=banned: v in s,
                    f"value must not be in list {_go_list(values_out, fmt)}",
                )
            )
    return checks


def _ignore_empty(r: Any, checks: list[Check], empty: Any) -> list[Check]:
    if checks and r.HasField("ignore_empty") and r.ignore_empty:
        return [(lambda v, f=f, e=empty: v != e and f(v), reason) for f, reason in checks]
    return checks


def _number_checks(r: Any) -> list[Check]:
    checks = _range_checks(r, lambda x: x, _go_num)
    checks += _in_checks(r, lambda x: x, _go_num)
    return _ignore_empty(r, checks, 0)


_HEADER_NAME = "^:?[0-9a-zA-Z!#$%&'*+-.^_|~\x60]+$"
_HEADER_VALUE = "^[^\u0000-\u0008\u000a-\u001f\u007f]*$"
_HEADER_STRING = "^[^\u0000\u000a\u000d]*$"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _is_hostname(s: str) -> bool:
    if len(s) > 253:
        return False
    for part in s.split("."):
        if not part or len(part) > 63 or part[0] == "-" or part[-1] == "-":
            return False
        for ch in part:
            if not (ch.isascii() and (ch.isalnum() or ch == "-")):
                return False
    return True


def _is_ip(s: str, version: int = 0) -> bool:
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return False
    return version == 0 or addr.version == version


def _pattern_check(pattern: str) -> Check | None:
    try:
        rx = re.compile(pattern)
    except re.error:
        return None  # an RE2-only construct: leave it to the extension
    return (
        lambda v, m=rx.fullmatch: m(v) is None,
        f"value does not match regex pattern {_go_quote(pattern)}",
    )


def _string_checks(r: Any) -> list[Check]:
    has = r.HasField
    checks: list[Check] = []
    if has("const"):
        c = r.const
        checks.append((lambda v, c=c: v != c, f"value must equal {_go_quote(c)}"))
    checks += _in_checks(r, lambda x: x, str)
    min_len = r.min_len if has("min_len") else None
    max_len = r.max_len if has("max_len") else None
    if has("len") or (min_len is not None and max_len is not None and min_len == max_len):
        n = r.len if has("len") else min_len
        checks.append((lambda v, n=n: len(v) != n, f"value must be {n} characters"))
    elif min_len is not None:
        if max_len is not None:
            checks.append(
                (
                    lambda v, a=min_len, b=max_len: not a <= len(v) <= b,
                    f"value must have between {min_len} and {max_len} characters inclusive",
                )
            )
        else:
            checks.append(
                (
                    lambda v, a=min_len: len(v) < a,
                    f"value length must be at least {min_len} characters",
                )
            )
    elif max_len is not None:
        checks.append(
            (lambda v, b=max_len: len(v) > b, f"value length must be at most {max_len} characters")
        )
    min_b = r.min_bytes if has("min_bytes") else None
    max_b = r.max_bytes if has("max_bytes") else None
    if has("len_bytes") or (min_b is not None and max_b is not None and min_b == max_b):
        n = r.len_bytes if has("len_bytes") else min_b
        checks.append((lambda v, n=n: len(v.encode()) != n, f"value length must be {n} bytes"))
    elif min_b is not None:
        if max_b is not None:
            checks.append(
                (
                    lambda v, a=min_b, b=max_b: not a <= len(v.encode()) <= b,
                    f"value length must be between {min_b} and {max_b} bytes, inclusive",
                )
            )
        else:
            checks.append(
                (
                    lambda v, a=min_b: len(v.encode()) < a,
                    f"value length must be at least {min_b} bytes",
                )
            )
    elif max_b is not None:
        checks.append(
            (
                lambda v, b=max_b: len(v.encode()) > b,
                f"value length must be at most {max_b} bytes",
            )
        )
    if has("prefix") and r.prefix:
        p = r.prefix
        checks.append(
            (lambda v, p=p: not v.startswith(p), f"value does not have prefix {_go_quote(p)}")
        )
    if has("suffix") and r.suffix:
        s = r.suffix
        checks.append(
            (lambda v, s=s: not v.endswith(s), f"value does not have suffix {_go_quote(s)}")
        )
    if has("contains") and r.contains:
        s = r.contains
        checks.append(
            (lambda v, s=s: s not in v, f"value does not contain substring {_go_quote(s)}")
        )
    if has("not_contains") and r.not_contains:
        s = r.not_contains
        checks.append((lambda v, s=s: s in v, f"value contains substring {_go_quote(s)}"))
    pattern: str | None = r.pattern if has("pattern") else None
    known = r.WhichOneof("well_known")
    if known == "well_known_regex" and r.well_known_regex:
        strict = r.strict if has("strict") else True
        if not strict:
            pattern = _HEADER_STRING
        elif r.well_known_regex == validate_pb2.HTTP_HEADER_NAME:
            pattern = _HEADER_NAME
        elif r.well_known_regex == validate_pb2.HTTP_HEADER_VALUE:
            pattern = _HEADER_VALUE
    if pattern:
        pc = _pattern_check(pattern)
        if pc is not None:
            checks.append(pc)
    if known == "ip" and r.ip:
        checks.append((lambda v: not _is_ip(v), "value must be a valid IP Address"))
    elif known == "ipv4" and r.ipv4:
        checks.append((lambda v: not _is_ip(v, 4), "value must be a valid IPv4 Address"))
    elif known == "ipv6" and r.ipv6:
        checks.append((lambda v: not _is_ip(v, 6), "value must be a valid IPv6 Address"))
    elif known == "address" and r.address:
        checks.append(
            (
                lambda v: not _is_hostname(v) and not _is_ip(v),
                "value must be an ip address, or a hostname.",
            )
        )
    elif known == "hostname" and r.hostname:
        checks.append((lambda v: not _is_hostname(v), "value must be a valid hostname"))
    elif known == "uuid" and r.uuid:
        checks.append((lambda v: _UUID.match(v) is None, "value must be a valid UUID"))
    return _ignore_empty(r, checks, "")


def _bytes_checks(r: Any) -> list[Check]:
    has = r.HasField
    checks: list[Check] = []
    if has("const"):
        c = r.const
        checks.append((lambda v, c=c: v != c, f"value must equal {c!r}"))
    checks += _in_checks(r, lambda x: x, repr)
    min_len = r.min_len if has("min_len") else None
    max_len = r.max_len if has("max_len") else None
    if has("len") or (min_len is not None and max_len is not None and min_len == max_len):
        n = r.len if has("len") else min_len
        checks.append((lambda v, n=n: len(v) != n, f"value length must be {n} bytes"))
    elif min_len is not None:
        if max_len is not None:
            checks.append(
                (
                    lambda v, a=min_len, b=max_len: not a <= len(v) <= b,
                    f"value length must be between {min_len} and {max_len} bytes, inclusive",
                )
            )
        else:
            checks.append(
                (lambda v, a=min_len: len(v) < a, f"value length must be at least {min_len} bytes")
            )
    elif max_len is not None:
        checks.append(
            (lambda v, b=max_len: len(v) > b, f"value length must be at most {max_len} bytes")
        )
    if has("prefix") and r.prefix:
        p = r.prefix
        checks.append((lambda v, p=p: not v.startswith(p), f"value does not have prefix {p!r}"))
    if has("suffix") and r.suffix:
        s = r.suffix
        checks.append((lambda v, s=s: not v.endswith(s), f"value does not have suffix {s!r}"))
    if has("contains") and r.contains:
        s = r.contains
        checks.append((lambda v, s=s: s not in v, f"value does not contain substring {s!r}"))
    return _ignore_empty(r, checks, b"")


def _enum_checks(r: Any, enum_desc: Any) -> list[Check]:
    checks: list[Check] = []
    if r.HasField("const"):
        c = r.const
        checks.append((lambda v, c=c: v != c, f"value must equal {c}"))
    checks += _in_checks(r, lambda x: x, str)
    if r.HasField("defined_only") and r.defined_only:
        defined = frozenset(enum_desc.values_by_number)
        checks.append(
            (lambda v, d=defined: v not in d, "value must be one of the defined enum values")
        )
    return checks


def _scalar_checks(rules: Any, fd: FieldDescriptor) -> list[Check]:
    """Checks for one (non-repeated) value of ``fd``'s element type."""
    kind = rules.WhichOneof("type")
    if kind is None:
        return []
    r = getattr(rules, kind)
    if kind == "string":
        return _string_checks(r)
    if kind == "bytes":
        return _bytes_checks(r)
    if kind == "enum":
        return _enum_checks(r, fd.enum_type) if fd.enum_type is not None else []
    if kind == "bool":
        if r.HasField("const"):
            c = r.const
            return [(lambda v, c=c: v != c, f"value must equal {'true' if c else 'false'}")]
        return []
    if kind in (
        "float",
        "double",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "sint32",
        "sint64",
        "fixed32",
        "fixed64",
        "sfixed32",
        "sfixed64",
    ):
        return _number_checks(r)
    return []


# --------------------------------------------------------------------------------------------
# Plans: one per message type.

_REC_NONE, _REC_ONE, _REC_REPEATED, _REC_MAP = 0, 1, 2, 3
_WRAPPERS = frozenset(
    f"google.protobuf.{n}"
    for n in (
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)


class _Entry:
    __slots__ = ("fd", "name", "oneof", "check", "recurse", "deprecated", "required_oneof")

    def __init__(self) -> None:
        self.fd: FieldDescriptor | None = None
        self.name = ""
        self.oneof: str | None = None
        self.check: Callable[[Any], None] | None = None
        self.recurse = _REC_NONE
        self.deprecated = 0  # 1 = warn, 2 = disallowed
        self.required_oneof: str | None = None


class _Plan:
    __slots__ = ("entries", "is_any")

    def __init__(self, entries: tuple[_Entry, ...], is_any: bool = False) -> None:
        self.entries = entries
        self.is_any = is_any


_plans: dict[Any, _Plan] = {}


def _err_name(fd: FieldDescriptor) -> str:
    camel = "".join(p[:1].upper() + p[1:] for p in fd.name.split("_"))
    return f"{fd.containing_type.name}ValidationError.{camel}"


def _raise(reason: str) -> None:
    raise _PgvError(reason)


def _field_check(fd: FieldDescriptor, rules: Any) -> Callable[[Any], None] | None:
    """Compile one field's FieldRules into check(msg) -> None (raises _PgvError)."""
    name = fd.name
    errname = _err_name(fd)
    mt = fd.message_type
    kind = rules.WhichOneof("type")
    msg_rules = rules.message if rules.HasField("message") else None
    required = bool(msg_rules is not None and msg_rules.required)

    if fd.is_repeated and mt is not None and mt.GetOptions().map_entry:
        return _map_check(fd, rules, errname)
    if fd.is_repeated:
        return _repeated_check(fd, rules, errname)

    if mt is not None:
        full = mt.full_name
        if full in _WRAPPERS:
            checks = _scalar_checks(rules, mt.fields_by_name["value"])
            if not checks and not required:
                return None
            missing = "value is required and must not be nil." if checks else "value is required"

            def check_wrapper(msg: Any) -> None:
                if msg.HasField(name):
                    v = getattr(msg, name).value
                    for bad, reason in checks:
                        if bad(v):
                            _raise(f"{errname}: {reason}")
                elif required:
                    # PGV's wrapper template words it differently from the message template.
                    _raise(f"{errname}: {missing}")

            return check_wrapper
        if full == "google.protobuf.Duration" and kind == "duration":
            r = rules.duration
            dur_required = r.HasField("required") and r.required
            checks = _range_checks(r, _dur_ns, _go_duration)
            checks += _in_checks(r, _dur_ns, _go_duration)
            if not checks and not dur_required and not required:
                return None

            def check_duration(msg: Any) -> None:
                if msg.HasField(name):
                    v = _dur_ns(getattr(msg, name))
                    for bad, reason in checks:
                        if bad(v):
                            _raise(f"{errname}: {reason}")
                elif dur_required or required:
                    _raise(f"{errname}: value is required")

            return check_duration
        if full == "google.protobuf.Timestamp" and kind == "timestamp":
            ts_required = rules.timestamp.HasField("required") and rules.timestamp.required
            if not ts_required and not required:
                return None

            def check_timestamp(msg: Any) -> None:
                if not msg.HasField(name):
                    _raise(f"{errname}: value is required")

            return check_timestamp
        if full == "google.protobuf.Any" and kind == "any":
            r = rules.any
            any_required = (r.HasField("required") and r.required) or required
            urls_in = list(getattr(r, "in"))
            urls_out = list(r.not_in)

            def check_any(msg: Any) -> None:
                if not msg.HasField(name):
                    if any_required:
                        _raise(f"{errname}: value is required")
                    return
                url = getattr(msg, name).type_url
                if urls_in and url not in urls_in:
                    _raise(f"{errname}: type URL must be in list {_go_list(urls_in, str)}")
                if urls_out and url in urls_out:
                    _raise(f"{errname}: type URL must not be in list {_go_list(urls_out, str)}")

            return check_any
        if not required:
            return None

        def check_required(msg: Any) -> None:
            if not msg.HasField(name):
                _raise(f"{errname}: value is required")

        return check_required

    checks = _scalar_checks(rules, fd)
    if not checks:
        return None
    if len(checks) == 1:
        bad1, reason1 = checks[0]
        text1 = f"{errname}: {reason1}"

        def check_one(msg: Any) -> None:
            if bad1(getattr(msg, name)):
                _raise(text1)

        return check_one

    def check_scalar(msg: Any) -> None:
        v = getattr(msg, name)
        for bad, reason in checks:
            if bad(v):
                _raise(f"{errname}: {reason}")

    return check_scalar


def _count_checks(lo: int | None, hi: int | None, unit: str, plural: str) -> list[Check]:
    """PGV's min/max count rules for repeated items and map pairs, in its wording."""
    if lo:
        if hi is not None and lo == hi:
            return [(lambda n, a=lo: n != a, f"value must contain exactly {lo} {unit}")]
        if hi:
            return [
                (
                    lambda n, a=lo, b=hi: n < a or n > b,
                    f"value must contain between {lo} and {hi} {plural}, inclusive",
                )
            ]
        return [(lambda n, a=lo: n < a, f"value must contain at least {lo} {unit}")]
    if hi:
        return [(lambda n, b=hi: n > b, f"value must contain no more than {hi} {unit}")]
    return []


def _repeated_check(fd: FieldDescriptor, rules: Any, errname: str) -> Callable[[Any], None] | None:
    if rules.WhichOneof("type") != "repeated":
        return None
    r = rules.repeated
    name = fd.name
    has = r.HasField
    count_checks = _count_checks(
        r.min_items if has("min_items") else None,
        r.max_items if has("max_items") else None,
        "item(s)",
        "items",
    )
    unique = has("unique") and r.unique
    item_checks: list[Check] = []
    if r.HasField("items") and fd.message_type is None:
        item_checks = _scalar_checks(r.items, fd)
    ignore_empty = has("ignore_empty") and r.ignore_empty
    if not count_checks and not unique and not item_checks:
        return None

    def check_repeated(msg: Any) -> None:
        values = getattr(msg, name)
        n = len(values)
        if ignore_empty and n == 0:
            return
        for bad, reason in count_checks:
            if bad(n):
                _raise(f"{errname}: {reason}")
        if unique:
            seen: set[Any] = set()
            for i, v in enumerate(values):
                key = v.SerializeToString(deterministic=True) if fd.message_type else v
                if key in seen:
                    raise _PgvError(
                        f"{errname}[{i}]: repeated value must contain unique items", [i]
                    )
                seen.add(key)
        if item_checks:
            for i, v in enumerate(values):
                for bad, reason in item_checks:
                    if bad(v):
                        raise _PgvError(f"{errname}[{i}]: {reason}", [i])

    return check_repeated


def _map_check(fd: FieldDescriptor, rules: Any, errname: str) -> Callable[[Any], None] | None:
    if rules.WhichOneof("type") != "map":
        return None
    r = rules.map
    name = fd.name
    has = r.HasField
    entry = fd.message_type
    count_checks = _count_checks(
        r.min_pairs if has("min_pairs") else None,
        r.max_pairs if has("max_pairs") else None,
        "pair(s)",
        "pairs",
    )
    key_checks = _scalar_checks(r.keys, entry.fields_by_name["key"]) if has("keys") else []
    val_fd = entry.fields_by_name["value"]
    val_checks = (
        _scalar_checks(r.values, val_fd) if has("values") and val_fd.message_type is None else []
    )
    ignore_empty = has("ignore_empty") and r.ignore_empty
    if not count_checks and not key_checks and not val_checks:
        return None

    def check_map(msg: Any) -> None:
        values = getattr(msg, name)
        n = len(values)
        if ignore_empty and n == 0:
            return
        for bad, reason in count_checks:
            if bad(n):
                _raise(f"{errname}: {reason}")
        for k in values:
            for bad, reason in key_checks:
                if bad(k):
                    raise _PgvError(f"{errname}[{k}]: {reason}", [_Key(k)])
            if val_checks:
                v = values[k]
                for bad, reason in val_checks:
                    if bad(v):
                        raise _PgvError(f"{errname}[{k}]: {reason}", [_Key(k)])

    return check_map


def _recurse_kind(fd: FieldDescriptor, rules: Any) -> int:
    mt = fd.message_type
    if mt is None:
        return _REC_NONE
    if rules is not None and rules.HasField("message") and rules.message.skip:
        return _REC_NONE
    if fd.is_repeated and mt.GetOptions().map_entry:
        vt = mt.fields_by_name["value"].message_type
        if vt is None or _is_plain_wkt(vt.full_name):
            return _REC_NONE
        return _REC_MAP
    if _is_plain_wkt(mt.full_name):
        return _REC_NONE
    return _REC_REPEATED if fd.is_repeated else _REC_ONE


def _is_plain_wkt(full_name: str) -> bool:
    return full_name.startswith("google.protobuf.") and full_name != "google.protobuf.Any"


def _build_plan(desc: Descriptor) -> _Plan:
    if desc.full_name == "google.protobuf.Any":
        return _Plan((), is_any=True)
    mopts = desc.GetOptions()
    if (mopts.HasExtension(validate_pb2.disabled) and mopts.Extensions[validate_pb2.disabled]) or (
        mopts.HasExtension(validate_pb2.ignored) and mopts.Extensions[validate_pb2.ignored]
    ):
        return _Plan(())
    plain: list[_Entry] = []
    by_oneof: dict[str, list[_Entry]] = {}
    oneof_order: list[str] = []
    for fd in desc.fields:
        fopts = fd.GetOptions()
        rules = (
            fopts.Extensions[validate_pb2.rules] if fopts.HasExtension(validate_pb2.rules) else None
        )
        e = _Entry()
        e.fd = fd
        e.name = fd.name
        e.check = _field_check(fd, rules) if rules is not None else None
        e.recurse = _recurse_kind(fd, rules)
        if fopts.deprecated:
            disallowed = (
                fopts.HasExtension(deprecation_pb2.disallowed_by_default)
                and fopts.Extensions[deprecation_pb2.disallowed_by_default]
            )
            e.deprecated = 2 if disallowed else 1
        if e.check is None and e.recurse == _REC_NONE and not e.deprecated:
            e = None  # type: ignore[assignment]
        oneof = fd.containing_oneof
        if oneof is not None:
            if oneof.name not in by_oneof:
                by_oneof[oneof.name] = []
                oneof_order.append(oneof.name)
            if e is not None:
                e.oneof = oneof.name
                by_oneof[oneof.name].append(e)
        elif e is not None:
            plain.append(e)
    entries = list(plain)
    for oneof_name in oneof_order:
        entries.extend(by_oneof[oneof_name])
        oopts = desc.oneofs_by_name[oneof_name].GetOptions()
        if oopts.HasExtension(validate_pb2.required) and oopts.Extensions[validate_pb2.required]:
            req = _Entry()
            req.required_oneof = oneof_name
            entries.append(req)
    return _Plan(tuple(entries))


def _plan(desc: Descriptor) -> _Plan:
    plan = _plans.get(desc)
    if plan is None:
        plan = _plans[desc] = _build_plan(desc)
    return plan


# --------------------------------------------------------------------------------------------
# Walking.


def _is_set(msg: Any, fd: FieldDescriptor) -> bool:
    if fd.is_repeated:
        return len(getattr(msg, fd.name)) > 0
    if fd.has_presence:
        return bool(msg.HasField(fd.name))
    return bool(getattr(msg, fd.name) != fd.default_value)


def _deprecation(msg: Any, fd: FieldDescriptor, level: int) -> None:
    if not _is_set(msg, fd):
        return
    owner = fd.containing_type.full_name
    text = (
        f"type {owner} Using deprecated option '{fd.full_name}' from file "
        f"{os.path.basename(fd.file.name)}. {_DEPRECATION_TAIL}"
    )
    if level == 2:
        raise PathError(text)
    if not _skip_deprecated_logs and fd.full_name not in _warned_deprecated:
        _warned_deprecated.add(fd.full_name)
        misc_log.warning("Deprecated field: %s", text)


def _unpack_for_validation(any_msg: Any) -> Message | None:
    url = any_msg.type_url
    if not url:
        return None
    cls = message_class_for_type_url(url)
    if cls is None:
        raise PathError(f"could not find @type '{url}'")
    inner = cls()
    try:
        inner.ParseFromString(any_msg.value)
    except DecodeError as e:
        raise PathError(f"unable to decode {cls.DESCRIPTOR.full_name}: {e}") from None
    if cls.DESCRIPTOR.full_name in TYPED_STRUCT_TYPES:
        inner_url = inner.type_url  # type: ignore[attr-defined]
        target = message_class_for_type_url(inner_url) if inner_url else None
        if target is None:
            raise PathError(f"could not find @type '{inner_url}' (in TypedStruct)")
        converted = target()
        try:
            _merge_message(converted, _struct_to_py(inner.value), _STRICT)  # type: ignore[attr-defined]
        except PathError as e:
            e.segs.append("value")
            raise
        return converted
    return inner


def _walk(msg: Any) -> None:
    plan = _plan(msg.DESCRIPTOR)
    if plan.is_any:
        inner = _unpack_for_validation(msg)
        if inner is not None:
            _walk(inner)
        return
    for e in plan.entries:
        oneof_name = e.required_oneof
        if oneof_name is not None:
            if msg.WhichOneof(oneof_name) is None:
                raise _PgvError(f'field: "{oneof_name}", reason: is required')
            continue
        name = e.name
        if e.oneof is not None and msg.WhichOneof(e.oneof) != name:
            continue
        try:
            if e.deprecated:
                _deprecation(msg, e.fd, e.deprecated)  # type: ignore[arg-type]
            if e.check is not None:
                e.check(msg)
            rec = e.recurse
            if rec == _REC_ONE:
                if msg.HasField(name):
                    _walk(getattr(msg, name))
            elif rec == _REC_REPEATED:
                for i, item in enumerate(getattr(msg, name)):
                    try:
                        _walk(item)
                    except PathError as err:
                        err.segs.append(i)
                        raise
            elif rec == _REC_MAP:
                values = getattr(msg, name)
                for k in values:
                    try:
                        _walk(values[k])
                    except PathError as err:
                        err.segs.append(_Key(k))
                        raise
        except PathError as err:
            err.segs.append(name)
            raise


def validate_message(msg: Message, path: str = "", *, source_text: str | None = None) -> None:
    """Check ``msg`` (and everything under it, Any contents included) against its PGV rules.

    Raises ConfigError(message, path) where the message reads like Envoy's
    ``Proto constraint validation failed (ClusterValidationError.Name: value length must be
    at least 1 characters)``. ``source_text`` (the YAML the message came from) adds a line.
    """
    try:
        _walk(msg)
    except PathError as e:
        segs = list(reversed(e.segs))
        full = format_path(segs)
        if path:
            full = f"{path}.{full}" if full and not full.startswith("[") else f"{path}{full}"
        message = (
            f"Proto constraint validation failed ({e.message})"
            if isinstance(e, _PgvError)
            else e.message
        )
        if source_text is not None:
            line = _line_of(source_text, segs)
            if line is not None:
                message = f"{message} (line {line})"
        raise ConfigError(message, full) from None
