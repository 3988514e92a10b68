"""``openledger doctor``'s decisions: observed facts in, one ``Check`` (ok | warn | fail) out.

Pure: nothing here does I/O or imports a client library (``probes`` gathers the
facts). Each function states what makes it warn and what makes it fail; a fail
carries a hint that says what to do. Thresholds are named constants below.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "INGEST_LAG_ENTRIES_WARN",
    "INGEST_LAG_FAIL_S",
    "INGEST_LAG_WARN_S",
    "SETTLEMENT_LAG_FAIL_EPOCHS",
    "SETTLEMENT_LAG_WARN_EPOCHS",
    "Check",
    "CrdState",
    "IngestFacts",
    "PoolLag",
    "RedisFacts",
    "Report",
    "Status",
    "VerifySummary",
    "decide_chain",
    "decide_crd",
    "decide_dead_letters",
    "decide_ingest",
    "decide_leader",
    "decide_redis",
    "decide_schema",
    "decide_settlement",
    "decide_verify",
    "redact",
    "redact_url",
]

# Ingest lag: age of the oldest usage entry the ledger has not committed yet.
INGEST_LAG_WARN_S = 30.0
INGEST_LAG_FAIL_S = 300.0
INGEST_LAG_ENTRIES_WARN = 100_000
# Settlement: closed epochs not settled yet. One is normal (being published).
SETTLEMENT_LAG_WARN_EPOCHS = 2
SETTLEMENT_LAG_FAIL_EPOCHS = 5


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Nothing failed (warnings allowed)."""
        return all(c.status is not Status.FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def document(self) -> dict[str, Any]:
        checks = [{"name": c.name, "status": str(c.status), "detail": c.detail, "hint": c.hint} for c in self.checks]
        return {"checks": checks, "ok": self.ok}


def _ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def _warn(name: str, detail: str, hint: str = "") -> Check:
    return Check(name, Status.WARN, detail, hint)


def _fail(name: str, detail: str, hint: str) -> Check:
    return Check(name, Status.FAIL, detail, hint)


# ------------------------------------------------------------------ secrets


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` only: user, password, path and query may all hold credentials."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<url>"
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{authority.rpartition('@')[2]}"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value (longest first) replaced by ``<redacted>``."""
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


# ------------------------------------------------------------------ Kubernetes


@dataclass(frozen=True)
class CrdState:
    """What the API server serves for one CRD (``None`` fields: not installed)."""

    versions: tuple[tuple[str, bool, bool], ...]  # (name, served, storage)
    stored_versions: tuple[str, ...]
    established: bool
    schemas: tuple[tuple[str, Any], ...]  # (version name, schema)


def decide_crd(name: str, expected: CrdState, served: CrdState | None) -> Check:
    """Fail: missing, not Established, or other versions served than this build's.

    Warn: objects stored in a version this build does not serve (a storage
    migration is due), or a schema that differs from this build's (the CRDs
    come from another release).
    """
    check = f"crd {name}"
    apply = "openledger crds apply (the chart's pre-upgrade hook runs it)"
    if served is None:
        return _fail(check, "not installed", apply)
    if not served.established:
        return _fail(check, "installed but not Established", f"kubectl describe crd {name}")
    if served.versions != expected.versions:
        return _fail(check, f"serves {_versions(served)}, this build needs {_versions(expected)}", apply)
    known = {v for v, _, _ in expected.versions}
    stale = sorted(set(served.stored_versions) - known)
    if stale:
        return _warn(
            check,
            f"objects stored as {', '.join(stale)}, which this build does not serve",
            "migrate the stored objects, then drop the version from status.storedVersions",
        )
    if served.schemas != expected.schemas:
        return _warn(check, "schema differs from this build's (another release applied it)", apply)
    return _ok(check, f"{_versions(served)}, stored {', '.join(served.stored_versions) or '-'}")


def _versions(state: CrdState) -> str:
    return (
        ", ".join(
            f"{n}{' (storage)' if storage else ''}{'' if served else ' (not served)'}"
            for n, served, storage in state.versions
        )
        or "no versions"
    )


def _parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str) and value:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


def decide_leader(where: str, lease: Mapping[str, Any] | None, now: dt.datetime, default_duration_s: float) -> Check:
    """Fail: no Lease, no holder, or a holder that has not renewed within the lease duration."""
    check = "operator leader"
    hint = "check the operator's pods and logs (kubectl logs deploy/<release>-operator)"
    if lease is None:
        return _fail(check, f"no Lease {where}: no operator has ever led", hint)
    spec = lease.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    if not holder:
        return _fail(check, f"Lease {where} has no holder (released; no operator leads)", hint)
    renewed = _parse_time(spec.get("renewTime")) or _parse_time(spec.get("acquireTime"))
    duration_s = float(spec.get("leaseDurationSeconds") or default_duration_s)
    if renewed is None:
        return _fail(check, f"Lease {where}: holder {holder} never renewed it", hint)
    age_s = (now - renewed).total_seconds()
    if age_s > duration_s:
        return _fail(
            check, f"Lease {where} expired: {holder} last renewed {age_s:.0f} s ago (> {duration_s:g} s)", hint
        )
    return _ok(check, f"{holder} holds Lease {where}, renewed {max(age_s, 0.0):.1f} s ago (duration {duration_s:g} s)")


# ------------------------------------------------------------------ Redis


@dataclass(frozen=True)
class RedisFacts:
    where: str  # redis[s]://host:port/db, never the password
    version: str
    aof_enabled: bool
    appendfsync: str | None  # None: CONFIG GET refused (managed Redis, ACL)
    maxmemory_policy: str
    connected_replicas: int


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def decide_redis(facts: RedisFacts, durability: str) -> Check:
    """Against ``OPENLEDGER_GATEWAY_DURABILITY`` (gateway/durability.py says what each needs).

    Fail: an evicting ``maxmemory-policy`` (budgets, reservations and the stream
    could be evicted: money lost), ``waitaof`` on a server older than 7.2 (no
    WAITAOF: every answer would be withheld), ``wait`` with no replica (same).
    Warn: ``aof`` without ``appendonly yes`` + ``appendfsync always``, or
    ``waitaof`` without ``appendonly yes`` (a Redis crash loses unread usage),
    or settings that could not be read.
    """
    check = "redis"
    settings = (
        f"appendonly {'yes' if facts.aof_enabled else 'no'}, appendfsync {facts.appendfsync or 'unknown'}, "
        f"maxmemory-policy {facts.maxmemory_policy}"
    )
    detail = f"redis {facts.version} at {facts.where}: {settings} (gateway durability {durability})"
    if facts.maxmemory_policy != "noeviction":
        return _fail(check, detail, "set maxmemory-policy noeviction: evicted keys lose budgets and usage events")
    if durability == "waitaof" and _version_tuple(facts.version) < (7, 2):
        return _fail(check, detail, "WAITAOF needs Redis 7.2+: upgrade Redis or use durability aof")
    if durability == "wait" and facts.connected_replicas < 1:
        return _fail(check, detail + ", 0 replicas", "durability wait needs a connected replica (WAIT 1)")
    if durability in ("aof", "waitaof") and not facts.aof_enabled:
        return _warn(check, detail, f"durability {durability} needs appendonly yes, else a crash loses usage")
    if durability == "aof" and facts.appendfsync is None:
        return _warn(check, detail, "cannot read appendfsync (CONFIG GET refused): make sure it is always")
    if durability == "aof" and facts.appendfsync != "always":
        return _warn(check, detail, "durability aof needs appendfsync always (or use durability waitaof)")
    return _ok(check, detail)


# ------------------------------------------------------------------ PostgreSQL


def decide_schema(where: str, verdict: str, current: Iterable[str], heads: Iterable[str]) -> Check:
    """``verdict`` is ``openledger.deploy.schema_verdict``'s: current, newer, empty…, old….

    Fail: empty or old (this version's processes wait for ``db upgrade``).
    Warn: newer (a later release migrated it; this version may be rolled back).
    """
    check = "postgresql schema"
    at = ", ".join(sorted(current)) or "-"
    head = ", ".join(sorted(heads))
    if verdict == "current":
        return _ok(check, f"{where}: at {at} (this build's head)")
    if verdict == "newer":
        return _warn(check, f"{where}: at {at}, newer than this build's {head}", "a later release migrated it")
    return _fail(check, f"{where}: {verdict}", "openledger db upgrade (the chart's migration hook runs it)")


# ------------------------------------------------------------------ ingest


@dataclass(frozen=True)
class IngestFacts:
    stream: str
    group: str
    stream_exists: bool
    group_exists: bool
    length: int = 0
    lag: int | None = None  # entries not yet delivered to the group (None: the server does not say)
    pending: int = 0  # delivered, not yet acknowledged
    consumers: int = 0
    oldest_undelivered_age_s: float | None = None
    oldest_pending_age_s: float | None = None


def decide_ingest(facts: IngestFacts) -> Check:
    """Fail: a stream with no consumer group, or usage waiting ``INGEST_LAG_FAIL_S`` or longer.

    Warn: no stream yet (nothing served), usage waiting ``INGEST_LAG_WARN_S``
    or longer, or ``INGEST_LAG_ENTRIES_WARN`` entries behind.
    """
    check = "ingest lag"
    hint = "check the ledger worker (openledger ledger-worker): running, reaching PostgreSQL, not crash-looping"
    if not facts.stream_exists:
        return _warn(check, f"stream {facts.stream} does not exist yet (no usage written)")
    if not facts.group_exists:
        return _fail(check, f"stream {facts.stream} has no consumer group {facts.group!r}: nothing ingests it", hint)
    ages = [a for a in (facts.oldest_undelivered_age_s, facts.oldest_pending_age_s) if a is not None]
    age_s = max(ages, default=0.0)
    lag = "unknown" if facts.lag is None else str(facts.lag)
    detail = (
        f"{facts.stream}: {facts.length} entries, {lag} undelivered, {facts.pending} pending "
        f"({facts.consumers} consumers), oldest waiting {age_s:.1f} s"
    )
    if age_s >= INGEST_LAG_FAIL_S:
        return _fail(check, detail, hint)
    if age_s >= INGEST_LAG_WARN_S or (facts.lag or 0) >= INGEST_LAG_ENTRIES_WARN:
        return _warn(check, detail, "the worker is behind: more replicas or a larger OPENLEDGER_LEDGER_BATCH_SIZE")
    return _ok(check, detail)


def decide_dead_letters(dead_stream: str, dead: int | None, quarantined: int | None) -> Check:
    """Fail: dead-lettered usage (served, not in the ledger). Warn: quarantined events, or a count unreadable."""
    check = "dead letters"
    detail = (
        f"{'unknown' if dead is None else dead} on {dead_stream}, "
        f"{'unknown' if quarantined is None else quarantined} quarantined"
    )
    if dead:
        return _fail(
            check, detail, "inspect the reasons (XRANGE on the stream), fix, then openledger ledger replay-dead"
        )
    if quarantined:
        return _warn(check, detail, "quarantined events are recorded, not posted: SELECT * FROM usage_quarantine")
    if dead is None or quarantined is None:
        return _warn(check, detail, "Redis or PostgreSQL did not answer (see their checks)")
    return _ok(check, detail)


# ------------------------------------------------------------------ settlement and chain


@dataclass(frozen=True)
class PoolLag:
    pool: str
    unsettled_epochs: int  # closed or publishing
    oldest_unsettled_epoch: int | None = None
    last_settled_epoch: int | None = None


def decide_settlement(lag: PoolLag) -> Check:
    """Warn at ``SETTLEMENT_LAG_WARN_EPOCHS`` closed epochs not settled, fail at ``SETTLEMENT_LAG_FAIL_EPOCHS``."""
    check = f"settlement {lag.pool}"
    last = "none yet" if lag.last_settled_epoch is None else str(lag.last_settled_epoch)
    detail = f"{lag.unsettled_epochs} closed epoch(s) not settled; last settled epoch {last}"
    if lag.oldest_unsettled_epoch is not None and lag.unsettled_epochs:
        detail += f", oldest unsettled {lag.oldest_unsettled_epoch}"
    hint = "kubectl describe rewardpool (conditions, Events): chain reachable, signer funded, not paused"
    if lag.unsettled_epochs >= SETTLEMENT_LAG_FAIL_EPOCHS:
        return _fail(check, detail, hint)
    if lag.unsettled_epochs >= SETTLEMENT_LAG_WARN_EPOCHS:
        return _warn(check, detail, hint)
    return _ok(check, detail)


def decide_chain(pool: str, where: str, expected_chain_id: int, observed_chain_id: int) -> Check:
    """Fail: the RPC endpoint answers for another chain than ``spec.chain.chainId``."""
    check = f"chain {pool}"
    if observed_chain_id != expected_chain_id:
        return _fail(
            check,
            f"{where} answers eth_chainId {observed_chain_id}, spec.chain.chainId is {expected_chain_id}",
            "point the rpcUrl Secret at the pool's chain",
        )
    return _ok(check, f"{where} answers eth_chainId {observed_chain_id}")


@dataclass(frozen=True)
class VerifySummary:
    drifts: Sequence[tuple[str, str, str]]  # (check, where, detail)
    stats: Mapping[str, int] = field(default_factory=dict)
    chain_urls_checked: int = 0
    chain_skipped: str = ""  # why the chain part did not run


def decide_verify(summary: VerifySummary) -> Check:
    """Fail on any drift (the first three are named); ok otherwise, with what was checked."""
    check = "ledger verify"
    stats = summary.stats
    counted = f"{stats.get('entries', 0)} entries, {stats.get('events', 0)} events"
    chain = (
        f"chain: {stats.get('chain_pools_checked', 0)} pool(s) checked"
        if summary.chain_urls_checked
        else f"chain: not checked ({summary.chain_skipped or 'no reachable pool'})"
    )
    if summary.drifts:
        named = "; ".join(f"{c}: {w}: {d}" for c, w, d in summary.drifts[:3])
        more = f" (+{len(summary.drifts) - 3} more)" if len(summary.drifts) > 3 else ""
        return _fail(check, f"{len(summary.drifts)} drift(s): {named}{more}", "openledger ledger verify lists all")
    return _ok(check, f"no drift in {counted}; {chain}")
