"""Configuration: Envoy v3 bootstrap loading, PGV validation and Any unpacking.

``load_bootstrap`` reads YAML/JSON into the real xds-protos messages and validates them;
``unpack_any`` turns a ``typed_config`` into its concrete message. Every problem is a
``ConfigError`` naming the field path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyenvoy.config.errors import ConfigError
from pyenvoy.config.loader import (
    load_bootstrap,
    message_class,
    message_class_for_type_url,
    parse_message,
    unpack_any,
)

if TYPE_CHECKING:
    from pyenvoy.config.validate import validate_message

__all__ = [
    "ConfigError",
    "load_bootstrap",
    "message_class",
    "message_class_for_type_url",
    "parse_message",
    "unpack_any",
    "validate_message",
]


def __getattr__(name: str) -> Any:
    # The PGV checker pulls in validate_pb2 and the deprecation annotations: load on use.
    if name == "validate_message":
        from pyenvoy.config.validate import validate_message

        return validate_message
    raise AttributeError(f"module 'pyenvoy.config' has no attribute {name!r}")
