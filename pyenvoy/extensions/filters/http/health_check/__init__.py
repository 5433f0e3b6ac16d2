"""``envoy.filters.http.health_check``: answer (or stamp) health check requests.

Strategy: ``config.py`` validates the HealthCheck proto once (matchers, cache, cluster
thresholds, stats); ``health_check.py`` is the per-stream filter. The factory registered
here returns ``functools.partial(HealthCheckFilter, config)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pyenvoy.extensions.filters.http.health_check.config import HealthCheckConfig, HealthCheckStats
from pyenvoy.extensions.filters.http.health_check.health_check import (
    HEALTHCHECKED_CLUSTER,
    IMMEDIATE_HEALTH_CHECK_FAIL,
    HealthCheckFilter,
    local_cluster_name,
)
from pyenvoy.extensions.registry import HTTP_FILTER, FactoryContext, register

NAME = "envoy.filters.http.health_check"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"

__all__ = [
    "HEALTHCHECKED_CLUSTER",
    "IMMEDIATE_HEALTH_CHECK_FAIL",
    "NAME",
    "TYPE_URL",
    "HealthCheckConfig",
    "HealthCheckFilter",
    "HealthCheckStats",
    "health_check_factory",
    "local_cluster_name",
]


def health_check_factory(proto: Any, ctx: FactoryContext) -> Callable[[], HealthCheckFilter]:
    """Validate ``proto`` (a HealthCheck message) once; return the per-stream filter maker."""
    config = HealthCheckConfig(proto, ctx)
    return functools.partial(HealthCheckFilter, config)


register(HTTP_FILTER, NAME, TYPE_URL, health_check_factory, aliases=("envoy.health_check",))
