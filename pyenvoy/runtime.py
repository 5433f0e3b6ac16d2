"""The bootstrap ``layered_runtime``: key lookups with Envoy's layering and value parsing.

Strategy: every ``static_layer`` is flattened once, at construction, into ``{dotted.key:
Entry}`` (Envoy's SnapshotImpl walk: nested structs become dotted keys, except a struct
holding ``numerator``/``denominator``, which is a FractionalPercent value). Later layers
override earlier ones, so the static layers collapse into one dict. An ``admin_layer`` is
read live from the admin server's ``/runtime_modify`` overrides (plain strings, parsed per
lookup); when the bootstrap has no admin layer, lookups are one dict ``get``. Hot-path users
(circuit breaker limits) check ``dynamic`` to know whether a value can change after startup.

Envoy's lookups provided here: ``get_integer``, ``get_double``, ``get_boolean``,
``feature_enabled`` (an integer percentage, default 0..100) and ``fraction_enabled`` (a
FractionalPercent: ``random_value % denominator < numerator``), plus ``fraction`` which
resolves a key to the ``(numerator, denominator)`` in effect.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["Entry", "Runtime", "for_server", "DENOMINATORS"]

# FractionalPercent.DenominatorType -> value (by enum number and by name).
DENOMINATORS: dict[Any, int] = {
    0: 100,
    1: 10_000,
    2: 1_000_000,
    "HUNDRED": 100,
    "TEN_THOUSAND": 10_000,
    "MILLION": 1_000_000,
}


class Entry:
    """One runtime value in the forms Envoy derives from it."""

    __slots__ = ("raw", "uint_value", "double_value", "bool_value", "fraction")

    def __init__(self) -> None:
        self.raw = ""
        self.uint_value: int | None = None
        self.double_value: float | None = None
        self.bool_value: bool | None = None
        self.fraction: tuple[int, int] | None = None

    @classmethod
    def from_value(cls, value: Any) -> Entry:
        e = cls()
        if isinstance(value, bool):
            e.raw = "true" if value else "false"
            e.bool_value = value
        elif isinstance(value, (int, float)):
            e.raw = _number_text(value)
            e._set_number(float(value))
        elif isinstance(value, dict):
            e.raw = ""
            if "numerator" in value or "denominator" in value:
                try:
                    num = int(value.get("numerator", 0))
                    den = DENOMINATORS[value.get("denominator", "HUNDRED")]
                except (KeyError, TypeError, ValueError):
                    pass
                else:
                    e.fraction = (max(0, num), den)
        elif value is None:
            e.raw = ""
        else:
            e.raw = str(value)
            e._parse_text(e.raw)
        return e

    @classmethod
    def from_text(cls, text: str) -> Entry:
        e = cls()
        e.raw = text
        e._parse_text(text)
        return e

    def _parse_text(self, text: str) -> None:
        low = text.strip().lower()
        if low == "true":
            self.bool_value = True
            return
        if low == "false":
            self.bool_value = False
            return
        try:
            number = float(low)
        except ValueError:
            return
        if number != number:  # NaN
            return
        self._set_number(number)

    def _set_number(self, number: float) -> None:
        self.double_value = number
        if number >= 0 and number == int(number) and number < 2**64:
            self.uint_value = int(number)


def _number_text(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value == int(value)):
        return str(int(value))
    return repr(value)


def _flatten(prefix: str, value: Any, out: dict[str, Entry]) -> None:
    if (
        isinstance(value, dict)
        and value
        and "numerator" not in value
        and "denominator" not in value
    ):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
        return
    if prefix:
        out[prefix] = Entry.from_value(value)


class Runtime:
    """A runtime snapshot source: static layers (fixed) and an optional live admin layer."""

    __slots__ = ("static", "has_admin_layer", "_admin_source", "layer_names")

    def __init__(
        self,
        static_layers: list[dict[str, Any]] | None = None,
        *,
        admin_layer: bool = False,
        admin_source: Any = None,
        layer_names: tuple[str, ...] = (),
    ) -> None:
        merged: dict[str, Entry] = {}
        for layer in static_layers or ():
            flat: dict[str, Entry] = {}
            _flatten("", layer, flat)
            merged.update(flat)
        self.static = merged
        self.has_admin_layer = admin_layer
        # Callable returning the admin overrides dict (or None), read on each lookup.
        self._admin_source = admin_source
        self.layer_names = layer_names

    @classmethod
    def from_bootstrap(cls, bootstrap: Any, admin_source: Any = None) -> Runtime:
        """Build from a Bootstrap message (``layered_runtime``; the deprecated ``runtime``
        field is not read)."""
        from google.protobuf import json_format

        layers: list[dict[str, Any]] = []
        names: list[str] = []
        admin = False
        if bootstrap is not None and bootstrap.HasField("layered_runtime"):
            for layer in bootstrap.layered_runtime.layers:
                names.append(layer.name)
                kind = layer.WhichOneof("layer_specifier")
                if kind == "static_layer":
                    layers.append(json_format.MessageToDict(layer.static_layer))
                elif kind == "admin_layer":
                    admin = True
        return cls(layers, admin_layer=admin, admin_source=admin_source, layer_names=tuple(names))

    # --- lookups ------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        """True when values may change after startup (an admin layer exists)."""
        return self.has_admin_layer

    def get(self, key: str) -> Entry | None:
        """The final Entry for ``key`` (admin layer over static layers), or None."""
        if self.has_admin_layer and self._admin_source is not None:
            overrides = self._admin_source()
            if overrides:
                text = overrides.get(key)
                if text is not None:
                    return Entry.from_text(text)
        return self.static.get(key)

    def get_integer(self, key: str, default: int) -> int:
        e = self.get(key)
        if e is None or e.uint_value is None:
            return default
        return e.uint_value

    def get_double(self, key: str, default: float) -> float:
        e = self.get(key)
        if e is None or e.double_value is None:
            return default
        return e.double_value

    def get_boolean(self, key: str, default: bool) -> bool:
        e = self.get(key)
        if e is None or e.bool_value is None:
            return default
        return e.bool_value

    def feature_enabled(self, key: str, default_percent: int, random_value: int) -> bool:
        """Envoy's featureEnabled(key, uint64 default): a percentage 0..100."""
        e = self.get(key) if key else None
        if e is not None and e.fraction is not None:
            num, den = e.fraction
            return random_value % den < num
        percent = e.uint_value if e is not None and e.uint_value is not None else default_percent
        return random_value % 100 < min(percent, 100)

    def fraction(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        """The FractionalPercent in effect for ``key``: a fractional value, an integer taken
        as a percentage (more than 100 means always), or ``default``."""
        e = self.get(key) if key else None
        if e is not None:
            if e.fraction is not None:
                return e.fraction
            if e.uint_value is not None:
                if e.uint_value > 100:
                    return (1, 1)
                return (e.uint_value, 100)
        return default

    def fraction_enabled(
        self, key: str, numerator: int, denominator: int, random_value: int
    ) -> bool:
        """Envoy's featureEnabled(key, FractionalPercent default, random_value)."""
        if key:
            num, den = self.fraction(key, (numerator, denominator))
        else:
            num, den = numerator, denominator
        return random_value % den < num

    def __repr__(self) -> str:
        return f"Runtime({len(self.static)} static keys, admin_layer={self.has_admin_layer})"


EMPTY = Runtime()

_by_server: weakref.WeakKeyDictionary[Any, tuple[Any, Runtime]] = weakref.WeakKeyDictionary()


def for_server(server: Any) -> Runtime:
    """The Runtime of ``server``'s current bootstrap (cached per server and bootstrap)."""
    if server is None:
        return EMPTY
    bootstrap = getattr(server, "bootstrap", None)
    try:
        cached = _by_server.get(server)
    except TypeError:  # not weak-referenceable: no caching
        cached = None
    if cached is not None and cached[0] is bootstrap:
        return cached[1]

    def admin_values() -> Any:
        admin = getattr(server, "admin", None)
        return getattr(admin, "runtime_overrides", None) if admin is not None else None

    rt = Runtime.from_bootstrap(bootstrap, admin_values)
    try:
        _by_server[server] = (bootstrap, rt)
    except TypeError:
        pass
    return rt
