"""Retry policies and per-request retry state (Envoy's RetryPolicyImpl / RetryStateImpl).

Strategy: a route's ``retry_policy`` proto is compiled once into an immutable RetryPolicy
(``retry_on`` bit set, status codes, header matchers, back-off, host predicate). A request
whose route has a policy, or an internal request carrying ``x-envoy-retry-on``, gets one
RetryState: it merges the request's retry headers, decides per failure whether Envoy would
retry (``would_retry_from_headers`` / ``would_retry_from_reset``), and ``should_retry``
applies the budget: the retries left on the request, then the cluster's ``max_retries``
circuit breaker. A granted retry holds one retry resource from the moment it is scheduled
until the next decision (or the end of the request) and waits a fully jittered
exponential back-off: attempt n waits a uniform random time below ``base * 2**(n-1)``,
capped at ``max_interval`` (default 10x base; base defaults to 25 ms or the runtime key
``upstream.base_retry_backoff_ms``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.http.headers import ResponseHeaders
from pyenvoy.upstream.conn_pool import CONNECT_FAILURES, OVERFLOW

if TYPE_CHECKING:
    from pyenvoy.runtime import Runtime
    from pyenvoy.upstream.circuit_breaker import ResourceManager

__all__ = [
    "RetryPolicy",
    "RetryState",
    "parse_retry_on",
    "parse_retry_grpc_on",
    "NO_RETRY",
    "RETRY_WITH_BACKOFF",
    "RETRY_IMMEDIATELY",
    "YES",
    "NO",
    "NO_OVERFLOW",
    "NO_RETRY_LIMIT_EXCEEDED",
]

# RetryPolicy::RETRY_ON_* bits.
RETRY_ON_5XX = 1 << 0
RETRY_ON_GATEWAY_ERROR = 1 << 1
RETRY_ON_CONNECT_FAILURE = 1 << 2
RETRY_ON_RETRIABLE_4XX = 1 << 3
RETRY_ON_REFUSED_STREAM = 1 << 4
RETRY_ON_GRPC_CANCELLED = 1 << 5
RETRY_ON_GRPC_DEADLINE_EXCEEDED = 1 << 6
RETRY_ON_GRPC_RESOURCE_EXHAUSTED = 1 << 7
RETRY_ON_GRPC_UNAVAILABLE = 1 << 8
RETRY_ON_GRPC_INTERNAL = 1 << 9
RETRY_ON_RETRIABLE_STATUS_CODES = 1 << 10
RETRY_ON_RESET = 1 << 11
RETRY_ON_RETRIABLE_HEADERS = 1 << 12
RETRY_ON_ENVOY_RATE_LIMITED = 1 << 13
RETRY_ON_RESET_BEFORE_REQUEST = 1 << 14
RETRY_ON_HTTP3_POST_CONNECT_FAILURE = 1 << 15
_GRPC_ANY = (
    RETRY_ON_GRPC_CANCELLED
    | RETRY_ON_GRPC_DEADLINE_EXCEEDED
    | RETRY_ON_GRPC_RESOURCE_EXHAUSTED
    | RETRY_ON_GRPC_UNAVAILABLE
    | RETRY_ON_GRPC_INTERNAL
)

_RETRY_ON = {
    "5xx": RETRY_ON_5XX,
    "gateway-error": RETRY_ON_GATEWAY_ERROR,
    "connect-failure": RETRY_ON_CONNECT_FAILURE,
    "envoy-ratelimited": RETRY_ON_ENVOY_RATE_LIMITED,
    "retriable-4xx": RETRY_ON_RETRIABLE_4XX,
    "refused-stream": RETRY_ON_REFUSED_STREAM,
    "retriable-status-codes": RETRY_ON_RETRIABLE_STATUS_CODES,
    "retriable-headers": RETRY_ON_RETRIABLE_HEADERS,
    "reset": RETRY_ON_RESET,
    "reset-before-request": RETRY_ON_RESET_BEFORE_REQUEST,
    "http3-post-connect-failure": RETRY_ON_HTTP3_POST_CONNECT_FAILURE,
}
_RETRY_GRPC_ON = {
    "cancelled": RETRY_ON_GRPC_CANCELLED,
    "deadline-exceeded": RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    "resource-exhausted": RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    "unavailable": RETRY_ON_GRPC_UNAVAILABLE,
    "internal": RETRY_ON_GRPC_INTERNAL,
}
# gRPC status -> retry bit
_GRPC_STATUS_BITS = {
    1: RETRY_ON_GRPC_CANCELLED,
    4: RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    8: RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    14: RETRY_ON_GRPC_UNAVAILABLE,
    13: RETRY_ON_GRPC_INTERNAL,
}

# RetryDecision
NO_RETRY = 0
RETRY_WITH_BACKOFF = 1
RETRY_IMMEDIATELY = 2
# RetryStatus
NO = 0
YES = 1
NO_OVERFLOW = 2
NO_RETRY_LIMIT_EXCEEDED = 3

PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
_PREVIOUS_HOSTS_URL = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_retry_on(text: str) -> tuple[int, bool]:
    """``x-envoy-retry-on`` / ``retry_on``: (bits, all tokens known)."""
    bits = 0
    valid = True
    for token in _split(text):
        b = _RETRY_ON.get(token)
        if b is None:
            valid = False
        else:
            bits |= b
    return bits, valid


def parse_retry_grpc_on(text: str) -> tuple[int, bool]:
    bits = 0
    valid = True
    for token in _split(text):
        b = _RETRY_GRPC_ON.get(token)
        if b is None:
            valid = False
        else:
            bits |= b
    return bits, valid


def _duration(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)


def _name_only_matcher(name: bytes) -> Callable[[Any], bool]:
    """``x-envoy-retriable-header-names``: a name-only (presence) matcher."""

    def present(headers: Any) -> bool:
        return headers.get(name) is not None

    return present


class RetryPolicy:
    """A compiled ``config.route.v3.RetryPolicy``."""

    __slots__ = (
        "retry_on",
        "num_retries",
        "per_try_timeout",
        "per_try_idle_timeout",
        "previous_hosts",
        "host_selection_max_attempts",
        "retriable_status_codes",
        "retriable_headers",
        "retriable_request_headers",
        "base_interval",
        "max_interval",
        "_backoff",
    )

    def __init__(self) -> None:
        self._backoff: tuple[int, int] | None = None
        self.retry_on = 0
        self.num_retries = 1
        self.per_try_timeout = 0.0
        self.per_try_idle_timeout = 0.0
        self.previous_hosts = False
        self.host_selection_max_attempts = 1
        self.retriable_status_codes: tuple[int, ...] = ()
        self.retriable_headers: tuple[Callable[[Any], bool], ...] = ()
        self.retriable_request_headers: tuple[Callable[[Any], bool], ...] = ()
        self.base_interval: float | None = None  # seconds; None: runtime / 25 ms
        self.max_interval: float | None = None

    @classmethod
    def from_proto(cls, proto: Any, path: str = "retry_policy") -> RetryPolicy:
        from pyenvoy.router.config import _header_matcher

        self = cls()
        bits, _ = parse_retry_on(proto.retry_on)
        grpc_bits, _ = parse_retry_grpc_on(proto.retry_on)
        self.retry_on = bits | grpc_bits
        if proto.HasField("num_retries"):
            self.num_retries = proto.num_retries.value
        if proto.HasField("per_try_timeout"):
            self.per_try_timeout = _duration(proto.per_try_timeout)
        if proto.HasField("per_try_idle_timeout"):
            self.per_try_idle_timeout = _duration(proto.per_try_idle_timeout)
        if proto.HasField("retry_priority"):
            raise ConfigError(
                f"retry priority {proto.retry_priority.name} is not supported by pyenvoy yet",
                f"{path}.retry_priority",
            )
        for i, pred in enumerate(proto.retry_host_predicate):
            url = pred.typed_config.type_url if pred.HasField("typed_config") else ""
            if url == _PREVIOUS_HOSTS_URL:
                self.previous_hosts = True
            elif pred.name == PREVIOUS_HOSTS and not url:
                # Envoy 1.40 finds extensions by the typed_config type URL only.
                raise ConfigError(
                    f"Didn't find a registered implementation for '{pred.name}' with type URL: ''",
                    f"{path}.retry_host_predicate[{i}]",
                )
            else:
                raise ConfigError(
                    f"retry host predicate {pred.name or url} is not supported by pyenvoy yet",
                    f"{path}.retry_host_predicate[{i}]",
                )
        if len(proto.retry_options_predicates):
            raise ConfigError(
                "retry_options_predicates is not supported by pyenvoy yet",
                f"{path}.retry_options_predicates",
            )
        if proto.HasField("rate_limited_retry_back_off"):
            raise ConfigError(
                "rate_limited_retry_back_off is not supported by pyenvoy yet",
                f"{path}.rate_limited_retry_back_off",
            )
        self.host_selection_max_attempts = max(1, proto.host_selection_retry_max_attempts or 1)
        self.retriable_status_codes = tuple(proto.retriable_status_codes)
        self.retriable_headers = tuple(
            _header_matcher(m, f"{path}.retriable_headers[{i}]")
            for i, m in enumerate(proto.retriable_headers)
        )
        self.retriable_request_headers = tuple(
            _header_matcher(m, f"{path}.retriable_request_headers[{i}]")
            for i, m in enumerate(proto.retriable_request_headers)
        )
        if proto.HasField("retry_back_off"):
            bo = proto.retry_back_off
            if not bo.HasField("base_interval"):
                raise ConfigError("base_interval: value is required", f"{path}.retry_back_off")
            base = _duration(bo.base_interval)
            if base < 0.001:
                raise ConfigError(
                    "base_interval: value must be greater than 1ms",
                    f"{path}.retry_back_off.base_interval",
                )
            self.base_interval = base
            if bo.HasField("max_interval"):
                mx = _duration(bo.max_interval)
                if mx < base:
                    raise ConfigError(
                        "retry_policy.max_interval must greater than or equal to the base_interval",
                        f"{path}.retry_back_off.max_interval",
                    )
                self.max_interval = mx
        return self

    def backoff_ms(self, runtime: Runtime | None) -> tuple[int, int]:
        """(base, max) back-off in ms; the base defaults to the runtime key
        ``upstream.base_retry_backoff_ms`` (25), the max to 10x the base."""
        cached = self._backoff
        if cached is not None:
            return cached
        if self.base_interval is not None:
            base = max(1, int(self.base_interval * 1000))
        elif runtime is not None:
            base = max(1, runtime.get_integer("upstream.base_retry_backoff_ms", 25))
        else:
            base = 25
        mx = int(self.max_interval * 1000) if self.max_interval is not None else base * 10
        if runtime is None or not runtime.dynamic or self.base_interval is not None:
            self._backoff = (base, mx)
        return base, mx


_NO_POLICY = RetryPolicy()
_NO_POLICY.num_retries = 1


class RetryState:
    """One request's retry budget and back-off (Envoy's RetryStateImpl)."""

    __slots__ = (
        "retry_on",
        "retries_remaining",
        "retriable_status_codes",
        "retriable_headers",
        "previous_hosts",
        "attempted",
        "host_selection_max_attempts",
        "resource",
        "stats",
        "next_interval",
        "max_interval",
        "armed",
        "timer",
        "callback",
    )

    def __init__(
        self,
        policy: RetryPolicy | None,
        rm: ResourceManager,
        stats: Any,
        runtime: Runtime | None = None,
        request_headers: Any = None,
        control: dict[bytes, bytes] | None = None,
    ) -> None:
        p = policy if policy is not None else _NO_POLICY
        self.retry_on = p.retry_on
        self.retries_remaining = p.num_retries
        # Shared with the policy until a request header adds to them (copy on write).
        self.retriable_status_codes: tuple[int, ...] | list[int] = p.retriable_status_codes
        self.retriable_headers: tuple[Any, ...] | list[Any] = p.retriable_headers
        self.previous_hosts = p.previous_hosts
        self.attempted: list[Any] = []
        self.host_selection_max_attempts = p.host_selection_max_attempts
        self.resource = rm.retries
        self.stats = stats
        base, mx = p.backoff_ms(runtime)
        self.next_interval = base
        self.max_interval = mx
        self.armed = False
        self.timer: asyncio.TimerHandle | None = None
        self.callback: Callable[[], None] | None = None
        if p.retriable_request_headers and request_headers is not None:
            if not any(m(request_headers) for m in p.retriable_request_headers):
                self.retry_on = 0
        if control:
            self._merge_headers(control, p)

    def _merge_headers(self, control: dict[bytes, bytes], p: RetryPolicy) -> None:
        """The request's retry headers (already removed from the request)."""
        v = control.get(b"x-envoy-retry-on")
        if v is not None:
            self.retry_on |= parse_retry_on(v.decode("latin-1"))[0]
        v = control.get(b"x-envoy-retry-grpc-on")
        if v is not None:
            self.retry_on |= parse_retry_grpc_on(v.decode("latin-1"))[0]
        if p.retriable_request_headers and not self.retry_on:
            return
        v = control.get(b"x-envoy-max-retries")
        if self.retry_on and v is not None and v.strip().isdigit():
            self.retries_remaining = int(v)
        v = control.get(b"x-envoy-retriable-status-codes")
        if v is not None:
            codes = list(self.retriable_status_codes)
            for code in v.split(b","):
                code = code.strip()
                if code.isdigit():
                    codes.append(int(code))
            self.retriable_status_codes = codes
        v = control.get(b"x-envoy-retriable-header-names")
        if v is not None:
            matchers = list(self.retriable_headers)
            for name in v.split(b","):
                name = name.strip().lower()
                if name:
                    matchers.append(_name_only_matcher(name))
            self.retriable_headers = matchers

    @property
    def enabled(self) -> bool:
        return self.retry_on != 0

    # --- decisions ----------------------------------------------------------------------
    def would_retry_from_headers(self, status: int, headers: list[list[bytes]]) -> int:
        """``headers``: the upstream response's header list."""
        retry_on = self.retry_on
        decision = NO_RETRY
        if retry_on & RETRY_ON_5XX and 500 <= status < 600:
            decision = RETRY_WITH_BACKOFF
        elif retry_on & RETRY_ON_GATEWAY_ERROR and 502 <= status <= 504:
            decision = RETRY_WITH_BACKOFF
        elif retry_on & RETRY_ON_RETRIABLE_4XX and status == 409:
            decision = RETRY_WITH_BACKOFF
        elif retry_on & RETRY_ON_RETRIABLE_STATUS_CODES and status in self.retriable_status_codes:
            decision = RETRY_WITH_BACKOFF
        elif retry_on & (RETRY_ON_RETRIABLE_HEADERS | _GRPC_ANY):
            rh = ResponseHeaders(status, headers)
            if retry_on & RETRY_ON_RETRIABLE_HEADERS:
                for m in self.retriable_headers:
                    if m(rh):
                        decision = RETRY_WITH_BACKOFF
                        break
            if decision == NO_RETRY and retry_on & _GRPC_ANY:
                v = rh.get(b"grpc-status")
                if v is not None and v.strip().isdigit():
                    bit = _GRPC_STATUS_BITS.get(int(v))
                    if bit is not None and retry_on & bit:
                        decision = RETRY_WITH_BACKOFF
        if decision == NO_RETRY and not retry_on & RETRY_ON_ENVOY_RATE_LIMITED:
            return NO_RETRY
        # A response from an upstream Envoy's rate limiter is retried only with
        # envoy-ratelimited (and then always).
        for h in headers:
            if h[0] == b"x-envoy-ratelimited":
                return RETRY_WITH_BACKOFF if retry_on & RETRY_ON_ENVOY_RATE_LIMITED else NO_RETRY
        return decision

    def would_retry_from_reset(self, reason: str, upstream_request_started: bool) -> int:
        if reason == OVERFLOW:
            return NO_RETRY
        retry_on = self.retry_on
        if reason in CONNECT_FAILURES and retry_on & RETRY_ON_CONNECT_FAILURE:
            return RETRY_WITH_BACKOFF
        if retry_on & RETRY_ON_RESET_BEFORE_REQUEST and not upstream_request_started:
            return RETRY_WITH_BACKOFF
        if retry_on & (RETRY_ON_RESET | RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR):
            return RETRY_WITH_BACKOFF
        return NO_RETRY

    def would_retry_hedge(self) -> int:
        return RETRY_WITH_BACKOFF

    def should_retry(self, decision: int, callback: Callable[[], None]) -> int:
        stats = self.stats
        if decision == NO_RETRY:
            if self.armed:
                # A retry was made and this attempt needs none: the retry succeeded.
                stats.upstream_rq_retry_success.value += 1
                self.reset_retry()
            return NO
        if self.armed or self.timer is not None:
            self.reset_retry()
        if self.retries_remaining <= 0:
            stats.upstream_rq_retry_limit_exceeded.value += 1
            return NO_RETRY_LIMIT_EXCEEDED
        self.retries_remaining -= 1
        res = self.resource
        if not res.can_create():
            stats.upstream_rq_retry_overflow.value += 1
            return NO_OVERFLOW
        res.inc()
        self.armed = True
        stats.upstream_rq_retry.value += 1
        self.callback = callback
        loop = asyncio.get_running_loop()
        if decision == RETRY_IMMEDIATELY:
            self.timer = loop.call_later(0, self._fire)
        else:
            delay_ms = self.next_backoff_ms()
            stats.upstream_rq_retry_backoff_exponential.value += 1
            self.timer = loop.call_later(delay_ms / 1000.0, self._fire)
        return YES

    def next_backoff_ms(self) -> int:
        backoff = self.next_interval
        nxt = backoff * 2
        self.next_interval = nxt if nxt <= self.max_interval else self.max_interval
        return random.getrandbits(63) % backoff

    def _fire(self) -> None:
        self.timer = None
        cb = self.callback
        self.callback = None
        if cb is not None:
            cb()

    def reset_retry(self) -> None:
        """Give back the retry resource held since the last granted retry."""
        if self.armed:
            self.armed = False
            self.resource.dec()
        t = self.timer
        if t is not None:
            t.cancel()
            self.timer = None
        self.callback = None

    # --- hosts --------------------------------------------------------------------------
    def on_host_attempted(self, host: Any) -> None:
        if self.previous_hosts:
            self.attempted.append(host)

    def should_select_another_host(self, host: Any) -> bool:
        return self.previous_hosts and host in self.attempted
