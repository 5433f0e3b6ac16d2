"""Route hash policies (RouteAction.hash_policy): a request -> an optional 64-bit hash.

Strategy: the protos are compiled once into a ``HashPolicy`` holding one small closure per
policy (header, cookie, connection_properties.source_ip, query_parameter) plus its
``terminal`` flag, as Envoy's ``HashPolicyImpl`` does. ``generate`` walks them in order;
each produced hash is folded in as ``rotl(old, 1) ^ new`` (so duplicate policies do not
cancel out) and a terminal policy that produced a hash stops the walk. All values are
hashed with xxHash64 exactly as Envoy does, so the same request lands on the same host in
both proxies:

- header: the header's values (after the optional ``regex_rewrite``), sorted, each hashed
  with the previous value's hash as seed (Envoy's ``HashUtil::xxHash64(span)``, checked
  against real Envoy with repeated header lines);
- cookie: the first cookie with that name (quotes stripped). With a ``ttl`` and no cookie,
  Envoy generates one (hex of xxHash64(remote address + local address)) and asks the router
  to send it back in ``set-cookie``: ``generate`` hands that header value to the
  ``add_cookie`` callback;
- source_ip: the downstream remote IP as text;
- query_parameter: the first value of that name in the raw (undecoded) query string.

``filter_state`` policies need filter state objects that are hashable, which pyenvoy does
not have: they are rejected at config time.

``compile_network_hash_policy`` compiles the L4 form (``envoy.type.v3.HashPolicy``, used by
tcp_proxy; Envoy's ``Network::HashPolicyImpl``) into the same ``HashPolicy``: its one
``source_ip`` policy is the same method (xxHash64 of the downstream IP without the port),
generated with ``headers=None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.upstream.hashing import xxhash64

__all__ = [
    "HashPolicy",
    "compile_hash_policy",
    "compile_network_hash_policy",
    "parse_cookie_value",
    "make_set_cookie_value",
]

_M64 = 0xFFFFFFFFFFFFFFFF

# A compiled policy: (headers, stream_info, add_cookie) -> hash or None
Method = Callable[[Any, Any, Any], "int | None"]
AddCookie = Callable[[bytes, bytes], None]


class HashPolicy:
    """A compiled list of hash policies (Envoy's ``Http::HashPolicyImpl``)."""

    __slots__ = ("methods",)

    def __init__(self, methods: Sequence[tuple[Method, bool]]) -> None:
        self.methods = tuple(methods)

    def __bool__(self) -> bool:
        return bool(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def generate(
        self, headers: Any, stream_info: Any, add_cookie: AddCookie | None = None
    ) -> int | None:
        """The request's hash, or None when no policy produced one. ``headers`` is None
        for an L4 connection (tcp_proxy): only ``source_ip`` can produce a hash then, as in
        Envoy (whose header-based methods yield nothing without a header map)."""
        h: int | None = None
        for method, terminal in self.methods:
            new = method(headers, stream_info, add_cookie)
            if new is not None:
                h = new if h is None else ((((h << 1) | (h >> 63)) & _M64) ^ new)
            if terminal and h is not None:
                break
        return h


def parse_cookie_value(headers: Any, name: bytes) -> bytes:
    """The value of cookie ``name`` in the request's Cookie headers (b"" when absent).

    As Envoy's ``Http::Utility::parseCookieValue``: ``;``-separated pairs, leading spaces
    of the key skipped, pairs without ``=`` ignored, one pair of surrounding double quotes
    removed from the value, the first match wins."""
    for line in headers.get_all(b"cookie"):
        for part in line.split(b";"):
            if not part:
                continue
            eq = part.find(b"=")
            if eq < 0:
                continue
            if part[:eq].lstrip(b" ") != name:
                continue
            v = part[eq + 1 :]
            if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                v = v[1:-1]
            return v
    return b""


def make_set_cookie_value(
    name: bytes,
    value: bytes,
    path: bytes,
    max_age: int,
    httponly: bool = True,
    attributes: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """``Http::Utility::makeSetCookieValue``: ``name="value"; Max-Age=..; Path=..; HttpOnly``."""
    out = name + b'="' + value + b'"'
    if max_age:
        out += b"; Max-Age=" + str(max_age).encode()
    if path:
        out += b"; Path=" + path
    for k, v in attributes:
        out += b"; " + k if not v else b"; " + k + b"=" + v
    if httponly:
        out += b"; HttpOnly"
    return out


def _header_method(name: bytes, rewrite: Callable[[bytes], bytes] | None) -> Method:
    # Envoy's request header map answers "host" with :authority (HTTP/1 Host lives there).
    pseudo = name[:1] == b":" or name == b"host"

    def header(headers: Any, stream_info: Any, add_cookie: Any) -> int | None:
        if headers is None:  # an L4 connection (tcp_proxy): no headers to hash
            return None
        if pseudo:
            v = headers.get(name)
            values = [v] if v else []
        else:
            values = [h[1] for h in headers.headers if h[0] == name]
        if not values:
            return None
        if rewrite is not None:
            values = [rewrite(v) for v in values]
        if len(values) == 1:
            return xxhash64(values[0])
        values.sort()
        h = 0
        for v in values:  # HashUtil::xxHash64(span): each value seeded with the previous hash
            h = xxhash64(v, h)
        return h

    return header


def _address_text(addr: Any) -> bytes:
    host, port = addr[0], addr[1]
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def _cookie_method(
    name: bytes, path: bytes, ttl: int | None, attributes: tuple[tuple[bytes, bytes], ...]
) -> Method:
    def cookie(headers: Any, stream_info: Any, add_cookie: AddCookie | None) -> int | None:
        if headers is None:
            return None
        value = parse_cookie_value(headers, name)
        if value:
            return xxhash64(value)
        if ttl is None:
            return None
        # Envoy generates the cookie from the connection's two addresses and hands it to
        # the router, which adds it to the response (LoadBalancerContext.setHeadersModifier).
        value = b""
        remote = getattr(stream_info, "downstream_remote_address", None)
        local = getattr(stream_info, "downstream_local_address", None)
        if remote and local:
            value = b"%016x" % xxhash64(_address_text(remote) + _address_text(local))
            if add_cookie is not None:
                add_cookie(
                    b"set-cookie", make_set_cookie_value(name, value, path, ttl, True, attributes)
                )
        return xxhash64(value)

    return cookie


def _source_ip(headers: Any, stream_info: Any, add_cookie: Any) -> int | None:
    addr = getattr(stream_info, "downstream_remote_address", None)
    if not addr or not addr[0]:
        return None
    return xxhash64(addr[0].encode())


def _query_method(name: bytes) -> Method:
    def query(headers: Any, stream_info: Any, add_cookie: Any) -> int | None:
        if headers is None:
            return None
        path = headers.path
        q = path.find(b"?")
        if q < 0:
            return None
        for param in path[q + 1 :].split(b"&"):
            eq = param.find(b"=")
            if eq < 0:
                if param == name:
                    return xxhash64(b"")
            elif param[:eq] == name:
                return xxhash64(param[eq + 1 :])
        return None

    return query


def compile_hash_policy(policies: Sequence[Any], path: str = "hash_policy") -> HashPolicy:
    """RouteAction.HashPolicy protos -> HashPolicy (ConfigError for unsupported ones)."""
    methods: list[tuple[Method, bool]] = []
    for i, p in enumerate(policies):
        ppath = f"{path}[{i}]"
        which = p.WhichOneof("policy_specifier")
        terminal = bool(p.terminal)
        if which == "header":
            rewrite = None
            if p.header.HasField("regex_rewrite"):
                rewrite = _regex_rewrite(p.header.regex_rewrite, f"{ppath}.header.regex_rewrite")
            methods.append(
                (_header_method(p.header.header_name.lower().encode(), rewrite), terminal)
            )
        elif which == "cookie":
            c = p.cookie
            ttl = c.ttl.seconds if c.HasField("ttl") else None
            attrs = tuple((a.name.encode(), a.value.encode()) for a in c.attributes)
            methods.append((_cookie_method(c.name.encode(), c.path.encode(), ttl, attrs), terminal))
        elif which == "connection_properties":
            if p.connection_properties.source_ip:
                methods.append((_source_ip, terminal))
        elif which == "query_parameter":
            methods.append((_query_method(p.query_parameter.name.encode()), terminal))
        elif which == "filter_state":
            raise ConfigError(
                "hash_policy filter_state is not supported by pyenvoy", f"{ppath}.filter_state"
            )
        else:
            raise ConfigError("hash policy not set", ppath)
    return HashPolicy(methods)


def compile_network_hash_policy(
    policies: Sequence[Any], path: str = "hash_policy"
) -> HashPolicy | None:
    """``envoy.type.v3.HashPolicy`` protos (tcp_proxy's ``hash_policy``, at most one) ->
    HashPolicy, or None when there is none (the load balancer then picks at random)."""
    if not len(policies):
        return None
    if len(policies) > 1:
        raise ConfigError("value must contain at most 1 item(s)", path)
    p = policies[0]
    ppath = f"{path}[0]"
    which = p.WhichOneof("policy_specifier")
    if which == "source_ip":
        return HashPolicy([(_source_ip, False)])
    if which == "filter_state":
        raise ConfigError(
            "hash_policy filter_state is not supported by pyenvoy", f"{ppath}.filter_state"
        )
    raise ConfigError("value is required", f"{ppath}.policy_specifier")


def _regex_rewrite(rw: Any, path: str) -> Callable[[bytes], bytes]:
    from pyenvoy.router.config import _substitution, compile_regex

    regex = compile_regex(rw.pattern.regex, f"{path}.pattern.regex")
    repl = _substitution(rw.substitution, regex)

    def rewrite(value: bytes) -> bytes:
        return regex.sub(repl, value)

    return rewrite


_CACHE: dict[int, tuple[Any, HashPolicy | None]] = {}


def hash_policy_for(policies: Any) -> HashPolicy | None:
    """A compiled HashPolicy for a route's ``hash_policy`` (already compiled or raw protos).

    Raw protos are compiled once and cached by identity (the route keeps its tuple for its
    lifetime); a policy that cannot be compiled yields None (no hash)."""
    if isinstance(policies, HashPolicy):
        return policies
    if not policies:
        return None
    entry = _CACHE.get(id(policies))
    if entry is not None and entry[0] is policies:
        return entry[1]
    try:
        compiled: HashPolicy | None = compile_hash_policy(policies)
    except ConfigError:
        compiled = None
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[id(policies)] = (policies, compiled)
    return compiled
