"""One output formatter for every read command: ``-o table|json|yaml``.

``table`` is each command's own human output (it stays what it was); ``json`` and
``yaml`` print one document built from the same data. Money is an ``int`` of base
units inside the product, but JSON consumers outside Python (jq, JavaScript) read
numbers as doubles and lose precision past 2**53, so documents carry amounts as
decimal *strings* of base units (``base_units``). An ``int`` beyond 2**53 that
slips into a document anyway is refused (``UnsafeInteger``): an amount must not
come out exact for small values and silently rounded for large ones.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast, get_args

import click
import yaml

__all__ = [
    "FORMATS",
    "MAX_SAFE_INTEGER",
    "OutputFormat",
    "UnsafeInteger",
    "base_units",
    "emit",
    "output_option",
    "plain",
    "render",
]

OutputFormat = Literal["table", "json", "yaml"]
FORMATS: tuple[str, ...] = get_args(OutputFormat)
# The largest integer an IEEE-754 double holds exactly (JavaScript's Number.MAX_SAFE_INTEGER).
MAX_SAFE_INTEGER = 2**53 - 1

F = TypeVar("F", bound=Callable[..., Any])


class UnsafeInteger(ValueError):
    """A document holds an ``int`` that JSON consumers would round; amounts go through ``base_units``."""


def base_units(amount: int) -> str:
    """An amount of base units as the exact decimal string documents carry."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int of base units, got {type(amount).__name__}")
    return str(amount)


def output_option(default: OutputFormat = "table", *, amounts: bool = True) -> Callable[[F], F]:
    """The ``-o/--output`` option of a read command (the value arrives as ``output``)."""
    note = " Amounts are strings of base units (exact past 2**53, where JSON numbers are not)." if amounts else ""
    return click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(FORMATS),
        default=default,
        show_default=True,
        help=f"table: for people; json / yaml: one machine-readable document.{note}",
    )


def plain(value: Any, path: str = "$") -> Any:
    """``value`` as JSON-compatible data: dataclasses and mappings become dicts, times ISO 8601 strings."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise UnsafeInteger(f"{path}: {value} is beyond 2**53; emit amounts with base_units()")
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value, path)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(items)]
    raise TypeError(f"{path}: {type(value).__name__} has no JSON/YAML form")


def render(document: Any, fmt: Literal["json", "yaml"]) -> str:
    """The document as JSON (indented, keys in the order built) or YAML (block style)."""
    data = plain(document)
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    raise ValueError(f"output: {fmt!r} is not json or yaml")


def emit(output: str, document: Any, table: Callable[[], None]) -> None:
    """Print ``document`` as JSON/YAML, or call ``table`` (the command's human output) for ``table``."""
    if output == "table":
        table()
    elif output in ("json", "yaml"):
        click.echo(render(document, cast(Literal["json", "yaml"], output)))
    else:
        raise click.BadParameter(f"must be one of {', '.join(FORMATS)}, not {output!r}", param_hint="-o/--output")
