"""Command-line flags derived from a stage's config dataclass: a setting's name, type, default and help are
written once, on the field, and every command line that offers it reads them from there.

    @dataclass(frozen=True)
    class Settings:
        replicas: int = setting(1, "engine replicas (default %(default)s)")

    add_flags(parser, Settings)                  # --replicas REPLICAS, type int, default 1, that help
    settings = from_args(Settings, parser.parse_args(argv))

The rules (`rename` and `override` handle the exceptions, field by field):
- flag: `--` and the field's name with `-` for `_`; the value lands in `args.<field name>`, so `from_args`
  finds it again whatever the flag is called;
- type: the annotation's (`int | None` is int; `tuple[str, ...]` takes one or more values);
- default: the field's; a field without one is a required flag;
- a bool is a switch: `--name` sets True where the default is False, `--no-name` sets False where it is True;
- help: `metadata["help"]` (argparse's `%(default)s` names the default, so the help never restates it);
  `metadata["choices"]` and `metadata["metavar"]` pass through to argparse.
A flag is added to whatever it is given: a parser, or one of its argument groups (a section of `--help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *, choices: Iterable | None = None,
            metavar: str | None = None, **field_kwargs) -> Any:
    """A dataclass field with its command-line help (and choices, metavar) in its metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def flag_name(field_name: str) -> str:
    """The flag a field gets unless renamed: max_num_seqs -> --max-num-seqs."""
    return "--" + field_name.replace("_", "-")


def _strip_none(annotation):
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def _value_type(annotation) -> tuple[type, bool]:
    """(the type argparse converts a value to, whether the flag takes one or more values)."""
    annotation = _strip_none(annotation)
    if typing.get_origin(annotation) in (tuple, list):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _fields(config: type, names: Iterable[str] | None, skip: Iterable[str]) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(config)}
    if names is None:
        names = [name for name in by_name if by_name[name].init]
    unknown = [name for name in [*names, *skip] if name not in by_name]
    if unknown:
        raise ValueError(f"{config.__name__} has no field {', '.join(unknown)}")
    return [by_name[name] for name in names if name not in set(skip)]


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type,
              fields: Iterable[str] | None = None, *, skip: Iterable[str] = (), rename: Mapping[str, str] = {},
              help: Mapping[str, str] = {}, override: Mapping[str, Mapping[str, Any]] = {}) -> None:
    """Add a flag for each of `config`'s fields (in `fields`' order; default: all, in declaration order, less `skip`).

    rename: field -> flag where the flag is not the field's name (`{"weight_decay": "--wd"}`);
    help: field -> help where the field carries none, or this command words it for its own context;
    override: field -> argparse keyword arguments that replace the derived ones (`{"seed": {"default": None}}`)."""
    hints = typing.get_type_hints(config)
    for f in _fields(config, fields, skip):
        flag = rename.get(f.name, flag_name(f.name))
        kwargs: dict[str, Any] = {"dest": f.name, "help": help.get(f.name, f.metadata.get("help"))}
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value_type, many = _value_type(hints[f.name])
        if value_type is bool:
            if default is True and f.name not in rename:
                flag = "--no-" + f.name.replace("_", "-")
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            if value_type is not str:
                kwargs["type"] = value_type
            if many:
                kwargs["nargs"] = "+"
            for key in ("choices", "metavar"):
                if key in f.metadata:
                    kwargs[key] = f.metadata[key]
            if "metavar" not in kwargs and flag != flag_name(f.name):
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # argparse's own, from the flag
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        kwargs.update(override.get(f.name, {}))
        if "default" in override.get(f.name, {}):
            kwargs.pop("required", None)
        parser.add_argument(flag, **kwargs)


def from_args(config: type, args: argparse.Namespace, **given):
    """`config` from the parsed flags of its fields (fields without a flag keep their defaults); `given` wins."""
    hints = typing.get_type_hints(config)
    values = {}
    for f in dataclasses.fields(config):
        if f.init and hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, list) and typing.get_origin(_strip_none(hints[f.name])) is tuple:
                value = tuple(value)  # argparse collects one or more values in a list
            values[f.name] = value
    return config(**{**values, **given})
