"""Whole-config reload: re-read the bootstrap and apply its static resources, or nothing.

Strategy: ``ConfigReloader.reload()`` (SIGHUP, ``--watch-config``, or a call with a
Bootstrap) runs under the server's ``config_lock`` in two phases:

1. *Build* the new snapshot completely, touching nothing that serves: load and validate the
   bootstrap, compile the static clusters that are new or changed, compile the listeners
   that are new or changed against the cluster names the new config will have, and bind
   the sockets of listeners on new addresses (a listener that stays on its address will
   take over the old socket). Unchanged clusters and listeners (equal protos) are reused
   as they are. Clusters are then warmed (DNS resolved, first EDS answer) while the old
   config keeps serving.
2. *Swap*: commit the clusters (Host objects of hosts that stay keep their health), switch
   each changed listener's socket to its new filter chain (new connections use it; open
   connections finish on the old chain, which drains with ``connection: close``), start
   the new listeners, drain the removed ones, remove the clusters that are gone.

Any error in phase 1 undoes what phase 1 did (sockets closed, RDS subscriptions and new
clusters released), keeps the running config, logs the reason with its field path and
counts it (``listener_manager.lds.*`` / ``cluster_manager.cds.*`` ``update_rejected``; these
stats appear with the first reload, so a static config's /stats stays Envoy's). Parts of
the bootstrap outside ``static_resources`` cannot change at runtime: they are reported and
kept.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.xds import SubscriptionStats

if TYPE_CHECKING:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy.listener import Listener
    from pyenvoy.upstream.cluster_manager import Cluster

log = logging.getLogger("pyenvoy.config")

__all__ = ["ConfigReloader", "load_from_options"]

# Bootstrap fields a reload cannot change (a restart or hot restart can).
_FIXED_FIELDS = (
    "node",
    "admin",
    "dynamic_resources",
    "cluster_manager",
    "stats_config",
    "stats_sinks",
    "layered_runtime",
    "overload_manager",
    "tracing",
)


def load_from_options(options: Any) -> Bootstrap:
    """Read the bootstrap the way the command line did (``-c``, ``--config-yaml``)."""
    from pyenvoy.config.loader import load_bootstrap

    bootstrap = load_bootstrap(
        getattr(options, "config_path", "") or None,
        getattr(options, "config_yaml", "") or None,
        allow_unknown_fields=bool(getattr(options, "allow_unknown_static_fields", False)),
    )
    # --service-cluster/--service-node/--service-zone, as at startup.
    if getattr(options, "service_cluster", ""):
        bootstrap.node.cluster = options.service_cluster
    if getattr(options, "service_node", ""):
        bootstrap.node.id = options.service_node
    if getattr(options, "service_zone", ""):
        bootstrap.node.locality.zone = options.service_zone
    return bootstrap


class _Plan:
    """What phase 1 built; ``rollback()`` undoes it."""

    def __init__(self) -> None:
        self.clusters: list[Cluster] = []
        self.removed_clusters: list[str] = []
        self.listeners: list[tuple[Listener, Listener | None]] = []  # (new, replaced)
        self.removed_listeners: list[Listener] = []
        self.kept_listeners: list[Listener] = []

    def rollback(self, lm: Any) -> None:
        for listener, _ in self.listeners:
            lm.discard(listener)
        for cluster in self.clusters:
            cluster.close()
        self.listeners.clear()
        self.clusters.clear()


class ConfigReloader:
    """Applies new static resources to a running Server."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.attempts = 0
        self.successes = 0
        self.last_error: str | None = None
        self.last_reload: float | None = None
        self._stats: tuple[SubscriptionStats, SubscriptionStats] | None = None

    def _sub_stats(self) -> tuple[SubscriptionStats, SubscriptionStats]:
        if self._stats is None:
            store = self.server.stats
            self._stats = (
                SubscriptionStats(store.scope("listener_manager.lds")),
                SubscriptionStats(store.scope("cluster_manager.cds")),
            )
        return self._stats

    async def reload(self, bootstrap: Bootstrap | None = None) -> bool:
        server = self.server
        lock = server.config_lock
        if lock is None:
            raise RuntimeError("the server is not started")
        async with lock:
            return await self._reload(bootstrap)

    async def _reload(self, bootstrap: Bootstrap | None) -> bool:
        server = self.server
        lds, cds = self._sub_stats()
        lds.update_attempt.inc()
        cds.update_attempt.inc()
        self.attempts += 1
        source = getattr(server.options, "config_path", "") or "--config-yaml"
        t0 = time.monotonic()
        failed: tuple[SubscriptionStats, ...] = (lds, cds)
        plan = _Plan()
        lm = server.listener_manager
        cm = server.cluster_manager
        try:
            if bootstrap is None:
                bootstrap = load_from_options(server.options)
            from pyenvoy.server import _check_bootstrap

            _check_bootstrap(bootstrap)
            sr = bootstrap.static_resources
            if len(sr.secrets):
                raise ConfigError(
                    "secrets are not supported by pyenvoy yet", "static_resources.secrets"
                )
            self._report_fixed_changes(bootstrap)
            failed = (cds,)
            plan.clusters, plan.removed_clusters, names = cm.build_static_changes(sr.clusters)
            failed = (lds,)
            self._build_listeners(plan, sr.listeners, names)
            failed = (cds,)
            await cm.warm(plan.clusters)
        except ConfigError as e:
            plan.rollback(lm)
            self.last_error = str(e)
            for stats in failed:
                stats.update_rejected.inc()
            log.error("config reload rejected (%s): %s; keeping the running config", source, e)
            return False
        except BaseException:
            plan.rollback(lm)
            raise
        await self._commit(plan)
        self.successes += 1
        self.last_error = None
        self.last_reload = time.time()
        server.bootstrap = bootstrap
        server.bootstrap_loaded_at = self.last_reload
        for stats in (lds, cds):
            stats.update_success.inc()
            stats.update_time.set(int(self.last_reload * 1000))
        log.info(
            "config reloaded from %s in %.1f ms: %d cluster(s) added/changed, %d removed; "
            "%d listener(s) added/changed, %d removed",
            source,
            (time.monotonic() - t0) * 1000,
            len(plan.clusters),
            len(plan.removed_clusters),
            len(plan.listeners),
            len(plan.removed_listeners),
        )
        return True

    def _report_fixed_changes(self, bootstrap: Bootstrap) -> None:
        old = self.server.bootstrap
        for name in _FIXED_FIELDS:
            if getattr(old, name) != getattr(bootstrap, name):
                log.warning("config reload: '%s' changed; it only takes effect on a restart", name)

    def _build_listeners(self, plan: _Plan, protos: Any, cluster_names: set[str]) -> None:
        lm = self.server.listener_manager
        cm = self.server.cluster_manager
        old_static = {lst.name: lst for lst in lm.listeners if not lst.added_via_api}
        cm.staged_names = cluster_names
        try:
            new_set = lm.build_static(protos, keep=old_static)
            try:
                if plan.removed_clusters:
                    # Unchanged listeners are kept as they are, but their routes must still
                    # name clusters that exist: check them against the new cluster set.
                    for lst in new_set:
                        kept = old_static.get(lst.name)
                        if kept is not None and kept is lst:
                            lm.discard(lm.build(kept.proto, kept.path))
            except BaseException:
                for lst in new_set:
                    if old_static.get(lst.name) is not lst:
                        lm.discard(lst)
                raise
        finally:
            cm.staged_names = None
        new_names = {lst.name for lst in new_set}
        plan.removed_listeners = [lst for name, lst in old_static.items() if name not in new_names]
        for listener in new_set:
            old = old_static.get(listener.name)
            if listener is not old:
                # A static listener wins over one of the same name added via LDS.
                plan.listeners.append((listener, old or lm.get(listener.name)))
        donors = tuple(plan.removed_listeners)
        for listener, replacing in plan.listeners:
            lm.prepare(listener, replacing=replacing, donors=donors)

    async def _commit(self, plan: _Plan) -> None:
        lm = self.server.listener_manager
        cm = self.server.cluster_manager
        for cluster in plan.clusters:
            cm.commit(cluster)
        for listener, replacing in plan.listeners:
            if replacing is not None:
                lm.stats.listener_modified.inc()
                if listener.same_except_chains(replacing):
                    lm.stats.listener_in_place_updated.inc()
            else:
                lm.stats.listener_added.inc()
            try:
                await lm.activate(listener, replacing)
            except (ConfigError, OSError) as e:  # the socket was bound: should not happen
                log.error("config reload: listener '%s' failed to start: %s", listener.name, e)
                lm.discard(listener)
        for listener in plan.removed_listeners:
            if listener in lm.listeners:
                lm.remove(listener)
        for name in plan.removed_clusters:
            cm.remove(name)
