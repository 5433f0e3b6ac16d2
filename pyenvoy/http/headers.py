"""Header maps for the HTTP path.

Strategy: names are lowercase ``bytes`` and values ``bytes``, kept in one list of
``[name, value]`` pairs in wire order (duplicates allowed, as HTTP allows). The request
pseudo-headers (``:method``, ``:path``, ``:authority``, ``:scheme``) and the response
``:status`` live in slots, not in the list, so the hot path reads them as attributes;
``get(b":path")`` still works for matchers that name them the Envoy way.
HTTP/1 ``Host`` is stored as ``authority`` (and written back as ``host`` upstream).
"""

from __future__ import annotations

from collections.abc import Iterator


class HeaderMap:
    __slots__ = ("headers",)

    def __init__(self, headers: list[list[bytes]] | None = None) -> None:
        # Each entry is a 2-item list [name, value]; name already lowercase.
        self.headers: list[list[bytes]] = headers if headers is not None else []

    def get(self, name: bytes) -> bytes | None:
        """First value of ``name`` (lowercase bytes) or None."""
        for h in self.headers:
            if h[0] == name:
                return h[1]
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        return [h[1] for h in self.headers if h[0] == name]

    def __contains__(self, name: bytes) -> bool:
        for h in self.headers:
            if h[0] == name:
                return True
        return False

    def add(self, name: bytes, value: bytes) -> None:
        """Append a header (keeps existing values of the same name)."""
        self.headers.append([name, value])

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` with one ``value`` (position of the first kept)."""
        headers = self.headers
        for i, h in enumerate(headers):
            if h[0] == name:
                h[1] = value
                j = i + 1
                while j < len(headers):
                    if headers[j][0] == name:
                        del headers[j]
                    else:
                        j += 1
                return
        headers.append([name, value])

    def set_default(self, name: bytes, value: bytes) -> None:
        """Add ``name: value`` only if ``name`` is absent."""
        for h in self.headers:
            if h[0] == name:
                return
        self.headers.append([name, value])

    def remove(self, name: bytes) -> bool:
        """Remove every value of ``name``; True if something was removed."""
        before = len(self.headers)
        self.headers = [h for h in self.headers if h[0] != name]
        return len(self.headers) != before

    def remove_prefix(self, prefix: bytes) -> None:
        self.headers = [h for h in self.headers if not h[0].startswith(prefix)]

    def __iter__(self) -> Iterator[list[bytes]]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)

    def byte_size(self) -> int:
        return sum(len(n) + len(v) for n, v in self.headers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.headers!r})"


class RequestHeaders(HeaderMap):
    """Request headers: pseudo-headers as slots, the rest in ``headers``."""

    __slots__ = ("method", "path", "authority", "scheme")

    def __init__(
        self,
        method: bytes = b"GET",
        path: bytes = b"/",
        authority: bytes = b"",
        scheme: bytes = b"http",
        headers: list[list[bytes]] | None = None,
    ) -> None:
        self.headers = headers if headers is not None else []
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = scheme

    def get(self, name: bytes) -> bytes | None:
        if name[:1] == b":":
            return self.pseudo(name)
        if name == b"host":
            return self.authority or None
        return HeaderMap.get(self, name)

    def pseudo(self, name: bytes) -> bytes | None:
        if name == b":path":
            return self.path
        if name == b":method":
            return self.method
        if name == b":authority":
            return self.authority or None
        if name == b":scheme":
            return self.scheme
        return None

    def copy(self) -> RequestHeaders:
        return RequestHeaders(
            self.method, self.path, self.authority, self.scheme, [list(h) for h in self.headers]
        )


class ResponseHeaders(HeaderMap):
    """Response headers: ``status`` as an int slot, the rest in ``headers``."""

    __slots__ = ("status",)

    def __init__(self, status: int = 200, headers: list[list[bytes]] | None = None) -> None:
        self.headers = headers if headers is not None else []
        self.status = status

    def get(self, name: bytes) -> bytes | None:
        if name == b":status":
            return str(self.status).encode()
        return HeaderMap.get(self, name)


class ResponseTrailers(HeaderMap):
    __slots__ = ()


class RequestTrailers(HeaderMap):
    __slots__ = ()
