"""Bulk TCP throughput through a tcp_proxy listener: a sender and a sink.

Strategy: plain blocking sockets in two separate processes (so neither the
GIL nor an event loop is in the way).  The sender streams transfers over ONE
connection; each transfer is an 8-byte big-endian length N followed by N
bytes, and the sink answers each completed transfer with the 8-byte count it
received.  The sender repeats transfers until the duration is up and reports
bytes acknowledged by the sink / wall time, so only bytes that really crossed
the proxy count and no half-close support is needed from the proxy.  The sink
uses recv_into on one preallocated buffer; the sender sendall()s one
preallocated 1 MiB buffer, so both move data at C speed.

    python benchmarks/tcpbench.py sink [--port P]     # prints "READY <port>"
    python benchmarks/tcpbench.py send --port P [--duration S] [--transfer-mib N]
                                                      # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20
_LEN = struct.Struct("!Q")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def _serve_conn(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                header = _recv_exact(conn, _LEN.size)
            except ConnectionError:
                return
            (remaining,) = _LEN.unpack(header)
            got = 0
            while remaining:
                n = conn.recv_into(view, min(remaining, CHUNK))
                if not n:
                    return
                got += n
                remaining -= n
            conn.sendall(_LEN.pack(got))
    except OSError:
        return
    finally:
        conn.close()


def run_sink(port: int) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(128)
    print(f"READY {lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def run_send(host: str, port: int, duration: float, transfer_mib: int) -> dict[str, float]:
    payload = memoryview(b"\xa5" * CHUNK)
    transfer = transfer_mib * CHUNK
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    total = 0
    transfers = 0
    start = time.perf_counter()
    deadline = start + duration
    try:
        while True:
            sock.sendall(_LEN.pack(transfer))
            left = transfer
            while left:
                n = min(left, CHUNK)
                sock.sendall(payload[:n])
                left -= n
            (acked,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
            if acked != transfer:
                raise RuntimeError(f"sink acknowledged {acked} of {transfer} bytes")
            total += acked
            transfers += 1
            if time.perf_counter() >= deadline:
                break
    finally:
        sock.close()
    elapsed = time.perf_counter() - start
    return {
        "bytes": total,
        "seconds": elapsed,
        "transfers": transfers,
        "mb_per_s": total / elapsed / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p_sink = sub.add_parser("sink", help="accept connections and count bytes")
    p_sink.add_argument("--port", type=int, default=0)
    p_send = sub.add_parser("send", help="stream bytes to a sink (through a proxy)")
    p_send.add_argument("--host", default="127.0.0.1")
    p_send.add_argument("--port", type=int, required=True)
    p_send.add_argument("--duration", type=float, default=5.0)
    p_send.add_argument("--transfer-mib", type=int, default=64)
    args = parser.parse_args(argv)
    if args.mode == "sink":
        try:
            run_sink(args.port)
        except KeyboardInterrupt:
            pass
        return 0
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("only loopback targets are allowed")
    result = run_send(args.host, args.port, args.duration, args.transfer_mib)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
