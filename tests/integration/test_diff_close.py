"""Differential tests: who closed a downstream connection, and with a request still active.

Envoy raises RemoteClose for a FIN on a connection without half-close (the HTTP connection
manager's), whoever then closes the socket; a request still in flight is counted in
``downstream_cx_destroy_active_rq`` / ``_remote_active_rq`` and reset
(``downstream_rq_rx_reset``); the HTTP/1 upstream connection it used is closed with the
request on it (``upstream_cx_destroy_local_with_active_rq``) and no ``upstream_rq_tx_reset``.
Each case runs on its own connection and compares the counter deltas with real Envoy 1.40's.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.support.procs import ProxyProcess, exchange

CONFIG = "close.yaml"

KEYS = (
    "http.ingress_http.downstream_cx_destroy",
    "http.ingress_http.downstream_cx_destroy_remote",
    "http.ingress_http.downstream_cx_destroy_local",
    "http.ingress_http.downstream_cx_destroy_active_rq",
    "http.ingress_http.downstream_cx_destroy_remote_active_rq",
    "http.ingress_http.downstream_cx_destroy_local_active_rq",
    "http.ingress_http.downstream_rq_rx_reset",
    "http.ingress_http.downstream_rq_completed",
    "cluster.backend.upstream_rq_tx_reset",
    "cluster.backend.upstream_cx_destroy_local_with_active_rq",
)


def _deltas(proxy: ProxyProcess, act: Any) -> dict[str, int]:
    before = proxy.stats()
    act()
    want = int(before.get("http.ingress_http.downstream_cx_destroy") or 0) + 1
    deadline = time.monotonic() + 5
    after = proxy.stats()
    while (
        time.monotonic() < deadline and after.get("http.ingress_http.downstream_cx_destroy") != want
    ):
        time.sleep(0.05)
        after = proxy.stats()
    time.sleep(0.2)  # upstream-side counters settle a moment later
    after = proxy.stats()
    out = {k: int(after.get(k) or 0) - int(before.get(k) or 0) for k in KEYS}
    return {k: v for k, v in out.items() if v}


def _send_then(proxy: ProxyProcess, data: bytes, how: str) -> None:
    with socket.create_connection(("127.0.0.1", proxy.listener_port), timeout=3) as s:
        s.sendall(data)
        time.sleep(0.3)  # the proxy has read it (and, for /delay, sent it upstream)
        if how == "shutdown":
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass


def test_client_closes_idle_keep_alive_connection(proxy: ProxyProcess) -> None:
    def act() -> None:
        ex = exchange(proxy.listener_port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        assert ex.response.status == 200, ex

    assert _deltas(proxy, act) == {
        "http.ingress_http.downstream_cx_destroy": 1,
        "http.ingress_http.downstream_cx_destroy_remote": 1,
        "http.ingress_http.downstream_rq_completed": 1,
    }


# A request still in flight when the client leaves: its body unfinished, or complete and
# waiting on a slow upstream; the client half-closes (FIN) or closes.
IN_FLIGHT = {
    "mid_body": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
    "slow_upstream": b"GET /delay/1500 HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("how", ["shutdown", "close"])
@pytest.mark.parametrize("case", sorted(IN_FLIGHT))
def test_client_goes_away_with_a_request_in_flight(
    proxy: ProxyProcess, case: str, how: str
) -> None:
    assert _deltas(proxy, lambda: _send_then(proxy, IN_FLIGHT[case], how)) == {
        "http.ingress_http.downstream_cx_destroy": 1,
        "http.ingress_http.downstream_cx_destroy_remote": 1,
        "http.ingress_http.downstream_cx_destroy_active_rq": 1,
        "http.ingress_http.downstream_cx_destroy_remote_active_rq": 1,
        "http.ingress_http.downstream_rq_rx_reset": 1,
        "cluster.backend.upstream_cx_destroy_local_with_active_rq": 1,
    }
