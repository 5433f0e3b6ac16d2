"""Listener accept loop: a burst of new connections is taken in one go on a busy loop."""

from __future__ import annotations

import asyncio
import socket
import time

import uvloop

import pyenvoy

CONFIG = """
static_resources:
  listeners:
  - name: front
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "ok" } }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"""

BURST = 100


def test_a_burst_of_connections_is_accepted_within_a_few_loop_iterations() -> None:
    # Envoy accepts every pending connection per socket event. uvloop's own servers take one
    # per loop iteration, which on a busy loop left a 256-connection burst waiting ~1.6 s.
    # The proxy runs on uvloop here, as `pyenvoy` does.
    uvloop.run(_burst())


async def _burst() -> None:
    async with pyenvoy.Proxy(CONFIG) as proxy:
        port = proxy.port("front")
        assert proxy.server is not None
        (listener,) = proxy.server.listener_manager.listeners
        loop = asyncio.get_running_loop()
        iterations = 0
        done = loop.create_future()

        def busy() -> None:
            # Each loop iteration costs 2 ms, as it does when the proxy is loaded.
            nonlocal iterations
            iterations += 1
            t = time.monotonic()
            while time.monotonic() - t < 0.002:
                pass
            if len(listener.connections) >= BURST:
                done.set_result(iterations)
            elif iterations < 2000:
                loop.call_soon(busy)
            else:
                done.set_result(iterations)

        # The kernel completes the handshakes while the loop is blocked here: all BURST
        # connections sit in the accept queue, each with a request already sent.
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]
        try:
            for s in socks:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            loop.call_soon(busy)
            needed = await asyncio.wait_for(done, 30)
            assert needed <= 10, f"{BURST} queued connections took {needed} loop iterations"
            for s in socks:
                s.settimeout(10)
                assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
        finally:
            for s in socks:
                s.close()
