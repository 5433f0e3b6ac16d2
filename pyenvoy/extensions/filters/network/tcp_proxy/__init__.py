"""``envoy.filters.network.tcp_proxy``: L4 proxying of a downstream connection to a cluster.

Strategy: ``config.py`` validates the TcpProxy proto once into a shared TcpProxyConfig;
``tcp_proxy.py`` holds the per-connection filter and its upstream protocol. The factory
registered here returns ``functools.partial(TcpProxyFilter, config)``, so creating a
filter per connection is one call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pyenvoy.extensions.filters.network.tcp_proxy.config import TcpProxyConfig, TcpProxyStats
from pyenvoy.extensions.filters.network.tcp_proxy.tcp_proxy import (
    TcpProxyFilter,
    UpstreamConnection,
)
from pyenvoy.extensions.registry import NETWORK_FILTER, FactoryContext, register

NAME = "envoy.filters.network.tcp_proxy"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

__all__ = [
    "NAME",
    "TYPE_URL",
    "TcpProxyConfig",
    "TcpProxyFilter",
    "TcpProxyStats",
    "UpstreamConnection",
    "tcp_proxy_factory",
]


def tcp_proxy_factory(proto: Any, ctx: FactoryContext) -> Callable[[], TcpProxyFilter]:
    """Validate ``proto`` (a TcpProxy message) once; return the per-connection filter maker."""
    config = TcpProxyConfig(proto, ctx)
    return functools.partial(TcpProxyFilter, config)


register(
    NETWORK_FILTER, NAME, TYPE_URL, tcp_proxy_factory, terminal=True, aliases=("envoy.tcp_proxy",)
)
