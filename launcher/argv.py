"""Config dataclasses <-> argv, the one way configuration crosses a process boundary.

The launcher builds a frozen `ShardConfig` / `RouterConfig` and spawns the child with
`to_argv(config)`; the child's entry point rebuilds the same object with
`from_argv(cls, argv)`. Flags are the kebab-case field names, so the two sides cannot drift.
"""

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def to_argv(config: Any) -> list[str]:
    """`--field value` for every field that differs from its default (`--flag` for true bools)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [_flag(field.name)] if value else [_flag("no_" + field.name)]
        elif isinstance(value, (list, tuple)):
            argv += [_flag(field.name), *map(str, value)]
        else:
            argv += [_flag(field.name), str(value)]
    return argv


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_sequence) of an annotation such as `int | None` or `tuple[str, ...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(inner[0])
    if origin in (tuple, list):
        return typing.get_args(annotation)[0], True
    return annotation, False


def from_argv(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").splitlines()[0])
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, is_seq = _scalar_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(
                _flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                default=field.default,
            )
            continue
        default = None if required else (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        parser.add_argument(
            _flag(field.name), dest=field.name, type=kind, required=required, default=default,
            nargs="+" if is_seq else None,
        )
    values = vars(parser.parse_args(argv))
    for field in dataclasses.fields(cls):
        if isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)
