"""The one output formatter of the read commands: amounts stay exact in JSON and YAML."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import click
import pytest
import yaml
from click.testing import CliRunner

from openledger.output import MAX_SAFE_INTEGER, UnsafeInteger, base_units, emit, output_option, plain, render

BIG = 10**30 + 7  # 10^12 tokens of 18 decimals, plus 7 base units: far past 2**53


def test_amounts_are_exact_decimal_strings_in_json_and_yaml() -> None:
    document = {"account": "owner:0xabc", "balance": base_units(BIG), "negative": base_units(-BIG)}

    from_json = json.loads(render(document, "json"))
    from_yaml = yaml.safe_load(render(document, "yaml"))

    assert from_json == from_yaml == {"account": "owner:0xabc", "balance": str(BIG), "negative": str(-BIG)}
    assert int(from_json["balance"]) == BIG


def test_an_unsafe_integer_is_refused_naming_where_it_is() -> None:
    with pytest.raises(UnsafeInteger, match=r"\$\.accounts\[0\]\.balance"):
        render({"accounts": [{"balance": MAX_SAFE_INTEGER + 1}]}, "json")


def test_counts_within_the_safe_range_stay_numbers() -> None:
    assert json.loads(render({"events": MAX_SAFE_INTEGER, "ok": True}, "json")) == {
        "events": MAX_SAFE_INTEGER,
        "ok": True,
    }


def test_base_units_takes_only_ints() -> None:
    with pytest.raises(TypeError, match="int of base units"):
        base_units(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        base_units(True)


@dataclasses.dataclass(frozen=True)
class _Line:
    entry: int
    at: dt.datetime
    tags: frozenset[str]


def test_dataclasses_times_and_sets_become_plain_data() -> None:
    at = dt.datetime(2026, 12, 2, 4, 5, 6, tzinfo=dt.UTC)
    assert plain(_Line(7, at, frozenset({"b", "a"}))) == {
        "entry": 7,
        "at": "2026-12-02T04:05:06+00:00",
        "tags": ["a", "b"],
    }


def test_unknown_objects_are_refused() -> None:
    with pytest.raises(TypeError, match=r"\$\.x: object has no JSON/YAML form"):
        plain({"x": object()})


def test_yaml_keeps_the_order_the_document_was_built_in() -> None:
    text = render({"z": 1, "a": 2}, "yaml")
    assert text.splitlines() == ["z: 1", "a: 2"]


@click.command()
@output_option()
def _command(output: str) -> None:
    emit(output, {"balance": base_units(BIG)}, lambda: click.echo(f"balance\t{BIG}"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], f"balance\t{BIG}\n"),
        (["-o", "json"], json.dumps({"balance": str(BIG)}, indent=2) + "\n"),
        (["--output", "yaml"], f"balance: '{BIG}'\n"),
    ],
)
def test_the_option_picks_table_json_or_yaml(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(_command, args)
    assert result.exit_code == 0, result.output
    assert result.output == expected


def test_an_unknown_format_is_a_usage_error_naming_the_option() -> None:
    result = CliRunner().invoke(_command, ["-o", "xml"])
    assert result.exit_code == 2
    assert "-o" in result.output and "xml" in result.output


def test_help_says_amounts_are_strings() -> None:
    result = CliRunner().invoke(_command, ["--help"])
    assert "Amounts are strings of base units" in " ".join(result.output.split())
