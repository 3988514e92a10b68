"""``openledger doctor``'s pure decisions: each check's ok / warn / fail from observed facts."""

from __future__ import annotations

import datetime as dt

import pytest

from openledger.doctor import decisions as d
from openledger.doctor.decisions import Status

NOW = dt.datetime(2026, 12, 2, 4, 0, 0, tzinfo=dt.UTC)

# ---------------------------------------------------------------- report


def test_report_is_ok_with_warnings_and_fails_with_one_failure() -> None:
    ok = d.Check("a", Status.OK, "fine")
    warn = d.Check("b", Status.WARN, "hmm", "look")
    fail = d.Check("c", Status.FAIL, "broken", "fix it")
    assert d.Report((ok, warn)).ok and d.Report((ok, warn)).exit_code == 0
    assert not d.Report((ok, fail)).ok and d.Report((ok, fail)).exit_code == 1
    assert d.Report((ok, warn, fail)).document() == {
        "checks": [
            {"name": "a", "status": "ok", "detail": "fine", "hint": ""},
            {"name": "b", "status": "warn", "detail": "hmm", "hint": "look"},
            {"name": "c", "status": "fail", "detail": "broken", "hint": "fix it"},
        ],
        "ok": False,
    }


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:p4ss@rpc.example.com:8545/v3/KEY123?token=abc", "https://rpc.example.com:8545"),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
        ("rediss://default:pw@redis:6380/0", "rediss://redis:6380"),
        ("not a url", "<url>"),
    ],
)
def test_urls_show_only_scheme_host_and_port(url: str, shown: str) -> None:
    assert d.redact_url(url) == shown


def test_redact_removes_every_secret_longest_first() -> None:
    text = "failed: http://u:hunter22@h/path-key-9 and hunter22"
    assert d.redact(text, {"hunter22", "http://u:hunter22@h/path-key-9", "ab"}) == "failed: <redacted> and <redacted>"


# ---------------------------------------------------------------- CRDs

V1 = d.CrdState((("v1alpha1", True, True),), ("v1alpha1",), True, (("v1alpha1", {"type": "object"}),))


def test_crd_matching_this_build_is_ok() -> None:
    assert d.decide_crd("models.openledger.io", V1, V1).status is Status.OK


def test_missing_crd_fails_with_the_apply_hint() -> None:
    check = d.decide_crd("models.openledger.io", V1, None)
    assert check.status is Status.FAIL and "not installed" in check.detail and "crds apply" in check.hint


def test_crd_not_established_fails() -> None:
    served = d.CrdState(V1.versions, V1.stored_versions, False, V1.schemas)
    assert d.decide_crd("x", V1, served).status is Status.FAIL


def test_crd_serving_other_versions_fails_naming_both() -> None:
    served = d.CrdState((("v1alpha0", True, True),), ("v1alpha0",), True, (("v1alpha0", {}),))
    check = d.decide_crd("x", V1, served)
    assert check.status is Status.FAIL
    assert "serves v1alpha0 (storage)" in check.detail and "needs v1alpha1 (storage)" in check.detail


def test_objects_stored_in_an_old_version_warn() -> None:
    served = d.CrdState(V1.versions, ("v1alpha0", "v1alpha1"), True, V1.schemas)
    check = d.decide_crd("x", V1, served)
    assert check.status is Status.WARN and "v1alpha0" in check.detail


def test_another_releases_schema_warns() -> None:
    served = d.CrdState(V1.versions, V1.stored_versions, True, (("v1alpha1", {"type": "string"}),))
    assert d.decide_crd("x", V1, served).status is Status.WARN


# ---------------------------------------------------------------- leader


def _lease(holder: str | None, renewed: dt.datetime | None, duration_s: int = 15) -> dict[str, object]:
    spec: dict[str, object] = {"leaseDurationSeconds": duration_s}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renewed is not None:
        spec["renewTime"] = renewed.isoformat().replace("+00:00", "Z")
    return {"spec": spec}


def test_a_fresh_lease_is_ok_and_names_its_holder() -> None:
    check = d.decide_leader("default/op", _lease("op-0-7", NOW - dt.timedelta(seconds=3)), NOW, 15)
    assert check.status is Status.OK and "op-0-7" in check.detail and "3.0 s ago" in check.detail


@pytest.mark.parametrize(
    ("lease", "words"),
    [
        (None, "no Lease default/op"),
        (_lease(None, NOW), "no holder"),
        (_lease("", NOW), "no holder"),
        (_lease("op-0-7", None), "never renewed"),
        (_lease("op-0-7", NOW - dt.timedelta(seconds=16)), "expired"),
    ],
)
def test_no_leader_fails(lease: dict[str, object] | None, words: str) -> None:
    check = d.decide_leader("default/op", lease, NOW, 15)
    assert check.status is Status.FAIL and words in check.detail and check.hint


def test_lease_duration_comes_from_the_lease_first() -> None:
    renewed = NOW - dt.timedelta(seconds=20)
    assert d.decide_leader("ns/l", _lease("a", renewed, duration_s=30), NOW, 15).status is Status.OK


# ---------------------------------------------------------------- Redis


def _redis(**overrides: object) -> d.RedisFacts:
    values: dict[str, object] = dict(
        where="redis://r:6379/0", version="7.0.15", aof_enabled=True, appendfsync="always",
        maxmemory_policy="noeviction", connected_replicas=0,
    )  # fmt: skip
    values.update(overrides)
    return d.RedisFacts(**values)  # type: ignore[arg-type]


def test_redis_with_the_persistence_aof_needs_is_ok() -> None:
    check = d.decide_redis(_redis(), "aof")
    assert check.status is Status.OK and "appendfsync always" in check.detail and "7.0.15" in check.detail


@pytest.mark.parametrize(
    ("facts", "durability", "status"),
    [
        (_redis(maxmemory_policy="allkeys-lru"), "none", Status.FAIL),
        (_redis(aof_enabled=False), "aof", Status.WARN),
        (_redis(appendfsync="everysec"), "aof", Status.WARN),
        (_redis(appendfsync=None), "aof", Status.WARN),
        (_redis(aof_enabled=False), "waitaof", Status.FAIL),  # 7.0: no WAITAOF at all
        (_redis(aof_enabled=False, version="7.2.4"), "waitaof", Status.WARN),
        (_redis(appendfsync="everysec", version="7.2.4"), "waitaof", Status.OK),
        (_redis(), "wait", Status.FAIL),
        (_redis(connected_replicas=1, aof_enabled=False), "wait", Status.OK),
        (_redis(aof_enabled=False, appendfsync="no"), "none", Status.OK),
    ],
)
def test_redis_persistence_against_the_gateway_durability(facts: d.RedisFacts, durability: str, status: Status) -> None:
    check = d.decide_redis(facts, durability)
    assert check.status is status, check
    if status is not Status.OK:
        assert check.hint


# ---------------------------------------------------------------- PostgreSQL


def test_schema_verdicts() -> None:
    assert d.decide_schema("db:5432/x", "current", {"0300"}, {"0300"}).status is Status.OK
    assert d.decide_schema("db:5432/x", "newer", {"0400"}, {"0300"}).status is Status.WARN
    old = d.decide_schema("db:5432/x", "old: at 0100, this version needs 0300", {"0100"}, {"0300"})
    assert old.status is Status.FAIL and "db upgrade" in old.hint and "old: at 0100" in old.detail
    assert d.decide_schema("db:5432/x", "empty: no migration applied", set(), {"0300"}).status is Status.FAIL


# ---------------------------------------------------------------- ingest and dead letters


def _ingest(**overrides: object) -> d.IngestFacts:
    values: dict[str, object] = dict(stream="s", group="ledger", stream_exists=True, group_exists=True, length=10,
                                     lag=0, pending=0, consumers=2)  # fmt: skip
    values.update(overrides)
    return d.IngestFacts(**values)  # type: ignore[arg-type]


def test_ingest_caught_up_is_ok() -> None:
    check = d.decide_ingest(_ingest())
    assert check.status is Status.OK and "0 undelivered" in check.detail


@pytest.mark.parametrize(
    ("facts", "status"),
    [
        (_ingest(stream_exists=False, group_exists=False), Status.WARN),
        (_ingest(group_exists=False), Status.FAIL),
        (_ingest(lag=5, oldest_undelivered_age_s=d.INGEST_LAG_WARN_S - 1), Status.OK),
        (_ingest(lag=5, oldest_undelivered_age_s=d.INGEST_LAG_WARN_S), Status.WARN),
        (_ingest(pending=3, oldest_pending_age_s=d.INGEST_LAG_FAIL_S), Status.FAIL),
        (_ingest(lag=d.INGEST_LAG_ENTRIES_WARN, oldest_undelivered_age_s=1.0), Status.WARN),
        (_ingest(lag=None), Status.OK),
    ],
)
def test_ingest_lag_thresholds(facts: d.IngestFacts, status: Status) -> None:
    assert d.decide_ingest(facts).status is status


def test_dead_letters() -> None:
    assert d.decide_dead_letters("dead", 0, 0).status is Status.OK
    dead = d.decide_dead_letters("dead", 2, 0)
    assert dead.status is Status.FAIL and "replay-dead" in dead.hint and "2 on dead" in dead.detail
    assert d.decide_dead_letters("dead", 0, 4).status is Status.WARN
    assert d.decide_dead_letters("dead", None, 0).status is Status.WARN
    assert d.decide_dead_letters("dead", 1, None).status is Status.FAIL


# ---------------------------------------------------------------- settlement and chain


@pytest.mark.parametrize(
    ("unsettled", "status"),
    [
        (0, Status.OK),
        (1, Status.OK),
        (d.SETTLEMENT_LAG_WARN_EPOCHS, Status.WARN),
        (d.SETTLEMENT_LAG_FAIL_EPOCHS - 1, Status.WARN),
        (d.SETTLEMENT_LAG_FAIL_EPOCHS, Status.FAIL),
    ],
)
def test_settlement_lag_per_pool(unsettled: int, status: Status) -> None:
    check = d.decide_settlement(d.PoolLag("team-a/pool", unsettled, 100 if unsettled else None, 99))
    assert check.status is status and check.name == "settlement team-a/pool"
    assert f"{unsettled} closed epoch(s) not settled" in check.detail


def test_chain_id_must_match_the_spec() -> None:
    assert d.decide_chain("ns/p", "http://rpc:8545", 31337, 31337).status is Status.OK
    wrong = d.decide_chain("ns/p", "http://rpc:8545", 1, 31337)
    assert wrong.status is Status.FAIL and "eth_chainId 31337, spec.chain.chainId is 1" in wrong.detail


def test_verify_summary() -> None:
    clean = d.decide_verify(d.VerifySummary([], {"entries": 4, "events": 9, "chain_pools_checked": 2}, 1))
    assert clean.status is Status.OK and "4 entries, 9 events" in clean.detail and "2 pool(s)" in clean.detail
    skipped = d.decide_verify(d.VerifySummary([], {}, 0, "no pool's chain answered"))
    assert skipped.status is Status.OK and "not checked (no pool's chain answered)" in skipped.detail
    drifts = [("entry_balances", f"entry {i}", "postings sum to 1") for i in range(5)]
    failed = d.decide_verify(d.VerifySummary(drifts))
    assert failed.status is Status.FAIL and failed.detail.startswith("5 drift(s): entry_balances: entry 0")
    assert "(+2 more)" in failed.detail
