"""Benchmark pyenvoy against real Envoy on the same config, upstream and load.

Strategy: one rendered config file (benchmarks/configs/bench.yaml with free
loopback ports filled in) is handed to BOTH proxies, each started with
``--concurrency 1``.  One nginx (its own config in a temp dir) is the HTTP
upstream and a Python sink (benchmarks/tcpbench.py) the tcp_proxy upstream,
both started once for the whole run.  For every scenario and round the harness
starts envoy, warms up, measures with wrk (or the tcpbench sender), stops it,
then does the same for pyenvoy: envoy, pyenvoy, envoy, pyenvoy, ...  Each
round yields a ratio pyenvoy/envoy taken from two measurements seconds apart,
so slow drift on this shared 2-core machine (other jobs, thermal, page cache)
cancels inside the ratio; the reported figure is the median of those
round-by-round ratios, which one disturbed round cannot move much.  Proxies
run in their own session so that stopping one kills all of its processes, and
the CPU time of that session during the measured window gives CPU per request.

    python benchmarks/run.py                         # all scenarios, 7 rounds x 5 s
    python benchmarks/run.py --rounds 3 --duration 3 --scenario small_c32
    python benchmarks/run.py --pyenvoy-cmd 'envoy -c {config} --concurrency 1 -l error --disable-hot-restart'
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG = HERE / "configs" / "bench.yaml"
RESULTS_DIR = HERE / "results"
WRK_DIR = HERE / "wrk"

ENVOY_CMD = "envoy -c {config} --concurrency 1 -l error --disable-hot-restart"
PYENVOY_CMD = "{python} -m pyenvoy -c {config} --concurrency 1 -l error"

SMALL_BODY = b"0123456789abcdef" * 8  # 128 bytes
LARGE_SIZE = 1 << 20
PORT_RANGE = (20000, 32000)  # below the kernel's ephemeral range (32768+)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "wrk" | "tcp"
    description: str
    upstream: str
    path: str = "/small"
    connections: int = 32
    headers: tuple[str, ...] = ()
    script: str | None = None  # request script under benchmarks/wrk/


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "small_c32",
        "wrk",
        "GET 128-byte body, keep-alive, 32 connections",
        "nginx (return 200)",
    ),
    Scenario(
        "small_c256",
        "wrk",
        "GET 128-byte body, keep-alive, 256 connections",
        "nginx (return 200)",
        connections=256,
    ),
    Scenario(
        "large_1m",
        "wrk",
        "GET 1 MiB body, keep-alive, 32 connections",
        "nginx (static file, sendfile)",
        path="/1m",
    ),
    Scenario(
        "post_64k",
        "wrk",
        "POST 64 KiB body, 2-byte reply, keep-alive, 32 connections",
        "nginx (body read in full via mirror_request_body)",
        path="/post",
        script="post_64k.lua",
    ),
    Scenario(
        "conn_close",
        "wrk",
        "GET 128-byte body, Connection: close (new connection per request), 32 connections",
        "nginx (return 200, upstream pooled)",
        headers=("Connection: close",),
    ),
    Scenario(
        "tcp_bulk",
        "tcp",
        "tcp_proxy, one connection streaming 64 MiB transfers one way",
        "python sink (benchmarks/tcpbench.py)",
    ),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


# --------------------------------------------------------------------------- tools


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """Install wrk and nginx from Debian packages when they are missing."""
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not _which(tool)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"missing tools {missing}: install them (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep the package's own nginx service from starting on port 80.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None
    )


def free_ports(n: int) -> list[int]:
    """Pick n distinct free loopback ports below the ephemeral range."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def wait_http_ok(
    port: int, path: str, timeout: float, proc: subprocess.Popen[bytes] | None
) -> None:
    """Poll until GET path on 127.0.0.1:port answers 200 (proves the data path)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        try:
            status = http_get_status(port, path)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready after {timeout}s ({last})")


def http_get_status(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def http_get_body(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise OSError("not 200")
    return body.decode("latin-1")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process's whole session, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (worker processes)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"process {proc.pid} did not die")


def cpu_by_session(sids: tuple[int, ...]) -> dict[int, float]:
    """utime+stime seconds of all live processes per session id (threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(sids, 0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        # fields[0] is field 3 (state): session is field 6, utime 14, stime 15.
        sid = int(fields[3])
        if sid in totals:
            totals[sid] += int(fields[11]) + int(fields[12])
    return {sid: t / tick for sid, t in totals.items()}


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine: float  # user+nice+system seconds of the whole machine
    steal: float  # seconds the hypervisor ran something else on our vCPUs
    ours: float  # proxy + upstreams + load generator + this script
    proxy: float

    @classmethod
    def take(cls, proxy_sid: int, helper_sids: tuple[int, ...]) -> CpuSnapshot:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        tck = os.sysconf("SC_CLK_TCK")
        machine = (int(cpu[1]) + int(cpu[2]) + int(cpu[3])) / tck
        steal = int(cpu[8]) / tck if len(cpu) > 8 else 0.0
        sessions = cpu_by_session((proxy_sid, *helper_sids))
        usage = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            usage += ru.ru_utime + ru.ru_stime
        return cls(
            time.monotonic(), machine, steal, sum(sessions.values()) + usage, sessions[proxy_sid]
        )


def foreign_cores(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU (in cores) that processes outside this benchmark used during the window, plus
    the time the hypervisor stole from this VM's CPUs (/proc/stat "steal").

    Softirq time (loopback packet processing) is left out on both sides, so
    this approximates other users of the machine: the number that explains a
    disturbed round on a shared box.
    """
    wall = max(after.wall - before.wall, 1e-9)
    others = max(0.0, (after.machine - before.machine) - (after.ours - before.ours))
    return (others + max(0.0, after.steal - before.steal)) / wall


def _pin(cpu: int | None) -> Any:
    if cpu is None:
        return None

    def preexec() -> None:
        os.sched_setaffinity(0, {cpu})

    return preexec


# ----------------------------------------------------------------------- upstreams


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {tmp}/www;
    location = /small {{ default_type text/plain; return 200 "{small}"; }}
    location = /1m {{ default_type application/octet-stream; try_files /1m.bin =404; }}
    # mirror_request_body makes nginx read the whole request body before it
    # answers (a bare "return" would answer first and discard the body later).
    location = /post {{
      client_max_body_size 2m;
      client_body_buffer_size 1m;
      mirror /_drop;
      mirror_request_body on;
      default_type text/plain;
      return 200 "ok";
    }}
    location = /_drop {{ internal; return 204; }}
  }}
}}
"""


def start_nginx(tmp: Path, port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    www = tmp / "www"
    www.mkdir()
    (www / "1m.bin").write_bytes(os.urandom(LARGE_SIZE))
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, small=SMALL_BODY.decode()))
    nginx = _which("nginx") or "nginx"
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "nginx-stderr.log", "wb"),
        start_new_session=True,
        preexec_fn=_pin(cpu),
    )
    try:
        wait_http_ok(port, "/small", 10, proc)
    except RuntimeError:
        stop_process(proc)
        raise
    return proc


def start_sink(tmp: Path, port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "tcpbench.py"), "sink", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "sink.log", "wb"),
        start_new_session=True,
        preexec_fn=_pin(cpu),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        stop_process(proc)
        raise RuntimeError(f"tcp sink failed to start: {line!r}")
    return proc


# ------------------------------------------------------------------------- config


def render_config(template: Path, ports: dict[str, int], out: Path) -> None:
    """Rewrite admin/listener/endpoint ports of the benchmark config."""
    cfg = yaml.safe_load(template.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    listeners = {lst["name"]: lst for lst in cfg["static_resources"]["listeners"]}
    listeners["http"]["address"]["socket_address"]["port_value"] = ports["http"]
    listeners["tcp"]["address"]["socket_address"]["port_value"] = ports["tcp"]
    upstream_of = {"nginx": ports["nginx"], "tcp_sink": ports["sink"]}
    for cluster in cfg["static_resources"]["clusters"]:
        port = upstream_of[cluster["name"]]
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))


# -------------------------------------------------------------------- measurement


@dataclass
class Proxy:
    label: str
    argv: list[str]
    log_path: Path
    cpu: int | None
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)

    def start(self, http_port: int, timeout: float) -> None:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            logf.write(
                f"\n==== start {time.strftime('%H:%M:%S')}: {shlex.join(self.argv)}\n".encode()
            )
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pin(self.cpu),
                cwd=REPO,
            )
        try:
            wait_http_ok(http_port, "/small", timeout, self.proc)
        except RuntimeError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{self.label} failed to start: {exc}\n--- log tail ---\n{tail}"
            ) from None
        self.starts.append(time.monotonic() - t0)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def admin_counters(admin_port: int) -> dict[str, int]:
    """A few sanity counters from the admin /stats endpoint (empty if unavailable)."""
    wanted = (
        "http.bench_http.downstream_cx_total",
        "http.bench_http.downstream_rq_total",
        "tcp.bench_tcp.downstream_cx_total",
        "cluster.nginx.upstream_cx_total",
        "cluster.nginx.upstream_rq_total",
        "cluster.tcp_sink.upstream_cx_total",
    )
    try:
        text = http_get_body(admin_port, "/stats")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name in wanted and value.strip().isdigit():
            out[name] = int(value)
    return out


def run_wrk(
    sc: Scenario, http_port: int, duration: int, threads: int, script: Path, cpu: int | None
) -> dict[str, Any]:
    conns = max(sc.connections, threads)
    argv = [
        _which("wrk") or "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
    ]
    for h in sc.headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{http_port}{sc.path}")
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, preexec_fn=_pin(cpu)
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({res.returncode}): {res.stdout[-1000:]} {res.stderr[-1000:]}"
        )
    data = json.loads(line[len("WRKJSON ") :])
    seconds = data["duration_us"] / 1e6
    errors = sum(data["errors"].values())
    lat = data["latency_us"]
    return {
        "requests": data["requests"],
        "seconds": round(seconds, 3),
        "rps": data["requests"] / seconds,
        "mb_per_s": data["bytes"] / seconds / 1e6,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "mean_ms": lat["mean"] / 1000,
        "max_ms": lat["max"] / 1000,
        "errors": data["errors"],
        "error_total": errors,
    }


def run_tcp(tcp_port: int, duration: int, cpu: int | None) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "tcpbench.py"),
        "send",
        "--port",
        str(tcp_port),
        "--duration",
        str(duration),
    ]
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, preexec_fn=_pin(cpu)
    )
    if res.returncode != 0:
        raise RuntimeError(f"tcpbench send failed: {res.stderr[-1500:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "bytes": data["bytes"],
        "seconds": round(data["seconds"], 3),
        "mb_per_s": data["mb_per_s"],
        "error_total": 0,
    }


def _describe(sc: Scenario, m: dict[str, Any]) -> str:
    if sc.kind == "wrk":
        text = f"{m['rps']:,.0f} req/s, p99 {m['p99_ms']:.2f} ms"
    else:
        text = f"{m['mb_per_s']:,.0f} MB/s"
    text += f", proxy CPU {m['proxy_cpu_util']:.2f}, others {m['foreign_cores']:.2f} cores"
    if m["error_total"]:
        text += f", {m['error_total']} ERRORS"
    return text


def measure(
    proxy: Proxy,
    sc: Scenario,
    ports: dict[str, int],
    args: argparse.Namespace,
    scripts: dict[str, Path],
    load_cpu: int | None,
    helper_sids: tuple[int, ...],
) -> dict[str, Any]:
    """Start the proxy, warm up, measure one run, stop the proxy."""

    def load(seconds: int) -> dict[str, Any]:
        if sc.kind == "wrk":
            return run_wrk(sc, ports["http"], seconds, args.wrk_threads, scripts[sc.name], load_cpu)
        return run_tcp(ports["tcp"], seconds, load_cpu)

    proxy.start(ports["http"], args.start_timeout)
    try:
        if args.warmup > 0:
            load(args.warmup)
        assert proxy.proc is not None
        before = CpuSnapshot.take(proxy.proc.pid, helper_sids)
        result = load(args.duration)
        after = CpuSnapshot.take(proxy.proc.pid, helper_sids)
        cpu = after.proxy - before.proxy
        if sc.kind == "wrk":
            result["cpu_us_per_req"] = cpu / max(result["requests"], 1) * 1e6
        else:
            result["cpu_s_per_gb"] = cpu / max(result["bytes"], 1) * 1e9
        result["proxy_cpu_s"] = round(cpu, 3)
        result["proxy_cpu_util"] = round(cpu / max(after.wall - before.wall, 1e-9), 3)
        result["foreign_cores"] = round(foreign_cores(before, after), 3)
        result["admin"] = admin_counters(ports["admin"])
        result["loadavg_1m"] = os.getloadavg()[0]
        return result
    finally:
        proxy.stop()


# ------------------------------------------------------------------------ summary


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(
    sc: Scenario, rounds: list[dict[str, Any]], labels: list[str], quiet: float
) -> dict[str, Any]:
    """Medians of raw values per proxy and medians of the per-round ratios."""
    metric = "rps" if sc.kind == "wrk" else "mb_per_s"
    cpu_key = "cpu_us_per_req" if sc.kind == "wrk" else "cpu_s_per_gb"
    out: dict[str, Any] = {"metric": metric, "rounds": len(rounds)}
    out["disturbed_rounds"] = sum(1 for r in rounds if r["foreign_cores"] > quiet)
    for label in labels:
        out[f"{label}_{metric}_median"] = _median([r[label][metric] for r in rounds])
        if sc.kind == "wrk":
            out[f"{label}_p99_ms_median"] = _median([r[label]["p99_ms"] for r in rounds])
        out[f"{label}_{cpu_key}_median"] = _median([r[label][cpu_key] for r in rounds])
        out[f"{label}_errors"] = sum(r[label]["error_total"] for r in rounds)
    if len(labels) != 2:
        return out
    a, b = labels
    keys = [(metric, metric), (cpu_key, "cpu")]
    if sc.kind == "wrk":
        keys.append(("p99_ms", "p99"))
    for key, name in keys:
        ratios = [r[b][key] / r[a][key] for r in rounds if r[a][key] > 0]
        out[f"{name}_ratios"] = ratios
        out[f"{name}_ratio_median"] = _median(ratios)
        quiet_ratios = [
            r[b][key] / r[a][key] for r in rounds if r[a][key] > 0 and r["foreign_cores"] <= quiet
        ]
        out[f"{name}_ratio_median_quiet_rounds"] = _median(quiet_ratios)
    return out


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(median: float | None, xs: list[float] | None) -> str:
    if median is None or not xs:
        return "–"
    return f"{median:.3f} ({min(xs):.2f}–{max(xs):.2f})"


def _rate(value: float | None, metric: str) -> str:
    return _f(value) + (" req/s" if metric == "rps" else " MB/s") if value is not None else "–"


def markdown(report: dict[str, Any]) -> str:
    """The summary table: medians of raw values and of per-round ratios."""
    labels: list[str] = report["labels"]
    two = len(labels) == 2
    head = ["scenario", "upstream", *labels]
    if two:
        head.append("rate ratio (min–max)")
    head += [f"{label} p99 ms" for label in labels]
    if two:
        head += ["p99 ratio (min–max)", "CPU ratio (min–max)"]
    head.append("disturbed rounds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sres in report["scenarios"].items():
        summ = sres.get("summary")
        if summ is None:
            continue
        metric = summ["metric"]
        row = [name, sres["upstream"]]
        for label in labels:
            cell = _rate(summ[f"{label}_{metric}_median"], metric)
            if summ[f"{label}_errors"]:
                cell += f" ⚠ {summ[f'{label}_errors']} errors"
            row.append(cell)
        if two:
            row.append(_ratio(summ[f"{metric}_ratio_median"], summ[f"{metric}_ratios"]))
        row += [_f(summ.get(f"{label}_p99_ms_median"), "{:.2f}") for label in labels]
        if two:
            row.append(_ratio(summ.get("p99_ratio_median"), summ.get("p99_ratios")))
            row.append(_ratio(summ.get("cpu_ratio_median"), summ.get("cpu_ratios")))
        row.append(f"{summ['disturbed_rounds']}/{summ['rounds']}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_rounds(report: dict[str, Any]) -> str:
    """Every round's raw numbers (CPU = proxy CPU per request or per GB)."""
    labels: list[str] = report["labels"]
    two = len(labels) == 2
    head = ["scenario", "round"]
    for label in labels:
        head += [f"{label} rate", f"{label} p99 ms", f"{label} CPU"]
    if two:
        head += ["rate ratio", "p99 ratio"]
    head.append("others+steal (cores)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sres in report["scenarios"].items():
        wrk = sres["kind"] == "wrk"
        metric = "rps" if wrk else "mb_per_s"
        for i, rnd in enumerate(sres["rounds"], 1):
            row = [name, str(i)]
            for label in labels:
                m = rnd[label]
                row += [_rate(m[metric], metric), _f(m.get("p99_ms"), "{:.2f}")]
                if wrk:
                    row.append(f"{m['cpu_us_per_req']:.1f} µs/req")
                else:
                    row.append(f"{m['cpu_s_per_gb']:.2f} s/GB")
            if two:
                a, b = (rnd[x] for x in labels)
                row.append(f"{b[metric] / a[metric]:.3f}" if a[metric] else "–")
                row.append(f"{b['p99_ms'] / a['p99_ms']:.3f}" if wrk and a["p99_ms"] else "–")
            row.append(
                f"{rnd['foreign_cores']:.2f}"
                + (f" ({rnd['attempts']} tries)" if rnd["attempts"] > 1 else "")
            )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (res.stdout + res.stderr).strip().splitlines()
    return text[0].strip() if text else ""


def interpreter(python: str) -> str:
    """Version, path and build of the interpreter that runs pyenvoy: CPython's speed depends a
    lot on how it was built (a shared libpython without PGO runs pyenvoy ~20 % slower)."""
    code = (
        "import sys; maps = open('/proc/self/maps').read(); "
        "print(sys.version.split()[0], sys.executable, "
        "'libpython.so' if 'libpython' in maps else 'libpython linked in')"
    )
    return _version([python, "-c", code])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark pyenvoy against real Envoy (interleaved rounds, median of ratios).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Command templates may use {config} (rendered config path) and {python}.",
    )
    p.add_argument("--rounds", type=int, default=7, help="rounds per scenario (default 7)")
    p.add_argument(
        "--duration", type=int, default=5, help="measured whole seconds per run (default 5)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="unmeasured whole seconds before each run (default 1)"
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIO_NAMES,
        help="run only this scenario (repeatable); default all",
    )
    p.add_argument(
        "--only", choices=("envoy", "pyenvoy"), help="measure one proxy only (no ratios)"
    )
    p.add_argument("--envoy-cmd", default=ENVOY_CMD, help=f"default: {ENVOY_CMD!r}")
    p.add_argument("--pyenvoy-cmd", default=PYENVOY_CMD, help=f"default: {PYENVOY_CMD!r}")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config template")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter filled in for {python} (default: the running one); see README, "
        '"Which Python"',
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for a proxy")
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin each proxy to CPU 1 and wrk/nginx/sink/sender to CPU 0 (default: no pinning)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        help="a round is 'disturbed' when processes outside the benchmark used more CPU "
        "than this many cores during either run (default 0.3)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="measure a disturbed round again up to N times, keeping the quietest (default 0)",
    )
    p.add_argument("--label", default="", help="tag added to the results file name")
    p.add_argument(
        "--out", type=Path, help="results JSON path (default benchmarks/results/<time>.json)"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--rounds and --duration must be >= 1, --warmup >= 0 (wrk takes whole seconds)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    labels = [x for x in ("envoy", "pyenvoy") if args.only in (None, x)]
    load_cpu, proxy_cpu = (0, 1) if args.pin else (None, None)
    if args.pin and (os.cpu_count() or 1) < 2:
        sys.exit("--pin needs at least 2 CPUs")
    ensure_tools()

    per_run = args.warmup + args.duration + 1.5
    est = len(scenarios) * args.rounds * len(labels) * per_run
    log(
        f"{len(scenarios)} scenario(s) x {args.rounds} round(s) x {len(labels)} proxy(ies), "
        f"~{est / 60:.1f} min"
    )

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="pyenvoy-bench-"))
    started: list[subprocess.Popen[bytes]] = []
    proxies: dict[str, Proxy] = {}
    report: dict[str, Any] = {}
    finished = False
    try:
        names = ("http", "tcp", "admin", "nginx", "sink")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        config = tmp / "bench.yaml"
        render_config(args.config, ports, config)
        if "envoy" in labels:
            res = subprocess.run(
                ["envoy", "-c", str(config), "--mode", "validate"], capture_output=True, text=True
            )
            if res.returncode != 0:
                sys.exit(f"real envoy rejects the benchmark config:\n{res.stdout}{res.stderr}")
        started.append(start_nginx(tmp, ports["nginx"], load_cpu))
        if any(s.kind == "tcp" for s in scenarios):
            started.append(start_sink(tmp, ports["sink"], load_cpu))
        helper_sids = tuple(p.pid for p in started)

        fmt = {"config": str(config), "python": args.python}
        cmds = {"envoy": args.envoy_cmd, "pyenvoy": args.pyenvoy_cmd}
        for label in labels:
            argv_ = [a.format(**fmt) for a in shlex.split(cmds[label])]
            proxies[label] = Proxy(label, argv_, tmp / f"{label}.log", proxy_cpu)

        scripts: dict[str, Path] = {}
        report_lua = (WRK_DIR / "report.lua").read_text()
        for sc in scenarios:
            if sc.kind != "wrk":
                continue
            body = (WRK_DIR / sc.script).read_text() if sc.script else ""
            path = tmp / f"{sc.name}.lua"
            path.write_text(body + "\n" + report_lua)
            scripts[sc.name] = path

        report = {
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "labels": labels,
            "commands": {label: shlex.join(p.argv) for label, p in proxies.items()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "ports": ports,
            "env": {
                "envoy": _version(["envoy", "--version"]),
                "python": interpreter(args.python),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "nginx": _version([_which("nginx") or "nginx", "-v"]),
                "wrk": _version([_which("wrk") or "wrk", "-v"]),
                "loadavg_start": os.getloadavg(),
            },
            "scenarios": {},
        }
        log(f"config {config}; commands: {report['commands']}")

        for sc in scenarios:
            rounds: list[dict[str, Any]] = []
            report["scenarios"][sc.name] = {
                "description": sc.description,
                "upstream": sc.upstream,
                "kind": sc.kind,
                "connections": sc.connections if sc.kind == "wrk" else 1,
                "rounds": rounds,
            }
            for i in range(args.rounds):
                best: dict[str, Any] | None = None
                for attempt in range(args.retries + 1):
                    rnd: dict[str, Any] = {}
                    for label in labels:
                        m = measure(proxies[label], sc, ports, args, scripts, load_cpu, helper_sids)
                        rnd[label] = m
                        log(f"{sc.name} round {i + 1}/{args.rounds} {label}: {_describe(sc, m)}")
                    rnd["foreign_cores"] = max(rnd[label]["foreign_cores"] for label in labels)
                    rnd["attempts"] = attempt + 1
                    if best is None or rnd["foreign_cores"] < best["foreign_cores"]:
                        best = rnd
                    if rnd["foreign_cores"] <= args.quiet_threshold:
                        break
                    more = ", measuring the round again" if attempt < args.retries else ""
                    log(
                        f"round disturbed: other processes used {rnd['foreign_cores']:.2f} cores{more}"
                    )
                assert best is not None
                rounds.append(best)
            report["scenarios"][sc.name]["summary"] = summarize(
                sc, rounds, labels, args.quiet_threshold
            )
        finished = True
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for proc in started:
            stop_process(proc)
        if report:
            report["env"]["loadavg_end"] = os.getloadavg()
            report["proxy_start_seconds"] = {
                label: _median(p.starts) for label, p in proxies.items()
            }
            out = args.out
            if out is None:
                stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                out = RESULTS_DIR / (stamp + (f"-{args.label}" if args.label else "") + ".json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
            log(f"results written to {out}")
            for label, proxy in proxies.items():
                # Keep a proxy's output when it said more than our start markers.
                text = proxy.log_path.read_text(errors="replace") if proxy.log_path.exists() else ""
                if any(ln and not ln.startswith("==== start") for ln in text.splitlines()):
                    kept = out.with_suffix(f".{label}.log")
                    kept.write_text(text)
                    log(f"{label} wrote to its log: see {kept}")
        if finished:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs and rendered config kept in {tmp}")

    print(f"\n## pyenvoy vs envoy ({args.rounds} rounds x {args.duration} s, median of ratios)\n")
    for label, cmd in report["commands"].items():
        print(f"- {label}: `{cmd}`")
    print()
    print(markdown(report))
    print("\n### Per round\n")
    print(markdown_rounds(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
