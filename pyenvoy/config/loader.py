"""Load an Envoy v3 bootstrap (YAML / JSON / text proto) into the real protobuf messages.

Strategy: YAML is read with a YAML-1.2-flavoured loader (libyaml when available) that types
plain scalars the way Envoy's yaml-cpp conversion does (no timestamps, no sexagesimal ints, no
``<<`` merge keys). The resulting plain dict is then converted into protobuf messages by a small
descriptor-driven converter instead of ``json_format``: that lets every error name its field
path in Envoy's style (``static_resources.clusters[0].connect_timeout``) with Envoy's wording,
costs nothing on the happy path (paths are only assembled while an error unwinds, one segment
per frame), and handles the JSON mapping of the well-known types (Any, Duration, Struct,
wrappers, ...). On error only, the YAML is composed a second time to add a line number.

``@type`` URLs resolve through the default descriptor pool. A missing message type is found
without importing all ~640 xds-protos modules: the type's proto package maps onto a directory
of ``*_pb2.py`` files (``envoy.extensions.filters.http.router.v3`` ->
``envoy/extensions/filters/http/router/v3/``), which is imported. Only if that fails is a full
name -> module index built, once per process, by reading the serialized file descriptors out
of the installed ``envoy``, ``xds``, ``udpa``, ``contrib`` and ``validate`` packages (their
``*_pb2.py`` files are scanned, not imported).

``--config-yaml`` text is parsed on its own and merged over the file's bootstrap with proto
``MergeFrom``, as Envoy does. The PGV checker (``validate.py``) then runs over the result.
"""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError, Message

from pyenvoy.config.errors import ConfigError

if TYPE_CHECKING:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
    from google.protobuf.descriptor import Descriptor, FieldDescriptor

__all__ = [
    "ConfigError",
    "load_bootstrap",
    "parse_message",
    "unpack_any",
    "message_class",
    "message_class_for_type_url",
    "load_yaml",
    "index_stats",
]

log = logging.getLogger("pyenvoy.config")

TYPED_STRUCT_TYPES = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})
INDEX_ROOTS = ("envoy", "xds", "udpa", "contrib", "validate")


# --------------------------------------------------------------------------------------------
# YAML: scalars typed like Envoy's yaml-cpp -> JSON conversion.


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader with YAML 1.2-style plain scalar typing and no merge keys / timestamps."""


_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(
        r"^(?:true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF"
        r"|y|Y|n|N)$"
    ),
    list("tTfFyYnNoO"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)

_BOOL_TRUE = frozenset({"true", "yes", "on", "y"})


def _construct_bool(loader: Any, node: Any) -> bool:
    return str(loader.construct_scalar(node)).lower() in _BOOL_TRUE


def _construct_int(loader: Any, node: Any) -> int:
    text = str(loader.construct_scalar(node))
    if text[:2] in ("0x", "0o"):
        return int(text, 0)
    return int(text, 10)


def _construct_float(loader: Any, node: Any) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


def _construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    """Mapping keys keep their source text (``n: 1`` has key "n", not False), as in Envoy."""
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a mapping node, but found {node.id}", node.start_mark
        )
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key: Any = key_node.value
        else:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found a non-scalar key",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


def _construct_yaml_map(loader: Any, node: Any) -> Any:
    data: dict[Any, Any] = {}
    yield data
    data.update(_construct_mapping(loader, node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _ComposeLoader(yaml.SafeLoader):
    """Pure-Python composer used only to map an error path back to a line number."""


_ComposeLoader.yaml_implicit_resolvers = dict(_Loader.yaml_implicit_resolvers)


def load_yaml(text: str) -> Any:
    """Parse one YAML document the way Envoy types its scalars; ConfigError on syntax errors."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if mark is not None:
            raise ConfigError(
                f"yaml error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
            ) from None
        raise ConfigError(f"yaml error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"yaml error: {e}") from None


# --------------------------------------------------------------------------------------------
# Message types: descriptor pool lookups, package-directory imports, full index fallback.

_pool = descriptor_pool.Default()
_class_cache: dict[str, type[Message]] = {}
_imported_packages: set[str] = set()
_full_index: dict[str, str] | None = None
_index_seconds = 0.0


def _find_descriptor(full_name: str) -> Descriptor | None:
    try:
        return _pool.FindMessageTypeByName(full_name)
    except KeyError:
        return None


def _import_package_dir(package: str) -> None:
    """Import every ``*_pb2.py`` module of one proto package directory (once per process)."""
    if package in _imported_packages or not package:
        return
    _imported_packages.add(package)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for directory in spec.submodule_search_locations:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith("_pb2.py"):
                try:
                    importlib.import_module(f"{package}.{name[:-3]}")
                except Exception as e:  # a broken optional module must not break loading
                    log.debug("could not import %s.%s: %s", package, name[:-3], e)


def _scan_file_descriptor(path: str) -> tuple[str, list[str]] | None:
    """Read a generated ``*_pb2.py`` without importing it: (package, message names)."""
    from google.protobuf import descriptor_pb2

    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
    except OSError:
        return None
    start = src.find("AddSerializedFile(b")
    if start < 0:
        return None
    start += len("AddSerializedFile(")
    end = src.find("')\n", start)
    if end < 0:
        end = src.find('")\n', start)
        if end < 0:
            return None
    try:
        raw = ast.literal_eval(src[start : end + 1])
        fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
    except Exception:
        return None
    names: list[str] = []

    def add(prefix: str, msgs: Any) -> None:
        for m in msgs:
            full = f"{prefix}.{m.name}" if prefix else m.name
            names.append(full)
            add(full, m.nested_type)

    add(fdp.package, fdp.message_type)
    return fdp.package, names


def _build_full_index() -> dict[str, str]:
    global _full_index, _index_seconds
    if _full_index is not None:
        return _full_index
    t0 = time.perf_counter()
    index: dict[str, str] = {}
    for root in INDEX_ROOTS:
        try:
            spec = importlib.util.find_spec(root)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for base in spec.submodule_search_locations:
            parent = os.path.dirname(base)
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                for fn in filenames:
                    if not fn.endswith("_pb2.py"):
                        continue
                    full_path = os.path.join(dirpath, fn)
                    found = _scan_file_descriptor(full_path)
                    if found is None:
                        continue
                    module = os.path.relpath(full_path, parent)[:-3].replace(os.sep, ".")
                    for name in found[1]:
                        index.setdefault(name, module)
    _full_index = index
    _index_seconds = time.perf_counter() - t0
    log.debug("built message type index: %d types in %.3fs", len(index), _index_seconds)
    return index


def index_stats() -> dict[str, Any]:
    """How the type resolver has worked so far (for tests, benchmarks and the report)."""
    return {
        "full_index_built": _full_index is not None,
        "full_index_types": len(_full_index or ()),
        "full_index_seconds": _index_seconds,
        "packages_imported": len(_imported_packages),
        "classes_cached": len(_class_cache),
    }


def message_class(full_name: str) -> type[Message] | None:
    """The generated class for a full message name (``envoy.config.cluster.v3.Cluster``)."""
    cls = _class_cache.get(full_name)
    if cls is not None:
        return cls
    desc = _find_descriptor(full_name)
    if desc is None:
        parts = full_name.split(".")
        # The proto package is everything before the first capitalised segment.
        cut = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts) - 1)
        _import_package_dir(".".join(parts[:cut]))
        desc = _find_descriptor(full_name)
    if desc is None:
        module = _build_full_index().get(full_name)
        if module is not None:
            try:
                importlib.import_module(module)
            except Exception as e:
                log.debug("could not import %s: %s", module, e)
            desc = _find_descriptor(full_name)
    if desc is None:
        return None
    cls = message_factory.GetMessageClass(desc)
    _class_cache[full_name] = cls
    return cls


def message_class_for_type_url(type_url: str) -> type[Message] | None:
    """Resolve ``type.googleapis.com/<full name>`` (any prefix before the last '/')."""
    name = type_url.rsplit("/", 1)[-1]
    if not name:
        return None
    return message_class(name)


# --------------------------------------------------------------------------------------------
# Field paths: collected innermost-first while an error unwinds.


class _Key:
    """A map key segment in a field path."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key


class PathError(Exception):
    """Internal: an error whose field path is assembled as it propagates outwards."""

    def __init__(self, message: str, segs: list[Any] | None = None, key: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.segs: list[Any] = segs if segs is not None else []  # innermost first
        self.key = key  # the offending mapping key (unknown field), for line lookup only


def format_path(segs_outer_first: list[Any]) -> str:
    out: list[str] = []
    for seg in segs_outer_first:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif isinstance(seg, _Key):
            out.append(f'["{seg.key}"]')
        else:
            out.append(f".{seg}" if out else str(seg))
    return "".join(out)


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _line_of(text: str, segs_outer_first: list[Any], key: Any = None) -> int | None:
    """Line (1-based) of the YAML/JSON node a path points at; None if it cannot be found."""
    try:
        node = yaml.compose(text, Loader=_ComposeLoader)  # noqa: S506
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    best = node  # the deepest node found: a missing field points at its parent
    walk: list[Any] = list(segs_outer_first)
    if key is not None:
        walk.append(_Key(key))
    last = len(walk) - 1
    for i, seg in enumerate(walk):
        if isinstance(seg, int):
            if not isinstance(node, yaml.SequenceNode) or seg >= len(node.value):
                break
            node = best = node.value[seg]
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        want = {str(seg.key)} if isinstance(seg, _Key) else {seg, _camel(seg)}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value in want:
                # An unknown field points at its key; everything else at the value.
                node = best = k if (i == last and key is not None) else v
                break
        else:
            break
    return int(best.start_mark.line) + 1


def _to_config_error(e: PathError, prefix: str = "", text: str | None = None) -> ConfigError:
    segs = list(reversed(e.segs))
    path = format_path(segs)
    if prefix:
        path = f"{prefix}.{path}" if path and not path.startswith("[") else f"{prefix}{path}"
    message = e.message
    if text is not None:
        line = _line_of(text, segs, e.key)
        if line is not None:
            message = f"{message} (line {line})"
    return ConfigError(message, path)


# --------------------------------------------------------------------------------------------
# dict -> protobuf conversion (protobuf's JSON mapping, Envoy's error texts).


class _Options:
    __slots__ = ("ignore_unknown",)

    def __init__(self, ignore_unknown: bool = False) -> None:
        self.ignore_unknown = ignore_unknown


_STRICT = _Options(False)


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {'true' if v else 'false'}"
    if isinstance(v, int | float):
        return f"number {v!r}"
    if isinstance(v, str):
        return f"string '{v}'"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


_field_tables: dict[Any, dict[Any, FieldDescriptor]] = {}


def _field_table(desc: Descriptor) -> dict[Any, FieldDescriptor]:
    table = _field_tables.get(desc)
    if table is None:
        table = {}
        for fd in desc.fields:
            table[fd.name] = fd
            table[fd.json_name] = fd
        _field_tables[desc] = table
    return table


# FieldDescriptor.TYPE_* numbers
_T_DOUBLE, _T_FLOAT, _T_INT64, _T_UINT64, _T_INT32, _T_FIXED64, _T_FIXED32, _T_BOOL = range(1, 9)
_T_STRING, _T_GROUP, _T_MESSAGE, _T_BYTES, _T_UINT32, _T_ENUM = range(9, 15)
_T_SFIXED32, _T_SFIXED64, _T_SINT32, _T_SINT64 = range(15, 19)

_INT_RANGES: dict[int, tuple[str, int, int]] = {
    _T_INT32: ("int32", -(2**31), 2**31 - 1),
    _T_SINT32: ("int32", -(2**31), 2**31 - 1),
    _T_SFIXED32: ("int32", -(2**31), 2**31 - 1),
    _T_UINT32: ("uint32", 0, 2**32 - 1),
    _T_FIXED32: ("uint32", 0, 2**32 - 1),
    _T_INT64: ("int64", -(2**63), 2**63 - 1),
    _T_SINT64: ("int64", -(2**63), 2**63 - 1),
    _T_SFIXED64: ("int64", -(2**63), 2**63 - 1),
    _T_UINT64: ("uint64", 0, 2**64 - 1),
    _T_FIXED64: ("uint64", 0, 2**64 - 1),
}
_INT_TEXT = re.compile(r"^-?[0-9]+$")
_FLOAT_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _convert_int(t: int, v: Any) -> int:
    name, lo, hi = _INT_RANGES[t]
    if type(v) is int:
        n = v
    elif type(v) is str and _INT_TEXT.match(v):
        n = int(v)
    elif type(v) is float and v.is_integer():
        n = int(v)
    elif type(v) is float or type(v) is str:
        raise PathError(f"invalid {name} number: '{v}'")
    else:
        raise PathError(f"expected a {name} number, got {_describe(v)}")
    if n < lo or n > hi:
        raise PathError(f"{name} number out of range: {n}")
    return n


def _convert_scalar(fd: FieldDescriptor, v: Any) -> Any:
    t = fd.type
    if t == _T_STRING:
        if type(v) is str:
            return v
        raise PathError(f"expected a string, got {_describe(v)}")
    if t in _INT_RANGES:
        return _convert_int(t, v)
    if t == _T_BOOL:
        if type(v) is bool:
            return v
        raise PathError(f"expected true or false, got {_describe(v)}")
    if t == _T_ENUM:
        return _convert_enum(fd, v)
    if t == _T_DOUBLE or t == _T_FLOAT:
        kind = "double" if t == _T_DOUBLE else "float"
        if type(v) is float or type(v) is int:
            return float(v)
        if type(v) is str:
            special = _FLOAT_SPECIAL.get(v)
            if special is not None:
                return special
            try:
                return float(v)
            except ValueError:
                raise PathError(f"invalid {kind} number: '{v}'") from None
        raise PathError(f"expected a {kind} number, got {_describe(v)}")
    if t == _T_BYTES:
        if type(v) is not str:
            raise PathError(f"expected a base64 string, got {_describe(v)}")
        try:
            padded = v + "=" * (-len(v) % 4)
            if "-" in v or "_" in v:
                return base64.urlsafe_b64decode(padded)
            return base64.b64decode(padded, validate=True)
        except ValueError:
            raise PathError(f"invalid base64: '{v}'") from None
    raise PathError(f"unsupported field type {t}")


def _convert_enum(fd: FieldDescriptor, v: Any) -> int:
    enum = fd.enum_type
    if type(v) is str:
        ev = enum.values_by_name.get(v)
        if ev is not None:
            return int(ev.number)
        names = [x.name for x in enum.values]
        shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "")
        raise PathError(f"unknown enum value: '{v}' (enum {enum.full_name}: {shown})")
    if type(v) is int:
        if getattr(enum, "is_closed", False) and v not in enum.values_by_number:
            raise PathError(f"unknown enum value: {v} (enum {enum.full_name})")
        return v
    raise PathError(f"expected a value name of enum {enum.full_name}, got {_describe(v)}")


def _merge_message(msg: Message, value: Any, opts: _Options) -> None:
    desc = msg.DESCRIPTOR
    special = _WKT_MERGERS.get(desc.full_name)
    if special is not None:
        special(msg, value, opts)
        return
    if type(value) is not dict:
        raise PathError(f"expected a mapping (message {desc.full_name}), got {_describe(value)}")
    table = _field_table(desc)
    for key, v in value.items():
        fd = table.get(key)
        if fd is None:
            if opts.ignore_unknown:
                log.warning("ignoring unknown field '%s' in %s", key, desc.full_name)
                continue
            raise PathError(f"no such field: '{key}' (message {desc.full_name})", key=key)
        if v is None:
            mt = fd.message_type
            if mt is not None and mt.full_name == "google.protobuf.Value" and not fd.is_repeated:
                getattr(msg, fd.name).null_value = 0
            continue
        try:
            oneof = fd.containing_oneof
            if oneof is not None:
                other = msg.WhichOneof(oneof.name)
                if other is not None:
                    raise PathError(
                        f"'{fd.name}' has already been set (either directly or as part of "
                        f"oneof '{oneof.name}', which already holds '{other}')"
                    )
            _set_field(msg, fd, v, opts)
        except PathError as e:
            e.segs.append(fd.name)
            raise


def _set_field(msg: Message, fd: FieldDescriptor, v: Any, opts: _Options) -> None:
    mt = fd.message_type
    if fd.is_repeated:
        if mt is not None and mt.GetOptions().map_entry:
            _merge_map(getattr(msg, fd.name), mt, v, opts)
            return
        if type(v) is not list:
            raise PathError(f"expected a list, got {_describe(v)}")
        container = getattr(msg, fd.name)
        if mt is not None:
            for i, item in enumerate(v):
                try:
                    if item is None:
                        raise PathError("null is not allowed in a list")
                    sub = container.add()
                    _merge_message(sub, item, opts)
                except PathError as e:
                    e.segs.append(i)
                    raise
        else:
            out = []
            for i, item in enumerate(v):
                try:
                    if item is None:
                        raise PathError("null is not allowed in a list")
                    out.append(_convert_scalar(fd, item))
                except PathError as e:
                    e.segs.append(i)
                    raise
            container.extend(out)
        return
    if mt is not None:
        sub = getattr(msg, fd.name)
        _merge_message(sub, v, opts)
        sub.SetInParent()
        return
    setattr(msg, fd.name, _convert_scalar(fd, v))


def _key_text(k: Any) -> str:
    if isinstance(k, bool):
        return "true" if k else "false"
    if k is None:
        return "null"
    return str(k)


def _merge_map(container: Any, entry: Descriptor, v: Any, opts: _Options) -> None:
    if type(v) is not dict:
        raise PathError(f"expected a mapping, got {_describe(v)}")
    key_fd = entry.fields_by_name["key"]
    val_fd = entry.fields_by_name["value"]
    for k, item in v.items():
        try:
            if key_fd.type == _T_STRING:
                key: Any = _key_text(k)
            elif key_fd.type == _T_BOOL:
                key = k if type(k) is bool else {"true": True, "false": False}.get(str(k))
                if key is None:
                    raise PathError(f"bool map key, expected true or false, got '{k}'")
            else:
                key = _convert_int(key_fd.type, k)
            if val_fd.message_type is not None:
                if item is None:
                    item = {}
                sub = container[key]
                _merge_message(sub, item, opts)
            else:
                if item is None:
                    raise PathError("null is not allowed as a map value")
                container[key] = _convert_scalar(val_fd, item)
        except PathError as e:
            e.segs.append(_Key(_key_text(k)))
            raise


# Well-known types -----------------------------------------------------------------------

_DURATION_RE = re.compile(r"^(-)?([0-9]+)(?:\.([0-9]{1,9}))?s$")
_MAX_DURATION_SECONDS = 315576000000


def _merge_duration(msg: Any, v: Any, opts: _Options) -> None:
    if type(v) is not str:
        raise PathError(f"expected a duration string such as '1.5s', got {_describe(v)}")
    m = _DURATION_RE.match(v)
    if m is None:
        if not v.endswith("s") or v.endswith("ss"):
            raise PathError(f"invalid duration '{v}': duration must end with a single 's'")
        raise PathError(f"invalid duration '{v}'")
    seconds = int(m.group(2))
    nanos = int((m.group(3) or "").ljust(9, "0")) if m.group(3) else 0
    if m.group(1) and (seconds or nanos):
        # Envoy rejects negative durations anywhere in a config, whatever the PGV rules say.
        raise PathError(f"Invalid duration: Expected positive duration: '{v}'")
    if seconds > _MAX_DURATION_SECONDS:
        raise PathError(f"Invalid duration: Duration out-of-range according to Protobuf: '{v}'")
    msg.seconds = seconds
    msg.nanos = nanos


def _merge_from_json_string(kind: str) -> Callable[[Any, Any, _Options], None]:
    def merge(msg: Any, v: Any, opts: _Options) -> None:
        if type(v) is not str:
            raise PathError(f"expected a {kind} string, got {_describe(v)}")
        try:
            msg.FromJsonString(v)
        except ValueError as e:
            raise PathError(f"invalid {kind} '{v}': {e}") from None

    return merge


def _py_to_value(out: Any, v: Any) -> None:
    """Fill a google.protobuf.Value from a plain Python value."""
    if v is None:
        out.null_value = 0
    elif type(v) is bool:
        out.bool_value = v
    elif type(v) is int or type(v) is float:
        out.number_value = v
    elif type(v) is str:
        out.string_value = v
    elif type(v) is dict:
        _py_to_struct(out.struct_value, v)
    elif type(v) is list:
        _py_to_list(out.list_value, v)
    else:
        raise PathError(f"unsupported value {_describe(v)} in a google.protobuf.Value")


def _py_to_struct(out: Any, v: dict[Any, Any]) -> None:
    fields = out.fields
    for k, item in v.items():
        try:
            _py_to_value(fields[_key_text(k)], item)
        except PathError as e:
            e.segs.append(_Key(_key_text(k)))
            raise
    out.SetInParent()


def _py_to_list(out: Any, v: list[Any]) -> None:
    values = out.values
    for i, item in enumerate(v):
        try:
            _py_to_value(values.add(), item)
        except PathError as e:
            e.segs.append(i)
            raise
    out.SetInParent()


def _merge_struct(msg: Any, v: Any, opts: _Options) -> None:
    if type(v) is not dict:
        raise PathError(f"expected a mapping (google.protobuf.Struct), got {_describe(v)}")
    _py_to_struct(msg, v)


def _merge_list_value(msg: Any, v: Any, opts: _Options) -> None:
    if type(v) is not list:
        raise PathError(f"expected a list (google.protobuf.ListValue), got {_describe(v)}")
    _py_to_list(msg, v)


def _merge_value(msg: Any, v: Any, opts: _Options) -> None:
    _py_to_value(msg, v)


def _merge_empty(msg: Any, v: Any, opts: _Options) -> None:
    if type(v) is not dict:
        raise PathError(f"expected an empty mapping (google.protobuf.Empty), got {_describe(v)}")
    if v:
        key = next(iter(v))
        raise PathError(f"no such field: '{key}' (message google.protobuf.Empty)", key=key)


def _merge_wrapper(msg: Any, v: Any, opts: _Options) -> None:
    fd = msg.DESCRIPTOR.fields_by_name["value"]
    msg.value = _convert_scalar(fd, v)


def _merge_any(msg: Any, v: Any, opts: _Options) -> None:
    if type(v) is not dict:
        raise PathError(
            f"expected a mapping with '@type' (google.protobuf.Any), got {_describe(v)}"
        )
    if not v:
        return
    type_url = v.get("@type")
    if type_url is None:
        raise PathError("missing '@type' (google.protobuf.Any)")
    if type(type_url) is not str:
        raise PathError(f"'@type' must be a string, got {_describe(type_url)}")
    cls = message_class_for_type_url(type_url)
    if cls is None:
        raise PathError(f"could not find @type '{type_url}'")
    inner = cls()
    if inner.DESCRIPTOR.full_name in _WKT_MERGERS:
        extra = [k for k in v if k not in ("@type", "value")]
        if extra:
            raise PathError(
                f"no such field: '{extra[0]}' (well-known type {inner.DESCRIPTOR.full_name} "
                "takes its content under 'value')",
                key=extra[0],
            )
        if "value" in v:
            _merge_message(inner, v["value"], opts)
    else:
        _merge_message(inner, {k: x for k, x in v.items() if k != "@type"}, opts)
    msg.type_url = type_url
    msg.value = inner.SerializeToString()


_WKT_MERGERS: dict[str, Callable[[Any, Any, _Options], None]] = {
    "google.protobuf.Any": _merge_any,
    "google.protobuf.Duration": _merge_duration,
    "google.protobuf.Timestamp": _merge_from_json_string("Timestamp"),
    "google.protobuf.FieldMask": _merge_from_json_string("FieldMask"),
    "google.protobuf.Struct": _merge_struct,
    "google.protobuf.ListValue": _merge_list_value,
    "google.protobuf.Value": _merge_value,
    "google.protobuf.Empty": _merge_empty,
}
for _w in (
    "DoubleValue",
    "FloatValue",
    "Int64Value",
    "UInt64Value",
    "Int32Value",
    "UInt32Value",
    "BoolValue",
    "StringValue",
    "BytesValue",
):
    _WKT_MERGERS[f"google.protobuf.{_w}"] = _merge_wrapper


def parse_message(
    data: Any,
    message: Message | type[Message],
    path: str = "",
    *,
    allow_unknown_fields: bool = False,
    source_text: str | None = None,
) -> Message:
    """Convert a plain dict (parsed YAML/JSON) into ``message`` (an instance or a class).

    Raises ConfigError naming the field path (prefixed with ``path``).
    """
    msg = message() if isinstance(message, type) else message
    opts = _Options(True) if allow_unknown_fields else _STRICT
    try:
        _merge_message(msg, data, opts)
    except PathError as e:
        raise _to_config_error(e, path, source_text) from None
    return msg


def _struct_to_py(s: Any) -> dict[str, Any]:
    return {k: _value_to_py(v) for k, v in s.fields.items()}


def _value_to_py(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return _struct_to_py(v.struct_value)
    if kind == "list_value":
        return [_value_to_py(x) for x in v.list_value.values]
    return None


def unpack_any(any_msg: Any, path: str = "") -> Message:
    """Unpack a google.protobuf.Any into an instance of its concrete message class.

    A ``TypedStruct`` (xds.type.v3 / udpa.type.v1) is converted into the message its
    ``type_url`` names, as Envoy does for extension configs. ConfigError names ``path`` if the
    type is unknown or the bytes do not decode.
    """
    type_url = any_msg.type_url
    if not type_url:
        raise ConfigError("missing @type (empty google.protobuf.Any)", path)
    cls = message_class_for_type_url(type_url)
    if cls is None:
        raise ConfigError(f"could not find @type '{type_url}'", path)
    msg = cls()
    try:
        msg.ParseFromString(any_msg.value)
    except DecodeError as e:
        raise ConfigError(
            f"unable to decode {cls.DESCRIPTOR.full_name} from google.protobuf.Any: {e}", path
        ) from None
    if cls.DESCRIPTOR.full_name in TYPED_STRUCT_TYPES:
        inner_url = msg.type_url  # type: ignore[attr-defined]
        inner_cls = message_class_for_type_url(inner_url) if inner_url else None
        if inner_cls is None:
            raise ConfigError(f"could not find @type '{inner_url}' (in TypedStruct)", path)
        return parse_message(
            _struct_to_py(msg.value),  # type: ignore[attr-defined]
            inner_cls,
            f"{path}.value" if path else "value",
        )
    return msg


# --------------------------------------------------------------------------------------------
# Bootstrap loading.


def _bootstrap_class() -> type[Bootstrap]:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    return Bootstrap


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"Invalid path: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"Invalid path: {path} (is a directory)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"Unable to read {path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"Invalid path: {path} ({e.strerror})") from None


def _parse_yaml_document(text: str, what: str) -> Any:
    data = load_yaml(text)
    if data is None:
        raise ConfigError(f"Unable to convert YAML as JSON: {what} is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"Unable to parse JSON as proto: {what} must be a mapping at the top level, "
            f"got {_describe(data)}"
        )
    return data


def _parse_json_document(text: str, path: str) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if not path.endswith(".json"):
            hint = " (files not named .yaml/.yml are read as JSON, like Envoy does)"
        raise ConfigError(
            f"Unable to parse JSON as proto: invalid JSON at line {e.lineno}, "
            f"column {e.colno}: {e.msg}{hint}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Unable to parse JSON as proto: the configuration must be an object, got {_describe(data)}"
        )
    return data


def _load_file_into(msg: Message, path: str, opts: _Options) -> str | None:
    """Parse the config file into ``msg``; return its text when it can locate lines."""
    lower = path.lower()
    if lower.endswith(".pb"):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ConfigError(f"Invalid path: {path}") from None
        except OSError as e:
            raise ConfigError(f"Invalid path: {path} ({e.strerror})") from None
        try:
            msg.MergeFromString(raw)
        except DecodeError as e:
            raise ConfigError(f'Unable to parse file "{path}" as a binary protobuf: {e}') from None
        return None
    text = _read_file(path)
    if lower.endswith(".pb_text"):
        try:
            text_format.Merge(text, msg)
        except text_format.ParseError as e:
            raise ConfigError(f'Unable to parse file "{path}" as a text protobuf: {e}') from None
        return None
    if lower.endswith((".yaml", ".yml")):
        data = _parse_yaml_document(text, f"'{path}'")
    else:
        data = _parse_json_document(text, path)
    try:
        _merge_message(msg, data, opts)
    except PathError as e:
        raise _to_config_error(e, "", text) from None
    return text


def load_bootstrap(
    path: str | None = None,
    yaml_text: str | None = None,
    data: dict[str, Any] | None = None,
    *,
    allow_unknown_fields: bool = False,
    validate: bool = True,
) -> Bootstrap:
    """Load, merge and PGV-validate a bootstrap.

    ``path`` (.yaml/.yml, .json, .pb_text, .pb; other names are read as JSON like Envoy),
    then ``data`` and then ``yaml_text`` (``--config-yaml``) are merged in that order with
    proto MergeFrom semantics (repeated fields append). Every problem is a ConfigError.
    """
    if not path and not yaml_text and data is None:
        raise ConfigError("At least one of --config-path or --config-yaml should be non-empty")
    opts = _Options(True) if allow_unknown_fields else _STRICT
    bootstrap_cls = _bootstrap_class()
    bootstrap = bootstrap_cls()
    texts: list[str | None] = []
    if path:
        texts.append(_load_file_into(bootstrap, path, opts))
    if data is not None:
        part = parse_message(data, bootstrap_cls, allow_unknown_fields=allow_unknown_fields)
        bootstrap.MergeFrom(part)
        texts.append(None)
    if yaml_text:
        doc = _parse_yaml_document(yaml_text, "--config-yaml")
        part = bootstrap_cls()
        try:
            _merge_message(part, doc, opts)
        except PathError as e:
            raise _to_config_error(e, "", yaml_text) from None
        bootstrap.MergeFrom(part)
        texts.append(yaml_text)
    if validate:
        from pyenvoy.config.validate import validate_message

        only_text = texts[0] if len(texts) == 1 else None
        validate_message(bootstrap, source_text=only_text)
    return bootstrap
