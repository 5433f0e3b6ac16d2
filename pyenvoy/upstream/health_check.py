"""Active health checking (HTTP, TCP, gRPC) with Envoy's per-host state machine.

Strategy: one checker per ``health_checks`` entry holds one session per host. A session is
driven by two ``loop.call_later`` timers (interval and timeout) and one health-check
connection (``health_check_codec``), exactly like Envoy's ActiveHealthCheckSession:
``on_interval`` starts a probe and arms the timeout, and every probe ends in
``handle_success`` or ``handle_failure``, which move the host through Envoy's transitions:

- hosts under active HC start ``/failed_active_hc``; the very first successful check makes a
  host healthy at once, later ones need ``healthy_threshold`` successes in a row;
- a non-retriable failure (bad status, gRPC NOT_SERVING, payload mismatch) fails a host at
  once; network failures, timeouts and ``retriable_statuses`` need ``unhealthy_threshold``;
- the next probe waits ``interval``/``unhealthy_interval``, or the ``*_edge_interval`` while a
  transition is pending, or ``no_traffic_interval`` until the cluster has carried traffic
  (upstream_cx_total/rx/tx used), plus jitter, in whole milliseconds as Envoy computes them.

A change of health flags rebuilds the cluster's load balancer (``cluster.refresh_health``)
and tells the outlier detector (a passing check un-ejects a host). Until each host has been
checked (Envoy counts one completed check per host) ``wait_initialized()`` stays pending,
so a server can hold its listeners back as Envoy does.

With worker processes (``--concurrency N``) health checking lives in the main process only,
as in Envoy (its main thread): ``HealthPublisher`` sends each change of a cluster's active
health flags (``host.ACTIVE_HC_FLAGS``, by cluster name and host address) over the workers'
control sockets; in a worker the checkers never start and ``RemoteHealth`` applies what
arrives through the same ``HealthCheckers._report`` a local transition takes. A worker's new
cluster holds its init until the main process's first round for it is done. The same
messages carry the main process's outlier ejections (``outlier``: the ejected hosts of each
cluster with outlier detection, see pyenvoy.upstream.outlier_detection), so a worker that
starts gets both in one snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import StatsStruct
from pyenvoy.upstream import host as host_mod
from pyenvoy.upstream.health_check_codec import RawConnection, codec_client
from pyenvoy.upstream.host import (
    ACTIVE_HC_FLAGS,
    DEGRADED_ACTIVE_HC,
    FAILED_ACTIVE_HC,
    PENDING_ACTIVE_HC,
)
from pyenvoy.upstream.outlier_detection import ejected_hosts

if TYPE_CHECKING:
    from pyenvoy.upstream.cluster_manager import Cluster
    from pyenvoy.upstream.host import Host

__all__ = [
    "GrpcHealthChecker",
    "HealthCheckStats",
    "HealthChecker",
    "HealthCheckers",
    "HealthPublisher",
    "HttpHealthChecker",
    "RemoteHealth",
    "TcpHealthChecker",
    "encode_health",
    "make_health_checker",
    "payload_match",
]

log = logging.getLogger("pyenvoy.hc")

# Flags Envoy sets beside /failed_active_hc; host.py may not know them yet.
ACTIVE_HC_TIMEOUT: int = host_mod.ACTIVE_HC_TIMEOUT
EXCLUDED_VIA_IMMEDIATE_HC_FAIL: int = host_mod.EXCLUDED_VIA_IMMEDIATE_HC_FAIL

# envoy.data.core.v3.HealthCheckFailureType
ACTIVE, PASSIVE, NETWORK, NETWORK_TIMEOUT = range(4)
# HealthTransition
UNCHANGED, CHANGED, CHANGE_PENDING = range(3)

USER_AGENT = b"Envoy/HC"


class HealthCheckStats(StatsStruct):
    """``cluster.<name>.health_check.*`` (Envoy's ALL_HEALTH_CHECKER_STATS)."""

    COUNTERS = (
        "attempt",
        "failure",
        "network_failure",
        "passive_failure",
        "success",
        "verify_cluster",
    )
    GAUGES = ("degraded", "healthy")


def _ms(d: Any) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def _load_payloads(payloads: Any, path: str) -> list[bytes]:
    """Envoy's PayloadMatcher::loadProtoBytes: hex ``text`` or raw ``binary`` segments."""
    out: list[bytes] = []
    for i, p in enumerate(payloads):
        if p.WhichOneof("payload") == "text":
            try:
                out.append(bytes.fromhex(p.text))
            except ValueError:
                raise ConfigError(f"invalid hex string '{p.text}'", f"{path}[{i}].text") from None
        else:
            out.append(bytes(p.binary))
    return out


def payload_match(segments: list[bytes], data: bytes | bytearray) -> bool:
    """Every segment found in order (Envoy's PayloadMatcher::match: search, not prefix)."""
    start = 0
    for seg in segments:
        i = data.find(seg, start)
        if i < 0:
            return False
        start = i + len(seg)
    return True


# --- the checker (per health_checks entry) ----------------------------------------------


class HealthChecker:
    """Settings and sessions of one ``health_checks`` entry; subclasses make sessions."""

    type_name = ""

    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        self.cluster = cluster
        self.proto = proto
        self.path = path
        unsupported = {
            "event_log_path": bool(proto.event_log_path),
            "event_logger": len(proto.event_logger) > 0,
            "event_service": proto.HasField("event_service"),
            "tls_options": proto.HasField("tls_options"),
            "transport_socket_match_criteria": proto.HasField("transport_socket_match_criteria"),
        }
        for field, present in unsupported.items():
            if present:
                raise ConfigError(
                    f"health check {field} is not supported by pyenvoy", f"{path}.{field}"
                )
        self.timeout_ms = _ms(proto.timeout)
        self.interval_ms = _ms(proto.interval)
        self.no_traffic_interval_ms = (
            _ms(proto.no_traffic_interval) if proto.HasField("no_traffic_interval") else 60000
        )
        self.no_traffic_healthy_interval_ms = (
            _ms(proto.no_traffic_healthy_interval)
            if proto.HasField("no_traffic_healthy_interval")
            else self.no_traffic_interval_ms
        )
        self.initial_jitter_ms = (
            _ms(proto.initial_jitter) if proto.HasField("initial_jitter") else 0
        )
        self.interval_jitter_ms = (
            _ms(proto.interval_jitter) if proto.HasField("interval_jitter") else 0
        )
        self.interval_jitter_percent = proto.interval_jitter_percent
        self.unhealthy_interval_ms = (
            _ms(proto.unhealthy_interval)
            if proto.HasField("unhealthy_interval")
            else self.interval_ms
        )
        self.unhealthy_edge_interval_ms = (
            _ms(proto.unhealthy_edge_interval)
            if proto.HasField("unhealthy_edge_interval")
            else self.unhealthy_interval_ms
        )
        self.healthy_edge_interval_ms = (
            _ms(proto.healthy_edge_interval)
            if proto.HasField("healthy_edge_interval")
            else self.interval_ms
        )
        self.unhealthy_threshold = proto.unhealthy_threshold.value
        self.healthy_threshold = proto.healthy_threshold.value
        self.reuse_connection = (
            proto.reuse_connection.value if proto.HasField("reuse_connection") else True
        )
        self.alt_port = proto.alt_port.value if proto.HasField("alt_port") else 0
        self.stats = HealthCheckStats(cluster.info.stats.scope.scope("health_check"))
        self.sessions: dict[Host, ActiveSession] = {}
        self.callbacks: list[Callable[[Host, int, bool], None]] = []
        self.started = False
        self.random = random.Random()

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        self.add_hosts(self.cluster.hosts)

    def stop(self) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for s in sessions:
            s.destroy(run_callbacks=False)
        self.started = False

    def on_hosts_changed(self, added: list[Host], removed: list[Host]) -> None:
        if not self.started:
            return
        self.add_hosts(added)
        for h in removed:
            s = self.sessions.pop(h, None)
            if s is not None:
                s.destroy(run_callbacks=True)

    def add_hosts(self, hosts: list[Host]) -> None:
        for h in hosts:
            if h in self.sessions:
                continue
            s = self.sessions[h] = self.make_session(h)
            s.start()

    def make_session(self, host: Host) -> ActiveSession:
        raise NotImplementedError

    def address_of(self, host: Host) -> tuple[str, int]:
        if self.alt_port:
            return (host.address[0], self.alt_port)
        return host.address

    def hostname_of(self, host: Host, configured: str) -> bytes:
        """Envoy's HealthCheckerFactory::getHostname (configured host, else cluster name)."""
        return (configured or self.cluster.info.name).encode()

    def run_callbacks(self, host: Host, changed: int, healthy: bool) -> None:
        for cb in self.callbacks:
            cb(host, changed, healthy)

    # --- timing -----------------------------------------------------------------------
    def _has_traffic(self) -> bool:
        st = self.cluster.info.stats
        for c in (
            st.upstream_cx_total,
            st.upstream_cx_tx_bytes_total,
            st.upstream_cx_rx_bytes_total,
        ):
            if c.value or c.used:
                return True
        return False

    def interval(self, healthy: bool, changed: int) -> int:
        """Milliseconds until the next probe (Envoy's HealthCheckerImplBase::interval)."""
        if self._has_traffic():
            if not healthy:
                base = (
                    self.unhealthy_edge_interval_ms
                    if changed == CHANGE_PENDING
                    else self.unhealthy_interval_ms
                )
            else:
                base = (
                    self.healthy_edge_interval_ms if changed == CHANGE_PENDING else self.interval_ms
                )
        elif healthy and changed != CHANGE_PENDING:
            base = self.no_traffic_healthy_interval_ms
        else:
            base = self.no_traffic_interval_ms
        return self.interval_with_jitter(base, self.interval_jitter_ms)

    def interval_with_jitter(self, base_ms: int, jitter_ms: int) -> int:
        rnd = self.random.getrandbits
        percent_mod = self.interval_jitter_percent * base_ms // 100
        if percent_mod > 0:
            base_ms += rnd(64) % percent_mod
        if jitter_ms > 0:
            base_ms += rnd(64) % jitter_ms
        return max(1, base_ms)


# --- sessions -------------------------------------------------------------------------


class ActiveSession:
    """One host under one checker: timers, counters and Envoy's transitions."""

    def __init__(self, parent: HealthChecker, host: Host) -> None:
        self.parent = parent
        self.host = host
        self.first_check = True
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.interval_timer: asyncio.TimerHandle | None = None
        self.timeout_timer: asyncio.TimerHandle | None = None
        self.destroyed = False
        if not host.health_flags & FAILED_ACTIVE_HC:
            parent.stats.healthy.inc()
        if host.health_flags & DEGRADED_ACTIVE_HC:
            parent.stats.degraded.inc()

    # --- timers -------------------------------------------------------------------
    def start(self) -> None:
        p = self.parent
        if p.initial_jitter_ms == 0:
            self.on_interval_base()
        else:
            self._arm_interval(p.interval_with_jitter(0, p.initial_jitter_ms))

    def _arm_interval(self, ms: int) -> None:
        if self.destroyed:
            return
        if self.interval_timer is not None:
            self.interval_timer.cancel()
        self.interval_timer = asyncio.get_running_loop().call_later(
            ms / 1000.0, self.on_interval_base
        )

    def _disarm_timeout(self) -> None:
        t = self.timeout_timer
        if t is not None:
            self.timeout_timer = None
            t.cancel()

    def on_interval_base(self) -> None:
        self.interval_timer = None
        if self.destroyed:
            return
        self.on_interval()
        if self.destroyed:
            return
        self._disarm_timeout()
        self.timeout_timer = asyncio.get_running_loop().call_later(
            self.parent.timeout_ms / 1000.0, self.on_timeout_base
        )
        self.parent.stats.attempt.inc()

    def on_timeout_base(self) -> None:
        self.timeout_timer = None
        if self.destroyed:
            return
        self.on_timeout()
        self.handle_failure(NETWORK_TIMEOUT)

    def destroy(self, run_callbacks: bool) -> None:
        """The host left the cluster (or the checker stopped)."""
        if self.destroyed:
            return
        self.destroyed = True
        if self.interval_timer is not None:
            self.interval_timer.cancel()
            self.interval_timer = None
        self._disarm_timeout()
        flags = self.host.health_flags
        healthy = not flags & FAILED_ACTIVE_HC
        if healthy:
            self.parent.stats.healthy.dec()
        if flags & DEGRADED_ACTIVE_HC:
            self.parent.stats.degraded.dec()
        self.on_destroy()
        if run_callbacks and self.first_check:
            self.parent.run_callbacks(self.host, UNCHANGED, healthy)

    # --- protocol hooks -------------------------------------------------------------
    def on_interval(self) -> None:
        raise NotImplementedError

    def on_timeout(self) -> None:
        raise NotImplementedError

    def on_destroy(self) -> None:
        pass

    # --- transitions ------------------------------------------------------------------
    def _clear_pending(self, changed: int) -> int:
        host = self.host
        if host.health_flags & PENDING_ACTIVE_HC:
            host.health_flags &= ~PENDING_ACTIVE_HC
            return CHANGED
        return changed

    def handle_success(self, degraded: bool = False) -> None:
        if self.destroyed:
            return
        host = self.host
        stats = self.parent.stats
        self.num_unhealthy = 0
        changed = UNCHANGED
        if host.health_flags & FAILED_ACTIVE_HC:
            self.num_healthy += 1
            if self.first_check or self.num_healthy == self.parent.healthy_threshold:
                host.health_flags &= ~(
                    ACTIVE_HC_TIMEOUT | EXCLUDED_VIA_IMMEDIATE_HC_FAIL | FAILED_ACTIVE_HC
                )
                stats.healthy.inc()
                changed = CHANGED
                log.debug("health check: %s is healthy", host)
            else:
                changed = CHANGE_PENDING
        changed = self._clear_pending(changed)
        if degraded != bool(host.health_flags & DEGRADED_ACTIVE_HC):
            if degraded:
                host.health_flags |= DEGRADED_ACTIVE_HC
                stats.degraded.inc()
            else:
                # Envoy 1.40 clears the flag without decrementing the gauge (observed: it
                # stays up until the session goes away); match it.
                host.health_flags &= ~DEGRADED_ACTIVE_HC
            if changed == UNCHANGED:
                changed = CHANGED
        stats.success.inc()
        self.first_check = False
        self.parent.run_callbacks(host, changed, True)
        self._disarm_timeout()
        self._arm_interval(self.parent.interval(True, changed))

    def set_unhealthy(self, type_: int, retriable: bool = False) -> int:
        host = self.host
        stats = self.parent.stats
        self.num_healthy = 0
        changed = UNCHANGED
        network = type_ == NETWORK or type_ == NETWORK_TIMEOUT
        if not host.health_flags & FAILED_ACTIVE_HC:
            self.num_unhealthy += 1
            if (
                not network and not retriable
            ) or self.num_unhealthy == self.parent.unhealthy_threshold:
                host.health_flags |= FAILED_ACTIVE_HC
                stats.healthy.dec()
                changed = CHANGED
                log.debug("health check: %s is unhealthy", host)
            else:
                changed = CHANGE_PENDING
        if type_ == NETWORK_TIMEOUT and host.health_flags & FAILED_ACTIVE_HC:
            host.health_flags |= ACTIVE_HC_TIMEOUT
        else:
            host.health_flags &= ~ACTIVE_HC_TIMEOUT
        changed = self._clear_pending(changed)
        stats.failure.inc()
        if network:
            stats.network_failure.inc()
        elif type_ == PASSIVE:
            stats.passive_failure.inc()
        self.first_check = False
        self.parent.run_callbacks(host, changed, False)
        return changed

    def handle_failure(self, type_: int, retriable: bool = False) -> None:
        if self.destroyed:
            return
        changed = self.set_unhealthy(type_, retriable)
        self._disarm_timeout()
        self._arm_interval(self.parent.interval(False, changed))


# --- TCP --------------------------------------------------------------------------------


class TcpHealthChecker(HealthChecker):
    type_name = "TCP"

    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        super().__init__(cluster, proto, path)
        tcp = proto.tcp_health_check
        tpath = f"{path}.tcp_health_check"
        if tcp.HasField("proxy_protocol_config"):
            raise ConfigError(
                "tcp_health_check.proxy_protocol_config is not supported by pyenvoy",
                f"{tpath}.proxy_protocol_config",
            )
        # Envoy sends only a hex ``text`` payload (a ``binary`` send is ignored).
        send: list[bytes] = []
        if tcp.HasField("send") and tcp.send.text:
            send = _load_payloads([tcp.send], f"{tpath}.send")
        self.send = b"".join(send)
        self.receive = _load_payloads(tcp.receive, f"{tpath}.receive")

    def make_session(self, host: Host) -> ActiveSession:
        return TcpSession(self, host)


class TcpSession(ActiveSession):
    def __init__(self, parent: TcpHealthChecker, host: Host) -> None:
        super().__init__(parent, host)
        self.checker = parent
        self.client: RawConnection | None = None
        self.buffer = bytearray()
        self.expect_close = False

    def on_interval(self) -> None:
        p = self.checker
        if self.client is None:
            self.buffer.clear()
            self.expect_close = False
            self.client = RawConnection(
                p.address_of(self.host), p.cluster.info.connect_timeout, self
            )
        if p.send and p.receive:
            # (Without ``receive`` the check closes on connect and Envoy never writes.)
            self.client.write(p.send)

    def _close(self) -> None:
        c = self.client
        if c is not None:
            self.client = None
            c.close()

    def on_timeout(self) -> None:
        self.expect_close = True
        self._close()

    def on_destroy(self) -> None:
        self.expect_close = True
        self._close()

    # --- RawCallbacks -----------------------------------------------------------------
    def on_connected(self) -> None:
        if not self.checker.receive:
            # Connect-only check: success, and close (Envoy writes nothing here).
            self.expect_close = True
            self._close()
            self.handle_success()

    def on_data(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if payload_match(self.checker.receive, buf):
            buf.clear()
            self.handle_success()
            if not self.checker.reuse_connection:
                self.expect_close = True
                self._close()

    def on_close(self) -> None:
        self.client = None
        if not self.expect_close:
            self.handle_failure(NETWORK)


# --- HTTP -------------------------------------------------------------------------------

_METHODS = {
    1: b"GET",
    2: b"HEAD",
    3: b"POST",
    4: b"PUT",
    5: b"DELETE",
    6: b"CONNECT",
    7: b"OPTIONS",
    8: b"TRACE",
    9: b"PATCH",
}
_NO_BODY_METHODS = (b"GET", b"HEAD", b"DELETE", b"TRACE")
SUCCEEDED, DEGRADED, FAILED, RETRIABLE = range(4)


def _status_ranges(ranges: Any, kind: str, path: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, r in enumerate(ranges):
        start, end = int(r.start), int(r.end)
        p = f"{path}[{i}]"
        if start >= end:
            raise ConfigError(
                f"Invalid http {kind} status range: expecting start < end, but found "
                f"start={start} and end={end}",
                p,
            )
        if start < 100:
            raise ConfigError(
                f"Invalid http {kind} status range: expecting start >= 100, but found start={start}",
                p,
            )
        if end > 600:
            raise ConfigError(
                f"Invalid http {kind} status range: expecting end <= 600, but found end={end}", p
            )
        out.append((start, end))
    return out


class HttpHealthChecker(HealthChecker):
    type_name = "HTTP"

    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        super().__init__(cluster, proto, path)
        http = proto.http_health_check
        hpath = f"{path}.http_health_check"
        self.http_path = http.path.encode()
        self.host_value = http.host
        self.method = _METHODS.get(http.method, b"GET")
        codec = http.codec_client_type  # 0 HTTP1, 1 HTTP2, 2 HTTP3
        if codec == 2:
            raise ConfigError(
                "HTTP/3 health checks are not supported by pyenvoy", f"{hpath}.codec_client_type"
            )
        self.http2 = codec == 1
        self.request_body: bytes | None = None
        if http.HasField("send"):
            if self.method in _NO_BODY_METHODS:
                raise ConfigError(
                    "HTTP health check cannot specify a request payload with method "
                    f"'{self.method.decode()}'. Only methods that support a request body (POST, PUT, "
                    "PATCH, OPTIONS) can be used with payload.",
                    f"{hpath}.send",
                )
            self.request_body = b"".join(_load_payloads([http.send], f"{hpath}.send"))
        self.receive = _load_payloads(http.receive, f"{hpath}.receive")
        self.response_buffer_size = (
            http.response_buffer_size.value if http.HasField("response_buffer_size") else 1024
        )
        if self.response_buffer_size and self.receive:
            total = sum(len(r) for r in self.receive)
            if total > self.response_buffer_size:
                raise ConfigError(
                    f"The expected response length '{total}' is over than http health response "
                    f"buffer size '{self.response_buffer_size}'",
                    f"{hpath}.receive",
                )
        self.expected = _status_ranges(
            http.expected_statuses, "expected", f"{hpath}.expected_statuses"
        ) or [(200, 201)]
        self.retriable = _status_ranges(
            http.retriable_statuses, "retriable", f"{hpath}.retriable_statuses"
        )
        from pyenvoy.router.config import HeaderMutations

        self.mutations = HeaderMutations.from_proto(
            http.request_headers_to_add,
            http.request_headers_to_remove,
            hpath,
            "request_headers_to_add",
            "request_headers_to_remove",
        )
        self.service_name_matcher: Callable[[bytes], bool] | None = None
        if http.HasField("service_name_matcher"):
            from pyenvoy.router.config import _string_matcher

            self.service_name_matcher = _string_matcher(
                http.service_name_matcher, f"{hpath}.service_name_matcher"
            )

    def make_session(self, host: Host) -> ActiveSession:
        return HttpSession(self, host)

    def request_headers(self, host: Host, authority: bytes) -> list[tuple[bytes, bytes]]:
        """The non-pseudo request headers (user-agent, then request_headers_to_add)."""
        hdrs: list[tuple[bytes, bytes]] = [(b"user-agent", USER_AGENT)]
        if self.mutations:
            from pyenvoy.http.headers import RequestHeaders
            from pyenvoy.stream_info import StreamInfo

            rh = RequestHeaders(
                self.method, self.http_path, authority, headers=[[b"user-agent", USER_AGENT]]
            )
            si = StreamInfo()
            # Envoy's HC stream info has no upstream address: %UPSTREAM_*% render empty.
            self.mutations.apply(rh, si, rh, None)
            hdrs = []
            for k, v in rh.headers:
                # user-agent is one of Envoy's inline headers: a second value is comma-joined.
                if k == b"user-agent" and hdrs and hdrs[0][0] == b"user-agent":
                    hdrs[0] = (k, hdrs[0][1] + b"," + v)
                    continue
                hdrs.append((k, v))
        if self.request_body is not None:
            hdrs.append((b"content-length", str(len(self.request_body)).encode()))
        return hdrs

    def in_ranges(self, status: int, ranges: list[tuple[int, int]]) -> bool:
        for lo, hi in ranges:
            if lo <= status < hi:
                return True
        return False


class _StreamSession(ActiveSession):
    """A session that probes over an HTTP/1 or HTTP/2 codec client (HTTP and gRPC checks):
    the client it keeps between probes and how it is closed."""

    def __init__(self, parent: Any, host: Host, authority: bytes) -> None:
        super().__init__(parent, host)
        self.checker = parent
        self.client: Any = None
        self.authority = authority
        self.expect_reset = False
        self.in_flight = False

    def _close(self) -> None:
        c = self.client
        if c is not None:
            self.client = None
            c.close()

    def on_destroy(self) -> None:
        self.expect_reset = True
        self._close()


class HttpSession(_StreamSession):
    def __init__(self, parent: HttpHealthChecker, host: Host) -> None:
        super().__init__(parent, host, parent.hostname_of(host, parent.host_value))
        self.checker: HttpHealthChecker = parent
        self.reuse = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.body = bytearray()

    def on_interval(self) -> None:
        p = self.checker
        if self.client is None:
            self.client = codec_client(
                p.http2, p.address_of(self.host), p.cluster.info.connect_timeout, self
            )
            self.expect_reset = False
            self.reuse = p.reuse_connection
        self.in_flight = True
        self.headers = None
        self.body.clear()
        self.client.new_stream(
            p.method,
            p.http_path,
            self.authority,
            p.request_headers(self.host, self.authority),
            p.request_body,
        )

    def on_timeout(self) -> None:
        self.in_flight = False
        if self.client is not None:
            self.expect_reset = True
            self._close()

    # --- CodecCallbacks -----------------------------------------------------------------
    def on_headers(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.status = status
        self.headers = headers
        if end_stream:
            self._complete()

    def on_body(self, data: bytes, end_stream: bool) -> None:
        p = self.checker
        if p.receive and data:
            room = p.response_buffer_size - len(self.body) if p.response_buffer_size else len(data)
            if room > 0:
                self.body += data[:room]
        if end_stream:
            self._complete()

    def on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self._complete()

    def on_reset(self) -> None:
        self.in_flight = False
        if self.expect_reset:
            return
        if self.client is not None and not self.reuse:
            self._close()
        self.handle_failure(NETWORK)

    def on_goaway(self, error_code: int) -> None:
        if self.in_flight and error_code == 0:
            self.reuse = False  # let the in-flight probe finish, then reconnect
            return
        if self.in_flight:
            self.in_flight = False
            self.handle_failure(NETWORK)
        if self.client is not None:
            self.expect_reset = True
            self._close()

    def on_connection_closed(self) -> None:
        self.client = None
        self.headers = None

    # --- result -----------------------------------------------------------------------
    def _header(self, name: bytes) -> bytes | None:
        for k, v in self.headers or ():
            if k == name:
                return v
        return None

    def _result(self) -> int:
        p = self.checker
        host = self.host
        status = self.status
        immediate = self._header(b"x-envoy-immediate-health-check-fail") is not None
        if p.receive and not payload_match(p.receive, self.body):
            if immediate:
                host.health_flags |= EXCLUDED_VIA_IMMEDIATE_HC_FAIL
            return FAILED
        if not p.in_ranges(status, p.expected):
            if immediate:
                host.health_flags |= EXCLUDED_VIA_IMMEDIATE_HC_FAIL
            return RETRIABLE if p.in_ranges(status, p.retriable) else FAILED
        degraded = self._header(b"x-envoy-degraded") is not None
        matcher = p.service_name_matcher
        if matcher is not None:
            p.stats.verify_cluster.inc()
            if not matcher(self._header(b"x-envoy-upstream-healthchecked-cluster") or b""):
                return FAILED
        return DEGRADED if degraded else SUCCEEDED

    def _complete(self) -> None:
        if not self.in_flight:
            return
        self.in_flight = False
        result = self._result()
        if result == SUCCEEDED:
            self.handle_success(False)
        elif result == DEGRADED:
            self.handle_success(True)
        else:
            self.handle_failure(ACTIVE, result == RETRIABLE)
        client = self.client
        if client is not None and (not self.reuse or client.close_after):
            self._close()
        self.headers = None
        self.body.clear()


# --- gRPC -------------------------------------------------------------------------------

_GRPC_PATH = b"/grpc.health.v1.Health/Check"
_SERVING = 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def parse_health_check_response(msg: bytes) -> int:
    """grpc.health.v1.HealthCheckResponse -> its ``status`` (0 UNKNOWN if absent)."""
    i = 0
    status = 0
    while i < len(msg):
        key, i = _read_varint(msg, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(msg, i)
            if field == 1:
                status = value
        elif wire == 2:
            n, i = _read_varint(msg, i)
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError("bad wire type")
        if i > len(msg):
            raise ValueError("truncated")
    return status


def _grpc_timeout(ms: int) -> bytes:
    """Envoy's Grpc::Common::toGrpcTimeout (at most 8 digits, scaled up in units)."""
    value = ms
    for unit in (b"m", b"S", b"M", b"H"):
        if value < 100_000_000:
            return str(value).encode() + unit
        value //= 1000 if unit == b"m" else 60
    return b"99999999H"


class GrpcHealthChecker(HealthChecker):
    type_name = "GRPC"

    def __init__(self, cluster: Cluster, proto: Any, path: str) -> None:
        super().__init__(cluster, proto, path)
        g = proto.grpc_health_check
        if not cluster.info.upstream_http2:
            raise ConfigError(
                f"{cluster.info.name} cluster must support HTTP/2 for gRPC healthchecking", path
            )
        self.service_name = g.service_name
        self.authority_value = g.authority
        from pyenvoy.router.config import HeaderMutations

        self.mutations = HeaderMutations.from_proto(
            g.initial_metadata,
            (),
            f"{path}.grpc_health_check",
            "initial_metadata",
            "initial_metadata",
        )
        request = b""
        if self.service_name:
            svc = self.service_name.encode()
            request = b"\x0a" + _varint(len(svc)) + svc
        self.request_frame = b"\x00" + struct.pack(">I", len(request)) + request

    def make_session(self, host: Host) -> ActiveSession:
        return GrpcSession(self, host)

    def request_headers(self, host: Host, authority: bytes) -> list[tuple[bytes, bytes]]:
        hdrs = [
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", USER_AGENT),
        ]
        if self.mutations:
            from pyenvoy.http.headers import RequestHeaders
            from pyenvoy.stream_info import StreamInfo

            rh = RequestHeaders(b"POST", _GRPC_PATH, authority, headers=[[k, v] for k, v in hdrs])
            si = StreamInfo(protocol="HTTP/2")
            # Envoy's HC stream info has no upstream address: %UPSTREAM_*% render empty.
            self.mutations.apply(rh, si, rh, None)
            hdrs = [(k, v) for k, v in rh.headers]
        hdrs.append((b"grpc-timeout", _grpc_timeout(self.timeout_ms)))
        return hdrs


class GrpcSession(_StreamSession):
    def __init__(self, parent: GrpcHealthChecker, host: Host) -> None:
        super().__init__(parent, host, parent.hostname_of(host, parent.authority_value))
        self.checker: GrpcHealthChecker = parent
        self.goaway = False
        self.buffer = bytearray()
        self.response_status: int | None = None

    def on_interval(self) -> None:
        p = self.checker
        if self.client is None:
            self.client = codec_client(
                True, p.address_of(self.host), p.cluster.info.connect_timeout, self
            )
        self._reset_state()
        self.in_flight = True
        self.client.new_stream(
            b"POST",
            _GRPC_PATH,
            self.authority,
            p.request_headers(self.host, self.authority),
            p.request_frame,
        )

    def _reset_state(self) -> None:
        self.expect_reset = False
        self.in_flight = False
        self.buffer.clear()
        self.response_status = None
        self.goaway = False

    def on_timeout(self) -> None:
        self.expect_reset = True
        self.in_flight = False
        if self.goaway or not self.checker.reuse_connection:
            self._close()
        elif self.client is not None:
            self.client.reset_stream()

    # --- CodecCallbacks -----------------------------------------------------------------
    def on_headers(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if not self.in_flight:
            return
        grpc_status = _grpc_status(headers)
        if status != 200:
            if end_stream and grpc_status is not None:
                self._rpc_complete(grpc_status, True)
                return
            self._rpc_complete(2, end_stream)  # httpToGrpcStatus: not OK
            return
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if not (
            ctype == b"application/grpc"
            or ctype.startswith(b"application/grpc+")
            or ctype.startswith(b"application/grpc;")
        ):
            self._rpc_complete(13, False)  # "not a gRPC request"
            return
        if end_stream:
            self._rpc_complete(grpc_status if grpc_status is not None else 13, True)

    def on_body(self, data: bytes, end_stream: bool) -> None:
        if not self.in_flight:
            return
        if end_stream:
            self._rpc_complete(13, True)  # "gRPC protocol violation: unexpected stream end"
            return
        buf = self.buffer
        buf += data
        while len(buf) >= 5:
            flags = buf[0]
            (length,) = struct.unpack(">I", bytes(buf[1:5]))
            if len(buf) < 5 + length:
                return
            payload = bytes(buf[5 : 5 + length])
            del buf[: 5 + length]
            if length == 0:
                continue
            if self.response_status is not None:
                self._rpc_complete(13, False)  # "unexpected streaming"
                return
            try:
                if flags != 0:
                    raise ValueError("compressed")
                self.response_status = parse_health_check_response(payload)
            except ValueError:
                self._rpc_complete(13, False)  # "invalid grpc.health.v1 RPC payload"
                return

    def on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if not self.in_flight:
            return
        grpc_status = _grpc_status(trailers)
        self._rpc_complete(grpc_status if grpc_status is not None else 13, True)

    def on_reset(self) -> None:
        expected = self.expect_reset
        goaway = self.goaway
        in_flight = self.in_flight
        self._reset_state()
        if expected or not in_flight:
            return
        if (goaway or not self.checker.reuse_connection) and self.client is not None:
            self._close()
        self.handle_failure(NETWORK)

    def on_goaway(self, error_code: int) -> None:
        if self.in_flight and error_code == 0:
            self.goaway = True
            return
        if self.in_flight:
            self.in_flight = False
            self.handle_failure(NETWORK)
            self.expect_reset = True
        self._close()

    def on_connection_closed(self) -> None:
        self.client = None

    def _rpc_complete(self, grpc_status: int, end_stream: bool) -> None:
        self.in_flight = False
        if grpc_status == 0 and self.response_status == _SERVING:
            self.handle_success(False)
        else:
            self.handle_failure(ACTIVE)
        goaway = self.goaway
        if end_stream:
            self._reset_state()
        elif self.client is not None:
            self.expect_reset = True
            self.client.reset_stream()
        if self.client is not None and (not self.checker.reuse_connection or goaway):
            self._close()


def _grpc_status(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"grpc-status":
            return int(v) if v.isdigit() else 2
    return None


# --- the cluster's set of checkers ------------------------------------------------------


_CHECKERS: dict[str, type[HealthChecker]] = {
    "http_health_check": HttpHealthChecker,
    "tcp_health_check": TcpHealthChecker,
    "grpc_health_check": GrpcHealthChecker,
}


class HealthCheckers:
    """What the cluster holds: its checkers, host-set bookkeeping and init tracking.

    In a worker process (``remote`` set) the checkers never start: the main process runs
    them and its results arrive through ``RemoteHealth`` into ``apply_remote``, which ends
    in the same ``_report`` as a local check. In the main process of a worker pool,
    ``observer`` hears of every check result and host-set change (``HealthPublisher``)."""

    def __init__(self, cluster: Cluster, checkers: list[HealthChecker]) -> None:
        self.cluster = cluster
        self.checkers = checkers
        self.known: set[Host] = set()
        self.pending_initialize = 0
        self._initialized: asyncio.Future[None] | None = None
        self._init_done = False
        # (cluster, host or None for a host-set/init change, the check passed)
        self.observer: Callable[[Cluster, Host | None, bool], None] | None = None
        self.remote: RemoteHealth | None = None
        for c in checkers:
            c.callbacks.append(self._on_check_complete)
        # Hosts under active health checking start failed until their first check passes.
        self._mark_new(list(cluster.hosts))
        cluster.refresh_health()

    def _mark_new(self, hosts: list[Host]) -> list[Host]:
        added = [h for h in hosts if h not in self.known]
        for h in added:
            h.health_flags |= FAILED_ACTIVE_HC
            self.known.add(h)
        return added

    @property
    def initialized(self) -> bool:
        """Every host had its first check (or the checks stopped, or the hold timed out)."""
        return self._init_done

    def end_initialize_hold(self) -> None:
        """The cluster stopped waiting for the first round (timeout): count it as done."""
        self._finish_initialize()

    # --- seams used by the cluster --------------------------------------------------------
    def start(self) -> None:
        hosts = list(self.cluster.hosts)
        # Hosts a replaced cluster handed over (adopt_hosts) keep their health; the first
        # check decides for them as for any host.
        self.known = set(hosts)
        remote = self.remote
        if remote is not None:
            # A worker: the main process checks; init holds until its first round is done.
            self.pending_initialize = 1
            remote.subscribe(self)
            self.apply_remote()
            return
        # Envoy's ClusterImplBase::onInitDone: wait for one completed check per host (any
        # host's completions count, as in Envoy).
        self.pending_initialize = len(hosts) * len(self.checkers)
        if self.pending_initialize == 0:
            self._finish_initialize()
        for c in self.checkers:
            c.start()

    def stop(self) -> None:
        for c in self.checkers:
            c.stop()
        if self.remote is not None:
            self.remote.unsubscribe(self)
        self._finish_initialize()

    def on_hosts_changed(self) -> None:
        current = list(self.cluster.hosts)
        current_set = set(current)
        removed = [h for h in self.known if h not in current_set]
        for h in removed:
            self.known.discard(h)
        added = self._mark_new(current)
        remote = self.remote
        if remote is not None:
            # (the cluster rebuilds its load balancer after this)
            state = remote.clusters.get(self.cluster.info.name)
            if state is not None:
                _apply_flags(added, state[1])
        else:
            for c in self.checkers:
                c.on_hosts_changed(added, removed)
        self._notify(None, False)

    async def wait_initialized(self) -> None:
        """Returns once every host had its first check (Envoy holds cluster init for it)."""
        if self._init_done:
            return
        if self._initialized is None:
            self._initialized = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._initialized)

    def on_immediate_health_check_fail(self, host: Host) -> None:
        """A proxied response carried ``x-envoy-immediate-health-check-fail`` (the router
        calls this): as Envoy, the host's session fails it at once (a PASSIVE failure:
        ``health_check.failure`` and ``passive_failure`` count) and it is flagged
        ``/failed_active_hc/excluded_via_immediate_hc_fail`` until checks pass again.

        In a worker process (``remote`` set) the sessions live in the main process: the
        host is failed here at once and the failure is reported to the main process
        (``RemoteHealth.report``), which fails the host's session and sends the result to
        every worker, as Envoy's main thread does for all its workers. Should that word
        never come, the main process's state is taken again after ``healthy_threshold``
        intervals (the passing checks that would bring the host back in Envoy)."""
        remote = self.remote
        if remote is not None:
            if host.health_flags & FAILED_ACTIVE_HC and host.health_flags & (
                EXCLUDED_VIA_IMMEDIATE_HC_FAIL
            ):
                return
            host.health_flags |= FAILED_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL
            self.cluster.refresh_health()
            if remote.report is not None:
                remote.report(encode_immediate_fail(self.cluster.info.name, host.address))
            ms = max((c.healthy_threshold * c.interval_ms for c in self.checkers), default=0)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_later(max(ms, 1) / 1000.0, self.apply_remote)
            return
        host.health_flags |= EXCLUDED_VIA_IMMEDIATE_HC_FAIL
        for c in self.checkers:
            s = c.sessions.get(host)
            if s is not None and not s.destroyed:
                s.set_unhealthy(PASSIVE, False)
        self.cluster.refresh_health()
        self._notify(host, False)

    def apply_remote(self, passed: Collection[tuple[str, int]] = ()) -> None:
        """A worker: take the main process's health state for this cluster (hosts it does
        not know stay as they are), and its passing checks of ``passed`` addresses."""
        remote = self.remote
        state = remote.clusters.get(self.cluster.info.name) if remote is not None else None
        hosts = self.cluster.hosts
        changed = state is not None and _apply_flags(hosts, state[1])
        self._report(changed, [h for h in hosts if h.address in passed] if passed else ())
        if state is not None and state[0]:
            self._finish_initialize()

    # --- internals ------------------------------------------------------------------------
    def _finish_initialize(self) -> None:
        self.pending_initialize = 0
        if not self._init_done:
            self._init_done = True
            self._notify(None, False)
        fut = self._initialized
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _notify(self, host: Host | None, passed: bool) -> None:
        observer = self.observer
        if observer is not None:
            observer(self.cluster, host, passed)

    def _report(self, changed: bool, passed: Iterable[Host]) -> None:
        """One home for what check results do to the cluster, whether this process's
        checkers made them or the main process's: a health change rebuilds the load
        balancer, a passing check brings an outlier-ejected host back."""
        if changed:
            self.cluster.refresh_health()
        outlier = self.cluster.outlier
        if outlier is not None:
            hook = getattr(outlier, "on_active_health_check_success", None)
            if hook is not None:
                for host in passed:
                    hook(host)

    def _on_check_complete(self, host: Host, changed: int, healthy: bool) -> None:
        self._report(changed == CHANGED, (host,) if healthy else ())
        self._notify(host, healthy)
        if self.pending_initialize > 0:
            self.pending_initialize -= 1
            if self.pending_initialize == 0:
                self._finish_initialize()


def _apply_flags(hosts: Iterable[Host], flags: dict[tuple[str, int], int]) -> bool:
    """Set each host's active-HC flags to the main process's; a host it has no word on is
    unchecked, so failed (as every new host under active HC). True if any changed."""
    changed = False
    for h in hosts:
        new = (h.health_flags & ~ACTIVE_HC_FLAGS) | flags.get(h.address, FAILED_ACTIVE_HC)
        if new != h.health_flags:
            h.health_flags = new
            changed = True
    return changed


# --- sharing health with worker processes ----------------------------------------------------

# What a cluster's active health looks like to a worker: (the main process finished its
# first round, {host address: host.ACTIVE_HC_FLAGS bits}).
ClusterHealth = tuple[bool, dict[tuple[str, int], int]]

HOST_HEALTH_OP = "host_health"
PASSED_FLUSH_S = 0.5


def encode_health(
    clusters: dict[str, ClusterHealth],
    full: bool,
    passed: dict[str, set[tuple[str, int]]] | None = None,
    outlier: dict[str, frozenset[tuple[str, int]]] | None = None,
) -> dict[str, Any]:
    """The control-socket message (JSON): ``{"op": "host_health", "full": bool, "clusters":
    {name: {"initialized": bool, "hosts": [[ip, port, flags], ...]}}, "passed": {name:
    [[ip, port], ...]}, "outlier": {name: [[ip, port], ...]}}``. ``full``: every
    health-checked cluster is listed (others are forgotten); ``passed``: hosts that passed a
    check since the last message; ``outlier`` (left out when empty): the hosts the main
    process's outlier detector has ejected, per cluster whose set changed (``full``: every
    cluster with outlier detection; see ``outlier_detection.RemoteOutlier.update``)."""
    msg = {
        "op": HOST_HEALTH_OP,
        "full": full,
        "clusters": {
            name: {"initialized": init, "hosts": [[a[0], a[1], f] for a, f in flags.items()]}
            for name, (init, flags) in clusters.items()
        },
        "passed": {name: [list(a) for a in addrs] for name, addrs in (passed or {}).items()},
    }
    if outlier:
        msg["outlier"] = {name: sorted(addrs) for name, addrs in outlier.items()}
    return msg


IMMEDIATE_HC_FAIL_OP = "host_immediate_hc_fail"


def encode_immediate_fail(cluster: str, address: tuple[str, int]) -> dict[str, Any]:
    """A worker's report (JSON) that a proxied response failed a host with
    ``x-envoy-immediate-health-check-fail``: ``{"op": "host_immediate_hc_fail", "cluster":
    name, "address": [ip, port]}``."""
    return {"op": IMMEDIATE_HC_FAIL_OP, "cluster": cluster, "address": list(address)}


def apply_immediate_fail(cluster_manager: Any, msg: dict[str, Any]) -> bool:
    """The main process's side of ``encode_immediate_fail``: fail that host's sessions in
    this process's checkers (whose result then goes to every worker). False when the
    cluster, its health checker or the host is gone (a reload raced the report)."""
    cluster = cluster_manager.get(str(msg.get("cluster", "")))
    hc = getattr(cluster, "health_checker", None) if cluster is not None else None
    if hc is None or hc.remote is not None:
        return False
    try:
        ip, port = msg["address"]
        address = (str(ip), int(port))
    except (KeyError, TypeError, ValueError):
        return False
    for host in cluster.hosts:
        if host.address == address:
            hc.on_immediate_health_check_fail(host)
            return True
    return False


class RemoteHealth:
    """A worker's copy of the main process's active health state, by cluster name and host
    address; every update is applied to this process's health-checked clusters of that
    name (``HealthCheckers.apply_remote``). ``report`` sends what the worker learns itself
    (an immediate health-check failure) to the main process."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.clusters: dict[str, ClusterHealth] = {}
        self._subscribers: dict[str, list[HealthCheckers]] = {}
        self.report = report

    def subscribe(self, hc: HealthCheckers) -> None:
        subs = self._subscribers.setdefault(hc.cluster.info.name, [])
        if hc not in subs:
            subs.append(hc)

    def unsubscribe(self, hc: HealthCheckers) -> None:
        name = hc.cluster.info.name
        subs = self._subscribers.get(name)
        if subs is not None and hc in subs:
            subs.remove(hc)
            if not subs:
                del self._subscribers[name]

    def update(self, msg: dict[str, Any]) -> None:
        """Apply one ``encode_health`` message."""
        clusters: dict[str, ClusterHealth] = {
            str(name): (
                bool(c.get("initialized")),
                {(str(ip), int(port)): int(flags) for ip, port, flags in c.get("hosts", ())},
            )
            for name, c in (msg.get("clusters") or {}).items()
        }
        passed = {
            str(name): {(str(ip), int(port)) for ip, port in addrs}
            for name, addrs in (msg.get("passed") or {}).items()
        }
        if msg.get("full"):
            self.clusters = clusters
        else:
            self.clusters.update(clusters)
        for name in clusters.keys() | passed.keys():
            for hc in list(self._subscribers.get(name, ())):
                hc.apply_remote(passed.get(name, ()))


class HealthPublisher:
    """The main process's side: watches its cluster manager's health checks and outlier
    detectors and sends every change of a cluster's active health state or of its
    outlier-ejected hosts (the whole cluster, deduplicated, batched per loop iteration)
    through ``send``. With ``send_passed`` (for workers whose outlier detectors decide on
    their own), passing checks of clusters with outlier detection go out every
    ``PASSED_FLUSH_S`` (they un-eject hosts in such workers); a WorkerPool's workers post
    their results to this process's detectors instead and need no such word."""

    def __init__(
        self,
        cluster_manager: Any,
        send: Callable[[dict[str, Any]], None],
        send_passed: bool = True,
    ) -> None:
        self.cm = cluster_manager
        self.send = send
        self.send_passed = send_passed
        self.sent: dict[str, ClusterHealth] = {}
        self.sent_outlier: dict[str, frozenset[tuple[str, int]]] = {}
        self.dirty: set[str] = set()
        self.resync = True
        self.passed: dict[str, set[tuple[str, int]]] = {}
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._handle_soon = False
        cluster_manager.health_observer = self.on_health

    def close(self) -> None:
        if self.cm.health_observer == self.on_health:
            self.cm.health_observer = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def on_health(self, cluster: Cluster | None, host: Host | None, passed: bool) -> None:
        """``ClusterManager.health_observer``: ``cluster`` None means clusters came or went."""
        if cluster is None:
            self.resync = True
        else:
            name = cluster.info.name
            if host is None:
                self.dirty.add(name)
            else:
                sent = self.sent.get(name)
                if sent is None or sent[1].get(host.address) != (
                    host.health_flags & ACTIVE_HC_FLAGS
                ):
                    self.dirty.add(name)
                if passed and self.send_passed and cluster.outlier is not None:
                    self.passed.setdefault(name, set()).add(host.address)
        self._schedule()

    def _schedule(self) -> None:
        soon = self.resync or bool(self.dirty)
        if not soon and not self.passed:
            return
        if self._handle is not None and (self._handle_soon or not soon):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle_soon = soon
        self._handle = (
            loop.call_soon(self.flush) if soon else loop.call_later(PASSED_FLUSH_S, self.flush)
        )

    def flush(self) -> None:
        """Send what changed since the last message (nothing if nothing did)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        full = self.resync
        if full:
            clusters = self.cm.health_state()
            changed = clusters
            outlier = changed_outlier = ejected_hosts(self.cm)
        else:
            dirty = self.dirty
            clusters = self.cm.health_state(dirty) if dirty else {}
            changed = {n: s for n, s in clusters.items() if self.sent.get(n) != s}
            outlier = ejected_hosts(self.cm, dirty) if dirty else {}
            changed_outlier = {
                n: s for n, s in outlier.items() if self.sent_outlier.get(n, frozenset()) != s
            }
        passed, self.passed = self.passed, {}
        self.resync = False
        self.dirty.clear()
        if full:
            self.sent = clusters
            self.sent_outlier = outlier
        else:
            self.sent.update(changed)
            self.sent_outlier.update(changed_outlier)
        if full or changed or passed or changed_outlier:
            self.send(encode_health(changed, full, passed, changed_outlier))

    def snapshot(self) -> dict[str, Any]:
        """The whole current state, for a worker that starts (after a flush to the others)."""
        self.flush()
        return encode_health(self.sent, True, outlier=self.sent_outlier)


def make_health_checker(cluster: Cluster, protos: Any, path: str) -> HealthCheckers:
    if len(protos) > 1:
        raise ConfigError(
            "health check at index 0 is missing a name; all health checks must have a name when "
            "multiple health checks are configured",
            f"{path}[0]",
        )
    checkers: list[HealthChecker] = []
    for i, p in enumerate(protos):
        hpath = f"{path}[{i}]"
        which = p.WhichOneof("health_checker")
        cls = _CHECKERS.get(which or "")
        if cls is None:
            raise ConfigError(f"{which} is not supported by pyenvoy", f"{hpath}.{which}")
        checkers.append(cls(cluster, p, hpath))
    return HealthCheckers(cluster, checkers)
