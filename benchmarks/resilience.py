"""Resilience under load: one of three upstreams dies and comes back; how many requests fail?

Strategy: three nginx upstreams (``return 200``, one worker each) on loopback ports sit
behind one round-robin cluster. For each proxy (real Envoy 1.40 and pyenvoy, both
``--concurrency 1``, started from the same rendered config) and each route kind (with a
retry policy, and without as the baseline), wrk puts keep-alive load on the proxy; after
``--kill-at`` seconds one nginx is SIGKILLed (its connections reset, then its port
refuses), and ``--down`` seconds later it is started again on the same port. The
client-visible errors are wrk's non-2xx responses plus its socket errors. The retry route
uses ``retry_on: 5xx,reset,connect-failure``, ``num_retries: 2`` and the previous-hosts
retry predicate, so a failed attempt is retried on another host. Counters from the admin
``/stats`` (retries, connect failures) are shown beside the wrk numbers.

    python benchmarks/resilience.py                 # both proxies, retries on and off
    python benchmarks/resilience.py --only pyenvoy --duration 6

All traffic stays on 127.0.0.1 with ports picked free at start; every process started
here is stopped (SIGTERM, then SIGKILL) before the script exits.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "upstream {name}\\n"; }}
  }}
}}
"""

CONFIG = """\
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: resilience
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/retry" }}
                route:
                  cluster: trio
                  retry_policy:
                    retry_on: "5xx,reset,connect-failure"
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate }}
                    host_selection_retry_max_attempts: 3
              - match: {{ prefix: "/" }}
                route: {{ cluster: trio }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: trio
    connect_timeout: 0.25s
    lb_policy: ROUND_ROBIN
    # The default max_retries (3 retries in flight per cluster) would turn most retries
    # into retry overflows at this concurrency.
    circuit_breakers: {{ thresholds: [ {{ max_retries: 256 }} ] }}
    load_assignment:
      cluster_name: trio
      endpoints:
      - lb_endpoints:
{endpoints}
"""

ENDPOINT = """\
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def wait_ok(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


class Nginx:
    def __init__(self, base: Path, name: str, port: int) -> None:
        self.dir = base / f"nginx-{name}"
        self.dir.mkdir()
        self.port = port
        self.name = name
        (self.dir / "nginx.conf").write_text(NGINX_CONF.format(tmp=self.dir, port=port, name=name))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("nginx") or "nginx",
                "-c",
                str(self.dir / "nginx.conf"),
                "-p",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_ok(f"http://127.0.0.1:{self.port}/", 10, self.proc)

    def kill(self) -> None:
        stop(self.proc, signal.SIGKILL)
        self.proc = None


def proxy_command(kind: str, cfg: Path) -> list[str]:
    if kind == "envoy":
        return [
            "envoy",
            "-c",
            str(cfg),
            "--concurrency",
            "1",
            "-l",
            "error",
            "--disable-hot-restart",
        ]
    return [sys.executable, "-m", "pyenvoy", "-c", str(cfg), "--concurrency", "1", "-l", "error"]


def read_stats(admin: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
    return out


def parse_wrk(text: str) -> dict[str, float]:
    res: dict[str, float] = {"requests": 0, "non2xx": 0, "socket_errors": 0, "rps": 0.0}
    m = re.search(r"(\d+) requests in", text)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        res["rps"] = float(m.group(1))
    return res


def run_one(kind: str, path: str, base: Path, args: argparse.Namespace) -> dict[str, float]:
    ports = [free_port() for _ in range(3)]
    listener, admin = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix=f"res-{kind}-", dir=base))
    upstreams = [Nginx(run_dir, n, p) for n, p in zip("abc", ports, strict=True)]
    cfg = run_dir / "config.yaml"
    cfg.write_text(
        CONFIG.format(
            admin=admin,
            listener=listener,
            endpoints="".join(ENDPOINT.format(port=p) for p in ports),
        )
    )
    proxy: subprocess.Popen[bytes] | None = None
    victim = upstreams[1]
    try:
        for u in upstreams:
            u.start()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proxy = subprocess.Popen(
            proxy_command(kind, cfg),
            stdout=subprocess.DEVNULL,
            stderr=open(run_dir / "proxy.log", "wb"),
            start_new_session=True,
            env=env,
        )
        wait_ok(f"http://127.0.0.1:{listener}{path}", 30, proxy)

        def chaos() -> None:
            time.sleep(args.kill_at)
            victim.kill()
            time.sleep(args.down)
            victim.start()

        t = threading.Thread(target=chaos, daemon=True)
        t.start()
        wrk = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{args.duration}s",
                "--timeout",
                "5s",
                f"http://127.0.0.1:{listener}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=args.duration + 30,
        )
        t.join(args.duration + 10)
        res = parse_wrk(wrk.stdout)
        stats = read_stats(admin)
        for name in (
            "upstream_rq_retry",
            "upstream_rq_retry_success",
            "upstream_rq_retry_limit_exceeded",
            "upstream_rq_retry_overflow",
            "upstream_cx_connect_fail",
            "upstream_rq_503",
        ):
            res[name] = stats.get(f"cluster.trio.{name}", 0)
        return res
    finally:
        stop(proxy)
        for u in upstreams:
            u.kill()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=8, help="wrk seconds per run")
    ap.add_argument(
        "--kill-at", type=float, default=2.0, help="seconds into the run the upstream dies"
    )
    ap.add_argument("--down", type=float, default=3.0, help="seconds it stays down")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--only", choices=("envoy", "pyenvoy"))
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs without retries")
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        sys.exit("wrk and nginx are required")
    kinds = [args.only] if args.only else ["envoy", "pyenvoy"]
    paths = ["/retry"] + ([] if args.no_baseline else ["/plain"])
    base = Path(tempfile.mkdtemp(prefix="resilience-"))
    rows = []
    try:
        for path in paths:
            for kind in kinds:
                if kind == "envoy" and not shutil.which("envoy"):
                    continue
                res = run_one(kind, path, base, args)
                rows.append((kind, "on" if path == "/retry" else "off", res))
                print(f"{kind:8} retries {rows[-1][1]:3}: {res}", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"\n{args.duration}s of wrk -c{args.connections}; upstream b of 3 killed at {args.kill_at}s, "
        f"restarted {args.down}s later\n"
    )
    print(
        "| proxy | retries | requests | req/s | client errors (non-2xx + socket) | retries "
        "| retry ok | limit exceeded | retry overflow | connect fails |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, retries, r in rows:
        errors = int(r["non2xx"] + r["socket_errors"])
        print(
            f"| {kind} | {retries} | {int(r['requests'])} | {r['rps']:.0f} | {errors} "
            f"({int(r['non2xx'])} + {int(r['socket_errors'])}) | {int(r['upstream_rq_retry'])} | "
            f"{int(r['upstream_rq_retry_success'])} | {int(r['upstream_rq_retry_limit_exceeded'])} | "
            f"{int(r['upstream_rq_retry_overflow'])} | {int(r['upstream_cx_connect_fail'])} |"
        )


if __name__ == "__main__":
    main()
