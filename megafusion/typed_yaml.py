"""Typed YAML: text onto dataclasses, one-line errors naming the key.

What megafusion/config.py builds the run config with, and nothing specific to it:

    load_yaml(text)              YAML with 1e-4 read as a float and a key written twice refused
    expand(value, key)           ${VAR}, ${VAR:-default}, ${VAR-default} and a leading ~
    build(cls, data, prefix)     a dataclass from a mapping, each value coerced to its field's type
    apply_override(obj, text)    one `section.field=value` onto a built dataclass
    config_to_dict(obj)          a dataclass as plain lists and dicts, ready for YAML or JSON
    dump_yaml(data, f)           sections in block style, lists of scalars on one line

Every mismatch raises ConfigError naming the dotted key and the expected type.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad run config; the message is one line naming the offending key."""


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (PyYAML's YAML 1.1 resolver wants a dot)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    # A key written twice is a mistake that PyYAML would silently resolve to the last.
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} written twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------- expansion

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def expand(value: str, key: str = "") -> str:
    """`${VAR}`, `${VAR:-default}` (default if unset or empty), `${VAR-default}` (if
    unset) and a leading `~`, as a shell would expand them."""

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        current = os.environ.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        if current is None:
            where = f"config key {key}: " if key else ""
            raise ConfigError(f"{where}environment variable {name} is not set (written {m.group(0)}; use ${{{name}:-default}} for a default)")
        return current

    out = _ENV.sub(sub, value)
    if out == "~" or out.startswith("~/"):
        out = os.path.expanduser(out)
    return out


# --------------------------------------------------------------------------- typing


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(tp):
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _accepts_str(tp) -> bool:
    if tp is str or tp is typing.Any:
        return True
    return _is_union(tp) and any(_accepts_str(a) for a in typing.get_args(tp))


class _Mismatch(Exception):
    pass


def _coerce(value, tp, key: str, explicit: set | None = None):
    """`value` (from YAML) as type `tp`, or ConfigError naming `key`."""
    if isinstance(value, str):
        expanded = expand(value, key)
        if expanded != value and not _accepts_str(tp):
            expanded = load_yaml(expanded) if expanded.strip() else None
        value = expanded
    try:
        return _convert(value, tp, key, explicit)
    except _Mismatch:
        raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {show(value)}") from None


def show(value) -> str:
    text = repr(value) if not isinstance(value, (list, tuple, dict)) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _expand_tree(value, key: str):
    """Expand the strings inside an untyped value (model.extra, data.train's stream list)."""
    if isinstance(value, str):
        return expand(value, key)
    if isinstance(value, dict):
        return {k: _expand_tree(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_expand_tree(v, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def _convert(value, tp, key, explicit):
    if tp is typing.Any:
        return _expand_tree(value, key)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # Prefer an arm the value already is (so 1 stays an int in int | float).
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: not _is_instance(value, a))
        nested_error = None
        for arm in ordered:
            try:
                return _convert(value, arm, key, explicit)
            except _Mismatch:
                continue
            except ConfigError as exc:  # the right shape, wrong inside: that error says more
                if nested_error is None and _is_instance(value, arm):
                    nested_error = exc
        if nested_error is not None:
            raise nested_error
        raise _Mismatch
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, key, explicit)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return _expand_tree(list(value), key)
        return [_coerce(v, args[0], f"{key}[{i}]", explicit) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return _expand_tree(dict(value), key)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # steps: 1e5
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # name: 2024
            return str(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _is_instance(value, tp) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(origin, type) and isinstance(value, origin)


def unknown_key(key: str, valid) -> ConfigError:
    return ConfigError(f"unknown config key {key} (valid: {', '.join(valid)})")


def build(cls, data: dict, prefix: str, explicit: set | None):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise unknown_key(key, names)
        kwargs[name] = _coerce(value, hints[name], key, explicit)
        if explicit is not None and not dataclasses.is_dataclass(hints[name]):
            explicit.add(key)
    return cls(**kwargs)


def apply_override(cfg, text: str, explicit: set) -> None:
    """Set one `section.field=value` (dotted to any depth, into free-form mappings too) on
    the dataclass `cfg`; the key joins `explicit`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    raw = expand(raw, key)  # before parsing, as a shell would: `x=[${A}, ${B}]` works
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: expected section.field=value")
    if len(parts) == 1:
        if parts[0] in [f.name for f in dataclasses.fields(cfg)]:
            raise ConfigError(f"override {text!r}: {parts[0]} is a section; set {parts[0]}.<field>=value")
        raise unknown_key(key, [f.name for f in dataclasses.fields(cfg)])
    obj = cfg
    for depth, name in enumerate(parts):
        sub = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(obj, dict):  # free-form mapping such as model.extra
            if last:
                obj[name] = _coerce(_parse_value(raw, text), typing.Any, key)
                break
            obj = obj.setdefault(name, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"override {text!r}: {sub} is not a mapping")
            continue
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth])} is not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise unknown_key(sub, names)
        tp = _hints(type(obj))[name]
        if last:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {text!r}: {sub} is a section; set {sub}.<field>=value")
            if _accepts_str(tp) and raw.strip().lower() not in ("null", "none", "~", ""):
                value = raw if tp is str or _is_plain_str(raw) else _parse_value(raw, text)
            else:
                value = _parse_value(raw, text)
            setattr(obj, name, _coerce(value, tp, key))
            explicit.add(key)
        else:
            obj = getattr(obj, name)


def _parse_value(raw: str, text: str):
    if not raw.strip():
        return None
    try:
        return load_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None


def _is_plain_str(raw: str) -> bool:
    """True when `raw` is meant as text for a field that also takes other types: it does
    not parse as a YAML list or mapping."""
    try:
        return not isinstance(load_yaml(raw), (list, dict))
    except yaml.YAMLError:
        return True


# --------------------------------------------------------------------------- writing


def config_to_dict(cfg) -> dict:
    """Plain dict (lists, not tuples) of a config or section, ready for YAML or JSON."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections and mappings in block style, lists of scalars on one line."""


def _represent_list(dumper, value):
    flow = all(not isinstance(v, (list, tuple, dict)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, lambda dumper, value: dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=False))


def dump_yaml(data, stream) -> None:
    yaml.dump(data, stream, Dumper=_Dumper, sort_keys=False, width=100)
