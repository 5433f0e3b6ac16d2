"""``envoy.filters.network.http_connection_manager``: config in config.py, the per-connection
implementation in pyenvoy/http/conn_manager.py."""

from pyenvoy.extensions.filters.network.http_connection_manager import config as config

__all__ = ["config"]
