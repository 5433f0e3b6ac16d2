"""Bootstrap text the worker, outlier and hot-restart tests share."""

from __future__ import annotations

__all__ = ["http_listener"]

_HTTP_LISTENER = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
%s
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
"""


def http_listener(*routes: str) -> str:
    """The start of a ``str.format`` bootstrap template: admin on ``{admin_port}``, listener
    ``http`` on ``{listener_port}`` with an HTTP connection manager (stat_prefix ``ingress``)
    whose one virtual host has ``routes`` (each one route in YAML flow style, braces doubled
    for str.format) and the router, ending with ``  clusters:`` for the caller's clusters."""
    return _HTTP_LISTENER % "\n".join("              - " + r for r in routes)
