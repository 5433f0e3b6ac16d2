"""Config loading and PGV validation: seed configs, Envoy-worded errors with field paths.

Where ``envoy`` is installed, the fixture files are also run through real Envoy's
``--mode validate`` to check that both accept / reject the same files.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster

from pyenvoy.config import ConfigError, load_bootstrap, loader, parse_message, unpack_any
from pyenvoy.config.validate import validate_message

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
ENVOY = shutil.which("envoy")
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="envoy is not on PATH")

SEED_OK = [
    "01-static-logical-dns.yaml",
    "02-health-checked-cluster.yaml",
    "04-api-routes-v3.yaml",
    "05-dynamic-ads.yaml",
    "06-lua-context-injection.yaml",
]

HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"

# file -> (field path of the error, text the message must contain)
BROKEN = {
    "03-api-routes-v2-fields.yaml": (
        f"{HCM_PATH}.route_config.virtual_hosts[0].routes[2]",
        "no such field: 'per_filter_config'",
    ),
    "bad-duration.yaml": (
        "static_resources.clusters[0].connect_timeout",
        "invalid duration '0.25x': duration must end with a single 's'",
    ),
    "bad-enum.yaml": (
        "static_resources.clusters[0].lb_policy",
        "unknown enum value: 'ROUND_ROBINX'",
    ),
    "unknown-field.yaml": ("static_resources.clusters[0]", "no such field: 'bogus_field'"),
    "unknown-type.yaml": (
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config",
        "could not find @type 'type.googleapis.com/foo.Bar'",
    ),
    "wrong-type.yaml": (
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]"
        ".endpoint.address.socket_address.port_value",
        "invalid uint32 number: 'abc'",
    ),
    "missing-cluster-name.yaml": (
        "static_resources.clusters[0].name",
        "Proto constraint validation failed (ClusterValidationError.Name: "
        "value length must be at least 1 characters)",
    ),
    "port-out-of-range.yaml": (
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]"
        ".endpoint.address.socket_address.port_value",
        "(SocketAddressValidationError.PortValue: value must be less than or equal to 65535)",
    ),
    "tcp-proxy-no-cluster.yaml": (
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config",
        'Proto constraint validation failed (field: "cluster_specifier", reason: is required)',
    ),
    "health-check-no-timeout.yaml": (
        "static_resources.clusters[0].health_checks[0].timeout",
        "(HealthCheckValidationError.Timeout: value is required)",
    ),
    "yaml-syntax.yaml": ("", "yaml error at line 5, column 1"),
    "empty.yaml": ("", "Unable to convert YAML as JSON"),
}


def _load_error(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bootstrap(**kwargs)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------------------------
# Seed configs


@pytest.mark.parametrize("name", SEED_OK)
def test_seed_configs_load(name: str) -> None:
    bootstrap = load_bootstrap(str(FIXTURES / name))
    assert isinstance(bootstrap, Bootstrap)
    assert bootstrap.static_resources.clusters


def test_seed_01_content() -> None:
    b = load_bootstrap(str(FIXTURES / "01-static-logical-dns.yaml"))
    cluster = b.static_resources.clusters[0]
    assert cluster.name == "some_service"
    assert cluster.type == Cluster.LOGICAL_DNS
    assert (cluster.connect_timeout.seconds, cluster.connect_timeout.nanos) == (0, 250_000_000)
    assert cluster.dns_lookup_family == Cluster.V4_ONLY
    lb = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (lb.address, lb.port_value) == ("127.0.0.1", 8000)
    listener = b.static_resources.listeners[0]
    assert listener.address.socket_address.port_value == 8080
    hcm = unpack_any(listener.filter_chains[0].filters[0].typed_config, "typed_config")
    assert type(hcm).DESCRIPTOR.full_name == (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    )
    assert hcm.stat_prefix == "ingress_http"  # type: ignore[attr-defined]
    route = hcm.route_config.virtual_hosts[0].routes[0]  # type: ignore[attr-defined]
    assert route.match.prefix == "/" and route.route.cluster == "some_service"
    router = unpack_any(hcm.http_filters[0].typed_config)  # type: ignore[attr-defined]
    assert type(router).DESCRIPTOR.full_name == "envoy.extensions.filters.http.router.v3.Router"
    assert b.admin.address.socket_address.port_value == 9901


def test_seed_02_health_checks() -> None:
    b = load_bootstrap(str(FIXTURES / "02-health-checked-cluster.yaml"))
    cluster = b.static_resources.clusters[0]
    hc = cluster.health_checks[0]
    assert hc.timeout.seconds == 1 and hc.interval.seconds == 5
    assert hc.unhealthy_threshold.value == 3 and hc.healthy_threshold.value == 1
    assert hc.HasField("tcp_health_check")  # `tcp_health_check: {}` must count as set
    ports = [
        e.endpoint.address.socket_address.port_value
        for e in cluster.load_assignment.endpoints[0].lb_endpoints
    ]
    assert ports == [9000, 9001]


def test_seed_04_header_gated_route() -> None:
    b = load_bootstrap(str(FIXTURES / "04-api-routes-v3.yaml"))
    hcm = unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config)
    routes = hcm.route_config.virtual_hosts[0].routes  # type: ignore[attr-defined]
    header = routes[2].match.headers[0]
    assert (header.name, header.string_match.exact) == ("x-internal-user", "true")
    assert [r.route.cluster for r in routes] == [
        "users_service_cluster",
        "products_service_cluster",
        "admin_service_cluster",
    ]


def test_seed_05_typed_extension_protocol_options() -> None:
    b = load_bootstrap(str(FIXTURES / "05-dynamic-ads.yaml"))
    assert b.node.id == "sidecar-1"
    assert b.dynamic_resources.cds_config.api_config_source.grpc_services[
        0
    ].envoy_grpc.cluster_name == ("xds_cluster")
    options = b.static_resources.clusters[0].typed_extension_protocol_options
    opts = unpack_any(options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"])
    assert opts.explicit_http_config.HasField("http2_protocol_options")  # type: ignore[attr-defined]


def test_seed_06_lua_inline_code() -> None:
    b = load_bootstrap(str(FIXTURES / "06-lua-context-injection.yaml"))
    hcm = unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config)
    lua = unpack_any(hcm.http_filters[0].typed_config)  # type: ignore[attr-defined]
    assert "json.decode(body)" in lua.inline_code  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Rejections: every error names the field path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_configs_name_the_field(name: str) -> None:
    path, text = BROKEN[name]
    err = _load_error(path=str(FIXTURES / name))
    assert err.path == path
    assert text in err.message
    assert "\n" not in str(err)


def test_03_error_reads_like_envoy() -> None:
    err = _load_error(path=str(FIXTURES / "03-api-routes-v2-fields.yaml"))
    assert str(err) == (
        f"{HCM_PATH}.route_config.virtual_hosts[0].routes[2]: no such field: "
        "'per_filter_config' (message envoy.config.route.v3.Route) (line 26)"
    )


def test_errors_carry_yaml_line_numbers() -> None:
    assert _load_error(path=str(FIXTURES / "bad-duration.yaml")).message.endswith("(line 5)")
    assert _load_error(path=str(FIXTURES / "unknown-field.yaml")).message.endswith("(line 6)")
    # A missing field points at the mapping that lacks it.
    assert _load_error(path=str(FIXTURES / "missing-cluster-name.yaml")).message.endswith(
        "(line 4)"
    )


def test_missing_file_and_no_config() -> None:
    assert _load_error(path="/nonexistent/x.yaml").message == "Invalid path: /nonexistent/x.yaml"
    assert "At least one of --config-path or --config-yaml" in _load_error().message


def test_json_file_and_json_errors(tmp_path: Path) -> None:
    b = load_bootstrap(str(FIXTURES / "static-cluster.json"))
    assert b.static_resources.clusters[0].type == Cluster.STATIC
    bad = tmp_path / "bad.json"
    bad.write_text('{"static_resources": {')
    assert "invalid JSON at line 1" in _load_error(path=str(bad)).message
    # Like Envoy, a file that is not named .yaml/.yml is read as JSON.
    yaml_as_txt = tmp_path / "cfg.txt"
    yaml_as_txt.write_text("static_resources: {}\n")
    assert "read as JSON" in _load_error(path=str(yaml_as_txt)).message


def test_text_proto_file(tmp_path: Path) -> None:
    f = tmp_path / "b.pb_text"
    f.write_text('static_resources { clusters { name: "c1" connect_timeout { seconds: 1 } } }')
    assert load_bootstrap(str(f)).static_resources.clusters[0].name == "c1"


def test_top_level_must_be_a_mapping() -> None:
    err = _load_error(yaml_text="[1, 2]")
    assert "must be a mapping" in err.message


@pytest.mark.parametrize(
    ("yaml_text", "path", "text"),
    [
        (
            "static_resources: {clusters: [{name: 123}]}",
            "static_resources.clusters[0].name",
            "expected a string, got number 123",
        ),
        (
            "static_resources: {clusters: [{name: c, connect_timeout: 1}]}",
            "static_resources.clusters[0].connect_timeout",
            "expected a duration string",
        ),
        (
            "static_resources: {clusters: [{name: c, connect_timeout: -1s}]}",
            "static_resources.clusters[0].connect_timeout",
            "Expected positive duration",
        ),
        (
            "static_resources: {clusters: {name: c}}",
            "static_resources.clusters",
            "expected a list, got a mapping",
        ),
        (
            "static_resources: {clusters: [{name: c, type: 42.5}]}",
            "static_resources.clusters[0].type",
            "expected a value name of enum",
        ),
        (
            "stats_flush_interval: 1s\nstats_flush_interval: {}",
            "stats_flush_interval",
            "expected a duration string",
        ),
        (
            "node: {user_agent_version: v, user_agent_build_version: {version: {major_number: 1}}}",
            "node.user_agent_build_version",
            "has already been set",
        ),
        (
            "static_resources: {clusters: [{<<: {name: c}}]}",
            "static_resources.clusters[0]",
            "no such field: '<<'",
        ),
    ],
)
def test_type_errors(yaml_text: str, path: str, text: str) -> None:
    err = _load_error(yaml_text=yaml_text)
    assert err.path == path
    assert text in err.message


def test_unknown_fields_can_be_allowed(caplog: pytest.LogCaptureFixture) -> None:
    text = "static_resources: {clusters: [{name: c1, connect_timeout: 1s, bogus: 1}]}"
    with caplog.at_level(logging.WARNING, logger="pyenvoy.config"):
        b = load_bootstrap(yaml_text=text, allow_unknown_fields=True)
    assert b.static_resources.clusters[0].name == "c1"
    assert "ignoring unknown field 'bogus'" in caplog.text


# --------------------------------------------------------------------------------------------
# Merging, data, parse_message and the JSON mapping


def test_config_yaml_merges_over_file() -> None:
    b = load_bootstrap(
        str(FIXTURES / "02-health-checked-cluster.yaml"),
        yaml_text="admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\n"
        "static_resources: {clusters: [{name: extra, connect_timeout: 2s}]}",
    )
    assert [c.name for c in b.static_resources.clusters] == ["service_cluster", "extra"]
    assert b.admin.address.socket_address.address == "127.0.0.1"
    assert b.static_resources.listeners[0].name == "listener_0"


def test_config_yaml_alone_and_dict() -> None:
    b = load_bootstrap(yaml_text="node: {id: a}")
    assert b.node.id == "a"
    b = load_bootstrap(data={"node": {"id": "b", "cluster": "c"}})
    assert (b.node.id, b.node.cluster) == ("b", "c")


def test_json_mapping_of_well_known_types() -> None:
    data = {
        "name": "c",
        "connectTimeout": "1.5s",  # json_name accepted too
        "per_connection_buffer_limit_bytes": 1024,  # UInt32Value from a bare number
        "metadata": {"filter_metadata": {"envoy.lb": {"n": 1, "l": [True, None, "x"]}}},
        "lb_policy": 2,  # enum by number
        "dns_lookup_family": None,  # null leaves the default
        "max_requests_per_connection": "7",  # numbers may be strings
    }
    c = parse_message(data, Cluster)
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (1, 500_000_000)
    assert c.per_connection_buffer_limit_bytes.value == 1024
    lb = c.metadata.filter_metadata["envoy.lb"]
    assert lb["n"] == 1 and list(lb["l"]) == [True, None, "x"]
    assert c.lb_policy == 2
    assert c.max_requests_per_connection.value == 7


def test_yaml_scalars_are_typed_like_envoy() -> None:
    data = loader.load_yaml("a: {n: 1, y: yes, t: 2001-12-14, s: 1:20, e: 1e3, q: '12'}")
    # keys keep their text; no timestamps, no sexagesimal numbers; YAML 1.2 floats
    assert data == {
        "a": {"n": 1, "y": True, "t": "2001-12-14", "s": "1:20", "e": 1000.0, "q": "12"}
    }


def test_unpack_any_errors_and_typed_struct() -> None:
    from google.protobuf.any_pb2 import Any as AnyPb

    with pytest.raises(ConfigError) as info:
        unpack_any(AnyPb(type_url="type.googleapis.com/no.such.Type"), "x.typed_config")
    assert info.value.path == "x.typed_config"
    assert "could not find @type" in info.value.message

    b = load_bootstrap(
        yaml_text="""
static_resources:
  clusters:
  - name: c
    typed_extension_protocol_options:
      lua:
        "@type": type.googleapis.com/xds.type.v3.TypedStruct
        type_url: type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
        value: {name: foo}
"""
    )
    per_route = unpack_any(b.static_resources.clusters[0].typed_extension_protocol_options["lua"])
    assert (
        type(per_route).DESCRIPTOR.full_name == "envoy.extensions.filters.http.lua.v3.LuaPerRoute"
    )
    assert per_route.name == "foo"  # type: ignore[attr-defined]

    err = _load_error(
        yaml_text="""
static_resources:
  clusters:
  - name: c
    typed_extension_protocol_options:
      lua:
        "@type": type.googleapis.com/xds.type.v3.TypedStruct
        type_url: type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
        value: {bogus: 1}
"""
    )
    assert err.path == 'static_resources.clusters[0].typed_extension_protocol_options["lua"].value'
    assert "no such field: 'bogus'" in err.message


def test_type_resolution_imports_package_on_demand() -> None:
    cls = loader.message_class("envoy.extensions.filters.http.buffer.v3.Buffer")
    assert cls is not None and cls.DESCRIPTOR.full_name.endswith("Buffer")
    assert loader.message_class("envoy.no.such.v3.Thing") is None


def test_full_type_index() -> None:
    index = loader._build_full_index()
    assert index["envoy.config.cluster.v3.Cluster"] == "envoy.config.cluster.v3.cluster_pb2"
    assert index["envoy.config.route.v3.RouteAction.HashPolicy"] == (
        "envoy.config.route.v3.route_components_pb2"
    )
    assert loader.index_stats()["full_index_types"] > 1000


# --------------------------------------------------------------------------------------------
# PGV rules


@pytest.mark.parametrize(
    ("yaml_text", "path", "reason"),
    [
        (
            "static_resources: {clusters: [{name: c, connect_timeout: 1s, lb_policy: 99}]}",
            "static_resources.clusters[0].lb_policy",
            "ClusterValidationError.LbPolicy: value must be one of the defined enum values",
        ),
        (
            "static_resources: {clusters: [{name: c, connect_timeout: 1s, dns_refresh_rate: 0.0001s}]}",
            "static_resources.clusters[0].dns_refresh_rate",
            "ClusterValidationError.DnsRefreshRate: value must be greater than 1ms",
        ),
        (
            "static_resources: {clusters: [{name: c, connect_timeout: 1s, health_checks: "
            "[{timeout: 1s, interval: 1s, unhealthy_threshold: 1, tcp_health_check: {}}]}]}",
            "static_resources.clusters[0].health_checks[0].healthy_threshold",
            "HealthCheckValidationError.HealthyThreshold: value is required",
        ),
        (
            "static_resources: {clusters: [{name: c, connect_timeout: 1s, health_checks: "
            "[{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1}]}]}",
            "static_resources.clusters[0].health_checks[0]",
            'field: "health_checker", reason: is required',
        ),
    ],
)
def test_pgv_rules(yaml_text: str, path: str, reason: str) -> None:
    err = _load_error(yaml_text=yaml_text)
    assert err.path == path
    assert err.message.startswith(f"Proto constraint validation failed ({reason})")


def test_pgv_inside_typed_config_and_repeated_items() -> None:
    hcm = """
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config:
            response_headers_to_remove: ["ok", "bad\\nname"]
            virtual_hosts: [{name: v, domains: []}]
          http_filters: [{name: r, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
"""
    # Fields are checked in declaration order: virtual_hosts comes first.
    err = _load_error(yaml_text=hcm)
    assert err.path == f"{HCM_PATH}.route_config.virtual_hosts[0].domains"
    assert (
        "VirtualHostValidationError.Domains: value must contain at least 1 item(s)" in err.message
    )
    err = _load_error(yaml_text=hcm.replace("domains: []", 'domains: ["*"]'))
    assert err.path == f"{HCM_PATH}.route_config.response_headers_to_remove[1]"
    assert (
        "RouteConfigurationValidationError.ResponseHeadersToRemove[1]: value does not match "
        'regex pattern "^[^\\x00\\n\\r]*$"'
    ) in err.message


def test_validate_message_directly() -> None:
    c = Cluster(name="")
    with pytest.raises(ConfigError) as info:
        validate_message(c, "clusters[3]")
    assert info.value.path == "clusters[3].name"
    validate_message(Cluster(name="ok"))


def test_disallowed_deprecated_field_is_rejected() -> None:
    from envoy.config.route.v3.route_components_pb2 import RateLimit

    action = RateLimit.Action()
    action.dynamic_metadata.descriptor_key = "k"
    action.dynamic_metadata.metadata_key.key = "a"
    action.dynamic_metadata.metadata_key.path.add().key = "b"
    with pytest.raises(ConfigError) as info:
        validate_message(action)
    assert info.value.path == "dynamic_metadata"
    assert info.value.message.startswith(
        "type envoy.config.route.v3.RateLimit.Action Using deprecated option "
        "'envoy.config.route.v3.RateLimit.Action.dynamic_metadata' from file route_components.proto."
    )


def test_deprecated_field_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    from pyenvoy.config import validate as validate_mod

    validate_mod._warned_deprecated.discard("envoy.config.bootstrap.v3.Admin.access_log_path")
    with caplog.at_level(logging.WARNING, logger="pyenvoy.misc"):
        load_bootstrap(str(FIXTURES / "01-static-logical-dns.yaml"))
        load_bootstrap(str(FIXTURES / "01-static-logical-dns.yaml"))
    hits = [r for r in caplog.records if "Admin.access_log_path" in r.getMessage()]
    assert len(hits) == 1
    assert (
        hits[0]
        .getMessage()
        .startswith(
            "Deprecated field: type envoy.config.bootstrap.v3.Admin Using deprecated option "
            "'envoy.config.bootstrap.v3.Admin.access_log_path' from file bootstrap.proto."
        )
    )


# --------------------------------------------------------------------------------------------
# Real Envoy agrees on which fixtures are valid


def _envoy_accepts(path: Path) -> bool:
    assert ENVOY is not None
    proc = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "off"],
        capture_output=True,
        timeout=60,
    )
    return proc.returncode == 0


@needs_envoy
@pytest.mark.parametrize(
    "name", sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".yaml", ".json"))
)
def test_envoy_agrees(name: str) -> None:
    try:
        load_bootstrap(str(FIXTURES / name))
        ours = True
    except ConfigError:
        ours = False
    assert _envoy_accepts(FIXTURES / name) == ours
