"""The admin endpoint over real loopback HTTP, against a small fake server object.

Texts, status codes and headers are Envoy 1.40's (the live-envoy tests at the end compare
/help and /config_dump with a real envoy when one is installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import types
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import envoy.extensions.access_loggers.file.v3.file_pb2  # noqa: F401  (Any types in the YAML)
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2  # noqa: F401
import httpx
import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from pyenvoy.admin import AdminServer
from pyenvoy.admin.handlers import ENDPOINTS, help_text
from pyenvoy.stats import Counter, Gauge, Store

CONFIG = """
node: {id: node1, cluster: mycluster}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: listener_0
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            name: local_route
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: svc.backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: tcp.l1
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp.stats
          cluster: svc.backend
  clusters:
  - name: svc.backend
    connect_timeout: 1s
    type: STATIC
    circuit_breakers:
      thresholds:
      - {max_connections: 7, max_retries: 2}
      - {priority: HIGH, max_requests: 9}
    load_assignment:
      cluster_name: svc.backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {socket_address: {address: 127.0.0.1, port_value: 9}}
"""


def parse_bootstrap(text: str) -> bootstrap_pb2.Bootstrap:
    b = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(text), b)
    return b


# ---- a fake server with the interface AdminServer codes to ---------------------------


class FakeHostStats:
    def __init__(self) -> None:
        for n in (
            "cx_total",
            "cx_connect_fail",
            "rq_total",
            "rq_error",
            "rq_success",
            "rq_timeout",
        ):
            setattr(self, n, Counter(n))
        for n in ("cx_active", "rq_active"):
            setattr(self, n, Gauge(n))


class FakeHost:
    def __init__(self, address: tuple[str, int], **kw: Any) -> None:
        self.address = address
        self.hostname = kw.get("hostname", "")
        self.weight = kw.get("weight", 1)
        self.priority = kw.get("priority", 0)
        self.flags = kw.get("flags", "healthy")
        self.stats = FakeHostStats()

    def health_flags_text(self) -> str:
        return self.flags


@dataclass
class FakeOptions:
    concurrency: int = 1
    config_path: str = "envoy.yaml"
    log_level: str = "warning"
    disable_hot_restart: bool = True
    drain_time_s: int = 600
    mode: str = "serve"
    stats_tags: list[str] = field(default_factory=list)


class FakeServer:
    def __init__(self, bootstrap: bootstrap_pb2.Bootstrap) -> None:
        self.bootstrap = bootstrap
        self.node = bootstrap.node
        self.stats = Store()
        self.start_time = time.time() - 7
        self.state = "LIVE"
        self.options = FakeOptions()
        self.version = "9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL"
        self.healthcheck_failed = False
        self.shutdowns = 0
        self.refreshes = 0
        clusters = {}
        for c in bootstrap.static_resources.clusters:
            info = types.SimpleNamespace(
                name=c.name,
                proto=c,
                added_via_api=False,
                observability_name=c.alt_stat_name or c.name,
                circuit_breakers=[("default", 7, 1024, 1024, 2), ("high", 1024, 1024, 9, 3)],
            )
            hosts = [
                FakeHost(("127.0.0.1", 9), hostname="host-a", weight=3),
                FakeHost(("::1", 8080), priority=1, flags="/failed_active_hc"),
            ]
            hosts[0].stats.cx_total.value = 6
            hosts[0].stats.rq_success.value = 5
            hosts[0].stats.cx_active.value = 1
            clusters[c.name] = types.SimpleNamespace(info=info, hosts=hosts)
        self.cluster_manager = types.SimpleNamespace(clusters=clusters)
        self.listener_manager = types.SimpleNamespace(
            listeners=[
                types.SimpleNamespace(
                    name=lp.name, proto=lp, local_address=("127.0.0.1", 10000 + i)
                )
                for i, lp in enumerate(bootstrap.static_resources.listeners)
            ]
        )
        self.stats.counter_from_name("cluster.svc.backend.upstream_rq_total").value = 5
        self.stats.counter_from_name("http.ingress_http.downstream_rq_2xx").value = 3
        self.stats.gauge_from_name("server.uptime")
        self.stats.histogram_from_name("cluster.svc.backend.upstream_rq_time").record(3)

    def refresh_server_stats(self) -> None:
        self.refreshes += 1
        self.stats.gauge_from_name("server.uptime").set(int(time.time() - self.start_time))

    def shutdown(self) -> None:
        self.shutdowns += 1

    def route_configs(self) -> list[Any]:
        out = []
        for lp in self.bootstrap.static_resources.listeners:
            for chain in lp.filter_chains:
                for f in chain.filters:
                    if f.typed_config.type_url.endswith("HttpConnectionManager"):
                        hcm = hcm_pb2.HttpConnectionManager()
                        f.typed_config.Unpack(hcm)
                        out.append(hcm.route_config)
        return out


@pytest.fixture
async def admin(tmp_path):
    server = FakeServer(parse_bootstrap(CONFIG))
    a = AdminServer(server, ("127.0.0.1", 0), str(tmp_path / "admin_access.log"))
    host, port = await a.start()
    client = httpx.AsyncClient(base_url=f"http://{host}:{port}")
    try:
        yield types.SimpleNamespace(server=server, admin=a, client=client, port=port, tmp=tmp_path)
    finally:
        await client.aclose()
        await a.stop()


ENVOY_HEADERS = {
    "content-type": "text/plain; charset=UTF-8",
    "cache-control": "no-cache, max-age=0",
    "x-content-type-options": "nosniff",
    "server": "envoy",
    "transfer-encoding": "chunked",
}


# ---- state endpoints -------------------------------------------------------------------


async def test_ready_and_healthcheck(admin) -> None:
    c = admin.client
    r = await c.get("/ready")
    assert (r.status_code, r.text) == (200, "LIVE\n")
    for k, v in ENVOY_HEADERS.items():
        assert r.headers[k] == v
    assert "date" in r.headers

    r = await c.get("/healthcheck/fail")
    assert (r.status_code, r.text) == (405, "Method GET not allowed, POST required.")
    assert admin.server.healthcheck_failed is False
    r = await c.post("/healthcheck/fail")
    assert (r.status_code, r.text) == (200, "OK\n")
    r = await c.get("/ready")
    assert (r.status_code, r.text) == (503, "DRAINING\n")
    r = await c.post("/healthcheck/ok")
    assert (r.status_code, r.text) == (200, "OK\n")
    admin.server.state = "INITIALIZING"
    r = await c.get("/ready")
    assert (r.status_code, r.text) == (503, "INITIALIZING\n")


async def test_help_and_unknown_path(admin) -> None:
    r = await admin.client.get("/help")
    assert r.status_code == 200
    assert r.text.startswith(
        "admin commands are:\n  /: Admin home page\n"
        "  /allocprofiler (POST): enable/disable the allocation profiler (if supported)\n"
        "      enable: enable/disable the allocation profiler; One of (y, n)\n"
    )
    assert "  /quitquitquit (POST): exit the server\n" in r.text
    r = await admin.client.get("/nope")
    assert r.status_code == 404
    assert r.text == "invalid path. admin commands are:\n" + help_text()
    r = await admin.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=UTF-8"
    assert "<a href='server_info'>server_info</a>" in r.text


async def test_mutating_endpoints_need_post(admin) -> None:
    for ep in ENDPOINTS:
        if ep.mutates:
            r = await admin.client.get(ep.path)
            assert (r.status_code, r.text) == (405, "Method GET not allowed, POST required."), (
                ep.path
            )
    r = await admin.client.put("/reset_counters")
    assert r.text == "Method PUT not allowed, POST required."
    assert admin.server.shutdowns == 0


async def test_quitquitquit_and_reset_counters(admin) -> None:
    c = admin.client
    r = await c.post("/reset_counters")
    assert (r.status_code, r.text) == (200, "OK\n")
    counter = admin.server.stats.counters["cluster.svc.backend.upstream_rq_total"]
    assert counter.value == 0 and counter.used
    r = await c.get("/stats?usedonly&filter=upstream_rq_total")
    assert r.text == "cluster.svc.backend.upstream_rq_total: 0\n"
    r = await c.post("/quitquitquit")
    assert (r.status_code, r.text) == (200, "OK\n")
    assert admin.server.shutdowns == 1


# ---- stats -------------------------------------------------------------------------------


async def test_stats_endpoints(admin) -> None:
    c = admin.client
    r = await c.get("/stats?filter=^cluster|uptime")
    assert r.status_code == 200 and admin.server.refreshes == 1
    lines = r.text.splitlines()
    assert lines[:2] == ["cluster.svc.backend.upstream_rq_total: 5", "server.uptime: 7"]
    assert lines[2].startswith("cluster.svc.backend.upstream_rq_time: P0(nan,")
    r = await c.get("/stats?format=json&filter=upstream_rq_total")
    assert r.headers["content-type"] == "application/json"
    assert r.text == '{"stats":[{"name":"cluster.svc.backend.upstream_rq_total","value":5}]}'
    r = await c.get("/stats/prometheus?filter=ingress_http.downstream_rq_2xx")
    assert r.headers["content-type"] == "text/plain; charset=UTF-8"
    assert r.text == (
        "# TYPE envoy_http_downstream_rq_xx counter\n"
        'envoy_http_downstream_rq_xx{envoy_response_code_class="2",'
        'envoy_http_conn_manager_prefix="ingress_http"} 3\n'
    )
    r2 = await c.get("/stats?format=prometheus&filter=ingress_http.downstream_rq_2xx")
    assert r2.text == r.text
    r = await c.get("/stats?filter=(")
    assert (r.status_code, r.text) == (400, "Invalid re2 regex: missing ): (")
    r = await c.get("/stats?type=Bogus")
    assert (r.status_code, r.text) == (400, "invalid &type= param")
    r = await c.get("/stats/prometheus?histogram_buckets=disjoint")
    assert (r.status_code, r.text) == (400, "unsupported prometheus histogram bucket mode")


async def test_admin_counts_its_own_requests(admin) -> None:
    c = admin.client
    await c.get("/ready")
    await c.get("/nope")
    r = await c.get("/stats?filter=^http.admin.downstream_rq_(2|4)xx")
    assert r.text == "http.admin.downstream_rq_2xx: 1\nhttp.admin.downstream_rq_4xx: 1\n"


# ---- clusters and listeners ------------------------------------------------------------


async def test_clusters_text(admin) -> None:
    r = await admin.client.get("/clusters")
    assert r.status_code == 200
    p = "svc.backend::127.0.0.1:9::"
    q = "svc.backend::[::1]:8080::"
    expected = (
        "svc.backend::observability_name::svc.backend\n"
        "svc.backend::default_priority::max_connections::7\n"
        "svc.backend::default_priority::max_pending_requests::1024\n"
        "svc.backend::default_priority::max_requests::1024\n"
        "svc.backend::default_priority::max_retries::2\n"
        "svc.backend::high_priority::max_connections::1024\n"
        "svc.backend::high_priority::max_pending_requests::1024\n"
        "svc.backend::high_priority::max_requests::9\n"
        "svc.backend::high_priority::max_retries::3\n"
        "svc.backend::added_via_api::false\n"
        f"{p}cx_active::1\n{p}cx_connect_fail::0\n{p}cx_total::6\n{p}rq_active::0\n"
        f"{p}rq_error::0\n{p}rq_pending_active::0\n{p}rq_success::5\n{p}rq_timeout::0\n"
        f"{p}rq_total::0\n{p}hostname::host-a\n{p}health_flags::healthy\n{p}weight::3\n"
        f"{p}region::\n{p}zone::\n{p}sub_zone::\n{p}canary::false\n{p}priority::0\n"
        f"{p}success_rate::-1\n{p}local_origin_success_rate::-1\n"
    )
    assert r.text.startswith(expected)
    assert f"{q}health_flags::/failed_active_hc\n{q}weight::1\n" in r.text
    assert f"{q}priority::1\n" in r.text
    r = await admin.client.get("/clusters?filter=nomatch")
    assert r.text == ""


async def test_clusters_json(admin) -> None:
    r = await admin.client.get("/clusters?format=json")
    assert r.headers["content-type"] == "application/json"
    assert r.text.startswith('{\n "cluster_statuses": [\n  {\n   "name": "svc.backend",\n')
    d = r.json()["cluster_statuses"][0]
    h0, h1 = d["host_statuses"]
    assert h0["stats"][:2] == [{"name": "cx_connect_fail"}, {"value": "6", "name": "cx_total"}]
    assert {"type": "GAUGE", "value": "1", "name": "cx_active"} in h0["stats"]
    assert h0["health_status"] == {"eds_health_status": "HEALTHY"}
    assert (h0["weight"], h0["hostname"], h0["locality"]) == (3, "host-a", {})
    assert h1["health_status"] == {
        "failed_active_health_check": True,
        "eds_health_status": "HEALTHY",
    }
    assert h1["priority"] == 1
    assert d["circuit_breakers"]["thresholds"][1] == {
        "priority": "HIGH",
        "max_connections": 1024,
        "max_pending_requests": 1024,
        "max_requests": 9,
        "max_retries": 3,
    }
    assert list(d)[-1] == "observability_name"


async def test_listeners(admin) -> None:
    r = await admin.client.get("/listeners")
    assert r.text == "listener_0::127.0.0.1:10000\ntcp.l1::127.0.0.1:10001\n"
    r = await admin.client.get("/listeners?format=json")
    assert r.text.startswith(
        '{\n "listener_statuses": [\n  {\n   "name": "listener_0",\n   "local_address": {\n'
        '    "socket_address": {\n     "address": "127.0.0.1",\n     "port_value": 10000\n'
    )


# ---- server_info, config_dump -------------------------------------------------------------


async def test_server_info(admin) -> None:
    r = await admin.client.get("/server_info")
    assert r.headers["content-type"] == "application/json"
    d = r.json()
    assert list(d) == [
        "version",
        "state",
        "uptime_current_epoch",
        "uptime_all_epochs",
        "hot_restart_version",
        "command_line_options",
        "node",
        "hot_restart_initializing",
    ]
    assert d["state"] == "LIVE" and d["uptime_current_epoch"] == "7s"
    assert d["hot_restart_version"] == "disabled"
    clo = d["command_line_options"]
    assert list(clo)[:4] == ["base_id", "concurrency", "config_path", "config_yaml"]
    assert clo["base_id"] == "0" and clo["concurrency"] == 1 and clo["drain_time"] == "600s"
    assert clo["mode"] == "Serve" and clo["log_level"] == "warning"
    assert clo["file_flush_interval"] == "10s" and clo["disabled_extensions"] == []
    assert list(clo)[-2:] == ["file_flush_min_size", "log_stacktrace_single_entry"]
    assert d["node"]["id"] == "node1"
    assert r.text.startswith('{\n "version": "9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/')


async def test_config_dump(admin) -> None:
    r = await admin.client.get("/config_dump")
    assert r.headers["content-type"] == "application/json" and r.text.endswith("}\n")
    configs = r.json()["configs"]
    assert [c["@type"].rsplit(".", 1)[-1] for c in configs] == [
        "BootstrapConfigDump",
        "ClustersConfigDump",
        "ListenersConfigDump",
        "ScopedRoutesConfigDump",
        "RoutesConfigDump",
        "SecretsConfigDump",
    ]
    assert configs[0]["bootstrap"]["node"] == {"id": "node1", "cluster": "mycluster"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", configs[0]["last_updated"])
    static = configs[1]["static_clusters"][0]["cluster"]
    assert list(static)[:4] == ["@type", "name", "type", "connect_timeout"]
    assert static["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    listeners = configs[2]["static_listeners"]
    assert [entry["listener"]["name"] for entry in listeners] == ["listener_0", "tcp.l1"]
    routes = configs[4]["static_route_configs"]
    assert routes[0]["route_config"]["name"] == "local_route"


async def test_config_dump_params(admin) -> None:
    c = admin.client
    r = await c.get("/config_dump?resource=static_clusters&mask=cluster.name")
    assert r.text == (
        '{\n "configs": [\n  {\n   "@type": "type.googleapis.com/envoy.admin.v3.'
        'ClustersConfigDump.StaticCluster",\n   "cluster": {\n    "@type": '
        '"type.googleapis.com/envoy.config.cluster.v3.Cluster",\n    "name": "svc.backend"\n'
        "   }\n  }\n ]\n}\n"
    )
    r = await c.get("/config_dump?resource=dynamic_listeners")
    assert (r.status_code, r.text) == (200, "{}\n")
    r = await c.get("/config_dump?resource=bogus")
    assert (r.status_code, r.text) == (404, "bogus not found in config dump")
    assert r.headers["content-type"] == "text/plain"
    r = await c.get("/config_dump?mask=bogus")
    assert (r.status_code, r.text) == (
        400,
        "FieldMask bogus could not be successfully applied to any configs.",
    )
    r = await c.get("/config_dump?mask=bootstrap.admin")
    configs = r.json()["configs"]
    assert len(configs) == 1 and list(configs[0]["bootstrap"]) == ["admin"]
    r = await c.get("/config_dump?resource=static_listeners&name_regex=tcp.*")
    assert [x["listener"]["name"] for x in r.json()["configs"]] == ["tcp.l1"]
    r = await c.get("/config_dump?include_eds&resource=static_endpoint_configs")
    cla = r.json()["configs"][0]["endpoint_config"]
    assert cla["cluster_name"] == "svc.backend" and cla["policy"] == {
        "overprovisioning_factor": 140
    }
    first = cla["endpoints"][0]
    assert first["lb_endpoints"][0]["endpoint"]["hostname"] == "host-a"
    assert first["lb_endpoints"][0]["load_balancing_weight"] == 3
    assert cla["endpoints"][1]["priority"] == 1
    assert cla["endpoints"][1]["lb_endpoints"][0]["health_status"] == "UNHEALTHY"


# ---- misc endpoints ----------------------------------------------------------------------


async def test_misc_endpoints(admin) -> None:
    c = admin.client
    r = await c.get("/memory")
    assert list(r.json()) == [
        "allocated",
        "heap_size",
        "pageheap_unmapped",
        "pageheap_free",
        "total_thread_cache",
        "total_physical_bytes",
    ]
    assert (await c.get("/certs")).text == '{\n "certificates": []\n}\n'
    assert (await c.get("/runtime")).text == '{\n "entries": {},\n "layers": []\n}\n'
    assert (await c.get("/hot_restart_version")).text == "disabled"
    r = await c.post("/runtime_modify?foo=bar")
    assert (r.status_code, r.text) == (503, "No admin layer specified")
    r = await c.get("/stats/recentlookups")
    assert r.text.startswith("Lookup tracking is not enabled. Use /stats/recentlookups/enable")


async def test_runtime_with_admin_layer(tmp_path) -> None:
    text = (
        CONFIG
        + """
layered_runtime:
  layers:
  - name: static
    static_layer: {a: {b: 1}, flag: true}
  - name: admin
    admin_layer: {}
"""
    )
    server = FakeServer(parse_bootstrap(text))
    a = AdminServer(server, ("127.0.0.1", 0))
    host, port = await a.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            r = await c.post("/runtime_modify?flag=false&x=1")
            assert (r.status_code, r.text) == (200, "OK\n")
            d = (await c.get("/runtime")).json()
            assert d["layers"] == ["static", "admin"]
            assert d["entries"]["flag"] == {
                "final_value": "false",
                "layer_values": ["true", "false"],
            }
            assert d["entries"]["a.b"] == {"final_value": "1", "layer_values": ["1", ""]}
            assert d["entries"]["x"]["final_value"] == "1"
    finally:
        await a.stop()


async def test_logging(admin) -> None:
    from pyenvoy.admin.handlers import _log_module

    mod = _log_module()
    saved = dict(mod.get_levels())
    try:
        r = await admin.client.post("/logging")
        assert r.status_code == 200 and r.text.startswith("active loggers:\n  ")
        assert r.text.endswith("\n\n")
        r = await admin.client.post("/logging?level=debug")
        assert r.status_code == 200
        assert all(line.endswith(": debug") for line in r.text.splitlines()[1:-1])
        name = next(iter(saved))
        r = await admin.client.post(f"/logging?{name}=error")
        assert f"  {name}: error\n" in r.text
        r = await admin.client.post("/logging?level=bogus")
        assert r.status_code == 400
        assert r.text.startswith(
            "error: unknown logger level\n\nusage: /logging?<name>=<level> (change single level)\n"
        )
        assert "levels: trace debug info warning error critical off \nactive loggers:\n" in r.text
        r = await admin.client.post("/logging?nosuchlogger=info")
        assert (r.status_code, r.text.split("\n")[0]) == (400, "error: unknown logger name")
    finally:
        for name, level in saved.items():
            mod.set_level(name, level)


# ---- HTTP details and the access log ---------------------------------------------------


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 2)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


async def test_keepalive_and_http10(admin) -> None:
    two = await _raw(
        admin.port,
        b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert two.count(b"HTTP/1.1 200 OK") == 2 and two.count(b"LIVE\n") == 2
    assert b"\r\nserver: envoy\r\ntransfer-encoding: chunked\r\n\r\n5\r\nLIVE\n\r\n0\r\n\r\n" in two
    old = await _raw(admin.port, b"GET /ready HTTP/1.0\r\n\r\n")
    assert old.startswith(
        b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\ncontent-type: text/plain\r\n"
    )
    assert old.endswith(b"\r\nserver: envoy\r\nconnection: close\r\n\r\nUpgrade Required")
    head = await _raw(admin.port, b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and not head.endswith(b"LIVE\n")


async def test_access_log(admin) -> None:
    await admin.client.get("/ready", headers={"x-forwarded-for": "1.2.3.4", "x-request-id": "abc"})
    await admin.client.post("/ready", content=b"hello")
    await admin.admin.stop()
    lines = (admin.tmp / "admin_access.log").read_text().splitlines()
    host = f"127.0.0.1:{admin.port}"
    ts = r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]"
    assert re.fullmatch(
        ts
        + rf' "GET /ready HTTP/1.1" 200 - 0 5 \d+ - "1.2.3.4,192.0.2.2" "python-httpx/[\d.]+" "abc" "{host}" "-"',
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        ts
        + rf' "POST /ready HTTP/1.1" 200 - 5 5 \d+ - "192.0.2.2" "python-httpx/[\d.]+" "-" "{host}" "-"',
        lines[1],
    ), lines[1]


# ---- against a live Envoy ------------------------------------------------------------


@pytest.fixture(scope="module")
def live_envoy(tmp_path_factory: pytest.TempPathFactory):
    exe = shutil.which("envoy")
    if exe is None:
        pytest.skip("envoy not installed")
    d = tmp_path_factory.mktemp("envoy")
    (d / "envoy.yaml").write_text(CONFIG)
    addr_file = d / "admin.addr"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base_id = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "-c", str(d / "envoy.yaml"), "--concurrency", "1", "--disable-hot-restart"]
        + ["--base-id", str(base_id), "-l", "error", "--admin-address-path", str(addr_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("envoy did not start")
            time.sleep(0.05)
        yield "http://" + addr_file.read_text().strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _envoy_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_help_matches_real_envoy(admin, live_envoy: str) -> None:
    status, theirs = await asyncio.to_thread(_envoy_get, live_envoy + "/help")
    mine = await admin.client.get("/help")
    assert (mine.status_code, mine.text) == (status, theirs)
    status, theirs = await asyncio.to_thread(_envoy_get, live_envoy + "/no/such/path")
    mine = await admin.client.get("/no/such/path")
    assert (mine.status_code, mine.text) == (status, theirs)


async def test_config_dump_matches_real_envoy(admin, live_envoy: str) -> None:
    _, theirs = await asyncio.to_thread(_envoy_get, live_envoy + "/config_dump")
    mine = (await admin.client.get("/config_dump")).text

    def normalize(text: str) -> Any:
        d = json.loads(text)
        for dump in d["configs"]:
            dump.pop("last_updated", None)
            dump.get("bootstrap", {}).pop("node", None)  # Envoy fills in its build and extensions
            for value in dump.values():
                if isinstance(value, list):
                    for entry in value:
                        entry.pop("last_updated", None)
        return d

    assert normalize(mine) == normalize(theirs)
    # Same key order as Envoy prints, too.
    assert [line for line in mine.splitlines() if "last_updated" not in line][-40:] == [
        line for line in theirs.splitlines() if "last_updated" not in line
    ][-40:]
    for path in (
        "/config_dump?resource=static_clusters&mask=cluster.name",
        "/config_dump?resource=bogus",
    ):
        status, body = await asyncio.to_thread(_envoy_get, live_envoy + path)
        r = await admin.client.get(path)
        assert (r.status_code, r.text) == (status, body), path


def test_command_line_options_match_real_envoy(tmp_path) -> None:
    exe = shutil.which("envoy")
    cli = pytest.importorskip("pyenvoy.cli")
    if exe is None or not hasattr(cli, "parse_options"):
        pytest.skip("envoy or pyenvoy.cli.parse_options missing")
    from pyenvoy.admin.handlers import command_line_options_dict

    (tmp_path / "envoy.yaml").write_text(CONFIG)
    addr_file = tmp_path / "admin.addr"
    args = ["-c", str(tmp_path / "envoy.yaml"), "--concurrency", "1", "--disable-hot-restart"]
    args += ["--admin-address-path", str(addr_file), "-l", "error", "--drain-time-s", "30"]
    args += [
        "--service-cluster",
        "sc",
        "--stats-tag",
        "foo:bar",
        "--component-log-level",
        "upstream:debug",
    ]
    proc = subprocess.Popen(
        [exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("envoy did not start")
            time.sleep(0.05)
        _, body = _envoy_get("http://" + addr_file.read_text().strip() + "/server_info")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    theirs = json.loads(body)["command_line_options"]
    mine = command_line_options_dict(cli.parse_options(args))
    assert json.dumps(mine) == json.dumps(theirs)


async def test_query_keeps_plus_signs(admin) -> None:
    # Envoy percent-decodes but does not turn "+" into a space: filters are regexes.
    r = await admin.client.get("/stats?filter=ingress_http.downstream_rq_2x+")
    assert r.text == "http.ingress_http.downstream_rq_2xx: 3\n"
    r = await admin.client.get("/stats?filter=ingress_http%2Edownstream_rq_2xx")
    assert r.text == "http.ingress_http.downstream_rq_2xx: 3\n"
