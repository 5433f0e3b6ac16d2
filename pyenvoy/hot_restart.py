"""Hot restart: a new pyenvoy process takes over the listening sockets of the running one.

Strategy: follows Envoy's architecture (docs: "Hot restart"), with pyenvoy's own wire format.

- Every serving process with hot restart enabled is a potential *parent*: once LIVE it binds a
  Unix domain socket named after ``--socket-path``, ``--base-id`` and its own epoch
  (``rpc_address``; by default ``@envoy_domain_socket_pyenvoy_parent_<base-id>_<epoch>`` in
  Linux's abstract namespace, so nothing is left on disk) and answers requests on a daemon
  thread. Anything that touches the server runs on the event loop
  (``run_coroutine_threadsafe``), so the thread never races the data path.
- A process started with ``--restart-epoch N`` (N > 0) is the *child*: after compiling its
  config (a broken config never disturbs the parent) it connects to epoch N-1, checks the
  hot restart version, asks for every listening socket the parent has, by configured
  address and worker index (``listeners``, ``pass_listen_socket``; the fd rides SCM_RIGHTS),
  asks the parent to close its admin endpoint, starts serving on the *same* kernel sockets
  (their accept queues carry over: no connection is refused; sockets no listener of the new
  config claims, static or first LDS response, are closed), then sends ``drain_listeners``. The parent stops accepting and
  drains (``drain_listeners`` below); ``--parent-shutdown-time-s`` later the child sends
  ``terminate`` and the parent exits.
- Stats, as Envoy: during the overlap the child pulls the parent's counter *deltas* and its
  accumulating gauges (``*_active``, ``*_buffered``) every second and once more just before
  ``terminate``; counters therefore continue across the restart, imported gauges are
  removed when the parent goes away. ``server.parent_connections`` is the parent's open
  connection count, ``server.hot_restart_generation`` counts processes (parent's + 1).
  Histograms are not transferred (Envoy does not either).

Frames on the socket (and on the worker control channel, pyenvoy.workers): 4-byte big-endian
length + JSON object; file descriptors travel as SCM_RIGHTS on the frame that carries them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import json
import logging
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pyenvoy.drain import DrainSequence
from pyenvoy.options import HOT_RESTART_VERSION

__all__ = [
    "HotRestartError",
    "export_stats",
    "encode_frame",
    "HotRestartParent",
    "HotRestartChild",
    "ParentStats",
    "ParentHost",
    "rpc_address",
    "send_frame",
    "recv_frame",
    "FrameDecoder",
    "drain_listeners",
    "accumulates",
]

log = logging.getLogger("pyenvoy.main")

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024
MAX_FDS = 253  # SCM_MAX_FD
CONNECT_RETRY_S = 2.0
RPC_TIMEOUT_S = 30.0
STATS_IMPORT_INTERVAL_S = 1.0


class HotRestartError(Exception):
    """A hot restart cannot proceed; the message says why (printed, exit status 1)."""


# --------------------------------------------------------------------------- framing


def send_frame(sock: socket.socket, obj: Any, fds: Iterable[int] = ()) -> None:
    """Send one length-prefixed JSON frame, with ``fds`` as SCM_RIGHTS (blocking socket)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _HEADER.pack(len(body)) + body
    fd_list = list(fds)
    if fd_list:
        sent = socket.send_fds(sock, [data], fd_list)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), MAX_FDS)
        fds.extend(got)
        if not data:
            raise EOFError("peer closed the connection")
        buf += data
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Receive one frame (blocking socket): the JSON object and any fds that came with it."""
    fds: list[int] = []
    try:
        (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
        if n > MAX_FRAME:
            raise HotRestartError(f"oversized frame ({n} bytes)")
        obj = json.loads(_recv_exact(sock, n, fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if not isinstance(obj, dict):
        for fd in fds:
            os.close(fd)
        raise HotRestartError("malformed frame")
    return obj, fds


class FrameDecoder:
    """Incremental decoder for a non-blocking reader (frames without fds)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        buf = self._buf
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + n:
                break
            out.append(json.loads(bytes(buf[_HEADER.size : _HEADER.size + n])))
            del buf[: _HEADER.size + n]
        return out


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one for all frames (workers send per pass)


def encode_frame(obj: Any) -> bytes:
    body = _ENCODER.encode(obj).encode()
    return _HEADER.pack(len(body)) + body


# --------------------------------------------------------------------------- addresses


def rpc_address(socket_path: str, base_id: int, epoch: int) -> str:
    """Where the process of ``epoch`` answers its child.

    ``@name`` is Linux's abstract namespace (nothing on disk, gone with the process); other
    systems get the name as a file under the temp dir. Any other path is used as a prefix
    of a socket file (created with ``--socket-mode``)."""
    name = f"{socket_path}_pyenvoy_parent_{base_id}_{epoch}"
    if name.startswith("@"):
        if sys.platform.startswith("linux"):
            return "\0" + name[1:]
        return os.path.join(tempfile.gettempdir(), name[1:])
    return name


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _octal(mode: str) -> int:
    """``--socket-mode`` (octal text, Envoy's default ``600``)."""
    try:
        return int(mode, 8) & 0o777
    except ValueError:
        log.warning("invalid --socket-mode '%s'; using 600", mode)
        return 0o600


def _probe(address: str) -> bool:
    """Is a process listening at ``address``?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- stats


# Gauges that are whole-process state the child computes itself (Envoy's NeverImport).
_NEVER_IMPORT = frozenset(("total_listeners_active", "lb_subsets_active"))


def accumulates(name: str) -> bool:
    """Envoy's ImportMode::Accumulate for pyenvoy's gauges: in-flight amounts, which add up
    across processes (connections, requests, buffered bytes). Everything else is state each
    process owns (membership, circuit breaker flags, ``server.*``)."""
    if name.startswith("server."):
        return False
    last = name.rpartition(".")[2]
    return (last.endswith("_active") or last.endswith("_buffered")) and last not in _NEVER_IMPORT


class ParentStats:
    """What the child has imported from its parent: accumulated counter deltas and the
    parent's current accumulating gauges."""

    __slots__ = ("counters", "gauges", "connections", "generation", "_applied")

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, int] = {}
        self.connections = 0
        self.generation = 0
        self._applied: dict[str, int] = {}

    def merge(self, reply: dict[str, Any]) -> dict[str, int]:
        """Fold one ``stats`` reply in; returns this reply's counter deltas."""
        deltas: dict[str, int] = reply.get("counters", {})
        for name, d in deltas.items():
            self.counters[name] = self.counters.get(name, 0) + d
        self.gauges = {n: v for n, v in reply.get("gauges", {}).items() if accumulates(n)}
        self.connections = int(reply.get("connections", 0))
        return deltas

    def apply_to_store(self, store: Any, deltas: dict[str, int]) -> None:
        """Single-process child: counters get the deltas, imported gauges are re-based."""
        for name, d in deltas.items():
            c = store.counter_from_name(name)
            c.value += d
            c.used = True
        applied = self._applied
        for name in set(applied) | set(self.gauges):
            new = self.gauges.get(name, 0)
            old = applied.get(name, 0)
            if new != old:
                store.gauge_from_name(name).value += new - old
            if new:
                applied[name] = new
            else:
                applied.pop(name, None)

    def forget_gauges(self, store: Any | None) -> None:
        """The parent is gone: its in-flight gauges go with it."""
        if store is not None:
            for name, v in self._applied.items():
                store.gauge_from_name(name).value -= v
        self._applied.clear()
        self.gauges = {}
        self.connections = 0


def export_stats(store: Any, exported: dict[str, int]) -> dict[str, Any]:
    """Counter deltas since the last export (``exported`` is updated) and accumulating gauges."""
    counters: dict[str, int] = {}
    for name, c in list(store.counters.items()):
        v = c.value
        prev = exported.get(name, 0)
        if v > prev:
            counters[name] = v - prev
        if v != prev:
            exported[name] = v
    gauges = {
        name: g.value for name, g in list(store.gauges.items()) if g.value and accumulates(name)
    }
    return {"counters": counters, "gauges": gauges}


# --------------------------------------------------------------------------- draining


def drain_listeners(server: Any, drain_time: float, strategy: str) -> None:
    """Stop accepting on every listener and drain the open connections (hot restart parent).

    Envoy's sequence: the listeners close at once; each HTTP/1 connection is told to close
    with its next response (``connection: close``): all at once for ``immediate``, at a
    random moment of ``drain_time`` for ``gradual`` (Envoy's drain probability grows linearly
    over the drain time). Idle keep-alive connections are NOT closed: a request may already
    be on the wire. What is still open when the process exits (``--parent-shutdown-time-s``)
    is closed then; tcp_proxy connections run on until that moment.
    """
    lm = server.listener_manager
    if lm is None:
        return
    lm.stop_listening()
    server.state = "DRAINING"
    stats = getattr(server, "server_stats", None)
    if stats is not None:
        stats.state.set(1)  # DRAINING
        stats.live.set(0)
    listeners = lm.all_listeners() if hasattr(lm, "all_listeners") else lm.listeners
    conns = [c for listener in listeners for c in list(listener.connections)]
    # Each connection is marked at its moment, never while a response is on the wire (that
    # response went out keep-alive; closing after it would cut the client's next request).
    sequence = DrainSequence(drain_time, strategy, close_at_end=False)
    for listener in listeners:
        # A connection accepted just before the listener stopped opens after this point:
        # the listener hands it to the same sequence (else it would stay keep-alive until
        # the parent exits and be cut under a request).
        listener.drain = sequence
    for conn in conns:
        sequence.add(conn)


# --------------------------------------------------------------------------- parent


class ParentHost(Protocol):
    """What the parent side needs from the running process (pyenvoy.main implements it)."""

    def listen_addresses(self) -> list[tuple[str, int, int]]: ...

    def listen_fd(self, host: str, port: int, worker_index: int) -> int | None: ...

    async def shutdown_admin(self) -> float: ...

    async def drain_listeners(self) -> None: ...

    def export_stats(self) -> dict[str, Any]: ...

    def hello(self) -> dict[str, Any]: ...

    def terminate(self) -> None: ...


class HotRestartParent:
    """Answers the next epoch's requests on a daemon thread."""

    def __init__(self, options: Any, host: ParentHost, loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.host = host
        self.loop = loop
        self.epoch = int(options.restart_epoch)
        self.address = rpc_address(options.socket_path, options.base_id, self.epoch)
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._is_file = not self.address.startswith("\0")
        self.adopted: set[tuple[str, int, int]] = set()

    def start(self) -> bool:
        """Bind and serve on a daemon thread; False (with a warning) if the name is taken."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._is_file and os.path.exists(self.address):
                if _probe(self.address):
                    raise OSError(errno.EADDRINUSE, "in use")
                os.unlink(self.address)
            sock.bind(self.address)
            if self._is_file:
                os.chmod(self.address, _octal(self.options.socket_mode))
            sock.listen(4)
        except OSError as e:
            sock.close()
            # Never fatal: this process already serves. At epoch 0 it usually means another
            # pyenvoy with the same --base-id runs here (Envoy refuses to start instead; test
            # suites run many pyenvoys side by side).
            log.warning(
                "hot restart unavailable: cannot bind domain socket %s (base_id=%d, epoch=%d): "
                "%s (use a distinct --base-id per instance)",
                _printable(self.address),
                self.options.base_id,
                self.epoch,
                e.strerror or e,
            )
            return False
        self.sock = sock
        self._thread = threading.Thread(target=self._serve, name="hot-restart", daemon=True)
        self._thread.start()
        log.debug(
            "hot restart: listening for epoch %d on %s", self.epoch + 1, _printable(self.address)
        )
        return True

    def close(self) -> None:
        self._closed = True
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            if self._is_file:
                try:
                    os.unlink(self.address)
                except OSError:
                    pass

    # -- thread side ------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed and self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(None)
                try:
                    self._serve_child(conn)
                except (EOFError, ConnectionError):
                    pass
                except Exception:
                    log.exception("hot restart: request from the child failed")

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        fut = asyncio.run_coroutine_threadsafe(call(), self.loop)
        try:
            return fut.result(RPC_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def _serve_child(self, conn: socket.socket) -> None:
        while True:
            msg, fds = recv_frame(conn)
            for fd in fds:
                os.close(fd)
            op = msg.get("op")
            if op == "hello":
                reply = {"version": HOT_RESTART_VERSION, "epoch": self.epoch, "pid": os.getpid()}
                reply.update(self._on_loop(self.host.hello))
                send_frame(conn, reply)
                if msg.get("version") != HOT_RESTART_VERSION:
                    return
            elif op == "listeners":
                send_frame(conn, {"listeners": self._on_loop(self.host.listen_addresses)})
            elif op == "pass_listen_socket":
                host, port, index = str(msg["host"]), int(msg["port"]), int(msg.get("worker", 0))
                fd = self._on_loop(functools.partial(self.host.listen_fd, host, port, index))
                if fd is None:
                    send_frame(conn, {"found": False})
                else:
                    self.adopted.add((host, port, index))
                    send_frame(conn, {"found": True}, [fd])
            elif op == "shutdown_admin":
                start = self._on_loop(self.host.shutdown_admin)
                send_frame(conn, {"original_start_time": start})
            elif op == "stats":
                send_frame(conn, self._on_loop(self.host.export_stats))
            elif op == "drain_listeners":
                log.info("hot restart: epoch %d took over; draining listeners", self.epoch + 1)
                self._on_loop(self.host.drain_listeners)
                send_frame(conn, {"ok": True})
            elif op == "terminate":
                log.info("shutting down due to child request")
                send_frame(conn, {"ok": True})
                self.loop.call_soon_threadsafe(self.host.terminate)
                return
            else:
                send_frame(conn, {"error": f"unknown request {op!r}"})


# --------------------------------------------------------------------------- child


class HotRestartChild:
    """The new process's side: blocking request/reply calls to the parent."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.epoch = int(options.restart_epoch)
        self.parent_address = rpc_address(options.socket_path, options.base_id, self.epoch - 1)
        self.sock: socket.socket | None = None
        self.parent: dict[str, Any] = {}
        self.stats = ParentStats()
        self.terminated = False
        self._lock = threading.Lock()

    def connect(self, retry_for: float = CONNECT_RETRY_S) -> bool:
        """Connect and say hello. False if there is no parent and the options allow that
        (``--skip-hot-restart-on-no-parent``); HotRestartError otherwise."""
        opts = self.options
        own = rpc_address(opts.socket_path, opts.base_id, self.epoch)
        if _probe(own):
            raise HotRestartError(
                f"a pyenvoy with --restart-epoch {self.epoch} --base-id {opts.base_id} is "
                f"already running (domain socket {_printable(own)} answers)"
            )
        deadline = time.monotonic() + retry_for
        sock: socket.socket | None = None
        last: OSError = OSError(errno.ECONNREFUSED, "Connection refused")
        while sock is None:
            candidate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            candidate.settimeout(RPC_TIMEOUT_S)
            try:
                candidate.connect(self.parent_address)
                sock = candidate
            except OSError as e:
                candidate.close()
                last = e
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        if sock is None:
            if opts.skip_hot_restart_on_no_parent:
                log.warning(
                    "hot restart: no parent at epoch %d (%s); starting without one "
                    "(--skip-hot-restart-on-no-parent)",
                    self.epoch - 1,
                    _printable(self.parent_address),
                )
                return False
            raise HotRestartError(self._no_parent_message(last))
        self.sock = sock
        reply = self._call({"op": "hello", "version": HOT_RESTART_VERSION, "epoch": self.epoch})
        if reply.get("version") != HOT_RESTART_VERSION:
            self.close()
            raise HotRestartError(
                f"hot restart version mismatch: the parent (epoch {self.epoch - 1}, pid "
                f"{reply.get('pid')}) runs {reply.get('version')!r}, this process "
                f"{HOT_RESTART_VERSION!r}; hot restart into a compatible version"
            )
        self.parent = reply
        self.stats.generation = int(reply.get("generation", 1))
        log.info(
            "hot restart: connected to the parent (epoch %d, pid %s)",
            self.epoch - 1,
            reply.get("pid"),
        )
        return True

    def _no_parent_message(self, err: OSError) -> str:
        opts = self.options
        found = [
            e
            for e in range(max(0, self.epoch - 6), self.epoch + 6)
            if e != self.epoch - 1 and _probe(rpc_address(opts.socket_path, opts.base_id, e))
        ]
        hint = ""
        if found:
            hint = (
                f"; a pyenvoy with --base-id {opts.base_id} answers at epoch "
                f"{found[-1]}: use --restart-epoch {found[-1] + 1}"
            )
        return (
            f"hot restart: no parent process at --restart-epoch {self.epoch - 1} "
            f"--base-id {opts.base_id} (domain socket {_printable(self.parent_address)}: "
            f"{err.strerror or err}){hint}. Start the first process with --restart-epoch 0, "
            "or pass --skip-hot-restart-on-no-parent"
        )

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply, _ = self._call_fds(msg)
        return reply

    def _call_fds(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self.sock is None:
                raise HotRestartError("hot restart: not connected to the parent")
            try:
                send_frame(self.sock, msg)
                reply, fds = recv_frame(self.sock)
            except (OSError, EOFError) as e:
                raise HotRestartError(f"hot restart: the parent went away ({e})") from None
        if "error" in reply:
            raise HotRestartError(
                f"hot restart: the parent refused {msg.get('op')}: {reply['error']}"
            )
        return reply, fds

    def parent_listeners(self) -> list[tuple[str, int, int]]:
        """(host, configured port, number of sockets) of every listener the parent serves."""
        reply = self._call({"op": "listeners"})
        return [(str(h), int(p), int(n)) for h, p, n in reply.get("listeners", [])]

    def listen_socket(self, host: str, port: int, worker_index: int = 0) -> socket.socket | None:
        """The parent's listening socket for a configured address (and worker), or None."""
        reply, fds = self._call_fds(
            {"op": "pass_listen_socket", "host": host, "port": port, "worker": worker_index}
        )
        if not reply.get("found") or not fds:
            for fd in fds:
                os.close(fd)
            return None
        for fd in fds[1:]:
            os.close(fd)
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return sock

    def shutdown_parent_admin(self) -> float:
        """Close the parent's admin endpoint; returns the first epoch's start time."""
        reply = self._call({"op": "shutdown_admin"})
        return float(reply.get("original_start_time") or 0.0)

    def drain_parent_listeners(self) -> None:
        self._call({"op": "drain_listeners"})

    def fetch_stats(self) -> tuple[ParentStats, dict[str, int]]:
        reply = self._call({"op": "stats"})
        return self.stats, self.stats.merge(reply)

    def terminate_parent(self) -> None:
        if self.terminated:
            return
        self.terminated = True
        try:
            self._call({"op": "terminate"})
        finally:
            self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
