"""The shared condition helpers and the leader-election decision."""

from __future__ import annotations

import datetime as dt

import pytest

from openledger.controllers.conditions import condition, is_true, merge_conditions, set_condition
from openledger.controllers.runner import lease_is_free


def test_condition_has_the_standard_fields() -> None:
    c = condition("Ready", True, "Ready", "ok", generation=4, now="2026-01-01T00:00:00Z")
    assert c == {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 4,
    }


def test_rejects_a_status_that_is_not_true_false_unknown() -> None:
    with pytest.raises(ValueError, match="status must be"):
        condition("Ready", "yes", "R")


def test_transition_time_kept_when_status_unchanged_and_moved_when_changed() -> None:
    old = [condition("Ready", False, "A", now="2026-01-01T00:00:00Z")]
    same = set_condition(old, condition("Ready", False, "B", "new message", now="2026-02-01T00:00:00Z"))
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "B"
    flipped = set_condition(old, condition("Ready", True, "C", now="2026-03-01T00:00:00Z"))
    assert flipped[0]["lastTransitionTime"] == "2026-03-01T00:00:00Z"
    assert is_true(flipped, "Ready")


def test_merge_keeps_order_and_appends_new_types() -> None:
    old = [condition("A", True, "x", now="t"), condition("B", True, "x", now="t")]
    merged = merge_conditions(old, [condition("B", False, "y", now="u"), condition("C", True, "z", now="u")])
    assert [c["type"] for c in merged] == ["A", "B", "C"]


NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_lease_free_when_unheld_ours_or_expired() -> None:
    assert lease_is_free({}, "me", NOW, 15)
    assert lease_is_free({"holderIdentity": "me", "renewTime": "2026-01-01T12:00:00.000000Z"}, "me", NOW, 15)
    expired = {"holderIdentity": "other", "renewTime": "2026-01-01T11:59:30.000000Z", "leaseDurationSeconds": 15}
    assert lease_is_free(expired, "me", NOW, 15)


def test_lease_held_by_a_live_peer_is_not_free() -> None:
    live = {"holderIdentity": "other", "renewTime": "2026-01-01T11:59:55.000000Z", "leaseDurationSeconds": 15}
    assert not lease_is_free(live, "me", NOW, 15)
