"""Network helpers shared by listeners and the HTTP connection manager."""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915


@functools.cache
def local_address() -> str:
    """The machine's first non-loopback IPv4 interface address (Envoy's
    ``Network::Utility::getLocalAddress``), or 127.0.0.1 when there is none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                addr = socket.inet_ntoa(packed[20:24])
                if not addr.startswith("127."):
                    return addr
    except OSError:
        pass
    return "127.0.0.1"


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
