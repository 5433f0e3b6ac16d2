"""The server: a config built from a Bootstrap, served on one event loop, changed live.

Strategy: ``Server.build()`` compiles the bootstrap's static resources (clusters,
listeners with their filter chains and route tables) into runtime objects without touching
the network; any problem is a ConfigError with the field path, which is all ``--mode
validate`` needs. ``start()`` then resolves DNS clusters, applies the filesystem CDS
response (dynamic_resources.cds_config), binds the admin endpoint and the listeners,
applies the filesystem LDS response, and marks the server LIVE. After that the config
changes in place: xDS files are watched (pyenvoy.config.xds), SIGHUP or a changed ``-c``
file (``--watch-config``) re-reads the static resources (pyenvoy.reload), and every change
is built completely before anything is swapped, one change at a time (``config_lock``).

``drain_listeners()`` is admin's /drain_listeners; ``shutdown()`` (SIGTERM,
/quitquitquit) stops accepting, asks every connection to finish (``connection: close``,
idle connections closed), waits up to ``--drain-time-s`` and stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from typing import TYPE_CHECKING, Any

from pyenvoy import __version__
from pyenvoy.config.errors import ConfigError
from pyenvoy.config.fields import is_set, reject_unsupported
from pyenvoy.config.rds import RouteConfigProviderManager
from pyenvoy.config.xds import XdsManager, path_source
from pyenvoy.drain import hard_drain_connection
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


_UNSUPPORTED_DYNAMIC = ("ads_config", "lds_resources_locator", "cds_resources_locator")


def _check_bootstrap(bootstrap: Bootstrap) -> None:
    if is_set(bootstrap, "dynamic_resources"):
        dr = bootstrap.dynamic_resources
        for name in _UNSUPPORTED_DYNAMIC:
            if is_set(dr, name):
                raise ConfigError(
                    f"{name} is not supported by pyenvoy yet; only filesystem subscriptions "
                    "(path_config_source) are",
                    f"dynamic_resources.{name}",
                )
        for name in ("lds_config", "cds_config"):
            if dr.HasField(name):
                path_source(getattr(dr, name), f"dynamic_resources.{name}")
    reject_unsupported(bootstrap, _UNSUPPORTED_BOOTSTRAP, "")
    sr = bootstrap.static_resources
    if len(sr.secrets):
        raise ConfigError("secrets are not supported by pyenvoy yet", "static_resources.secrets")


class Server:
    """A running (or buildable) pyenvoy instance for one Bootstrap."""

    def __init__(
        self,
        bootstrap: Bootstrap,
        options: ServerOptions | None = None,
        remote_xds_files: dict[str, Any] | None = None,
    ) -> None:
        """``remote_xds_files``: a worker process; xDS file contents come from the main
        process (pyenvoy.workers), starting with these, and no file is watched here."""
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
        self.bootstrap_loaded_at = time.time()
        # Filesystem xDS (LDS/CDS/RDS/EDS) and the shared RDS providers.
        self.xds = XdsManager(self, remote_files=remote_xds_files)
        self.route_config_providers = RouteConfigProviderManager(self)
        # One config change at a time (LDS, CDS, reload); created on the running loop.
        self.config_lock: asyncio.Lock | None = None
        self.reloader: Any = None
        self._signals: list[int] = []
        self.build()

    # --- config -----------------------------------------------------------------------
    def build(self) -> None:
        """Compile the bootstrap into runtime objects (raises ConfigError)."""
        bootstrap = self.bootstrap
        _check_bootstrap(bootstrap)
        sr = bootstrap.static_resources
        self.cluster_manager = ClusterManager(sr.clusters, self.stats, xds=self.xds)
        try:
            self.listener_manager = ListenerManager(
                sr.listeners, self.stats, self.cluster_manager, self
            )
            dr = bootstrap.dynamic_resources
            if dr.HasField("cds_config"):
                self.cluster_manager.subscribe_cds(dr.cds_config, self)
            if dr.HasField("lds_config"):
                self.listener_manager.subscribe_lds(dr.lds_config)
        except BaseException:
            self.cluster_manager.close()
            if self.listener_manager is not None:
                self.listener_manager.close()
            self.route_config_providers.close()
            raise
        self.server_stats.concurrency.set(max(1, getattr(self.options, "concurrency", 1) or 1))
        self.server_stats.hot_restart_epoch.set(getattr(self.options, "restart_epoch", 0) or 0)
        self.server_stats.state.set(STATE_PRE_INITIALIZING)

    def dynamic_route_configs(self) -> list[tuple[str, Any, float]]:
        """(version_info, RouteConfiguration, last_updated) of every RDS provider."""
        return self.route_config_providers.dynamic_route_configs()

    def route_configs(self) -> list[Any]:
        """Static route configurations (inline in HCMs of active listeners) for /config_dump."""
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
        self.config_lock = asyncio.Lock()
        assert self.cluster_manager is not None and self.listener_manager is not None
        t0 = time.monotonic()
        await self.cluster_manager.initialize()
        # CDS before listeners, as Envoy's init order ("cm init: initializing cds").
        await self.cluster_manager.start_cds()
        admin_cfg = self.bootstrap.admin
        try:
            if admin and admin_cfg.HasField("address"):
                from pyenvoy.admin.server import AdminServer

                sa = admin_cfg.address.socket_address
                self.admin = AdminServer(
                    self, (sa.address, sa.port_value), admin_cfg.access_log_path or None
                )
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
                await self.listener_manager.start_lds()
        except BaseException:
            await self._close()
            raise
        self.xds.start()
        self._install_reload_triggers()
        self.server_stats.initialization_time_ms.record((time.monotonic() - t0) * 1000)
        self.state = "LIVE"
        self.server_stats.state.set(STATE_LIVE)
        self.server_stats.live.set(1)
        log.info("all listeners started; pyenvoy %s is LIVE", self.version)

    # --- live config changes --------------------------------------------------------------
    def _install_reload_triggers(self) -> None:
        """SIGHUP (and ``--watch-config``) reload the ``-c``/``--config-yaml`` config. Only a
        server started from the command line has one, so an embedded server leaves the
        host application's signals alone."""
        opts = self.options
        if not (getattr(opts, "config_path", "") or getattr(opts, "config_yaml", "")):
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            self._signals.append(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        if (
            getattr(opts, "watch_config", False)
            and getattr(opts, "config_path", "")
            and self.xds.remote is None  # a worker: the main process watches and signals it
        ):
            # (looked up at each change: main.py may replace it once workers run)
            self.xds.watcher.watch(opts.config_path, None, lambda: self.on_config_file_changed())

    def on_config_file_changed(self) -> None:
        """``--watch-config``: the ``-c`` file changed (with workers, main.py extends this to
        reload every worker too, as SIGHUP does)."""
        self.request_reload()

    def request_reload(self) -> None:
        """Reload the config from its files soon (SIGHUP, a changed ``-c`` file)."""
        if self._shutting_down:
            return
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self, bootstrap: Bootstrap | None = None) -> bool:
        """Re-read (or take) a bootstrap and apply its static resources; False if rejected
        (the running config then stays as it was)."""
        from pyenvoy.reload import ConfigReloader

        if self.reloader is None:
            self.reloader = ConfigReloader(self)
        return bool(await self.reloader.reload(bootstrap))

    def drain_listeners(
        self, graceful: bool = False, inbound_only: bool = False, skip_exit: bool = False
    ) -> None:
        """Admin /drain_listeners."""
        lm = self.listener_manager
        if lm is not None:
            lm.drain_for_admin(graceful, inbound_only, skip_exit)

    def refresh_server_stats(self) -> None:
        """Bring the gauges read at scrape time up to date; ``stats_refreshers`` run last so
        they may override them (e.g. sums over worker processes)."""
        s = self.server_stats
        s.uptime.set(int(time.monotonic() - self._start_monotonic))
        lm = self.listener_manager
        if lm is not None:
            s.total_connections.set(
                sum(len(listener.connections) for listener in lm.all_listeners())
            )
        try:
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            s.memory_physical_size.set(rss_kb * 1024)
            with open(f"/proc/{os.getpid()}/statm") as f:
                pages = int(f.read().split()[1])
            s.memory_allocated.set(pages * os.sysconf("SC_PAGE_SIZE"))
            s.memory_heap_size.set(pages * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
        for refresh in self.stats_refreshers:
            refresh()

    def shutdown(self) -> None:
        """Graceful stop (admin /quitquitquit, SIGTERM): schedule it on the loop."""
        if self._shutting_down:
            return
        self._shutting_down = True
        asyncio.get_running_loop().create_task(self.stop())

    async def stop(self, drain_time: float | None = None) -> None:
        """Stop accepting, ask every connection to finish (``connection: close``; idle ones
        close now), give them up to ``drain_time`` (default ``--drain-time-s``), close."""
        self._shutting_down = True
        self.state = "DRAINING"
        self.server_stats.state.set(STATE_DRAINING)
        self.server_stats.live.set(0)
        self.xds.stop()
        lm = self.listener_manager
        if lm is not None:
            lm.stop_listening()
            listeners = lm.all_listeners()
            for listener in listeners:
                if listener.drain is not None:
                    listener.drain.cancel()
                for conn in list(listener.connections):
                    hard_drain_connection(conn)
            if drain_time is None:
                drain_time = float(getattr(self.options, "drain_time_s", 600) or 0)
            deadline = time.monotonic() + drain_time
            while time.monotonic() < deadline and any(
                listener.connections for listener in listeners
            ):
                await asyncio.sleep(0.05)
            lm.close_connections()
        await self._close()

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        self._signals.clear()
        self.xds.stop()
        if self.admin is not None:
            try:
                await self.admin.stop()
            except Exception:
                log.exception("admin stop failed")
        if self.cluster_manager is not None:
            self.cluster_manager.close()
        lm = self.listener_manager
        if lm is not None:
            lm.close()
        self.route_config_providers.close()
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
