"""Protobuf -> JSON exactly as Envoy's admin prints it.

Strategy: ``json_format.MessageToDict`` with proto field names does the conversion
(``@type`` for ``Any``, well-known types, int64 as strings); the dict is then reordered by
field number, because Envoy's C++ printer emits fields in field-number order while
Python's puts default-valued fields last. ``json.dumps(indent=1)`` matches Envoy's
pretty printer (one-space indent), and the body ends with a newline.

Field masks (``/config_dump?mask=``) are applied by ``trim_message``, which also walks
into ``Any`` fields (Envoy unpacks them so ``mask=cluster.name`` works on a dump entry).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, symbol_database
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_WKT_PREFIX = "google.protobuf."


def _is_map(field: FieldDescriptor) -> bool:
    mt = field.message_type
    return mt is not None and mt.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED  # older protobuf


def _find_descriptor(type_url: str) -> Descriptor | None:
    name = type_url.rsplit("/", 1)[-1]
    try:
        return symbol_database.Default().pool.FindMessageTypeByName(name)
    except KeyError:
        return None


def _order(desc: Descriptor, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    full = desc.full_name
    if full == "google.protobuf.Any":
        type_url = value.get("@type", "")
        inner = _find_descriptor(type_url)
        if inner is None or inner.full_name.startswith(_WKT_PREFIX):
            return value
        body = _order(inner, {k: v for k, v in value.items() if k != "@type"})
        return {"@type": type_url, **body}
    if full.startswith(_WKT_PREFIX):
        return value
    out: dict[str, Any] = {}
    for field in sorted(desc.fields, key=lambda f: f.number):
        if field.name not in value:
            continue
        v = value[field.name]
        if field.message_type is not None and not _is_map(field):
            if _is_repeated(field) and isinstance(v, list):
                v = [_order(field.message_type, x) for x in v]
            else:
                v = _order(field.message_type, v)
        out[field.name] = v
    for k, v in value.items():  # anything not in the descriptor stays, at the end
        if k not in out:
            out[k] = v
    return out


def message_to_dict(msg: Message, always_print: bool = False) -> dict[str, Any]:
    d = json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=always_print,
    )
    return _order(msg.DESCRIPTOR, d)


def dumps(d: Any) -> str:
    """Envoy's pretty JSON: one-space indent, UTF-8 kept, trailing newline."""
    return json.dumps(d, indent=1, ensure_ascii=False) + "\n"


def message_to_json(msg: Message, always_print: bool = False) -> str:
    return dumps(message_to_dict(msg, always_print))


# ---- field masks ------------------------------------------------------------------------


def mask_tree(paths: list[str]) -> dict[str, Any]:
    """``["a.b", "a.c", "d"]`` -> ``{"a": {"b": None, "c": None}, "d": None}``."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        parts = [p for p in path.split(".") if p]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                node[part] = None
            else:
                child = node.get(part, {})
                if child is None:
                    break  # a shorter path already keeps the whole field
                node[part] = child
                node = child
    return tree


def mask_valid(desc: Descriptor, tree: dict[str, Any]) -> bool:
    if not tree:
        return False
    for name, sub in tree.items():
        field = desc.fields_by_name.get(name)
        if field is None:
            return False
        if sub is not None:
            mt = field.message_type
            if mt is None or _is_map(field):
                return False
            if mt.full_name == "google.protobuf.Any":
                continue  # checked against the packed type when trimming
            if not mask_valid(mt, sub):
                return False
    return True


def trim_message(msg: Message, tree: dict[str, Any]) -> None:
    """Keep only the fields named by ``tree`` (in place)."""
    for field, _ in list(msg.ListFields()):
        if field.name not in tree:
            msg.ClearField(field.name)
            continue
        sub = tree[field.name]
        if sub is None or field.message_type is None:
            continue
        if _is_repeated(field):
            for item in getattr(msg, field.name):
                _trim_one(item, sub)
        else:
            _trim_one(getattr(msg, field.name), sub)


def _trim_one(msg: Message, tree: dict[str, Any]) -> None:
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        desc = _find_descriptor(msg.type_url)  # type: ignore[attr-defined]
        if desc is None:
            return
        from google.protobuf import message_factory

        inner = message_factory.GetMessageClass(desc)()
        msg.Unpack(inner)  # type: ignore[attr-defined]
        trim_message(inner, tree)
        msg.Pack(inner)  # type: ignore[attr-defined]
        return
    trim_message(msg, tree)
