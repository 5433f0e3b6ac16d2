"""Back-pressure: a body far larger than the buffer limits streams through pyenvoy while one
side is slow, and the proxy's memory stays bounded (the body never sits in memory)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = 128 * 1024 * 1024  # 128 MiB, 128x the default per-connection buffer limit
CHUNK = 64 * 1024
RSS_GROWTH_LIMIT = 48 * 1024 * 1024

CONFIG = """
static_resources:
  listeners:
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bp
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: up, timeout: 60s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: up
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up} }} }} }} }}] }}]
"""


class StreamingUpstream:
    """GET: a Content-Length body of BODY bytes written as fast as the socket takes it.
    POST: reads the request body slowly (paced), then answers with the byte count."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        with c:
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.recv(65536)
                if not d:
                    return
                head += d
            head, _, rest = head.partition(b"\r\n\r\n")
            if head.startswith(b"GET"):
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BODY)
                block = b"x" * CHUNK
                for _ in range(BODY // CHUNK):
                    c.sendall(block)
                return
            n = len(rest)
            while n < BODY:
                d = c.recv(CHUNK)
                if not d:
                    return
                n += len(d)
                time.sleep(0.0002)  # a slow reader
            self.received = n
            body = str(n).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def proxy(tmp_path: Path):
    up = StreamingUpstream()
    port = free_port()
    cfg = tmp_path / "bp.yaml"
    cfg.write_text(CONFIG.format(port=port, up=up.port))
    p = subprocess.Popen(
        [sys.executable, "-m", "pyenvoy", "-c", str(cfg), "-l", "error"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield p, port, up
    finally:
        p.kill()
        p.wait()
        up.close()


class RssWatcher(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.base = rss(pid)
        self.peak = self.base
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.02)


def test_download_to_slow_client_keeps_memory_bounded(proxy) -> None:
    p, port, _ = proxy
    watcher = RssWatcher(p.pid)
    watcher.start()
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = len(rest)
        while got < BODY:
            d = s.recv(CHUNK)
            assert d, f"connection closed after {got} bytes"
            got += len(d)
            time.sleep(0.0002)  # a slow client
    watcher.stop = True
    watcher.join()
    assert got == BODY
    assert watcher.peak - watcher.base < RSS_GROWTH_LIMIT, (watcher.base, watcher.peak)


def test_upload_to_slow_upstream_keeps_memory_bounded(proxy) -> None:
    p, port, up = proxy
    watcher = RssWatcher(p.pid)
    watcher.start()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % BODY)
        block = b"y" * CHUNK
        for _ in range(BODY // CHUNK):
            s.sendall(block)
        resp = b""
        while b"\r\n\r\n" not in resp or not resp.endswith(str(BODY).encode()):
            d = s.recv(65536)
            assert d, resp
            resp += d
    watcher.stop = True
    watcher.join()
    assert resp.startswith(b"HTTP/1.1 200") and up.received == BODY
    assert watcher.peak - watcher.base < RSS_GROWTH_LIMIT, (watcher.base, watcher.peak)
