"""Listeners: bound sockets whose accepted connections get a network filter chain.

Strategy: each Listener proto is compiled once: its filter chains become lists of filter
factories (from the extension registry) and its stats are bound. ``start()`` creates and
binds the socket itself (so IPv6 dual-stack, SO_REUSEPORT and hot restart can be decided
here) and hands it to the event loop; each accepted socket becomes a Connection that runs
the chosen chain. The ListenerManager owns all listeners of a config snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.fields import reject_unsupported
from pyenvoy.extensions import registry
from pyenvoy.network.connection import DEFAULT_BUFFER_LIMIT, Connection
from pyenvoy.stats import StatsStruct

if TYPE_CHECKING:
    from envoy.config.listener.v3.listener_pb2 import Listener as ListenerProto

    from pyenvoy.stats import Store

log = logging.getLogger("pyenvoy.config")


class ListenerStats(StatsStruct):
    """``listener.<address>.*``."""

    COUNTERS = (
        "downstream_cx_destroy",
        "downstream_cx_overflow",
        "downstream_cx_overload_reject",
        "downstream_cx_total",
        "downstream_cx_transport_socket_connect_timeout",
        "downstream_global_cx_overflow",
        "downstream_listener_filter_error",
        "downstream_listener_filter_remote_close",
        "downstream_pre_cx_timeout",
        "extension_config_missing",
        "network_extension_config_missing",
        "no_filter_chain_match",
    )
    GAUGES = ("downstream_cx_active", "downstream_pre_cx_active")
    HISTOGRAMS = ("downstream_cx_length_ms",)


class ListenerWorkerStats(StatsStruct):
    COUNTERS = ("downstream_cx_total",)
    GAUGES = ("downstream_cx_active",)


class ListenerManagerStats(StatsStruct):
    COUNTERS = (
        "listener_added",
        "listener_create_failure",
        "listener_create_success",
        "listener_in_place_updated",
        "listener_modified",
        "listener_removed",
        "listener_stopped",
    )
    GAUGES = (
        "total_filter_chains_draining",
        "total_listeners_active",
        "total_listeners_draining",
        "total_listeners_warming",
        "workers_started",
    )


def listener_stat_address(host: str, port: int) -> str:
    """Envoy's stat name for a listener address: ``0.0.0.0_10000``, ``[__1]_10000``."""
    if ":" in host:
        return f"[{host}]:{port}".replace(":", "_")
    return f"{host}_{port}"


class Listener:
    def __init__(self, proto: ListenerProto, stats: Store, cluster_manager: Any, server: Any, path: str) -> None:
        self.proto = proto
        self.name = proto.name
        self.path = path
        if not proto.HasField("address"):
            raise ConfigError("listener address is required", f"{path}.address")
        if not proto.address.HasField("socket_address"):
            raise ConfigError("only socket_address listener addresses are supported", f"{path}.address")
        sa = proto.address.socket_address
        if sa.protocol != 0:
            raise ConfigError("UDP listeners are not supported by pyenvoy yet", f"{path}.address")
        self.host = sa.address
        self.port = sa.port_value
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.host else socket.AF_INET, self.host)
        except OSError:
            raise ConfigError(f"malformed IP address: {self.host}", f"{path}.address.socket_address.address") from None
        self.ipv4_compat = sa.ipv4_compat
        reject_unsupported(
            proto,
            (
                "additional_addresses",
                "fcds_config",
                "filter_chain_matcher",
                "listener_filters",
                "udp_listener_config",
                "api_listener",
                "connection_balance_config",
                "internal_listener",
                "access_log",
            ),
            path,
        )
        if proto.use_original_dst.value or proto.transparent.value or proto.freebind.value:
            raise ConfigError("use_original_dst/transparent/freebind are not supported by pyenvoy", path)
        self.buffer_limit = (
            proto.per_connection_buffer_limit_bytes.value
            if proto.HasField("per_connection_buffer_limit_bytes")
            else DEFAULT_BUFFER_LIMIT
        )
        self.backlog = proto.tcp_backlog_size.value if proto.HasField("tcp_backlog_size") else 1024
        self.stat_prefix = proto.stat_prefix or listener_stat_address(self.host, self.port)
        self.scope = stats.scope(f"listener.{self.stat_prefix}")
        self.stats = ListenerStats(self.scope)
        # Per-worker twins (``listener.<address>.worker_0.*``); pyenvoy runs worker 0.
        self.worker_stats = ListenerWorkerStats(self.scope.scope("worker_0"))
        chains = list(proto.filter_chains)
        if proto.HasField("default_filter_chain"):
            chains.append(proto.default_filter_chain)
        if not chains:
            raise ConfigError("no filter chains specified", f"{path}.filter_chains")
        if len(chains) > 1:
            raise ConfigError(
                "more than one filter chain (filter_chain_match) is not supported by pyenvoy yet",
                f"{path}.filter_chains",
            )
        chain = chains[0]
        cpath = f"{path}.filter_chains[0]"
        if chain.HasField("filter_chain_match") and chain.filter_chain_match.ByteSize():
            raise ConfigError("filter_chain_match is not supported by pyenvoy yet", f"{cpath}.filter_chain_match")
        if chain.HasField("transport_socket"):
            ts = chain.transport_socket
            if ts.name not in ("envoy.transport_sockets.raw_buffer", "raw_buffer") and not ts.typed_config.type_url.endswith("RawBuffer"):
                raise ConfigError(f"{ts.name or ts.typed_config.type_url} is not supported by pyenvoy yet", f"{cpath}.transport_socket")
        if chain.use_proxy_proto.value:
            raise ConfigError("use_proxy_proto is not supported by pyenvoy yet", f"{cpath}.use_proxy_proto")
        self.filter_factories = self._build_chain(chain, cpath, stats, cluster_manager, server)
        self.server: asyncio.AbstractServer | None = None
        self.socket: socket.socket | None = None
        self.local_address: tuple[str, int] | None = None
        self.connections: set[Connection] = set()

    def _build_chain(self, chain: Any, path: str, stats: Store, cm: Any, server: Any) -> list[Callable[[], Any]]:
        from pyenvoy.config import unpack_any

        factories: list[Callable[[], Any]] = []
        n = len(chain.filters)
        if n == 0:
            raise ConfigError("filter chain has no filters", f"{path}.filters")
        for i, f in enumerate(chain.filters):
            fpath = f"{path}.filters[{i}]"
            if f.HasField("config_discovery"):
                raise ConfigError("config_discovery is not supported by pyenvoy yet", fpath)
            type_url = f.typed_config.type_url if f.HasField("typed_config") else ""
            ext = registry.require(registry.NETWORK_FILTER, f.name, type_url, fpath)
            if ext.terminal and i != n - 1:
                raise ConfigError(
                    f"Error: terminal filter named {f.name} of type {ext.name} must be the last filter in a network filter chain.",
                    fpath,
                )
            msg = unpack_any(f.typed_config, f"{fpath}.typed_config") if type_url else None
            ctx = registry.FactoryContext(
                cluster_manager=cm, stats=stats, server=server, path=f"{fpath}.typed_config", listener_scope=self.scope
            )
            factories.append(ext.factory(msg, ctx))
        return factories

    # --- runtime ---------------------------------------------------------------------------
    def make_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.proto.HasField("enable_reuse_port") and self.proto.enable_reuse_port.value:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.ipv4_compat else 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is None:
            try:
                sock = self.make_socket()
            except OSError as e:
                raise ConfigError(
                    f"cannot bind '{self.host}:{self.port}': {e.strerror or e}", f"{self.path}.address"
                ) from None
        self.socket = sock
        addr = sock.getsockname()
        self.local_address = (addr[0], addr[1])
        factories = self.filter_factories
        limit = self.buffer_limit
        self.server = await loop.create_server(
            lambda: Connection(factories, self, limit), sock=sock, backlog=self.backlog
        )
        log.info("listener '%s' bound to %s:%d", self.name, addr[0], addr[1])

    def on_connection_open(self, conn: Connection) -> None:
        s = self.stats
        s.downstream_cx_total.value += 1
        s.downstream_cx_active.value += 1
        w = self.worker_stats
        w.downstream_cx_total.value += 1
        w.downstream_cx_active.value += 1
        self.connections.add(conn)

    def on_connection_close(self, conn: Connection) -> None:
        s = self.stats
        s.downstream_cx_active.value -= 1
        s.downstream_cx_destroy.value += 1
        self.worker_stats.downstream_cx_active.value -= 1

        s.downstream_cx_length_ms.record((time.monotonic() - conn.start_monotonic) * 1000)
        self.connections.discard(conn)

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def close_connections(self) -> None:
        for c in list(self.connections):
            c.close(flush=True)


class ListenerManager:
    def __init__(self, protos: Any, stats: Store, cluster_manager: Any, server: Any, path: str = "static_resources.listeners") -> None:
        self.stats = ListenerManagerStats(stats.scope("listener_manager"))
        self.listeners: list[Listener] = []
        names: set[str] = set()
        for i, proto in enumerate(protos):
            lpath = f"{path}[{i}]"
            listener = Listener(proto, stats, cluster_manager, server, lpath)
            if listener.name and listener.name in names:
                raise ConfigError(f"error adding listener named '{listener.name}': duplicate listener name", lpath)
            names.add(listener.name)
            self.listeners.append(listener)
            self.stats.listener_added.inc()
        seen: dict[tuple[str, int], str] = {}
        for listener in self.listeners:
            key = (listener.host, listener.port)
            if listener.port and key in seen:
                raise ConfigError(
                    f"error adding listener '{listener.host}:{listener.port}': listener '{listener.name}' has duplicate address "
                    f"'{listener.host}:{listener.port}' as existing listener '{seen[key]}'",
                    listener.path,
                )
            seen[key] = listener.name

    async def start(self, sockets: dict[tuple[str, int], socket.socket] | None = None) -> None:
        """Bind (or adopt from ``sockets``, keyed by configured (host, port)) every listener."""
        started: list[Listener] = []
        try:
            for listener in self.listeners:
                sock = sockets.get((listener.host, listener.port)) if sockets else None
                await listener.start(sock)
                started.append(listener)
                self.stats.listener_create_success.inc()
        except BaseException:
            for listener in started:
                listener.stop_listening()
            self.stats.listener_create_failure.inc()
            raise
        self.stats.total_listeners_active.set(len(self.listeners))
        self.stats.workers_started.set(1)

    def stop_listening(self) -> None:
        for listener in self.listeners:
            listener.stop_listening()

    def close_connections(self) -> None:
        for listener in self.listeners:
            listener.close_connections()

    def get(self, name: str) -> Listener | None:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        return None
