"""Routing: compiled route tables (``RouteTable.from_proto``) and their routes.

Strategy: ``pyenvoy.router.config`` compiles an Envoy v3 RouteConfiguration once into an
immutable ``RouteTable``; the connection manager snapshots the table per stream and the router
filter asks it ``route(headers)`` and then uses the returned ``Route``'s precomputed actions.
"""

from pyenvoy.router.config import (
    DEFAULT_ROUTE_TIMEOUT,
    HeaderMutations,
    RedirectAction,
    Route,
    RouteTable,
    VirtualHost,
    WeightedCluster,
    compile_regex,
)

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "HeaderMutations",
    "RedirectAction",
    "Route",
    "RouteTable",
    "VirtualHost",
    "WeightedCluster",
    "compile_regex",
]
