"""Small helpers for reading proto fields while compiling a config."""

from __future__ import annotations

from typing import Any

from pyenvoy.config.errors import ConfigError


def is_set(msg: Any, name: str) -> bool:
    """True if ``name`` is set on ``msg``: non-empty repeated/map, present message/oneof, or a
    scalar without presence that differs from its default."""
    fd = msg.DESCRIPTOR.fields_by_name[name]
    if fd.is_repeated:
        return len(getattr(msg, name)) > 0
    if fd.has_presence:
        return bool(msg.HasField(name))
    return bool(getattr(msg, name))


def reject_unsupported(msg: Any, names: tuple[str, ...], path: str) -> None:
    """ConfigError naming the first of ``names`` that is set: pyenvoy never ignores a field
    that would change behaviour."""
    for name in names:
        if is_set(msg, name):
            raise ConfigError(f"{name} is not supported by pyenvoy yet", f"{path}.{name}" if path else name)


def seconds(msg: Any, name: str, default: float) -> float:
    """A google.protobuf.Duration field in seconds, ``default`` when unset."""
    if not msg.HasField(name):
        return default
    d = getattr(msg, name)
    return float(d.seconds + d.nanos / 1e9)
