"""Admin endpoints with Envoy's paths, texts, status codes and content types.

Strategy: one table (``ENDPOINTS``) drives dispatch, ``/help``, the 404 listing and the
home page, the way Envoy's ``Admin::UrlHandler`` list does. A handler is a plain
synchronous function of ``(AdminHandlers, Request) -> Response``: the admin endpoint is
not a hot path, so bodies are built whole. Mutating endpoints answer anything but POST
with Envoy's 405 ``Method GET not allowed, POST required.``.

The server object is duck-typed (see ``AdminServer``); optional attributes are looked up
with ``getattr`` so a partial server still gets the endpoints it can support.
"""

from __future__ import annotations

import html
import logging
import os
import re
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from envoy.admin.v3 import clusters_pb2, listeners_pb2, memory_pb2, server_info_pb2
from google.protobuf import duration_pb2, json_format

from pyenvoy.admin import config_dump, proto_json
from pyenvoy.stats import Counter, Gauge
from pyenvoy.stats_render import StatsParams, StatsParamsError, fmt_double
from pyenvoy.stream_info import format_address

if TYPE_CHECKING:
    from pyenvoy.admin.server import AdminServer

log = logging.getLogger("pyenvoy.admin")

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"


class Request:
    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(
        self,
        method: str,
        path: str,
        query: Mapping[str, Sequence[str]],
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers or {}
        self.body = body


class Response:
    __slots__ = ("status", "content_type", "body", "headers", "after")

    def __init__(
        self,
        status: int,
        body: str | bytes,
        content_type: str = TEXT,
        headers: list[tuple[str, str]] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers  # replaces the default header set when given
        self.after = after  # run once the response is written (e.g. /quitquitquit)


Handler = Callable[["AdminHandlers", Request], Response]


class Endpoint(NamedTuple):
    path: str
    help: str
    mutates: bool
    params: tuple[tuple[str, str], ...]
    handler: Handler


def _first(query: Mapping[str, Sequence[str]], key: str) -> str | None:
    v = query.get(key)
    return v[0] if v else None


def _effective_state(server: Any) -> str:
    state = getattr(server, "state", "LIVE")
    if state == "LIVE" and getattr(server, "healthcheck_failed", False):
        return "DRAINING"
    return state


# ---- /ready, /healthcheck, /reset_counters, /quitquitquit, /drain_listeners ------------


def h_ready(h: AdminHandlers, req: Request) -> Response:
    state = _effective_state(h.server)
    return Response(200 if state == "LIVE" else 503, f"{state}\n")


def h_healthcheck_fail(h: AdminHandlers, req: Request) -> Response:
    h.server.healthcheck_failed = True
    return Response(200, "OK\n")


def h_healthcheck_ok(h: AdminHandlers, req: Request) -> Response:
    h.server.healthcheck_failed = False
    return Response(200, "OK\n")


def h_reset_counters(h: AdminHandlers, req: Request) -> Response:
    store = h.server.stats
    for c in store.counters.values():
        if c.value:
            c.used = True  # a reset counter still counts as used (?usedonly)
    store.reset_counters()
    return Response(200, "OK\n")


def h_quitquitquit(h: AdminHandlers, req: Request) -> Response:
    return Response(200, "OK\n", after=h.server.shutdown)


def h_drain_listeners(h: AdminHandlers, req: Request) -> Response:
    server = h.server
    graceful = "graceful" in req.query
    inbound_only = "inboundonly" in req.query
    skip_exit = "skip_exit" in req.query
    drain = getattr(server, "drain_listeners", None)
    if callable(drain):
        drain(graceful=graceful, inbound_only=inbound_only, skip_exit=skip_exit)
    else:
        lm = getattr(server, "listener_manager", None)
        stop = getattr(lm, "stop_listening", None)
        if callable(stop) and not skip_exit:
            stop()
    return Response(200, "OK\n")


# ---- /stats ------------------------------------------------------------------------------


def _stats(h: AdminHandlers, req: Request, prometheus: bool) -> Response:
    query = req.query
    if not prometheus and _first(query, "format") == "prometheus":
        prometheus = True
    try:
        params = StatsParams.parse(query, prometheus=prometheus)
    except StatsParamsError as e:
        return Response(e.status, e.message)
    refresh = getattr(h.server, "refresh_server_stats", None)
    if callable(refresh):
        refresh()
    content_type, body = h.admin.stats_render.render(h.server.stats, params)
    return Response(200, body, content_type)


def h_stats(h: AdminHandlers, req: Request) -> Response:
    return _stats(h, req, prometheus=False)


def h_stats_prometheus(h: AdminHandlers, req: Request) -> Response:
    return _stats(h, req, prometheus=True)


def h_recent_lookups(h: AdminHandlers, req: Request) -> Response:
    store = h.server.stats
    total = len(store.counters) + len(store.gauges) + len(store.histograms)
    if not h.admin.recent_lookups:
        return Response(
            200,
            "Lookup tracking is not enabled. Use /stats/recentlookups/enable to enable.\n\n"
            f"total: {total}\n",
        )
    return Response(200, f"   Count Lookup\n\ntotal: {total}\n")


def h_recent_lookups_enable(h: AdminHandlers, req: Request) -> Response:
    h.admin.recent_lookups = True
    return Response(200, "OK\n")


def h_recent_lookups_disable(h: AdminHandlers, req: Request) -> Response:
    h.admin.recent_lookups = False
    return Response(200, "OK\n")


def h_recent_lookups_clear(h: AdminHandlers, req: Request) -> Response:
    return Response(200, "OK\n")


# ---- /server_info, /memory, /hot_restart_version -----------------------------------------

_LOG_FORMAT = "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"
# Envoy's defaults for CommandLineOptions fields the options object may not carry.
_OPTION_DEFAULTS: dict[str, Any] = {
    "base_id": 0,
    "concurrency": os.cpu_count() or 1,
    "local_address_ip_version": "v4",
    "log_level": "info",
    "log_format": _LOG_FORMAT,
    "file_flush_interval": 10.0,
    "drain_time": 600.0,
    "parent_shutdown_time": 900.0,
    "mode": "Serve",
    "drain_strategy": "Gradual",
    "socket_path": "@envoy_domain_socket",
}


# CommandLineOptions field -> ServerOptions attribute, where the names differ.
_OPTION_ALIASES = {"stats_tag": "stats_tags", "disabled_extensions": "disable_extensions"}
# Envoy 1.40 prints these as 0 whatever the flags say.
_OPTION_SKIP = {"socket_mode"}


def _option_value(options: Any, name: str, is_duration: bool) -> Any:
    if options is None or name in _OPTION_SKIP:
        return None
    if name in _OPTION_ALIASES:
        value = getattr(options, _OPTION_ALIASES[name], None)
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if value is not None:
            return value
    if is_duration:
        for attr, scale in ((name, 1.0), (name + "_s", 1.0), (name + "_msec", 0.001)):
            v = getattr(options, attr, None)
            if v is not None:
                return float(v) * scale
        return None
    return getattr(options, name, None)


def command_line_options(options: Any) -> server_info_pb2.CommandLineOptions:
    """CommandLineOptions from a ServerOptions-like object (any fields; Envoy's defaults)."""
    msg = server_info_pb2.CommandLineOptions()
    for field in msg.DESCRIPTOR.fields:
        is_duration = field.message_type is not None and field.message_type.full_name == (
            "google.protobuf.Duration"
        )
        value = _option_value(options, field.name, is_duration)
        if value is None:
            value = _OPTION_DEFAULTS.get(field.name)
        if value is None:
            continue
        try:
            if is_duration:
                d = duration_pb2.Duration()
                d.FromNanoseconds(int(float(value) * 1e9))
                getattr(msg, field.name).CopyFrom(d)
            elif field.enum_type is not None:
                names = {v.name.lower(): v.number for v in field.enum_type.values}
                key = getattr(value, "name", value)
                number = names.get(str(key).lower())
                if number is not None:
                    setattr(msg, field.name, number)
            elif proto_json._is_repeated(field):
                getattr(msg, field.name).extend(str(v) for v in value)
            elif field.type == field.TYPE_BOOL:
                setattr(msg, field.name, bool(value))
            elif field.type == field.TYPE_STRING:
                setattr(msg, field.name, str(value))
            else:
                setattr(msg, field.name, int(value))
        except (TypeError, ValueError):
            continue
    return msg


def command_line_options_dict(options: Any) -> dict[str, Any]:
    """``server_info.command_line_options`` as Envoy 1.40 prints it."""
    d = proto_json.message_to_dict(command_line_options(options), always_print=True)
    # Fields of Envoy 1.40 the bundled protos do not know yet.
    d.setdefault("file_flush_min_size", 0)
    d.setdefault(
        "log_stacktrace_single_entry", bool(getattr(options, "log_stacktrace_single_entry", False))
    )
    return d


def _hot_restart_version(server: Any) -> str:
    options = getattr(server, "options", None)
    disabled = getattr(options, "hot_restart_disabled", None)
    if callable(disabled):
        disabled = disabled()
    if disabled is None:
        disabled = getattr(options, "disable_hot_restart", True)
    if disabled:
        return "disabled"
    return str(getattr(server, "hot_restart_version", "disabled"))


def h_server_info(h: AdminHandlers, req: Request) -> Response:
    server = h.server
    info = server_info_pb2.ServerInfo()
    info.version = str(getattr(server, "version", ""))
    info.state = server_info_pb2.ServerInfo.State.Value(_effective_state(server))
    now = time.time()
    start = float(getattr(server, "start_time", now))
    info.uptime_current_epoch.seconds = max(0, int(now - start))
    first = float(getattr(server, "original_start_time", start) or start)
    info.uptime_all_epochs.seconds = max(0, int(now - first))
    info.hot_restart_version = _hot_restart_version(server)
    info.command_line_options.CopyFrom(command_line_options(getattr(server, "options", None)))
    node = getattr(server, "node", None)
    if node is not None:
        info.node.CopyFrom(node)
    d = proto_json.message_to_dict(info, always_print=True)
    d["command_line_options"] = command_line_options_dict(getattr(server, "options", None))
    d["hot_restart_initializing"] = False  # Envoy 1.40 field the bundled protos lack
    return Response(200, proto_json.dumps(d), JSON)


def _memory_numbers() -> tuple[int, int]:
    rss = 0
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, rss


def h_memory(h: AdminHandlers, req: Request) -> Response:
    allocated, physical = _memory_numbers()
    msg = memory_pb2.Memory(
        allocated=allocated,
        heap_size=allocated,
        pageheap_unmapped=0,
        pageheap_free=0,
        total_thread_cache=0,
        total_physical_bytes=physical,
    )
    return Response(200, proto_json.message_to_json(msg, always_print=True), JSON)


def h_memory_tcmalloc(h: AdminHandlers, req: Request) -> Response:
    allocated, _ = _memory_numbers()
    return Response(200, f"MALLOC: {allocated:>14} Bytes in use by application\n", "text/plain")


def h_hot_restart_version(h: AdminHandlers, req: Request) -> Response:
    return Response(200, _hot_restart_version(h.server))


def h_contention(h: AdminHandlers, req: Request) -> Response:
    return Response(
        200,
        "Mutex contention tracing is not enabled. To enable, run Envoy with flag "
        "--enable-mutex-tracing.",
    )


def h_init_dump(h: AdminHandlers, req: Request) -> Response:
    return Response(200, "{}\n", JSON)


def h_certs(h: AdminHandlers, req: Request) -> Response:
    return Response(200, '{\n "certificates": []\n}\n', JSON)


def h_heap_profiler(h: AdminHandlers, req: Request) -> Response:
    return Response(501, "The current build does not support heap profiler")


def h_cpu_profiler(h: AdminHandlers, req: Request) -> Response:
    return Response(500, "failure to start the profiler")


def h_alloc_profiler(h: AdminHandlers, req: Request) -> Response:
    return Response(501, "The current build does not support allocation profiler")


def h_heap_dump(h: AdminHandlers, req: Request) -> Response:
    return Response(501, "The current build does not support heap dump")


def h_reopen_logs(h: AdminHandlers, req: Request) -> Response:
    h.admin.reopen_access_logs()
    return Response(200, "OK\n")


# ---- /runtime ---------------------------------------------------------------------------


def _runtime_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return fmt_double(v)
    return str(v)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = _runtime_str(value)


def _runtime_layers(h: AdminHandlers) -> list[tuple[str, dict[str, str], bool]]:
    bootstrap = getattr(h.server, "bootstrap", None)
    layers: list[tuple[str, dict[str, str], bool]] = []
    if bootstrap is None or not bootstrap.HasField("layered_runtime"):
        return layers
    for layer in bootstrap.layered_runtime.layers:
        kind = layer.WhichOneof("layer_specifier")
        values: dict[str, str] = {}
        if kind == "static_layer":
            _flatten("", json_format.MessageToDict(layer.static_layer), values)
        elif kind == "admin_layer":
            values = h.admin.runtime_overrides
        layers.append((layer.name, values, kind == "admin_layer"))
    return layers


def h_runtime(h: AdminHandlers, req: Request) -> Response:
    layers = _runtime_layers(h)
    keys = sorted({k for _, values, _ in layers for k in values})
    entries = {}
    for key in keys:
        layer_values = [values.get(key, "") for _, values, _ in layers]
        final = next((v for v in reversed(layer_values) if v), "")
        entries[key] = {"final_value": final, "layer_values": layer_values}
    body = {"entries": entries, "layers": [name for name, _, _ in layers]}
    return Response(200, proto_json.dumps(body), JSON)


def h_runtime_modify(h: AdminHandlers, req: Request) -> Response:
    if not req.query:
        return Response(
            400,
            "usage: /runtime_modify?key1=value1&key2=value2&keyN=valueN\n"
            "       or send the parameters as form values\n"
            "use an empty value to remove a previously added override",
        )
    if not any(is_admin for _, _, is_admin in _runtime_layers(h)):
        return Response(503, "No admin layer specified")
    for key, values in req.query.items():
        value = values[0] if values else ""
        if value:
            h.admin.runtime_overrides[key] = value
        else:
            h.admin.runtime_overrides.pop(key, None)
    return Response(200, "OK\n")


# ---- /logging ---------------------------------------------------------------------------

_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
_LOGGING_USAGE = (
    "usage: /logging?<name>=<level> (change single level)\n"
    "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
    "usage: /logging?level=<level> (change all levels)\n"
    "usage: /logging?group=<group_name>:<level> (change group of loggers)\n"
    "levels: " + "".join(f"{lv} " for lv in _LEVELS) + "\n"
)


class _FallbackLog:
    """Used when ``pyenvoy.log`` is absent: Envoy component names over ``logging``."""

    _PY = {
        "trace": 5,
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warning": logging.WARNING,
        "error": logging.ERROR,
        "critical": logging.CRITICAL,
        "off": logging.CRITICAL + 10,
    }
    COMPONENTS = ("admin", "config", "connection", "http", "main", "pool", "router", "upstream")

    def _name(self, level: int) -> str:
        best = "off"
        for name, value in self._PY.items():
            if value <= level:
                best = name
        return best if level > 0 else "info"

    def get_levels(self) -> dict[str, str]:
        return {
            c: self._name(logging.getLogger(f"pyenvoy.{c}").getEffectiveLevel())
            for c in self.COMPONENTS
        }

    def set_all_levels(self, level: str) -> None:
        for c in self.COMPONENTS:
            logging.getLogger(f"pyenvoy.{c}").setLevel(self._PY[level])

    def set_level(self, component: str, level: str) -> bool:
        if component not in self.COMPONENTS:
            return False
        logging.getLogger(f"pyenvoy.{component}").setLevel(self._PY[level])
        return True


def _log_module() -> Any:
    try:
        from pyenvoy import log as pylog  # type: ignore[attr-defined]
    except ImportError:
        return _FallbackLog()
    if not all(hasattr(pylog, n) for n in ("get_levels", "set_all_levels", "set_level")):
        return _FallbackLog()
    return pylog


def _levels_text(mod: Any) -> str:
    levels = mod.get_levels()
    items = levels.items() if isinstance(levels, Mapping) else levels
    return "active loggers:\n" + "".join(f"  {name}: {level}\n" for name, level in items) + "\n"


def h_logging(h: AdminHandlers, req: Request) -> Response:
    mod = _log_module()
    error = ""
    changes: list[tuple[str, str]] = []
    set_all: str | None = None
    for key, values in req.query.items():
        value = values[0] if values else ""
        if key == "level":
            set_all = value
        elif key in ("paths", "group"):
            for item in value.split(","):
                name, _, level = item.partition(":")
                changes.append((name, level))
        else:
            changes.append((key, value))
    if set_all is not None:
        if set_all not in _LEVELS:
            error = "unknown logger level"
        else:
            mod.set_all_levels(set_all)
    for name, level in changes:
        if error:
            break
        if level not in _LEVELS:
            error = "unknown logger level"
        elif not mod.set_level(name, level):
            error = "unknown logger name"
    if error:
        return Response(400, f"error: {error}\n\n{_LOGGING_USAGE}{_levels_text(mod)}")
    return Response(200, _levels_text(mod))


# ---- /clusters --------------------------------------------------------------------------

_HOST_STATS = (
    ("cx_active", "gauge"),
    ("cx_connect_fail", "counter"),
    ("cx_total", "counter"),
    ("rq_active", "gauge"),
    ("rq_error", "counter"),
    ("rq_pending_active", "gauge"),
    ("rq_success", "counter"),
    ("rq_timeout", "counter"),
    ("rq_total", "counter"),
)


def _host_stats(host: Any) -> list[tuple[str, str, int]]:
    """``(name, "counter"|"gauge", value)`` sorted by name."""
    stats = getattr(host, "stats", None)
    found: dict[str, tuple[str, int]] = {}
    items = getattr(stats, "items", None)
    if callable(items):
        for name, stat in items():
            kind = "gauge" if isinstance(stat, Gauge) else "counter"
            found[name] = (kind, int(getattr(stat, "value", 0)))
    for name, kind in _HOST_STATS:
        if name not in found:
            stat = getattr(stats, name, None)
            value = int(getattr(stat, "value", 0)) if stat is not None else 0
            if isinstance(stat, Counter):
                kind = "counter"
            found[name] = (kind, value)
    return [(n, k, v) for n, (k, v) in sorted(found.items())]


def _clusters(server: Any) -> list[Any]:
    cm = getattr(server, "cluster_manager", None)
    return list(getattr(cm, "clusters", {}).values()) if cm is not None else []


_DEFAULT_CB = [("default", 1024, 1024, 1024, 3), ("high", 1024, 1024, 1024, 3)]


def _circuit_breaker_limits(server: Any, info: Any) -> list[Any]:
    """(priority, max_connections, max_pending_requests, max_requests, max_retries) as Envoy
    prints them: the limits the cluster's ResourceManagers enforce (runtime overrides
    applied); the static ones for a cluster without stats (a stand-in)."""
    if getattr(info, "stats", None) is None:
        return getattr(info, "circuit_breakers", None) or _DEFAULT_CB
    from pyenvoy import runtime as runtime_mod
    from pyenvoy.upstream.circuit_breaker import resource_managers

    rms = resource_managers(info, runtime_mod.for_server(server))
    return [
        (
            pname,
            rm.connections.max(),
            rm.pending_requests.max(),
            rm.requests.max(),
            rm.retries.max(),
        )
        for pname, rm in zip(("default", "high"), rms.by_priority, strict=True)
    ]


def _locality(host: Any) -> tuple[str, str, str]:
    return config_dump._host_locality(host)


def _rate(host: Any, attr: str) -> float | None:
    """A host's outlier-detection rate (kept by the detector in ``host.outlier``)."""
    v = getattr(getattr(host, "outlier", None), attr, None)
    if v is None:
        v = getattr(host, attr, None)
    return float(v) if isinstance(v, (int, float)) and v >= 0 else None


def _clusters_text(server: Any, name_re: re.Pattern[str] | None) -> str:
    out: list[str] = []
    for cluster in _clusters(server):
        info = cluster.info
        name = info.name
        if name_re is not None and not name_re.search(name):
            continue
        out.append(f"{name}::observability_name::{getattr(info, 'observability_name', name)}\n")
        od = getattr(cluster, "outlier", None)
        if od is not None:
            # Envoy prints the detector's cluster-wide figures right after the name.
            for field in (
                "success_rate_average",
                "success_rate_ejection_threshold",
                "local_origin_success_rate_average",
                "local_origin_success_rate_ejection_threshold",
            ):
                out.append(f"{name}::outlier::{field}::{float(getattr(od, field, -1.0)):g}\n")
        for prio, max_cx, max_pending, max_rq, max_retries in _circuit_breaker_limits(server, info):
            p = f"{name}::{prio}_priority::"
            out.append(f"{p}max_connections::{max_cx}\n")
            out.append(f"{p}max_pending_requests::{max_pending}\n")
            out.append(f"{p}max_requests::{max_rq}\n")
            out.append(f"{p}max_retries::{max_retries}\n")
        out.append(
            f"{name}::added_via_api::{'true' if getattr(info, 'added_via_api', False) else 'false'}\n"
        )
        for host in getattr(cluster, "hosts", []) or []:
            p = f"{name}::{format_address(host.address)}::"
            for stat_name, _kind, value in _host_stats(host):
                out.append(f"{p}{stat_name}::{value}\n")
            region, zone, sub_zone = _locality(host)
            flags = host.health_flags_text() if hasattr(host, "health_flags_text") else "healthy"
            sr = _rate(host, "success_rate")
            lsr = _rate(host, "local_origin_success_rate")
            out.append(f"{p}hostname::{getattr(host, 'hostname', '') or ''}\n")
            out.append(f"{p}health_flags::{flags}\n")
            out.append(f"{p}weight::{getattr(host, 'weight', 1)}\n")
            out.append(f"{p}region::{region}\n")
            out.append(f"{p}zone::{zone}\n")
            out.append(f"{p}sub_zone::{sub_zone}\n")
            out.append(f"{p}canary::{'true' if getattr(host, 'canary', False) else 'false'}\n")
            out.append(f"{p}priority::{getattr(host, 'priority', 0)}\n")
            out.append(f"{p}success_rate::{fmt_double(sr) if sr is not None else '-1'}\n")
            out.append(
                f"{p}local_origin_success_rate::{fmt_double(lsr) if lsr is not None else '-1'}\n"
            )
    return "".join(out)


_HEALTH_FIELDS = {
    "failed_active_hc": "failed_active_health_check",
    "failed_outlier_check": "failed_outlier_check",
    "degraded_active_hc": "failed_active_degraded_check",
    "pending_dynamic_removal": "pending_dynamic_removal",
    "pending_active_hc": "pending_active_hc",
    "excluded_via_immediate_hc_fail": "excluded_via_immediate_hc_fail",
    "active_hc_timeout": "active_hc_timeout",
}


def _clusters_json(server: Any, name_re: re.Pattern[str] | None) -> str:
    msg = clusters_pb2.Clusters()
    for cluster in _clusters(server):
        info = cluster.info
        if name_re is not None and not name_re.search(info.name):
            continue
        cs = msg.cluster_statuses.add()
        cs.name = info.name
        cs.added_via_api = bool(getattr(info, "added_via_api", False))
        for host in getattr(cluster, "hosts", []) or []:
            hs = cs.host_statuses.add()
            sa = hs.address.socket_address
            sa.address = host.address[0]
            sa.port_value = int(host.address[1])
            stats = _host_stats(host)
            for kind in ("counter", "gauge"):
                for stat_name, k, value in stats:
                    if k != kind:
                        continue
                    m = hs.stats.add()
                    m.name = stat_name
                    m.value = value
                    if kind == "gauge":
                        m.type = m.GAUGE
            flags = config_dump.host_health_flags(host)
            hs.health_status.eds_health_status = 2 if "failed_eds_health" in flags else 1
            for flag in flags:
                field = _HEALTH_FIELDS.get(flag)
                if field:
                    setattr(hs.health_status, field, True)
            sr = _rate(host, "success_rate")
            if sr is not None:
                hs.success_rate.value = sr
            lsr = _rate(host, "local_origin_success_rate")
            if lsr is not None:
                hs.local_origin_success_rate.value = lsr
            hs.weight = int(getattr(host, "weight", 1) or 0)
            hs.hostname = getattr(host, "hostname", "") or ""
            hs.priority = int(getattr(host, "priority", 0) or 0)
            hs.locality.SetInParent()
            region, zone, sub_zone = _locality(host)
            hs.locality.region, hs.locality.zone, hs.locality.sub_zone = region, zone, sub_zone
        for prio, max_cx, max_pending, max_rq, max_retries in _circuit_breaker_limits(server, info):
            t = cs.circuit_breakers.thresholds.add()
            t.priority = 1 if prio == "high" else 0
            t.max_connections.value = max_cx
            t.max_pending_requests.value = max_pending
            t.max_requests.value = max_rq
            t.max_retries.value = max_retries
        cs.observability_name = getattr(info, "observability_name", info.name)
    return proto_json.message_to_json(msg)


def h_clusters(h: AdminHandlers, req: Request) -> Response:
    pattern = _first(req.query, "filter")
    name_re = None
    if pattern:
        try:
            name_re = re.compile(pattern)
        except re.error as e:
            return Response(400, f"Invalid re2 regex: {e.msg}: {pattern}")
    if _first(req.query, "format") == "json":
        return Response(200, _clusters_json(h.server, name_re), JSON)
    return Response(200, _clusters_text(h.server, name_re))


# ---- /listeners -------------------------------------------------------------------------


def _listener_address(listener: Any) -> tuple[str, int] | None:
    addr = getattr(listener, "local_address", None)
    if addr:
        return (addr[0], int(addr[1]))
    proto = getattr(listener, "proto", None)
    if proto is not None and proto.address.HasField("socket_address"):
        sa = proto.address.socket_address
        return (sa.address, sa.port_value)
    return None


def h_listeners(h: AdminHandlers, req: Request) -> Response:
    lm = getattr(h.server, "listener_manager", None)
    listeners = list(getattr(lm, "listeners", [])) if lm is not None else []
    if _first(req.query, "format") == "json":
        msg = listeners_pb2.Listeners()
        for listener in listeners:
            st = msg.listener_statuses.add()
            st.name = listener.name
            addr = _listener_address(listener)
            if addr is not None:
                st.local_address.socket_address.address = addr[0]
                st.local_address.socket_address.port_value = addr[1]
        return Response(200, proto_json.message_to_json(msg), JSON)
    lines = [
        f"{listener.name}::{format_address(_listener_address(listener))}\n"
        for listener in listeners
    ]
    return Response(200, "".join(lines))


# ---- /config_dump -----------------------------------------------------------------------


def h_config_dump(h: AdminHandlers, req: Request) -> Response:
    try:
        body = config_dump.render(h.server, req.query)
    except config_dump.ConfigDumpError as e:
        # Envoy sends these with the nosniff header first and a bare text/plain type.
        headers = [
            ("x-content-type-options", "nosniff"),
            ("content-type", "text/plain"),
            ("cache-control", "no-cache, max-age=0"),
            ("x-content-type-options", "nosniff"),
        ]
        return Response(e.status, e.message, "text/plain", headers=headers)
    except re.error as e:
        return Response(400, f"Invalid re2 regex: {e.msg}")
    return Response(200, body, JSON)


# ---- /, /help ---------------------------------------------------------------------------


def help_text() -> str:
    out = []
    for ep in ENDPOINTS:
        out.append(f"  {ep.path}{' (POST)' if ep.mutates else ''}: {ep.help}\n")
        for name, text in ep.params:
            out.append(f"      {name}: {text}\n")
    return "".join(out)


def h_help(h: AdminHandlers, req: Request) -> Response:
    return Response(200, "admin commands are:\n" + help_text())


def h_home(h: AdminHandlers, req: Request) -> Response:
    rows = []
    for i, ep in enumerate(ENDPOINTS):
        if ep.path == "/":
            continue
        name = ep.path[1:]
        cls = " class='gray'" if i % 2 else ""
        if ep.mutates or ep.params:
            method = "post" if ep.mutates else "get"
            cell = (
                f"<form action='{html.escape(name)}' method='{method}' id='{html.escape(name)}' "
                f"class='home-form'>\n    <button>{html.escape(name)}</button>\n  </form>"
            )
        else:
            cell = f"<a href='{html.escape(name)}'>{html.escape(name)}</a>"
        rows.append(
            f"<tr{cls}>\n  <td class='home-data'>{cell}</td>\n"
            f"  <td class='home-data'>{html.escape(ep.help)}</td>\n</tr>\n"
        )
        for pname, ptext in ep.params:
            pid = f"param-{i}-{name.replace('/', '-')}-{pname}"
            rows.append(
                f"<tr{cls}>\n  <td class='option'><input type='text' name='{pname}' id='{pid}' "
                f"form='{html.escape(name)}' /></td>\n"
                f"  <td class='home-data'><label for='{pid}'>{html.escape(ptext)}</label></td>\n</tr>\n"
            )
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n  <title>Envoy Admin</title>\n</head>\n"
        "<body>\n  <table class='home-table'>\n    <thead>\n      <tr>\n"
        "        <th class='home-data'>Command</th>\n        <th class='home-data'>Description</th>\n"
        "      </tr>\n    </thead>\n    <tbody>\n" + "".join(rows) + "    </tbody>\n  </table>\n"
        "</body>\n</html>\n"
    )
    return Response(200, page, HTML)


_STATS_FILTER = "Regular expression (Google re2) for filtering stats"
_USEDONLY = "Only include stats that have been written by system since restart"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/", "Admin home page", False, (), h_home),
    Endpoint(
        "/allocprofiler",
        "enable/disable the allocation profiler (if supported)",
        True,
        (("enable", "enable/disable the allocation profiler; One of (y, n)"),),
        h_alloc_profiler,
    ),
    Endpoint("/certs", "print certs on machine", False, (), h_certs),
    Endpoint(
        "/clusters",
        "upstream cluster status",
        False,
        (("filter", "Regular expression (Google re2) for filtering clusters by name"),),
        h_clusters,
    ),
    Endpoint(
        "/config_dump",
        "dump current Envoy configs",
        False,
        (
            ("resource", "The resource to dump"),
            (
                "mask",
                "The mask to apply. When both resource and mask are specified, the mask is "
                "applied to every element in the desired repeated field so that only a subset of "
                "fields are returned. The mask is parsed as a Protobuf::FieldMask",
            ),
            (
                "name_regex",
                "Dump only the currently loaded configurations whose names match the specified "
                "regex. Can be used with both resource and mask query parameters.",
            ),
            (
                "include_eds",
                "Dump currently loaded configuration including EDS. See the response definition "
                "for more information",
            ),
        ),
        h_config_dump,
    ),
    Endpoint(
        "/contention",
        "dump current Envoy mutex contention stats (if enabled)",
        False,
        (),
        h_contention,
    ),
    Endpoint(
        "/cpuprofiler",
        "enable/disable the CPU profiler",
        True,
        (("enable", "enables the CPU profiler; One of (y, n)"),),
        h_cpu_profiler,
    ),
    Endpoint(
        "/drain_listeners",
        "drain listeners",
        True,
        (
            (
                "graceful",
                "When draining listeners, enter a graceful drain period prior to closing "
                "listeners. This behaviour and duration is configurable via server options or CLI",
            ),
            (
                "skip_exit",
                "When draining listeners, drain the connections but never stop the listeners. "
                "The graceful parameter has no effect when this is set, since the drain period "
                "only delays stopping the listeners",
            ),
            (
                "inboundonly",
                "Drains all inbound listeners. traffic_direction field in "
                "envoy_v3_api_msg_config.listener.v3.Listener is used to determine whether a "
                "listener is inbound or outbound.",
            ),
        ),
        h_drain_listeners,
    ),
    Endpoint(
        "/healthcheck/fail", "cause the server to fail health checks", True, (), h_healthcheck_fail
    ),
    Endpoint(
        "/healthcheck/ok", "cause the server to pass health checks", True, (), h_healthcheck_ok
    ),
    Endpoint("/heap_dump", "dump current Envoy heap (if supported)", False, (), h_heap_dump),
    Endpoint(
        "/heapprofiler",
        "enable/disable the heap profiler",
        True,
        (("enable", "enable/disable the heap profiler; One of (y, n)"),),
        h_heap_profiler,
    ),
    Endpoint("/help", "print out list of admin commands", False, (), h_help),
    Endpoint(
        "/hot_restart_version",
        "print the hot restart compatibility version",
        False,
        (),
        h_hot_restart_version,
    ),
    Endpoint(
        "/init_dump",
        "dump current Envoy init manager information (experimental)",
        False,
        (
            (
                "mask",
                "The desired component to dump unready targets. The mask is parsed as a "
                "Protobuf::FieldMask. For example, get the unready targets of all listeners with "
                "/init_dump?mask=listener`",
            ),
        ),
        h_init_dump,
    ),
    Endpoint(
        "/listeners",
        "print listener info",
        False,
        (("format", "File format to use; One of (text, json)"),),
        h_listeners,
    ),
    Endpoint(
        "/logging",
        "query/change logging levels",
        True,
        (
            (
                "paths",
                "Change multiple logging levels by setting to "
                "<logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>. If fine grain "
                "logging is enabled, use __FILE__ or a glob experision as the logger name. For "
                "example, source/common*:warning",
            ),
            (
                "group",
                "Change given logger group to desired level, set to "
                "<logger_group_name>:<desired_level>. logger_group_name must be a logger name.",
            ),
            (
                "level",
                "desired logging level, this will change all loggers's level; One of (, trace, "
                "debug, info, warning, error, critical, off)",
            ),
        ),
        h_logging,
    ),
    Endpoint("/memory", "print current allocation/heap usage", False, (), h_memory),
    Endpoint("/memory/tcmalloc", "print TCMalloc stats", False, (), h_memory_tcmalloc),
    Endpoint("/peak_heap_dump", "dump peak Envoy heap (if supported)", False, (), h_heap_dump),
    Endpoint("/quitquitquit", "exit the server", True, (), h_quitquitquit),
    Endpoint(
        "/ready", "print server state, return 200 if LIVE, otherwise return 503", False, (), h_ready
    ),
    Endpoint("/reopen_logs", "reopen access logs", True, (), h_reopen_logs),
    Endpoint("/reset_counters", "reset all counters to zero", True, (), h_reset_counters),
    Endpoint("/runtime", "print runtime values", False, (), h_runtime),
    Endpoint(
        "/runtime_modify",
        "Adds or modifies runtime values as passed in query parameters. To delete a previously "
        "added key, use an empty string as the value. Note that deletion only applies to "
        "overrides added via this endpoint; values loaded from disk can be modified via override "
        "but not deleted. E.g. ?key1=value1&key2=value2...",
        True,
        (),
        h_runtime_modify,
    ),
    Endpoint("/server_info", "print server version/status information", False, (), h_server_info),
    Endpoint(
        "/stats",
        "print server stats",
        False,
        (
            ("usedonly", _USEDONLY),
            ("filter", _STATS_FILTER),
            ("invert_filter", "Invert the filter regex"),
            ("format", "Format to use; One of (html, active-html, text, json)"),
            (
                "type",
                "Stat types to include.; One of (All, Counters, Histograms, Gauges, TextReadouts)",
            ),
            (
                "histogram_buckets",
                "Histogram bucket display mode; One of (cumulative, disjoint, detailed, summary)",
            ),
        ),
        h_stats,
    ),
    Endpoint(
        "/stats/prometheus",
        "print server stats in prometheus format",
        False,
        (
            ("usedonly", _USEDONLY),
            (
                "text_readouts",
                "Render text_readouts as new gaugues with value 0 (increases Prometheus data size)",
            ),
            ("filter", _STATS_FILTER),
            ("invert_filter", "Invert the filter regex"),
            ("histogram_buckets", "Histogram bucket display mode; One of (cumulative, summary)"),
        ),
        h_stats_prometheus,
    ),
    Endpoint("/stats/recentlookups", "Show recent stat-name lookups", False, (), h_recent_lookups),
    Endpoint(
        "/stats/recentlookups/clear",
        "clear list of stat-name lookups and counter",
        True,
        (),
        h_recent_lookups_clear,
    ),
    Endpoint(
        "/stats/recentlookups/disable",
        "disable recording of reset stat-name lookup names",
        True,
        (),
        h_recent_lookups_disable,
    ),
    Endpoint(
        "/stats/recentlookups/enable",
        "enable recording of reset stat-name lookup names",
        True,
        (),
        h_recent_lookups_enable,
    ),
)

_BY_PATH = {ep.path: ep for ep in ENDPOINTS}


class AdminHandlers:
    """Dispatches one parsed request to its endpoint."""

    __slots__ = ("admin", "server")

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.server = admin.server

    def handle(self, req: Request) -> Response:
        ep = _BY_PATH.get(req.path)
        if ep is None:
            return Response(404, "invalid path. admin commands are:\n" + help_text())
        if ep.mutates and req.method != "POST":
            log.error(
                'admin path "%s" mutates state, method=%s rather than POST', req.path, req.method
            )
            return Response(405, f"Method {req.method} not allowed, POST required.")
        try:
            return ep.handler(self, req)
        except Exception as e:  # an endpoint bug must not take the admin listener down
            log.exception("admin handler %s failed", req.path)
            return Response(500, f"{type(e).__name__}: {e}")
