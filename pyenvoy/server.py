"""The server: one config snapshot built from a Bootstrap, served on one event loop.

Strategy: ``Server.build()`` compiles the whole bootstrap (clusters, listeners with their
filter chains and route tables) into runtime objects without touching the network; any
problem is a ConfigError with the field path, which is all ``--mode validate`` needs.
``start()`` then resolves DNS clusters, binds listeners and the admin endpoint, and marks
the server LIVE. ``shutdown()`` stops accepting, lets connections finish (bounded by the
drain time) and stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import TYPE_CHECKING, Any

from pyenvoy import __version__
from pyenvoy.config.errors import ConfigError
from pyenvoy.config.fields import is_set, reject_unsupported
from pyenvoy.listener import ListenerManager
from pyenvoy.stats import StatsStruct, Store
from pyenvoy.upstream.cluster_manager import ClusterManager

if TYPE_CHECKING:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy.options import ServerOptions

log = logging.getLogger("pyenvoy.main")

ENVOY_COMPAT_VERSION = "1.40.0"

# Bootstrap fields that would change behaviour and are not implemented yet.
_UNSUPPORTED_BOOTSTRAP = (
    "dynamic_resources",
    "hds_config",
    "stats_sinks",
    "tracing",
    "overload_manager",
    "bootstrap_extensions",
    "default_socket_interface",
    "certificate_provider_instances",
)

STATE_LIVE, STATE_DRAINING, STATE_PRE_INITIALIZING, STATE_INITIALIZING = 0, 1, 2, 3
STATE_NAMES = {0: "LIVE", 1: "DRAINING", 2: "PRE_INITIALIZING", 3: "INITIALIZING"}


class ServerStats(StatsStruct):
    """``server.*``."""

    COUNTERS = (
        "debug_assertion_failures",
        "dropped_stat_flushes",
        "dynamic_unknown_fields",
        "envoy_bug_failures",
        "envoy_notifications",
        "static_unknown_fields",
        "wip_protos",
    )
    GAUGES = (
        "compilation_settings_fips_mode",
        "concurrency",
        "days_until_first_cert_expiring",
        "hot_restart_epoch",
        "hot_restart_generation",
        "live",
        "memory_allocated",
        "memory_heap_size",
        "memory_physical_size",
        "parent_connections",
        "seconds_until_first_ocsp_response_expiring",
        "state",
        "stats_recent_lookups",
        "total_connections",
        "uptime",
        "version",
    )
    HISTOGRAMS = ("initialization_time_ms",)


def _check_bootstrap(bootstrap: Bootstrap) -> None:
    if is_set(bootstrap, "dynamic_resources"):
        raise ConfigError("dynamic_resources (xDS) is not supported by pyenvoy yet", "dynamic_resources")
    reject_unsupported(bootstrap, _UNSUPPORTED_BOOTSTRAP, "")
    sr = bootstrap.static_resources
    if len(sr.secrets):
        raise ConfigError("secrets are not supported by pyenvoy yet", "static_resources.secrets")


class Server:
    """A running (or buildable) pyenvoy instance for one Bootstrap."""

    def __init__(self, bootstrap: Bootstrap, options: ServerOptions | None = None) -> None:
        self.bootstrap = bootstrap
        if options is None:
            from pyenvoy.options import ServerOptions

            options = ServerOptions()
        self.options = options
        self.version = f"{__version__}/envoy-compatible-{ENVOY_COMPAT_VERSION}"
        self.node = bootstrap.node
        self.stats = Store()
        self.server_stats = ServerStats(self.stats.scope("server"))
        self.start_time = time.time()
        self._start_monotonic = time.monotonic()
        self.state = "PRE_INITIALIZING"
        self.healthcheck_failed = False
        self.cluster_manager: ClusterManager | None = None
        self.listener_manager: ListenerManager | None = None
        self.admin: Any = None
        self.admin_address: tuple[str, int] | None = None
        self._stopped: asyncio.Event | None = None
        self._shutting_down = False
        # Extra work before stats are read (admin, embedding): e.g. pulling worker processes'
        # stats into this store. Each is a no-argument callable.
        self.stats_refreshers: list[Any] = []
        self.build()

    # --- config -----------------------------------------------------------------------
    def build(self) -> None:
        """Compile the bootstrap into runtime objects (raises ConfigError)."""
        bootstrap = self.bootstrap
        _check_bootstrap(bootstrap)
        sr = bootstrap.static_resources
        self.cluster_manager = ClusterManager(sr.clusters, self.stats)
        self.listener_manager = ListenerManager(sr.listeners, self.stats, self.cluster_manager, self)
        self.server_stats.concurrency.set(max(1, getattr(self.options, "concurrency", 1) or 1))
        self.server_stats.hot_restart_epoch.set(getattr(self.options, "restart_epoch", 0) or 0)
        self.server_stats.state.set(STATE_PRE_INITIALIZING)

    def route_configs(self) -> list[Any]:
        """Static route configurations (inline in HCMs) for /config_dump."""
        out: list[Any] = []
        lm = self.listener_manager
        if lm is None:
            return out
        from pyenvoy.config import unpack_any

        for listener in lm.listeners:
            for chain in list(listener.proto.filter_chains):
                for f in chain.filters:
                    if f.typed_config.type_url.endswith("HttpConnectionManager"):
                        hcm = unpack_any(f.typed_config)
                        if hcm.HasField("route_config"):
                            out.append(hcm.route_config)
        return out

    # --- lifecycle ------------------------------------------------------------------------
    async def start(
        self,
        inherited_sockets: dict[tuple[str, int], Any] | None = None,
        listen: bool = True,
        admin: bool = True,
    ) -> None:
        """Resolve clusters, bind the admin endpoint and the listeners, go LIVE.

        ``inherited_sockets`` maps (host, port) to an already-bound listening socket (hot
        restart, worker processes); ``listen``/``admin`` False skip those parts (a process
        that only runs workers' listeners, or only the admin)."""
        self.state = "INITIALIZING"
        self.server_stats.state.set(STATE_INITIALIZING)
        self._stopped = asyncio.Event()
        assert self.cluster_manager is not None and self.listener_manager is not None
        t0 = time.monotonic()
        await self.cluster_manager.initialize()
        admin_cfg = self.bootstrap.admin
        try:
            if admin and admin_cfg.HasField("address"):
                from pyenvoy.admin.server import AdminServer

                sa = admin_cfg.address.socket_address
                self.admin = AdminServer(self, (sa.address, sa.port_value), admin_cfg.access_log_path or None)
                try:
                    self.admin_address = await self.admin.start()
                except OSError as e:
                    self.admin = None
                    raise ConfigError(
                        f"cannot bind '{sa.address}:{sa.port_value}': {e.strerror or e}",
                        "admin.address",
                    ) from None
                path = getattr(self.options, "admin_address_path", None)
                if path:
                    with open(path, "w") as f:
                        f.write(f"{self.admin_address[0]}:{self.admin_address[1]}\n")
            if listen:
                await self.listener_manager.start(inherited_sockets)
        except BaseException:
            await self._close()
            raise
        self.server_stats.initialization_time_ms.record((time.monotonic() - t0) * 1000)
        self.state = "LIVE"
        self.server_stats.state.set(STATE_LIVE)
        self.server_stats.live.set(1)
        log.info("all listeners started; pyenvoy %s is LIVE", self.version)

    def refresh_server_stats(self) -> None:
        for refresh in self.stats_refreshers:
            refresh()
        s = self.server_stats
        s.uptime.set(int(time.monotonic() - self._start_monotonic))
        lm = self.listener_manager
        if lm is not None:
            s.total_connections.set(sum(len(listener.connections) for listener in lm.listeners))
        try:
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            s.memory_physical_size.set(rss_kb * 1024)
            with open(f"/proc/{os.getpid()}/statm") as f:
                pages = int(f.read().split()[1])
            s.memory_allocated.set(pages * os.sysconf("SC_PAGE_SIZE"))
            s.memory_heap_size.set(pages * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass

    def shutdown(self) -> None:
        """Graceful stop (admin /quitquitquit, SIGTERM): schedule it on the loop."""
        if self._shutting_down:
            return
        self._shutting_down = True
        asyncio.get_running_loop().create_task(self.stop())

    async def stop(self, drain_time: float | None = None) -> None:
        """Stop accepting, give open connections up to ``drain_time`` to finish, close."""
        self._shutting_down = True
        self.state = "DRAINING"
        self.server_stats.state.set(STATE_DRAINING)
        self.server_stats.live.set(0)
        lm = self.listener_manager
        if lm is not None:
            lm.stop_listening()
            for listener in lm.listeners:
                for conn in list(listener.connections):
                    for f in conn.read_filters:
                        drain = getattr(f, "drain", None)
                        if drain is not None:
                            drain()
            if drain_time is None:
                drain_time = min(float(getattr(self.options, "drain_time_s", 600) or 0), 5.0)
            deadline = time.monotonic() + drain_time
            while time.monotonic() < deadline and any(listener.connections for listener in lm.listeners):
                await asyncio.sleep(0.05)
            lm.close_connections()
        await self._close()

    async def _close(self) -> None:
        if self.admin is not None:
            try:
                await self.admin.stop()
            except Exception:
                log.exception("admin stop failed")
        if self.cluster_manager is not None:
            self.cluster_manager.close()
        lm = self.listener_manager
        if lm is not None:
            lm.stop_listening()
        from pyenvoy.access_log import flush_all

        flush_all()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_closed(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()


def validate_config(bootstrap: Bootstrap) -> None:
    """Build everything a config describes without binding sockets (``--mode validate``)."""
    Server(bootstrap)


def run(options: ServerOptions, bootstrap: Bootstrap) -> int:
    """Run pyenvoy as a process until told to stop (see pyenvoy/main.py); the exit code."""
    from pyenvoy.main import run_process

    return run_process(options, bootstrap)
