"""Render a stats Store the way Envoy's admin does: /stats text, JSON and Prometheus.

Strategy: nothing here runs per request. At scrape time the renderer walks the Store's
dicts, filters (``?filter=`` / ``?usedonly`` / ``?type=``), sorts and formats.

- Text and JSON sort counters and gauges together by their full name (plain string order,
  as Envoy's ``std::map<std::string, ...>`` does), histograms follow.
- Prometheus splits every name into a tag-extracted name plus labels with Envoy's default
  tag extractors (the well-known-names table: ``cluster.$.**`` -> ``envoy.cluster_name``
  ...). The extraction of a name is computed once and cached, so a scrape of stats already
  seen runs no regex. Families are sorted token by token (Envoy's ``StatNameLessThan``).
- Histograms only hold bucket counts (``pyenvoy.stats.Histogram``), so quantiles are
  interpolated inside buckets; Envoy's circllhist gives slightly different numbers. The
  "interval" side of a histogram is the last completed flush interval
  (``StatsRender.flush_histograms()``, called by the server's stats flush timer); before a
  first flush it is empty (``nan``), as in Envoy.
- Numbers are printed with Envoy's formatters: ``fmt "{}"`` for text quantiles,
  ``std::to_chars`` (shortest of fixed/scientific) for JSON, ``%.32g`` for Prometheus
  sums and bucket bounds.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from pyenvoy.stats import Counter, Gauge, Histogram, Store

__all__ = [
    "SUPPORTED_QUANTILES",
    "StatsParams",
    "StatsParamsError",
    "StatsRender",
    "TagProducer",
    "prometheus_metric_name",
]

# Envoy's HistogramStatisticsImpl::supportedQuantiles().
SUPPORTED_QUANTILES: tuple[float, ...] = (0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)
_PERCENTILE_LABELS = ("0", "25", "50", "75", "90", "95", "99", "99.5", "99.9", "100")
_JSON_SUPPORTED = "[0,25,50,75,90,95,99,99.5,99.9,100]"
_NAN = float("nan")


# --------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------


def fmt_double(x: float) -> str:
    """fmt's ``"{}"`` for a double: shortest round-trip, no trailing ``.0``."""
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    r = repr(float(x))
    if r.endswith(".0"):
        r = r[:-2]
    return r


def json_number(x: float) -> str:
    """``std::to_chars(double)``: the shorter of fixed and scientific (ties: fixed)."""
    if x != x or math.isinf(x):
        return "null"
    if x == 0:
        return "0"
    sign, digit_tuple, exp = Decimal(repr(abs(float(x)))).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0") or "0"
    assert isinstance(exp, int)
    exp += len(digit_tuple) - len(digits)  # account for the stripped zeros
    # fixed notation
    if exp >= 0:
        fixed = digits + "0" * exp
    else:
        point = len(digits) + exp
        fixed = digits[:point] + "." + digits[point:] if point > 0 else "0." + "0" * -point + digits
    # scientific notation
    e10 = exp + len(digits) - 1
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sci = f"{mant}e{'+' if e10 >= 0 else '-'}{abs(e10):02d}"
    out = fixed if len(fixed) <= len(sci) else sci
    return "-" + out if x < 0 else out


def _g32(x: float) -> str:
    return format(x, ".32g")


def _absl(x: float) -> str:
    """absl::StrCat(double): 6 significant digits."""
    return format(x, "g")


# --------------------------------------------------------------------------------------
# Tag extraction (Envoy's source/common/config/well_known_names.cc, re-expressed)
# --------------------------------------------------------------------------------------

_TAG_VALUE = r"[^\.]+"
_EXPANSIONS = (
    # IPv4 or bracketed IPv6 address, then "_<port>".
    ("<ADDRESS>", r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)"),
    ("<CIPHER>", r"[\w-]+"),
    ("<TLS_VERSION>", r"TLSv\d\.\d"),
    ("<TAG_VALUE>", _TAG_VALUE),
    ("<ROUTE_CONFIG_NAME>", r"[\w./-]+"),  # dots, slashes and dashes allowed
    ("<LISTENER_OR_CLUSTER_WITH_NAME>", r"(?:listener|cluster)\..*?"),
)


def _expand(regex: str) -> str:
    for k, v in _EXPANSIONS:
        regex = regex.replace(k, v)
    return regex


# (tag name, regex, substring that must occur, value that never matches). Order matters: it
# is the order in which Envoy registers them, and so the order of labels.
_DEFAULT_REGEXES: tuple[tuple[str, str, str, str], ...] = (
    # *_rq(_<response_code>)
    ("envoy.response_code", r"_rq(_(\d{3}))$", "_rq_", ""),
    # *_rq_(<response_code_class>)xx
    ("envoy.response_code_class", r"_rq_((\d))xx$", "_rq_", ""),
    (
        "envoy.dynamo_partition_id",
        r"^http\.<TAG_VALUE>\.dynamodb\.table\.<TAG_VALUE>\.capacity\.<TAG_VALUE>"
        r"(\.__partition_id=(\w{7}))$",
        ".dynamodb.table.",
        "",
    ),
    (
        "envoy.dynamo_operation",
        r"^http\.<TAG_VALUE>\.dynamodb.(?:operation|table\.<TAG_VALUE>\.capacity)"
        r"(\.(<TAG_VALUE>))(?:\.|$)",
        ".dynamodb.",
        "",
    ),
    (
        "envoy.dynamo_table",
        r"^http\.<TAG_VALUE>\.dynamodb.(?:table|error)\.((<TAG_VALUE>)\.)",
        ".dynamodb.",
        "",
    ),
    ("envoy.ssl_cipher", r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    (
        "envoy.ssl_curve",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.curves(\.(<CIPHER>))$",
        ".ssl.curves.",
        "",
    ),
    (
        "envoy.ssl_sigalg",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.sigalgs(\.(<CIPHER>))$",
        ".ssl.sigalgs.",
        "",
    ),
    (
        "envoy.ssl_version",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.versions(\.(<TLS_VERSION>))$",
        ".ssl.versions.",
        "",
    ),
    ("cipher_suite", r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    # listener.[<address>.]http.(<stat_prefix>.)*
    ("envoy.http_conn_manager_prefix", r"^listener\..*?\.http\.((<TAG_VALUE>)\.)", ".http.", ""),
    # listener.<address|stat_prefix>.(worker_<id>.)*, listener_manager.(worker_<id>.)*, server.(...),
    # thread_local_cluster_manager.(worker_<id>.)* (seen in Envoy 1.40 output)
    (
        "envoy.worker_id",
        r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)\.|server\.|listener_manager\."
        r"|thread_local_cluster_manager\.)worker_((\d+)\.)",
        "",
        "",
    ),
    # listener.(<address|stat_prefix>.)*, but not "admin"
    ("envoy.listener_address", r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)", "", "admin"),
    # http.[<stat_prefix>.]rds.(<route_config_name>.)<base_stat>
    (
        "envoy.rds_route_config",
        r"^http\.<TAG_VALUE>\.rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$",
        ".rds.",
        "",
    ),
    # The following are inferred from Envoy's tag extractor tests (newer tags).
    (
        "envoy.scoped_rds_config",
        r"^http\.<TAG_VALUE>\.scoped_rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$",
        ".scoped_rds.",
        "",
    ),
    ("envoy.rbac_http_prefix", r"^http\.<TAG_VALUE>\.rbac\.((<TAG_VALUE>)\.)", ".rbac.", "policy"),
    (
        "envoy.rbac_policy_name",
        r"^http\.<TAG_VALUE>\.rbac\.(?:<TAG_VALUE>\.)?policy\.((<TAG_VALUE>)\.)",
        ".rbac.",
        "",
    ),
    ("envoy.proxy_protocol_prefix", r"^proxy_proto\.((<TAG_VALUE>)\.)", "", "versions"),
    (
        "envoy.proxy_protocol_version",
        r"^proxy_proto\.(?:<TAG_VALUE>\.)?(versions\.v(\d)\.)",
        ".versions.",
        "",
    ),
)

# Token patterns: "$" is the tag value, "*" one token, "**" any number of tokens.
_DEFAULT_TOKENIZED: tuple[tuple[str, str], ...] = (
    ("envoy.mongo_callsite", "mongo.*.collection.*.callsite.$.query.**"),
    ("envoy.mongo_collection", "mongo.*.collection.$.**.query.*"),
    ("envoy.mongo_cmd", "mongo.*.cmd.$.**"),
    ("envoy.grpc_bridge_method", "cluster.*.grpc.*.$.**"),
    ("envoy.http_user_agent", "http.*.user_agent.$.**"),
    ("envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    ("envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    ("envoy.grpc_bridge_service", "cluster.*.grpc.$.**"),
    ("envoy.tcp_prefix", "tcp.$.**"),
    ("envoy.udp_prefix", "udp.$.**"),
    ("envoy.clientssl_prefix", "auth.clientssl.$.**"),
    ("envoy.ratelimit_prefix", "ratelimit.$.**"),
    ("envoy.cluster_name", "cluster.$.**"),
    ("envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    ("envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    ("envoy.http_conn_manager_prefix", "http.$.**"),
    ("envoy.virtual_host", "vhost.$.**"),
    ("envoy.mongo_prefix", "mongo.$.**"),
    ("envoy.route", "vhost.*.route.$.**"),
    ("envoy.thrift_prefix", "thrift.$.**"),
    ("envoy.redis_prefix", "redis.$.**"),
    ("envoy.local_http_ratelimit_prefix", "$.http_local_rate_limit.**"),
    ("envoy.local_network_ratelimit_prefix", "local_rate_limit.$.**"),
    ("envoy.local_listener_ratelimit_prefix", "listener_local_ratelimit.$.**"),
    ("envoy.dns_filter_prefix", "dns_filter.$.**"),
    ("envoy.connection_limit_prefix", "connection_limit.$.**"),
    ("envoy.rbac_prefix", "$.rbac.**"),
)


def _regex_prefix(regex: str) -> str:
    """Envoy's extractRegexPrefix: the literal first token of a ``^token\\.`` regex."""
    if not regex.startswith("^"):
        return ""
    for i in range(1, len(regex)):
        ch = regex[i]
        if not (ch.isascii() and (ch.isalnum() or ch == "_")):
            if i > 1:
                last = i == len(regex) - 1
                rest = regex[i:]
                if (not last and (rest.startswith("\\.") or rest.startswith("(?=\\."))) or (
                    last and ch == "$"
                ):
                    return regex[1:i]
            return ""
    return ""


class _Extractor:
    __slots__ = ("name", "prefix", "dup")

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self.dup = False  # another extractor with the same tag name exists

    def extract(
        self,
        name: str,
        tokens: list[str],
        tags: list[tuple[str, str]],
        removes: list[tuple[int, int]],
    ) -> bool:
        raise NotImplementedError


class _RegexExtractor(_Extractor):
    __slots__ = ("regex", "substr", "negative", "require_nonempty")

    def __init__(
        self, name: str, regex: str, substr: str = "", negative: str = "", re2: bool = True
    ) -> None:
        super().__init__(name, _regex_prefix(regex))
        self.regex = re.compile(regex, re.ASCII)
        self.substr = substr
        self.negative = negative
        self.require_nonempty = re2

    def extract(
        self,
        name: str,
        tokens: list[str],
        tags: list[tuple[str, str]],
        removes: list[tuple[int, int]],
    ) -> bool:
        if self.substr and self.substr not in name:
            return False
        m = self.regex.search(name)
        if m is None or self.regex.groups < 1 or m.group(1) is None:
            return False
        start, end = m.span(1)
        if self.require_nonempty and start == end:
            return False
        value = m.group(2) if self.regex.groups >= 2 else None
        if not value:
            value = m.group(1)
        if self.negative and value == self.negative:
            return False
        tags.append((self.name, value))
        removes.append((start, end))
        return True


class _TokenExtractor(_Extractor):
    __slots__ = ("tokens", "match_index")

    def __init__(self, name: str, pattern: str) -> None:
        toks = pattern.split(".")
        first = toks[0]
        super().__init__(name, first if first not in ("$", "*", "**") else "")
        self.tokens = toks
        self.match_index = toks.index("$")

    def extract(
        self,
        name: str,
        tokens: list[str],
        tags: list[tuple[str, str]],
        removes: list[tuple[int, int]],
    ) -> bool:
        found = self._search(tokens, 0, 0, 0)
        if found is None:
            return False
        start, idx = found
        value = tokens[idx]
        end = start + len(value)
        if idx < len(tokens) - 1:
            end += 1  # remove the dot that follows ("ab." or "cd.")
        elif start > 0:
            start -= 1  # last token: remove the dot before it (".ef")
        tags.append((self.name, value))
        removes.append((start, end))
        return True

    def _search(
        self, tokens: list[str], ii: int, pi: int, ci: int, start: int = 0, match: int = -1
    ) -> tuple[int, int] | None:
        pat = self.tokens
        while ii < len(tokens) and pi < len(pat):
            if pi == self.match_index:
                start, match = ci, ii
                ci += len(tokens[ii]) + 1
            else:
                expected = pat[pi]
                if expected == "**":
                    if pi == len(pat) - 1:
                        return (start, match) if match >= 0 else None
                    pi += 1
                    while ii < len(tokens):
                        r = self._search(tokens, ii, pi, ci, start, match)
                        if r is not None:
                            return r
                        ci += len(tokens[ii]) + 1
                        ii += 1
                    return None
                tok = tokens[ii]
                if expected != "*" and expected != tok:
                    return None
                ci += len(tok) + 1
            ii += 1
            pi += 1
        if pi == len(pat) and ii == len(tokens) and match >= 0:
            return start, match
        return None


class _FixedExtractor(_Extractor):
    __slots__ = ("value",)

    def __init__(self, name: str, value: str) -> None:
        super().__init__(name, "")
        self.value = value

    def extract(
        self,
        name: str,
        tokens: list[str],
        tags: list[tuple[str, str]],
        removes: list[tuple[int, int]],
    ) -> bool:
        tags.append((self.name, self.value))
        return True


Tags = tuple[tuple[str, str], ...]


class TagProducer:
    """Envoy's TagProducerImpl: ``produce(name) -> (tag_extracted_name, tags)``, cached.

    ``stats_config`` is an ``envoy.config.metrics.v3.StatsConfig`` (or None): honours
    ``use_all_default_tags`` and ``stats_tags`` (custom ``regex`` or ``fixed_value``, or a
    bare ``tag_name`` that selects one of the defaults). ``cli_tags`` are ``--stats-tag``
    fixed tags.
    """

    __slots__ = ("_no_prefix", "_by_prefix", "_cache", "_by_name")

    def __init__(self, stats_config: Any = None, cli_tags: Iterable[tuple[str, str]] = ()) -> None:
        self._no_prefix: list[_Extractor] = []
        self._by_prefix: dict[str, list[_Extractor]] = {}
        self._by_name: dict[str, _Extractor] = {}
        self._cache: dict[str, tuple[str, Tags]] = {}
        use_defaults = True
        if stats_config is not None and stats_config.HasField("use_all_default_tags"):
            use_defaults = stats_config.use_all_default_tags.value
        if use_defaults:
            for name, rx, substr, neg in _DEFAULT_REGEXES:
                self._add(_RegexExtractor(name, _expand(rx), substr, neg))
            for name, pattern in _DEFAULT_TOKENIZED:
                self._add(_TokenExtractor(name, pattern))
        for name, value in cli_tags:
            self._add(_FixedExtractor(name, value))
        if stats_config is not None:
            for spec in stats_config.stats_tags:
                which = spec.WhichOneof("tag_value")
                if which == "fixed_value":
                    self._add(_FixedExtractor(spec.tag_name, spec.fixed_value))
                elif spec.regex:
                    self._add(_RegexExtractor(spec.tag_name, spec.regex, re2=False))
                else:
                    if not self._add_defaults_named(spec.tag_name):
                        raise ValueError(
                            "No regex specified for tag specifier and no default regex for "
                            f"name: '{spec.tag_name}'"
                        )

    def _add_defaults_named(self, tag_name: str) -> int:
        n = 0
        for name, rx, substr, neg in _DEFAULT_REGEXES:
            if name == tag_name:
                self._add(_RegexExtractor(name, _expand(rx), substr, neg))
                n += 1
        for name, pattern in _DEFAULT_TOKENIZED:
            if name == tag_name:
                self._add(_TokenExtractor(name, pattern))
                n += 1
        return n

    def _add(self, ex: _Extractor) -> None:
        other = self._by_name.get(ex.name)
        if other is not None:
            other.dup = ex.dup = True
        else:
            self._by_name[ex.name] = ex
        if ex.prefix:
            self._by_prefix.setdefault(ex.prefix, []).append(ex)
        else:
            self._no_prefix.append(ex)

    def produce(self, name: str) -> tuple[str, Tags]:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        tags: list[tuple[str, str]] = []
        removes: list[tuple[int, int]] = []
        tokens = name.split(".")
        extractors = self._no_prefix
        dot = name.find(".")
        if dot >= 0:
            group = self._by_prefix.get(name[:dot])
            if group:
                extractors = extractors + group
        matched: set[str] = set()
        for ex in extractors:
            if ex.dup and ex.name in matched:
                continue
            if ex.extract(name, tokens, tags, removes) and ex.dup:
                matched.add(ex.name)
        result = (_remove_chars(name, removes) if removes else name, tuple(tags))
        self._cache[name] = result
        return result


def _remove_chars(name: str, removes: list[tuple[int, int]]) -> str:
    out = []
    pos = 0
    for start, end in sorted(removes):
        if start > pos:
            out.append(name[pos:start])
        pos = max(pos, end)
    out.append(name[pos:])
    return "".join(out)


_PROM_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_metric_name(tag_extracted_name: str) -> str:
    """``envoy_`` + the tag-extracted name with every non ``[a-zA-Z0-9_]`` char as ``_``."""
    return "envoy_" + _PROM_INVALID.sub("_", tag_extracted_name)


def _prom_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_prometheus_tags(tags: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{_PROM_INVALID.sub("_", k)}="{_prom_value(v)}"' for k, v in tags)


def _token_key(name: str) -> list[str]:
    # Envoy's StatNameLessThan compares symbol by symbol (the dot-separated tokens).
    return name.split(".")


# --------------------------------------------------------------------------------------
# Query parameters
# --------------------------------------------------------------------------------------


class StatsParamsError(Exception):
    """A bad query: ``message`` is Envoy's response body, ``status`` the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


_TYPES = {"All", "Counters", "Gauges", "Histograms", "TextReadouts"}
_FORMATS = {"text", "json", "prometheus", "html", "active-html"}
_BUCKET_MODES = {"cumulative", "disjoint", "detailed", "summary", "prometheusnative"}

_RE2_MESSAGES = (
    ("missing ), unterminated subpattern", "missing )"),
    ("unbalanced parenthesis", "unexpected )"),
    ("nothing to repeat", "no argument for repetition operator"),
    ("multiple repeat", "bad repetition operator"),
    ("unterminated character set", "missing ]"),
    ("bad escape", "invalid escape sequence"),
)


def _compile_filter(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        msg = str(e.msg)
        for py, re2 in _RE2_MESSAGES:
            if msg.startswith(py):
                msg = re2
                break
        raise StatsParamsError(f"Invalid re2 regex: {msg}: {pattern}") from None


class StatsParams:
    """Envoy's StatsParams: parsed ``/stats`` and ``/stats/prometheus`` query parameters.

    Only the first value of a repeated parameter counts; flags (``usedonly``,
    ``invert_filter``, ``text_readouts``) count by presence, whatever their value.
    """

    __slots__ = (
        "filter",
        "invert_filter",
        "used_only",
        "type",
        "format",
        "histogram_buckets",
        "text_readouts",
    )

    def __init__(self) -> None:
        self.filter: re.Pattern[str] | None = None
        self.invert_filter = False
        self.used_only = False
        self.type = "All"
        self.format = "text"
        self.histogram_buckets = "unset"
        self.text_readouts = False

    @classmethod
    def parse(cls, query: Mapping[str, Sequence[str]], prometheus: bool = False) -> StatsParams:
        p = cls()
        p.used_only = "usedonly" in query
        p.invert_filter = "invert_filter" in query
        p.text_readouts = "text_readouts" in query
        if "filter" in query:
            pattern = query["filter"][0]
            if pattern:
                p.filter = _compile_filter(pattern)
        if "type" in query:
            t = query["type"][0]
            if t not in _TYPES:
                raise StatsParamsError("invalid &type= param")
            p.type = t
        if "histogram_buckets" in query:
            mode = query["histogram_buckets"][0]
            if mode not in _BUCKET_MODES:
                raise StatsParamsError(
                    "usage: /stats?histogram_buckets=(cumulative|disjoint|detailed|summary"
                    "|prometheusnative)\n"
                )
            p.histogram_buckets = mode
        if prometheus:
            p.format = "prometheus"
            if p.histogram_buckets in ("disjoint", "detailed"):
                raise StatsParamsError("unsupported prometheus histogram bucket mode")
            if p.histogram_buckets == "prometheusnative":
                raise StatsParamsError(
                    "unsupported prometheusnative histogram type when not using protobuf "
                    "exposition format"
                )
        elif "format" in query:
            fmt = query["format"][0]
            if fmt not in _FORMATS:
                raise StatsParamsError(
                    "usage: /stats?format=(html|active-html|json|prometheus|text)\n\n"
                )
            p.format = fmt
        return p

    def show(self, stat: Counter | Gauge | Histogram) -> bool:
        if self.used_only:
            if isinstance(stat, Histogram):
                if not stat.used:
                    return False
            elif not (stat.used or stat.value):
                return False
        if self.filter is not None:
            if (self.filter.search(stat.name) is None) != self.invert_filter:
                return False
        return True


# --------------------------------------------------------------------------------------
# Histogram statistics
# --------------------------------------------------------------------------------------


def _quantiles(counts: Sequence[int], bounds: Sequence[float]) -> list[float]:
    """Quantiles by linear interpolation inside the bucket holding each rank."""
    total = sum(counts)
    if total == 0:
        return [_NAN] * len(SUPPORTED_QUANTILES)
    out = []
    top = bounds[-1] * 2 if bounds else 1.0
    for q in SUPPORTED_QUANTILES:
        target = q * total
        running = 0
        lower = 0.0
        value = lower
        for i, c in enumerate(counts):
            upper = bounds[i] if i < len(bounds) else top
            if c and running + c >= target:
                value = lower + (upper - lower) * ((target - running) / c)
                break
            running += c
            lower = upper
        else:
            value = lower
        out.append(value)
    return out


def _cumulate(counts: Sequence[int], n: int) -> list[int]:
    out = []
    running = 0
    for c in counts[:n]:
        running += c
        out.append(running)
    return out


class _Interval:
    """A histogram's last completed flush interval."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self, counts: list[int], total: float, count: int) -> None:
        self.counts = counts
        self.sum = total
        self.count = count


# --------------------------------------------------------------------------------------
# The renderer
# --------------------------------------------------------------------------------------


class StatsRender:
    """Renders one Store; keeps the Prometheus name cache and histogram intervals."""

    __slots__ = ("tag_producer", "_prom", "_intervals", "_snapshots")

    def __init__(self, tag_producer: TagProducer | None = None) -> None:
        self.tag_producer = tag_producer or TagProducer()
        self._prom: dict[str, tuple[str, str, str]] = {}
        self._intervals: dict[str, _Interval] = {}
        self._snapshots: dict[str, tuple[list[int], float, int]] = {}

    # ---- histogram intervals

    def flush_histograms(self, store: Store) -> None:
        """Close the current interval (Envoy merges histograms on each stats flush)."""
        for name, h in store.histograms.items():
            prev = self._snapshots.get(name)
            counts = list(h.counts)
            if prev is None or len(prev[0]) != len(counts) or h.count < prev[2]:
                delta = counts
                dsum, dcount = h.sum, h.count
            else:
                delta = [a - b for a, b in zip(counts, prev[0], strict=True)]
                dsum, dcount = h.sum - prev[1], h.count - prev[2]
            self._intervals[name] = _Interval(delta, dsum, dcount)
            self._snapshots[name] = (counts, h.sum, h.count)

    def _interval(self, h: Histogram) -> _Interval:
        iv = self._intervals.get(h.name)
        if iv is None:
            return _Interval([0] * len(h.counts), 0.0, 0)
        return iv

    # ---- selection

    def _numeric(self, store: Store, params: StatsParams) -> list[Counter | Gauge]:
        out: list[Counter | Gauge] = []
        if params.type in ("All", "Counters"):
            out.extend(c for c in store.counters.values() if params.show(c))
        if params.type in ("All", "Gauges"):
            out.extend(g for g in store.gauges.values() if params.show(g))
        if params.type in ("All", "TextReadouts"):
            texts = getattr(store, "text_readouts", None)
            if texts:
                out.extend(t for t in texts.values() if params.show(t))  # type: ignore[arg-type,misc]
        return out

    def _histograms(self, store: Store, params: StatsParams) -> list[Histogram]:
        if params.type not in ("All", "Histograms"):
            return []
        hs = [h for h in store.histograms.values() if params.show(h)]
        hs.sort(key=lambda h: h.name)
        return hs

    # ---- /stats text

    def text(self, store: Store, params: StatsParams | None = None) -> str:
        params = params or StatsParams()
        numeric = self._numeric(store, params)
        numeric.sort(key=lambda s: s.name)
        lines = [
            f"{s.name}: {_jstr(s.value) if isinstance(s.value, str) else s.value}\n" for s in numeric
        ]
        mode = params.histogram_buckets
        for h in self._histograms(store, params):
            if not h.used:
                lines.append(f"{h.name}: No recorded values\n")
            elif mode == "cumulative" or mode == "disjoint":
                lines.append(f"{h.name}: {self._bucket_summary(h, mode == 'disjoint')}\n")
            elif mode == "detailed":
                iv = self._interval(h)
                lines.append(
                    f"{h.name}:\n  totals={self._detail_text(h.counts, h.bounds)}\n"
                    f"  intervals={self._detail_text(iv.counts, h.bounds)}\n"
                    f"  summary={self._quantile_summary(h)}\n"
                )
            else:
                lines.append(f"{h.name}: {self._quantile_summary(h)}\n")
        return "".join(lines)

    def _quantile_summary(self, h: Histogram) -> str:
        cum = _quantiles(h.counts, h.bounds)
        itv = _quantiles(self._interval(h).counts, h.bounds)
        return " ".join(
            f"P{label}({fmt_double(i)},{fmt_double(c)})"
            for label, i, c in zip(_PERCENTILE_LABELS, itv, cum, strict=True)
        )

    def _bucket_pairs(self, h: Histogram, disjoint: bool) -> tuple[list[int], list[int]]:
        n = len(h.bounds)
        iv = self._interval(h)
        if disjoint:
            return list(iv.counts[:n]), list(h.counts[:n])
        return _cumulate(iv.counts, n), _cumulate(h.counts, n)

    def _bucket_summary(self, h: Histogram, disjoint: bool) -> str:
        itv, cum = self._bucket_pairs(h, disjoint)
        return " ".join(f"B{_absl(b)}({i},{c})" for b, i, c in zip(h.bounds, itv, cum, strict=True))

    @staticmethod
    def _detail_buckets(
        counts: Sequence[int], bounds: Sequence[float]
    ) -> list[tuple[float, float, int]]:
        out = []
        lower = 0.0
        for i, c in enumerate(counts):
            upper = bounds[i] if i < len(bounds) else (bounds[-1] * 2 if bounds else 1.0)
            if c:
                out.append((lower, upper - lower, c))
            lower = upper
        return out

    def _detail_text(self, counts: Sequence[int], bounds: Sequence[float]) -> str:
        return ", ".join(
            f"{_absl(lo)},{_absl(w)}:{c}" for lo, w, c in self._detail_buckets(counts, bounds)
        )

    # ---- /stats?format=json

    def json(self, store: Store, params: StatsParams | None = None) -> str:
        params = params or StatsParams()
        numeric = self._numeric(store, params)
        numeric.sort(key=lambda s: s.name)
        entries = [
            f'{{"name":{_jstr(s.name)},"value":{_jstr(s.value) if isinstance(s.value, str) else s.value}}}'
            for s in numeric
        ]
        hs = self._histograms(store, params)
        if hs:
            entries.append(self._json_histograms(hs, params.histogram_buckets))
        return '{"stats":[' + ",".join(entries) + "]}"

    def _json_quantile_values(self, h: Histogram) -> str:
        cum = _quantiles(h.counts, h.bounds)
        itv = _quantiles(self._interval(h).counts, h.bounds)
        return ",".join(
            f'{{"cumulative":{json_number(c)},"interval":{json_number(i)}}}'
            for c, i in zip(cum, itv, strict=True)
        )

    def _json_histograms(self, hs: list[Histogram], mode: str) -> str:
        if mode in ("cumulative", "disjoint"):
            items = []
            for h in hs:
                itv, cum = self._bucket_pairs(h, mode == "disjoint")
                buckets = ",".join(
                    f'{{"upper_bound":{json_number(b)},"interval":{i},"cumulative":{c}}}'
                    for b, i, c in zip(h.bounds, itv, cum, strict=True)
                )
                items.append(f'{{"name":{_jstr(h.name)},"buckets":[{buckets}]}}')
            return '{"histograms":[' + ",".join(items) + "]}"
        if mode == "detailed":
            items = []
            for h in hs:
                totals = self._json_detail(h.counts, h.bounds)
                intervals = self._json_detail(self._interval(h).counts, h.bounds)
                items.append(
                    f'{{"name":{_jstr(h.name)},"totals":[{totals}],"intervals":[{intervals}],'
                    f'"percentiles":[{self._json_quantile_values(h)}]}}'
                )
            return (
                '{"histograms":{"supported_percentiles":'
                + _JSON_SUPPORTED
                + ',"details":['
                + ",".join(items)
                + "]}}"
            )
        items = [
            f'{{"name":{_jstr(h.name)},"values":[{self._json_quantile_values(h)}]}}' for h in hs
        ]
        return (
            '{"histograms":{"supported_quantiles":'
            + _JSON_SUPPORTED
            + ',"computed_quantiles":['
            + ",".join(items)
            + "]}}"
        )

    def _json_detail(self, counts: Sequence[int], bounds: Sequence[float]) -> str:
        return ",".join(
            f'{{"lower_bound":{json_number(lo)},"width":{json_number(w)},"count":{c}}}'
            for lo, w, c in self._detail_buckets(counts, bounds)
        )

    # ---- /stats/prometheus

    def prometheus_name(self, name: str) -> tuple[str, str]:
        """``(metric_name, formatted_labels)`` for a full stat name (cached)."""
        hit = self._prom.get(name)
        if hit is None:
            extracted, tags = self.tag_producer.produce(name)
            hit = (prometheus_metric_name(extracted), format_prometheus_tags(tags), extracted)
            self._prom[name] = hit
        return hit[0], hit[1]

    def _families(self, stats: Iterable[Any]) -> list[tuple[str, list[Any]]]:
        groups: dict[str, list[Any]] = {}
        extracted_of: dict[str, str] = {}
        for s in stats:
            metric, _labels = self.prometheus_name(s.name)
            ext = self._prom[s.name][2]
            groups.setdefault(ext, []).append(s)
            extracted_of[ext] = metric
        out = []
        for ext in sorted(groups, key=_token_key):
            members = groups[ext]
            members.sort(key=lambda s: _token_key(s.name))
            out.append((extracted_of[ext], members))
        return out

    def prometheus(self, store: Store, params: StatsParams | None = None) -> str:
        params = params or StatsParams()
        out: list[str] = []
        show_num = params.type
        for kind, source in (("counter", store.counters), ("gauge", store.gauges)):
            if show_num not in ("All", "Counters" if kind == "counter" else "Gauges"):
                continue
            for metric, members in self._families(s for s in source.values() if params.show(s)):
                out.append(f"# TYPE {metric} {kind}\n")
                for s in members:
                    out.append(f"{metric}{{{self._prom[s.name][1]}}} {s.value}\n")
        if show_num in ("All", "Histograms"):
            summary = params.histogram_buckets == "summary"
            hs = (h for h in store.histograms.values() if params.show(h))
            for metric, members in self._families(hs):
                out.append(f"# TYPE {metric} {'summary' if summary else 'histogram'}\n")
                for h in members:
                    tags = self._prom[h.name][1]
                    htags = tags + "," if tags else ""
                    if summary:
                        iv = self._interval(h)
                        for q, v in zip(
                            SUPPORTED_QUANTILES, _quantiles(iv.counts, h.bounds), strict=True
                        ):
                            out.append(f'{metric}{{{htags}quantile="{fmt_double(q)}"}} {_g32(v)}\n')
                        total, count = iv.sum, iv.count
                    else:
                        for b, c in zip(h.bounds, _cumulate(h.counts, len(h.bounds)), strict=True):
                            out.append(f'{metric}_bucket{{{htags}le="{_g32(b)}"}} {c}\n')
                        out.append(f'{metric}_bucket{{{htags}le="+Inf"}} {h.count}\n')
                        total, count = h.sum, h.count
                    out.append(f"{metric}_sum{{{tags}}} {_g32(total)}\n")
                    out.append(f"{metric}_count{{{tags}}} {count}\n")
        return "".join(out)

    # ---- dispatch

    def render(self, store: Store, params: StatsParams) -> tuple[str, str]:
        """``(content_type, body)`` for ``params.format``."""
        if params.format == "json":
            return "application/json", self.json(store, params)
        if params.format == "prometheus":
            return "text/plain; charset=UTF-8", self.prometheus(store, params)
        if params.format in ("html", "active-html"):
            return "text/html; charset=UTF-8", _html_page(self.text(store, params))
        return "text/plain; charset=UTF-8", self.text(store, params)


def _jstr(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _html_page(text: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n  <title>Envoy Admin</title>\n</head>\n"
        "<body>\n<pre>\n" + html.escape(text) + "</pre>\n</body>\n</html>\n"
    )
