"""The health_check HTTP filter (Envoy's ``HealthCheckFilter``).

Strategy: ``decode_headers`` runs the compiled header matchers. A matching request is a
health check; the filter *handles* it (answers locally, stopping the chain) unless it is in
pass-through mode, where it only handles when the server is failing health checks
(admin ``POST /healthcheck/fail``) or a cached answer is fresh. The answer goes out when the
request ends (headers-only requests at once, otherwise at the last data/trailers) as a
local reply with an empty body: 200 ``health_check_ok``, or 503 ``health_check_failed`` +
response flag LH. ``encode_headers`` stamps responses as Envoy 1.40 does (observed):

- a health check response gets ``x-envoy-upstream-healthchecked-cluster: <local cluster>``
  (``--service-cluster`` / node.cluster, empty if unset), in pass-through mode too;
- while the server fails health checks, *every* response (health check or not) gets
  ``x-envoy-immediate-health-check-fail: true``.

The server state is read at request time from ``ctx.server.healthcheck_failed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyenvoy.extensions.filters.http.health_check.config import (
    HEALTH_CHECK_CACHED,
    HEALTH_CHECK_FAILED,
    HEALTH_CHECK_OK,
)
from pyenvoy.http import filter as hf
from pyenvoy.stream_info import FAILED_LOCAL_HEALTH_CHECK

if TYPE_CHECKING:
    from pyenvoy.extensions.filters.http.health_check.config import HealthCheckConfig
    from pyenvoy.http.headers import RequestHeaders, ResponseHeaders

HEALTHCHECKED_CLUSTER = b"x-envoy-upstream-healthchecked-cluster"
IMMEDIATE_HEALTH_CHECK_FAIL = b"x-envoy-immediate-health-check-fail"
DEGRADED = b"x-envoy-degraded"


def local_cluster_name(server: Any) -> bytes:
    """The server's local cluster (Envoy's ``localInfo().clusterName()``), or b""."""
    if server is None:
        return b""
    for chain in (
        ("local_info", "cluster_name"),
        ("service_cluster",),
        ("options", "service_cluster"),
        ("node", "cluster"),
    ):
        obj = server
        for attr in chain:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, str) and obj:
            return obj.encode()
        if isinstance(obj, bytes) and obj:
            return obj
    return b""


class HealthCheckFilter(hf.StreamFilter):
    __slots__ = ("config", "callbacks", "encoder_callbacks", "handling", "health_check_request")

    def __init__(self, config: HealthCheckConfig) -> None:
        self.config = config
        self.callbacks: Any = None
        self.encoder_callbacks: Any = None
        self.handling = False
        self.health_check_request = False

    def _server_failed(self) -> bool:
        return bool(getattr(self.config.server, "healthcheck_failed", False))

    # --- decoder -------------------------------------------------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        config = self.config
        if config.matches(headers):
            self.health_check_request = True
            si = getattr(self.callbacks, "stream_info", None)
            if si is not None:
                try:
                    si.health_check = True  # type: ignore[attr-defined]
                except AttributeError:
                    pass  # StreamInfo without the slot: nothing to record it in
            cache = config.cache
            if (
                not config.pass_through
                or self._server_failed()
                or (cache is not None and cache.use_cached())
            ):
                self.handling = True
        if self.handling:
            if end_stream:
                self._complete()
            return hf.STOP_ITERATION
        return hf.CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        if self.handling:
            if end_stream:
                self._complete()
            return hf.STOP_ITERATION_NO_BUFFER
        return hf.CONTINUE

    def decode_trailers(self, trailers: Any) -> int:
        if self.handling:
            self._complete()
            return hf.STOP_ITERATION
        return hf.CONTINUE

    # --- encoder -------------------------------------------------------------------------
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        if self.health_check_request:
            cache = self.config.cache
            if cache is not None:
                cache.set(headers.status, DEGRADED in headers)
            headers.set(HEALTHCHECKED_CLUSTER, local_cluster_name(self.config.server))
        if self._server_failed():
            headers.set(IMMEDIATE_HEALTH_CHECK_FAIL, b"true")
        return hf.CONTINUE

    # --- the local answer ----------------------------------------------------------------
    def _complete(self) -> None:
        config = self.config
        stats = config.stats
        stats.request_total.inc()
        status = 200
        details = HEALTH_CHECK_OK
        degraded = False
        failed_server = self._server_failed()
        if failed_server:
            status = 503
            details = HEALTH_CHECK_FAILED
        elif config.cache is not None:
            status = config.cache.status
            degraded = config.cache.degraded
            details = HEALTH_CHECK_CACHED
            stats.cached_response.inc()
        elif config.min_healthy:
            status, details = config.check_clusters()
        ok = 200 <= status < 300
        flags = 0 if ok else FAILED_LOCAL_HEALTH_CHECK
        if ok:
            stats.ok.inc()
        else:
            stats.failed.inc()
        if degraded:
            stats.degraded.inc()
        cb = self.callbacks
        if flags:
            si = getattr(cb, "stream_info", None)
            if si is not None:
                si.set_response_flag(flags)
        # The same headers encode_headers sets, given up front in case the connection
        # manager does not run local replies through the encoder filters.
        extra = [(HEALTHCHECKED_CLUSTER, local_cluster_name(config.server))]
        if failed_server:
            extra.append((IMMEDIATE_HEALTH_CHECK_FAIL, b"true"))
        if degraded:
            extra.append((DEGRADED, b""))
        if config.cache is not None:
            config.cache.set(status, degraded)
        cb.send_local_reply(status, b"", details=details, flags=flags, headers=extra)
