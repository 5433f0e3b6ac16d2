"""Filesystem xDS (LDS/CDS/RDS/EDS from DiscoveryResponse files), in-process.

A real Server runs on the test's loop with a fast file watcher; files are replaced the way
Kubernetes and Envoy's docs do it (write a temp file, rename it over the old one; or swap a
``..data`` symlink inside a watched directory). Requests go over real loopback sockets.
The helpers here are shared by tests/test_reload.py and tests/test_drain.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyenvoy.admin import config_dump
from pyenvoy.config import ConfigError, load_bootstrap
from pyenvoy.config.xds import xxhash64
from pyenvoy.options import ServerOptions
from pyenvoy.server import Server
from pyenvoy.upstream.host import FAILED_ACTIVE_HC, FAILED_EDS_HEALTH
from tests.support.upstream import HttpUpstream

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


# ---- config builders --------------------------------------------------------------------


def route_config(name: str, body: str, cluster: str | None = None) -> dict[str, Any]:
    """``/dr`` answers ``body`` directly; everything else goes to ``cluster`` (if any)."""
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": "/dr"},
            "direct_response": {"status": 200, "body": {"inline_string": body}},
        }
    ]
    if cluster:
        routes.append({"match": {"prefix": "/"}, "route": {"cluster": cluster}})
    rc: dict[str, Any] = {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}
    if name:
        rc["name"] = name
    return rc


def hcm(
    stat_prefix: str, *, routes: dict[str, Any] | None = None, rds: dict[str, Any] | None = None
) -> dict[str, Any]:
    cfg: dict[str, Any] = {"@type": HCM_TYPE, "stat_prefix": stat_prefix, "http_filters": [ROUTER]}
    if routes is not None:
        cfg["route_config"] = routes
    if rds is not None:
        cfg["rds"] = rds
    return cfg


def listener(name: str, port: int, hcm_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm_config,
                    }
                ]
            }
        ],
        **extra,
    }


def static_cluster(name: str, ports: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": p}
                                }
                            }
                        }
                        for p in ports
                    ]
                }
            ],
        },
        **extra,
    }


def eds_cluster(name: str, eds_path: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"path_config_source": {"path": eds_path}}},
    }


def cla(name: str, ports: list[int], statuses: dict[int, str] | None = None) -> dict[str, Any]:
    statuses = statuses or {}
    eps = []
    for p in ports:
        ep: dict[str, Any] = {
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}
        }
        if p in statuses:
            ep["health_status"] = statuses[p]
        eps.append(ep)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}


def rds_source(
    path: str, name: str = "local_route", watched_directory: str | None = None
) -> dict[str, Any]:
    pcs: dict[str, Any] = {"path": path}
    if watched_directory:
        pcs["watched_directory"] = {"path": watched_directory}
    return {"route_config_name": name, "config_source": {"path_config_source": pcs}}


def write_response(
    path: str | Path, version: str, type_url: str, resources: list[dict[str, Any]]
) -> None:
    """Atomically replace ``path`` with a DiscoveryResponse (write a temp file, rename)."""
    doc = {"version_info": version, "resources": [{"@type": type_url, **r} for r in resources]}
    write_atomic(path, json.dumps(doc, indent=1))


def write_atomic(path: str | Path, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NODE = {"id": "test-node", "cluster": "test-cluster"}


def bootstrap(
    tmp: Path,
    *,
    lds: bool = True,
    cds: bool = True,
    listeners: list[dict[str, Any]] | None = None,
    clusters: list[dict[str, Any]] | None = None,
    node: dict[str, Any] | None = NODE,
) -> dict[str, Any]:
    b: dict[str, Any] = {
        "static_resources": {"listeners": listeners or [], "clusters": clusters or []}
    }
    if node is not None:
        b["node"] = node
    dr: dict[str, Any] = {}
    if lds:
        dr["lds_config"] = {"path_config_source": {"path": str(tmp / "lds.yaml")}}
    if cds:
        dr["cds_config"] = {"path_config_source": {"path": str(tmp / "cds.yaml")}}
    if dr:
        b["dynamic_resources"] = dr
    return b


async def start_server(
    config: dict[str, Any], *, drain_time_s: int = 1, interval: float = 0.05, **opts: Any
) -> Server:
    server = Server(load_bootstrap(data=config), ServerOptions(drain_time_s=drain_time_s, **opts))
    server.xds.watcher.interval = interval
    await server.start()
    return server


def bound_port(server: Server, name: str) -> int:
    lm = server.listener_manager
    assert lm is not None
    lst = lm.get(name)
    assert lst is not None and lst.local_address is not None, f"listener {name} is not active"
    return lst.local_address[1]


async def wait_until(
    pred: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def stat(server: Server, name: str) -> int:
    store = server.stats
    if name in store.counters:
        return store.counters[name].value
    return store.gauges[name].value


def dump(server: Server, **query: str) -> dict[str, Any]:
    q = {k: [v] for k, v in query.items()}
    return json.loads(config_dump.render(server, q))


def dump_section(server: Server, suffix: str, **query: str) -> dict[str, Any]:
    for c in dump(server, **query)["configs"]:
        if c["@type"].endswith("." + suffix):
            return c
    raise AssertionError(suffix)


# ---- HTTP client ------------------------------------------------------------------------


class H1:
    """A keep-alive HTTP/1.1 client on one connection (asyncio streams: test code)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> H1:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def get(self, path: str, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), timeout) if n else b""
        return status, headers, body

    async def closed(self, timeout: float = 3.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (TimeoutError, ConnectionError):
            return False
        return data == b""

    def close(self) -> None:
        self.writer.close()


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    c = await H1.connect(port)
    try:
        return await c.get(path)
    finally:
        c.close()


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Any:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
async def running() -> Any:
    servers: list[Server] = []
    yield servers
    for s in servers:
        await s.stop(0)


# ---- tests ------------------------------------------------------------------------------


def test_xxhash64_matches_envoys_version_gauges() -> None:
    # Values read from real Envoy 1.40 (``*.version`` gauges for these version_info texts).
    assert xxhash64(b"v1") == 9194640092791331756
    assert xxhash64(b"c1") == 814672407442807801
    assert xxhash64(b"r1") == 7014043718409226471
    assert xxhash64(b"e1") == 375412022058588663
    assert xxhash64(b"") == 17241709254077376921
    assert xxhash64(b"a" * 100) == 3985758137895276467  # the 32-byte stripe path


async def test_lds_cds_rds_eds_from_files(
    tmp_path: Path, upstream: HttpUpstream, running: list[Server]
) -> None:
    write_response(tmp_path / "eds.yaml", "e1", CLA_TYPE, [cla("backend", [upstream.port])])
    write_response(
        tmp_path / "cds.yaml",
        "c1",
        CLUSTER_TYPE,
        [eds_cluster("backend", str(tmp_path / "eds.yaml"))],
    )
    write_response(
        tmp_path / "rds.yaml", "r1", ROUTE_TYPE, [route_config("local_route", "r1\n", "backend")]
    )
    write_response(
        tmp_path / "lds.yaml",
        "v1",
        LISTENER_TYPE,
        [listener("l1", 0, hcm("ingress", rds=rds_source(str(tmp_path / "rds.yaml"))))],
    )
    server = await start_server(bootstrap(tmp_path))
    running.append(server)
    port = bound_port(server, "l1")
    status, _, body = await get(port, "/dr")
    assert (status, body) == (200, b"r1\n")
    status, _, body = await get(port, "/echo")
    assert status == 200 and json.loads(body)["path"] == "/echo"
    # Envoy's subscription stats, with the xxHash64 version gauges.
    assert stat(server, "listener_manager.lds.update_success") == 1
    assert stat(server, "listener_manager.lds.version") == xxhash64(b"v1")
    assert stat(server, "cluster_manager.cds.version") == xxhash64(b"c1")
    assert stat(server, "http.ingress.rds.local_route.version") == xxhash64(b"r1")
    assert stat(server, "cluster.backend.version") == xxhash64(b"e1")
    assert stat(server, "cluster.backend.update_success") == 1
    assert stat(server, "listener_manager.listener_added") == 1
    assert stat(server, "cluster_manager.cluster_added") == 1
    assert server.cluster_manager is not None and server.cluster_manager.cds is not None
    assert server.cluster_manager.cds.stats.version_text.value == "c1"
    # /config_dump in Envoy's shapes.
    clusters = dump_section(server, "ClustersConfigDump")
    assert clusters["version_info"] == "c1"
    (dc,) = clusters["dynamic_active_clusters"]
    assert (
        dc["version_info"] == "c1" and dc["cluster"]["name"] == "backend" and "last_updated" in dc
    )
    listeners = dump_section(server, "ListenersConfigDump")
    assert listeners["version_info"] == "v1"
    (dl,) = listeners["dynamic_listeners"]
    assert dl["name"] == "l1" and dl["active_state"]["version_info"] == "v1"
    routes = dump_section(server, "RoutesConfigDump")
    (dr,) = routes["dynamic_route_configs"]
    assert dr["version_info"] == "r1" and dr["route_config"]["name"] == "local_route"
    eds = dump_section(server, "EndpointsConfigDump", include_eds="")
    (de,) = eds["dynamic_endpoint_configs"]
    assert de["endpoint_config"]["cluster_name"] == "backend"


async def test_rds_update_applies_to_open_connections(
    tmp_path: Path, running: list[Server]
) -> None:
    rds = tmp_path / "rds.yaml"
    write_response(rds, "r1", ROUTE_TYPE, [route_config("local_route", "one")])
    config = bootstrap(
        tmp_path,
        lds=False,
        cds=False,
        listeners=[listener("l1", 0, hcm("h", rds=rds_source(str(rds))))],
    )
    server = await start_server(config)
    running.append(server)
    c = await H1.connect(bound_port(server, "l1"))
    assert (await c.get("/dr"))[2] == b"one"
    t0 = time.monotonic()
    write_response(rds, "r2", ROUTE_TYPE, [route_config("local_route", "two")])
    while (await c.get("/dr"))[2] != b"two":
        assert time.monotonic() - t0 < 1.0, "RDS update not applied within a second"
        await asyncio.sleep(0.02)
    status, headers, _ = await c.get("/dr")  # same connection, no close
    assert status == 200 and "connection" not in headers
    c.close()
    assert stat(server, "http.h.rds.local_route.update_success") == 2
    assert stat(server, "http.h.rds.local_route.config_reload") == 2
    assert stat(server, "http.h.rds.local_route.version") == xxhash64(b"r2")


async def test_bad_rds_updates_keep_the_last_good_config(
    tmp_path: Path, running: list[Server]
) -> None:
    rds = tmp_path / "rds.yaml"
    write_response(rds, "r1", ROUTE_TYPE, [route_config("local_route", "good")])
    config = bootstrap(
        tmp_path,
        lds=False,
        cds=False,
        listeners=[listener("l1", 0, hcm("h", rds=rds_source(str(rds))))],
    )
    server = await start_server(config)
    running.append(server)
    port = bound_port(server, "l1")
    prefix = "http.h.rds.local_route."

    # Unparsable YAML: update_failure (Envoy: "Filesystem config update failure").
    write_atomic(rds, 'version_info: "r2"\nresources: [\n')
    await wait_until(lambda: stat(server, prefix + "update_failure") == 1, what="update_failure")
    # A config Envoy rejects (two wildcard virtual hosts): update_rejected.
    bad = route_config("local_route", "bad")
    bad["virtual_hosts"].append({"name": "vh2", "domains": ["*"]})
    write_response(rds, "r3", ROUTE_TYPE, [bad])
    await wait_until(lambda: stat(server, prefix + "update_rejected") == 1, what="update_rejected")
    # The wrong route config name: rejected too.
    write_response(rds, "r4", ROUTE_TYPE, [route_config("other", "other")])
    await wait_until(lambda: stat(server, prefix + "update_rejected") == 2, what="second rejection")
    assert (await get(port, "/dr"))[2] == b"good"
    assert stat(server, prefix + "update_success") == 1
    assert stat(server, prefix + "update_attempt") == 4
    assert stat(server, prefix + "version") == xxhash64(b"r1")
    (dr,) = dump_section(server, "RoutesConfigDump")["dynamic_route_configs"]
    assert dr["version_info"] == "r1"
    # An unknown field is ignored with a warning (Envoy's default for dynamic config).
    doc = {
        "version_info": "r5",
        "resources": [{"@type": ROUTE_TYPE, **route_config("local_route", "new"), "bogus": 1}],
    }
    write_atomic(rds, json.dumps(doc))
    await wait_until(
        lambda: stat(server, prefix + "update_success") == 2, what="accepted with unknown field"
    )
    assert stat(server, "server.dynamic_unknown_fields") == 1
    assert (await get(port, "/dr"))[2] == b"new"


async def test_unknown_dynamic_fields_rejected_on_request(
    tmp_path: Path, running: list[Server]
) -> None:
    rds = tmp_path / "rds.yaml"
    write_response(rds, "r1", ROUTE_TYPE, [route_config("local_route", "good")])
    config = bootstrap(
        tmp_path,
        lds=False,
        cds=False,
        listeners=[listener("l1", 0, hcm("h", rds=rds_source(str(rds))))],
    )
    server = await start_server(config, reject_unknown_dynamic_fields=True)
    running.append(server)
    doc = {
        "version_info": "r2",
        "resources": [{"@type": ROUTE_TYPE, **route_config("local_route", "new"), "bogus": 1}],
    }
    write_atomic(rds, json.dumps(doc))
    await wait_until(lambda: stat(server, "http.h.rds.local_route.update_failure") == 1)
    assert (await get(bound_port(server, "l1"), "/dr"))[2] == b"good"


async def test_lds_add_modify_remove(tmp_path: Path, running: list[Server]) -> None:
    lds = tmp_path / "lds.yaml"
    p1, p2 = free_port(), free_port()
    write_response(
        lds, "v1", LISTENER_TYPE, [listener("l1", p1, hcm("l1", routes=route_config("", "A")))]
    )
    server = await start_server(
        bootstrap(tmp_path, cds=False), drain_time_s=2, drain_strategy="immediate"
    )
    running.append(server)
    old = await H1.connect(p1)
    assert (await old.get("/dr"))[2] == b"A"
    # Modify l1 (new filter chain) and add l2.
    write_response(
        lds,
        "v2",
        LISTENER_TYPE,
        [
            listener("l1", p1, hcm("l1", routes=route_config("", "B"))),
            listener("l2", p2, hcm("l2", routes=route_config("", "C"))),
        ],
    )
    await wait_until(lambda: stat(server, "listener_manager.lds.update_success") == 2, what="v2")
    assert (await get(p1, "/dr"))[2] == b"B"  # new connections: new chain, same socket
    assert (await get(p2, "/dr"))[2] == b"C"
    # The open connection keeps its chain; its next response says connection: close.
    status, headers, body = await old.get("/dr")
    assert (status, body, headers.get("connection")) == (200, b"A", "close")
    assert await old.closed()
    assert stat(server, "listener_manager.listener_added") == 2
    assert stat(server, "listener_manager.listener_modified") == 1
    assert stat(server, "listener_manager.listener_in_place_updated") == 1
    assert stat(server, "http.l1.downstream_cx_drain_close") >= 1
    # Remove l2: its port stops accepting at once.
    write_response(
        lds, "v3", LISTENER_TYPE, [listener("l1", p1, hcm("l1", routes=route_config("", "B")))]
    )
    await wait_until(lambda: stat(server, "listener_manager.listener_removed") == 1, what="removal")
    with pytest.raises(OSError):
        await get(p2, "/dr")
    assert stat(server, "listener_manager.total_listeners_active") == 1
    assert dump_section(server, "ListenersConfigDump")["version_info"] == "v3"


async def test_lds_rejected_listener_keeps_the_others(
    tmp_path: Path, running: list[Server]
) -> None:
    lds = tmp_path / "lds.yaml"
    p1 = free_port()
    write_response(
        lds, "v1", LISTENER_TYPE, [listener("l1", p1, hcm("l1", routes=route_config("", "A")))]
    )
    server = await start_server(bootstrap(tmp_path, cds=False))
    running.append(server)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    try:
        write_response(
            lds,
            "v2",
            LISTENER_TYPE,
            [
                listener("l1", p1, hcm("l1", routes=route_config("", "A"))),
                listener("l3", busy, hcm("l3", routes=route_config("", "D"))),
            ],
        )
        await wait_until(
            lambda: stat(server, "listener_manager.lds.update_rejected") == 1, what="rejection"
        )
    finally:
        blocker.close()
    assert (await get(p1, "/dr"))[2] == b"A"
    assert stat(server, "listener_manager.lds.version") == xxhash64(b"v1")
    assert stat(server, "listener_manager.listener_create_failure") == 1
    ld = dump_section(server, "ListenersConfigDump")
    assert ld["version_info"] == "v1"
    by_name = {d["name"]: d for d in ld["dynamic_listeners"]}
    assert "active_state" in by_name["l1"]
    err = by_name["l3"]["error_state"]
    assert err["details"] == f"cannot bind '127.0.0.1:{busy}': Address already in use"
    assert err["failed_configuration"]["name"] == "l3"


async def test_cds_update_keeps_host_objects_and_health(
    tmp_path: Path, running: list[Server]
) -> None:
    cds = tmp_path / "cds.yaml"
    write_response(
        cds, "c1", CLUSTER_TYPE, [static_cluster("a", [9001, 9002]), static_cluster("b", [9003])]
    )
    server = await start_server(bootstrap(tmp_path, lds=False))
    running.append(server)
    cm = server.cluster_manager
    assert cm is not None
    old = cm.get("a")
    assert old is not None
    h1 = next(h for h in old.hosts if h.address[1] == 9001)
    h1.health_flags |= FAILED_ACTIVE_HC
    old.refresh_health()
    write_response(
        cds, "c2", CLUSTER_TYPE, [static_cluster("a", [9001, 9004], connect_timeout="2s")]
    )
    await wait_until(lambda: stat(server, "cluster_manager.cds.update_success") == 2, what="c2")
    new = cm.get("a")
    assert new is not None and new is not old and new.info.connect_timeout == 2.0
    kept = next(h for h in new.hosts if h.address[1] == 9001)
    assert kept is h1 and kept.health_flags & FAILED_ACTIVE_HC and kept.cluster is new.info
    assert {h.address[1] for h in new.hosts} == {9001, 9004}
    assert cm.get("b") is None
    assert stat(server, "cluster_manager.cluster_modified") == 1
    assert stat(server, "cluster_manager.cluster_removed") == 1
    assert stat(server, "cluster_manager.active_clusters") == 1
    # A bad cluster is rejected; the others of the same response still apply.
    bad = static_cluster("c", [9005])
    bad["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["address"] = "foo.bar"
    write_response(
        cds,
        "c3",
        CLUSTER_TYPE,
        [static_cluster("a", [9001, 9004], connect_timeout="2s"), static_cluster("d", [9006]), bad],
    )
    await wait_until(
        lambda: stat(server, "cluster_manager.cds.update_rejected") == 1, what="rejection"
    )
    assert cm.get("d") is not None and cm.get("c") is None
    assert cm.get("a") is new  # unchanged: not rebuilt
    assert dump_section(server, "ClustersConfigDump")["version_info"] == "c2"


async def test_eds_updates_keep_hosts(tmp_path: Path, running: list[Server]) -> None:
    eds = tmp_path / "eds.yaml"
    write_response(eds, "e1", CLA_TYPE, [cla("backend", [9101, 9102])])
    config = bootstrap(tmp_path, lds=False, cds=False, clusters=[eds_cluster("backend", str(eds))])
    server = await start_server(config)
    running.append(server)
    cm = server.cluster_manager
    assert cm is not None
    cluster = cm.get("backend")
    assert cluster is not None
    first = {h.address[1]: h for h in cluster.hosts}
    assert set(first) == {9101, 9102}
    write_response(eds, "e2", CLA_TYPE, [cla("backend", [9102, 9103], {9103: "UNHEALTHY"})])
    await wait_until(lambda: stat(server, "cluster.backend.update_success") == 2, what="e2")
    now = {h.address[1]: h for h in cluster.hosts}
    assert now[9102] is first[9102]
    assert now[9103].health_flags & FAILED_EDS_HEALTH
    assert stat(server, "cluster.backend.membership_total") == 2
    assert stat(server, "cluster.backend.membership_healthy") == 1
    # Envoy's checks: one resource, for this cluster.
    write_response(eds, "e3", CLA_TYPE, [cla("other", [9200])])
    await wait_until(
        lambda: stat(server, "cluster.backend.update_rejected") == 1, what="wrong name"
    )
    write_response(eds, "e4", CLA_TYPE, [])
    await wait_until(lambda: stat(server, "cluster.backend.update_empty") == 1, what="empty")
    assert {h.address[1] for h in cluster.hosts} == {9102, 9103}
    assert stat(server, "cluster.backend.version") == xxhash64(b"e4")


async def test_watched_directory_symlink_swap(tmp_path: Path, running: list[Server]) -> None:
    """A Kubernetes ConfigMap volume: rds.yaml -> ..data/rds.yaml, ..data -> ..v1; an update
    writes ..v2 and renames a new ..data symlink over the old one."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "..v1").mkdir()
    write_response(
        cfg / "..v1" / "rds.yaml", "r1", ROUTE_TYPE, [route_config("local_route", "one")]
    )
    os.symlink("..v1", cfg / "..data")
    os.symlink("..data/rds.yaml", cfg / "rds.yaml")
    src = rds_source(str(cfg / "rds.yaml"), watched_directory=str(cfg))
    config = bootstrap(
        tmp_path, lds=False, cds=False, listeners=[listener("l1", 0, hcm("h", rds=src))]
    )
    server = await start_server(config)
    running.append(server)
    port = bound_port(server, "l1")
    assert (await get(port, "/dr"))[2] == b"one"
    (cfg / "..v2").mkdir()
    write_response(
        cfg / "..v2" / "rds.yaml", "r2", ROUTE_TYPE, [route_config("local_route", "two")]
    )
    os.symlink("..v2", cfg / "..data_tmp")
    os.replace(cfg / "..data_tmp", cfg / "..data")
    await wait_until(
        lambda: stat(server, "http.h.rds.local_route.update_success") == 2, timeout=2, what="swap"
    )
    assert (await get(port, "/dr"))[2] == b"two"


async def test_listener_waits_for_its_route_config(
    tmp_path: Path, running: list[Server], monkeypatch: Any
) -> None:
    """Warming: a new LDS listener whose RDS has not answered yet does not serve; it goes
    active when the route config arrives (filesystem RDS answers at once, so the first
    read is held back here)."""
    from pyenvoy.config.xds import FilesystemSubscription

    rds = tmp_path / "rds.yaml"
    lds = tmp_path / "lds.yaml"
    write_response(rds, "r1", ROUTE_TYPE, [route_config("local_route", "warm")])
    write_response(lds, "v1", LISTENER_TYPE, [])
    server = await start_server(bootstrap(tmp_path, cds=False))
    running.append(server)
    held: list[FilesystemSubscription] = []
    real_start = FilesystemSubscription.start

    def held_start(self: FilesystemSubscription) -> None:
        if self.type_url.endswith("RouteConfiguration"):
            self._watch_file()
            held.append(self)
        else:
            real_start(self)

    monkeypatch.setattr(FilesystemSubscription, "start", held_start)
    port = free_port()
    write_response(
        lds, "v2", LISTENER_TYPE, [listener("lw", port, hcm("w", rds=rds_source(str(rds))))]
    )
    await wait_until(lambda: bool(held), what="RDS subscription")
    lm = server.listener_manager
    assert lm is not None
    await wait_until(lambda: "lw" in lm.warming, what="warming")
    assert stat(server, "listener_manager.total_listeners_warming") == 1
    assert lm.get("lw") is None
    ld = dump_section(server, "ListenersConfigDump")
    assert "warming_state" in ld["dynamic_listeners"][0]
    held[0].refresh()  # the route config arrives
    await wait_until(lambda: lm.get("lw") is not None, what="active")
    assert (await get(port, "/dr"))[2] == b"warm"
    assert stat(server, "listener_manager.total_listeners_warming") == 0


@pytest.mark.parametrize(
    ("source", "text"),
    [
        (
            {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3"}},
            "dynamic_resources.lds_config.api_config_source: api_config_source (GRPC) xDS is not supported by pyenvoy yet",
        ),
        ({"ads": {}}, "dynamic_resources.lds_config.ads: ads xDS is not supported"),
    ],
)
def test_non_filesystem_xds_is_a_config_error(
    tmp_path: Path, source: dict[str, Any], text: str
) -> None:
    config = {"node": NODE, "dynamic_resources": {"lds_config": source}}
    with pytest.raises(ConfigError) as e:
        Server(load_bootstrap(data=config))
    assert text in str(e.value)


def test_subscription_needs_node_and_an_existing_file(tmp_path: Path) -> None:
    write_response(tmp_path / "cds.yaml", "c1", CLUSTER_TYPE, [])
    with pytest.raises(ConfigError, match="node 'id' and 'cluster' are required"):
        Server(load_bootstrap(data=bootstrap(tmp_path, lds=False, node=None)))
    with pytest.raises(
        ConfigError,
        match="paths must refer to an existing path in the system: '.*lds.yaml' does not exist",
    ):
        Server(load_bootstrap(data=bootstrap(tmp_path, cds=False)))


async def test_legacy_path_and_json_files(tmp_path: Path, running: list[Server]) -> None:
    """``lds_config: {path: ...}`` (the deprecated string form) and a .json response file."""
    lds = tmp_path / "lds.json"
    write_response(
        lds, "j1", LISTENER_TYPE, [listener("l1", 0, hcm("j", routes=route_config("", "json")))]
    )
    config = {"node": NODE, "dynamic_resources": {"lds_config": {"path": str(lds)}}}
    server = await start_server(config)
    running.append(server)
    assert (await get(bound_port(server, "l1"), "/dr"))[2] == b"json"
    write_response(
        lds, "j2", LISTENER_TYPE, [listener("l1", 0, hcm("j", routes=route_config("", "json2")))]
    )
    await wait_until(lambda: stat(server, "listener_manager.lds.update_success") == 2, what="j2")
    assert (await get(bound_port(server, "l1"), "/dr"))[2] == b"json2"


# ---- worker processes: the main process reads, workers apply what it pushes ---------------


async def test_main_process_publishes_reads_and_a_worker_applies_them(tmp_path: Path) -> None:
    from pyenvoy.config.xds import (
        XDS_FILE_OP,
        FilePublisher,
        SubscriptionStats,
        XdsManager,
        decode_file,
    )
    from pyenvoy.stats import Store

    path = tmp_path / "rds.yaml"
    write_response(path, "r1", ROUTE_TYPE, [route_config("local_route", "one")])
    source = load_bootstrap(
        None, json.dumps({"dynamic_resources": {"cds_config": {"path": str(path)}}})
    ).dynamic_resources.cds_config

    class FakeServer:
        node = None
        options = ServerOptions(concurrency=2)

    # The main process: records what it reads, publishes new reads once per loop turn.
    main = XdsManager(FakeServer())
    assert main.record
    sent: list[dict[str, Any]] = []
    publisher = FilePublisher(main, sent.append)
    main_applied: list[str] = []
    main_stats = SubscriptionStats(Store().scope("main"))
    msub = main.subscribe(source, ROUTE_TYPE, lambda r, v: main_applied.append(v), main_stats, "x")
    msub.start()
    main.watcher.start()
    assert main_applied == ["r1"] and len(main.watcher.watches) == 1
    files, generation = publisher.snapshot()
    assert [f["op"] for f in files] == [XDS_FILE_OP] and sent == [files[0]]

    # A worker starts from that snapshot: no watch, the same parse/apply step.
    worker = XdsManager(None, remote_files={f["path"]: decode_file(f) for f in files})
    assert not worker.record
    applied: list[tuple[str, str]] = []
    stats = SubscriptionStats(Store().scope("w"))

    def apply(resources: list[Any], version: str) -> None:
        if (
            resources[0].message.virtual_hosts[0].routes[0].direct_response.body.inline_string
            == "bad"
        ):
            raise ConfigError("bad route")
        applied.append((version, resources[0].name))

    wsub = worker.subscribe(source, ROUTE_TYPE, apply, stats, "x")
    wsub.start()
    worker.watcher.start()
    assert applied == [("r1", "local_route")] and worker.watcher.watches == []
    assert stats.update_success.value == 1 and stats.version_text.value == "r1"

    # The file changes: the main process's watch reads it and the worker applies the push.
    write_atomic(
        path,
        json.dumps(
            {
                "version_info": "r2",
                "resources": [{"@type": ROUTE_TYPE, **route_config("local_route", "bad")}],
            }
        ),
    )
    main.watcher.check_now()
    publisher.flush()
    assert main_applied[-1] == "r2" and publisher.since(generation) == [sent[-1]]
    for msg in sent[1:]:
        worker.push(msg)
    assert applied == [("r1", "local_route")]  # rejected there as here
    assert stats.update_rejected.value == 1 and stats.update_attempt.value == 2
    # An unreadable file is forwarded as such: update_failure in the worker.
    worker.push(
        {
            "op": XDS_FILE_OP,
            "path": str(path),
            "type_url": ROUTE_TYPE,
            "data": None,
            "error": "unable to read file: gone",
        }
    )
    assert stats.update_failure.value == 1

    # A file the worker was not sent yet is pending: no stats, not initialized.
    other = tmp_path / "later.yaml"
    src2 = load_bootstrap(
        None, json.dumps({"dynamic_resources": {"cds_config": {"path": str(other)}}})
    ).dynamic_resources.cds_config
    stats2 = SubscriptionStats(Store().scope("w2"))
    later = worker.subscribe(src2, ROUTE_TYPE, apply, stats2, "x")
    later.start()
    assert not later.initialized and stats2.update_attempt.value == 0
    write_response(other, "l1", ROUTE_TYPE, [route_config("local_route", "ok")])
    main._load_quietly(str(other), ROUTE_TYPE, False)
    publisher.flush()
    worker.push(sent[-1])
    assert later.initialized and applied[-1] == ("l1", "local_route")
    main.stop()
    worker.stop()
    publisher.close()
