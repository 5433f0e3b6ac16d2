"""/config_dump: Envoy's ConfigDump, built from the real ``envoy.admin.v3`` messages.

Strategy: each dump (bootstrap, clusters, [endpoints], listeners, scoped routes, routes,
secrets) is a real admin proto whose resources are packed into ``Any``; the result goes
through ``proto_json`` so ``@type`` URLs, field names and field order match Envoy.
It always shows what is serving: static resources, and what xDS (LDS/CDS/RDS/EDS files)
added, with each subscription's last accepted ``version_info`` and ``last_updated``;
listeners also show their warming, draining and error (rejected update) states.
``?resource=`` flattens one repeated field of the dumps, ``?mask=`` trims with a field
mask, ``?name_regex=`` keeps resources whose name matches, ``?include_eds`` adds an
EndpointsConfigDump built from the live hosts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from pyenvoy.admin import proto_json

_ConfigDump = config_dump_pb2.ConfigDump
_Bootstrap = config_dump_pb2.BootstrapConfigDump
_Clusters = config_dump_shared_pb2.ClustersConfigDump
_Listeners = config_dump_shared_pb2.ListenersConfigDump
_Routes = config_dump_shared_pb2.RoutesConfigDump
_ScopedRoutes = config_dump_shared_pb2.ScopedRoutesConfigDump
_Endpoints = config_dump_shared_pb2.EndpointsConfigDump
_Secrets = config_dump_pb2.SecretsConfigDump


class ConfigDumpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    """Millisecond precision, as Envoy's ``last_updated``."""
    ms = int(t * 1000)
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _updated(obj: Any, default: float) -> float:
    t = getattr(obj, "last_updated", None)
    return float(t) if isinstance(t, (int, float)) else default


def _bootstrap_dump(server: Any) -> Message:
    dump = _Bootstrap()
    bootstrap = getattr(server, "bootstrap", None)
    if bootstrap is not None:
        dump.bootstrap.CopyFrom(bootstrap)
        node = getattr(server, "node", None)
        if node is not None and node is not bootstrap.node:
            dump.bootstrap.node.CopyFrom(node)
    t = getattr(server, "bootstrap_loaded_at", None) or server.start_time
    dump.last_updated.CopyFrom(timestamp(t))
    return dump


def _clusters(server: Any) -> list[Any]:
    cm = getattr(server, "cluster_manager", None)
    if cm is None:
        return []
    clusters = list(getattr(cm, "clusters", {}).values())
    clusters.sort(key=lambda c: c.info.name)
    return clusters


def _clusters_dump(server: Any) -> Message:
    dump = _Clusters()
    cm = getattr(server, "cluster_manager", None)
    if getattr(cm, "cds", None) is not None:
        dump.version_info = getattr(cm, "version_info", "") or ""
    for cluster in _clusters(server):
        info = cluster.info
        proto = getattr(info, "proto", None)
        if proto is None:
            continue
        updated = timestamp(_updated(info, server.start_time))
        if getattr(info, "added_via_api", False):
            entry = dump.dynamic_active_clusters.add()
            entry.version_info = getattr(info, "version_info", "") or ""
            entry.cluster.Pack(proto)
            entry.last_updated.CopyFrom(updated)
        else:
            static = dump.static_clusters.add()
            static.cluster.Pack(proto)
            static.last_updated.CopyFrom(updated)
    warming = getattr(cm, "warming", None) or {}
    for name in sorted(warming):
        info = warming[name].info
        if not getattr(info, "added_via_api", False):
            continue
        entry = dump.dynamic_warming_clusters.add()
        entry.version_info = getattr(info, "version_info", "") or ""
        entry.cluster.Pack(info.proto)
        entry.last_updated.CopyFrom(timestamp(_updated(info, server.start_time)))
    return dump


def _host_locality(host: Any) -> tuple[str, str, str]:
    loc = getattr(host, "locality", None)
    if loc is None:
        return ("", "", "")
    if hasattr(loc, "region"):
        return (loc.region, loc.zone, loc.sub_zone)
    parts = tuple(loc) + ("", "", "")
    return (parts[0], parts[1], parts[2])


def host_health_flags(host: Any) -> set[str]:
    text = host.health_flags_text() if hasattr(host, "health_flags_text") else "healthy"
    if text == "healthy":
        return set()
    return {t for t in text.split("/") if t}


def _load_assignment(cluster: Any) -> Message:
    info = cluster.info
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=info.name)
    groups: dict[tuple[int, tuple[str, str, str]], Any] = {}
    for host in getattr(cluster, "hosts", []) or []:
        key = (int(getattr(host, "priority", 0) or 0), _host_locality(host))
        group = groups.get(key)
        if group is None:
            group = cla.endpoints.add()
            region, zone, sub_zone = key[1]
            group.locality.SetInParent()
            group.locality.region = region
            group.locality.zone = zone
            group.locality.sub_zone = sub_zone
            group.load_balancing_weight.value = 0
            group.priority = key[0]
            groups[key] = group
        lb = group.lb_endpoints.add()
        sa = lb.endpoint.address.socket_address
        sa.address = host.address[0]
        sa.port_value = int(host.address[1])
        lb.endpoint.health_check_config.SetInParent()
        hostname = getattr(host, "hostname", "") or ""
        if hostname:
            lb.endpoint.hostname = hostname
        flags = host_health_flags(host)
        if not flags:
            lb.health_status = health_check_pb2.HEALTHY
        elif flags == {"degraded_active_hc"}:
            lb.health_status = health_check_pb2.DEGRADED
        else:
            lb.health_status = health_check_pb2.UNHEALTHY
        lb.load_balancing_weight.value = int(getattr(host, "weight", 1) or 1)
    factor = 140
    proto = getattr(info, "proto", None)
    if proto is not None and proto.load_assignment.policy.HasField("overprovisioning_factor"):
        factor = proto.load_assignment.policy.overprovisioning_factor.value
    cla.policy.overprovisioning_factor.value = factor
    return cla


def _endpoints_dump(server: Any) -> Message:
    dump = _Endpoints()
    for cluster in _clusters(server):
        if getattr(cluster.info, "added_via_api", False):  # CDS clusters, as Envoy
            dyn = dump.dynamic_endpoint_configs.add()
            dyn.endpoint_config.Pack(_load_assignment(cluster))
        else:
            entry = dump.static_endpoint_configs.add()
            entry.endpoint_config.Pack(_load_assignment(cluster))
    return dump


def _listener_state(state: Any, listener: Any, default_time: float) -> None:
    state.version_info = getattr(listener, "version_info", "") or ""
    state.listener.Pack(listener.proto)
    state.last_updated.CopyFrom(timestamp(_updated(listener, default_time)))


def _listeners_dump(server: Any) -> Message:
    dump = _Listeners()
    lm = getattr(server, "listener_manager", None)
    if lm is None:
        return dump
    if getattr(lm, "lds", None) is not None:
        dump.version_info = getattr(lm, "version_info", "") or ""
    dynamic: dict[str, Any] = {}

    def entry(name: str) -> Any:
        d = dynamic.get(name)
        if d is None:
            d = dynamic[name] = config_dump_shared_pb2.ListenersConfigDump.DynamicListener(
                name=name
            )
        return d

    for listener in getattr(lm, "listeners", []):
        proto = getattr(listener, "proto", None)
        if proto is None:
            continue
        if getattr(listener, "added_via_api", False):
            _listener_state(entry(listener.name).active_state, listener, server.start_time)
        else:
            static = dump.static_listeners.add()
            static.listener.Pack(proto)
            static.last_updated.CopyFrom(timestamp(_updated(listener, server.start_time)))
    for listener in (getattr(lm, "warming", None) or {}).values():
        if getattr(listener, "added_via_api", False):
            _listener_state(entry(listener.name).warming_state, listener, server.start_time)
    for listener in getattr(lm, "draining", None) or []:
        if getattr(listener, "added_via_api", False):
            _listener_state(entry(listener.name).draining_state, listener, server.start_time)
    for name, (proto, when, details) in (getattr(lm, "error_states", None) or {}).items():
        err = entry(name).error_state
        err.failed_configuration.Pack(proto)
        err.last_update_attempt.CopyFrom(timestamp(when))
        err.details = details
    for name in sorted(dynamic):
        dump.dynamic_listeners.add().CopyFrom(dynamic[name])
    return dump


def _routes_dump(server: Any) -> Message:
    dump = _Routes()
    fn = getattr(server, "route_configs", None)
    configs = fn() if callable(fn) else []
    for rc in configs:
        entry = dump.static_route_configs.add()
        entry.route_config.Pack(rc)
        entry.last_updated.CopyFrom(timestamp(_updated(rc, server.start_time)))
    fn = getattr(server, "dynamic_route_configs", None)
    for version_info, rc, updated in fn() if callable(fn) else []:
        dyn = dump.dynamic_route_configs.add()
        dyn.version_info = version_info
        dyn.route_config.Pack(rc)
        dyn.last_updated.CopyFrom(timestamp(updated))
    return dump


def build_dumps(server: Any, include_eds: bool = False) -> list[Message]:
    """The dumps in Envoy's order."""
    dumps = [_bootstrap_dump(server), _clusters_dump(server)]
    if include_eds:
        dumps.append(_endpoints_dump(server))
    dumps += [_listeners_dump(server), _ScopedRoutes(), _routes_dump(server), _Secrets()]
    return dumps


def _element_name(elem: Message) -> str:
    for field, value in elem.ListFields():
        if field.name == "name" and isinstance(value, str):
            return value
    for field, value in elem.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.full_name == "google.protobuf.Any":
            desc = proto_json._find_descriptor(value.type_url)
            if desc is None:
                continue
            from google.protobuf import message_factory

            inner = message_factory.GetMessageClass(desc)()
            value.Unpack(inner)
            for key in ("name", "cluster_name"):
                if key in desc.fields_by_name:
                    return str(getattr(inner, key))
        elif field.name.endswith("_state"):  # DynamicListener.active_state ...
            name = _element_name(value)
            if name:
                return name
    return ""


def _first(query: Mapping[str, Sequence[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def render(server: Any, query: Mapping[str, Sequence[str]]) -> str:
    """The /config_dump body (raises ConfigDumpError with Envoy's status and text)."""
    include_eds = "include_eds" in query
    resource = _first(query, "resource")
    mask = _first(query, "mask")
    name_regex = _first(query, "name_regex")
    name_re = re.compile(name_regex) if name_regex else None
    dumps = build_dumps(server, include_eds)
    paths = [p for p in mask.split(",") if p] if mask else []
    tree = proto_json.mask_tree(paths) if paths else None
    out = _ConfigDump()

    if resource:
        found = False
        elements: list[Message] = []
        for dump in dumps:
            field = dump.DESCRIPTOR.fields_by_name.get(resource)
            if field is None or field.message_type is None:
                continue
            if not proto_json._is_repeated(field):
                continue
            found = True
            elements.extend(getattr(dump, resource))
        if not found:
            raise ConfigDumpError(404, f"{resource} not found in config dump")
        for elem in elements:
            if name_re is not None and not name_re.fullmatch(_element_name(elem)):
                continue
            if tree is not None:
                if not proto_json.mask_valid(elem.DESCRIPTOR, tree):
                    debug = "".join(f'paths: "{p}"\n' for p in paths)
                    raise ConfigDumpError(
                        400,
                        f"FieldMask goo.gle/debugonly  \n{debug} could not be successfully used.",
                    )
                proto_json.trim_message(elem, tree)
            out.configs.add().Pack(elem)
        return proto_json.message_to_json(out)

    applied = False
    for dump in dumps:
        if name_re is not None:
            for field, value in list(dump.ListFields()):
                if proto_json._is_repeated(field) and field.message_type is not None:
                    keep = [e for e in value if name_re.fullmatch(_element_name(e))]
                    dump.ClearField(field.name)
                    getattr(dump, field.name).extend(keep)
        if tree is not None:
            if not proto_json.mask_valid(dump.DESCRIPTOR, tree):
                continue
            proto_json.trim_message(dump, tree)
            applied = True
        out.configs.add().Pack(dump)
    if tree is not None and not applied:
        raise ConfigDumpError(
            400, f"FieldMask {','.join(paths)} could not be successfully applied to any configs."
        )
    return proto_json.message_to_json(out)
