"""The ledger's schema (SQLAlchemy 2). Alembic migrations in ``migrations/`` create it.

Money columns are ``NUMERIC(78, 0)``: exact integers of up to 78 digits, which
holds every uint256 the chain can pay. ``BIGINT`` (max 9.2e18) would overflow
after ten whole tokens at 18 decimals; balances of 10**30 base units are
realistic. Postings are aggregated per account per batch, so the cost of
``NUMERIC`` arithmetic is paid on a few rows per batch, not per event.

Immutability: ``journal_entries``, ``postings``, ``usage_events`` and
``usage_quarantine`` reject ``UPDATE``, ``DELETE`` and ``TRUNCATE`` with a
trigger (see the first migration). Corrections are new, reversing entries.
``account_balances`` and ``agent_spend_hourly`` are caches maintained in the
same transaction as the postings and checked by ``openledger ledger verify``.

``usage_events.entry_id`` has no foreign key on purpose: a per-row RI trigger
would cost about a third of the COPY speed. Events and their entry are written
by one code path in one transaction, and ``ledger verify`` checks that every
entry's postings equal the sum of its events' splits.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Sequence,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(78, 0, asdecimal=False)
# One nextval reserves a block of ids for a batch's entries (one per pool).
JOURNAL_ID_BLOCK = 1024
journal_entry_id_seq = Sequence("journal_entry_id_seq", increment=JOURNAL_ID_BLOCK, start=1)


# The caches are updated in place by every batch: room on each page keeps those updates HOT
# (same page, no index entry); see migration 0200.
CACHE_FILLFACTOR = 50


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    """A ledger account: ``key`` is ``<kind>:<ref>`` (see ``split.py``)."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('agent','owner','contributor','pool_fee','protocol','external')", name="kind"),
        Index("ix_accounts_ref", "ref"),
    )

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    ref: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class JournalEntry(Base):
    """An immutable, balanced entry. Usage entries hold one batch's events of one pool."""

    __tablename__ = "journal_entries"
    __table_args__ = (
        CheckConstraint("kind IN ('usage','reversal','transfer')", name="kind"),
        CheckConstraint("amount >= 0", name="amount_nonnegative"),
        Index("ix_journal_entries_pool_id", "pool", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, journal_entry_id_seq, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    pool: Mapped[str] = mapped_column(Text, server_default=text("''"))
    event_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Sum of the credits (== minus the sum of the debits).
    amount: Mapped[int] = mapped_column(Money)
    reverses_event_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), unique=True)
    memo: Mapped[str] = mapped_column(Text, server_default=text("''"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Posting(Base):
    """One account's amount in one entry: credit > 0, debit < 0. ``pool`` is the entry's.

    The primary key leads with the account (traces and balances read by account);
    ``(pool, entry_id)`` serves settlement. ``account`` has no foreign key: the
    per-row check would lock the hot account rows (multixacts between workers);
    the writer inserts the accounts first in the same transaction and
    ``ledger verify`` checks that every posting's account exists.
    """

    __tablename__ = "postings"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount_nonzero"),
        Index("ix_postings_pool_entry", "pool", "entry_id"),
    )

    account: Mapped[str] = mapped_column(Text, primary_key=True)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), primary_key=True)
    pool: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(Money)


class UsageEvent(Base):
    """A usage event exactly as it arrived; ``event_id`` is unique forever.

    ``entry_id`` is the journal entry that posted it (NULL when it cost 0).
    """

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_events_entry_id", "entry_id"),)

    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    agent: Mapped[str] = mapped_column(Text)
    payer: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(Text)
    token: Mapped[str] = mapped_column(Text)
    decimals: Mapped[int] = mapped_column(SmallInteger)
    per_request: Mapped[int] = mapped_column(Money)
    per_input_token: Mapped[int] = mapped_column(Money)
    per_output_token: Mapped[int] = mapped_column(Money)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cost: Mapped[int] = mapped_column(Money)
    outcome: Mapped[str] = mapped_column(Text)
    started_at_ms: Mapped[int] = mapped_column(BigInteger)
    finished_at_ms: Mapped[int] = mapped_column(BigInteger)
    contributors: Mapped[str] = mapped_column(Text)  # the wire form "account:bps:role,…"
    pool: Mapped[str] = mapped_column(Text)
    fee_bps: Mapped[int] = mapped_column(Integer)
    extra: Mapped[str] = mapped_column(Text)
    stream_id: Mapped[str] = mapped_column(Text)
    entry_id: Mapped[int | None] = mapped_column(BigInteger)
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class QuarantinedEvent(Base):
    """A message whose id was already used with different fields. Never posted, never overwrites."""

    __tablename__ = "usage_quarantine"
    __table_args__ = (UniqueConstraint("event_id", "fields_sha256", name="uq_usage_quarantine_event_fields"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    stream_id: Mapped[str] = mapped_column(Text)
    fields: Mapped[dict[str, str]] = mapped_column(JSONB)
    fields_sha256: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AccountBalance(Base):
    """Cached balance per account, updated with every entry; ``ledger verify`` recomputes it."""

    __tablename__ = "account_balances"
    __table_args__ = {"postgresql_with": {"fillfactor": CACHE_FILLFACTOR}}

    account: Mapped[str] = mapped_column(Text, ForeignKey("accounts.key"), primary_key=True)
    balance: Mapped[int] = mapped_column(Money)
    last_entry_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AgentSpendHourly(Base):
    """Spend per Agent per hour (UTC), by the event's finish time; sums give any period."""

    __tablename__ = "agent_spend_hourly"
    __table_args__ = {"postgresql_with": {"fillfactor": CACHE_FILLFACTOR}}

    agent: Mapped[str] = mapped_column(Text, primary_key=True)
    hour_start: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    amount: Mapped[int] = mapped_column(Money)
    events: Mapped[int] = mapped_column(BigInteger)


class Epoch(Base):
    """A RewardPool's settlement epoch. The settler (settlement/epochs) owns its life cycle.

    ``cutoff_entry_id`` is the last journal entry the epoch includes (take it with
    ``queries.journal_cutoff``); ``total`` and ``root`` describe the cumulative
    distribution up to it.
    """

    __tablename__ = "epochs"

    pool: Mapped[str] = mapped_column(Text, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[str] = mapped_column(Text, server_default=text("'open'"))
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    cutoff_entry_id: Mapped[int | None] = mapped_column(BigInteger)
    root: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int | None] = mapped_column(Money)
    payee_count: Mapped[int | None] = mapped_column(Integer)
    tx_hash: Mapped[str | None] = mapped_column(Text)


IMMUTABLE_TABLES = ("journal_entries", "postings", "usage_events", "usage_quarantine")
