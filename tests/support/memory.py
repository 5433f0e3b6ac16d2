"""The in-memory proxy harness, which lives in ``pyenvoy.testing`` (public: users' test
suites and benchmarks/hot_path.py use it too)."""

from pyenvoy.testing import DEFAULT_ROUTES, InMemoryProxy, MemoryTransport, proxy_config

__all__ = ["DEFAULT_ROUTES", "InMemoryProxy", "MemoryTransport", "proxy_config"]
