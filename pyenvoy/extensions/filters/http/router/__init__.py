"""``envoy.filters.http.router``: the terminal HTTP filter that forwards to a cluster."""

from pyenvoy.extensions.filters.http.router import router as router

__all__ = ["router"]
