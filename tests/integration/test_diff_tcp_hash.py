"""Differential tests: tcp_proxy ``hash_policy: [{source_ip: {}}]`` over RING_HASH and MAGLEV
clusters, and a cluster-level hash policy on connection properties (configs/tcp_hash.yaml).

Four upstreams each answer a connection with their index. Clients connect from many
loopback source addresses (127.0.0.2 ...): the host a source IP lands on must be the one
real Envoy 1.40 picks (Envoy hashes the IP text without the port with xxHash64), stable for
a given IP, and spread over the hosts. Without a hash policy the pick is random. Envoy runs
first (the module's proxies run one kind after the other); the pyenvoy run compares its
picks with Envoy's.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import load_config
from tests.support.procs import ProxyProcess, start_proxy

SOURCES = [f"127.0.0.{i}" for i in range(2, 42)]
PICKS: dict[tuple[str, str], list[str]] = {}  # (kind, listener) -> host index per source


class IdUpstream:
    """Accepts connections and answers each with its id, then closes."""

    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(self.ident)
            except OSError:
                pass
            finally:
                c.close()

    def stop(self) -> None:
        self.sock.close()
        self.thread.join(2)


@pytest.fixture(scope="module")
def id_upstreams() -> Iterator[list[IdUpstream]]:
    ups = [IdUpstream(str(i).encode()) for i in range(4)]
    try:
        yield ups
    finally:
        for u in ups:
            u.stop()


@pytest.fixture(scope="module")
def proxy(proxy_kind: str, id_upstreams: list[IdUpstream]) -> Iterator[ProxyProcess]:
    ports = {f"u{i}_port": u.port for i, u in enumerate(id_upstreams)}
    p = start_proxy(proxy_kind, load_config("tcp_hash.yaml"), **ports)
    try:
        yield p
    finally:
        p.stop()


def pick(port: int, source: str) -> str:
    """Which upstream a connection from ``source`` reaches."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        data = s.recv(10)
    return data.decode() or "-"


@pytest.mark.parametrize(
    "listener",
    [
        "listener_port",
        "maglev_listener_port",
        # no tcp_proxy policy: the cluster's consistent_hashing_lb_config.hash_policy
        # (connection_properties.source_ip) hashes the connection
        "cluster_listener_port",
    ],
)
def test_source_ip_picks_the_same_host_as_envoy(proxy: ProxyProcess, listener: str) -> None:
    port = getattr(proxy, listener)
    picks = [pick(port, src) for src in SOURCES]
    assert "-" not in picks
    assert len(set(picks)) >= 3  # spread over the hosts
    assert [pick(port, src) for src in SOURCES[:10]] == picks[:10]  # stable per source IP
    PICKS[(proxy.kind, listener)] = picks
    if proxy.kind != "envoy" and ("envoy", listener) in PICKS:
        assert picks == PICKS[("envoy", listener)]


def test_no_hash_policy_picks_at_random(proxy: ProxyProcess) -> None:
    picks = {pick(proxy.nohash_listener_port, SOURCES[0]) for _ in range(16)}
    assert len(picks) > 1
