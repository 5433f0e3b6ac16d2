"""Outlier detection (placeholder until the traffic-management work lands): configuring it
is a clear error rather than a silent no-op."""

from __future__ import annotations

from typing import Any

from pyenvoy.config.errors import ConfigError


def make_outlier_detector(cluster: Any, proto: Any, path: str) -> Any:
    raise ConfigError("outlier_detection is not supported by pyenvoy yet", path)
