"""Listeners: bound sockets whose accepted connections get a network filter chain.

Strategy: each Listener proto is compiled once: its filter chains become lists of filter
factories (from the extension registry) and its stats are bound. ``bind()`` creates and
binds the socket itself (so IPv6 dual-stack, SO_REUSEPORT and hot restart can be decided
here) and ``serve()`` hands it to the event loop; each accepted socket becomes a Connection
that runs the chain of the listener the socket's acceptor points at.

Listeners change while the server runs (LDS, whole-config reload). A Listener object is
immutable config plus the connections it created; a change builds a new Listener and, when
the address stays, the new one takes over the old one's socket by re-pointing the acceptor
(no rebind, no refused connection): new connections get the new chain, existing ones finish
on the old one, which drains (``connection: close`` on their next response, closed at the
end of ``--drain-time-s``). The ListenerManager holds the active, warming (waiting for RDS)
and draining listeners, applies LDS responses per listener as Envoy does (a bad listener is
rejected, the others apply) and offers the prepare/activate steps a whole-config reload
uses to change everything or nothing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.fields import reject_unsupported
from pyenvoy.drain import DrainSequence
from pyenvoy.extensions import registry
from pyenvoy.network.connection import DEFAULT_BUFFER_LIMIT, Connection
from pyenvoy.stats import StatsStruct

if TYPE_CHECKING:
    from envoy.config.listener.v3.listener_pb2 import Listener as ListenerProto

    from pyenvoy.config.xds import DecodedResource, FilesystemSubscription
    from pyenvoy.stats import Store

log = logging.getLogger("pyenvoy.config")
# Envoy logs LDS changes on its "upstream" logger (lds_api.cc).
lds_log = logging.getLogger("pyenvoy.upstream")


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
        "workers_pinned",
        "workers_started",
    )


def listener_stat_address(host: str, port: int) -> str:
    """Envoy's stat name for a listener address: ``0.0.0.0_10000``, ``[__1]_10000``."""
    if ":" in host:
        return f"[{host}]:{port}".replace(":", "_")
    return f"{host}_{port}"


INBOUND = 1  # envoy.config.core.v3.TrafficDirection


# accept() errors that mean "out of resources": stop accepting for a moment (like asyncio).
_ACCEPT_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_ACCEPT_RETRY_DELAY_S = 1.0


class _Acceptor:
    """Accepts on one listening socket; each connection runs the chain of the listener the
    acceptor points at (re-pointed when a listener is replaced).

    Every readable event accepts all pending connections (Envoy's default; its listener's
    ``max_connections_to_accept_per_socket_event`` caps the batch). uvloop's own servers take
    ONE connection per event-loop iteration (libuv), so on a busy loop a burst of new
    connections waited in the kernel's accept queue: a wrk start with 256 connections was
    accepted over ~1.6 s, one every 4-10 ms, and those first requests waited as long."""

    __slots__ = ("listener", "sock", "_loop", "_fd", "_limit", "_paused", "closed")

    def __init__(self, listener: Listener, sock: socket.socket, limit: int) -> None:
        self.listener = listener
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._limit = limit
        self._paused: asyncio.TimerHandle | None = None
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._on_readable)

    def __call__(self) -> Connection:
        lst = self.listener
        return Connection(lst.filter_factories, lst, lst.buffer_limit)

    def _on_readable(self) -> None:
        accept = self.sock.accept
        loop = self._loop
        n = self._limit
        while n != 0:
            try:
                conn, _addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in _ACCEPT_RESOURCE_ERRNOS:
                    log.error(
                        "listener '%s': accept failed (%s); retrying in %.0f s",
                        self.listener.name,
                        e.strerror,
                        _ACCEPT_RETRY_DELAY_S,
                    )
                    loop.remove_reader(self._fd)
                    self._paused = loop.call_later(_ACCEPT_RETRY_DELAY_S, self._resume)
                else:
                    log.error("listener '%s': accept failed: %s", self.listener.name, e)
                return
            conn.setblocking(False)
            loop.create_task(loop.connect_accepted_socket(self, conn)).add_done_callback(
                _adopted
            )
            n -= 1

    def _resume(self) -> None:
        self._paused = None
        if not self.closed:
            self._loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        """Stop accepting and close the listening socket (the kernel's queue with it)."""
        if self.closed:
            return
        self.closed = True
        if self._paused is not None:
            self._paused.cancel()
        else:
            self._loop.remove_reader(self._fd)
        self.sock.close()


def _adopted(task: asyncio.Task[Any]) -> None:
    """A connection that could not be set up (reset before it was adopted) is just gone."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("accepted connection dropped: %r", task.exception())


def _without_chains(proto: Any) -> bytes:
    p = type(proto)()
    p.CopyFrom(proto)
    p.ClearField("filter_chains")
    p.ClearField("default_filter_chain")
    return bytes(p.SerializeToString(deterministic=True))


class Listener:
    def __init__(
        self,
        proto: ListenerProto,
        stats: Store,
        cluster_manager: Any,
        server: Any,
        path: str,
        *,
        added_via_api: bool = False,
        version_info: str = "",
    ) -> None:
        self.proto = proto
        self.name = proto.name
        self.path = path
        self.added_via_api = added_via_api
        self.version_info = version_info
        self.last_updated = time.time()
        self.proto_hash = proto.SerializeToString(deterministic=True)
        self.traffic_direction = proto.traffic_direction
        if not proto.HasField("address"):
            raise ConfigError("listener address is required", f"{path}.address")
        if not proto.address.HasField("socket_address"):
            raise ConfigError(
                "only socket_address listener addresses are supported", f"{path}.address"
            )
        sa = proto.address.socket_address
        if sa.protocol != 0:
            raise ConfigError("UDP listeners are not supported by pyenvoy yet", f"{path}.address")
        self.host = sa.address
        self.port = sa.port_value
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.host else socket.AF_INET, self.host)
        except OSError:
            raise ConfigError(
                f"malformed IP address: {self.host}", f"{path}.address.socket_address.address"
            ) from None
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
            raise ConfigError(
                "use_original_dst/transparent/freebind are not supported by pyenvoy", path
            )
        self.buffer_limit = (
            proto.per_connection_buffer_limit_bytes.value
            if proto.HasField("per_connection_buffer_limit_bytes")
            else DEFAULT_BUFFER_LIMIT
        )
        self.backlog = proto.tcp_backlog_size.value if proto.HasField("tcp_backlog_size") else 1024
        # Envoy: no limit unless max_connections_to_accept_per_socket_event is set (-1 here).
        self.max_accept_per_event = (
            proto.max_connections_to_accept_per_socket_event.value
            if proto.HasField("max_connections_to_accept_per_socket_event")
            else -1
        )
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
            raise ConfigError(
                "filter_chain_match is not supported by pyenvoy yet", f"{cpath}.filter_chain_match"
            )
        if chain.HasField("transport_socket"):
            ts = chain.transport_socket
            if ts.name not in (
                "envoy.transport_sockets.raw_buffer",
                "raw_buffer",
            ) and not ts.typed_config.type_url.endswith("RawBuffer"):
                raise ConfigError(
                    f"{ts.name or ts.typed_config.type_url} is not supported by pyenvoy yet",
                    f"{cpath}.transport_socket",
                )
        if chain.use_proxy_proto.value:
            raise ConfigError(
                "use_proxy_proto is not supported by pyenvoy yet", f"{cpath}.use_proxy_proto"
            )
        # RDS providers the chain's HCMs acquired: released when this listener is gone.
        self.rds: list[Any] = []
        self.filter_factories = self._build_chain(chain, cpath, stats, cluster_manager, server)
        # The accept loop while this listener serves (moves to a replacing listener).
        self.server: _Acceptor | None = None
        self.socket: socket.socket | None = None
        self.local_address: tuple[str, int] | None = None
        self.connections: set[Connection] = set()
        self.drain: DrainSequence | None = None
        # A listener whose socket this one will take over when it becomes active.
        self.donor: Listener | None = None

    def _build_chain(
        self, chain: Any, path: str, stats: Store, cm: Any, server: Any
    ) -> list[Callable[[], Any]]:
        providers = getattr(server, "route_config_providers", None)
        if providers is None:
            return self._build_filters(chain, path, stats, cm, server)
        with providers.collect() as acquired:
            try:
                factories = self._build_filters(chain, path, stats, cm, server)
            except BaseException:
                from pyenvoy.config.rds import release_all

                release_all(acquired)
                raise
        self.rds = list(acquired)
        return factories

    def _build_filters(
        self, chain: Any, path: str, stats: Store, cm: Any, server: Any
    ) -> list[Callable[[], Any]]:
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
                cluster_manager=cm,
                stats=stats,
                server=server,
                path=f"{fpath}.typed_config",
                listener_scope=self.scope,
            )
            factories.append(ext.factory(msg, ctx))
        return factories

    # --- state ---------------------------------------------------------------------------
    @property
    def warm(self) -> bool:
        """True once every RDS provider of the chain has answered (Envoy's listener warming)."""
        return all(p.initialized for p, _ in self.rds)

    async def wait_warm(self) -> None:
        for p, _ in self.rds:
            await p.wait_initialized()

    @property
    def draining(self) -> bool:
        return self.drain is not None

    def same_except_chains(self, other: Listener) -> bool:
        """Only the filter chains differ (Envoy's in-place filter chain update)."""
        return _without_chains(self.proto) == _without_chains(other.proto)

    def release(self) -> None:
        """Drop what this listener holds besides connections (RDS subscriptions)."""
        from pyenvoy.config.rds import release_all

        release_all(self.rds)

    # --- socket --------------------------------------------------------------------------
    def make_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.proto.HasField("enable_reuse_port") and self.proto.enable_reuse_port.value:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.ipv4_compat else 1
                )
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def bind(self, sock: socket.socket | None = None) -> None:
        """Own a listening socket (``sock`` if inherited); ConfigError if it cannot bind."""
        if sock is None:
            try:
                sock = self.make_socket()
            except OSError as e:
                raise ConfigError(
                    f"cannot bind '{self.host}:{self.port}': {e.strerror or e}",
                    f"{self.path}.address",
                ) from None
        self.socket = sock
        addr = sock.getsockname()
        self.local_address = (addr[0], addr[1])

    async def serve(self) -> None:
        """Start accepting on the bound socket."""
        assert self.socket is not None
        self.server = _Acceptor(self, self.socket, self.max_accept_per_event)
        assert self.local_address is not None
        log.info(
            "listener '%s' bound to %s:%d", self.name, self.local_address[0], self.local_address[1]
        )

    async def start(self, sock: socket.socket | None = None) -> None:
        self.bind(sock)
        await self.serve()

    def take_over(self, old: Listener) -> None:
        """Serve ``old``'s socket: its acceptor now creates connections with this chain."""
        self.server, self.socket = old.server, old.socket
        self.local_address = old.local_address
        old.server = old.socket = None
        if self.server is not None:
            self.server.listener = self

    def close_socket(self) -> None:
        """Close a socket that was bound but never served (a rejected change)."""
        if self.server is None and self.socket is not None:
            self.socket.close()
            self.socket = None

    # --- connections ---------------------------------------------------------------------
    def on_connection_open(self, conn: Connection) -> None:
        s = self.stats
        s.downstream_cx_total.value += 1
        s.downstream_cx_active.value += 1
        w = self.worker_stats
        w.downstream_cx_total.value += 1
        w.downstream_cx_active.value += 1
        self.connections.add(conn)
        d = self.drain
        if d is not None:
            d.add(conn)

    def on_connection_close(self, conn: Connection) -> None:
        s = self.stats
        s.downstream_cx_active.value -= 1
        s.downstream_cx_destroy.value += 1
        self.worker_stats.downstream_cx_active.value -= 1

        s.downstream_cx_length_ms.record((time.monotonic() - conn.start_monotonic) * 1000)
        self.connections.discard(conn)
        d = self.drain
        if d is not None:
            d.discard(conn)
            if not self.connections and d.close_at_end and self.server is None:
                d.finish()  # nothing left to drain

    def start_drain(
        self,
        drain_time: float,
        strategy: str = "gradual",
        close_at_end: bool = True,
        on_done: Callable[[], None] | None = None,
    ) -> DrainSequence:
        """Drain this listener's connections (and those it still accepts) over ``drain_time``."""
        if self.drain is not None:
            self.drain.cancel()
        d = self.drain = DrainSequence(drain_time, strategy, close_at_end, on_done)
        for c in list(self.connections):
            d.add(c)
        if close_at_end and not self.connections and self.server is None:
            d.finish()
        return d

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            self.socket = None
        else:
            self.close_socket()

    def close_connections(self) -> None:
        for c in list(self.connections):
            c.close(flush=True)


class ListenerManager:
    """The server's listeners: active, warming (waiting for RDS) and draining."""

    def __init__(
        self,
        protos: Any,
        stats: Store,
        cluster_manager: Any,
        server: Any,
        path: str = "static_resources.listeners",
    ) -> None:
        self.store = stats
        self.cluster_manager = cluster_manager
        self.server = server
        self.stats = ListenerManagerStats(stats.scope("listener_manager"))
        self.listeners: list[Listener] = []
        self.warming: dict[str, Listener] = {}
        self.draining: list[Listener] = []
        # LDS: the subscription, the last accepted version and per-listener failures.
        self.lds: FilesystemSubscription | None = None
        self.version_info = ""
        self.error_states: dict[str, tuple[Any, float, str]] = {}
        self._inherited: dict[tuple[str, int], socket.socket] = {}
        self._warming_tasks: set[asyncio.Task[None]] = set()
        try:
            self.listeners = self.build_static(protos, path)
        except BaseException:
            for lst in self.listeners:
                lst.release()
            raise
        for _ in self.listeners:
            self.stats.listener_added.inc()

    # --- building --------------------------------------------------------------------------
    def build(
        self, proto: Any, path: str, *, added_via_api: bool = False, version_info: str = ""
    ) -> Listener:
        return Listener(
            proto,
            self.store,
            self.cluster_manager,
            self.server,
            path,
            added_via_api=added_via_api,
            version_info=version_info,
        )

    def build_static(
        self,
        protos: Any,
        path: str = "static_resources.listeners",
        keep: dict[str, Listener] | None = None,
    ) -> list[Listener]:
        """Listener objects for static ``protos``: those equal to one in ``keep`` (by name)
        are reused, the others built. ConfigError on any problem (built ones released)."""
        out: list[Listener] = []
        names: set[str] = set()
        try:
            for i, proto in enumerate(protos):
                lpath = f"{path}[{i}]"
                old = keep.get(proto.name) if keep else None
                if old is not None and old.proto_hash == proto.SerializeToString(
                    deterministic=True
                ):
                    listener = old
                else:
                    listener = self.build(proto, lpath)
                if listener.name and listener.name in names:
                    if listener is not old:
                        listener.release()
                    raise ConfigError(
                        f"error adding listener named '{listener.name}': duplicate listener name",
                        lpath,
                    )
                names.add(listener.name)
                out.append(listener)
            seen: dict[tuple[str, int], str] = {}
            for listener in out:
                key = (listener.host, listener.port)
                if listener.port and key in seen:
                    raise ConfigError(
                        f"error adding listener '{listener.host}:{listener.port}': listener '{listener.name}' has duplicate address "
                        f"'{listener.host}:{listener.port}' as existing listener '{seen[key]}'",
                        listener.path,
                    )
                seen[key] = listener.name
        except BaseException:
            for listener in out:
                if keep is None or keep.get(listener.name) is not listener:
                    listener.release()
            raise
        return out

    # --- start / stop ------------------------------------------------------------------------
    async def start(self, sockets: dict[tuple[str, int], socket.socket] | None = None) -> None:
        """Bind (or adopt from ``sockets``, keyed by configured (host, port)) every listener."""
        if sockets:
            self._inherited = dict(sockets)
        started: list[Listener] = []
        try:
            for listener in self.listeners:
                sock = self._inherited.pop((listener.host, listener.port), None)
                if not listener.warm:
                    await listener.wait_warm()
                await listener.start(sock)
                started.append(listener)
                self.stats.listener_create_success.inc()
        except BaseException:
            for listener in started:
                listener.stop_listening()
            self.stats.listener_create_failure.inc()
            raise
        self._update_gauges()
        self.stats.workers_started.set(1)

    def stop_listening(self) -> None:
        for listener in self.listeners:
            listener.stop_listening()
        for listener in self.warming.values():
            listener.close_socket()
        for task in list(self._warming_tasks):
            task.cancel()

    def close_connections(self) -> None:
        for listener in self.all_listeners():
            listener.close_connections()

    def close(self) -> None:
        """Server shutdown: stop everything, including drains and subscriptions."""
        self.stop_listening()
        if self.lds is not None:
            self.lds.stop()
        for listener in list(self.draining):
            if listener.drain is not None:
                listener.drain.cancel()
        for listener in self.all_listeners():
            listener.release()

    def get(self, name: str) -> Listener | None:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        return None

    def all_listeners(self) -> list[Listener]:
        """Active, warming and draining listeners (everything that may own connections)."""
        return self.listeners + list(self.warming.values()) + self.draining

    def _update_gauges(self) -> None:
        s = self.stats
        s.total_listeners_active.set(len(self.listeners))
        s.total_listeners_warming.set(len(self.warming))
        s.total_listeners_draining.set(len(self.draining))

    # --- changes -----------------------------------------------------------------------------
    def _drain_settings(self) -> tuple[float, str]:
        opts = getattr(self.server, "options", None)
        return float(getattr(opts, "drain_time_s", 600)), str(
            getattr(opts, "drain_strategy", "gradual")
        )

    def prepare(
        self,
        listener: Listener,
        replacing: Listener | None = None,
        donors: tuple[Listener, ...] = (),
    ) -> None:
        """Make ``listener`` ready to activate: plan to take over the socket of ``replacing``
        (or of a retiring ``donors`` listener) on the same address, else bind a new one.
        ConfigError on a duplicate address or a bind failure (nothing changed then)."""
        for d in ((replacing,) if replacing is not None else ()) + donors:
            if d.socket is None or (d.host, d.port) != (listener.host, listener.port):
                continue
            if listener.port == 0 and d is not replacing:
                continue
            listener.donor = d
            return
        if listener.port:
            for other in self.listeners + list(self.warming.values()):
                if other is replacing or other in donors or other.name == listener.name:
                    continue
                if (other.host, other.port) == (listener.host, listener.port):
                    self.stats.listener_create_failure.inc()
                    raise ConfigError(
                        f"error adding listener '{listener.host}:{listener.port}': listener '{listener.name}' has "
                        f"duplicate address '{listener.host}:{listener.port}' as existing listener '{other.name}'",
                        f"{listener.path}.address",
                    )
        try:
            listener.bind(self._inherited.pop((listener.host, listener.port), None))
        except ConfigError:
            self.stats.listener_create_failure.inc()
            raise

    def discard(self, listener: Listener) -> None:
        """Undo ``prepare``/build of a listener that will not be activated."""
        listener.donor = None
        listener.close_socket()
        listener.release()

    async def activate(self, listener: Listener, replacing: Listener | None = None) -> None:
        """Start serving ``listener``; ``replacing`` (the same name) starts draining."""
        donor = listener.donor
        listener.donor = None
        if donor is not None and donor.socket is not None:
            listener.take_over(donor)
        else:
            if listener.socket is None:
                listener.bind(self._inherited.pop((listener.host, listener.port), None))
            await listener.serve()
        listener.last_updated = time.time()
        self.stats.listener_create_success.inc()
        if replacing is not None and replacing in self.listeners:
            self.listeners[self.listeners.index(replacing)] = listener
            self.drain_listener(replacing)
        else:
            self.listeners.append(listener)
        self._update_gauges()

    def drain_listener(self, listener: Listener, close_at_end: bool = True) -> None:
        """Stop accepting on ``listener`` and drain its connections, then forget it."""
        if listener in self.listeners:
            self.listeners.remove(listener)
        listener.stop_listening()
        if listener in self.draining:
            return
        self.draining.append(listener)
        drain_time, strategy = self._drain_settings()

        def done() -> None:
            if listener in self.draining:
                self.draining.remove(listener)
            listener.release()
            self._update_gauges()

        self._update_gauges()
        listener.start_drain(drain_time, strategy, close_at_end, done)

    def remove(self, listener: Listener) -> None:
        """Remove an active listener: it stops accepting at once and drains."""
        self.stats.listener_removed.inc()
        self.drain_listener(listener)

    # --- LDS ---------------------------------------------------------------------------------
    def subscribe_lds(self, config_source: Any, path: str = "dynamic_resources.lds_config") -> None:
        from pyenvoy.config.xds import TYPE_LISTENER, SubscriptionStats

        xds = self.server.xds
        stats = SubscriptionStats(self.store.scope("listener_manager.lds"))
        self.lds = xds.subscribe(config_source, TYPE_LISTENER, self.on_lds_update, stats, path)

    async def start_lds(self) -> None:
        if self.lds is not None:
            await self.lds.start_async()

    async def on_lds_update(self, resources: list[DecodedResource], version_info: str) -> None:
        """Apply a state-of-the-world LDS response: Envoy's per-listener semantics."""
        lock = getattr(self.server, "config_lock", None)
        if lock is not None:
            async with lock:
                await self._apply_lds(resources, version_info)
        else:
            await self._apply_lds(resources, version_info)

    async def _apply_lds(self, resources: list[DecodedResource], version_info: str) -> None:
        wanted: dict[str, DecodedResource] = {}
        for r in resources:
            name = r.message.name  # type: ignore[attr-defined]
            if name in wanted:
                raise ConfigError(
                    f"duplicate listener {name} found", f"resources[{r.position}].name"
                )
            wanted[name] = r
        # Removals first (their ports become free for the additions).
        for listener in list(self.listeners):
            if listener.added_via_api and listener.name not in wanted:
                lds_log.info("lds: remove listener '%s'", listener.name)
                self.remove(listener)
        for name, listener in list(self.warming.items()):
            if name not in wanted:
                lds_log.info("lds: remove listener '%s'", name)
                del self.warming[name]
                self.discard(listener)
                self.stats.listener_removed.inc()
        for name in list(self.error_states):
            if name not in wanted:
                del self.error_states[name]
        errors: list[str] = []
        for name, r in wanted.items():
            proto = r.message
            existing = self.get(name)
            if existing is not None and not existing.added_via_api:
                continue  # a static listener of that name wins (Envoy skips it)
            current = self.warming.get(name) or existing
            digest = proto.SerializeToString(deterministic=True)
            if current is not None and current.proto_hash == digest:
                continue
            path = f"resources[{r.position}]"
            try:
                listener = self.build(proto, path, added_via_api=True, version_info=version_info)
            except ConfigError as e:
                self._rejected(name, proto, e, errors)
                continue
            old_warming = self.warming.pop(name, None)
            if old_warming is not None:
                self.discard(old_warming)
            try:
                self.prepare(listener, replacing=existing)
            except ConfigError as e:
                listener.release()
                self._rejected(name, proto, e, errors)
                continue
            lds_log.info("lds: add/update listener '%s'", name)
            self.error_states.pop(name, None)
            if existing is not None:
                self.stats.listener_modified.inc()
                if listener.same_except_chains(existing):
                    self.stats.listener_in_place_updated.inc()
            else:
                self.stats.listener_added.inc()
            if listener.warm:
                await self.activate(listener, existing)
            else:
                self._warm_later(listener)
        self._update_gauges()
        if errors:
            raise ConfigError("Error adding/updating listener(s) " + ", ".join(errors))
        self.version_info = version_info

    def _rejected(self, name: str, proto: Any, e: ConfigError, errors: list[str]) -> None:
        lds_log.warning("lds: listener '%s' config rejected: %s", name, e)
        self.error_states[name] = (proto, time.time(), e.message)
        errors.append(f"{name}: {e}")

    def _warm_later(self, listener: Listener) -> None:
        """Keep ``listener`` warming until its RDS providers answered, then activate it."""
        self.warming[listener.name] = listener
        self._update_gauges()

        async def run() -> None:
            await listener.wait_warm()
            if self.warming.get(listener.name) is not listener:
                return
            del self.warming[listener.name]
            try:
                await self.activate(listener, self.get(listener.name))
            except ConfigError as e:
                lds_log.warning("lds: listener '%s' failed to start: %s", listener.name, e)
                self.discard(listener)
                self._update_gauges()

        task = asyncio.get_running_loop().create_task(run())
        self._warming_tasks.add(task)
        task.add_done_callback(self._warming_tasks.discard)

    # --- admin -------------------------------------------------------------------------------
    def drain_for_admin(self, graceful: bool, inbound_only: bool, skip_exit: bool) -> None:
        """/drain_listeners: drain connections over the drain time (``connection: close``);
        stop the listeners at once, or at the end with ``graceful``, or never (``skip_exit``)."""
        drain_time, strategy = self._drain_settings()
        chosen = [
            lst for lst in self.listeners if not inbound_only or lst.traffic_direction == INBOUND
        ]
        for listener in chosen:
            if not skip_exit and not graceful:
                listener.stop_listening()
                self.stats.listener_stopped.inc()
            stop_at_end = graceful and not skip_exit

            def done(lst: Listener = listener, stop: bool = stop_at_end) -> None:
                lst.drain = None
                if stop and lst.server is not None:
                    lst.stop_listening()
                    self.stats.listener_stopped.inc()

            listener.start_drain(drain_time, strategy, close_at_end=False, on_done=done)
