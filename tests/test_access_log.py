"""Access logs (file, with Envoy's default format and custom formats) for HTTP and TCP."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import httpx

import pyenvoy
from pyenvoy.access_log import flush_all
from tests.support.upstream import HttpUpstream, TcpEchoUpstream

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def listener(name: str, flt: dict) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [flt]}],
    }


def file_log(path: Path, fmt: str | None = None) -> dict:
    cfg: dict = {"@type": FILE_LOG, "path": str(path)}
    if fmt is not None:
        cfg["log_format"] = {"text_format_source": {"inline_string": fmt}}
    return {"name": "envoy.access_loggers.file", "typed_config": cfg}


async def test_http_access_log_default_and_custom_format(tmp_path: Path) -> None:
    default_log = tmp_path / "default.log"
    custom_log = tmp_path / "custom.log"
    with HttpUpstream() as up:
        hcm = {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": "web",
                "access_log": [
                    file_log(default_log),
                    file_log(
                        custom_log,
                        "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n",
                    ),
                ],
                "route_config": {
                    "virtual_hosts": [
                        {
                            "name": "v",
                            "domains": ["*"],
                            "routes": [
                                {"match": {"prefix": "/up"}, "route": {"cluster": "up"}},
                            ],
                        }
                    ]
                },
                "http_filters": [
                    {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                ],
            },
        }
        config = {
            "static_resources": {
                "listeners": [listener("web", hcm)],
                "clusters": [cluster("up", up.port)],
            }
        }
        async with pyenvoy.Proxy(config) as proxy:
            async with httpx.AsyncClient() as c:
                r1 = await c.get(
                    f"http://127.0.0.1:{proxy.port()}/up/echo", headers={"user-agent": "ua-test"}
                )
                r2 = await c.get(f"http://127.0.0.1:{proxy.port()}/missing")
            assert (r1.status_code, r2.status_code) == (200, 404)
        flush_all()
    custom = custom_log.read_text().splitlines()
    assert custom == ["GET /up/echo 200 - up", "GET /missing 404 NR -"]
    lines = default_log.read_text().splitlines()
    assert len(lines) == 2
    # Envoy's default format: [time] "METHOD PATH PROTOCOL" code flags rx tx duration ...
    assert re.match(
        r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET /up/echo HTTP/1.1" 200 - 0 \d+ \d+ \d+ "-" "ua-test" "[0-9a-f-]{36}" "127.0.0.1:\d+" "127.0.0.1:\d+"$',
        lines[0],
    ), lines[0]
    assert '"GET /missing HTTP/1.1" 404 NR 0 0' in lines[1]


async def test_tcp_proxy_access_log(tmp_path: Path) -> None:
    log = tmp_path / "tcp.log"
    with TcpEchoUpstream() as echo:
        tcp = {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": TCP,
                "stat_prefix": "t",
                "cluster": "echo",
                "access_log": [file_log(log, "%UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT%\n")],
            },
        }
        config = {
            "static_resources": {
                "listeners": [listener("t", tcp)],
                "clusters": [cluster("echo", echo.port)],
            }
        }
        async with pyenvoy.Proxy(config) as proxy:
            loop = asyncio.get_running_loop()

            def talk() -> bytes:
                with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as s:
                    s.sendall(b"hello")
                    got = b""
                    while len(got) < 5:
                        got += s.recv(100)
                    return got

            assert await loop.run_in_executor(None, talk) == b"hello"
            for _ in range(100):
                if log.exists() or proxy.stats().get("tcp.t.downstream_cx_total") == 1:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
        flush_all()
    assert log.read_text() == "echo 5 5\n"
