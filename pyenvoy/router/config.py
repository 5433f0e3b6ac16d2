"""RouteConfiguration -> immutable route table (Envoy's ``ConfigImpl``/``RouteMatcher``).

Strategy: ``RouteTable.from_proto`` walks the proto once and builds slotted runtime objects;
protobuf never reaches the hot path. Every matcher is precompiled into a plain closure
(``bytes -> bool`` or ``headers -> bool``), regexes are compiled once as ``bytes`` patterns
(RE2 syntax, checked for constructs Python's ``re`` would read differently), header values
become compiled ``Formatter`` objects. Each proto message is checked against an allow-list of
fields: a field pyenvoy does not implement (and that would change behaviour) is a ConfigError
naming its path, never a silent no-op.

Lookup follows Envoy 1.40 as observed on the real binary: virtual host by exact domain, then
longest suffix wildcard, then longest prefix wildcard, then ``*`` (case-insensitive, the port is
NOT stripped unless ``ignore_port_in_host_matching``); then the first route whose path,
runtime fraction, gRPC, header and query matchers all pass. Path matchers see the path without
query and fragment. A header matcher on a multi-valued header matches when ANY value matches
(Envoy 1.40 behaviour; it no longer joins the values with ","), then ``invert_match`` applies.

Header mutations follow Envoy's HeaderParser: per level, removals first, then every value is
formatted against the unmodified headers, then overwrites (remove + append), then appends.
Levels run route -> virtual host -> route configuration (the later one wins), or the reverse
with ``most_specific_header_mutations_wins``.

The router filter's order for a forwarded request is ``finalize_request_headers`` (header
mutations, then host rewrites) then ``rewrite_path``: Envoy formats header values before it
rewrites :path. For a redirect or direct response: ``location(headers)`` (pure; it applies the
redirect's own path rewrite), then optionally ``rewrite_path`` (Envoy also rewrites the
request's :path for a redirect, which access logs show), then ``finalize_response_headers``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from envoy.config.route.v3 import route_pb2

from pyenvoy.config.errors import ConfigError
from pyenvoy.formatter import Formatter, compile_format
from pyenvoy.http.headers import HeaderMap, RequestHeaders, ResponseHeaders
from pyenvoy.stream_info import StreamInfo

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "HeaderMutations",
    "RedirectAction",
    "Route",
    "RouteTable",
    "VirtualHost",
    "WeightedCluster",
    "compile_regex",
]

DEFAULT_ROUTE_TIMEOUT = 15.0
DEFAULT_MAX_DIRECT_RESPONSE_BODY_SIZE_BYTES = 4096

# HeaderValueOption.HeaderAppendAction
APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3

_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
_CLUSTER_NOT_FOUND_CODES = {0: 503, 1: 404, 2: 500}
_FRACTION_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}

HeaderMatch = Callable[[RequestHeaders], bool]


# --- field allow-lists ------------------------------------------------------------------------


def _check_fields(msg: Any, allowed: frozenset[str], path: str) -> None:
    """Reject any set field of ``msg`` that pyenvoy does not implement."""
    for field, _ in msg.ListFields():
        if field.name not in allowed:
            raise ConfigError(
                f"{field.name} is not supported by pyenvoy yet", _join(path, field.name)
            )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_RC_FIELDS = frozenset(
    {
        "name",
        "virtual_hosts",
        "internal_only_headers",
        "response_headers_to_add",
        "response_headers_to_remove",
        "request_headers_to_add",
        "request_headers_to_remove",
        "most_specific_header_mutations_wins",
        "validate_clusters",
        "max_direct_response_body_size_bytes",
        "request_mirror_policies",
        "ignore_port_in_host_matching",
        "vhost_header",
        "ignore_path_parameters_in_path_matching",
        "typed_per_filter_config",
        "metadata",
    }
)
_VH_FIELDS = frozenset(
    {
        "name",
        "domains",
        "routes",
        "require_tls",
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
        "typed_per_filter_config",
        "include_request_attempt_count",
        "include_attempt_count_in_response",
        "include_is_timeout_retry_header",
        "retry_policy",
        "request_mirror_policies",
        "per_request_buffer_limit_bytes",
        "request_body_buffer_limit",
        "metadata",
    }
)
_ROUTE_FIELDS = frozenset(
    {
        "name",
        "match",
        "route",
        "redirect",
        "direct_response",
        "metadata",
        "decorator",
        "typed_per_filter_config",
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
        "tracing",
        "per_request_buffer_limit_bytes",
        "request_body_buffer_limit",
    }
)
_MATCH_FIELDS = frozenset(
    {
        "prefix",
        "path",
        "safe_regex",
        "connect_matcher",
        "path_separated_prefix",
        "case_sensitive",
        "runtime_fraction",
        "headers",
        "query_parameters",
        "grpc",
    }
)
_ACTION_FIELDS = frozenset(
    {
        "cluster",
        "cluster_header",
        "weighted_clusters",
        "cluster_not_found_response_code",
        "prefix_rewrite",
        "regex_rewrite",
        "host_rewrite_literal",
        "auto_host_rewrite",
        "host_rewrite_header",
        "host_rewrite_path_regex",
        "append_x_forwarded_host",
        "timeout",
        "idle_timeout",
        "retry_policy",
        "request_mirror_policies",
        "priority",
        "hash_policy",
        "upgrade_configs",
        "include_vh_rate_limits",
        "max_stream_duration",
    }
)
_REDIRECT_FIELDS = frozenset(
    {
        "https_redirect",
        "scheme_redirect",
        "host_redirect",
        "port_redirect",
        "path_redirect",
        "prefix_rewrite",
        "regex_rewrite",
        "response_code",
        "strip_query",
    }
)
_DIRECT_FIELDS = frozenset({"status", "body"})
_STRING_MATCHER_FIELDS = frozenset(
    {"exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case"}
)
_REGEX_FIELDS = frozenset({"regex", "google_re2"})
_HVO_FIELDS = frozenset({"header", "append", "append_action", "keep_empty_value"})
_WEIGHTED_FIELDS = frozenset({"clusters", "total_weight", "runtime_key_prefix", "header_name"})
_CLUSTER_WEIGHT_FIELDS = frozenset(
    {
        "name",
        "cluster_header",
        "weight",
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
        "typed_per_filter_config",
        "host_rewrite_literal",
    }
)
_MIRROR_FIELDS = frozenset({"cluster", "cluster_header", "runtime_fraction", "trace_sampled"})


# --- regexes (RE2 syntax on Python's re) -------------------------------------------------------

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}


def _translate_re2(pattern: str) -> str:
    """Translate RE2 syntax to Python ``re``; raise ValueError for what differs and can't be.

    A small scanner (escapes and character classes aware) rather than a full parser: it
    catches the constructs where the two engines disagree (lookaround, backreferences,
    possessive/atomic forms, ``\\z``/``\\Z``, ``\\p{..}``, POSIX classes, ``(?<name>``).
    """
    out: list[str] = []
    i = 0
    n = len(pattern)
    in_class = False
    prev_quantifier = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing \\")
            e = pattern[i + 1]
            if e.isdigit() and e != "0":
                raise ValueError(f"invalid escape sequence: \\{e}")
            if e in "pPQEC":
                raise ValueError(f"\\{e} is not supported by pyenvoy's regex engine")
            if e == "x" and i + 2 < n and pattern[i + 2] == "{":
                raise ValueError("\\x{...} is not supported by pyenvoy's regex engine")
            if e == "Z":
                raise ValueError("invalid escape sequence: \\Z")
            out.append("\\Z" if e == "z" and not in_class else pattern[i : i + 2])
            i += 2
            prev_quantifier = False
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                if end < 0:
                    raise ValueError("missing ]: [:")
                name = pattern[i + 2 : end]
                if name not in _POSIX_CLASSES:
                    raise ValueError(f"invalid character class range: [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                i = end + 2
                continue
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":  # a leading ']' is a literal
                out.append("\\]")
                i += 1
            prev_quantifier = False
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 : i + 4]
            if rest[:1] in ("=", "!") or rest in ("<=", "<!"):
                raise ValueError("lookaround assertions are not supported (RE2)")
            if rest[:1] in (">", "("):
                raise ValueError("atomic groups and conditionals are not supported (RE2)")
            if rest[:1] == "<":
                out.append("(?P<")
                i += 3
                prev_quantifier = False
                continue
            if rest[:1] == "U" or "U" in pattern[i + 2 : pattern.find(")", i)].split(":")[0]:
                raise ValueError("the U (ungreedy) flag is not supported by pyenvoy's regex engine")
        if c == "+" and prev_quantifier:
            raise ValueError("bad repetition operator: possessive quantifier")
        prev_quantifier = c in "*+?}"
        if c == "?" and out and out[-1] in ("*", "+", "?", "}"):
            prev_quantifier = True  # lazy quantifier: a following '+' is still invalid
        out.append(c)
        i += 1
    return "".join(out)


def compile_regex(pattern: str, path: str = "") -> re.Pattern[bytes]:
    """Compile an RE2 pattern (Envoy's safe_regex) for ``fullmatch``/``sub`` on bytes."""
    try:
        return re.compile(_translate_re2(pattern).encode("utf-8"))
    except (ValueError, re.error) as e:
        raise ConfigError(f"invalid regex '{pattern}': {e}", path) from None


def _regex_of(msg: Any, path: str) -> re.Pattern[bytes]:
    _check_fields(msg, _REGEX_FIELDS, path)
    return compile_regex(msg.regex, _join(path, "regex"))


def _substitution(template: str, regex: re.Pattern[bytes]) -> Callable[[re.Match[bytes]], bytes]:
    """RE2 rewrite strings: ``\\0``..``\\9`` name groups, ``\\\\`` is a backslash."""
    pieces: list[bytes | int] = []
    lit = bytearray()
    raw = template.encode("utf-8")
    i = 0
    valid = True
    while i < len(raw):
        b = raw[i]
        if b == 0x5C and i + 1 < len(raw):
            nxt = raw[i + 1]
            if 0x30 <= nxt <= 0x39:
                if lit:
                    pieces.append(bytes(lit))
                    lit.clear()
                group = nxt - 0x30
                if group > regex.groups:
                    valid = False  # RE2 refuses the rewrite; Envoy leaves the text unchanged
                pieces.append(group)
                i += 2
                continue
            if nxt == 0x5C:
                lit.append(0x5C)
                i += 2
                continue
            valid = False
        lit.append(b)
        i += 1
    if lit:
        pieces.append(bytes(lit))
    if not valid:
        return lambda m: m.group(0)
    frozen = tuple(pieces)

    def replace(m: re.Match[bytes]) -> bytes:
        return b"".join(p if isinstance(p, bytes) else (m.group(p) or b"") for p in frozen)

    return replace


class _RegexRewrite:
    __slots__ = ("regex", "replace")

    def __init__(self, msg: Any, path: str) -> None:
        if not msg.HasField("pattern"):
            raise ConfigError("pattern is required", _join(path, "pattern"))
        self.regex = _regex_of(msg.pattern, _join(path, "pattern"))
        self.replace = _substitution(msg.substitution, self.regex)

    def apply(self, text: bytes) -> bytes:
        return self.regex.sub(self.replace, text)


# --- string / header / query matchers ----------------------------------------------------------


def _string_matcher(msg: Any, path: str) -> Callable[[bytes], bool]:
    _check_fields(msg, _STRING_MATCHER_FIELDS, path)
    kind = msg.WhichOneof("match_pattern")
    ignore_case = msg.ignore_case
    if kind is None:
        raise ConfigError('field: "match_pattern", reason: is required', path)
    if kind == "safe_regex":
        if ignore_case:
            raise ConfigError("ignore_case has no effect for safe_regex.", path)
        regex = _regex_of(msg.safe_regex, _join(path, "safe_regex"))
        fullmatch = regex.fullmatch
        return lambda v: fullmatch(v) is not None
    value = getattr(msg, kind)
    if kind != "exact" and not value:
        raise ConfigError(f"{kind}: value length must be at least 1 characters", _join(path, kind))
    expected = value.encode("utf-8")
    if ignore_case:
        low = expected.lower()
        if kind == "exact":
            return lambda v: v.lower() == low
        if kind == "prefix":
            return lambda v: v.lower().startswith(low)
        if kind == "suffix":
            return lambda v: v.lower().endswith(low)
        return lambda v: low in v.lower()
    if kind == "exact":
        return lambda v: v == expected
    if kind == "prefix":
        return lambda v: v.startswith(expected)
    if kind == "suffix":
        return lambda v: v.endswith(expected)
    return lambda v: expected in v


_INT_RE = re.compile(rb"^[ \t]*[+-]?[0-9]+[ \t]*$")


def _header_values(headers: RequestHeaders, name: bytes) -> list[bytes]:
    if name[:1] == b":" or name == b"host":
        value = headers.get(name)
        return [] if value is None else [value]
    return [h[1] for h in headers.headers if h[0] == name]


def _header_matcher(msg: Any, path: str) -> HeaderMatch:
    if not msg.name:
        raise ConfigError("name: value length must be at least 1 characters", _join(path, "name"))
    name = msg.name.lower().encode()
    invert = msg.invert_match
    treat_missing = msg.treat_missing_header_as_empty
    kind = msg.WhichOneof("header_match_specifier")
    value_match: Callable[[bytes], bool]
    if kind is None or kind == "present_match":
        want = True if kind is None else msg.present_match

        def present(headers: RequestHeaders) -> bool:
            found = bool(_header_values(headers, name)) or treat_missing
            return (found == want) != invert

        return present
    if kind == "string_match":
        value_match = _string_matcher(msg.string_match, _join(path, "string_match"))
    elif kind == "exact_match":
        exact = msg.exact_match.encode()
        value_match = (lambda v: True) if not exact else (lambda v: v == exact)
    elif kind == "safe_regex_match":
        fullmatch = _regex_of(msg.safe_regex_match, _join(path, "safe_regex_match")).fullmatch
        value_match = lambda v: fullmatch(v) is not None  # noqa: E731
    elif kind in ("prefix_match", "suffix_match", "contains_match"):
        expected = getattr(msg, kind).encode()
        if not expected:
            raise ConfigError(
                f"{kind}: value length must be at least 1 characters", _join(path, kind)
            )
        if kind == "prefix_match":
            value_match = lambda v: v.startswith(expected)  # noqa: E731
        elif kind == "suffix_match":
            value_match = lambda v: v.endswith(expected)  # noqa: E731
        else:
            value_match = lambda v: expected in v  # noqa: E731
    elif kind == "range_match":
        start, end = msg.range_match.start, msg.range_match.end

        def in_range(v: bytes) -> bool:
            if not _INT_RE.match(v):
                return False
            n = int(v)
            return -(1 << 63) <= n < (1 << 63) and start <= n < end

        value_match = in_range
    else:  # pragma: no cover - new oneof member in a future xds-protos
        raise ConfigError(f"{kind} is not supported by pyenvoy yet", _join(path, kind))

    def match(headers: RequestHeaders) -> bool:
        values = _header_values(headers, name)
        if not values:
            if not treat_missing:
                return False
            values = [b""]
        for v in values:
            if value_match(v):
                return not invert
        return invert

    return match


def _parse_query(path: bytes) -> dict[bytes, bytes]:
    """First value of each query parameter, undecoded (Envoy's parseQueryString)."""
    q = path.find(b"?")
    if q < 0:
        return {}
    query = path[q + 1 :]
    h = query.find(b"#")
    if h >= 0:
        query = query[:h]
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        if key not in params:
            params[key] = value
    return params


def _query_matcher(msg: Any, path: str) -> Callable[[dict[bytes, bytes]], bool]:
    if not msg.name:
        raise ConfigError("name: value length must be at least 1 characters", _join(path, "name"))
    name = msg.name.encode()
    kind = msg.WhichOneof("query_parameter_match_specifier")
    if kind == "string_match":
        sm = _string_matcher(msg.string_match, _join(path, "string_match"))

        def string_match(params: dict[bytes, bytes]) -> bool:
            value = params.get(name)
            return value is not None and sm(value)

        return string_match
    want = msg.present_match if kind == "present_match" else True
    return lambda params: (name in params) == want


# --- header mutations ----------------------------------------------------------------------------


class HeaderMutations:
    """One level's ``*_headers_to_add`` / ``*_headers_to_remove`` (Envoy's HeaderParser)."""

    __slots__ = ("to_add", "to_remove")

    def __init__(
        self,
        to_add: tuple[tuple[bytes, Formatter, int, bool], ...] = (),
        to_remove: tuple[bytes, ...] = (),
    ) -> None:
        self.to_add = to_add
        self.to_remove = to_remove

    def __bool__(self) -> bool:
        return bool(self.to_add or self.to_remove)

    @classmethod
    def from_proto(
        cls, adds: Any, removes: Any, path: str, add_field: str, remove_field: str
    ) -> HeaderMutations:
        to_add: list[tuple[bytes, Formatter, int, bool]] = []
        for i, hvo in enumerate(adds):
            p = f"{_join(path, add_field)}[{i}]"
            _check_fields(hvo, _HVO_FIELDS, p)
            key = hvo.header.key
            if not key:
                raise ConfigError(
                    "key: value length must be at least 1 characters", f"{p}.header.key"
                )
            if any(c in key for c in "\x00\r\n"):
                raise ConfigError("key: contains NUL, CR or LF", f"{p}.header.key")
            if key.startswith(":") or key.lower() == "host":
                raise ConfigError(
                    ":-prefixed or host headers may not be modified", f"{p}.header.key"
                )
            value = hvo.header.value
            if any(c in value for c in "\x00\r\n"):
                raise ConfigError("value: contains NUL, CR or LF", f"{p}.header.value")
            if hvo.HasField("append"):
                if hvo.append_action != APPEND_IF_EXISTS_OR_ADD:
                    raise ConfigError(
                        "Both append and append_action are set and it's not allowed", p
                    )
                action = APPEND_IF_EXISTS_OR_ADD if hvo.append.value else OVERWRITE_IF_EXISTS_OR_ADD
            else:
                action = hvo.append_action
            # raw_value is ignored, as in Envoy 1.40 (only `value` goes through the formatter).
            fmt = compile_format(value, omit_empty_values=True, path=f"{p}.header.value")
            to_add.append((key.lower().encode(), fmt, action, hvo.keep_empty_value))
        to_remove: list[bytes] = []
        for i, name in enumerate(removes):
            if not name:
                raise ConfigError(
                    "value length must be at least 1 characters",
                    f"{_join(path, remove_field)}[{i}]",
                )
            if name.startswith(":") or name.lower() == "host":
                raise ConfigError(
                    ":-prefixed or host headers may not be removed",
                    f"{_join(path, remove_field)}[{i}]",
                )
            to_remove.append(name.lower().encode())
        return cls(tuple(to_add), tuple(to_remove))

    def apply(
        self,
        headers: HeaderMap,
        stream_info: StreamInfo,
        request_headers: RequestHeaders | None,
        response_headers: ResponseHeaders | None,
    ) -> None:
        for name in self.to_remove:
            headers.remove(name)
        if not self.to_add:
            return
        overwrite: list[tuple[bytes, bytes]] = []
        append: list[tuple[bytes, bytes]] = []
        for name, fmt, action, keep_empty in self.to_add:
            value = (
                fmt.literal
                if fmt.is_literal
                else fmt.format_bytes(stream_info, request_headers, response_headers)
            )
            if not value and not keep_empty:
                continue
            if action == APPEND_IF_EXISTS_OR_ADD:
                append.append((name, value))
            elif action == ADD_IF_ABSENT:
                if name not in headers:
                    append.append((name, value))
            elif action == OVERWRITE_IF_EXISTS:
                if name in headers:
                    overwrite.append((name, value))
            else:
                overwrite.append((name, value))
        for name, value in overwrite:  # Envoy's setReferenceKey: remove, then append
            headers.remove(name)
            headers.add(name, value)
        for name, value in append:
            headers.add(name, value)


_EMPTY_MUTATIONS = HeaderMutations()


def _mutations(msg: Any, path: str, kind: str) -> HeaderMutations:
    return HeaderMutations.from_proto(
        getattr(msg, f"{kind}_headers_to_add"),
        getattr(msg, f"{kind}_headers_to_remove"),
        path,
        f"{kind}_headers_to_add",
        f"{kind}_headers_to_remove",
    )


def _per_filter(msg: Any) -> dict[str, Any]:
    return {name: any_msg for name, any_msg in msg.typed_per_filter_config.items()}


# --- paths, hosts, redirects ------------------------------------------------------------------


def _strip_query(path: bytes) -> bytes:
    """Envoy's PathUtil::removeQueryAndFragment (cut at the first '?' or '#')."""
    return path.partition(b"?")[0].partition(b"#")[0]


def _port_start(host: bytes) -> int:
    """Envoy's HeaderUtility::getPortStart: index of the ':' before the port, or -1."""
    colon = host.rfind(b":")
    if colon < 0:
        return -1
    bracket = host.rfind(b"]")
    if bracket < 0 or bracket < colon:
        return colon
    return -1


def _forwarded_proto(headers: RequestHeaders) -> bytes:
    proto = HeaderMap.get(headers, b"x-forwarded-proto")
    return proto if proto is not None else headers.scheme


class RedirectAction:
    """Route.redirect: builds the Location value the way Envoy's ``newPath`` does."""

    __slots__ = (
        "response_code",
        "scheme_redirect",
        "https_redirect",
        "host_redirect",
        "port_redirect",
        "path_redirect",
        "strip_query",
        "prefix_rewrite",
        "regex_rewrite",
        "_path_has_query",
        "_ssl_only",
        "_path_rewrite",
    )

    def __init__(self) -> None:
        self.response_code = 301
        self.scheme_redirect: bytes = b""
        self.https_redirect = False
        self.host_redirect: bytes = b""
        self.port_redirect = 0
        self.path_redirect: bytes = b""
        self.strip_query = False
        self.prefix_rewrite: bytes = b""
        self.regex_rewrite: _RegexRewrite | None = None
        self._path_has_query = False
        self._ssl_only = False
        self._path_rewrite: Callable[[bytes], bytes] | None = None

    @classmethod
    def from_proto(cls, msg: Any, path: str) -> RedirectAction:
        _check_fields(msg, _REDIRECT_FIELDS, path)
        self = cls()
        self.response_code = _REDIRECT_CODES.get(msg.response_code, 301)
        self.scheme_redirect = msg.scheme_redirect.lower().encode()
        self.https_redirect = msg.https_redirect
        self.host_redirect = msg.host_redirect.encode()
        self.port_redirect = msg.port_redirect
        self.path_redirect = msg.path_redirect.encode()
        self._path_has_query = b"?" in self.path_redirect
        self.strip_query = msg.strip_query
        self.prefix_rewrite = msg.prefix_rewrite.encode()
        if msg.HasField("regex_rewrite"):
            self.regex_rewrite = _RegexRewrite(msg.regex_rewrite, _join(path, "regex_rewrite"))
        return self

    @classmethod
    def ssl_redirect(cls) -> RedirectAction:
        """The redirect a ``require_tls`` virtual host answers plain-text requests with."""
        self = cls()
        self._ssl_only = True
        return self

    def location(self, headers: RequestHeaders) -> bytes:
        """The Location value for this request, computed from the request as received.

        Pure: it applies the redirect's own prefix_rewrite/regex_rewrite itself, so call it
        BEFORE ``Route.rewrite_path`` (which, like Envoy, also rewrites the request's :path of
        a redirect so access logs show it) or do not call ``rewrite_path`` at all.
        """
        if self._ssl_only:  # Http::Utility::createSslRedirectPath
            return b"https://" + headers.authority + headers.path
        rewrite = self._path_rewrite
        current = headers.path if rewrite is None else rewrite(headers.path)
        return _new_path(self, headers, current)


def _new_path(redirect: RedirectAction | None, headers: RequestHeaders, current: bytes) -> bytes:
    """Envoy's RouteEntryImplBase::newPath; ``redirect`` None is a plain direct response."""
    if redirect is not None and redirect.scheme_redirect:
        scheme = redirect.scheme_redirect
    elif redirect is not None and redirect.https_redirect:
        scheme = b"https"
    else:
        scheme = _forwarded_proto(headers)
    port = (
        b":%d" % redirect.port_redirect if redirect is not None and redirect.port_redirect else b""
    )
    if redirect is not None and redirect.host_redirect:
        host = redirect.host_redirect
    else:
        host = _process_request_host(headers, scheme, port)
    path_redirect = redirect.path_redirect if redirect is not None else b""
    has_query = redirect is not None and redirect._path_has_query
    if path_redirect:
        if has_query:
            final_path = path_redirect
        else:
            q = current.find(b"?")
            final_path = path_redirect + current[q:] if q >= 0 else path_redirect
    else:
        final_path = current
    if not final_path.startswith(b"/"):
        final_path = b"/" + final_path
    if redirect is not None and redirect.strip_query and not has_query:
        q = final_path.find(b"?")
        if q >= 0:
            final_path = final_path[:q]
    return b"%s://%s%s%s" % (scheme, host, port, final_path)


def _process_request_host(headers: RequestHeaders, new_scheme: bytes, new_port: bytes) -> bytes:
    host = headers.authority
    if not host:
        return host
    if host[:1] == b"[":
        end = host.rfind(b"]:")
        if end >= 0:
            end += 1
    else:
        end = host.rfind(b":")
    if end < 0:
        return host
    request_port = host[end:]
    proto = _forwarded_proto(headers)
    remove = bool(new_port)
    if new_scheme != proto:
        remove = remove or (proto == b"https" and request_port == b":443")
        remove = remove or (proto == b"http" and request_port == b":80")
    return host[:end] if remove else host


def _read_data_source(msg: Any, path: str, max_size: int) -> bytes:
    kind = msg.WhichOneof("specifier")
    if kind == "inline_string":
        data = msg.inline_string.encode("utf-8")
    elif kind == "inline_bytes":
        data = bytes(msg.inline_bytes)
    elif kind == "filename":
        fname = msg.filename
        if not os.path.isfile(fname):
            raise ConfigError(f"file {fname} does not exist", _join(path, "filename"))
        size = os.path.getsize(fname)
        if size > max_size:
            raise ConfigError(f"response body size is {size} bytes; maximum is {max_size}", path)
        with open(fname, "rb") as f:
            data = f.read()
    elif kind == "environment_variable":
        env = os.environ.get(msg.environment_variable)
        if env is None:
            raise ConfigError(
                f"Environment variable doesn't exist: {msg.environment_variable}",
                _join(path, "environment_variable"),
            )
        data = env.encode("utf-8")
    elif kind is None:
        data = b""
    else:
        raise ConfigError(f"{kind} is not supported by pyenvoy yet", _join(path, kind))
    if len(data) > max_size:
        raise ConfigError(f"response body size is {len(data)} bytes; maximum is {max_size}", path)
    return data


def _duration_seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


# --- runtime objects -----------------------------------------------------------------------------


class VirtualHost:
    __slots__ = (
        "name",
        "domains",
        "routes",
        "request_mutations",
        "response_mutations",
        "per_filter_config",
        "require_tls",
        "retry_policy",
        "request_mirror_policies",
        "include_request_attempt_count",
        "include_attempt_count_in_response",
        "include_is_timeout_retry_header",
        "per_request_buffer_limit_bytes",
        "metadata",
        "ssl_redirect_route",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.domains: tuple[str, ...] = ()
        self.routes: tuple[Route, ...] = ()
        self.request_mutations = _EMPTY_MUTATIONS
        self.response_mutations = _EMPTY_MUTATIONS
        self.per_filter_config: dict[str, Any] = {}
        self.require_tls = 0  # 0 NONE, 1 EXTERNAL_ONLY, 2 ALL
        self.retry_policy: Any = None
        self.request_mirror_policies: tuple[Any, ...] = ()
        self.include_request_attempt_count = False
        self.include_attempt_count_in_response = False
        self.include_is_timeout_retry_header = False
        self.per_request_buffer_limit_bytes: int | None = None
        self.metadata: Any = None
        self.ssl_redirect_route: Route | None = None

    def __repr__(self) -> str:
        return f"VirtualHost({self.name!r})"


class WeightedCluster:
    """One entry of ``weighted_clusters`` (stored; the router picks with ``Route.pick_weighted``)."""

    __slots__ = (
        "name",
        "cluster_header",
        "weight",
        "request_mutations",
        "response_mutations",
        "per_filter_config",
        "host_rewrite_literal",
    )

    def __init__(self, msg: Any, path: str) -> None:
        _check_fields(msg, _CLUSTER_WEIGHT_FIELDS, path)
        if msg.name and msg.cluster_header:
            raise ConfigError("Only one of name or cluster_header can be specified", path)
        if not msg.name and not msg.cluster_header:
            raise ConfigError("At least one of name or cluster_header need to be specified", path)
        self.name = msg.name
        self.cluster_header = msg.cluster_header.lower().encode() if msg.cluster_header else None
        if not msg.HasField("weight"):
            raise ConfigError("weight is required", _join(path, "weight"))
        self.weight = msg.weight.value
        self.request_mutations = _mutations(msg, path, "request")
        self.response_mutations = _mutations(msg, path, "response")
        self.per_filter_config = _per_filter(msg)
        self.host_rewrite_literal = msg.host_rewrite_literal.encode() or None


_MatchCheck = Callable[[RequestHeaders, list[Any], int], bool]


class Route:
    """One compiled route. Immutable after ``RouteTable.from_proto``."""

    __slots__ = (
        "name",
        "virtual_host",
        "table",
        "cluster_name",
        "cluster_header",
        "weighted_clusters",
        "weighted_header_name",
        "total_weight",
        "direct_response",
        "redirect",
        "timeout",
        "idle_timeout",
        "max_stream_duration",
        "prefix_rewrite",
        "regex_rewrite",
        "host_rewrite_literal",
        "auto_host_rewrite",
        "host_rewrite_header",
        "host_rewrite_path_regex",
        "append_x_forwarded_host",
        "cluster_not_found_response_code",
        "retry_policy",
        "hash_policy",
        "request_mirror_policies",
        "upgrade_configs",
        "priority",
        "per_filter_config",
        "per_request_buffer_limit_bytes",
        "metadata",
        "decorator",
        "request_mutations",
        "response_mutations",
        "_kind",
        "_matched",
        "_case_sensitive",
        "_checks",
        "_header_checks",
        "_prefix_only",
        "_path_rewrite",
        "_synthetic",
        "_request_chain",
        "_response_chain",
    )

    def __init__(self, name: str, virtual_host: VirtualHost, table: RouteTable) -> None:
        self.name = name
        self.virtual_host = virtual_host
        self.table = table
        self.cluster_name: str | None = None
        self.cluster_header: bytes | None = None
        self.weighted_clusters: tuple[WeightedCluster, ...] | None = None
        self.weighted_header_name: bytes | None = None
        self.total_weight = 0
        self.direct_response: tuple[int, bytes] | None = None
        self.redirect: RedirectAction | None = None
        self.timeout = DEFAULT_ROUTE_TIMEOUT
        self.idle_timeout: float | None = None
        # RouteAction.max_stream_duration.max_stream_duration (seconds), None when unset.
        self.max_stream_duration: float | None = None
        self.prefix_rewrite: bytes | None = None
        self.regex_rewrite: _RegexRewrite | None = None
        self.host_rewrite_literal: bytes | None = None
        self.auto_host_rewrite = False
        self.host_rewrite_header: bytes | None = None
        self.host_rewrite_path_regex: _RegexRewrite | None = None
        self.append_x_forwarded_host = False
        self.cluster_not_found_response_code = 503
        self.retry_policy: Any = None
        self.hash_policy: Any = ()  # compiled HashPolicy when the route has one
        self.request_mirror_policies: tuple[Any, ...] = ()
        self.upgrade_configs: dict[str, bool] = {}
        self.priority = 0
        self.per_filter_config: dict[str, Any] = {}
        self.per_request_buffer_limit_bytes: int | None = None
        self.metadata: Any = None
        self.decorator: Any = None
        self.request_mutations = _EMPTY_MUTATIONS
        self.response_mutations = _EMPTY_MUTATIONS
        # Path matching: kind 0 prefix, 1 exact path, 2 regex, 3 separated prefix, 4 connect.
        self._kind = 0
        self._matched: Any = b""
        self._case_sensitive = True
        self._checks: tuple[_MatchCheck, ...] = ()
        self._header_checks: tuple[HeaderMatch, ...] = ()
        # The matcher when it is nothing but a case-sensitive prefix (the common route
        # shape): RouteTable.route tests it inline instead of calling _matches.
        self._prefix_only: bytes | None = None
        self._path_rewrite: Callable[[bytes], bytes] | None = None
        self._synthetic = False
        # Non-empty header mutation levels in application order, resolved on first use
        # (the route table is complete by then).
        self._request_chain: tuple[HeaderMutations, ...] | None = None
        self._response_chain: tuple[HeaderMutations, ...] | None = None

    def __repr__(self) -> str:
        return f"Route({self.name!r}, vhost={self.virtual_host.name!r})"

    # -- matching --------------------------------------------------------------------------------

    def _matches(
        self, headers: RequestHeaders, path_only: bytes, qcache: list[Any], random_value: int
    ) -> bool:
        kind = self._kind
        if kind == 4:
            if headers.method != b"CONNECT":
                return False
        elif not headers.path:
            return False
        elif kind == 0:
            if self._case_sensitive:
                if not path_only.startswith(self._matched):
                    return False
            elif not path_only.lower().startswith(self._matched):
                return False
        elif kind == 1:
            if self._case_sensitive:
                if path_only != self._matched:
                    return False
            elif path_only.lower() != self._matched:
                return False
        elif kind == 2:
            if self._matched.fullmatch(path_only) is None:
                return False
        else:
            prefix = self._matched
            candidate = path_only if self._case_sensitive else path_only.lower()
            if not candidate.startswith(prefix):
                return False
            if len(candidate) != len(prefix) and candidate[len(prefix)] != 0x2F:
                return False
        for header_check in self._header_checks:
            if not header_check(headers):
                return False
        for check in self._checks:
            if not check(headers, qcache, random_value):
                return False
        return True

    # -- request side ----------------------------------------------------------------------------

    def rewrite_path(
        self, headers: RequestHeaders, insert_envoy_original_path: bool = True
    ) -> None:
        """Apply prefix_rewrite / regex_rewrite (the redirect's for redirect routes) to :path.

        The query string and fragment are kept; ``x-envoy-original-path`` is set like Envoy
        does unless the router has ``suppress_envoy_headers``.
        """
        rewrite = self._path_rewrite
        if rewrite is None:
            return
        old = headers.path
        new = rewrite(old)
        if insert_envoy_original_path:
            headers.set(b"x-envoy-original-path", old)
        headers.path = new

    def finalize_request_headers(
        self, headers: RequestHeaders, stream_info: StreamInfo, insert_envoy_headers: bool = True
    ) -> None:
        """request_headers_to_add/remove at all levels, then host rewrites (not :path)."""
        if self._synthetic:
            return
        chain = self._request_chain
        if chain is None:
            chain = self._request_chain = self._chain(
                self.request_mutations,
                self.virtual_host.request_mutations,
                self.table.request_mutations,
            )
        for mutations in chain:
            mutations.apply(headers, stream_info, headers, None)
        if self.host_rewrite_literal is not None:
            self.update_authority(headers, self.host_rewrite_literal, insert_envoy_headers)
        elif self.host_rewrite_header is not None:
            value = HeaderMap.get(headers, self.host_rewrite_header)
            if value:
                self.update_authority(headers, value, insert_envoy_headers)
        elif self.host_rewrite_path_regex is not None:
            new_host = self.host_rewrite_path_regex.apply(_strip_query(headers.path))
            self.update_authority(headers, new_host, insert_envoy_headers)

    def update_authority(
        self, headers: RequestHeaders, host: bytes, insert_envoy_headers: bool = True
    ) -> None:
        """Set :authority like Envoy's Http::Utility::updateAuthority.

        Appends the old host to ``x-forwarded-host`` when ``append_x_forwarded_host`` is set
        and records it in ``x-envoy-original-host`` unless envoy headers are suppressed. The
        router should use this for ``auto_host_rewrite`` (the upstream host's hostname).
        """
        old = headers.authority
        if old:
            if self.append_x_forwarded_host:
                for h in headers.headers:
                    if h[0] == b"x-forwarded-host":
                        h[1] = h[1] + b"," + old if h[1] else old
                        break
                else:
                    headers.add(b"x-forwarded-host", old)
            if insert_envoy_headers:
                headers.set(b"x-envoy-original-host", old)
        headers.authority = host

    def pick_weighted_cluster(
        self, headers: RequestHeaders, random_value: int
    ) -> WeightedCluster | None:
        """Envoy's pickWeightedCluster (``header_name`` overrides ``random_value``)."""
        clusters = self.weighted_clusters
        if not clusters:
            return None
        if self.weighted_header_name is not None:
            values = _header_values(headers, self.weighted_header_name)
            if len(values) == 1 and values[0].isdigit():
                random_value = int(values[0])
        selected = random_value % self.total_weight
        end = 0
        for cluster in clusters:
            end += cluster.weight
            if selected < end:
                return cluster
        return clusters[-1]

    # -- response side ---------------------------------------------------------------------------

    def location(self, headers: RequestHeaders) -> bytes | None:
        """Location for a redirect, or for a direct response with status 201 or 3xx (Envoy)."""
        if self.redirect is not None:
            return self.redirect.location(headers)
        if self.direct_response is not None and headers.path:
            status = self.direct_response[0]
            if status == 201 or 300 <= status < 400:
                return _new_path(None, headers, headers.path)
        return None

    def finalize_response_headers(
        self,
        headers: ResponseHeaders,
        stream_info: StreamInfo,
        request_headers: RequestHeaders | None = None,
    ) -> None:
        """response_headers_to_add/remove at all levels (formatters see ``request_headers``)."""
        if self._synthetic:  # Envoy's SslRedirector adds no headers
            return
        chain = self._response_chain
        if chain is None:
            chain = self._response_chain = self._chain(
                self.response_mutations,
                self.virtual_host.response_mutations,
                self.table.response_mutations,
            )
        for mutations in chain:
            mutations.apply(headers, stream_info, request_headers, headers)

    def _chain(
        self, route_level: HeaderMutations, vhost_level: HeaderMutations, table_level: HeaderMutations
    ) -> tuple[HeaderMutations, ...]:
        if self.table.most_specific_header_mutations_wins:
            order = (table_level, vhost_level, route_level)
        else:
            order = (route_level, vhost_level, table_level)
        return tuple(m for m in order if m)


class RouteTable:
    """A compiled RouteConfiguration: ``route(headers)`` picks the Route for a request."""

    __slots__ = (
        "name",
        "virtual_hosts",
        "internal_only_headers",
        "request_mutations",
        "response_mutations",
        "most_specific_header_mutations_wins",
        "per_filter_config",
        "request_mirror_policies",
        "max_direct_response_body_size_bytes",
        "_exact",
        "_suffixes",
        "_prefixes",
        "_default",
        "_ignore_port",
        "_vhost_header",
        "_ignore_path_params",
        "_only_default",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.virtual_hosts: tuple[VirtualHost, ...] = ()
        self.internal_only_headers: tuple[bytes, ...] = ()
        self.request_mutations = _EMPTY_MUTATIONS
        self.response_mutations = _EMPTY_MUTATIONS
        self.most_specific_header_mutations_wins = False
        self.per_filter_config: dict[str, Any] = {}
        self.request_mirror_policies: tuple[Any, ...] = ()
        self.max_direct_response_body_size_bytes = DEFAULT_MAX_DIRECT_RESPONSE_BODY_SIZE_BYTES
        self._exact: dict[bytes, VirtualHost] = {}
        self._suffixes: tuple[tuple[int, dict[bytes, VirtualHost]], ...] = ()
        self._prefixes: tuple[tuple[int, dict[bytes, VirtualHost]], ...] = ()
        self._default: VirtualHost | None = None
        self._ignore_port = False
        self._vhost_header: bytes | None = None
        self._ignore_path_params = False
        self._only_default = True

    def __repr__(self) -> str:
        return f"RouteTable({self.name!r}, {len(self.virtual_hosts)} virtual hosts)"

    # -- lookup ----------------------------------------------------------------------------------

    def find_virtual_host(self, headers: RequestHeaders) -> VirtualHost | None:
        if self._only_default:
            return self._default
        if self._vhost_header is not None:
            host = HeaderMap.get(headers, self._vhost_header) or b""
        else:
            host = headers.authority
        if not host:
            return None
        if self._ignore_port:
            colon = _port_start(host)
            if colon >= 0:
                host = host[:colon]
        host = host.lower()
        vhost = self._exact.get(host)
        if vhost is not None:
            return vhost
        size = len(host)
        for length, table in self._suffixes:
            if length < size:  # "*.foo.com" must not match ".foo.com"
                vhost = table.get(host[size - length :])
                if vhost is not None:
                    return vhost
        for length, table in self._prefixes:
            if length < size:
                vhost = table.get(host[:length])
                if vhost is not None:
                    return vhost
        return self._default

    def route(self, headers: RequestHeaders, random_value: int = 0) -> Route | None:
        """The first matching Route, the virtual host's TLS redirect, or None (404 NR)."""
        vhost = self._default if self._only_default else self.find_virtual_host(headers)
        if vhost is None:
            return None
        if vhost.require_tls and _forwarded_proto(headers) != b"https":
            if vhost.require_tls == 2 or HeaderMap.get(headers, b"x-envoy-internal") != b"true":
                return vhost.ssl_redirect_route
        path = headers.path
        # _strip_query(path), inlined: this runs for every request.
        path_only = path.partition(b"?")[0].partition(b"#")[0]
        if self._ignore_path_params:
            semi = path_only.find(b";")
            if semi >= 0:
                path_only = path_only[:semi]
        qcache: list[Any] | None = None  # the parsed query, shared by the routes' checks
        for route in vhost.routes:
            prefix = route._prefix_only
            if prefix is not None:
                # Route._matches for a plain case-sensitive prefix, inlined.
                if path and path_only.startswith(prefix):
                    return route
                continue
            if qcache is None:
                qcache = [None]
            if route._matches(headers, path_only, qcache, random_value):
                return route
        return None

    # -- build -----------------------------------------------------------------------------------

    @classmethod
    def from_proto(
        cls,
        proto: route_pb2.RouteConfiguration,
        path: str = "route_config",
        *,
        validate_clusters: Callable[[str], bool] | None = None,
    ) -> RouteTable:
        """Compile ``proto``; ConfigError names the field path of anything invalid/unsupported.

        ``validate_clusters(name) -> bool``: when given (and the config's own
        ``validate_clusters`` is not false), unknown clusters are rejected like Envoy does.
        """
        _check_fields(proto, _RC_FIELDS, path)
        self = cls(proto.name)
        if proto.HasField("validate_clusters") and not proto.validate_clusters.value:
            validate_clusters = None
        self.most_specific_header_mutations_wins = proto.most_specific_header_mutations_wins
        if proto.HasField("max_direct_response_body_size_bytes"):
            self.max_direct_response_body_size_bytes = (
                proto.max_direct_response_body_size_bytes.value
            )
        self._ignore_port = proto.ignore_port_in_host_matching
        self._ignore_path_params = proto.ignore_path_parameters_in_path_matching
        if proto.vhost_header:
            self._vhost_header = proto.vhost_header.lower().encode()
        self.internal_only_headers = tuple(h.lower().encode() for h in proto.internal_only_headers)
        self.request_mutations = _mutations(proto, path, "request")
        self.response_mutations = _mutations(proto, path, "response")
        self.per_filter_config = _per_filter(proto)
        self.request_mirror_policies = _mirror_policies(
            proto.request_mirror_policies, _join(path, "request_mirror_policies"), validate_clusters
        )

        exact: dict[bytes, VirtualHost] = {}
        suffixes: dict[int, dict[bytes, VirtualHost]] = {}
        prefixes: dict[int, dict[bytes, VirtualHost]] = {}
        vhosts: list[VirtualHost] = []
        for i, vh_msg in enumerate(proto.virtual_hosts):
            vh_path = f"{path}.virtual_hosts[{i}]"
            vhost = _build_virtual_host(self, vh_msg, vh_path, validate_clusters)
            vhosts.append(vhost)
            for j, raw in enumerate(vh_msg.domains):
                domain = raw.lower()
                dpath = f"{vh_path}.domains[{j}]"
                if domain == "*":
                    if self._default is not None:
                        raise ConfigError(
                            f"Only a single wildcard domain is permitted in route {proto.name}",
                            dpath,
                        )
                    self._default = vhost
                    continue
                key = domain.encode("utf-8")
                if domain.startswith("*"):
                    target = suffixes.setdefault(len(key) - 1, {})
                    key = key[1:]
                elif domain.endswith("*"):
                    target = prefixes.setdefault(len(key) - 1, {})
                    key = key[:-1]
                else:
                    target = exact
                if key in target:
                    raise ConfigError(
                        "Only unique values for domains are permitted. Duplicate entry of domain "
                        f"{domain} in route {proto.name}",
                        dpath,
                    )
                target[key] = vhost
        self.virtual_hosts = tuple(vhosts)
        self._exact = exact
        self._suffixes = tuple(sorted(suffixes.items(), reverse=True))
        self._prefixes = tuple(sorted(prefixes.items(), reverse=True))
        self._only_default = not (exact or suffixes or prefixes)
        return self


def _mirror_policies(
    policies: Any, path: str, validate_clusters: Callable[[str], bool] | None
) -> tuple[Any, ...]:
    for i, policy in enumerate(policies):
        p = f"{path}[{i}]"
        _check_fields(policy, _MIRROR_FIELDS, p)
        if policy.cluster and policy.cluster_header:
            raise ConfigError(
                f"Only one of cluster '{policy.cluster}' or cluster_header '{policy.cluster_header}' "
                "in request mirror policy can be specified",
                p,
            )
        if not policy.cluster and not policy.cluster_header:
            raise ConfigError(
                "Exactly one of cluster or cluster_header in request mirror policy need to be specified",
                p,
            )
        if (
            policy.cluster
            and validate_clusters is not None
            and not validate_clusters(policy.cluster)
        ):
            raise ConfigError(
                f"route: unknown shadow cluster '{policy.cluster}'", _join(p, "cluster")
            )
    return tuple(policies)


def _build_virtual_host(
    table: RouteTable, msg: Any, path: str, validate_clusters: Callable[[str], bool] | None
) -> VirtualHost:
    _check_fields(msg, _VH_FIELDS, path)
    if not msg.domains:
        raise ConfigError("domains: value must contain at least 1 item(s)", _join(path, "domains"))
    vhost = VirtualHost(msg.name)
    vhost.domains = tuple(msg.domains)
    vhost.require_tls = msg.require_tls
    vhost.request_mutations = _mutations(msg, path, "request")
    vhost.response_mutations = _mutations(msg, path, "response")
    vhost.per_filter_config = _per_filter(msg)
    if msg.HasField("retry_policy"):
        vhost.retry_policy = msg.retry_policy
    vhost.request_mirror_policies = (
        _mirror_policies(
            msg.request_mirror_policies, _join(path, "request_mirror_policies"), validate_clusters
        )
        or table.request_mirror_policies
    )
    vhost.include_request_attempt_count = msg.include_request_attempt_count
    vhost.include_attempt_count_in_response = msg.include_attempt_count_in_response
    vhost.include_is_timeout_retry_header = msg.include_is_timeout_retry_header
    if msg.HasField("request_body_buffer_limit"):
        vhost.per_request_buffer_limit_bytes = msg.request_body_buffer_limit.value
    elif msg.HasField("per_request_buffer_limit_bytes"):
        vhost.per_request_buffer_limit_bytes = msg.per_request_buffer_limit_bytes.value
    if msg.HasField("metadata"):
        vhost.metadata = msg.metadata
    if vhost.require_tls:
        ssl = Route("", vhost, table)
        ssl.redirect = RedirectAction.ssl_redirect()
        ssl._synthetic = True
        vhost.ssl_redirect_route = ssl
    vhost.routes = tuple(
        _build_route(table, vhost, r, f"{path}.routes[{i}]", validate_clusters)
        for i, r in enumerate(msg.routes)
    )
    return vhost


def _build_route(
    table: RouteTable,
    vhost: VirtualHost,
    msg: Any,
    path: str,
    validate_clusters: Callable[[str], bool] | None,
) -> Route:
    _check_fields(msg, _ROUTE_FIELDS, path)
    route = Route(msg.name, vhost, table)
    if not msg.HasField("match"):
        raise ConfigError("match: value is required", _join(path, "match"))
    _build_match(route, msg.match, _join(path, "match"))
    action = msg.WhichOneof("action")
    if action is None:
        raise ConfigError('field: "action", reason: is required', path)
    if action == "route":
        _build_action(route, msg.route, _join(path, "route"), validate_clusters)
    elif action == "redirect":
        route.redirect = RedirectAction.from_proto(msg.redirect, _join(path, "redirect"))
        _set_path_rewrite(route, route.redirect.prefix_rewrite, route.redirect.regex_rewrite)
        route.redirect._path_rewrite = route._path_rewrite
    elif action == "direct_response":
        dpath = _join(path, "direct_response")
        _check_fields(msg.direct_response, _DIRECT_FIELDS, dpath)
        status = msg.direct_response.status
        if not 200 <= status < 600:
            raise ConfigError(
                "status: value must be inside range [200, 600)", _join(dpath, "status")
            )
        body = b""
        if msg.direct_response.HasField("body"):
            body = _read_data_source(
                msg.direct_response.body,
                _join(dpath, "body"),
                table.max_direct_response_body_size_bytes,
            )
        route.direct_response = (status, body)
    else:
        raise ConfigError(f"{action} is not supported by pyenvoy yet", _join(path, action))
    route.request_mutations = _mutations(msg, path, "request")
    route.response_mutations = _mutations(msg, path, "response")
    route.per_filter_config = {
        **table.per_filter_config,
        **vhost.per_filter_config,
        **_per_filter(msg),
    }
    if route.retry_policy is None and vhost.retry_policy is not None:
        route.retry_policy = vhost.retry_policy
    if not route.request_mirror_policies:
        route.request_mirror_policies = vhost.request_mirror_policies
    if msg.HasField("request_body_buffer_limit"):
        route.per_request_buffer_limit_bytes = msg.request_body_buffer_limit.value
    elif msg.HasField("per_request_buffer_limit_bytes"):
        route.per_request_buffer_limit_bytes = msg.per_request_buffer_limit_bytes.value
    else:
        route.per_request_buffer_limit_bytes = vhost.per_request_buffer_limit_bytes
    if msg.HasField("metadata"):
        route.metadata = msg.metadata
    if msg.HasField("decorator"):
        route.decorator = msg.decorator
    return route


def _build_match(route: Route, msg: Any, path: str) -> None:
    _check_fields(msg, _MATCH_FIELDS, path)
    kind = msg.WhichOneof("path_specifier")
    case_sensitive = msg.case_sensitive.value if msg.HasField("case_sensitive") else True
    route._case_sensitive = case_sensitive
    if kind == "prefix":
        route._kind = 0
        prefix = msg.prefix.encode("utf-8")
        route._matched = prefix if case_sensitive else prefix.lower()
    elif kind == "path":
        route._kind = 1
        exact = msg.path.encode("utf-8")
        route._matched = exact if case_sensitive else exact.lower()
    elif kind == "safe_regex":
        route._kind = 2
        route._matched = _regex_of(msg.safe_regex, _join(path, "safe_regex"))
    elif kind == "path_separated_prefix":
        value = msg.path_separated_prefix
        if not re.fullmatch(r"[^?#]+[^?#/]", value):
            raise ConfigError(
                'path_separated_prefix: value does not match regex pattern "^[^?#]+[^?#/]$"',
                _join(path, "path_separated_prefix"),
            )
        route._kind = 3
        prefix = value.encode("utf-8")
        route._matched = prefix if case_sensitive else prefix.lower()
    elif kind == "connect_matcher":
        route._kind = 4
    elif kind is None:
        raise ConfigError('field: "path_specifier", reason: is required', path)
    else:
        raise ConfigError(f"{kind} is not supported by pyenvoy yet", _join(path, kind))

    checks: list[_MatchCheck] = []
    if msg.HasField("runtime_fraction"):
        # No runtime layer in pyenvoy: the default_value fraction always applies, as in
        # Envoy when the runtime key is unset: random_value % denominator < numerator.
        fraction = msg.runtime_fraction.default_value
        numerator = fraction.numerator
        denominator = _FRACTION_DENOMINATORS.get(fraction.denominator, 100)
        checks.append(lambda h, q, rv: rv % denominator < numerator)
    if msg.HasField("grpc"):
        checks.append(lambda h, q, rv: _is_grpc(h))
    route._header_checks = tuple(
        _header_matcher(hm, f"{path}.headers[{i}]") for i, hm in enumerate(msg.headers)
    )
    if msg.query_parameters:
        qmatchers = tuple(
            _query_matcher(qm, f"{path}.query_parameters[{i}]")
            for i, qm in enumerate(msg.query_parameters)
        )

        def query_check(h: RequestHeaders, q: list[Any], rv: int) -> bool:
            params = q[0]
            if params is None:
                params = q[0] = _parse_query(h.path)
            return all(m(params) for m in qmatchers)

        checks.append(query_check)
    route._checks = tuple(checks)
    if kind == "prefix" and case_sensitive and not checks and not route._header_checks:
        route._prefix_only = route._matched


def _is_grpc(headers: RequestHeaders) -> bool:
    """Envoy's Grpc::Common::isGrpcRequestHeaders (content-type application/grpc[+...|;...])."""
    ct = HeaderMap.get(headers, b"content-type")
    if ct is None or not ct.startswith(b"application/grpc"):
        return False
    return len(ct) == 16 or ct[16:17] in (b"+", b";")


def _set_path_rewrite(
    route: Route, prefix_rewrite: bytes, regex_rewrite: _RegexRewrite | None
) -> None:
    if prefix_rewrite:
        kind = route._kind
        if kind in (0, 1, 3):
            matched_len = len(route._matched)

            def prefix(path: bytes) -> bytes:
                return prefix_rewrite + path[matched_len:]

            route._path_rewrite = prefix
        else:  # regex / connect routes: the whole path (without query) is the matched part

            def whole(path: bytes) -> bytes:
                return prefix_rewrite + path[len(_strip_query(path)) :]

            route._path_rewrite = whole
    elif regex_rewrite is not None:

        def regex(path: bytes) -> bytes:
            just_path = _strip_query(path)
            return regex_rewrite.apply(just_path) + path[len(just_path) :]

        route._path_rewrite = regex


def _build_action(
    route: Route, msg: Any, path: str, validate_clusters: Callable[[str], bool] | None
) -> None:
    _check_fields(msg, _ACTION_FIELDS, path)
    spec = msg.WhichOneof("cluster_specifier")
    if spec == "cluster":
        if not msg.cluster:
            raise ConfigError(
                "cluster: value length must be at least 1 characters", _join(path, "cluster")
            )
        route.cluster_name = msg.cluster
        if validate_clusters is not None and not validate_clusters(msg.cluster):
            raise ConfigError(f"route: unknown cluster '{msg.cluster}'", _join(path, "cluster"))
    elif spec == "cluster_header":
        if not msg.cluster_header:
            raise ConfigError(
                "cluster_header: value length must be at least 1 characters",
                _join(path, "cluster_header"),
            )
        route.cluster_header = msg.cluster_header.lower().encode()
    elif spec == "weighted_clusters":
        wpath = _join(path, "weighted_clusters")
        wc = msg.weighted_clusters
        _check_fields(wc, _WEIGHTED_FIELDS, wpath)
        clusters = tuple(
            WeightedCluster(c, f"{wpath}.clusters[{i}]") for i, c in enumerate(wc.clusters)
        )
        if not clusters:
            raise ConfigError(
                "clusters: value must contain at least 1 item(s)", _join(wpath, "clusters")
            )
        total = sum(c.weight for c in clusters)
        if total == 0:
            raise ConfigError(
                "Sum of weights in the weighted_cluster must be greater than 0.", wpath
            )
        if validate_clusters is not None:
            for i, c in enumerate(clusters):
                if c.name and not validate_clusters(c.name):
                    raise ConfigError(
                        f"route: unknown weighted cluster '{c.name}'", f"{wpath}.clusters[{i}].name"
                    )
        route.weighted_clusters = clusters
        route.total_weight = total
        if wc.header_name:
            route.weighted_header_name = wc.header_name.lower().encode()
    elif spec is None:
        raise ConfigError('field: "cluster_specifier", reason: is required', path)
    else:
        raise ConfigError(f"{spec} is not supported by pyenvoy yet", _join(path, spec))

    route.cluster_not_found_response_code = _CLUSTER_NOT_FOUND_CODES.get(
        msg.cluster_not_found_response_code, 503
    )
    if msg.prefix_rewrite and msg.HasField("regex_rewrite"):
        raise ConfigError(
            "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy", path
        )
    if msg.prefix_rewrite:
        route.prefix_rewrite = msg.prefix_rewrite.encode("utf-8")
    if msg.HasField("regex_rewrite"):
        route.regex_rewrite = _RegexRewrite(msg.regex_rewrite, _join(path, "regex_rewrite"))
    _set_path_rewrite(route, route.prefix_rewrite or b"", route.regex_rewrite)

    host_spec = msg.WhichOneof("host_rewrite_specifier")
    if host_spec == "host_rewrite_literal":
        route.host_rewrite_literal = msg.host_rewrite_literal.encode("utf-8")
    elif host_spec == "auto_host_rewrite":
        route.auto_host_rewrite = msg.auto_host_rewrite.value
    elif host_spec == "host_rewrite_header":
        route.host_rewrite_header = msg.host_rewrite_header.lower().encode()
    elif host_spec == "host_rewrite_path_regex":
        route.host_rewrite_path_regex = _RegexRewrite(
            msg.host_rewrite_path_regex, _join(path, "host_rewrite_path_regex")
        )
    route.append_x_forwarded_host = msg.append_x_forwarded_host

    route.timeout = (
        _duration_seconds(msg.timeout) if msg.HasField("timeout") else DEFAULT_ROUTE_TIMEOUT
    )
    if msg.HasField("idle_timeout"):
        route.idle_timeout = _duration_seconds(msg.idle_timeout)
    if msg.HasField("max_stream_duration"):
        msd = msg.max_stream_duration
        mpath = _join(path, "max_stream_duration")
        for f in ("grpc_timeout_header_max", "grpc_timeout_header_offset"):
            if msd.HasField(f):
                raise ConfigError(f"{f} is not supported by pyenvoy yet", _join(mpath, f))
        if msd.HasField("max_stream_duration"):
            route.max_stream_duration = _duration_seconds(msd.max_stream_duration) or None
    if msg.HasField("retry_policy"):
        route.retry_policy = msg.retry_policy
    if len(msg.hash_policy):
        from pyenvoy.upstream.hash_policy import compile_hash_policy

        route.hash_policy = compile_hash_policy(msg.hash_policy, _join(path, "hash_policy"))
    route.request_mirror_policies = _mirror_policies(
        msg.request_mirror_policies, _join(path, "request_mirror_policies"), validate_clusters
    )
    route.priority = msg.priority
    upgrades: dict[str, bool] = {}
    for i, uc in enumerate(msg.upgrade_configs):
        upath = f"{path}.upgrade_configs[{i}]"
        if uc.HasField("connect_config"):
            raise ConfigError(
                "connect_config is not supported by pyenvoy yet", _join(upath, "connect_config")
            )
        key = uc.upgrade_type.lower()
        if key in upgrades:
            raise ConfigError(f"Duplicate upgrade {uc.upgrade_type}", upath)
        upgrades[key] = uc.enabled.value if uc.HasField("enabled") else True
    route.upgrade_configs = upgrades
