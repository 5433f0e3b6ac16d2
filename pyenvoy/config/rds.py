"""RDS: route configurations delivered by a filesystem subscription, swapped into HCMs.

Strategy: every HttpConnectionManager with ``rds`` acquires a ``RouteConfigProvider`` from
the server's ``RouteConfigProviderManager``; HCMs with the same ``rds`` block share one
provider (and one subscription), as Envoy's RouteConfigProviderManager does. The provider
compiles each accepted RouteConfiguration once into a RouteTable and assigns it to every
subscribed HcmConfig (``set_route_table``): a plain attribute swap, so a stream that has
already picked its route keeps it and the next stream sees the new table.

The first read happens when the provider is created (the file must exist, as in Envoy),
so a listener is warm as soon as its providers have answered once: with a table, or
rejected (Envoy then serves an empty route table). Stats are Envoy's
``http.<stat_prefix>.rds.<route_config_name>.*``. Listeners record the providers their
HCMs acquired (``collect()``) and release them when they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.xds import TYPE_ROUTE, DecodedResource, SubscriptionStats

if TYPE_CHECKING:
    from pyenvoy.config.xds import FilesystemSubscription

log = logging.getLogger("pyenvoy.rds")

__all__ = ["RdsStats", "RouteConfigProvider", "RouteConfigProviderManager"]


class RdsStats(SubscriptionStats):
    COUNTERS: ClassVar[tuple[str, ...]] = SubscriptionStats.COUNTERS + (
        "config_reload",
        "update_empty",
    )
    GAUGES: ClassVar[tuple[str, ...]] = SubscriptionStats.GAUGES + ("config_reload_time_ms",)


class RouteConfigProvider:
    """One RDS subscription: the current RouteConfiguration and its compiled table."""

    def __init__(
        self, manager: RouteConfigProviderManager, rds: Any, stat_prefix: str, key: bytes, path: str
    ) -> None:
        self.manager = manager
        self.key = key
        self.route_config_name = rds.route_config_name
        self.subscribers: list[Any] = []
        self.refs = 0
        self.table: Any = None
        self.proto: Any = None
        self.version_info = ""
        self.last_updated: float | None = None
        self._hash: bytes | None = None
        self._ready: asyncio.Future[None] | None = None
        server = manager.server
        self.stats = RdsStats(
            server.stats.scope(f"http.{stat_prefix}.rds.{self.route_config_name}")
        )
        self.subscription: FilesystemSubscription = server.xds.subscribe(
            rds.config_source,
            TYPE_ROUTE,
            self.on_config_update,
            self.stats,
            f"{path}.config_source",
        )

    @property
    def initialized(self) -> bool:
        return self.subscription.initialized

    async def wait_initialized(self) -> None:
        """Until the first response was handled (Envoy's RDS init target)."""
        if self.initialized:
            return
        timeout = self.subscription.initial_fetch_timeout
        deadline = time.monotonic() + (timeout if timeout > 0 else 3600 * 24)
        while not self.initialized and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.initialized:
            self.stats.init_fetch_timeout.inc()

    def start(self) -> None:
        self.subscription.start()

    # --- updates -------------------------------------------------------------------------
    def on_config_update(self, resources: list[DecodedResource], version_info: str) -> None:
        if not resources:
            self.stats.update_empty.inc()
            return
        try:
            if len(resources) != 1:
                raise ConfigError(f"Unexpected RDS resource length: {len(resources)}")
            rc = resources[0].message
            if rc.name != self.route_config_name:  # type: ignore[attr-defined]
                raise ConfigError(
                    f"Unexpected RDS configuration (expecting {self.route_config_name}): {rc.name}"  # type: ignore[attr-defined]
                )
            digest = rc.SerializeToString(deterministic=True)
            if digest == self._hash:
                self.version_info = version_info
                return  # same config: nothing to rebuild (Envoy: no config_reload)
            from pyenvoy.router.config import RouteTable

            cm = getattr(self.manager.server, "cluster_manager", None)
            validate = None
            # RDS route configs do not validate clusters unless they ask for it.
            if cm is not None and rc.HasField("validate_clusters") and rc.validate_clusters.value:  # type: ignore[attr-defined]
                validate = cm.has_cluster
            table = RouteTable.from_proto(rc, "resources[0]", validate_clusters=validate)  # type: ignore[arg-type]
        except ConfigError as e:
            log.warning("rds: route config '%s' rejected: %s", self.route_config_name, e)
            raise
        self._hash = digest
        self.proto = rc
        self.table = table
        self.version_info = version_info
        self.last_updated = time.time()
        self.stats.config_reload.inc()
        self.stats.config_reload_time_ms.set(int(self.last_updated * 1000))
        for hcm in self.subscribers:
            hcm.set_route_table(table)

    # --- subscribers ---------------------------------------------------------------------
    def add(self, hcm: Any) -> None:
        self.subscribers.append(hcm)
        self.refs += 1
        if self.table is not None:
            hcm.set_route_table(self.table)

    def release(self, hcm: Any) -> None:
        try:
            self.subscribers.remove(hcm)
        except ValueError:
            return
        self.refs -= 1
        if self.refs <= 0:
            self.manager._drop(self)


class RouteConfigProviderManager:
    """The server's RDS providers, shared by identical ``rds`` blocks."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.providers: dict[bytes, RouteConfigProvider] = {}
        self._collecting: list[list[tuple[RouteConfigProvider, Any]]] = []

    def acquire(self, rds: Any, stat_prefix: str, hcm: Any, path: str) -> RouteConfigProvider:
        """The provider for ``rds`` (created and fetched once), with ``hcm`` subscribed."""
        key = rds.SerializeToString(deterministic=True)
        provider = self.providers.get(key)
        if provider is None:
            provider = RouteConfigProvider(self, rds, stat_prefix, key, path)
            self.providers[key] = provider
            try:
                provider.start()
            except BaseException:
                provider.subscription.stop()
                del self.providers[key]
                raise
        provider.add(hcm)
        if self._collecting:
            self._collecting[-1].append((provider, hcm))
        return provider

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[tuple[RouteConfigProvider, Any]]]:
        """Record the (provider, hcm) pairs acquired inside the block (one listener's)."""
        acquired: list[tuple[RouteConfigProvider, Any]] = []
        self._collecting.append(acquired)
        try:
            yield acquired
        finally:
            self._collecting.pop()

    def _drop(self, provider: RouteConfigProvider) -> None:
        if self.providers.get(provider.key) is provider:
            del self.providers[provider.key]
        provider.subscription.stop()

    def dynamic_route_configs(self) -> list[tuple[str, Any, float]]:
        """(version_info, RouteConfiguration, last_updated) of every provider with a config."""
        out = []
        for p in self.providers.values():
            if p.proto is not None:
                out.append((p.version_info, p.proto, p.last_updated or 0.0))
        out.sort(key=lambda x: x[1].name)
        return out

    def close(self) -> None:
        for p in list(self.providers.values()):
            p.subscription.stop()
        self.providers.clear()


def release_all(pairs: list[tuple[RouteConfigProvider, Any]]) -> None:
    for provider, hcm in pairs:
        provider.release(hcm)
    pairs.clear()
