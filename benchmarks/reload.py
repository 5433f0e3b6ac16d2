"""Config reloads under load: pyenvoy (SIGHUP) vs real Envoy (filesystem LDS/CDS renames).

Strategy: one nginx upstream (benchmarks/run.py's) and, for each proxy in turn, continuous
``wrk`` keep-alive load (32 connections) while the config is changed ``--reloads`` times,
every ``--interval`` seconds, alternating between two versions A and B. A version differs
in the route (response header ``x-config: A|B``) and in the cluster (connect timeout), so
every reload modifies the listener's filter chain AND the cluster:

- pyenvoy: the static config file is rewritten (write + rename) and the process gets SIGHUP;
- Envoy: new CDS then LDS DiscoveryResponse files are renamed into place (its own filesystem
  xDS; Envoy has no SIGHUP reload).

Both run with ``--concurrency 1 --drain-time-s 2`` (gradual drain: old connections are told
``connection: close`` within 2 s and wrk reconnects). After each change a fresh connection
polls until it sees the new ``x-config`` (the apply latency). Reported per proxy: requests,
wrk's socket errors (connect/read/write/timeout) and non-2xx responses, reload apply
latency, and the proxy's own counters (updates accepted, listeners/clusters modified,
connections drained).

    python benchmarks/reload.py                      # 20 reloads each, about 40 s
    python benchmarks/reload.py --reloads 5 --only pyenvoy
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: nginx, wrk, ports, process helpers)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def listener(port: int, version: str) -> dict[str, Any]:
    return {
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": "bench_http",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "route": {"cluster": "nginx"},
                                                "response_headers_to_add": [
                                                    {
                                                        "header": {
                                                            "key": "x-config",
                                                            "value": version,
                                                        }
                                                    }
                                                ],
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def cluster(nginx_port: int, version: str) -> dict[str, Any]:
    return {
        "name": "nginx",
        "type": "STATIC",
        "connect_timeout": "1s" if version == "A" else "2s",
        "load_assignment": {
            "cluster_name": "nginx",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": nginx_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


class Target:
    """One proxy under test and how to change its config."""

    def __init__(self, kind: str, tmp: Path, ports: dict[str, int]) -> None:
        self.kind = kind
        self.tmp = tmp
        self.ports = ports
        self.config = tmp / f"{kind}.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"{kind}.log"
        self.serial = 0

    def write_version(self, version: str) -> None:
        p = self.ports
        self.serial += 1
        admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p["admin"]}}}
        if self.kind == "pyenvoy":
            write_atomic(
                self.config,
                {
                    "admin": admin,
                    "static_resources": {
                        "listeners": [listener(p["http"], version)],
                        "clusters": [cluster(p["nginx"], version)],
                    },
                },
            )
            return
        # Envoy: CDS first (the route's cluster), then LDS, each a DiscoveryResponse file.
        v = f"{version}{self.serial}"
        write_atomic(
            self.tmp / "cds.yaml",
            {
                "version_info": v,
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                        **cluster(p["nginx"], version),
                    }
                ],
            },
        )
        write_atomic(
            self.tmp / "lds.yaml",
            {
                "version_info": v,
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                        **listener(p["http"], version),
                    }
                ],
            },
        )

    def start(self, args: argparse.Namespace) -> None:
        self.write_version("A")
        flags = ["--concurrency", "1", "-l", "error", "--drain-time-s", str(args.drain_time)]
        if self.kind == "pyenvoy":
            argv = [sys.executable, "-m", "pyenvoy", "-c", str(self.config), *flags]
        else:
            write_atomic(
                self.config,
                {
                    "node": {"id": "bench", "cluster": "bench"},
                    "admin": {
                        "address": {
                            "socket_address": {
                                "address": "127.0.0.1",
                                "port_value": self.ports["admin"],
                            }
                        }
                    },
                    "dynamic_resources": {
                        "lds_config": {"path_config_source": {"path": str(self.tmp / "lds.yaml")}},
                        "cds_config": {"path_config_source": {"path": str(self.tmp / "cds.yaml")}},
                    },
                },
            )
            argv = [args.envoy, "-c", str(self.config), *flags, "--disable-hot-restart"]
        with open(self.log, "ab") as logf:
            logf.write(f"==== {shlex.join(argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=bench.REPO,
            )
        bench.wait_http_ok(self.ports["http"], "/small", 30, self.proc)

    def reload(self, version: str) -> None:
        self.write_version(version)
        if self.kind == "pyenvoy":
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None:
            bench.stop_process(self.proc)
            self.proc = None

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            text = bench.http_get_body(self.ports["admin"], "/stats")
        except OSError:
            return out
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


def served_version(port: int) -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /small HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"x-config:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def measure(kind: str, args: argparse.Namespace, nginx_port: int) -> dict[str, Any]:
    ports = dict(zip(("admin", "http"), bench.free_ports(2), strict=True))
    ports["nginx"] = nginx_port
    tmp = Path(tempfile.mkdtemp(prefix=f"reload-{kind}-"))
    target = Target(kind, tmp, ports)
    target.start(args)
    duration = int(args.lead + args.reloads * args.interval + args.tail + 0.999)
    sc = bench.Scenario("reload", "wrk", "", "nginx", path="/small", connections=args.connections)
    wrk_out: dict[str, Any] = {}

    def load() -> None:
        wrk_out.update(
            bench.run_wrk(sc, ports["http"], duration, 1, bench.WRK_DIR / "report.lua", None)
        )

    t = threading.Thread(target=load)
    before = target.stats()
    t.start()
    time.sleep(args.lead)
    apply_ms: list[float] = []
    unapplied = 0
    for i in range(args.reloads):
        version = "B" if i % 2 == 0 else "A"
        t0 = time.monotonic()
        target.reload(version)
        while served_version(ports["http"]) != version:
            if time.monotonic() - t0 > 3:
                unapplied += 1
                break
            time.sleep(0.01)
        else:
            apply_ms.append((time.monotonic() - t0) * 1000)
        time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
    t.join(duration + 60)
    after = target.stats()
    target.stop()
    keys = (
        "listener_manager.lds.update_success",
        "listener_manager.lds.update_rejected",
        "cluster_manager.cds.update_success",
        "listener_manager.listener_modified",
        "listener_manager.listener_in_place_updated",
        "cluster_manager.cluster_modified",
        "http.bench_http.downstream_cx_drain_close",
        "http.bench_http.downstream_cx_total",
        "http.bench_http.downstream_rq_total",
    )
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {
        "kind": kind,
        "duration_s": duration,
        "wrk": wrk_out,
        "reloads": args.reloads,
        "applied": len(apply_ms),
        "not_applied_within_3s": unapplied,
        "apply_ms_median": statistics.median(apply_ms) if apply_ms else None,
        "apply_ms_max": max(apply_ms) if apply_ms else None,
        "counters": counters,
        "log_tail": target.log.read_text(errors="replace")[-1500:],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| proxy | requests | req/s | connect err | read err | write err | timeouts | non-2xx | "
        "reloads applied | apply ms (median/max) | updates accepted | cx drained (conn: close) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r["wrk"]
        e = w.get("errors", {})
        c = r["counters"]
        med = r["apply_ms_median"]
        mx = r["apply_ms_max"]
        rows.append(
            f"| {r['kind']} | {w.get('requests', 0):,} | {w.get('rps', 0):,.0f} | {e.get('connect', 0)} | "
            f"{e.get('read', 0)} | {e.get('write', 0)} | {e.get('timeout', 0)} | {e.get('status', 0)} | "
            f"{r['applied']}/{r['reloads']} | "
            f"{'-' if med is None else f'{med:.0f}'}/{'-' if mx is None else f'{mx:.0f}'} | "
            f"lds {c['listener_manager.lds.update_success']}, cds {c['cluster_manager.cds.update_success']} | "
            f"{c['http.bench_http.downstream_cx_drain_close']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reloads", type=int, default=20)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reloads")
    p.add_argument(
        "--lead", type=float, default=2.0, help="seconds of load before the first reload"
    )
    p.add_argument("--tail", type=float, default=3.0, help="seconds of load after the last reload")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--drain-time", type=int, default=2)
    p.add_argument("--only", choices=("envoy", "pyenvoy"))
    p.add_argument("--envoy", default="envoy")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    bench.ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="reload-nginx-"))
    (nginx_port,) = bench.free_ports(1)
    nginx = bench.start_nginx(tmp, nginx_port, None)
    results = []
    try:
        for kind in ("envoy", "pyenvoy"):
            if args.only and kind != args.only:
                continue
            bench.log(
                f"{kind}: {args.reloads} reloads every {args.interval}s under wrk -c{args.connections}"
            )
            results.append(measure(kind, args, nginx_port))
    finally:
        bench.stop_process(nginx)
    print(markdown(results))
    out = (
        Path(args.out)
        if args.out
        else bench.RESULTS_DIR / time.strftime("reload-%Y%m%d-%H%M%S.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    bench.log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
