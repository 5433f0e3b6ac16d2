"""Filesystem xDS: DiscoveryResponse files watched for changes, as Envoy's path_config_source.

Strategy: a ``FilesystemSubscription`` reads one file holding a DiscoveryResponse
(``version_info`` + ``resources`` with ``@type``; YAML if named .yaml/.yml, text proto for
.pb_text, binary for .pb, JSON otherwise), decodes and PGV-validates every resource and
hands the list to its callback. The callback applies it or raises ConfigError. The counting
follows Envoy's filesystem subscription: a file that cannot be read or parsed is an
``update_failure`` ("Filesystem config update failure: in <path>, <why>"), a callback error
is an ``update_rejected`` ("Filesystem config update rejected: <why>"), both after an
``update_attempt``; only a success moves ``version``/``version_text``/``update_time``.

Change detection is one ``FileWatcher`` per server: a ``call_later`` timer that stats every
watched path every 250 ms (no inotify in the stdlib). A change of inode, size, mtime or
ctime of the file (stat follows symlinks, so a Kubernetes ``..data`` symlink swap counts),
or of the ``watched_directory``, triggers a reload. Files replaced atomically (write, then
rename) are therefore applied within a second; a missing file is ignored until it returns.

Callbacks may be coroutines (LDS/CDS warm clusters and bind sockets): updates of one
subscription are then applied one at a time, and a change seen meanwhile is applied next.

With ``--concurrency N`` > 1 the files are watched and read in the main process only:
its XdsManager records the bytes of every read (``load``) and a ``FilePublisher`` sends
them to every worker (op ``xds_file``, ``encode_file``) when they are new or the file
changed; a worker's XdsManager (``remote_files``) watches nothing, keeps the pushed bytes
and, on each push, re-runs its subscriptions of that path through the same
``_read`` -> ``parse`` -> callback steps as a local read. A worker starts with the current
content of every file; a file it has not been sent yet is pending (no stats, not
initialized). Files only the workers apply (route configs of LDS listeners) are read by
the main process as ``mirror`` watches.

``version`` gauges carry Envoy's value: the xxHash64 of ``version_info`` (seed 0).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from pyenvoy.config.errors import ConfigError
from pyenvoy.stats import StatsStruct

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from pyenvoy.stats import Scope

log = logging.getLogger("pyenvoy.config")

__all__ = [
    "TYPE_CLUSTER",
    "TYPE_CLA",
    "TYPE_LISTENER",
    "TYPE_ROUTE",
    "DecodedResource",
    "FileContent",
    "FilePublisher",
    "FileWatcher",
    "FilesystemSubscription",
    "SubscriptionStats",
    "XDS_FILE_OP",
    "XdsManager",
    "decode_file",
    "encode_file",
    "path_source",
    "xxhash64",
]

TYPE_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
TYPE_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPE_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
_RESOURCE_WRAPPER = "envoy.service.discovery.v3.Resource"

POLL_INTERVAL = 0.25


# --------------------------------------------------------------------------------------------
# xxHash64: Envoy's HashUtil::xxHash64, used for the ``version`` gauges.

_M64 = (1 << 64) - 1
_P1, _P2, _P3 = 11400714785074694791, 14029467366897019727, 1609587929392839161
_P4, _P5 = 9650029242287828579, 2870177450012600261


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def _merge(acc: int, v: int) -> int:
    return ((acc ^ _round(0, v)) * _P1 + _P4) & _M64


def xxhash64(data: bytes, seed: int = 0) -> int:
    """xxHash64 of ``data`` (pure Python; only called on config updates)."""
    n = len(data)
    i = 0
    if n >= 32:
        v1, v2, v3, v4 = (seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64
        while i + 32 <= n:
            v1 = _round(v1, int.from_bytes(data[i : i + 8], "little"))
            v2 = _round(v2, int.from_bytes(data[i + 8 : i + 16], "little"))
            v3 = _round(v3, int.from_bytes(data[i + 16 : i + 24], "little"))
            v4 = _round(v4, int.from_bytes(data[i + 24 : i + 32], "little"))
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M64
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h ^= _round(0, int.from_bytes(data[i : i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    h ^= h >> 32
    return h


# --------------------------------------------------------------------------------------------
# Stats.


class SubscriptionStats(StatsStruct):
    """Envoy's config-update stats of one subscription (``listener_manager.lds.*``,
    ``cluster_manager.cds.*``, ``http.<prefix>.rds.<name>.*``, ``cluster.<name>.*``)."""

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "init_fetch_timeout",
        "update_attempt",
        "update_failure",
        "update_rejected",
        "update_success",
    )
    GAUGES: ClassVar[tuple[str, ...]] = ("update_time", "version")
    HISTOGRAMS: ClassVar[tuple[str, ...]] = ("update_duration",)

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope)
        self.version_text = TextReadout(scope, "version_text")


class TextReadout:
    """A text stat (``version_text``). Rendered by the stats store when it supports text
    readouts (``Store.text_readout(name)``); otherwise kept here for /config_dump and tests."""

    __slots__ = ("name", "_value", "_target")

    def __init__(self, scope: Scope, name: str) -> None:
        full = f"{scope.prefix}.{name}" if scope.prefix else name
        self.name = full
        self._value = ""
        make = getattr(scope.store, "text_readout", None)
        self._target: Any = make(full) if callable(make) else None

    @property
    def value(self) -> str:
        return self._value

    def set(self, value: str) -> None:
        self._value = value
        t = self._target
        if t is not None:
            if hasattr(t, "set"):
                t.set(value)
            else:
                t.value = value


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# Config sources.


def path_source(cs: Any, path: str) -> tuple[str, str | None]:
    """(file path, watched directory or None) of a ConfigSource; ConfigError for anything but
    a filesystem source (gRPC/REST/ADS xDS are not implemented)."""
    which = cs.WhichOneof("config_source_specifier")
    if which == "path":
        return cs.path, None
    if which == "path_config_source":
        p = cs.path_config_source
        wd = p.watched_directory.path if p.HasField("watched_directory") else None
        return p.path, wd or None
    if which == "api_config_source":
        api = cs.api_config_source
        kind = api.ApiType.Name(api.api_type)
        raise ConfigError(
            f"api_config_source ({kind}) xDS is not supported by pyenvoy yet; "
            "only filesystem subscriptions (path_config_source) are",
            f"{path}.api_config_source",
        )
    if which == "ads":
        raise ConfigError(
            "ads xDS is not supported by pyenvoy yet; only filesystem subscriptions "
            "(path_config_source) are",
            f"{path}.ads",
        )
    if which == "self":
        raise ConfigError("self config sources are not supported by pyenvoy yet", f"{path}.self")
    raise ConfigError("config source specifier is not set", path)


def _initial_fetch_timeout(cs: Any) -> float:
    if cs.HasField("initial_fetch_timeout"):
        d = cs.initial_fetch_timeout
        return float(d.seconds + d.nanos / 1e9)
    return 15.0


# --------------------------------------------------------------------------------------------
# Watching files.


def _signature(path: str, watched_directory: str | None) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    sig: tuple[Any, ...] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    try:
        lst = os.lstat(path)
        sig += (lst.st_ino, lst.st_mtime_ns)
    except OSError:
        pass
    if watched_directory:
        try:
            dst = os.stat(watched_directory)
            sig += (dst.st_ino, dst.st_mtime_ns, dst.st_ctime_ns)
        except OSError:
            pass
    return sig


class _Watch:
    __slots__ = ("path", "watched_directory", "callback", "signature", "watcher")

    def __init__(
        self,
        watcher: FileWatcher,
        path: str,
        watched_directory: str | None,
        callback: Callable[[], None],
    ) -> None:
        self.watcher = watcher
        self.path = path
        self.watched_directory = watched_directory
        self.callback = callback
        self.signature = _signature(path, watched_directory)

    def cancel(self) -> None:
        self.watcher.remove(self)


class FileWatcher:
    """Polls ``os.stat`` of every watched path on the running loop (cheap: a few stat calls
    every ``interval`` seconds, only while something is watched)."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self.watches: list[_Watch] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False

    def watch(
        self, path: str, watched_directory: str | None, callback: Callable[[], None]
    ) -> _Watch:
        w = _Watch(self, path, watched_directory, callback)
        self.watches.append(w)
        if self._running and self._handle is None:
            self._schedule()
        return w

    def remove(self, w: _Watch) -> None:
        try:
            self.watches.remove(w)
        except ValueError:
            pass

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        for w in self.watches:  # files may have changed between the first read and now
            if w.signature is None:
                w.signature = _signature(w.path, w.watched_directory)
        if self._handle is None:
            self._schedule()

    def stop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._handle = None
        if not self._running:
            return
        for w in list(self.watches):
            sig = _signature(w.path, w.watched_directory)
            if sig is None or sig == w.signature:
                continue  # unchanged, or missing for now (mid-swap)
            w.signature = sig
            try:
                w.callback()
            except Exception:
                log.exception("config watch callback for %s failed", w.path)
        if self.watches:
            self._schedule()

    def check_now(self) -> None:
        """Run one poll at once (tests)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._tick()


# --------------------------------------------------------------------------------------------
# Sharing file contents with worker processes.

# What was read from one file: (type_url, bytes or None if unreadable, the read error).
FileContent = tuple[str, "bytes | None", str]

XDS_FILE_OP = "xds_file"


def encode_file(path: str, content: FileContent) -> dict[str, Any]:
    """The control-socket message (JSON): ``{"op": "xds_file", "path": str, "type_url": str,
    "data": base64 of the file's bytes | None, "error": str}`` (``error`` when unreadable)."""
    type_url, data, error = content
    return {
        "op": XDS_FILE_OP,
        "path": path,
        "type_url": type_url,
        "data": None if data is None else base64.b64encode(data).decode("ascii"),
        "error": error,
    }


def decode_file(msg: dict[str, Any]) -> FileContent:
    data = msg.get("data")
    return (
        str(msg.get("type_url", "")),
        None if data is None else base64.b64decode(data),
        str(msg.get("error") or "unable to read file"),
    )


class FilePublisher:
    """The main process's side: every file content its XdsManager records (a read after a
    change, or new content) goes out through ``send`` once per loop iteration and path, in
    the order read; ``snapshot()`` is what a starting worker gets, ``since()`` what it
    missed between that snapshot and being ready."""

    def __init__(self, xds: XdsManager, send: Callable[[dict[str, Any]], None]) -> None:
        self.xds = xds
        self.send = send
        self.generation: dict[str, int] = {}
        self.pending: dict[str, None] = {}
        self._handle: asyncio.Handle | None = None
        xds.publisher = self.on_read

    def close(self) -> None:
        if self.xds.publisher == self.on_read:
            self.xds.publisher = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def on_read(self, path: str) -> None:
        self.pending.pop(path, None)
        self.pending[path] = None
        if self._handle is None:
            try:
                self._handle = asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                pass

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        pending, self.pending = self.pending, {}
        contents = self.xds.contents
        for path in pending:
            content = contents.get(path)
            if content is not None:
                self.generation[path] = self.generation.get(path, 0) + 1
                self.send(encode_file(path, content))

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Every file's current content (after a flush to the running workers) and the
        generations it stands for."""
        self.flush()
        files = [encode_file(p, c) for p, c in self.xds.contents.items()]
        return files, dict(self.generation)

    def since(self, generation: dict[str, int]) -> list[dict[str, Any]]:
        self.flush()
        contents = self.xds.contents
        return [
            encode_file(p, contents[p])
            for p, g in self.generation.items()
            if generation.get(p, 0) != g and p in contents
        ]


# --------------------------------------------------------------------------------------------
# Decoding DiscoveryResponse files.


class DecodedResource(NamedTuple):
    """One resource of a DiscoveryResponse: its name, its message and its index."""

    name: str
    message: Message
    position: int
    version: str


class _ParseFailure(Exception):
    """The file could not be read or parsed (Envoy's update_failure)."""


class _Pending(Exception):
    """A worker has not been sent this file's content yet (nothing to apply, no stats)."""


def _resource_name(msg: Any) -> str:
    desc = msg.DESCRIPTOR
    for field in ("name", "cluster_name"):
        if field in desc.fields_by_name:
            return str(getattr(msg, field))
    return ""


class XdsManager:
    """Everything a server needs for filesystem xDS: the watcher, the node check, the
    unknown-field policy and ``server.dynamic_unknown_fields``."""

    def __init__(
        self,
        server: Any = None,
        watcher: FileWatcher | None = None,
        remote_files: dict[str, FileContent] | None = None,
    ) -> None:
        self.server = server
        self.watcher = watcher or FileWatcher()
        opts = getattr(server, "options", None)
        self.reject_unknown = bool(getattr(opts, "reject_unknown_dynamic_fields", False))
        self.ignore_unknown = bool(getattr(opts, "ignore_unknown_dynamic_fields", False))
        self.subscriptions: list[FilesystemSubscription] = []
        # A worker process (``remote_files`` given): file contents come from the main
        # process (``push``) and nothing is watched here.
        self.remote: dict[str, FileContent] | None = remote_files
        # The main process of ``--concurrency N`` > 1: the last content read of every file
        # (what a starting worker gets) and who forwards new reads to the workers.
        self.record = remote_files is None and int(getattr(opts, "concurrency", 1) or 1) > 1
        self.contents: dict[str, FileContent] = {}
        self.publisher: Callable[[str], None] | None = None
        self._mirrors: dict[str, _Watch] = {}

    def check_node(self, type_url: str) -> None:
        node = getattr(self.server, "node", None)
        if node is None:
            return
        if not node.id or not node.cluster:
            raise ConfigError(
                f"{type_url}: node 'id' and 'cluster' are required. Set it either in 'node' config "
                "or via --service-node and --service-cluster options."
            )

    def subscribe(
        self,
        config_source: Any,
        type_url: str,
        callback: Callable[[list[DecodedResource], str], Any],
        stats: SubscriptionStats,
        path: str,
    ) -> FilesystemSubscription:
        """A filesystem subscription for ``config_source`` (not started). ConfigError when
        the source is not a file, the node is incomplete or the file does not exist."""
        file_path, watched_directory = path_source(config_source, path)
        self.check_node(type_url)
        # A worker does not look at the file system: an unknown file is pending until the
        # main process sends it.
        if self.remote is None and not os.path.exists(file_path):
            raise ConfigError(
                f"paths must refer to an existing path in the system: '{file_path}' does not exist",
                path,
            )
        sub = FilesystemSubscription(self, file_path, watched_directory, type_url, callback, stats)
        sub.initial_fetch_timeout = _initial_fetch_timeout(config_source)
        return sub

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        for sub in list(self.subscriptions):
            sub.stop()
        for w in self._mirrors.values():
            w.cancel()
        self._mirrors.clear()

    # --- worker processes ---------------------------------------------------------------
    def push(self, msg: dict[str, Any]) -> None:
        """A worker: the main process read ``msg["path"]`` (an ``encode_file`` message).
        Every subscription of that file re-reads it as if its own watch had fired."""
        if self.remote is None:
            return
        path = str(msg.get("path", ""))
        self.remote[path] = decode_file(msg)
        for sub in list(self.subscriptions):
            if sub.path == path:
                sub._on_change()

    def mirror(self, paths: dict[str, tuple[str | None, str]]) -> None:
        """The main process: keep reading (and publishing) these files although no
        subscription here applies them, ``{path: (watched_directory, type_url)}``; paths
        mirrored before and not listed now are dropped. (Route configs of listeners that
        only the workers run.)"""
        for path in list(self._mirrors):
            if path not in paths:
                self._mirrors.pop(path).cancel()
        for path, (wd, type_url) in paths.items():
            if path in self._mirrors:
                continue

            def reread(path: str = path, type_url: str = type_url) -> None:
                self._load_quietly(path, type_url, True)

            self._mirrors[path] = self.watcher.watch(path, wd, reread)
            self._load_quietly(path, type_url, False)

    def _load_quietly(self, path: str, type_url: str, changed: bool) -> None:
        try:
            self.load(path, type_url, changed)
        except (_ParseFailure, _Pending):
            pass

    def count_unknown_field(self) -> None:
        ss = getattr(self.server, "server_stats", None)
        if ss is not None:
            ss.dynamic_unknown_fields.inc()

    # --- decoding ---------------------------------------------------------------------------
    def read(self, file_path: str, type_url: str) -> tuple[str, list[DecodedResource]]:
        """Read and parse a DiscoveryResponse file: (version_info, resources).

        Raises _ParseFailure (the file is unreadable or not a DiscoveryResponse) or
        ConfigError (a resource is of the wrong type or invalid: rejected)."""
        return self.parse(file_path, self.load(file_path, type_url), type_url)

    def load(self, file_path: str, type_url: str, changed: bool = False) -> bytes:
        """The file's bytes: read here, or (a worker) the copy the main process pushed.
        _ParseFailure if unreadable, _Pending if a worker has no copy yet. With workers,
        the main process records what it read and publishes it when it is new content or
        the read followed a change of the file (``changed``)."""
        remote = self.remote
        if remote is not None:
            entry = remote.get(file_path)
            if entry is None:
                raise _Pending(file_path)
            if entry[1] is None:
                raise _ParseFailure(entry[2])
            return entry[1]
        data: bytes | None = None
        error = ""
        try:
            with open(file_path, "rb") as f:
                data = f.read()
        except OSError as e:
            error = f"unable to read file: {e.strerror or e}"
        if self.record:
            entry = (type_url, data, error)
            if changed or self.contents.get(file_path) != entry:
                self.contents[file_path] = entry
                if self.publisher is not None:
                    self.publisher(file_path)
        if data is None:
            raise _ParseFailure(error)
        return data

    def parse(self, file_path: str, raw: bytes, type_url: str) -> tuple[str, list[DecodedResource]]:
        """Decode a DiscoveryResponse from a file's bytes (the format follows the name):
        (version_info, resources). Raises _ParseFailure or ConfigError as ``read``."""
        from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse

        from pyenvoy.config.loader import load_yaml, parse_message

        lower = file_path.lower()
        response = DiscoveryResponse()
        try:
            if lower.endswith(".pb"):
                response.ParseFromString(raw)
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _ParseFailure(f"unable to read file: {e}") from None
                if lower.endswith(".pb_text"):
                    from google.protobuf import text_format

                    text_format.Parse(text, response)
                else:
                    if lower.endswith((".yaml", ".yml")):
                        data = load_yaml(text)
                    else:
                        try:
                            data = json.loads(text)
                        except json.JSONDecodeError as e:
                            raise _ParseFailure(
                                f"Unable to parse JSON as proto: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                            ) from None
                    if data is None:
                        data = {}
                    if not isinstance(data, dict):
                        raise _ParseFailure(
                            "Unable to parse JSON as proto: a DiscoveryResponse must be a mapping"
                        )
                    try:
                        parse_message(data, response)
                    except ConfigError as e:
                        if "no such field" not in e.message or self.reject_unknown:
                            raise _ParseFailure(f"Unable to parse JSON as proto: {e}") from None
                        if not self.ignore_unknown:
                            log.warning(
                                "Unknown field: type envoy.service.discovery.v3.DiscoveryResponse reason %s",
                                e,
                            )
                        self.count_unknown_field()
                        response = DiscoveryResponse()
                        try:
                            parse_message(data, response, allow_unknown_fields=True)
                        except ConfigError as e2:
                            raise _ParseFailure(f"Unable to parse JSON as proto: {e2}") from None
        except _ParseFailure:
            raise
        except ConfigError as e:  # YAML syntax
            raise _ParseFailure(str(e)) from None
        except OSError as e:
            raise _ParseFailure(f"unable to read file: {e.strerror or e}") from None
        except Exception as e:  # text/binary proto errors
            raise _ParseFailure(f"{type(e).__name__}: {e}") from None
        return response.version_info, self.decode(
            response.resources, type_url, response.version_info
        )

    def decode(self, resources: Any, type_url: str, version: str) -> list[DecodedResource]:
        from pyenvoy.config.loader import unpack_any
        from pyenvoy.config.validate import validate_message

        out: list[DecodedResource] = []
        want = type_url.rsplit("/", 1)[-1]
        for i, res in enumerate(resources):
            rpath = f"resources[{i}]"
            got = res.type_url.rsplit("/", 1)[-1]
            name = ""
            rversion = version
            if got == _RESOURCE_WRAPPER:
                wrapper = unpack_any(res, rpath)
                name = wrapper.name  # type: ignore[attr-defined]
                rversion = wrapper.version or version  # type: ignore[attr-defined]
                res = wrapper.resource  # type: ignore[attr-defined]
                rpath = f"{rpath}.resource"
                got = res.type_url.rsplit("/", 1)[-1]
            if got != want:
                raise ConfigError(
                    f"Unexpected type URL '{res.type_url}', expected '{type_url}'", rpath
                )
            msg = unpack_any(res, rpath)
            validate_message(msg, rpath)
            out.append(DecodedResource(name or _resource_name(msg), msg, i, rversion))
        return out


class FilesystemSubscription:
    """One watched DiscoveryResponse file feeding one callback."""

    def __init__(
        self,
        manager: XdsManager,
        file_path: str,
        watched_directory: str | None,
        type_url: str,
        callback: Callable[[list[DecodedResource], str], Any],
        stats: SubscriptionStats,
    ) -> None:
        self.manager = manager
        self.path = file_path
        self.watched_directory = watched_directory
        self.type_url = type_url
        self.callback = callback
        self.stats = stats
        self.initial_fetch_timeout = 15.0
        self.version_info = ""
        self.last_updated: float | None = None
        self.initialized = False
        self._watch: _Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._changed = False
        self.stopped = False

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """First fetch (synchronous callbacks), then watch the file."""
        self._watch_file()
        self.refresh()

    async def start_async(self) -> None:
        """First fetch awaiting an async callback (LDS/CDS), then watch the file."""
        self._watch_file()
        await self._apply()

    def _watch_file(self) -> None:
        if self.stopped or self in self.manager.subscriptions:
            return
        self.manager.subscriptions.append(self)
        if self.manager.remote is None:  # a worker is told of changes (XdsManager.push)
            self._watch = self.manager.watcher.watch(
                self.path, self.watched_directory, self._on_change
            )

    def stop(self) -> None:
        self.stopped = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        try:
            self.manager.subscriptions.remove(self)
        except ValueError:
            pass

    def _on_change(self) -> None:
        if self.stopped:
            return
        self._changed = True
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self.refresh()

    # --- updates -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read and apply the file now (an async callback continues in a task)."""
        outcome = self._read()
        if outcome is None:
            return
        version, resources = outcome
        try:
            result = self.callback(resources, version)
        except ConfigError as e:
            self._rejected(e)
            return
        except Exception as e:
            log.exception("applying %s failed", self.path)
            self._rejected(e)
            return
        if inspect.isawaitable(result):
            self._task = asyncio.get_running_loop().create_task(self._finish(result, version))
            return
        self._accepted(version)

    async def _apply(self) -> None:
        outcome = self._read()
        if outcome is None:
            return
        version, resources = outcome
        try:
            result = self.callback(resources, version)
            if inspect.isawaitable(result):
                await result
        except ConfigError as e:
            self._rejected(e)
            return
        except Exception as e:
            log.exception("applying %s failed", self.path)
            self._rejected(e)
            return
        self._accepted(version)

    async def _finish(self, result: Any, version: str) -> None:
        try:
            await result
        except ConfigError as e:
            self._rejected(e)
        except Exception as e:
            log.exception("applying %s failed", self.path)
            self._rejected(e)
        else:
            self._accepted(version)
        finally:
            if self._again and not self.stopped:
                self._again = False
                self._task = None
                self._changed = True
                self.refresh()

    def _read(self) -> tuple[str, list[DecodedResource]] | None:
        """The "file content -> resources" step, one home for a file read here and for
        content the main process pushed (a worker)."""
        changed, self._changed = self._changed, False
        try:
            raw = self.manager.load(self.path, self.type_url, changed)
        except _Pending:
            return None  # a worker before the main process sent this file
        except _ParseFailure as e:
            self.stats.update_attempt.inc()
            self.stats.update_failure.inc()
            log.warning("Filesystem config update failure: in %s, %s", self.path, e)
            self.initialized = True
            return None
        self.stats.update_attempt.inc()
        try:
            return self.manager.parse(self.path, raw, self.type_url)
        except _ParseFailure as e:
            self.stats.update_failure.inc()
            log.warning("Filesystem config update failure: in %s, %s", self.path, e)
            self.initialized = True
            return None
        except ConfigError as e:
            self._rejected(e)
            return None

    def _rejected(self, e: BaseException) -> None:
        self.stats.update_rejected.inc()
        self.initialized = True
        log.warning("Filesystem config update rejected: %s", e)

    def _accepted(self, version: str) -> None:
        s = self.stats
        s.update_success.inc()
        s.update_time.set(now_ms())
        s.version.set(xxhash64(version.encode()))
        s.version_text.set(version)
        self.version_info = version
        self.last_updated = time.time()
        self.initialized = True
