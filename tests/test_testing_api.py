"""pyenvoy.testing, the public in-memory harness: its docstring's example works as shown."""

from __future__ import annotations

import pytest

from pyenvoy.testing import InMemoryProxy, proxy_config


async def test_docstring_example_prefix_rewrite() -> None:
    proxy = InMemoryProxy(
        proxy_config(
            routes="""- match: {prefix: "/"}
  route: {cluster: backend, prefix_rewrite: "/v2/"}"""
        )
    )
    down, up = proxy.exchange(
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    )
    assert up.startswith(b"GET /v2/a HTTP/1.1\r\n")
    assert down.startswith(b"HTTP/1.1 200 OK\r\n")
    assert proxy.counter("cluster.backend.upstream_rq_200") == 1


def test_a_config_without_listeners_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs a config with a listener"):
        InMemoryProxy("static_resources: {}\n")
