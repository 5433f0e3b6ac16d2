"""Per-request (or per-TCP-session) facts: what happened, for headers, logs and stats.

Strategy: one slotted object per stream, filled in as the stream progresses. Response
flags are Envoy's short codes (``NR``, ``UH``, ``UF`` ...) kept as a bitmask; they are only
rendered to text when a log line or ``%RESPONSE_FLAGS%`` asks for them.
"""

from __future__ import annotations

import time

# Envoy's response flags, in Envoy's rendering order (see StreamInfo::ResponseFlagUtils).
FAILED_LOCAL_HEALTH_CHECK = 1 << 0  # LH
NO_HEALTHY_UPSTREAM = 1 << 1  # UH
UPSTREAM_REQUEST_TIMEOUT = 1 << 2  # UT
LOCAL_RESET = 1 << 3  # LR
UPSTREAM_REMOTE_RESET = 1 << 4  # UR
UPSTREAM_CONNECTION_FAILURE = 1 << 5  # UF
UPSTREAM_CONNECTION_TERMINATION = 1 << 6  # UC
UPSTREAM_OVERFLOW = 1 << 7  # UO
NO_ROUTE_FOUND = 1 << 8  # NR
DELAY_INJECTED = 1 << 9  # DI
FAULT_INJECTED = 1 << 10  # FI
RATE_LIMITED = 1 << 11  # RL
UNAUTHORIZED_EXTERNAL_SERVICE = 1 << 12  # UAEX
RATELIMIT_SERVICE_ERROR = 1 << 13  # RLSE
DOWNSTREAM_CONNECTION_TERMINATION = 1 << 14  # DC
UPSTREAM_RETRY_LIMIT_EXCEEDED = 1 << 15  # URX
STREAM_IDLE_TIMEOUT = 1 << 16  # SI
INVALID_ENVOY_REQUEST_HEADERS = 1 << 17  # IH
DOWNSTREAM_PROTOCOL_ERROR = 1 << 18  # DPE
UPSTREAM_MAX_STREAM_DURATION_REACHED = 1 << 19  # UMSDR
RESPONSE_FROM_CACHE_FILTER = 1 << 20  # RFCF
NO_FILTER_CONFIG_FOUND = 1 << 21  # NFCF
DURATION_TIMEOUT = 1 << 22  # DT
UPSTREAM_PROTOCOL_ERROR = 1 << 23  # UPE
NO_CLUSTER_FOUND = 1 << 24  # NC
OVERLOAD_MANAGER = 1 << 25  # OM
DNS_RESOLUTION_FAILURE = 1 << 26  # DF
DROP_OVERLOAD = 1 << 27  # DO
DOWNSTREAM_REMOTE_RESET = 1 << 28  # DR

RESPONSE_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (FAILED_LOCAL_HEALTH_CHECK, "LH"),
    (NO_HEALTHY_UPSTREAM, "UH"),
    (UPSTREAM_REQUEST_TIMEOUT, "UT"),
    (LOCAL_RESET, "LR"),
    (UPSTREAM_REMOTE_RESET, "UR"),
    (UPSTREAM_CONNECTION_FAILURE, "UF"),
    (UPSTREAM_CONNECTION_TERMINATION, "UC"),
    (UPSTREAM_OVERFLOW, "UO"),
    (NO_ROUTE_FOUND, "NR"),
    (DELAY_INJECTED, "DI"),
    (FAULT_INJECTED, "FI"),
    (RATE_LIMITED, "RL"),
    (UNAUTHORIZED_EXTERNAL_SERVICE, "UAEX"),
    (RATELIMIT_SERVICE_ERROR, "RLSE"),
    (DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
    (UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
    (STREAM_IDLE_TIMEOUT, "SI"),
    (INVALID_ENVOY_REQUEST_HEADERS, "IH"),
    (DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
    (UPSTREAM_MAX_STREAM_DURATION_REACHED, "UMSDR"),
    (RESPONSE_FROM_CACHE_FILTER, "RFCF"),
    (NO_FILTER_CONFIG_FOUND, "NFCF"),
    (DURATION_TIMEOUT, "DT"),
    (UPSTREAM_PROTOCOL_ERROR, "UPE"),
    (NO_CLUSTER_FOUND, "NC"),
    (OVERLOAD_MANAGER, "OM"),
    (DNS_RESOLUTION_FAILURE, "DF"),
    (DROP_OVERLOAD, "DO"),
    (DOWNSTREAM_REMOTE_RESET, "DR"),
)


def format_response_flags(flags: int) -> str:
    """Envoy's ``%RESPONSE_FLAGS%`` text: codes joined by ',' or '-' when none."""
    if not flags:
        return "-"
    return ",".join(name for bit, name in RESPONSE_FLAG_NAMES if flags & bit)


def format_address(addr: tuple[str, int] | None) -> str:
    """``127.0.0.1:80`` / ``[::1]:80`` as Envoy prints socket addresses."""
    if not addr:
        return "-"
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


_time = time.time
_monotonic = time.monotonic


class StreamInfo:
    __slots__ = (
        "start_time",
        "start_monotonic",
        "downstream_remote_address",
        "downstream_local_address",
        "protocol",
        "response_code",
        "response_code_details",
        "response_flags",
        "upstream_host",
        "upstream_cluster",
        "upstream_local_address",
        "route_name",
        "virtual_host_name",
        "request_id",
        "bytes_received",
        "bytes_sent",
        "request_complete_monotonic",
        "first_upstream_rx_monotonic",
        "last_downstream_tx_monotonic",
        "upstream_transport_failure_reason",
        "attempt_count",
        "health_check",
    )

    def __init__(
        self,
        downstream_remote_address: tuple[str, int] | None = None,
        downstream_local_address: tuple[str, int] | None = None,
        protocol: str = "HTTP/1.1",
    ) -> None:
        self.start_time = _time()
        self.start_monotonic = _monotonic()
        self.downstream_remote_address = downstream_remote_address
        self.downstream_local_address = downstream_local_address
        self.protocol = protocol
        self.response_code: int | None = None
        self.response_code_details: str = ""
        self.response_flags = 0
        self.upstream_host: tuple[str, int] | None = None
        self.upstream_cluster: str | None = None
        self.upstream_local_address: tuple[str, int] | None = None
        self.route_name: str = ""
        self.virtual_host_name: str = ""
        self.request_id: bytes | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.request_complete_monotonic: float | None = None
        self.first_upstream_rx_monotonic: float | None = None
        self.last_downstream_tx_monotonic: float | None = None
        self.upstream_transport_failure_reason: str = ""
        self.attempt_count = 0
        # Set by the health_check filter: Envoy leaves such requests out of rq_Nxx stats.
        self.health_check = False

    def set_response_flag(self, flag: int) -> None:
        self.response_flags |= flag

    def has_response_flag(self, flag: int) -> bool:
        return bool(self.response_flags & flag)

    def duration_ms(self) -> int:
        return int((time.monotonic() - self.start_monotonic) * 1000)
