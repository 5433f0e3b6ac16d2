"""Run real Envoy or pyenvoy as a subprocess from a config template, and talk to it.

Strategy: a config template is YAML text with ``{name}`` placeholders. Every placeholder
whose name ends in ``_port`` and is not given explicitly gets a fresh free loopback port
(bind port 0, read it, close); other placeholders must be passed in. Only ``{word}``
tokens are substituted, so YAML flow mappings (``{ a: b }``) survive untouched. The
rendered config goes to a temporary file, the process is started with the same CLI flags
for both proxies, and ``start()`` polls the admin ``/ready`` endpoint until it answers
200 (or the process dies, or ~10 s pass: then it raises with the process's output).
``stop()`` terminates, then kills, and always reaps. Output goes to a temp file (never a
pipe) so a chatty proxy can never block on a full pipe.

Raw-socket helpers: ``exchange`` sends bytes and parses complete HTTP/1.x responses
(content-length, chunked or close-delimited), optionally waiting to see whether the server
closes; ``exchange_many`` runs several at once so Envoy's 1 s delayed close is paid once.
Stats helpers turn ``/stats``, ``/stats?format=json`` and ``/stats/prometheus`` into dicts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = [
    "EnvoyProcess",
    "Exchange",
    "envoy_local_address",
    "exchange",
    "exchange_many",
    "ProxyProcess",
    "PyEnvoyProcess",
    "RawResponse",
    "free_port",
    "parse_raw_responses",
    "prometheus_samples",
    "raw_request",
    "read_stats",
    "read_stats_json",
    "render_template",
    "start_proxy",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_base_ids = itertools.count((os.getpid() % 20000) * 10 + 100)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_template(template: str, values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Substitute ``{name}`` tokens; unknown ``*_port`` names get free ports.

    Returns the rendered text and the full mapping used (including allocated ports).
    """
    used: dict[str, Any] = dict(values)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in used:
            if name.endswith("_port"):
                used[name] = free_port()
            else:
                raise KeyError(f"config template needs a value for {{{name}}}")
        return str(used[name])

    return _PLACEHOLDER.sub(sub, template), used


class ProxyProcess:
    """A proxy subprocess started from a config template. Subclasses set the command."""

    kind = "proxy"

    def __init__(self, config_text: str, ready_timeout: float = 10.0, **values: Any) -> None:
        self.template = config_text
        self.ready_timeout = ready_timeout
        self.config_text, self.values = render_template(config_text, values)
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix=f"{self.kind}-it-")
        self.config_path = os.path.join(self._dir, "config.yaml")
        self.log_path = os.path.join(self._dir, "output.log")
        with open(self.config_path, "w") as f:
            f.write(self.config_text)

    # -- ports ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Allows proxy.listener_port, proxy.admin_port, proxy.other_port ...
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.values['admin_port']}"

    def url(self, path: str = "/", port_name: str = "listener_port") -> str:
        return f"http://127.0.0.1:{self.values[port_name]}{path}"

    # -- lifecycle -----------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def start(self) -> ProxyProcess:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=self.env(),
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last_err = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode} before ready:\n"
                    f"{self.output()[-6000:]}\n--- config ---\n{self.config_text}"
                )
            try:
                with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last_err = f"/ready -> {e.code}"
            except OSError as e:
                last_err = str(e)
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.kind} not ready after {self.ready_timeout}s ({last_err}):\n"
            f"{self.output()[-6000:]}\n--- config ---\n{self.config_text}"
        )

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ProxyProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin ---------------------------------------------------------------------------
    def admin(
        self, path: str, method: str = "GET", timeout: float = 5.0
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.admin_url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def stats(self) -> dict[str, Any]:
        return read_stats(self.admin_url)

    def stats_json(self) -> dict[str, Any]:
        return read_stats_json(self.admin_url)

    def prometheus(self) -> dict[str, float]:
        status, _, body = self.admin("/stats/prometheus")
        assert status == 200, status
        return prometheus_samples(body.decode())

    def wait_stat(self, name: str, value: int, timeout: float = 5.0) -> dict[str, Any]:
        """Poll ``/stats`` until ``name == value`` (AssertionError after ``timeout``);
        returns the stats dict that had it."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while stats.get(name) != value and time.monotonic() < deadline:
            time.sleep(0.02)
            stats = self.stats()
        assert stats.get(name) == value, f"{self.kind}: {name} is {stats.get(name)}, not {value}"
        return stats


class EnvoyProcess(ProxyProcess):
    kind = "envoy"
    executable = os.environ.get("ENVOY_BIN", "envoy")

    def command(self) -> list[str]:
        return [
            self.executable,
            "-c",
            self.config_path,
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            str(next(_base_ids)),
            "-l",
            "warning",
        ]


class PyEnvoyProcess(ProxyProcess):
    kind = "pyenvoy"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pyenvoy",
            "-c",
            self.config_path,
            "--concurrency",
            "1",
            "-l",
            "warning",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
        return env


PROXIES: dict[str, type[ProxyProcess]] = {"envoy": EnvoyProcess, "pyenvoy": PyEnvoyProcess}


def start_proxy(kind: str, config_text: str, **values: Any) -> ProxyProcess:
    """Start a proxy of the given kind ("envoy" or "pyenvoy") and wait until it is ready."""
    return PROXIES[kind](config_text, **values).start()


# -- stats --------------------------------------------------------------------------------
def _http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def read_stats(admin_url: str) -> dict[str, Any]:
    """Plain ``/stats`` as ``{name: int}``; histogram lines are kept as their text."""
    out: dict[str, Any] = {}
    for line in _http_get(admin_url + "/stats").decode().splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        try:
            out[name] = int(value)
        except ValueError:
            out[name] = value
    return out


def read_stats_json(admin_url: str) -> dict[str, Any]:
    """``/stats?format=json`` as ``{name: value}`` for counters/gauges/text readouts."""
    doc = json.loads(_http_get(admin_url + "/stats?format=json"))
    out: dict[str, Any] = {}
    for entry in doc.get("stats", []):
        if "name" in entry:
            out[entry["name"]] = entry.get("value")
    return out


def prometheus_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition as ``{'name{l="v",...}': value}`` (labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


# -- raw sockets --------------------------------------------------------------------------
class RawResponse:
    """One HTTP/1.x response parsed from raw bytes."""

    __slots__ = ("version", "status", "reason", "headers", "body", "raw_head")

    def __init__(
        self,
        version: str,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
        raw_head: bytes,
    ) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]

    def __repr__(self) -> str:
        return f"RawResponse({self.status} {self.reason!r}, {self.headers!r}, {self.body[:200]!r})"


def raw_request(
    port: int,
    data: bytes | list[bytes],
    *,
    timeout: float = 5.0,
    host: str = "127.0.0.1",
    shut_write: bool = False,
    gap: float = 0.0,
    until_closed: bool = True,
    expect_responses: int | None = None,
) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes (or timeout). Returns (bytes, closed).

    ``data`` may be a list of pieces sent with ``gap`` seconds between them. With
    ``until_closed=False`` reading stops once ``expect_responses`` complete responses
    have arrived (the connection stays open: ``closed`` is False).
    """
    pieces = [data] if isinstance(data, bytes) else data
    buf = b""
    closed = False
    with socket.create_connection((host, port), timeout=timeout) as s:
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)
            s.sendall(piece)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            if not until_closed and expect_responses is not None:
                try:
                    if len(parse_raw_responses(buf)) >= expect_responses:
                        break
                except ValueError:
                    pass
    return buf, closed


def parse_raw_responses(
    data: bytes, head_request_indexes: frozenset[int] = frozenset(), strict: bool = True
) -> list[RawResponse]:
    """Split a byte stream into HTTP/1.x responses (CL, chunked or read-to-close bodies).

    Indexes listed in ``head_request_indexes`` are responses to HEAD (no body). Raises
    ValueError on an incomplete trailing response when ``strict``.
    """
    out: list[RawResponse] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if strict:
                raise ValueError(f"incomplete head: {data[pos : pos + 200]!r}")
            break
        head = data[pos : end + 4]
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        status = int(code)
        pos = end + 4
        hmap = {k.lower(): v for k, v in headers}
        body = b""
        no_body = len(out) in head_request_indexes or status < 200 or status in (204, 304)
        if no_body:
            pass
        elif "chunked" in hmap.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    raise ValueError("incomplete chunk size")
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    trailer_end = data.find(b"\r\n", pos)
                    while trailer_end != pos:  # skip trailers
                        if trailer_end < 0:
                            raise ValueError("incomplete trailers")
                        pos = trailer_end + 2
                        trailer_end = data.find(b"\r\n", pos)
                    pos += 2
                    break
                if pos + size + 2 > len(data):
                    raise ValueError("incomplete chunk")
                chunks.append(data[pos : pos + size])
                pos += size + 2
            body = b"".join(chunks)
        elif "content-length" in hmap:
            n = int(hmap["content-length"])
            if pos + n > len(data):
                if strict:
                    raise ValueError("incomplete body")
            body = data[pos : pos + n]
            pos += n
        else:
            body = data[pos:]
            pos = len(data)
        out.append(RawResponse(version, status, reason, headers, body, head))
    return out


class Exchange:
    """The outcome of one raw-socket conversation: parsed responses and whether it closed."""

    __slots__ = ("responses", "closed", "raw", "elapsed", "error")

    def __init__(
        self, responses: list[RawResponse], closed: bool, raw: bytes, elapsed: float, error: str
    ) -> None:
        self.responses = responses
        self.closed = closed
        self.raw = raw
        self.elapsed = elapsed
        self.error = error

    @property
    def response(self) -> RawResponse:
        assert self.responses, f"no response: raw={self.raw[:300]!r} error={self.error}"
        return self.responses[0]

    def __repr__(self) -> str:
        return f"Exchange(closed={self.closed}, {self.responses!r}, error={self.error!r})"


def exchange(
    port: int,
    data: bytes | list[bytes],
    *,
    responses: int = 1,
    head: frozenset[int] = frozenset(),
    wait_close: float = 0.0,
    timeout: float = 3.0,
    gap: float = 0.0,
    host: str = "127.0.0.1",
) -> Exchange:
    """Send raw bytes and read ``responses`` complete responses.

    Then, if ``wait_close`` > 0, keep reading up to that long to see whether the server
    closes the connection (``closed``); bytes after the expected responses stay in ``raw``.
    Envoy delays closing by up to 1 s (delayed_close_timeout), so use ``wait_close=3``
    when a close is expected.
    """
    pieces = [data] if isinstance(data, bytes) else data
    buf = b""
    closed = False
    error = ""
    parsed: list[RawResponse] = []
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        for i, piece in enumerate(pieces):
            if i and gap:
                time.sleep(gap)
            try:
                s.sendall(piece)
            except OSError as e:  # the server may close early on a bad request
                error = repr(e)
                break
        deadline = time.monotonic() + timeout
        phase_close = False
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            s.settimeout(max(0.01, deadline - now))
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                break
            except OSError as e:
                error = repr(e)
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            if not phase_close:
                try:
                    parsed = parse_raw_responses(buf, head, strict=True)
                except ValueError:
                    continue
                if len(parsed) >= responses:
                    if wait_close <= 0:
                        break
                    phase_close = True
                    deadline = time.monotonic() + wait_close
    if closed or not parsed or len(parsed) < responses:
        # A close-delimited body may have arrived after its head was parsed: re-read all.
        try:
            reparsed = parse_raw_responses(buf, head, strict=False)
            if len(reparsed) >= len(parsed):
                parsed = reparsed
        except ValueError as e:
            if not parsed:
                error = error or repr(e)
    return Exchange(parsed, closed, buf, time.monotonic() - start, error)


def exchange_many(port: int, cases: Mapping[str, Mapping[str, Any]]) -> dict[str, Exchange]:
    """Run several ``exchange`` calls concurrently (threads); ``cases`` maps id -> kwargs
    (``data`` required). Used to wait out Envoy's delayed close once for many cases."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(cases)))) as pool:
        futs = {name: pool.submit(exchange, port, **dict(kw)) for name, kw in cases.items()}
        return {name: f.result() for name, f in futs.items()}


def envoy_local_address() -> str:
    """The address Envoy appends to x-forwarded-for for loopback peers (use_remote_address):
    the first non-loopback IPv4 interface address, as Envoy's getLocalAddress() picks it."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(
                    s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15])
                )
            except OSError:
                continue
            addr = socket.inet_ntoa(packed[20:24])
            if not addr.startswith("127."):
                return addr
    return "127.0.0.1"
