"""Command-line options and YAML configs generated from config dataclasses.

A dataclass whose fields are dataclasses (*groups*, like ``RunConfig``) gives one option per
leaf field (a plain dataclass is one group): ``--<field>`` with the field's ``help`` metadata and
its default, prefixed by the group name where the group asks for it (``--lora-r``), so nothing
is declared twice. A YAML file gives the same options, nested by group (``train: {lr: 1e-4}``)
or flat by option name (``lr: 1e-4``); options on the command line override it.

Fields marked ``metadata={"path": True}`` are paths: a leading ``~`` is expanded as a shell
expands it, also where no shell does (in YAML, ``--out=~/run``). Relative paths, in a YAML file
too, are relative to the current directory, as on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

# Groups whose field names are prefixed on the command line (their names clash or are vague).
PREFIXED = {"lora", "bottleneck", "ia3", "prefix"}
# Fields that are no options: LoRA's quantize follows --method.
SKIPPED = {("lora", "quantize")}
Leaf = tuple[str, str, dataclasses.Field[Any], Any]  # group, option name, field, type


def _groups(cls: type) -> dict[str, type] | None:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if all(dataclasses.is_dataclass(hints[f.name]) for f in fields):
        return {f.name: hints[f.name] for f in fields}
    return None


def _leaf_fields(cls: type) -> list[Leaf]:
    """Every option of ``cls``: its groups' fields, or its own fields if it has no groups."""
    groups = _groups(cls) or {"": cls}
    leaves = []
    for group, sub in groups.items():
        hints = typing.get_type_hints(sub)
        for f in dataclasses.fields(sub):
            if (group, f.name) not in SKIPPED:
                name = f"{group}_{f.name}" if group in PREFIXED else f.name
                leaves.append((group, name, f, hints[f.name]))
    names = [name for _, name, _, _ in leaves]
    assert len(set(names)) == len(names), f"{cls.__name__}: options clash: {names}"
    return leaves


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _argument(tp: Any) -> dict[str, Any]:
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if origin is list:
        return {"type": get_args(tp)[0], "nargs": "+"}
    if origin in (typing.Union, types.UnionType):  # e.g. list[str] | str: take the list form
        lists = [a for a in get_args(tp) if get_origin(a) is list]
        return {"type": get_args(lists[0])[0], "nargs": "+"}
    return {"type": tp}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_arguments(parser: argparse.ArgumentParser, cls: type, required: set[str]) -> None:
    """Adds an option for every leaf field of ``cls`` (see the module docstring), and --config.

    Options in ``required`` must come from the command line or the YAML file.
    """
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML file of options (nested by group or flat); relative paths in it are relative "
        "to the current directory, as on the command line, and ~ is the home directory.",
    )
    leaves = _leaf_fields(cls)
    for group in dict.fromkeys(g for g, *_ in leaves):
        box = parser.add_argument_group(group or "options")
        for g, name, f, tp in leaves:
            if g != group:
                continue
            default = _default(f)
            text = f.metadata.get("help", "")
            shown = " (required)" if name in required else f" (default: {default})"
            box.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                default=argparse.SUPPRESS,
                help=text + shown,
                **_argument(tp),
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one,
    so which value a config meant would be an accident of its order)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may repeat keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(
                    f"the key {key!r} is repeated (line {key_node.start_mark.line + 1})"
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    path = path.expanduser()
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        # Bytes: PyYAML reads UTF-8 or, by its byte-order mark, UTF-16, whatever the locale.
        loaded = yaml.load(path.read_bytes(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    except ValueError as e:  # a repeated key, or a value PyYAML cannot build (a 13th month)
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of options, not a {type(loaded).__name__}")
    return loaded


def _flatten(cls: type, loaded: dict[str, Any], source: str) -> dict[str, Any]:
    leaves = {name: tp for _, name, _, tp in _leaf_fields(cls)}
    groups = {g for g, *_ in _leaf_fields(cls)}
    flat: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        # Nested and flat, or dashed and underscored, spellings of one option: which one wins
        # would be an accident of the file's order.
        if name in flat:
            raise ValueError(f"{source} gives the option {name} twice")
        flat[name] = value

    for key, value in loaded.items():
        if key in groups and isinstance(value, dict):
            for sub, v in value.items():
                put(str(f"{key}_{sub}" if key in PREFIXED else sub).replace("-", "_"), v)
        else:
            put(str(key).replace("-", "_"), value)
    unknown = sorted(set(flat) - set(leaves))
    if unknown:
        raise ValueError(f"{source}: unknown options {unknown}")
    try:
        return {name: _convert(name, leaves[name], value) for name, value in flat.items()}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _convert(name: str, tp: Any, value: Any) -> Any:
    """A YAML value as the command line would give it for an option of type ``tp``: strings
    converted by the type as argparse converts them (PyYAML reads ``1e-3`` as a string), and
    anything else of the wrong type refused with the option's name."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} needs a value, got null")
    origin = get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        converted = _scalar(name, type(choices[0]), value)
        if converted not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return converted
    if origin in (typing.Union, types.UnionType):  # list[str] | str: a list, or one string
        lists = [a for a in get_args(tp) if get_origin(a) is list]
        if not isinstance(value, list) and str in get_args(tp):
            return _scalar(name, str, value)
        tp, origin = lists[0], list
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_scalar(name, get_args(tp)[0], item) for item in items]
    return _scalar(name, tp, value)


def _scalar(name: str, tp: type, value: Any) -> Any:
    kind = {int: "an integer", float: "a number", str: "a string"}.get(tp, tp.__name__)
    if isinstance(value, bool | list | dict) or (tp is str and not isinstance(value, str)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if tp is int and isinstance(value, float):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None


def build(
    cls: type[T], args: argparse.Namespace, required: set[str], overrides: dict[str, Any]
) -> T:
    """``cls`` from the YAML file named by ``--config``, then the command line, then
    ``overrides`` (later wins).

    Raises:
        ValueError: a required option is missing, the YAML file is bad, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(_flatten(cls, _read_yaml(args.config), str(args.config)))
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "run")})
    values.update(overrides)
    missing = sorted(name for name in required if values.get(name) in (None, "", []))
    if missing:
        raise ValueError("missing " + ", ".join(f"--{n.replace('_', '-')}" for n in missing))
    kwargs: dict[str, dict[str, Any]] = {}
    for group, name, f, _ in _leaf_fields(cls):
        if name in values:
            value = values[name]
            if f.metadata.get("path"):
                # Empty where the default is a path: an unset shell variable ($OUT), which
                # would write into the current directory.
                if value in ("", [""]) and _default(f):
                    raise ValueError(f"--{name.replace('_', '-')} needs a path, got ''")
                value = _expand_user(value)
            kwargs.setdefault(group, {})[f.name] = value
    groups = _groups(cls)
    try:
        if groups is None:
            return cls(**kwargs.get("", {}))
        return cls(**{g: _group(g, sub, kwargs.get(g, {})) for g, sub in groups.items()})
    except TypeError as e:
        raise ValueError(str(e)) from None


def _expand_user(value: Any) -> Any:
    """A path option's value (one path, a list of them, or None) with ``~`` expanded."""
    if isinstance(value, list):
        return [os.path.expanduser(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) else value


def _group(name: str, cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except ValueError as e:  # its fields are options only with the group's prefix (--lora-r)
        if name in PREFIXED:
            raise ValueError(f"{name}: {e}") from None
        raise
