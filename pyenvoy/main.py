"""Process lifecycle: signals, the event loop, worker processes and hot restart.

Strategy: ``run_process`` owns everything that is about the OS process rather than one
config snapshot, so ``pyenvoy.server`` stays about a single server instance and embedding
(pyenvoy.embed) never touches process-wide state. It installs uvloop and runs a
``_ProcessRunner``, which:

1. compiles the config (``Server(bootstrap)``: a broken config exits 1 before anything else,
   and never disturbs a running parent);
2. with ``--restart-epoch N`` > 0 connects to the parent (pyenvoy.hot_restart) and collects its
   listening sockets by configured address and worker index;
3. ``--concurrency 1``: serves listeners and admin on this one loop. ``--concurrency N`` > 1:
   binds (or adopts) the listening sockets here, serves only admin here
   (``Server.start(listen=False)``) and runs N worker processes (pyenvoy.workers) whose stats
   it sums on every admin read;
4. once LIVE, answers the next epoch's hot restart requests (``HotRestartParent``), and, as a
   child, tells the parent to drain, imports its stats during the overlap and terminates it
   after ``--parent-shutdown-time-s``;
5. turns SIGTERM/SIGINT into a graceful stop of everything and returns the exit code.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from pyenvoy.hot_restart import (
    STATS_IMPORT_INTERVAL_S,
    HotRestartChild,
    HotRestartError,
    HotRestartParent,
    drain_listeners,
    export_stats,
)
from pyenvoy.options import HOT_RESTART_VERSION
from pyenvoy.server import STATE_INITIALIZING, Server
from pyenvoy.workers import WorkerPool, bind_listen_sockets

if TYPE_CHECKING:
    import socket

    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy.options import ServerOptions

__all__ = ["run_process"]

log = logging.getLogger("pyenvoy.main")


class _ProcessRunner:
    """One pyenvoy process: its Server, its workers, both sides of hot restart."""

    def __init__(self, options: ServerOptions, bootstrap: Bootstrap) -> None:
        self.options = options
        self.bootstrap = bootstrap
        self.server: Server | None = None
        self.pool: WorkerPool | None = None
        self.parent: HotRestartParent | None = None  # we answer the next epoch
        self.child: HotRestartChild | None = None  # our link to the previous epoch
        self.exit_code = 0
        self.generation = 1
        self._stopping = False
        self._stop_drain: float | None = None
        self._exported: dict[str, int] = {}
        self._takeover: asyncio.Task[None] | None = None

    # -- running -------------------------------------------------------------------------------
    async def run(self) -> int:
        opts = self.options
        loop = asyncio.get_running_loop()
        server = self.server = Server(self.bootstrap, opts)
        if opts.mode == "init_only":
            await server.start()
            await server.stop(0)
            return 0
        hot = not opts.disable_hot_restart
        if hot:
            server.hot_restart_version = HOT_RESTART_VERSION  # type: ignore[attr-defined]
        server.original_start_time = server.start_time  # type: ignore[attr-defined]
        if opts.restart_epoch > 0:
            if not hot:
                raise HotRestartError(
                    f"--restart-epoch {opts.restart_epoch} needs hot restart, which "
                    "--disable-hot-restart turns off"
                )
            child = HotRestartChild(opts)
            if child.connect():
                self.child = child
                self.generation = child.stats.generation + 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop, None)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await self._start(max(1, int(opts.concurrency or 1)))
        except BaseException:
            if self.child is not None:
                self.child.close()
            raise
        server.server_stats.hot_restart_generation.set(self.generation)
        if hot:
            self.parent = HotRestartParent(opts, self, loop)
            self.parent.start()
        if self.child is not None:
            self._takeover = loop.create_task(self._take_over(self.child))
        # The config objects live as long as the process: keep the collector off them.
        gc.collect()
        gc.freeze()
        await server.wait_closed()
        if self.pool is not None:
            await self.pool.stop(self._stop_drain)
        if self._takeover is not None and not self._takeover.done():
            self._takeover.cancel()
        if self.parent is not None:
            self.parent.close()
        if self.child is not None:
            self.child.close()
        return self.exit_code

    async def _start(self, workers: int) -> None:
        server = self.server
        assert server is not None and server.listener_manager is not None
        inherited = self._inherit(workers)
        if workers == 1:
            single: dict[tuple[str, int], Any] = {}
            for (host, port, index), sock in inherited.items():
                if index == 0:
                    single[(host, port)] = sock
                else:
                    sock.close()
            self._take_parent_admin()
            await server.start(inherited_sockets=single or None)
            self._close_unclaimed(single)
            return
        sockets = bind_listen_sockets(server.listener_manager.listeners, workers, inherited)
        self._take_parent_admin()
        try:
            await server.start(listen=False)
        except BaseException:
            for socks in sockets.values():
                for s in socks:
                    s.close()
            raise
        # Not LIVE (admin /ready) until the workers serve: no await since start() said LIVE.
        live_state = (server.state, server.server_stats.state.value)
        server.state = "INITIALIZING"
        server.server_stats.state.set(STATE_INITIALIZING)
        server.server_stats.live.set(0)
        pool = self.pool = WorkerPool(server, self.bootstrap, self.options, sockets, self._fatal)
        server.stats_refreshers.append(pool.refresh_stats)
        refresh = server.refresh_server_stats

        def refresh_with_workers() -> None:
            refresh()
            pool.apply_server_totals()

        server.refresh_server_stats = refresh_with_workers  # type: ignore[method-assign]
        admin_drain = getattr(server, "drain_listeners", None)
        if callable(admin_drain):
            # Admin /drain_listeners: the listeners are the workers'.
            def drain_with_workers(**kwargs: Any) -> None:
                admin_drain(**kwargs)
                pool.forward("drain_listeners", args=kwargs)

            server.drain_listeners = drain_with_workers  # type: ignore[method-assign,assignment]
        try:
            await pool.start()
        except BaseException:
            await server.stop(0)
            raise
        server.state = live_state[0]
        server.server_stats.state.set(live_state[1])
        server.server_stats.live.set(1)
        opts = self.options
        if hasattr(server, "request_reload") and (opts.config_path or opts.config_yaml):
            # SIGHUP reloads the config: here (admin's view) and in every worker.
            def on_sighup() -> None:
                server.request_reload()
                pool.signal_workers(signal.SIGHUP)

            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
            # --watch-config: only this process watches the -c file; a change reloads here
            # and in every worker, as SIGHUP does.
            server.on_config_file_changed = on_sighup  # type: ignore[method-assign]

    def _inherit(self, workers: int) -> dict[tuple[str, int, int], socket.socket]:
        """The parent's listening sockets, by (host, configured port, worker index): all of
        them, so listeners that arrive with the first LDS response find theirs too."""
        child = self.child
        out: dict[tuple[str, int, int], socket.socket] = {}
        if child is None:
            return out
        for host, port, count in child.parent_listeners():
            if port == 0:  # an ephemeral port is a new socket, as in Envoy
                continue
            for index in range(min(count, workers)):
                sock = child.listen_socket(host, port, index)
                if sock is None:
                    break
                out[(host, port, index)] = sock
        log.info("hot restart: adopted %d listening socket(s) from the parent", len(out))
        return out

    def _close_unclaimed(self, inherited: dict[tuple[str, int], socket.socket]) -> None:
        """Sockets of parent listeners this config does not have: close them, or clients of
        a removed listener would wait in a queue nobody accepts from."""
        lm = self.server.listener_manager if self.server is not None else None
        if lm is None or not inherited:
            return
        listeners = lm.all_listeners() if hasattr(lm, "all_listeners") else lm.listeners
        claimed = {id(listener.socket) for listener in listeners}
        pending = getattr(lm, "_inherited", None)
        for key, sock in inherited.items():
            if id(sock) in claimed:
                continue
            if isinstance(pending, dict) and pending.get(key) is sock:
                del pending[key]
            log.info("hot restart: closing the parent's socket for %s:%d (not configured)", *key)
            sock.close()

    def _take_parent_admin(self) -> None:
        if self.child is None or self.server is None:
            return
        first = self.child.shutdown_parent_admin()
        if first:
            self.server.original_start_time = first  # type: ignore[attr-defined]

    # -- stopping ----------------------------------------------------------------------------
    def stop(self, drain_time: float | None = None) -> None:
        """Graceful stop (SIGTERM, SIGINT, parent terminate): drain, then exit."""
        if self._stopping or self.server is None:
            return
        self._stopping = True
        self._stop_drain = drain_time
        if self.pool is not None:
            self.pool.stopping = True
        if getattr(self.server, "_shutting_down", False):
            return  # admin /quitquitquit got there first
        asyncio.get_running_loop().create_task(self.server.stop(drain_time))

    def _fatal(self) -> None:
        self.exit_code = 1
        self.stop(0)

    # -- child side: take over from the parent ----------------------------------------------
    async def _take_over(self, child: HotRestartChild) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            await loop.run_in_executor(None, child.drain_parent_listeners)
            deadline = loop.time() + opts.parent_shutdown_time_s
            while not opts.skip_hot_restart_parent_stats:
                await self._import_parent_stats(child)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(STATS_IMPORT_INTERVAL_S, remaining))
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            log.info("hot restart: parent shutdown time reached; terminating the parent")
            await loop.run_in_executor(None, child.terminate_parent)
        except HotRestartError as e:
            log.warning("%s", e)
        finally:
            child.close()
            store = self.server.stats if self.server is not None and self.pool is None else None
            child.stats.forget_gauges(store)
            if self.server is not None:
                self.server.server_stats.parent_connections.set(0)

    async def _import_parent_stats(self, child: HotRestartChild) -> None:
        loop = asyncio.get_running_loop()
        stats, deltas = await loop.run_in_executor(None, child.fetch_stats)
        server = self.server
        assert server is not None
        if self.pool is not None:
            self.pool.parent_stats = stats
        else:
            stats.apply_to_store(server.stats, deltas)
        server.server_stats.parent_connections.set(stats.connections)

    # -- parent side: pyenvoy.hot_restart.ParentHost --------------------------------------------
    def hello(self) -> dict[str, Any]:
        assert self.server is not None
        return {"generation": self.generation}

    def _listeners(self) -> list[Any]:
        lm = self.server.listener_manager if self.server is not None else None
        if lm is None:
            return []
        return list(lm.all_listeners() if hasattr(lm, "all_listeners") else lm.listeners)

    def listen_addresses(self) -> list[tuple[str, int, int]]:
        if self.pool is not None:
            return [(h, p, len(socks)) for (h, p), socks in self.pool.sockets.items() if p]
        return [
            (listener.host, listener.port, 1)
            for listener in self._listeners()
            if listener.port and listener.socket is not None
        ]

    def listen_fd(self, host: str, port: int, worker_index: int) -> int | None:
        if port == 0:
            return None
        sock: Any = None
        if self.pool is not None:
            socks = self.pool.sockets.get((host, port))
            if socks and worker_index < len(socks):
                sock = socks[worker_index]
        elif worker_index == 0:
            for listener in self._listeners():
                if (listener.host, listener.port) == (host, port) and listener.socket is not None:
                    sock = listener.socket
                    break
        if sock is None or sock.fileno() < 0:
            return None
        return int(sock.fileno())

    async def shutdown_admin(self) -> float:
        server = self.server
        assert server is not None
        admin, server.admin = server.admin, None
        if admin is not None:
            await admin.stop()
            log.info("hot restart: admin endpoint closed for the child")
        return float(getattr(server, "original_start_time", server.start_time))

    async def drain_listeners(self) -> None:
        server = self.server
        assert server is not None
        opts = self.options
        drain_time = float(opts.drain_time_s)
        if self.pool is not None:
            self.pool.drain(drain_time, opts.drain_strategy)
            # Our copies too: a socket the child did not adopt must stop getting connections.
            self.pool.close_sockets()
            server.state = "DRAINING"
            server.server_stats.state.set(1)
            server.server_stats.live.set(0)
        else:
            drain_listeners(server, drain_time, opts.drain_strategy)
        # Should the child never terminate us (it died), leave on our own.
        asyncio.get_running_loop().call_later(
            float(opts.parent_shutdown_time_s) + 10.0, self.terminate
        )

    def export_stats(self) -> dict[str, Any]:
        server = self.server
        assert server is not None
        server.refresh_server_stats()
        out = export_stats(server.stats, self._exported)
        out["connections"] = server.server_stats.total_connections.value
        return out

    def terminate(self) -> None:
        self.stop(0)


def run_process(options: ServerOptions, bootstrap: Bootstrap) -> int:
    """Run a server until it is told to stop; returns the process exit code."""
    import uvloop

    try:
        return uvloop.run(_ProcessRunner(options, bootstrap).run())
    except KeyboardInterrupt:
        return 0
    except HotRestartError as e:
        log.critical("%s", e)
        for handler in logging.getLogger("pyenvoy").handlers:
            handler.flush()
        sys.stderr.write(f"{e}\n")
        sys.stderr.flush()
        return 1
