"""HeaderMatcher (envoy.config.route.v3.HeaderMatcher) compiled into one closure.

Strategy: each matcher proto becomes a ``(headers) -> bool`` closure built at config time
(regexes compiled once), following Envoy's ``HeaderUtility::matchHeaders``: all values of
a repeated header are joined with ``,``; a missing header only matches ``present_match:
false`` (or, inverted, ``present_match: true``) unless ``treat_missing_header_as_empty``;
every other result is XORed with ``invert_match``. Pseudo-headers (``:path``,
``:method``, ``:authority``) are read through ``RequestHeaders.get`` like any other name.
Regexes use Python's ``re`` with a full match (Envoy uses RE2; the common syntax agrees).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pyenvoy.config.errors import ConfigError

HeaderPredicate = Callable[[Any], bool]


def _header_value(headers: Any, name: bytes) -> bytes | None:
    if name[:1] == b":" or name == b"host":
        return headers.get(name)
    values = headers.get_all(name)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return b",".join(values)


def compile_string_matcher(sm: Any, path: str) -> Callable[[bytes], bool]:
    """envoy.type.matcher.v3.StringMatcher -> predicate over bytes."""
    which = sm.WhichOneof("match_pattern")
    ignore_case = sm.ignore_case
    if which == "safe_regex":
        try:
            rx = re.compile(sm.safe_regex.regex.encode(), re.IGNORECASE if ignore_case else 0)
        except re.error as e:
            raise ConfigError(
                f"invalid regex '{sm.safe_regex.regex}': {e}", f"{path}.safe_regex"
            ) from None
        return lambda v: rx.fullmatch(v) is not None
    if which in ("exact", "prefix", "suffix", "contains"):
        want = getattr(sm, which).encode()
        if ignore_case:
            want = want.lower()
        if which == "exact":
            if ignore_case:
                return lambda v: v.lower() == want
            return lambda v: v == want
        if which == "prefix":
            if ignore_case:
                return lambda v: v.lower().startswith(want)
            return lambda v: v.startswith(want)
        if which == "suffix":
            if ignore_case:
                return lambda v: v.lower().endswith(want)
            return lambda v: v.endswith(want)
        if ignore_case:
            return lambda v: want in v.lower()
        return lambda v: want in v
    if which == "custom":
        raise ConfigError("custom string matchers are not supported by pyenvoy", f"{path}.custom")
    raise ConfigError("value is required: one of exact, prefix, suffix, contains, safe_regex", path)


def compile_header_matcher(hm: Any, path: str) -> HeaderPredicate:
    """One envoy.config.route.v3.HeaderMatcher -> ``predicate(headers)``."""
    if not hm.name:
        raise ConfigError("name: value length must be at least 1 characters", f"{path}.name")
    name = hm.name.lower().encode()
    invert = hm.invert_match
    treat_missing = hm.treat_missing_header_as_empty
    which = hm.WhichOneof("header_match_specifier")

    if which == "present_match" or which is None:
        # No specifier: Envoy's "Value" type with an empty value, which matches any present value.
        present = hm.present_match if which == "present_match" else True
        is_present_type = which == "present_match"

        def match_present(headers: Any) -> bool:
            v = _header_value(headers, name)
            if v is None and not treat_missing:
                if invert:
                    return is_present_type and present
                return is_present_type and not present
            return present != invert

        return match_present

    check: Callable[[bytes], bool]
    if which == "exact_match":
        want = hm.exact_match.encode()
        check = (lambda v: True) if not want else (lambda v: v == want)
    elif which == "prefix_match":
        p = hm.prefix_match.encode()
        check = lambda v: v.startswith(p)  # noqa: E731
    elif which == "suffix_match":
        sfx = hm.suffix_match.encode()
        check = lambda v: v.endswith(sfx)  # noqa: E731
    elif which == "contains_match":
        sub = hm.contains_match.encode()
        check = lambda v: sub in v  # noqa: E731
    elif which == "safe_regex_match":
        try:
            rx = re.compile(hm.safe_regex_match.regex.encode())
        except re.error as e:
            raise ConfigError(
                f"invalid regex '{hm.safe_regex_match.regex}': {e}", f"{path}.safe_regex_match"
            ) from None
        check = lambda v: rx.fullmatch(v) is not None  # noqa: E731
    elif which == "range_match":
        start, end = hm.range_match.start, hm.range_match.end

        def check(v: bytes) -> bool:
            try:
                n = int(v)
            except ValueError:
                return False
            return start <= n < end

    elif which == "string_match":
        check = compile_string_matcher(hm.string_match, f"{path}.string_match")
    else:  # pragma: no cover - a new oneof member
        raise ConfigError(f"header matcher {which} is not supported by pyenvoy", path)

    def match(headers: Any) -> bool:
        v = _header_value(headers, name)
        if v is None:
            if not treat_missing:
                return False  # only present_match can match a missing header
            v = b""
        return check(v) != invert

    return match
