"""Command-line flags made from a config dataclass's fields, and the config made back from the parsed flags.

A field ``max_steps: int = 300`` becomes ``--max-steps`` (``type=int``, default 300); a field without a default is
a required flag; ``list[T]`` takes one value or more; ``T | None`` parses as ``T``. Booleans: default ``False``
gives ``--NAME`` (sets it), default ``True`` gives ``--no-NAME`` (clears it), ``bool | None`` gives
``--NAME/--no-NAME`` (neither: ``None``). A field whose type is a dataclass adds that dataclass's flags
(``TrainConfig.optim`` adds ``--lr``, ...). A field's ``metadata`` holds keywords of
``ArgumentParser.add_argument`` that replace the derived ones (``help``, ``choices``, ``metavar``, ``default``);
``metadata={"cli": False}`` keeps a field off the command line (it takes its default, or a value the caller of
:func:`config_from_args` gives).

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Run:
    ...     steps: int = field(default=10, metadata={"help": "steps to run"})
    ...     progress: bool = True
    >>> parser = argparse.ArgumentParser()
    >>> add_config_flags(parser, Run)
    >>> config_from_args(Run, parser.parse_args(["--steps", "3", "--no-progress"]))
    Run(steps=3, progress=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

Config = TypeVar("Config")


def _flag_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    """The fields of dataclass ``cls`` that are on the command line, with their types resolved."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.metadata.get("cli", True):
            yield item, hints[item.name]


def _without_none(kind: Any) -> Any:
    """``T`` for ``T | None``; any other type as it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return inner
    return kind


def _argument(item: dataclasses.Field, kind: Any) -> tuple[str, dict[str, Any]]:
    """The flag name and ``add_argument`` keywords of one field (before its metadata is applied)."""
    name = "--" + item.name.replace("_", "-")
    if item.default is not dataclasses.MISSING:
        options: dict[str, Any] = {"default": item.default}
    elif item.default_factory is not dataclasses.MISSING:
        options = {"default": item.default_factory()}
    else:
        options = {"required": True}
    if kind is bool:
        if options.get("default"):
            return "--no-" + name[2:], {**options, "action": "store_false"}
        return name, {**options, "action": "store_true"}
    inner = _without_none(kind)
    if inner is bool:
        return name, {**options, "action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is list:
        (element,) = typing.get_args(inner)
        return name, {**options, "nargs": "+", "type": element}
    return name, {**options, "type": inner}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag to ``parser`` for every command-line field of dataclass ``cls`` (see the module docstring)."""
    for item, kind in _flag_fields(cls):
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind)
            continue
        name, options = _argument(item, kind)
        overrides = {key: value for key, value in item.metadata.items() if key != "cli"}
        parser.add_argument(name, dest=item.name, **{**options, **overrides})


def add_config_parser(subparsers: argparse._SubParsersAction, name: str, cls: type,
                      **options: Any) -> argparse.ArgumentParser:
    """The subcommand ``name`` (``options``: those of ``add_parser``, such as ``help``) with the flags of ``cls``."""
    parser = subparsers.add_parser(name, **options)
    add_config_flags(parser, cls)
    return parser


def config_from_args(cls: type[Config], args: argparse.Namespace, **fields: Any) -> Config:
    """The ``cls`` that parsed flags ``args`` describe (flags from :func:`add_config_flags`); ``fields`` are given
    values of fields, flags or not, that win over the parsed ones."""
    values = {}
    for item, kind in _flag_fields(cls):
        if item.name not in fields:
            values[item.name] = config_from_args(kind, args) if dataclasses.is_dataclass(kind) else \
                getattr(args, item.name)
    return cls(**values, **fields)
