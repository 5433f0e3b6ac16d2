"""HttpConnectionManager config: validated once into an HcmConfig shared by all connections.

Strategy: everything a request needs from the proto (route table, filter factories, header
policies, timeouts, bound stats) is resolved here, at config time. The per-connection
ConnectionManager and per-request ActiveStream only read attributes of this object.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.fields import reject_unsupported, seconds
from pyenvoy.extensions import registry
from pyenvoy.http.conn_manager import ConnectionManager, http_date
from pyenvoy.network.utility import is_loopback, local_address
from pyenvoy.stats import Scope, StatsStruct
from pyenvoy.stream_info import format_address

if TYPE_CHECKING:
    from pyenvoy.http.conn_manager import ActiveStream
    from pyenvoy.http.headers import RequestHeaders, ResponseHeaders

log = logging.getLogger("pyenvoy.http")

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class HcmStats(StatsStruct):
    """``http.<stat_prefix>.*`` (Envoy's ALL_HTTP_CONN_MAN_STATS)."""

    COUNTERS = (
        "downstream_cx_delayed_close_timeout",
        "downstream_cx_destroy",
        "downstream_cx_destroy_active_rq",
        "downstream_cx_destroy_local",
        "downstream_cx_destroy_local_active_rq",
        "downstream_cx_destroy_remote",
        "downstream_cx_destroy_remote_active_rq",
        "downstream_cx_drain_close",
        "downstream_cx_http1_total",
        "downstream_cx_http2_total",
        "downstream_cx_http3_total",
        "downstream_cx_idle_timeout",
        "downstream_cx_max_duration_reached",
        "downstream_cx_max_requests_reached",
        "downstream_cx_overload_disable_keepalive",
        "downstream_cx_protocol_error",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_ssl_total",
        "downstream_cx_total",
        "downstream_cx_tx_bytes_total",
        "downstream_cx_upgrades_total",
        "downstream_flow_control_paused_reading_total",
        "downstream_flow_control_resumed_reading_total",
        "downstream_rq_1xx",
        "downstream_rq_2xx",
        "downstream_rq_3xx",
        "downstream_rq_4xx",
        "downstream_rq_5xx",
        "downstream_rq_completed",
        "downstream_rq_failed_path_normalization",
        "downstream_rq_header_timeout",
        "downstream_rq_http1_total",
        "downstream_rq_http2_total",
        "downstream_rq_http3_total",
        "downstream_rq_idle_timeout",
        "downstream_rq_max_duration_reached",
        "downstream_rq_non_relative_path",
        "downstream_rq_overload_close",
        "downstream_rq_redirected_with_normalized_path",
        "downstream_rq_rejected_via_ip_detection",
        "downstream_rq_response_before_rq_complete",
        "downstream_rq_rx_reset",
        "downstream_rq_timeout",
        "downstream_rq_too_large",
        "downstream_rq_too_many_premature_resets",
        "downstream_rq_total",
        "downstream_rq_tx_reset",
        "downstream_rq_ws_on_non_ws_route",
        "rs_too_large",
    )
    GAUGES = (
        "downstream_cx_active",
        "downstream_cx_http1_active",
        "downstream_cx_http2_active",
        "downstream_cx_http3_active",
        "downstream_cx_rx_bytes_buffered",
        "downstream_cx_ssl_active",
        "downstream_cx_tx_bytes_buffered",
        "downstream_cx_upgrades_active",
        "downstream_rq_active",
    )
    HISTOGRAMS = ("downstream_cx_length_ms", "downstream_rq_time")


class ListenerHttpStats(StatsStruct):
    """``listener.<address>.http.<stat_prefix>.*``."""

    COUNTERS = (
        "downstream_rq_1xx",
        "downstream_rq_2xx",
        "downstream_rq_3xx",
        "downstream_rq_4xx",
        "downstream_rq_5xx",
        "downstream_rq_completed",
    )


_monotonic = time.monotonic
_rid_pool: list[bytes] = []
# UUID v4 fix-ups as byte translations: the version nibble (byte 6) and the RFC 4122
# variant bits (byte 8).
_UUID_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_UUID_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))
# 32 hex digits -> the five dash-separated groups of a UUID's text form.
_UUID_GROUPS = struct.Struct("8s4s4s4s12s")
_join_dashes = b"-".join


def _new_request_id() -> bytes:
    """A random UUID v4 (what Envoy puts in x-request-id), made 64 at a time.

    The hot path pops ``_rid_pool`` itself and calls this only when it is empty; the pool is
    refilled with no Python-level loop (translate, struct unpacking and join run in C)."""
    pool = _rid_pool
    if not pool:
        raw = bytearray(os.urandom(16 * 64))
        raw[6::16] = raw[6::16].translate(_UUID_VERSION_4)
        raw[8::16] = raw[8::16].translate(_UUID_VARIANT)
        pool.extend(map(_join_dashes, _UUID_GROUPS.iter_unpack(raw.hex().encode())))
    return pool.pop()


# HCM fields that change behaviour and pyenvoy does not implement yet: rejected, never ignored.
_UNSUPPORTED_FIELDS = (
    "scoped_routes",
    "tracing",
    "http2_protocol_options",
    "http3_protocol_options",
    "original_ip_detection_extensions",
    "early_header_mutation_extensions",
    "forward_client_cert_details",
    "set_current_client_cert_details",
    "upgrade_configs",
    "request_id_extension",
    "local_reply_config",
    "typed_header_validation_config",
    "proxy_status_config",
    "path_normalization_options",
)


class HcmConfig:
    def __init__(self, proto: hcm_pb2.HttpConnectionManager, ctx: registry.FactoryContext) -> None:
        path = ctx.path
        self.proto = proto
        reject_unsupported(proto, _UNSUPPORTED_FIELDS, path)
        codec = hcm_pb2.HttpConnectionManager.CodecType.Name(proto.codec_type)
        if codec not in ("AUTO", "HTTP1"):
            raise ConfigError(
                f"codec_type {codec} is not supported by pyenvoy yet", f"{path}.codec_type"
            )
        if proto.normalize_path.value or proto.merge_slashes:
            raise ConfigError(
                "path normalization is not supported by pyenvoy yet", f"{path}.normalize_path"
            )
        self.stat_prefix = proto.stat_prefix
        root = ctx.stats
        assert root is not None
        self.stats = HcmStats(root.scope(f"http.{proto.stat_prefix}"))
        lscope: Scope | None = ctx.listener_scope
        self.listener_stats = (
            ListenerHttpStats(lscope.scope(f"http.{proto.stat_prefix}"))
            if lscope is not None
            else None
        )
        self.router_stats_scope = root.scope(f"http.{proto.stat_prefix}")
        # Counters a completed response bumps, by status class (index 1-5; 0 and 6-9 for
        # codes outside 1xx-5xx): downstream_rq_<N>xx and downstream_rq_completed, the
        # listener's twins too.
        st = self.stats
        ls = self.listener_stats
        by_class: list[tuple[Any, ...]] = []
        for cls in range(10):
            counters: list[Any] = []
            if 1 <= cls <= 5:
                counters.append(getattr(st, f"downstream_rq_{cls}xx"))
                if ls is not None:
                    counters.append(getattr(ls, f"downstream_rq_{cls}xx"))
            counters.append(st.downstream_rq_completed)
            if ls is not None:
                counters.append(ls.downstream_rq_completed)
            by_class.append(tuple(counters))
        self._completed_counters = by_class
        # Route table: inline, or swapped in by an RDS provider (``set_route_table``); a
        # stream reads ``route_table`` once when it routes, so a swap affects new streams.
        self.route_table: Any = None
        self.internal_only_headers: frozenset[bytes] = frozenset()
        self.rds_provider: Any = None
        if proto.HasField("route_config"):
            from pyenvoy.router.config import RouteTable

            rc = proto.route_config
            validate = None
            cm = ctx.cluster_manager
            if cm is not None and (
                not rc.HasField("validate_clusters") or rc.validate_clusters.value
            ):
                validate = cm.has_cluster
            self.set_route_table(
                RouteTable.from_proto(rc, f"{path}.route_config", validate_clusters=validate)
            )
        elif proto.HasField("rds"):
            providers = getattr(ctx.server, "route_config_providers", None)
            if providers is None:
                raise ConfigError(
                    "rds needs a pyenvoy Server (route config providers)", f"{path}.rds"
                )
            self.rds_provider = providers.acquire(proto.rds, proto.stat_prefix, self, f"{path}.rds")
        else:
            raise ConfigError("either route_config or rds must be set", path)
        # Header policies.
        self.server_name = (proto.server_name or "envoy").encode()
        self.server_header_transformation = proto.server_header_transformation
        self.use_remote_address = proto.use_remote_address.value
        self.xff_num_trusted_hops = proto.xff_num_trusted_hops
        self.skip_xff_append = proto.skip_xff_append
        self.via = proto.via.encode() if proto.via else None
        self.generate_request_id = (
            proto.generate_request_id.value if proto.HasField("generate_request_id") else True
        )
        self.preserve_external_request_id = proto.preserve_external_request_id
        self.always_set_request_id_in_response = proto.always_set_request_id_in_response
        self.max_request_headers_bytes = (proto.max_request_headers_kb.value or 60) * 1024
        cho = proto.common_http_protocol_options
        self.max_headers_count = (
            cho.max_headers_count.value if cho.HasField("max_headers_count") else 100
        )
        self.idle_timeout = seconds(cho, "idle_timeout", 3600.0)
        if cho.HasField("max_connection_duration") or cho.HasField("max_stream_duration"):
            raise ConfigError(
                "max_connection_duration/max_stream_duration are not supported by pyenvoy yet",
                f"{path}.common_http_protocol_options",
            )
        self.request_timeout = seconds(proto, "request_timeout", 0.0)
        self.stream_idle_timeout = seconds(proto, "stream_idle_timeout", 300.0)
        self.request_headers_timeout = seconds(proto, "request_headers_timeout", 0.0)
        if self.request_headers_timeout:
            raise ConfigError(
                "request_headers_timeout is not supported by pyenvoy yet",
                f"{path}.request_headers_timeout",
            )
        # How often a connection's idle timer wakes up when nothing is due sooner.
        self.idle_check_interval = min(
            [t for t in (self.idle_timeout, self.stream_idle_timeout) if t > 0] or [3600.0]
        )
        self.drain_timeout = seconds(proto, "drain_timeout", 5.0)
        self.delayed_close_timeout = seconds(proto, "delayed_close_timeout", 1.0)
        self.accept_http_10 = proto.http_protocol_options.accept_http_10
        self.default_host_for_http_10 = (
            proto.http_protocol_options.default_host_for_http_10.encode()
        )
        self.proxy_100_continue = proto.proxy_100_continue
        self.internal_networks = [
            ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}", strict=False)
            for r in proto.internal_address_config.cidr_ranges
        ]
        self.cluster_manager = ctx.cluster_manager
        self.server = ctx.server
        # Access logs.
        self.access_logs: list[Any] = []
        if len(proto.access_log):
            from pyenvoy.access_log import build_access_logs

            self.access_logs = build_access_logs(proto.access_log, f"{path}.access_log")
        # HTTP filters.
        self.filter_factories: list[tuple[str, Callable[[], Any]]] = []
        n = len(proto.http_filters)
        if n == 0:
            raise ConfigError(
                "http_filters must not be empty (a router filter is required)",
                f"{path}.http_filters",
            )
        from pyenvoy.config import unpack_any

        for i, hf in enumerate(proto.http_filters):
            fpath = f"{path}.http_filters[{i}]"
            if hf.disabled:
                continue
            if hf.HasField("config_discovery"):
                raise ConfigError("config_discovery (ECDS) is not supported by pyenvoy yet", fpath)
            type_url = hf.typed_config.type_url if hf.HasField("typed_config") else ""
            ext = registry.find(registry.HTTP_FILTER, hf.name, type_url)
            if ext is None:
                if hf.is_optional:
                    log.warning("optional http filter %s is not supported; skipped", hf.name)
                    continue
                registry.require(registry.HTTP_FILTER, hf.name, type_url, fpath)
                raise AssertionError("unreachable")
            if ext.terminal and i != n - 1:
                raise ConfigError(
                    f"terminal filter named {hf.name} of type {ext.name} must be the last filter "
                    "in a http filter chain.",
                    fpath,
                )
            if i == n - 1 and not ext.terminal:
                raise ConfigError(
                    f"non-terminal filter named {hf.name} of type {ext.name} is the last filter in a "
                    "http filter chain.",
                    fpath,
                )
            msg = unpack_any(hf.typed_config, f"{fpath}.typed_config") if type_url else None
            sub = registry.FactoryContext(
                cluster_manager=ctx.cluster_manager,
                stats=ctx.stats,
                server=ctx.server,
                path=f"{fpath}.typed_config",
                listener_scope=ctx.listener_scope,
                extra={"hcm": self},
            )
            self.filter_factories.append((hf.name, ext.factory(msg, sub)))
        self._makers = [m for _, m in self.filter_factories]
        self._roles: list[tuple[Callable[[], Any], bool, bool]] | None = None

    def set_route_table(self, table: Any) -> None:
        """Install a compiled route table (inline at build time, or an RDS update)."""
        self.internal_only_headers = frozenset(
            h.lower() if isinstance(h, bytes) else h.lower().encode()
            for h in (getattr(table, "internal_only_headers", None) or ())
        )
        self.route_table = table

    # --- per connection / per stream --------------------------------------------------------
    def create_connection_filter(self) -> ConnectionManager:
        return ConnectionManager(self)

    def create_filter_chain(self, stream: ActiveStream) -> list[Any]:
        """One instance of every HTTP filter for ``stream``: decoders in order, encoders
        reversed (what each filter is, is learnt from its first instance). Installs fresh
        lists as ``stream.decoder_filters`` / ``encoder_filters`` and returns the decoders."""
        roles = self._roles
        if roles is None:
            roles = self._roles = []
            for make in self._makers:
                sample = make()
                roles.append(
                    (make, hasattr(sample, "decode_headers"), hasattr(sample, "encode_headers"))
                )
        stream.decoder_filters = decoders = []
        encoders: list[Any] | None = None
        for make, dec, enc in roles:
            f = make()
            if dec:
                f.set_decoder_filter_callbacks(stream)
                decoders.append(f)
            if enc:
                f.set_encoder_filter_callbacks(stream)
                if encoders is None:
                    encoders = []
                encoders.append(f)
        if encoders is not None:
            encoders.reverse()
            stream.encoder_filters = encoders
        return decoders

    def mutate_request_headers(self, headers: RequestHeaders, stream: ActiveStream) -> None:
        """Envoy's ConnectionManagerUtility::mutateRequestHeaders (the parts pyenvoy has)."""
        si = stream.stream_info
        hl = headers.headers
        xfp = rid = None
        strip = False
        if hl:
            kind_of = _REQUEST_KINDS.get
            internal_only = self.internal_only_headers
            for h in hl:
                n = h[0]
                k = kind_of(n)
                if k is None:
                    if (n[:1] == b"x" and n.startswith(b"x-envoy-")) or n in internal_only:
                        strip = True
                elif k == 1:
                    xfp = h
                elif k == 2:
                    rid = h[1]
                else:
                    strip = True
        use_remote_address = self.use_remote_address
        # The peer's address matters only to the edge (use_remote_address) and to
        # internal_address_config.
        ip = ""
        internal = False
        if use_remote_address or self.internal_networks:
            remote = si.downstream_remote_address
            ip = remote[0] if remote else ""
            internal = self._is_internal(ip) if self.internal_networks else False
        if strip:
            headers.headers = hl = _strip_request_headers(
                hl, self.internal_only_headers, not internal
            )
        if use_remote_address:
            if not self.skip_xff_append and ip:
                # Envoy appends its own address for loopback peers.
                hop = (local_address() if is_loopback(ip) else ip).encode()
                xff = headers.get(b"x-forwarded-for")
                if xff:
                    headers.set(b"x-forwarded-for", xff + b"," + hop)
                else:
                    hl.append([b"x-forwarded-for", hop])
            headers.set(b"x-forwarded-proto", headers.scheme)
        elif xfp is None:
            hl.append([b"x-forwarded-proto", headers.scheme])
        if self.via is not None:
            via = headers.get(b"via")
            headers.set(b"via", via + b", " + self.via if via else self.via)
        if use_remote_address:
            if internal:
                hl.append([b"x-envoy-internal", b"true"])
            else:
                hl.append([b"x-envoy-external-address", ip.encode()])
        if self.generate_request_id:
            if rid is None:
                # _new_request_id() only refills the pool: pop inline.
                rid = _rid_pool.pop() if _rid_pool else _new_request_id()
                hl.append([b"x-request-id", rid])
            elif use_remote_address and not internal and not self.preserve_external_request_id:
                # An edge request's own x-request-id is replaced.
                rid = _rid_pool.pop() if _rid_pool else _new_request_id()
                headers.set(b"x-request-id", rid)
        si.request_id = rid

    def _is_internal(self, ip: str) -> bool:
        """Only addresses in internal_address_config.cidr_ranges are internal (Envoy 1.40)."""
        nets = self.internal_networks
        if not nets or not ip:
            return False
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(a in n for n in nets)

    def mutate_response_headers(self, headers: ResponseHeaders, stream: ActiveStream) -> bool:
        """Envoy's ConnectionManagerUtility::mutateResponseHeaders (the parts pyenvoy has):
        drops the hop-by-hop headers (the codec writes its own connection management), adds
        date when absent, server (per server_header_transformation), request id and via.

        Returns whether the response carries a content-length (found in the same pass over
        the headers), for the codec's framing."""
        hl = headers.headers
        has_date = has_length = False
        server_entry = drop = None
        servers = 0
        kind_of = _RESPONSE_KINDS.get
        for h in hl:
            k = kind_of(h[0])
            if k is not None:
                if k == _R_DATE:
                    has_date = True
                elif k == _R_SERVER:
                    servers += 1
                    if server_entry is None:
                        server_entry = h
                elif k == _R_CONTENT_LENGTH:
                    has_length = True
                elif drop is None:
                    drop = [h]
                else:
                    drop.append(h)
        if drop is not None:
            for h in drop:
                hl.remove(h)
        if not has_date:
            hl.append([b"date", http_date()])
        t = self.server_header_transformation
        if t == 0:  # OVERWRITE, in place as Envoy does
            if server_entry is None:
                hl.append([b"server", self.server_name])
            elif servers == 1:
                server_entry[1] = self.server_name
            else:
                headers.set(b"server", self.server_name)
        elif t == 1 and server_entry is None:  # APPEND_IF_ABSENT
            hl.append([b"server", self.server_name])
        if self.always_set_request_id_in_response:
            rid = stream.stream_info.request_id
            if rid:
                headers.set(b"x-request-id", rid)
        if self.via is not None:
            via = headers.get(b"via")
            headers.set(b"via", via + b", " + self.via if via else self.via)
        server = self.server
        if server is not None and server.healthcheck_failed and not stream.close_connection:
            # Failing health checks means draining: close connections as responses finish.
            stream.close_connection = True
            self.stats.downstream_cx_drain_close.value += 1
        return has_length

    def on_stream_complete(self, stream: ActiveStream) -> None:
        s = self.stats
        s.downstream_rq_active.value -= 1
        si = stream.stream_info
        code = si.response_code
        if code is not None and stream.response_complete and not si.health_check:
            for c in self._completed_counters[code // 100 % 10]:
                c.value += 1
        s.downstream_rq_time.record((_monotonic() - si.start_monotonic) * 1000)
        access_logs = self.access_logs
        if access_logs:
            for logger in access_logs:
                logger.log(stream.request_headers, stream.response_headers, si)


# Response headers that never go downstream as they came: the codec writes its own
# connection management and framing (transfer-encoding: chunked when there is no length).
_RESPONSE_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
# What mutate_response_headers' pass looks for.
_R_DATE = 1
_R_SERVER = 2
_R_CONTENT_LENGTH = 3
_R_HOP_BY_HOP = 4
_RESPONSE_KINDS = {
    b"date": _R_DATE,
    b"server": _R_SERVER,
    b"content-length": _R_CONTENT_LENGTH,
    **dict.fromkeys(_RESPONSE_HOP_BY_HOP, _R_HOP_BY_HOP),
}
# Request headers that never go upstream (hop-by-hop; transfer-encoding is re-added by the
# upstream codec when the body is chunked).
_REQUEST_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
# What mutate_request_headers' pass looks for: 1 x-forwarded-proto, 2 x-request-id,
# 3 a header to strip (plus x-envoy-* and internal_only_headers, checked apart).
_REQUEST_KINDS = {
    b"x-forwarded-proto": 1,
    b"x-request-id": 2,
    b"te": 3,
    **dict.fromkeys(_REQUEST_HOP_BY_HOP, 3),
}
# Envoy's x-envoy-* request headers that only Envoy may set (cleaned from external requests).
_ENVOY_INTERNAL_HEADERS = frozenset(
    (
        b"x-envoy-decorator-operation",
        b"x-envoy-downstream-service-cluster",
        b"x-envoy-downstream-service-node",
        b"x-envoy-expected-rq-timeout-ms",
        b"x-envoy-external-address",
        b"x-envoy-force-trace",
        b"x-envoy-hedge-on-per-try-timeout",
        b"x-envoy-internal",
        b"x-envoy-ip-tags",
        b"x-envoy-is-timeout-retry",
        b"x-envoy-max-retries",
        b"x-envoy-retriable-header-names",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-retry-on",
        b"x-envoy-upstream-alt-stat-name",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-upstream-rq-timeout-alt-response",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-stream-duration-ms",
    )
)


def _strip_request_headers(
    hl: list[list[bytes]], internal_only: frozenset[bytes], external: bool
) -> list[list[bytes]]:
    """Drop hop-by-hop headers, headers nominated by Connection, Envoy-internal x-envoy-*
    headers and the route table's internal_only_headers; reduce ``te`` to ``trailers``."""
    nominated: set[bytes] = set()
    for n, v in hl:
        if n == b"connection":
            for tok in v.split(b","):
                tok = tok.strip().lower()
                if tok and tok not in (b"close", b"keep-alive"):
                    nominated.add(tok)
    out = []
    for h in hl:
        n = h[0]
        if n in _REQUEST_HOP_BY_HOP or n in nominated:
            continue
        if external and (n in _ENVOY_INTERNAL_HEADERS or n in internal_only):
            continue
        if n == b"te":
            if b"trailers" not in [t.strip().lower() for t in h[1].split(b",")]:
                continue
            h = [n, b"trailers"]
        out.append(h)
    return out


def _factory(
    proto: hcm_pb2.HttpConnectionManager, ctx: registry.FactoryContext
) -> Callable[[], Any]:
    config = HcmConfig(proto, ctx)
    return config.create_connection_filter


registry.register(
    registry.NETWORK_FILTER,
    "envoy.filters.network.http_connection_manager",
    TYPE_URL,
    _factory,
    terminal=True,
    aliases=("envoy.http_connection_manager",),
)

__all__ = ["HcmConfig", "HcmStats", "format_address"]
