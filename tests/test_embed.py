"""The embedding API: a proxy started inside the test's own event loop."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import pyenvoy
from pyenvoy.config import ConfigError
from tests.support.upstream import HttpUpstream


def config(upstream_port: int) -> dict:
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "front",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "svc"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "svc",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "svc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }


@pytest.fixture
def upstream():
    with HttpUpstream() as u:
        yield u


async def test_proxy_from_dict_reports_ports_and_stats(upstream: HttpUpstream) -> None:
    async with pyenvoy.Proxy(config(upstream.port)) as proxy:
        port = proxy.port("front")
        assert port > 0 and proxy.port() == port
        assert proxy.admin_port
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                r = await client.get(f"http://127.0.0.1:{port}/echo")
                assert r.status_code == 200
                assert r.headers["server"] == "envoy"
            ready = await client.get(f"http://127.0.0.1:{proxy.admin_port}/ready")
            assert ready.text == "LIVE\n"
        stats = proxy.stats()
        assert stats["cluster.svc.upstream_rq_2xx"] == 3
        assert stats["http.front.downstream_rq_total"] == 3
        assert stats["cluster.svc.upstream_cx_total"] == 1  # keep-alive reuse upstream
    assert upstream.request_count == 3


async def test_proxy_from_yaml_text_and_file(upstream: HttpUpstream, tmp_path: Path) -> None:
    import yaml

    text = yaml.safe_dump(config(upstream.port))
    async with pyenvoy.Proxy(text) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{proxy.port()}/echo")
            assert r.status_code == 200
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    async with pyenvoy.Proxy(path) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{proxy.port()}/nothing-routes-here-either")
            assert r.status_code == 200


async def test_bad_config_raises_config_error() -> None:
    bad = config(1)
    bad["static_resources"]["clusters"][0]["lb_policy"] = "NOT_A_POLICY"
    with pytest.raises(ConfigError) as e:
        pyenvoy.Proxy(bad)
    assert "lb_policy" in str(e.value)


async def test_port_in_use_is_a_config_error(upstream: HttpUpstream) -> None:
    cfg = config(upstream.port)
    addr = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    addr["port_value"] = upstream.port  # already bound by the upstream
    with pytest.raises(ConfigError, match="cannot bind"):
        await pyenvoy.Proxy(cfg).start()


async def test_ipv6_listener_and_several_listeners(upstream: HttpUpstream) -> None:
    cfg = config(upstream.port)
    listeners = cfg["static_resources"]["listeners"]
    v6 = {
        **listeners[0],
        "name": "front6",
        "address": {"socket_address": {"address": "::1", "port_value": 0}},
    }
    listeners.append(v6)
    async with pyenvoy.Proxy(cfg) as proxy:
        assert set(proxy.ports) == {"front", "front6"}
        async with httpx.AsyncClient() as client:
            r4 = await client.get(f"http://127.0.0.1:{proxy.port('front')}/echo")
            r6 = await client.get(f"http://[::1]:{proxy.port('front6')}/echo")
        assert r4.status_code == r6.status_code == 200
        # Like Envoy, the stat name comes from the configured address (port 0 here).
        stats = proxy.stats()
        assert stats["listener.[__1]_0.downstream_cx_total"] == 1
        assert stats["listener.127.0.0.1_0.downstream_cx_total"] == 1


async def test_clusters_shows_outlier_detection_figures(upstream: HttpUpstream) -> None:
    cfg = config(upstream.port)
    cfg["static_resources"]["clusters"][0]["outlier_detection"] = {"consecutive_5xx": 5}
    async with pyenvoy.Proxy(cfg) as proxy:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{proxy.admin_port}/clusters")).text
    lines = text.splitlines()
    i = lines.index("svc::observability_name::svc")
    # As Envoy 1.40 prints them: right after the name, -1 until there is data.
    assert lines[i + 1 : i + 5] == [
        "svc::outlier::success_rate_average::-1",
        "svc::outlier::success_rate_ejection_threshold::-1",
        "svc::outlier::local_origin_success_rate_average::-1",
        "svc::outlier::local_origin_success_rate_ejection_threshold::-1",
    ]
