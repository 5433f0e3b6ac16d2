"""Filesystem xDS against real Envoy and pyenvoy: the same files, the same renames, the same
answers, stats and /config_dump.

Each proxy gets its own directory of DiscoveryResponse files (templates xds_*.yaml); every
step replaces one file atomically (write + rename, as Envoy's docs require) and waits for
the subscription's counters to move. Both proxies run with ``--drain-time-s 2
--drain-strategy immediate`` so a drained keep-alive connection is observable at once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import load_config
from tests.support.procs import EnvoyProcess, PyEnvoyProcess, free_port, render_template
from tests.support.upstream import HttpUpstream

DRAIN_FLAGS = ["--drain-time-s", "2", "--drain-strategy", "immediate"]


class _Envoy(EnvoyProcess):
    def command(self) -> list[str]:
        return super().command() + DRAIN_FLAGS


class _PyEnvoy(PyEnvoyProcess):
    def command(self) -> list[str]:
        return super().command() + DRAIN_FLAGS


KINDS = {"envoy": _Envoy, "pyenvoy": _PyEnvoy}


def xxhash64(text: str) -> int:
    from pyenvoy.config.xds import xxhash64 as h

    return h(text.encode())


class Files:
    """The xDS files of one proxy, written from the templates."""

    def __init__(self, directory: str, upstream_port: int, listener_port: int) -> None:
        self.dir = directory
        self.values: dict[str, Any] = {
            "xds_dir": directory,
            "upstream_port": upstream_port,
            "listener_port": listener_port,
        }

    def render(self, template: str, **values: Any) -> str:
        text, _ = render_template(load_config(template), {**self.values, **values})
        return text

    def write(self, name: str, text: str) -> None:
        path = os.path.join(self.dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)

    def lds(self, version: str, extra: list[tuple[str, int, str]] = ()) -> None:  # type: ignore[assignment]
        text = self.render("xds_lds.yaml", version=version)
        for name, port, body in extra:
            text += self.render("xds_listener_inline.yaml", name=name, port=port, body=body)
        self.write("lds.yaml", text)

    def rds(self, version: str, body: str, route_name: str = "local_route") -> None:
        self.write(
            "rds.yaml",
            self.render("xds_rds.yaml", version=version, body=body, route_name=route_name),
        )

    def cds(self, version: str, timeout: str = "1s") -> None:
        self.write("cds.yaml", self.render("xds_cds.yaml", version=version, timeout=timeout))

    def eds(self, version: str, cluster_name: str = "backend") -> None:
        self.write(
            "eds.yaml", self.render("xds_eds.yaml", version=version, cluster_name=cluster_name)
        )


@pytest.fixture(scope="module")
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def xds(proxy_kind: str, upstream: HttpUpstream) -> Iterator[tuple[Any, Files]]:
    directory = tempfile.mkdtemp(prefix=f"xds-{proxy_kind}-")
    files = Files(directory, upstream.port, free_port())
    files.eds("e1")
    files.cds("c1")
    files.rds("r1", "r1")
    files.lds("v1")
    values = {**files.values, "upstream_port": upstream.port}
    proc = KINDS[proxy_kind](load_config("xds_bootstrap.yaml"), **values).start()
    try:
        yield proc, files
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


def http(port: int, path: str = "/dr") -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        return _request(s, path, b"")[0]


def _request(
    s: socket.socket, path: str, buf: bytes
) -> tuple[tuple[int, dict[str, str], bytes], bytes]:
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return (int(lines[0].split()[1]), headers, rest[:n]), rest[n:]


def wait_stat(proc: Any, name: str, value: int, timeout: float = 5.0) -> dict[str, Any]:
    stats = proc.wait_stat(name, value, timeout)
    assert stats.get(name) == value, f"{proc.kind}: {name}={stats.get(name)}, wanted {value}"
    return stats


def section(proc: Any, suffix: str, query: str = "") -> dict[str, Any]:
    _, _, body = proc.admin("/config_dump" + query)
    for c in json.loads(body)["configs"]:
        if c["@type"].endswith("." + suffix):
            return dict(c)
    raise AssertionError(suffix)


def test_boot_from_files(xds: tuple[Any, Files]) -> None:
    proc, files = xds
    port = files.values["listener_port"]
    assert http(port, "/dr")[2] == b"r1"
    status, _, body = http(port, "/echo")
    assert status == 200 and json.loads(body)["path"] == "/echo"
    stats = proc.stats()
    for prefix, version in (
        ("listener_manager.lds", "v1"),
        ("cluster_manager.cds", "c1"),
        ("http.main.rds.local_route", "r1"),
        ("cluster.backend", "e1"),
    ):
        assert stats[f"{prefix}.update_attempt"] == 1, prefix
        assert stats[f"{prefix}.update_success"] == 1, prefix
        assert stats[f"{prefix}.update_rejected"] == 0, prefix
        assert stats[f"{prefix}.update_failure"] == 0, prefix
        assert stats[f"{prefix}.version"] == xxhash64(version), prefix
    assert stats["listener_manager.listener_added"] == 1
    assert stats["cluster_manager.cluster_added"] == 2
    assert stats["cluster_manager.active_clusters"] == 2
    clusters = section(proc, "ClustersConfigDump")
    assert clusters["version_info"] == "c1"
    assert [c["cluster"]["name"] for c in clusters["dynamic_active_clusters"]] == [
        "backend",
        "extra",
    ]
    assert all(c["version_info"] == "c1" for c in clusters["dynamic_active_clusters"])
    listeners = section(proc, "ListenersConfigDump")
    assert listeners["version_info"] == "v1"
    (dl,) = listeners["dynamic_listeners"]
    assert dl["name"] == "main" and dl["active_state"]["version_info"] == "v1"
    (dr,) = section(proc, "RoutesConfigDump")["dynamic_route_configs"]
    assert dr["version_info"] == "r1" and dr["route_config"]["name"] == "local_route"
    # Every CDS cluster's endpoints are "dynamic" (EDS or not).
    eds = section(proc, "EndpointsConfigDump", "?include_eds")["dynamic_endpoint_configs"]
    assert [e["endpoint_config"]["cluster_name"] for e in eds] == ["backend", "extra"]
    eps = eds[0]["endpoint_config"]["endpoints"][0]["lb_endpoints"]
    assert (
        eps[0]["endpoint"]["address"]["socket_address"]["port_value"]
        == files.values["upstream_port"]
    )
    assert eps[0]["health_status"] == "HEALTHY"


def test_rds_updates(xds: tuple[Any, Files]) -> None:
    proc, files = xds
    port = files.values["listener_port"]
    prefix = "http.main.rds.local_route."
    t0 = time.monotonic()
    files.rds("r2", "r2")
    while http(port)[2] != b"r2":
        assert time.monotonic() - t0 < 2.0, f"{proc.kind}: RDS rename not applied"
        time.sleep(0.05)
    files.write("rds.yaml", 'version_info: "r3"\nresources: [\n')
    wait_stat(proc, prefix + "update_failure", 1)
    files.rds("r4", "r4", route_name="other")  # not the route config the HCM asks for
    stats = wait_stat(proc, prefix + "update_rejected", 1)
    assert stats[prefix + "update_success"] == 2
    assert stats[prefix + "update_attempt"] == 4
    assert stats[prefix + "version"] == xxhash64("r2")
    assert http(port)[2] == b"r2"
    (dr,) = section(proc, "RoutesConfigDump")["dynamic_route_configs"]
    assert dr["version_info"] == "r2"


def test_lds_add_reject_remove(xds: tuple[Any, Files]) -> None:
    proc, files = xds
    p2 = free_port()
    files.lds("v2", [("side", p2, "side")])
    wait_stat(proc, "listener_manager.lds.update_success", 2)
    assert http(p2)[2] == b"side"
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    try:
        files.lds("v3", [("side", p2, "side"), ("blocked", busy, "x")])
        stats = wait_stat(proc, "listener_manager.lds.update_rejected", 1)
    finally:
        blocker.close()
    assert stats["listener_manager.listener_create_failure"] == 1
    assert stats["listener_manager.lds.version"] == xxhash64("v2")
    listeners = section(proc, "ListenersConfigDump")
    assert listeners["version_info"] == "v2"
    errors = [d for d in listeners["dynamic_listeners"] if d.get("name") == "blocked"]
    assert (
        errors[0]["error_state"]["details"]
        == f"cannot bind '127.0.0.1:{busy}': Address already in use"
    )
    assert http(p2)[2] == b"side"
    files.lds("v4")
    stats = wait_stat(proc, "listener_manager.listener_removed", 1)
    assert stats["listener_manager.listener_added"] == 2
    with pytest.raises(OSError):
        http(p2)


def test_lds_modify_drains_open_connection(xds: tuple[Any, Files]) -> None:
    proc, files = xds
    p3 = free_port()
    files.lds("v5", [("mod", p3, "old")])
    wait_stat(proc, "listener_manager.lds.update_success", 4)
    with socket.create_connection(("127.0.0.1", p3), timeout=3) as s:
        (status, headers, body), buf = _request(s, "/dr", b"")
        assert (status, body) == (200, b"old")
        files.lds("v6", [("mod", p3, "new")])
        stats = wait_stat(proc, "listener_manager.lds.update_success", 5)
        assert stats["listener_manager.listener_modified"] == 1
        assert stats["listener_manager.listener_in_place_updated"] == 1
        assert http(p3)[2] == b"new"  # a new connection: the new filter chain
        (status, headers, body), buf = _request(s, "/dr", buf)  # the old one: old chain, closing
        assert (status, body, headers.get("connection")) == (200, b"old", "close")
        s.settimeout(3)
        assert s.recv(1) == b""


def test_cds_and_eds_updates(xds: tuple[Any, Files]) -> None:
    proc, files = xds
    port = files.values["listener_port"]
    files.cds("c2", timeout="2s")  # "extra" changes, "backend" does not
    stats = wait_stat(proc, "cluster_manager.cds.update_success", 2)
    assert stats["cluster_manager.cluster_modified"] == 1
    assert stats["cluster_manager.cds.version"] == xxhash64("c2")
    files.eds("e2", cluster_name="other")
    stats = wait_stat(proc, "cluster.backend.update_rejected", 1)
    assert stats["cluster.backend.version"] == xxhash64("e1")
    files.eds("e3")
    stats = wait_stat(proc, "cluster.backend.version", xxhash64("e3"))
    assert http(port, "/echo")[0] == 200
    # Drop "extra" from CDS: removed.
    only_backend = files.render("xds_cds.yaml", version="c3", timeout="2s").split("\n- ")[:2]
    files.write("cds.yaml", "\n- ".join(only_backend) + "\n")
    stats = wait_stat(proc, "cluster_manager.cluster_removed", 1)
    assert stats["cluster_manager.active_clusters"] == 1
    assert section(proc, "ClustersConfigDump")["version_info"] == "c3"
