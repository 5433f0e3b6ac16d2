"""The router filter: route -> cluster -> host -> pooled upstream connection, and back.

Strategy: the router is the last decoder filter. On request headers it resolves the route
(cached by the stream), answers direct responses and redirects locally, picks a host from
the cluster's load balancer, applies the route's rewrites and header mutations, and asks
the host's connection pool for a connection. Body bytes are streamed both ways;
back-pressure is forwarded with read-disable on the other side.

Everything a route configures beyond "forward this" is compiled once per route into a
``RouteSettings`` (retry policy, mirrors, per-try timeouts, attempt-count headers,
priority). A route without any of it is *plain*: the router itself is the pool's stream
callbacks, the global route timeout is a shared TimeoutQueue entry, and no other object
is created per request. Otherwise the request gets an ``_Ext`` (its retry state,
buffered body, shadows, timeouts) and each attempt is an ``UpstreamRequest``
(upstream_request.py); retries wait a jittered back-off and start a new attempt on a
host the retry host predicate accepts, mirrors stream to ``ShadowRequest`` copies.
Internal requests (HCM internal_address_config) may carry Envoy's control headers
(``x-envoy-retry-on``, ``x-envoy-upstream-rq-timeout-ms`` ...): the router reads and
removes them, so on such connection managers every route takes the full path.

An upstream response gets, after ``x-envoy-upstream-service-time``, the ``set-cookie``
headers the load balancer asked for (a hash policy cookie with a ttl, generated when the
request had none: one per attempt, as Envoy; never on a local reply), then the route's
response headers. On a cluster with active health checking, an upstream response carrying
``x-envoy-immediate-health-check-fail`` (also one that is retried) fails its host at once;
the header still goes downstream.

Local replies the router sends after a route matched carry the route's response headers,
then ``x-envoy-overloaded: true`` for circuit-breaker overflows, then
``x-envoy-attempt-count`` when the virtual host asks for it (Envoy 1.40's order).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from envoy.extensions.filters.http.router.v3 import router_pb2

from pyenvoy import runtime as runtime_mod
from pyenvoy import stream_info as sinfo
from pyenvoy.config.errors import ConfigError
from pyenvoy.extensions import registry
from pyenvoy.extensions.filters.http.router import retry_state as rs
from pyenvoy.extensions.filters.http.router.upstream_request import (
    ShadowRequest,
    UpstreamRequest,
    shadow_authority,
)
from pyenvoy.http import filter as hf
from pyenvoy.http import http1
from pyenvoy.http.headers import ResponseHeaders
from pyenvoy.network.utility import local_address
from pyenvoy.stats import StatsStruct
from pyenvoy.timeouts import queue_for
from pyenvoy.upstream.circuit_breaker import resource_managers
from pyenvoy.upstream.conn_pool import (
    CONNECT_FAILURES,
    CONNECTION_TERMINATION,
    LOCAL_RESET,
    OVERFLOW,
    PROTOCOL_ERROR,
    pool_for,
)
from pyenvoy.upstream.load_balancer import LoadBalancerContext

if TYPE_CHECKING:
    from pyenvoy.http.headers import RequestHeaders
    from pyenvoy.upstream.conn_pool import ActiveClient, Http1ConnPool

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

_monotonic = time.monotonic
_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. "
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_IMMEDIATE_HC_FAIL = b"x-envoy-immediate-health-check-fail"

# Envoy's x-envoy-* request headers the router reads and consumes (internal requests only:
# the connection manager strips them from external ones).
_CONTROL_HEADERS = frozenset(
    (
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-max-retries",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-hedge-on-per-try-timeout",
        b"x-envoy-upstream-rq-timeout-alt-response",
        b"x-envoy-upstream-stream-duration-ms",
        b"x-envoy-upstream-alt-stat-name",
    )
)


class RouterStats(StatsStruct):
    """``http.<stat_prefix>.*`` counters owned by the router (Envoy's ALL_ROUTER_STATS)."""

    COUNTERS = (
        "no_cluster",
        "no_route",
        "passthrough_internal_redirect_bad_location",
        "passthrough_internal_redirect_no_route",
        "passthrough_internal_redirect_predicate",
        "passthrough_internal_redirect_too_many_redirects",
        "passthrough_internal_redirect_unsafe_scheme",
        "rq_direct_response",
        "rq_redirect",
        "rq_reset_after_downstream_response_started",
        "rq_total",
    )


class MirrorPolicy:
    """A compiled request_mirror_policies entry."""

    __slots__ = (
        "cluster",
        "cluster_header",
        "runtime_key",
        "numerator",
        "denominator",
        "disable_suffix",
    )

    def __init__(self, proto: Any) -> None:
        self.cluster: str = proto.cluster
        self.cluster_header = (
            proto.cluster_header.lower().encode() if proto.cluster_header else None
        )
        self.runtime_key = ""
        self.numerator = 100
        self.denominator = 100
        if proto.HasField("runtime_fraction"):
            rf = proto.runtime_fraction
            self.runtime_key = rf.runtime_key
            self.numerator = rf.default_value.numerator
            self.denominator = runtime_mod.DENOMINATORS.get(rf.default_value.denominator, 100)
        self.disable_suffix = bool(getattr(proto, "disable_shadow_host_suffix_append", False))


class RouteSettings:
    """What a route asks of the router beyond forwarding, compiled once per route."""

    __slots__ = (
        "plain",
        "retry_policy",
        "timeout_ms",
        "per_try_ms",
        "per_try_idle_ms",
        "mirrors",
        "attempt_count_request",
        "attempt_count_response",
        "timeout_retry_header",
        "priority",
        "buffer_limit",
        "hedge",
        "max_stream_duration",
        "request_finalize",
        "response_finalize",
        "path_rewrite",
        "request_rewrites",
        "expected_timeout_header",
    )

    def __init__(
        self,
        route: Any,
        may_be_internal: bool,
        path: str = "",
        suppress_envoy_headers: bool = False,
    ) -> None:
        vh = route.virtual_host
        table = route.table
        # Which of the route's per-request header steps have anything to do (the plain
        # path skips the calls that would be no-ops).
        self.request_finalize = bool(
            route.request_mutations
            or vh.request_mutations
            or table.request_mutations
            or route.host_rewrite_literal is not None
            or route.host_rewrite_header is not None
            or route.host_rewrite_path_regex is not None
        )
        self.response_finalize = bool(
            route.response_mutations or vh.response_mutations or table.response_mutations
        )
        self.path_rewrite = bool(route.prefix_rewrite or route.regex_rewrite is not None)
        # Any of the three request rewrite steps (mutations/host rewrites, auto host
        # rewrite, path rewrite): the plain path skips all three checks when none applies.
        self.request_rewrites = bool(
            self.request_finalize or route.auto_host_rewrite or self.path_rewrite
        )
        # The plain path's x-envoy-expected-rq-timeout-ms value (None: not sent).
        self.expected_timeout_header: bytes | None = (
            str(int(route.timeout * 1000)).encode()
            if not suppress_envoy_headers and route.timeout > 0
            else None
        )
        proto = route.retry_policy
        rpath = path
        if proto is not None and proto is getattr(vh, "retry_policy", None) and "routes[" in path:
            rpath = path.split(".routes[", 1)[0]
        self.retry_policy = (
            rs.RetryPolicy.from_proto(proto, f"{rpath}.retry_policy" if rpath else "retry_policy")
            if proto is not None
            else None
        )
        # Envoy: a route with max_stream_duration uses the "new" timeouts (the route
        # timeout is then not applied by the router).
        msd = getattr(route, "max_stream_duration", None)
        self.max_stream_duration: float | None = msd
        self.timeout_ms = 0 if msd is not None else int(round(route.timeout * 1000))
        p = self.retry_policy
        self.per_try_ms = int(round(p.per_try_timeout * 1000)) if p is not None else 0
        self.per_try_idle_ms = int(round(p.per_try_idle_timeout * 1000)) if p is not None else 0
        self.mirrors = tuple(MirrorPolicy(m) for m in route.request_mirror_policies)
        self.attempt_count_request = bool(getattr(vh, "include_request_attempt_count", False))
        self.attempt_count_response = bool(getattr(vh, "include_attempt_count_in_response", False))
        self.timeout_retry_header = bool(getattr(vh, "include_is_timeout_retry_header", False))
        self.priority = 1 if route.priority == 1 else 0
        self.buffer_limit: int | None = route.per_request_buffer_limit_bytes
        self.hedge = bool(getattr(route, "hedge_on_per_try_timeout", False))
        self.plain = not (
            proto is not None
            or self.mirrors
            or route.weighted_clusters
            or self.attempt_count_request
            or self.attempt_count_response
            or self.priority
            or self.hedge
            or msd is not None
            or may_be_internal
        )


class RouterConfig:
    __slots__ = (
        "cluster_manager",
        "stats",
        "suppress_envoy_headers",
        "respect_expected_rq_timeout",
        "timeout_queues",
        "runtime",
        "route_settings",
        "may_be_internal",
        "_retry_stats",
        "_internal_stats",
    )

    def __init__(self, proto: router_pb2.Router | None, ctx: registry.FactoryContext) -> None:
        self.cluster_manager = ctx.cluster_manager
        hcm = ctx.extra.get("hcm")
        scope = hcm.router_stats_scope if hcm is not None else ctx.stats
        self.stats = RouterStats(scope)  # type: ignore[arg-type]
        self.suppress_envoy_headers = False
        self.respect_expected_rq_timeout = False
        # Route timeout queues by duration (a config is served by one event loop).
        self.timeout_queues: dict[float, Any] = {}
        self.runtime = runtime_mod.for_server(ctx.server)
        self.may_be_internal = bool(getattr(hcm, "internal_networks", None))
        self.route_settings: dict[Any, RouteSettings] = {}
        self._retry_stats: dict[tuple[Any, int], tuple[Any, ...]] = {}
        self._internal_stats: dict[tuple[Any, int], tuple[Any, ...]] = {}
        if proto is not None:
            self.suppress_envoy_headers = proto.suppress_envoy_headers
            self.respect_expected_rq_timeout = proto.respect_expected_rq_timeout
            for f in ("upstream_http_filters",):
                if len(getattr(proto, f)):
                    raise ConfigError(f"{f} is not supported by pyenvoy yet", f"{ctx.path}.{f}")
            if len(proto.upstream_log):
                raise ConfigError(
                    "upstream_log is not supported by pyenvoy yet", f"{ctx.path}.upstream_log"
                )
        # Circuit breakers exist from startup (their gauges show the limits at once), not
        # from a cluster's first request.
        clusters = getattr(self.cluster_manager, "clusters", None)
        if clusters:
            for c in list(clusters.values()):
                resource_managers(c.info, self.runtime)
        table = getattr(hcm, "route_table", None)
        if table is not None:
            base = ctx.path.rsplit(".http_filters[", 1)[0] + ".route_config"
            for i, vh in enumerate(table.virtual_hosts):
                for j, route in enumerate(vh.routes):
                    if route.direct_response is None and route.redirect is None:
                        self.route_settings[route] = RouteSettings(
                            route,
                            self.may_be_internal,
                            f"{base}.virtual_hosts[{i}].routes[{j}].route",
                            self.suppress_envoy_headers,
                        )

    def settings_for(self, route: Any) -> RouteSettings:
        s = self.route_settings.get(route)
        if s is None:
            s = self.route_settings[route] = RouteSettings(
                route, self.may_be_internal, suppress_envoy_headers=self.suppress_envoy_headers
            )
        return s

    def charge_retry(self, info: Any, status: int) -> None:
        """``cluster.<c>.retry.upstream_rq_<code>``, ``..._<N>xx``, ``..._completed``."""
        key = (info.stats, status)
        counters = self._retry_stats.get(key)
        if counters is None:
            scope = info.stats.scope.scope("retry")
            counters = self._retry_stats[key] = (
                scope.counter(f"upstream_rq_{status}"),
                scope.counter(f"upstream_rq_{status // 100}xx"),
                scope.counter("upstream_rq_completed"),
            )
        for c in counters:
            c.value += 1

    def charge_internal(self, info: Any, status: int, ms: float | None) -> None:
        """Response stats of an internal request (``x-envoy-internal: true``): like
        ClusterStats.responses, with ``internal.`` instead of ``external.``; ``ms`` None
        counts the response without a request time."""
        key = (info.stats, status)
        entry = self._internal_stats.get(key)
        if entry is None:
            scope = info.stats.scope
            internal = scope.scope("internal")
            cls = f"upstream_rq_{status // 100}xx"
            entry = self._internal_stats[key] = (
                (
                    scope.counter(f"upstream_rq_{status}"),
                    scope.counter(cls),
                    scope.counter("upstream_rq_completed"),
                    internal.counter(f"upstream_rq_{status}"),
                    internal.counter(cls),
                    internal.counter("upstream_rq_completed"),
                ),
                (scope.histogram("upstream_rq_time"), internal.histogram("upstream_rq_time")),
            )
        for c in entry[0]:
            c.value += 1
        if ms is not None:
            for h in entry[1]:
                h.record(ms)


class _Ext:
    """Per-request state of a non-plain route (retries, mirrors, per-try timeouts)."""

    __slots__ = (
        "settings",
        "retry",
        "upstream",
        "attempt_count",
        "is_retry",
        "body",
        "body_bytes",
        "buffering",
        "buffer_limit",
        "shadows",
        "global_ms",
        "per_try_ms",
        "per_try_idle_ms",
        "rm",
        "wc",
        "cluster_name",
        "timeout_code",
        "complete_time",
        "internal",
        "upstream_started",
        "msd_timer",
    )

    def __init__(self, settings: RouteSettings) -> None:
        self.settings = settings
        self.retry: rs.RetryState | None = None
        self.upstream: UpstreamRequest | None = None
        self.attempt_count = 1
        self.is_retry = False
        self.body: list[bytes] | None = None
        self.body_bytes = 0
        self.buffering = False
        self.buffer_limit = 0
        self.shadows: list[ShadowRequest] | None = None
        self.global_ms = settings.timeout_ms
        self.per_try_ms = settings.per_try_ms
        self.per_try_idle_ms = settings.per_try_idle_ms
        self.rm: Any = None
        self.wc: Any = None
        self.cluster_name = ""
        self.timeout_code = 504
        self.complete_time = 0.0
        self.internal = False
        self.upstream_started = False
        self.msd_timer: asyncio.TimerHandle | None = None


def _header_text(headers: RequestHeaders, name: bytes | None) -> str | None:
    if not name:
        return None
    v = headers.get(name)
    return v.decode("latin-1") if v else None


def _take_control_headers(headers: RequestHeaders) -> dict[bytes, bytes] | None:
    """Remove Envoy's request control headers; their (first) values by name."""
    found: dict[bytes, bytes] | None = None
    for h in headers.headers:
        n = h[0]
        if n[:8] == b"x-envoy-" and n in _CONTROL_HEADERS:
            if found is None:
                found = {}
            found.setdefault(n, h[1])
    if found:
        headers.headers = [h for h in headers.headers if h[0] not in found]
    return found


def _ms_header(value: bytes | None) -> int | None:
    if value is None:
        return None
    v = value.strip()
    return int(v) if v.isdigit() else None


def _immediate_health_check_fail(hc: Any, host: Any, headers: list[list[bytes]]) -> None:
    """An upstream response with ``x-envoy-immediate-health-check-fail`` fails its host's
    active health check at once (Envoy's HealthCheckHostMonitor::setUnhealthy); the header
    itself goes on downstream."""
    for h in headers:
        if h[0] == _IMMEDIATE_HC_FAIL:
            hc.on_immediate_health_check_fail(host)
            return


def _reset_flag(reason: str) -> int:
    """Envoy's streamResetReasonToResponseFlag."""
    if reason in CONNECT_FAILURES:
        return sinfo.UPSTREAM_CONNECTION_FAILURE
    if reason == CONNECTION_TERMINATION:
        return sinfo.UPSTREAM_CONNECTION_TERMINATION
    if reason == LOCAL_RESET:
        return sinfo.LOCAL_RESET
    if reason == OVERFLOW:
        return sinfo.UPSTREAM_OVERFLOW
    if reason == PROTOCOL_ERROR:
        return sinfo.UPSTREAM_PROTOCOL_ERROR
    return sinfo.UPSTREAM_REMOTE_RESET


class Router(hf.StreamDecoderFilter):
    __slots__ = (
        "config",
        "callbacks",
        "route",
        "cluster",
        "host",
        "pool",
        "client",
        "pending",
        "buffer",
        "chunked",
        "request_end",
        "timer",
        "start",
        "response_started",
        "done",
        "downstream_connection",
        "headers",
        "ext",
        "msd",
        "settings",
        "lb_headers",
    )

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.callbacks: Any = None
        self.route: Any = None
        self.cluster: Any = None
        self.host: Any = None
        self.pool: Http1ConnPool | None = None
        self.client: ActiveClient | None = None
        self.pending = False
        self.buffer: list[bytes] | None = None
        self.chunked = False
        self.request_end = False
        self.timer: Any = None
        self.start = 0.0
        self.response_started = False
        self.done = False
        self.downstream_connection: Any = None
        self.headers: RequestHeaders | None = None
        self.ext: _Ext | None = None
        self.msd: asyncio.TimerHandle | None = None
        # Response headers the load balancer asked for (a generated hash-policy cookie).
        self.lb_headers: list[list[bytes]] | None = None

    # --- decoding ------------------------------------------------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        config = self.config
        stats = config.stats
        stats.rq_total.value += 1
        route = cb.route()
        si = cb.stream_info
        if route is None:
            stats.no_route.value += 1
            # A CONNECT nobody routes can't continue on this connection.
            cb.send_local_reply(
                404,
                b"",
                "route_not_found",
                sinfo.NO_ROUTE_FOUND,
                close=headers.method == b"CONNECT",
            )
            return hf.STOP_ITERATION
        self.route = route
        if route.idle_timeout is not None:
            cb.set_idle_timeout(route.idle_timeout)
        # Forwarding routes have their settings from config time (a route without is a
        # direct response, a redirect, or a route of a table newer than this config).
        settings = config.route_settings.get(route)
        if settings is None:
            direct = route.direct_response
            if direct is not None:
                stats.rq_direct_response.value += 1
                status, body = direct
                location = route.location(headers)
                cb.send_local_reply(
                    status,
                    body,
                    "direct_response",
                    headers=[(b"location", location)] if location else None,
                    modify_headers=lambda rh: route.finalize_response_headers(rh, si, headers),
                )
                return hf.STOP_ITERATION
            redirect = route.redirect
            if redirect is not None:
                stats.rq_redirect.value += 1
                location = redirect.location(headers)
                route.rewrite_path(headers)
                cb.send_local_reply(
                    redirect.response_code,
                    b"",
                    "direct_response",
                    headers=[(b"location", location)],
                    modify_headers=lambda rh: route.finalize_response_headers(rh, si, headers),
                )
                return hf.STOP_ITERATION
            settings = config.settings_for(route)
        if not settings.plain:
            return self._decode_headers_full(headers, end_stream, route, settings)
        name = route.cluster_name
        if name is None and route.cluster_header is not None:
            v = headers.get(route.cluster_header)
            name = v.decode("latin-1") if v else None
        cluster = config.cluster_manager.get(name) if name else None
        if cluster is None:
            stats.no_cluster.value += 1
            self.headers = headers
            self._local_reply(
                route.cluster_not_found_response_code,
                b"",
                "cluster_not_found",
                sinfo.NO_CLUSTER_FOUND,
                with_attempt=False,
            )
            return hf.STOP_ITERATION
        self.cluster = cluster
        si.upstream_cluster = cluster.info.name
        if cluster.lb_factory.uses_hash:
            lb_context = LoadBalancerContext(headers, si, route.hash_policy)
            host = cluster.choose_host(lb_context)
            if lb_context.response_headers_to_add:
                self._add_lb_headers(lb_context.response_headers_to_add)
        else:
            host = cluster.choose_host(None)
        if host is None:
            self.headers = headers
            self._no_healthy_upstream(True)
            return hf.STOP_ITERATION
        pool = host.http_pool
        if pool is None:
            pool = pool_for(
                host,
                config.cluster_manager,
                resource_managers(cluster.info, config.runtime).default,
            )
            if pool is None:
                self.headers = headers
                self._no_healthy_upstream(False)
                return hf.STOP_ITERATION
        self.host = host
        si.upstream_host = host.address
        si.attempt_count = 1
        # x-envoy-expected-rq-timeout-ms, then header mutations (their values see the
        # original path/host), then host and path rewrites, in Envoy's order.
        expected_timeout = settings.expected_timeout_header
        if expected_timeout is not None:
            headers.headers.append([b"x-envoy-expected-rq-timeout-ms", expected_timeout])
        if settings.request_rewrites:
            envoy_headers = not config.suppress_envoy_headers
            if settings.request_finalize:
                route.finalize_request_headers(headers, si, envoy_headers)
            if route.auto_host_rewrite and host.hostname:
                route.update_authority(headers, host.hostname.encode(), envoy_headers)
            if settings.path_rewrite:
                route.rewrite_path(headers, envoy_headers)
        self.settings = settings
        self.headers = headers
        self.request_end = end_stream
        self.downstream_connection = cb.connection
        if not end_stream or headers.method in _BODY_METHODS:
            # (a request without a body that isn't POST/PUT/PATCH needs no framing header)
            self._frame_request(headers, end_stream)
        cb.add_downstream_watermark_callbacks(self)
        self.start = _monotonic()
        if end_stream:
            self._start_timer()
        self.pool = pool
        self.pending = True
        pool.new_stream(self)
        return hf.STOP_ITERATION

    def _frame_request(self, headers: RequestHeaders, end_stream: bool) -> None:
        """Upstream HTTP/1 framing: a body of unknown length goes chunked; a bodiless
        POST/PUT/PATCH says content-length: 0."""
        if not end_stream and headers.get(b"content-length") is None:
            self.chunked = True
            headers.headers.append([b"transfer-encoding", b"chunked"])
        elif (
            end_stream
            and headers.method in _BODY_METHODS
            and headers.get(b"content-length") is None
        ):
            headers.headers.append([b"content-length", b"0"])

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        if self.done:
            return hf.STOP_ITERATION_NO_BUFFER
        if self.ext is not None:
            return self._decode_data_full(data, end_stream)
        if end_stream:
            self.request_end = True
            self.start = time.monotonic()
            self._start_timer()
        client = self.client
        if client is None:
            self._buffer_pending(data)
            return hf.STOP_ITERATION_NO_BUFFER
        self._send_body(client, data, end_stream)
        return hf.STOP_ITERATION_NO_BUFFER

    def _buffer_pending(self, data: bytes) -> None:
        """Hold body bytes until the upstream connection is ready."""
        buf = self.buffer
        if buf is None:
            buf = self.buffer = []
        if data:
            buf.append(data)
            if sum(len(b) for b in buf) > self.cluster.info.per_connection_buffer_limit_bytes:
                self.callbacks.on_decoder_filter_above_write_buffer_high_watermark()

    def _send_body(self, client: ActiveClient, data: bytes, end_stream: bool) -> None:
        if self.chunked:
            if data:
                client.encode_data(http1.encode_chunk(data), False)
            if end_stream:
                client.encode_data(http1.LAST_CHUNK, True)
        else:
            client.encode_data(data, end_stream)

    def _start_timer(self) -> None:
        route = self.route
        if self.timer is None and route is not None:
            timeout = route.timeout
            if timeout > 0.0:
                queues = self.config.timeout_queues
                q = queues.get(timeout)
                if q is None:
                    q = queues[timeout] = queue_for(timeout)
                self.timer = q.add(self._on_timeout)

    # --- pool callbacks (plain routes: the router is the pool's stream) ------------------------
    def on_pool_ready(self, client: ActiveClient) -> None:
        self.pending = False
        self.client = client
        headers = self.headers
        assert headers is not None
        hl = headers.headers
        authority = headers.authority
        if authority:
            hl = [[b"host", authority], *hl]
        buf = self.buffer
        request_end = self.request_end
        if buf:
            self.buffer = None
            client.encode_headers(headers.method, headers.path, hl, False)
            self._send_body(client, b"".join(buf), request_end)
            self.callbacks.on_decoder_filter_below_write_buffer_low_watermark()
        elif request_end and self.chunked:
            client.encode_headers(headers.method, headers.path, hl, False)
            self._send_body(client, b"", True)
        else:
            client.encode_headers(headers.method, headers.path, hl, request_end)
        if self.downstream_connection.above_high_watermark:
            client.read_disable(True)
        if client.pool.max_stream_duration > 0.0:
            self._start_upstream_max_duration(client)

    def _start_upstream_max_duration(self, client: ActiveClient) -> None:
        if self.msd is None:
            self.msd = asyncio.get_running_loop().call_later(
                client.pool.max_stream_duration, self._on_upstream_max_duration
            )

    def _write_request(self, client: ActiveClient) -> None:
        """Headers and the body so far to a new attempt's connection (full path)."""
        headers = self.headers
        assert headers is not None
        hl = headers.headers
        if headers.authority:
            hl = [[b"host", headers.authority], *hl]
        ext = self.ext
        assert ext is not None
        pending_buffer = False
        if ext.body is not None:
            buf: list[bytes] | None = ext.body
        else:
            buf = self.buffer
            self.buffer = None
            pending_buffer = bool(buf)
        data = b"".join(buf) if buf else b""
        request_end = self.request_end
        client.encode_headers(
            headers.method, headers.path, hl, request_end and not data and not self.chunked
        )
        if data or (request_end and self.chunked):
            self._send_body(client, data, request_end)
        if pending_buffer:
            self.callbacks.on_decoder_filter_below_write_buffer_low_watermark()
        if self.downstream_connection.above_high_watermark:
            client.read_disable(True)
        if client.pool.max_stream_duration > 0:
            self._start_upstream_max_duration(client)

    def on_pool_failure(self, reason: str, transport_failure_reason: str) -> None:
        self.pending = False
        si = self.callbacks.stream_info
        if reason == OVERFLOW:
            si.set_response_flag(sinfo.UPSTREAM_OVERFLOW)
        else:
            od = self.cluster.outlier
            if od is not None:
                od.on_local_origin_failure(self.host, reason)
            si.set_response_flag(sinfo.UPSTREAM_CONNECTION_FAILURE)
        self._upstream_failed(reason, transport_failure_reason)

    def on_upstream_informational(self, status: int, headers: list[list[bytes]]) -> None:
        pass  # 100-continue was already answered downstream by the connection manager

    def on_upstream_headers(
        self, status: int, headers: list[list[bytes]], keep_alive: bool, end_stream: bool
    ) -> None:
        self.response_started = True
        cb = self.callbacks
        si = cb.stream_info
        now = _monotonic()
        si.first_upstream_rx_monotonic = now
        rh = ResponseHeaders(status, headers)
        if self.request_end and not self.config.suppress_envoy_headers:
            rh.headers.append(
                [b"x-envoy-upstream-service-time", b"%d" % ((now - self.start) * 1000.0)]
            )
        lb_headers = self.lb_headers
        if lb_headers is not None:
            # Envoy adds the load balancer's set-cookie headers here, before the route's
            # response headers (never to a local reply).
            rh.headers.extend(lb_headers)
        ext = self.ext
        if ext is not None:
            self._finalize_response_full(rh, si, ext)
        else:
            hc = self.cluster.health_checker
            if hc is not None:
                _immediate_health_check_fail(hc, self.host, headers)
            if self.settings.response_finalize:
                self.route.finalize_response_headers(rh, si, self.headers)
        if end_stream:
            self._complete(status)
        cb.encode_headers(rh, end_stream)

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        cb = self.callbacks
        if end_stream:
            self._complete(cb.stream_info.response_code or 200)
        cb.encode_data(data, end_stream)

    def on_upstream_reset(self, reason: str) -> None:
        self.client = None
        if self.done:
            return
        od = self.cluster.outlier
        if od is not None:
            od.on_local_origin_failure(self.host, reason)
        self.callbacks.stream_info.set_response_flag(_reset_flag(reason))
        self._upstream_failed(reason, "")

    def _upstream_failed(self, reason: str, transport_failure_reason: str = "") -> None:
        cb = self.callbacks
        if self.response_started:
            self.config.stats.rq_reset_after_downstream_response_started.value += 1
            self._cleanup()
            cb.reset_stream()
            return
        # An invalid upstream response is a 502; every other reset before headers a 503.
        status = 502 if reason == PROTOCOL_ERROR else 503
        dropped = reason == OVERFLOW
        self._charge(status)
        if not dropped and self.host is not None:
            self.host.stats.rq_error.value += 1
        self._cleanup()
        # Envoy 1.40 names only the reset reason for plain TCP upstreams (the transport
        # failure reason stays in the response code details and access logs).
        ext = self.ext
        retried = "retried and the latest " if ext is not None and ext.is_retry else ""
        body = _BEFORE_HEADERS + retried + "reset reason: " + reason
        details = "upstream_reset_before_response_started{" + reason.replace(" ", "_") + "}"
        if transport_failure_reason:
            cb.stream_info.upstream_transport_failure_reason = transport_failure_reason
        self._local_reply(status, body.encode(), details, dropped=dropped)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        cb = self.callbacks
        info = self.cluster.info
        info.stats.upstream_rq_timeout.value += 1
        self.host.stats.rq_timeout.value += 1
        od = self.cluster.outlier
        if od is not None:
            od.on_local_origin_failure(self.host, "timeout")
        cb.stream_info.set_response_flag(sinfo.UPSTREAM_REQUEST_TIMEOUT)
        if self.response_started:
            self._cleanup()
            cb.reset_stream()
            return
        self._charge(504)
        self.host.stats.rq_error.value += 1
        self._cleanup()
        self._local_reply(504, b"upstream request timeout", "upstream_response_timeout")

    def _on_upstream_max_duration(self) -> None:
        """Cluster max_stream_duration (upstream side): Envoy's onStreamMaxDurationReached."""
        self.msd = None
        if self.done:
            return
        self.cluster.info.stats.upstream_rq_max_duration_reached.inc()
        ext = self.ext
        if ext is not None and ext.upstream is not None:
            ur = ext.upstream
            ur.reset()
            self.client = None
            if self._maybe_retry_reset(ur, LOCAL_RESET, False):
                return
            ext.upstream = None
        self._cleanup()
        cb = self.callbacks
        cb.stream_info.set_response_flag(sinfo.UPSTREAM_MAX_STREAM_DURATION_REACHED)
        if self.response_started:
            cb.reset_stream()
            return
        self._local_reply(
            504 if self.request_end else 408,
            b"upstream max stream duration reached",
            "upstream_max_stream_duration_reached",
        )

    # --- watermarks ---------------------------------------------------------------------
    def on_upstream_above_write_buffer_high_watermark(self) -> None:
        self.cluster.info.stats.upstream_flow_control_backed_up_total.value += 1
        self.callbacks.on_decoder_filter_above_write_buffer_high_watermark()

    def on_upstream_below_write_buffer_low_watermark(self) -> None:
        self.cluster.info.stats.upstream_flow_control_drained_total.value += 1
        self.callbacks.on_decoder_filter_below_write_buffer_low_watermark()

    def on_above_write_buffer_high_watermark(self) -> None:
        """The downstream can't take more: stop reading the upstream."""
        client = self.client
        if client is not None:
            self.cluster.info.stats.upstream_flow_control_paused_reading_total.value += 1
            client.read_disable(True)

    def on_below_write_buffer_low_watermark(self) -> None:
        client = self.client
        if client is not None:
            self.cluster.info.stats.upstream_flow_control_resumed_reading_total.value += 1
            client.read_disable(False)

    # --- completion ----------------------------------------------------------------------
    def _complete(self, status: int) -> None:
        if self.done:
            return
        self._charge(status)
        ext = self.ext
        od = self.cluster.outlier
        if od is not None:
            od.on_upstream_response(self.host, status)
        hs = self.host.stats
        if status >= 500:
            hs.rq_error.value += 1
        else:
            hs.rq_success.value += 1
        self.client = None
        if ext is not None:
            ur = ext.upstream
            if ur is not None:
                ext.upstream = None
                ur.cancel_timers()
                ur.client = None
        self._cleanup()

    def _charge(self, status: int, timed: bool = True) -> None:
        """A response's per-code stats and, when ``timed`` (an upstream request was made),
        its ``upstream_rq_time``."""
        ext = self.ext
        ms = (_monotonic() - self.start) * 1000.0 if timed else None
        if ext is not None and ext.internal:
            self.config.charge_internal(self.cluster.info, status, ms)
        elif ms is not None:
            self.cluster.info.stats.responses.record(status, ms)
        else:
            self.cluster.info.stats.responses.count(status)

    def _cleanup(self) -> None:
        if self.done:
            return
        self.done = True
        t = self.timer
        if t is not None:
            t.cancel()
            self.timer = None
        t = self.msd
        if t is not None:
            t.cancel()
            self.msd = None
        ext = self.ext
        if ext is not None:
            self._cleanup_ext(ext)
        if self.pending and self.pool is not None:
            self.pending = False
            self.pool.cancel(self)
        client = self.client
        if client is not None:
            self.client = None
            client.reset()
        # Still registered for downstream watermarks: harmless, both handlers do nothing once
        # ``client`` is None, and the stream drops its callback list when it finishes.

    def on_destroy(self) -> None:
        ext = self.ext
        if ext is not None and ext.shadows:
            # A request abandoned before it was complete: its shadows are cancelled too.
            for s in ext.shadows:
                if not s.request_end:
                    s.abort()
            ext.shadows = None
        if not self.done:
            # Downstream went away (or a local reply ended the stream) mid-request. Envoy's
            # HTTP/1 pool closes the upstream connection without counting
            # upstream_rq_tx_reset (only its multiplexed pools count local resets).
            self._cleanup()

    # --- local replies -------------------------------------------------------------------
    def _local_reply(
        self,
        status: int,
        body: bytes,
        details: str,
        flags: int = 0,
        dropped: bool = False,
        with_attempt: bool = True,
    ) -> None:
        """A reply of the router's own once a route matched: route response headers,
        [x-envoy-overloaded], [x-envoy-attempt-count], then the body headers."""
        cb = self.callbacks
        route = self.route
        si = cb.stream_info
        request = self.headers if self.headers is not None else cb.request_headers
        ext = self.ext
        wc = ext.wc if ext is not None else None
        attempt = (
            ext.attempt_count
            if with_attempt and ext is not None and ext.settings.attempt_count_response
            else 0
        )
        overloaded = dropped and not self.config.suppress_envoy_headers

        def modify(rh: ResponseHeaders) -> None:
            if wc is not None and wc.response_mutations:
                wc.response_mutations.apply(rh, si, request, rh)
            route.finalize_response_headers(rh, si, request)
            if overloaded:
                rh.headers.append([b"x-envoy-overloaded", b"true"])
            if attempt:
                rh.headers.append([b"x-envoy-attempt-count", b"%d" % attempt])

        cb.send_local_reply(status, body, details, flags, modify_headers=modify)

    def _no_healthy_upstream(self, none_healthy: bool) -> None:
        info = self.cluster.info
        if none_healthy:
            info.stats.upstream_cx_none_healthy.value += 1
        # Envoy counts the 503 but records no upstream_rq_time: no request went out.
        self._charge(503, timed=False)
        self._local_reply(
            503, b"no healthy upstream", "no_healthy_upstream", sinfo.NO_HEALTHY_UPSTREAM
        )

    # === the full path: retries, mirrors, per-try timeouts ==================================
    def _decode_headers_full(
        self, headers: RequestHeaders, end_stream: bool, route: Any, settings: RouteSettings
    ) -> int:
        cb = self.callbacks
        config = self.config
        si = cb.stream_info
        ext = self.ext = _Ext(settings)
        control = _take_control_headers(headers) if config.may_be_internal else None
        ext.internal = config.may_be_internal and headers.get(b"x-envoy-internal") == b"true"
        # Cluster: weighted pick, header, or the route's.
        wc = None
        if route.weighted_clusters:
            wc = route.pick_weighted_cluster(headers, random.getrandbits(64))
            name = (
                wc.name
                if wc is not None and wc.name
                else _header_text(headers, wc.cluster_header if wc else None)
            )
        else:
            name = route.cluster_name
            if name is None:
                name = _header_text(headers, route.cluster_header)
        cluster = config.cluster_manager.get(name) if name else None
        self.headers = headers
        if cluster is None:
            config.stats.no_cluster.value += 1
            self._local_reply(
                route.cluster_not_found_response_code,
                b"",
                "cluster_not_found",
                sinfo.NO_CLUSTER_FOUND,
                with_attempt=False,
            )
            return hf.STOP_ITERATION
        ext.wc = wc
        ext.cluster_name = name or ""
        self.cluster = cluster
        info = cluster.info
        si.upstream_cluster = info.name
        rm = ext.rm = resource_managers(info, config.runtime).for_priority(settings.priority)
        # Timeouts (route, then the internal request's headers).
        if control:
            self._apply_control_timeouts(ext, control)
        if ext.per_try_ms >= ext.global_ms and ext.global_ms:
            ext.per_try_ms = 0
        # Retry state (the route's policy merged with x-envoy-retry-* headers).
        policy = settings.retry_policy
        if (policy is not None and policy.retry_on) or (
            control and (b"x-envoy-retry-on" in control or b"x-envoy-retry-grpc-on" in control)
        ):
            ext.retry = rs.RetryState(policy, rm, info.stats, config.runtime, headers, control)
        # Host and pool.
        host = self._select_host(cluster, headers, si, route)
        if host is None:
            self._no_healthy_upstream(True)
            return hf.STOP_ITERATION
        pool = host.http_pool
        if pool is None:
            pool = pool_for(host, config.cluster_manager, rm)
            if pool is None:
                self._no_healthy_upstream(False)
                return hf.STOP_ITERATION
        self.host = host
        si.upstream_host = host.address
        si.attempt_count = 1
        # Request headers, in Envoy's order.
        envoy_headers = not config.suppress_envoy_headers
        expected = ext.per_try_ms if ext.per_try_ms and not settings.hedge else ext.global_ms
        if envoy_headers and expected > 0:
            headers.headers.append([b"x-envoy-expected-rq-timeout-ms", b"%d" % expected])
        if settings.attempt_count_request:
            headers.set(b"x-envoy-attempt-count", b"1")
        if wc is not None:
            if wc.request_mutations:
                wc.request_mutations.apply(headers, si, headers, None)
            if wc.host_rewrite_literal:
                headers.authority = wc.host_rewrite_literal
        if settings.request_finalize:
            route.finalize_request_headers(headers, si, envoy_headers)
        if route.auto_host_rewrite and host.hostname:
            route.update_authority(headers, host.hostname.encode(), envoy_headers)
        if settings.path_rewrite:
            route.rewrite_path(headers, envoy_headers)
        self.request_end = end_stream
        self.downstream_connection = cb.connection
        # Mirrors copy the headers as they are now (framing is added per copy).
        if settings.mirrors and headers.method != b"CONNECT":
            self._start_shadows(headers, end_stream, settings, ext)
        self._frame_request(headers, end_stream)
        retry = ext.retry
        ext.buffering = retry is not None and retry.enabled
        limit = cb.connection.buffer_limit
        if settings.buffer_limit is not None and settings.buffer_limit < limit:
            limit = settings.buffer_limit
        ext.buffer_limit = limit
        if ext.buffering:
            ext.body = []
        if settings.max_stream_duration:
            ext.msd_timer = asyncio.get_running_loop().call_later(
                settings.max_stream_duration, self._on_max_stream_duration
            )
        cb.add_downstream_watermark_callbacks(self)
        self.start = time.monotonic()
        self._start_attempt(host, pool)
        if end_stream and not self.done:
            self._on_request_complete_full(ext)
        return hf.STOP_ITERATION

    def _apply_control_timeouts(self, ext: _Ext, control: dict[bytes, bytes]) -> None:
        v = control.get(b"x-envoy-hedge-on-per-try-timeout")
        if v == b"true":
            ext.settings = _with_hedge(ext.settings, True)
        elif v == b"false":
            ext.settings = _with_hedge(ext.settings, False)
        ms = _ms_header(control.get(b"x-envoy-upstream-rq-timeout-ms"))
        if ms is not None:
            ext.global_ms = ms
        ms = _ms_header(control.get(b"x-envoy-upstream-rq-per-try-timeout-ms"))
        if ms is not None:
            ext.per_try_ms = ms
        if b"x-envoy-upstream-rq-timeout-alt-response" in control:
            ext.timeout_code = 204

    def _select_host(self, cluster: Any, headers: RequestHeaders, si: Any, route: Any) -> Any:
        lb_context = (
            LoadBalancerContext(headers, si, route.hash_policy)
            if cluster.lb_factory.uses_hash
            else None
        )
        host = cluster.choose_host(lb_context)
        if lb_context is not None and lb_context.response_headers_to_add:
            # One set of cookies per attempt, as Envoy's one chooseHost() per attempt (its
            # host re-selection happens inside, with the hash computed once).
            self._add_lb_headers(lb_context.response_headers_to_add)
        ext = self.ext
        retry = ext.retry if ext is not None else None
        if retry is None or not retry.previous_hosts:
            return host
        for attempt in range(1, retry.host_selection_max_attempts):
            if host is None or not retry.should_select_another_host(host):
                return host
            if lb_context is not None:
                lb_context.attempt = attempt  # ring hash / maglev: the next entry, same hash
            host = cluster.choose_host(lb_context)
        return host

    def _add_lb_headers(self, added: list[tuple[bytes, bytes]]) -> None:
        """Keep the headers a LoadBalancerContext collected for the response; a retry's
        host selection adds its own (Envoy sends one set-cookie per attempt)."""
        lb_headers = self.lb_headers
        if lb_headers is None:
            lb_headers = self.lb_headers = []
        lb_headers.extend([name, value] for name, value in added)

    def _start_attempt(self, host: Any, pool: Http1ConnPool) -> None:
        ext = self.ext
        assert ext is not None
        ur = UpstreamRequest(self, host, pool)
        ext.upstream = ur
        self.pool = pool
        ur.pending = True
        pool.new_stream(ur, ext.rm)

    def _decode_data_full(self, data: bytes, end_stream: bool) -> int:
        ext = self.ext
        assert ext is not None
        shadows = ext.shadows
        if shadows:
            for s in shadows:
                s.send_data(data, end_stream)
            if end_stream:
                ext.shadows = None
        if ext.buffering:
            if ext.body_bytes + len(data) > ext.buffer_limit:
                # Envoy gives up on retries (and buffering) beyond the buffer limit.
                self.cluster.info.stats.retry_or_shadow_abandoned.inc()
                retry = ext.retry
                if retry is not None:
                    retry.reset_retry()
                    ext.retry = None
                ext.buffering = False
                body = ext.body
                ext.body = None
                ur = ext.upstream
                if ur is None:
                    self._cleanup()
                    self._local_reply(
                        507,
                        b"exceeded request buffer limit while retrying upstream",
                        "request_payload_exceeded_retry_buffer_limit",
                    )
                    return hf.STOP_ITERATION_NO_BUFFER
                if ur.client is None and body:
                    self.buffer = body  # still waiting for a connection: send it then
            else:
                assert ext.body is not None
                if data:
                    ext.body.append(data)
                    ext.body_bytes += len(data)
        if end_stream:
            self.request_end = True
        client = self.client
        if client is not None:
            ur = ext.upstream
            if ur is not None:
                ur.started = True
                ur.last_activity = time.monotonic()
            self._send_body(client, data, end_stream)
        elif not ext.buffering and ext.upstream is not None:
            self._buffer_pending(data)
        if end_stream:
            self._on_request_complete_full(ext)
        return hf.STOP_ITERATION_NO_BUFFER

    def _on_request_complete_full(self, ext: _Ext) -> None:
        now = time.monotonic()
        ext.complete_time = self.start = now
        if ext.global_ms > 0 and self.timer is None:
            seconds = ext.global_ms / 1000.0
            queues = self.config.timeout_queues
            q = queues.get(seconds)
            if q is None and ext.global_ms != ext.settings.timeout_ms:
                # A header's timeout: its own timer (the queues are per route duration).
                self.timer = asyncio.get_running_loop().call_later(seconds, self._on_global_timeout)
            else:
                if q is None:
                    q = queues[seconds] = queue_for(seconds)
                self.timer = q.add(self._on_global_timeout)
        self._per_try_on_complete(ext)

    def _per_try_on_complete(self, ext: _Ext) -> None:
        ur = ext.upstream
        if ur is not None and ur.client is not None:
            ur.setup_per_try_timeouts(ext.per_try_ms / 1000.0, ext.per_try_idle_ms / 1000.0)

    # --- attempts (called by the current UpstreamRequest) ------------------------------------
    def on_attempt_ready(self, ur: UpstreamRequest, client: ActiveClient) -> None:
        ext = self.ext
        assert ext is not None
        self.pending = False
        self.client = client
        retry = ext.retry
        if retry is not None:
            retry.on_host_attempted(ur.host)
        if self.request_end:
            ur.setup_per_try_timeouts(ext.per_try_ms / 1000.0, ext.per_try_idle_ms / 1000.0)
        ur.started = True
        self._write_request(client)

    def on_attempt_failure(
        self, ur: UpstreamRequest, reason: str, transport_failure_reason: str
    ) -> None:
        ext = self.ext
        assert ext is not None
        if ext.retry is not None and reason != OVERFLOW:
            ext.retry.on_host_attempted(ur.host)
        self._attempt_reset(ur, reason, transport_failure_reason)

    def on_attempt_reset(self, ur: UpstreamRequest, reason: str) -> None:
        self.client = None
        if self.done:
            return
        self._attempt_reset(ur, reason, "")

    def _attempt_reset(
        self, ur: UpstreamRequest, reason: str, transport_failure_reason: str
    ) -> None:
        ext = self.ext
        assert ext is not None
        ur.cancel_timers()
        self.client = None
        if reason != OVERFLOW:
            od = self.cluster.outlier
            if od is not None:
                od.on_local_origin_failure(ur.host, reason)
        if self._maybe_retry_reset(ur, reason, False):
            return
        ext.upstream = None
        self.callbacks.stream_info.set_response_flag(_reset_flag(reason))
        self._upstream_failed(reason, transport_failure_reason)

    def _maybe_retry_reset(self, ur: UpstreamRequest, reason: str, timeout_retry: bool) -> bool:
        ext = self.ext
        retry = ext.retry if ext is not None else None
        if retry is None or self.response_started or ur.retried:
            return False
        assert ext is not None
        ext.upstream_started = ext.upstream_started or ur.started
        decision = retry.would_retry_from_reset(reason, ext.upstream_started)
        status = retry.should_retry(
            decision, (lambda: self._do_retry(True)) if timeout_retry else self._do_retry
        )
        if status == rs.YES:
            ur.host.stats.rq_error.value += 1
            ext.upstream = None
            self.client = None
            return True
        si = self.callbacks.stream_info
        if status == rs.NO_OVERFLOW:
            si.set_response_flag(sinfo.UPSTREAM_OVERFLOW)
        elif status == rs.NO_RETRY_LIMIT_EXCEEDED:
            si.set_response_flag(sinfo.UPSTREAM_RETRY_LIMIT_EXCEEDED)
        return False

    def on_attempt_headers(
        self,
        ur: UpstreamRequest,
        status: int,
        headers: list[list[bytes]],
        keep_alive: bool,
        end_stream: bool,
    ) -> None:
        ext = self.ext
        assert ext is not None
        hc = self.cluster.health_checker
        if hc is not None:
            # Every attempt's response counts, also one that is retried.
            _immediate_health_check_fail(hc, ur.host, headers)
        retry = ext.retry
        if retry is not None:
            decision = retry.would_retry_from_headers(status, headers)
            verdict = retry.should_retry(decision, self._do_retry)
            if verdict == rs.YES:
                od = self.cluster.outlier
                if od is not None:
                    od.on_upstream_response(ur.host, status)
                ur.host.stats.rq_error.value += 1
                self.config.charge_retry(self.cluster.info, status)
                ur.cancel_timers()
                client = ur.client
                ext.upstream = None
                self.client = None
                if not end_stream or client is None or not client.request_complete:
                    ur.reset()
                else:
                    ur.client = None  # the connection finishes this response and is reused
                return
            si = self.callbacks.stream_info
            if verdict == rs.NO_OVERFLOW:
                si.set_response_flag(sinfo.UPSTREAM_OVERFLOW)
            elif verdict == rs.NO_RETRY_LIMIT_EXCEEDED:
                si.set_response_flag(sinfo.UPSTREAM_RETRY_LIMIT_EXCEEDED)
            ext.retry = None  # should_retry() gave back any retry resource
            ext.body = None
            ext.buffering = False
        # The response started: the per-try timeout no longer applies (the idle one does).
        ur.cancel_timers(idle_too=False)
        self.on_upstream_headers(status, headers, keep_alive, end_stream)

    def _finalize_response_full(self, rh: ResponseHeaders, si: Any, ext: _Ext) -> None:
        wc = ext.wc
        if wc is not None and wc.response_mutations:
            wc.response_mutations.apply(rh, si, self.headers, rh)
        if ext.settings.response_finalize:
            self.route.finalize_response_headers(rh, si, self.headers)
        if ext.settings.attempt_count_response:
            rh.headers.append([b"x-envoy-attempt-count", b"%d" % ext.attempt_count])

    def _do_retry(self, timeout_retry: bool = False) -> None:
        ext = self.ext
        if self.done or ext is None:
            return
        cb = self.callbacks
        si = cb.stream_info
        ext.is_retry = True
        ext.attempt_count += 1
        si.attempt_count = ext.attempt_count
        config = self.config
        cluster = config.cluster_manager.get(ext.cluster_name)
        if cluster is None:
            self._no_healthy_upstream(False)
            self._cleanup()
            return
        self.cluster = cluster
        headers = self.headers
        assert headers is not None
        host = self._select_host(cluster, headers, si, self.route)
        if host is None:
            self._no_healthy_upstream(True)
            self._cleanup()
            return
        rm = ext.rm = resource_managers(cluster.info, config.runtime).for_priority(
            ext.settings.priority
        )
        pool = host.http_pool
        if pool is None:
            pool = pool_for(host, config.cluster_manager, rm)
            if pool is None:
                self._no_healthy_upstream(False)
                self._cleanup()
                return
        self.host = host
        si.upstream_host = host.address
        settings = ext.settings
        if settings.attempt_count_request:
            headers.set(b"x-envoy-attempt-count", b"%d" % ext.attempt_count)
        if settings.timeout_retry_header:
            headers.set(b"x-envoy-is-timeout-retry", b"true" if timeout_retry else b"false")
        if not config.suppress_envoy_headers:
            expected = self._expected_timeout_ms(ext)
            if expected > 0:
                headers.set(b"x-envoy-expected-rq-timeout-ms", b"%d" % expected)
        route = self.route
        if route.auto_host_rewrite and host.hostname:
            route.update_authority(
                headers, host.hostname.encode(), not config.suppress_envoy_headers
            )
        self._start_attempt(host, pool)

    def _expected_timeout_ms(self, ext: _Ext) -> int:
        """Envoy's setTimeoutHeaders: per-try (or global) minus the time since the request
        completed, at least 1 ms."""
        global_ms = ext.global_ms
        expected = ext.per_try_ms if ext.per_try_ms and not ext.settings.hedge else global_ms
        if expected <= 0:
            return 0
        if global_ms > 0:
            elapsed = int((time.monotonic() - ext.complete_time) * 1000) if ext.complete_time else 0
            expected = 1 if elapsed >= global_ms else min(expected, global_ms - elapsed)
        return expected

    # --- timeouts of the full path ---------------------------------------------------------
    def on_per_try_timeout(self, ur: UpstreamRequest) -> None:
        if self.response_started or self.done:
            return  # Envoy lets a started response run on to the global timeout
        self._per_try_timeout_common(
            ur, self.cluster.info.stats.upstream_rq_per_try_timeout, "upstream_per_try_timeout"
        )

    def on_per_try_idle_timeout(self, ur: UpstreamRequest) -> None:
        if self.done:
            return
        self._per_try_timeout_common(
            ur,
            self.cluster.info.stats.upstream_rq_per_try_idle_timeout,
            "upstream_per_try_idle_timeout",
        )

    def _per_try_timeout_common(self, ur: UpstreamRequest, counter: Any, details: str) -> None:
        ext = self.ext
        assert ext is not None
        counter.inc()
        ur.host.stats.rq_timeout.value += 1
        ur.reset()
        self.client = None
        od = self.cluster.outlier
        if od is not None:
            od.on_local_origin_failure(ur.host, "per_try_timeout")
        if self._maybe_retry_reset(ur, LOCAL_RESET, True):
            return
        if not self.response_started:
            self._charge(ext.timeout_code)
            ur.host.stats.rq_error.value += 1
        ext.upstream = None
        self._timeout_reply(details)

    def _on_global_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        ext = self.ext
        assert ext is not None
        ur = ext.upstream
        if ur is not None:
            self.cluster.info.stats.upstream_rq_timeout.inc()
            ur.host.stats.rq_timeout.value += 1
            if ur.awaiting_headers:
                od = self.cluster.outlier
                if od is not None:
                    od.on_local_origin_failure(ur.host, "timeout")
                self._charge(ext.timeout_code)
                ur.host.stats.rq_error.value += 1
            ext.upstream = None
            ur.reset()
            self.client = None
        self._timeout_reply("upstream_response_timeout")

    def _timeout_reply(self, details: str) -> None:
        cb = self.callbacks
        cb.stream_info.set_response_flag(sinfo.UPSTREAM_REQUEST_TIMEOUT)
        self._cleanup()
        if self.response_started:
            cb.reset_stream()
            return
        ext = self.ext
        code = ext.timeout_code if ext is not None else 504
        self._local_reply(code, b"upstream request timeout" if code == 504 else b"", details)

    def _on_max_stream_duration(self) -> None:
        """Route max_stream_duration reached (what Envoy's connection manager does)."""
        ext = self.ext
        if ext is not None:
            ext.msd_timer = None
        if self.done:
            return
        cb = self.callbacks
        cm = getattr(cb, "cm", None)
        if cm is not None:
            cm.stats.downstream_rq_max_duration_reached.value += 1
        cb.stream_info.set_response_flag(sinfo.DURATION_TIMEOUT)
        self._cleanup()
        if self.response_started:
            cb.reset_stream()
            return
        self._local_reply(
            504 if self.request_end else 408, b"downstream duration timeout", "max_duration_timeout"
        )

    def _cleanup_ext(self, ext: _Ext) -> None:
        retry = ext.retry
        if retry is not None:
            ext.retry = None
            retry.reset_retry()
        ur = ext.upstream
        if ur is not None:
            ext.upstream = None
            ur.reset()
        t = ext.msd_timer
        if t is not None:
            t.cancel()
            ext.msd_timer = None
        self.client = None

    # --- mirrors ---------------------------------------------------------------------------
    def _start_shadows(
        self, headers: RequestHeaders, end_stream: bool, settings: RouteSettings, ext: _Ext
    ) -> None:
        config = self.config
        rt = config.runtime
        stable_random = random.getrandbits(64)
        chunked = not end_stream and headers.get(b"content-length") is None
        for m in settings.mirrors:
            if not rt.fraction_enabled(m.runtime_key, m.numerator, m.denominator, stable_random):
                continue
            name = m.cluster or _header_text(headers, m.cluster_header)
            if not name:
                continue
            cluster = config.cluster_manager.get(name)
            if cluster is None:
                continue
            info = cluster.info
            host = cluster.choose_host(None)
            if host is None:
                info.stats.upstream_cx_none_healthy.inc()
                config.charge_internal(info, 503, 0.0)
                continue
            rm = resource_managers(info, rt).default
            pool = host.http_pool
            if pool is None:
                pool = pool_for(host, config.cluster_manager, rm)
                if pool is None:
                    continue
            authority = (
                headers.authority if m.disable_suffix else shadow_authority(headers.authority)
            )
            hl: list[list[bytes]] = [[b"host", authority]] if authority else []
            xff = None
            for h in headers.headers:
                copy = [h[0], h[1]]
                if h[0] == b"x-forwarded-for" and xff is None:
                    xff = copy
                hl.append(copy)
            hl.append([b"x-envoy-internal", b"true"])
            local = local_address().encode()
            if xff is not None:
                xff[1] = xff[1] + b"," + local if xff[1] else local
            else:
                hl.append([b"x-forwarded-for", local])
            if chunked:
                hl.append([b"transfer-encoding", b"chunked"])
            elif (
                end_stream
                and headers.method in _BODY_METHODS
                and headers.get(b"content-length") is None
            ):
                hl.append([b"content-length", b"0"])
            shadow = ShadowRequest(
                cluster,
                host,
                pool,
                headers.method,
                headers.path,
                hl,
                chunked,
                ext.buffer_limit or self.callbacks.connection.buffer_limit,
                config.charge_internal,
            )
            shadow.start_request(end_stream, ext.global_ms / 1000.0, rm)
            if not end_stream:
                if ext.shadows is None:
                    ext.shadows = []
                ext.shadows.append(shadow)


def _with_hedge(settings: RouteSettings, hedge: bool) -> RouteSettings:
    if settings.hedge == hedge:
        return settings
    copy = RouteSettings.__new__(RouteSettings)
    for name in RouteSettings.__slots__:
        setattr(copy, name, getattr(settings, name))
    copy.hedge = hedge
    return copy


def _factory(proto: router_pb2.Router | None, ctx: registry.FactoryContext) -> Callable[[], Router]:
    config = RouterConfig(proto, ctx)
    return partial(Router, config)  # a partial: no extra Python frame per stream


registry.register(
    registry.HTTP_FILTER,
    "envoy.filters.http.router",
    TYPE_URL,
    _factory,
    terminal=True,
    aliases=("envoy.router",),
)

__all__ = ["Router", "RouterConfig", "RouteSettings", "MirrorPolicy", "TYPE_URL"]
