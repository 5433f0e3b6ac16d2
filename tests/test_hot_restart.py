"""Hot restart: ``--restart-epoch 1`` takes over a running pyenvoy with no failed request.

Strategy: real processes (``python -m pyenvoy``) on free loopback ports with a unique
``--base-id`` per test, the threaded test upstream behind them, and client threads that keep
sending while the restart happens: some on keep-alive connections (``http.client`` reconnects
by itself after a ``connection: close``), some with a new connection per request. Every
error a client sees is recorded; the tests assert there are none, that the old process exits
by itself after ``--parent-shutdown-time-s`` and that the new one serves and carries the
counters on. Every process is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyenvoy.config.loader import load_bootstrap
from pyenvoy.hot_restart import drain_listeners
from pyenvoy.options import ServerOptions
from pyenvoy.server import Server
from tests.support.configs import http_listener
from tests.support.procs import free_port, read_stats
from tests.support.upstream import HttpUpstream

ROOT = Path(__file__).resolve().parent.parent
_base_ids = itertools.count((os.getpid() % 4000) * 10 + 20000)

CONFIG = (
    http_listener('{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}')
    + """\
  - name: backend
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}
"""
)


class PyEnvoy:
    """One ``python -m pyenvoy`` process; output goes to a file."""

    def __init__(self, config: Path, *args: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="pyenvoy-hr-", suffix=".log", delete=False)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyenvoy", "-c", str(config), "-l", "warning", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.proc.pid} still running:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL the whole session (worker processes included) and reap."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        os.unlink(self.log.name)


def wait_stat(admin_port: int, name: str, value: int, proc: PyEnvoy, timeout: float = 15.0) -> None:
    """Poll admin ``/stats`` until ``name`` has ``value`` (admin may move between processes)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"exited with {proc.proc.returncode}:\n{proc.output()}")
        try:
            last = read_stats(f"http://127.0.0.1:{admin_port}").get(name)
            if last == value:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{name} is {last}, not {value}:\n{proc.output()}")


def wait_until_output(p: PyEnvoy, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in p.output():
        if time.monotonic() > deadline or p.proc.poll() is not None:
            raise AssertionError(p.output())
        time.sleep(0.05)


def get(port: int, path: str = "/echo") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


class Load:
    """Client threads sending GETs until stopped; records successes and every failure."""

    def __init__(self, port: int, keepalive: int = 2, new_connections: int = 2) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(ka,), daemon=True)
            for ka in [True] * keepalive + [False] * new_connections
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self, keepalive: bool) -> None:
        headers = {} if keepalive else {"Connection": "close"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/echo", headers=headers)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
                with self._lock:
                    self.ok += 1
            except Exception as e:  # every failure counts: that is what the test is about
                with self._lock:
                    self.failures.append(repr(e))
                conn.close()
            if not keepalive:
                conn.close()
        conn.close()


@pytest.fixture()
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture()
def setup(upstream: HttpUpstream, tmp_path: Path) -> dict[str, Any]:
    ports = {
        "admin_port": free_port(),
        "listener_port": free_port(),
        "upstream_port": upstream.port,
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG.format(**ports))
    return {"config": config, "base_id": str(next(_base_ids)), **ports}


def hot_restart_under_load(
    setup: dict[str, Any], upstream: HttpUpstream, *extra: str
) -> tuple[Load, dict[str, Any]]:
    """Epoch 0 serves, a client load runs, epoch 1 takes over; returns the load and the
    new process's stats after the old one exited."""
    common = (
        "--base-id",
        setup["base_id"],
        "--drain-time-s",
        "1",
        "--parent-shutdown-time-s",
        "2",
        *extra,
    )
    admin, port = setup["admin_port"], setup["listener_port"]
    old = PyEnvoy(setup["config"], *common)
    new: PyEnvoy | None = None
    try:
        wait_stat(admin, "server.live", 1, old)
        with Load(port) as load:
            time.sleep(0.5)
            new = PyEnvoy(setup["config"], "--restart-epoch", "1", *common)
            wait_stat(admin, "server.hot_restart_epoch", 1, new)
            t0 = time.monotonic()
            assert old.wait(10) == 0, old.output()
            # The parent leaves --parent-shutdown-time-s (2 s) after the child took over.
            assert 1.0 < time.monotonic() - t0 < 6.0
            time.sleep(0.5)
        assert new.proc.poll() is None, new.output()
        assert get(port) == 200
        stats = read_stats(f"http://127.0.0.1:{admin}")
        return load, stats
    finally:
        old.kill()
        if new is not None:
            new.kill()


def test_hot_restart_under_load_fails_no_request(
    setup: dict[str, Any], upstream: HttpUpstream
) -> None:
    load, stats = hot_restart_under_load(setup, upstream)
    assert load.failures == []
    assert load.ok > 100
    # Counters continue across the restart (the parent's deltas are imported), so the new
    # process counts every request either process served; +1 is the final check GET.
    assert stats["http.ingress.downstream_rq_total"] == load.ok + 1 == upstream.request_count
    assert stats["server.hot_restart_epoch"] == 1
    assert stats["server.hot_restart_generation"] == 2
    assert stats["server.parent_connections"] == 0


async def test_parent_drain_never_closes_after_a_keep_alive_response() -> None:
    """The hand-over race, made deterministic: the parent starts draining while a response
    is on the wire. That response went out keep-alive, so the client reuses the connection:
    its next requests must be answered until one says ``connection: close``, not cut."""
    release = asyncio.Event()
    origin_writers: list[asyncio.StreamWriter] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /held "):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                    await writer.drain()
                    await release.wait()  # the response is on the wire until released
                    writer.write(b"cd")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return head, await asyncio.wait_for(reader.readexactly(length), 5)

    up = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = free_port()
    text = CONFIG.format(
        admin_port=0, listener_port=port, upstream_port=up.sockets[0].getsockname()[1]
    )
    server = Server(load_bootstrap(None, text), ServerOptions(drain_time_s=5))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ab"
        drain_listeners(server, 5.0, "immediate")  # the child took over mid-response
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"cd"
        # That response went out keep-alive: the client sends its next requests on the same
        # connection at once. Every one is answered until one carries the close.
        for n in range(1, 201):
            writer.write(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
            head, body = await response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok", n
            if b"connection: close" in head.lower():
                break
        else:
            raise AssertionError("the drained connection never said connection: close")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then it closes
        writer.close()
    finally:
        await server.stop(0)
        up.close()
        for w in origin_writers:
            w.close()
        await asyncio.sleep(0.01)  # let the origin's handlers see EOF and return


def test_no_parent_is_a_clear_error(setup: dict[str, Any]) -> None:
    p = PyEnvoy(setup["config"], "--restart-epoch", "1", "--base-id", setup["base_id"])
    try:
        assert p.wait(15) == 1
        out = p.output()
        assert "no parent process at --restart-epoch 0" in out
        assert f"--base-id {setup['base_id']}" in out
    finally:
        p.kill()


def test_wrong_epoch_names_the_running_one(setup: dict[str, Any]) -> None:
    base = ("--base-id", setup["base_id"])
    first = PyEnvoy(setup["config"], *base)
    try:
        wait_stat(setup["admin_port"], "server.live", 1, first)
        skipped = PyEnvoy(setup["config"], "--restart-epoch", "2", *base)
        try:
            assert skipped.wait(15) == 1
            assert "answers at epoch 0: use --restart-epoch 1" in skipped.output()
        finally:
            skipped.kill()
        # A second epoch 0 on the same base id (other ports) serves, but cannot be hot-restarted.
        other = setup["config"].with_name("other.yaml")
        ports = {"admin_port": free_port(), "listener_port": free_port()}
        other.write_text(CONFIG.format(upstream_port=setup["upstream_port"], **ports))
        again = PyEnvoy(other, "--restart-epoch", "0", *base)
        try:
            wait_stat(ports["admin_port"], "server.live", 1, again)
            wait_until_output(again, "hot restart unavailable")
            assert get(ports["listener_port"]) == 200
        finally:
            again.kill()
        assert first.proc.poll() is None  # the running process was not disturbed
        assert get(setup["listener_port"]) == 200
    finally:
        first.kill()


def test_skip_hot_restart_on_no_parent(setup: dict[str, Any]) -> None:
    p = PyEnvoy(
        setup["config"],
        "--restart-epoch",
        "3",
        "--base-id",
        setup["base_id"],
        "--skip-hot-restart-on-no-parent",
    )
    try:
        wait_stat(setup["admin_port"], "server.hot_restart_epoch", 3, p)
        assert "starting without one" in p.output()
    finally:
        p.kill()


def test_disable_hot_restart_with_epoch_is_an_error(setup: dict[str, Any]) -> None:
    p = PyEnvoy(setup["config"], "--restart-epoch", "1", "--disable-hot-restart")
    try:
        assert p.wait(15) == 1
        assert "--disable-hot-restart" in p.output()
    finally:
        p.kill()


def test_hot_restart_version_prints_and_exits() -> None:
    from pyenvoy.options import HOT_RESTART_VERSION

    res = subprocess.run(
        [sys.executable, "-m", "pyenvoy", "--hot-restart-version"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert res.returncode == 0 and res.stdout == f"{HOT_RESTART_VERSION}\n"


def test_admin_server_info_reports_hot_restart(setup: dict[str, Any]) -> None:
    from pyenvoy.options import HOT_RESTART_VERSION

    p = PyEnvoy(setup["config"], "--base-id", setup["base_id"])
    try:
        wait_stat(setup["admin_port"], "server.live", 1, p)
        url = f"http://127.0.0.1:{setup['admin_port']}"
        with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
            info = json.loads(r.read())
        assert info["hot_restart_version"] == HOT_RESTART_VERSION
        assert info["command_line_options"]["restart_epoch"] == 0
    finally:
        p.kill()


def test_parent_stats_are_imported() -> None:
    """Unit level: counter deltas add up, imported gauges come and go with the parent."""
    from pyenvoy.hot_restart import ParentStats, accumulates, export_stats
    from pyenvoy.stats import Store

    parent, child = Store(), Store()
    parent.counter_from_name("http.x.downstream_rq_total").value = 5
    parent.gauge_from_name("http.x.downstream_cx_active").value = 3
    parent.gauge_from_name("cluster.c.membership_healthy").value = 2
    exported: dict[str, int] = {}
    ps = ParentStats()
    child.counter_from_name("http.x.downstream_rq_total").value = 1
    ps.apply_to_store(child, ps.merge(export_stats(parent, exported)))
    assert child.counters["http.x.downstream_rq_total"].value == 6
    assert child.gauges["http.x.downstream_cx_active"].value == 3
    assert "cluster.c.membership_healthy" not in child.gauges  # state, not imported
    parent.counter_from_name("http.x.downstream_rq_total").value = 9
    parent.gauge_from_name("http.x.downstream_cx_active").value = 1
    ps.apply_to_store(child, ps.merge(export_stats(parent, exported)))
    assert child.counters["http.x.downstream_rq_total"].value == 10  # +4, not +9
    assert child.gauges["http.x.downstream_cx_active"].value == 1
    ps.forget_gauges(child)
    assert child.gauges["http.x.downstream_cx_active"].value == 0
    assert accumulates("cluster.c.upstream_rq_active")
    assert not accumulates("server.total_connections")
    assert not accumulates("listener_manager.total_listeners_active")


def test_listener_removed_by_the_new_config_refuses(
    setup: dict[str, Any], upstream: HttpUpstream
) -> None:
    """The child adopts the sockets its config has; the others close with the parent."""
    extra_port = free_port()
    two = CONFIG.format(
        admin_port=setup["admin_port"],
        listener_port=setup["listener_port"],
        upstream_port=setup["upstream_port"],
    )
    listener = two[two.index("  - name: http") : two.index("  clusters:")]
    second = listener.replace("name: http", "name: extra").replace(
        f"port_value: {setup['listener_port']}", f"port_value: {extra_port}"
    )
    parent_config = setup["config"].with_name("two.yaml")
    parent_config.write_text(two.replace("  clusters:", second + "  clusters:"))
    common = ("--base-id", setup["base_id"], "--drain-time-s", "0", "--parent-shutdown-time-s", "1")
    old = PyEnvoy(parent_config, *common)
    new: PyEnvoy | None = None
    try:
        wait_stat(setup["admin_port"], "server.live", 1, old)
        assert get(extra_port) == 200
        new = PyEnvoy(setup["config"], "--restart-epoch", "1", *common)
        wait_stat(setup["admin_port"], "server.hot_restart_epoch", 1, new)
        assert old.wait(10) == 0, old.output()
        assert get(setup["listener_port"]) == 200
        with pytest.raises(ConnectionRefusedError):
            get(extra_port)
    finally:
        old.kill()
        if new is not None:
            new.kill()
