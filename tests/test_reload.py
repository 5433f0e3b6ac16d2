"""Whole-config reload: SIGHUP / --watch-config on ``python -m pyenvoy``, and Server.reload().

A reload re-reads the ``-c`` file, builds the new static resources completely, then swaps:
new listeners open, removed ones drain and close, changed ones get a new filter chain for
new connections while open connections finish on the old one; clusters update in place.
A bad config (invalid YAML, unknown field, unknown cluster, port in use) changes nothing
and is counted and logged with its field path.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyenvoy.config import load_bootstrap
from pyenvoy.server import Server
from pyenvoy.upstream.host import FAILED_ACTIVE_HC
from tests.support.procs import PyEnvoyProcess, free_port
from tests.support.upstream import HttpUpstream
from tests.test_xds_filesystem import (
    H1,
    dump_section,
    get,
    hcm,
    listener,
    route_config,
    start_server,
    stat,
    static_cluster,
    wait_until,
)


def static_config(
    admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]] | None = None
) -> str:
    return yaml.safe_dump(
        {
            "admin": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
            },
            "static_resources": {"listeners": listeners, "clusters": clusters or []},
        }
    )


class Proc(PyEnvoyProcess):
    """pyenvoy with extra flags; the config file can be rewritten and SIGHUP sent."""

    def __init__(self, config_text: str, *flags: str, **values: Any) -> None:
        super().__init__(config_text, **values)
        self.flags = list(flags)

    def command(self) -> list[str]:
        return super().command() + self.flags

    def rewrite(self, text: str) -> None:
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        Path(tmp).replace(self.config_path)

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stat(self, name: str) -> int:
        return int(self.stats().get(name, 0))

    def wait_stat_at_least(self, name: str, value: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stat(name) < value:
            assert time.monotonic() < deadline, f"{name} < {value}\n{self.output()[-3000:]}"
            time.sleep(0.02)


def http_get(port: int, path: str = "/dr") -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
        return r.status, r.read()


class KeepAlive:
    """A blocking keep-alive HTTP/1.1 connection (a client that holds it open)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=3)
        self.buf = b""

    def get(self, path: str = "/dr") -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        self.buf = rest[n:]
        return int(lines[0].split()[1]), headers, rest[:n]

    def closed(self, timeout: float = 3.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


# ---- subprocess: SIGHUP and --watch-config ----------------------------------------------


def test_sighup_reload_keepalive_finishes_on_old_config() -> None:
    admin, p1, p2 = free_port(), free_port(), free_port()
    one = static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", "one")))])
    with Proc(
        one, "--drain-time-s", "2", "--drain-strategy", "immediate", admin_port=admin
    ) as proc:
        ka = KeepAlive(p1)
        status, _, body = ka.get()
        assert (status, body) == (200, b"one")
        two = static_config(
            admin,
            [
                listener("l1", p1, hcm("l1", routes=route_config("", "two"))),
                listener("l2", p2, hcm("l2", routes=route_config("", "new"))),
            ],
        )
        proc.rewrite(two)
        proc.hup()
        proc.wait_stat_at_least("listener_manager.lds.update_success", 1)
        assert http_get(p1) == (200, b"two")  # new connection: new chain, same port
        assert http_get(p2) == (200, b"new")  # new listener
        status, headers, body = ka.get()  # the open connection: old chain, then closed
        assert (status, body, headers.get("connection")) == (200, b"one", "close")
        assert ka.closed()
        ka.close()
        stats = proc.stats()
        assert stats["listener_manager.listener_modified"] == 1
        assert stats["listener_manager.listener_added"] == 2
        assert stats["listener_manager.listener_in_place_updated"] == 1
        assert stats["cluster_manager.cds.update_success"] == 1
        # /config_dump shows what serves now.
        _, _, body = proc.admin("/config_dump")
        routes = next(
            c for c in json.loads(body)["configs"] if c["@type"].endswith(".RoutesConfigDump")
        )
        texts = [
            r["route_config"]["virtual_hosts"][0]["routes"][0]["direct_response"]["body"][
                "inline_string"
            ]
            for r in routes["static_route_configs"]
        ]
        assert sorted(texts) == ["new", "two"]
        # Remove l2: its port closes.
        proc.rewrite(
            static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", "two")))])
        )
        proc.hup()
        proc.wait_stat_at_least("listener_manager.listener_removed", 1)
        with pytest.raises(OSError):
            http_get(p2)


def test_sighup_rejected_configs_keep_serving() -> None:
    admin, p1 = free_port(), free_port()
    good = static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", "good")))])
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    bad_unknown_field = hcm("l1", routes=route_config("", "x"))
    bad_unknown_field["bogus_field"] = 1
    bad_cluster = hcm("l1", routes=route_config("", "x", cluster="nope"))
    cases = [
        ("admin: [\n", "yaml error at line 2"),
        (
            static_config(admin, [listener("l1", p1, bad_unknown_field)]),
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config: no such field: 'bogus_field'",
        ),
        (
            static_config(admin, [listener("l1", p1, bad_cluster)]),
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"
            ".virtual_hosts[0].routes[1].route.cluster: route: unknown cluster 'nope'",
        ),
        (
            static_config(
                admin,
                [
                    listener("l1", p1, hcm("l1", routes=route_config("", "x"))),
                    listener("l2", busy, hcm("l2", routes=route_config("", "x"))),
                ],
            ),
            f"static_resources.listeners[1].address: cannot bind '127.0.0.1:{busy}': Address already in use",
        ),
    ]
    try:
        with Proc(good, admin_port=admin) as proc:
            ka = KeepAlive(p1)
            for i, (text, expected) in enumerate(cases, start=1):
                proc.rewrite(text)
                proc.hup()
                proc.wait_stat_at_least("listener_manager.lds.update_attempt", i)
                deadline = time.monotonic() + 3
                while expected not in proc.output():
                    assert time.monotonic() < deadline, (
                        f"no log for {expected!r}:\n{proc.output()[-3000:]}"
                    )
                    time.sleep(0.02)
                assert http_get(p1) == (200, b"good")
                assert ka.get()[2] == b"good"
            stats = proc.stats()
            assert stats["listener_manager.lds.update_rejected"] == 4
            assert stats["listener_manager.lds.update_success"] == 0
            assert stats.get("listener_manager.listener_modified", 0) == 0
            assert "config reload rejected" in proc.output()
            ka.close()
    finally:
        blocker.close()


def test_watch_config_reloads_on_file_change() -> None:
    admin, p1 = free_port(), free_port()
    one = static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", "one")))])
    with Proc(one, "--watch-config", admin_port=admin) as proc:
        assert http_get(p1) == (200, b"one")
        proc.rewrite(
            static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", "two")))])
        )
        t0 = time.monotonic()
        while http_get(p1)[1] != b"two":
            assert time.monotonic() - t0 < 1.5, "not reloaded within a second"
            time.sleep(0.05)


def test_watch_config_with_workers_is_watched_by_the_main_process_only() -> None:
    admin, p1 = free_port(), free_port()

    def body(text: str) -> str:
        return static_config(admin, [listener("l1", p1, hcm("l1", routes=route_config("", text)))])

    def all_say(text: str, within: float) -> None:
        t0 = time.monotonic()
        while True:
            bodies = {http_get(p1)[1] for _ in range(12)}  # new connections: both workers
            if bodies == {text.encode()}:
                return
            assert time.monotonic() - t0 < within, bodies
            time.sleep(0.05)

    with Proc(body("one"), "--watch-config", "--concurrency", "2", admin_port=admin) as proc:
        assert proc.proc is not None
        all_say("one", 10)
        proc.rewrite(body("two"))
        all_say("two", 2.0)
        # The main process stopped: the workers do not watch the file themselves.
        proc.proc.send_signal(signal.SIGSTOP)
        try:
            proc.rewrite(body("three"))
            time.sleep(1.2)
            assert {http_get(p1)[1] for _ in range(12)} == {b"two"}
        finally:
            proc.proc.send_signal(signal.SIGCONT)
        all_say("three", 2.5)


# ---- in-process: Server.reload() ----------------------------------------------------------


@pytest.fixture
async def running() -> Any:
    servers: list[Server] = []
    yield servers
    for s in servers:
        await s.stop(0)


def config(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"static_resources": {"listeners": listeners, "clusters": clusters}}


async def test_reload_updates_clusters_in_place(running: list[Server]) -> None:
    up1, up2 = HttpUpstream(), HttpUpstream()
    up1.start()
    up2.start()
    try:
        port = free_port()
        routes = route_config("", "dr", cluster="svc")
        base = config(
            [listener("l1", port, hcm("l1", routes=routes))], [static_cluster("svc", [up1.port])]
        )
        server = await start_server(base)
        running.append(server)
        cm = server.cluster_manager
        assert cm is not None
        old = cm.get("svc")
        assert old is not None
        host = old.hosts[0]
        c = await H1.connect(port)
        assert (await c.get("/echo"))[0] == 200 and up1.request_count == 1
        # Same listener, the cluster now has both upstreams: the kept Host is the same object.
        host.health_flags |= FAILED_ACTIVE_HC
        new_cfg = config(
            [listener("l1", port, hcm("l1", routes=routes))],
            [static_cluster("svc", [up1.port, up2.port])],
        )
        assert await server.reload(load_bootstrap(data=new_cfg))
        new = cm.get("svc")
        assert new is not None and new is not old
        assert host in new.hosts and host.health_flags & FAILED_ACTIVE_HC
        host.health_flags = 0
        new.refresh_health()
        for _ in range(4):  # the open connection uses the new cluster (looked up per request)
            assert (await c.get("/echo"))[0] == 200
        assert up2.request_count >= 1
        assert stat(server, "cluster_manager.cluster_modified") == 1
        assert stat(server, "listener_manager.listener_modified") == 0  # listener unchanged
        c.close()
        # A cluster removed while a route still names it is rejected (the route's cluster is
        # validated against the new cluster set).
        assert not await server.reload(
            load_bootstrap(data=config([listener("l1", port, hcm("l1", routes=routes))], []))
        )
        assert cm.get("svc") is new
        assert stat(server, "listener_manager.lds.update_rejected") == 1
    finally:
        up1.stop()
        up2.stop()


async def test_reload_is_all_or_nothing(running: list[Server]) -> None:
    p1, p2 = free_port(), free_port()
    base = config(
        [listener("l1", p1, hcm("l1", routes=route_config("", "one")))],
        [static_cluster("a", [9001])],
    )
    server = await start_server(base)
    running.append(server)
    cm = server.cluster_manager
    assert cm is not None
    a = cm.get("a")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        bad = config(
            [
                listener("l1", p1, hcm("l1", routes=route_config("", "two"))),
                listener("l2", p2, hcm("l2", routes=route_config("", "x"))),
                listener("l3", blocker.getsockname()[1], hcm("l3", routes=route_config("", "x"))),
            ],
            [static_cluster("a", [9002]), static_cluster("b", [9003])],
        )
        assert not await server.reload(load_bootstrap(data=bad))
    finally:
        blocker.close()
    assert cm.get("a") is a and cm.get("b") is None  # clusters untouched
    assert (await get(p1, "/dr"))[2] == b"one"
    with pytest.raises(OSError):  # l2's socket was bound during the attempt, then closed
        await get(p2, "/dr")
    assert stat(server, "listener_manager.lds.update_rejected") == 1
    assert stat(server, "cluster_manager.cds.update_rejected") == 0


async def test_reload_renamed_listener_takes_over_the_socket(running: list[Server]) -> None:
    port = free_port()
    server = await start_server(
        config([listener("old", port, hcm("a", routes=route_config("", "old")))], [])
    )
    running.append(server)
    c = await H1.connect(port)
    assert (await c.get("/dr"))[2] == b"old"
    assert await server.reload(
        load_bootstrap(
            data=config([listener("new", port, hcm("b", routes=route_config("", "new")))], [])
        )
    )
    assert (await get(port, "/dr"))[2] == b"new"
    lm = server.listener_manager
    assert lm is not None and [lst.name for lst in lm.listeners] == ["new"]
    assert stat(server, "listener_manager.listener_removed") == 1
    status, _, body = await c.get("/dr")  # the old connection, on the old chain
    assert (status, body) == (200, b"old")
    await wait_until(lambda: not lm.draining, timeout=3, what="drained")
    assert await c.closed()
    c.close()
    listeners = dump_section(server, "ListenersConfigDump")["static_listeners"]
    assert [x["listener"]["name"] for x in listeners] == ["new"]


async def test_reload_counts_are_visible_only_after_a_reload(running: list[Server]) -> None:
    server = await start_server(
        config([listener("l1", 0, hcm("a", routes=route_config("", "x")))], [])
    )
    running.append(server)
    assert "listener_manager.lds.update_attempt" not in server.stats.counters  # as Envoy
    await server.reload(
        load_bootstrap(data=config([listener("l1", 0, hcm("a", routes=route_config("", "y")))], []))
    )
    assert stat(server, "listener_manager.lds.update_success") == 1
    assert stat(server, "cluster_manager.cds.update_success") == 1
    await asyncio.sleep(0)
