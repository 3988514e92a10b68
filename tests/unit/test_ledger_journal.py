"""Pure decisions around journal writes: an entry's precondition and how a database error is treated."""

from __future__ import annotations

import pytest

from openledger.settlement.ledger.errors import DbErrorKind, InvariantViolation, classify_sqlstate
from openledger.settlement.ledger.journal import Entry, check_entry

OWNER = "owner:0x" + "b" * 40
AGENT = "agent:0x" + "a" * 40


def test_a_balanced_entry_passes_and_its_amount_is_the_sum_of_the_credits() -> None:
    entry = Entry("usage", {AGENT: -30, OWNER: 27, "protocol:fees": 3}, pool="")
    check_entry(entry)
    assert entry.amount == 30


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Entry("usage", {AGENT: -30, OWNER: 29}), "postings sum to -1, not 0"),
        (Entry("usage", {}), "has no postings"),
        (Entry("usage", {AGENT: 0}), "posting of 0 to agent:"),
        (Entry("usage", {AGENT: -1.0, OWNER: 1.0}), "is float, not int"),  # type: ignore[dict-item]
        (Entry("refund", {AGENT: -1, OWNER: 1}), "kind must be one of"),  # type: ignore[arg-type]
    ],
)
def test_an_entry_that_breaks_a_rule_is_refused_before_any_write(entry: Entry, message: str) -> None:
    with pytest.raises(InvariantViolation, match=message):
        check_entry(entry)


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        (None, DbErrorKind.ENVIRONMENT),  # the connection died without a server error
        ("08006", DbErrorKind.ENVIRONMENT),  # connection failure
        ("57P01", DbErrorKind.ENVIRONMENT),  # admin shutdown
        ("57014", DbErrorKind.ENVIRONMENT),  # statement timeout
        ("25006", DbErrorKind.ENVIRONMENT),  # read-only transaction (a standby)
        ("42501", DbErrorKind.ENVIRONMENT),  # insufficient privilege
        ("42P01", DbErrorKind.ENVIRONMENT),  # undefined table: a migration not applied
        ("53100", DbErrorKind.ENVIRONMENT),  # disk full
        ("40001", DbErrorKind.ENVIRONMENT),  # serialization failure
        ("22021", DbErrorKind.ROW),  # invalid byte sequence for the encoding
        ("22003", DbErrorKind.ROW),  # numeric value out of range
        ("23514", DbErrorKind.ROW),  # check violation
        ("54000", DbErrorKind.ROW),  # a value too large for an index row
    ],
)
def test_only_data_errors_one_row_can_cause_make_a_row_poison(sqlstate: str | None, kind: DbErrorKind) -> None:
    assert classify_sqlstate(sqlstate) is kind
