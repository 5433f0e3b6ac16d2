"""The router filter: route -> cluster -> host -> pooled upstream connection, and back.

Strategy: the router is the last decoder filter. On request headers it resolves the route
(cached by the stream), answers direct responses and redirects locally, picks a host from
the cluster's load balancer, applies the route's rewrites and header mutations, and asks
the host's connection pool for a connection. It is itself the pool's stream callbacks: the
upstream response is handed straight to ``callbacks.encode_*`` (through the encoder
filters to the codec). Body bytes are streamed both ways; back-pressure is forwarded with
read-disable on the other side. The global route timeout is a shared TimeoutQueue entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from envoy.extensions.filters.http.router.v3 import router_pb2

from pyenvoy import stream_info as sinfo
from pyenvoy.config.errors import ConfigError
from pyenvoy.extensions import registry
from pyenvoy.http import filter as hf
from pyenvoy.http import http1
from pyenvoy.http.headers import ResponseHeaders
from pyenvoy.stats import StatsStruct
from pyenvoy.timeouts import Timeout, queue_for
from pyenvoy.upstream.conn_pool import CONNECTION_TERMINATION, PROTOCOL_ERROR
from pyenvoy.upstream.load_balancer import LoadBalancerContext

if TYPE_CHECKING:
    from pyenvoy.http.headers import RequestHeaders
    from pyenvoy.upstream.conn_pool import ActiveClient, Http1ConnPool

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. reset reason: "
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_TIMEOUT_HEADER_VALUES: dict[float, bytes] = {}


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


class RouterConfig:
    __slots__ = ("cluster_manager", "stats", "suppress_envoy_headers", "timeout_queues")

    def __init__(self, proto: router_pb2.Router | None, ctx: registry.FactoryContext) -> None:
        self.cluster_manager = ctx.cluster_manager
        hcm = ctx.extra.get("hcm")
        scope = hcm.router_stats_scope if hcm is not None else ctx.stats
        self.stats = RouterStats(scope)  # type: ignore[arg-type]
        self.suppress_envoy_headers = False
        # Route timeout queues by duration (a config is served by one event loop).
        self.timeout_queues: dict[float, Any] = {}
        if proto is not None:
            self.suppress_envoy_headers = proto.suppress_envoy_headers
            for f in ("upstream_http_filters",):
                if len(getattr(proto, f)):
                    raise ConfigError(f"{f} is not supported by pyenvoy yet", f"{ctx.path}.{f}")
            if len(proto.upstream_log):
                raise ConfigError("upstream_log is not supported by pyenvoy yet", f"{ctx.path}.upstream_log")


class Router(hf.StreamDecoderFilter):
    __slots__ = (
        "config",
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
        "_rq_active",
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
        self.timer: Timeout | None = None
        self.start = 0.0
        self.response_started = False
        self.done = False
        self.downstream_connection: Any = None
        self.headers: RequestHeaders | None = None
        self._rq_active = False

    # --- decoding ------------------------------------------------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        stats = self.config.stats
        stats.rq_total.value += 1
        route = cb.route()
        si = cb.stream_info
        if route is None:
            stats.no_route.value += 1
            # A CONNECT nobody routes can't continue on this connection.
            cb.send_local_reply(
                404, b"", "route_not_found", sinfo.NO_ROUTE_FOUND, close=headers.method == b"CONNECT"
            )
            return hf.STOP_ITERATION
        self.route = route
        if route.idle_timeout is not None:
            cb.set_idle_timeout(route.idle_timeout)
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
        name = route.cluster_name
        if name is None and route.cluster_header is not None:
            v = headers.get(route.cluster_header)
            name = v.decode("latin-1") if v else None
        cluster = self.config.cluster_manager.get(name) if name else None
        if cluster is None:
            stats.no_cluster.value += 1
            cb.send_local_reply(503, b"", "cluster_not_found", sinfo.NO_CLUSTER_FOUND)
            return hf.STOP_ITERATION
        self.cluster = cluster
        info = cluster.info
        si.upstream_cluster = info.name
        lb_context = (
            LoadBalancerContext(headers, si, route.hash_policy) if cluster.lb_factory.uses_hash else None
        )
        host = cluster.choose_host(lb_context)
        if host is None:
            info.stats.upstream_cx_none_healthy.value += 1
            info.stats.record_response(503, 0.0)
            cb.send_local_reply(503, b"no healthy upstream", "no_healthy_upstream", sinfo.NO_HEALTHY_UPSTREAM)
            return hf.STOP_ITERATION
        self.host = host
        si.upstream_host = host.address
        # Header mutations (their values see the original path/host), then host and path
        # rewrites, in Envoy's order.
        envoy_headers = not self.config.suppress_envoy_headers
        timeout = route.timeout
        if envoy_headers and timeout > 0:
            value = _TIMEOUT_HEADER_VALUES.get(timeout)
            if value is None:
                value = _TIMEOUT_HEADER_VALUES[timeout] = str(int(timeout * 1000)).encode()
            headers.headers.append([b"x-envoy-expected-rq-timeout-ms", value])
        route.finalize_request_headers(headers, si, envoy_headers)
        if route.auto_host_rewrite and host.hostname:
            route.update_authority(headers, host.hostname.encode(), envoy_headers)
        route.rewrite_path(headers, envoy_headers)
        self.headers = headers
        self.request_end = end_stream
        self.downstream_connection = cb.connection
        if not end_stream and headers.get(b"content-length") is None:
            self.chunked = True
            headers.headers.append([b"transfer-encoding", b"chunked"])
        elif end_stream and headers.method in _BODY_METHODS and headers.get(b"content-length") is None:
            headers.headers.append([b"content-length", b"0"])
        if end_stream:
            self._start_timer()
        cb.add_downstream_watermark_callbacks(self)
        self.start = time.monotonic()
        pool = host.http_pool
        if pool is None:
            pool = self.config.cluster_manager.http_conn_pool(host)
        self.pool = pool
        info.stats.upstream_rq_total.value += 1
        info.stats.upstream_rq_active.value += 1
        host.stats.rq_total.value += 1
        self._rq_active = True
        self.pending = True
        pool.new_stream(self)
        return hf.STOP_ITERATION

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        if self.done:
            return hf.STOP_ITERATION_NO_BUFFER
        if end_stream:
            self.request_end = True
            self._start_timer()
        client = self.client
        if client is None:
            buf = self.buffer
            if buf is None:
                buf = self.buffer = []
            if data:
                buf.append(data)
                if sum(len(b) for b in buf) > self.cluster.info.per_connection_buffer_limit_bytes:
                    self.callbacks.on_decoder_filter_above_write_buffer_high_watermark()
            return hf.STOP_ITERATION_NO_BUFFER
        self._send_body(client, data, end_stream)
        return hf.STOP_ITERATION_NO_BUFFER

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
            if timeout > 0:
                queues = self.config.timeout_queues
                q = queues.get(timeout)
                if q is None:
                    q = queues[timeout] = queue_for(timeout)
                self.timer = q.add(self._on_timeout)

    # --- pool callbacks ----------------------------------------------------------------------
    def on_pool_ready(self, client: ActiveClient) -> None:
        self.pending = False
        self.client = client
        headers = self.headers
        assert headers is not None
        hl = headers.headers
        if headers.authority:
            hl = [[b"host", headers.authority], *hl]
        end = self.request_end and not self.buffer
        client.encode_headers(headers.method, headers.path, hl, end)
        buf = self.buffer
        if buf:
            self.buffer = None
            data = b"".join(buf)
            self._send_body(client, data, self.request_end)
            self.callbacks.on_decoder_filter_below_write_buffer_low_watermark()
        if self.downstream_connection.above_high_watermark:
            client.read_disable(True)

    def on_pool_failure(self, reason: str, transport_failure_reason: str) -> None:
        self.pending = False
        od = self.cluster.outlier
        if od is not None:
            od.on_local_origin_failure(self.host, reason)
        self.callbacks.stream_info.set_response_flag(sinfo.UPSTREAM_CONNECTION_FAILURE)
        self._upstream_failed(reason, transport_failure_reason)

    def on_upstream_informational(self, status: int, headers: list[list[bytes]]) -> None:
        pass  # 100-continue was already answered downstream by the connection manager

    def on_upstream_headers(
        self, status: int, headers: list[list[bytes]], keep_alive: bool, end_stream: bool
    ) -> None:
        self.response_started = True
        si = self.callbacks.stream_info
        now = time.monotonic()
        si.first_upstream_rx_monotonic = now
        rh = ResponseHeaders(status, headers)
        if not self.config.suppress_envoy_headers:
            rh.headers.append([b"x-envoy-upstream-service-time", b"%d" % ((now - self.start) * 1000)])
        self.route.finalize_response_headers(rh, si, self.headers)
        if end_stream:
            self._complete(status)
        self.callbacks.encode_headers(rh, end_stream)

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            si = self.callbacks.stream_info
            self._complete(si.response_code or 200)
        self.callbacks.encode_data(data, end_stream)

    def on_upstream_reset(self, reason: str) -> None:
        self.client = None
        if self.done:
            return
        od = self.cluster.outlier
        if od is not None:
            od.on_local_origin_failure(self.host, reason)
        if reason == PROTOCOL_ERROR:
            flag = sinfo.UPSTREAM_PROTOCOL_ERROR
        elif reason == CONNECTION_TERMINATION:
            flag = sinfo.UPSTREAM_CONNECTION_TERMINATION
        else:
            flag = sinfo.UPSTREAM_REMOTE_RESET
        self.callbacks.stream_info.set_response_flag(flag)
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
        info = self.cluster.info
        info.stats.record_response(status, (time.monotonic() - self.start) * 1000)
        self.host.stats.rq_error.value += 1
        self._cleanup()
        # Envoy 1.40 names only the reset reason for plain TCP upstreams (the transport
        # failure reason stays in the response code details and access logs).
        body = _BEFORE_HEADERS + reason
        details = "upstream_reset_before_response_started{" + reason.replace(" ", "_") + "}"
        if transport_failure_reason:
            cb.stream_info.upstream_transport_failure_reason = transport_failure_reason
        cb.send_local_reply(status, body.encode(), details)

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
        info.stats.record_response(504, (time.monotonic() - self.start) * 1000)
        self._cleanup()
        cb.send_local_reply(504, b"upstream request timeout", "upstream_response_timeout")

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
        elapsed = (time.monotonic() - self.start) * 1000
        cluster = self.cluster
        cluster.info.stats.record_response(status, elapsed)
        od = cluster.outlier
        if od is not None:
            od.on_upstream_response(self.host, status)
        hs = self.host.stats
        if status >= 500:
            hs.rq_error.value += 1
        else:
            hs.rq_success.value += 1
        self.client = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self.done:
            return
        self.done = True
        t = self.timer
        if t is not None:
            t.cancel()
            self.timer = None
        if self._rq_active:
            self._rq_active = False
            self.cluster.info.stats.upstream_rq_active.value -= 1
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
        if not self.done:
            # Downstream went away (or a local reply ended the stream) mid-request.
            if self.cluster is not None and self.host is not None:
                self.cluster.info.stats.upstream_rq_tx_reset.value += 1 if self.client is not None else 0
            self._cleanup()


def _factory(proto: router_pb2.Router | None, ctx: registry.FactoryContext) -> Callable[[], Router]:
    config = RouterConfig(proto, ctx)
    return lambda: Router(config)


registry.register(
    registry.HTTP_FILTER,
    "envoy.filters.http.router",
    TYPE_URL,
    _factory,
    terminal=True,
    aliases=("envoy.router",),
)
