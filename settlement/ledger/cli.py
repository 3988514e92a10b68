"""CLI: ``openledger db …``, ``openledger ledger …`` and ``openledger ledger-worker``."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import click

from openledger.money import to_decimal_string
from openledger.output import base_units, emit, output_option


def _url(database_url: str | None) -> str:
    from openledger.settings import get_settings

    return database_url or get_settings().database_url


_db_option = click.option("--database-url", envvar=None, default=None, help="Default: DATABASE_URL / settings.")


@click.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations of the ledger and settlement)."""


@db_group.command("upgrade")
@click.option("--revision", default="heads", show_default=True)
@_db_option
def db_upgrade(revision: str, database_url: str | None) -> None:
    """Apply migrations (idempotent; safe while other processes run it)."""
    from openledger.settlement.ledger import db

    url = _url(database_url)
    db.upgrade(url, revision)
    click.echo(f"database at revision {db.current_revision(url)}")


@db_group.command("current")
@_db_option
def db_current(database_url: str | None) -> None:
    """Show the applied revision."""
    from openledger.settlement.ledger import db

    click.echo(db.current_revision(_url(database_url)) or "(no migrations applied)")


@click.group("ledger")
def ledger_group() -> None:
    """The double-entry ledger: balances, traces, verification."""


def _fmt(amount: int, decimals: int) -> str:
    return f"{amount} ({to_decimal_string(amount, decimals)})"


@ledger_group.command("balance")
@click.argument("accounts", metavar="ACCOUNT...", nargs=-1, required=True)
@click.option("--decimals", default=18, show_default=True, help="For the decimal column.")
@output_option()
@_db_option
def ledger_balance(accounts: tuple[str, ...], decimals: int, output: str, database_url: str | None) -> None:
    """Cached balances of each ACCOUNT (`kind:ref`, or an address / pool name for all its accounts),
    read in one transaction, so they are consistent with each other."""
    import psycopg

    from openledger.settlement.ledger import db, queries

    balances: list[tuple[str, int]] = []
    with db.connect(_url(database_url)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot for every account
        for account in accounts:
            keys = queries.resolve_accounts(conn, account)
            if not keys:
                click.echo(f"no account matches {account!r}", err=True)
                sys.exit(1)
            balances += [(key, queries.balance(conn, key)) for key in keys]

    def table() -> None:
        for key, amount in balances:
            click.echo(f"{key}\t{_fmt(amount, decimals)}")

    document = {
        "accounts": [
            {"account": key, "balance": base_units(amount), "decimal": to_decimal_string(amount, decimals)}
            for key, amount in balances
        ],
        "decimals": decimals,
    }
    emit(output, document, table)


@ledger_group.command("trace")
@click.argument("account")
@click.option("--limit", default=50, show_default=True, help="Most recent entries to show.")
@click.option("--events", "show_events", is_flag=True, help="Also list each entry's events and their amounts.")
@click.option("--decimals", default=18, show_default=True)
@output_option()
@_db_option
def ledger_trace(
    account: str, limit: int, show_events: bool, decimals: int, output: str, database_url: str | None
) -> None:
    """The entries behind ACCOUNT's balance, with the running balance."""
    from openledger.settlement.ledger import db, queries

    traced: list[tuple[str, int, list[tuple[queries.TraceLine, list[queries.EventLine]]]]] = []
    with db.connect(_url(database_url)) as conn:
        accounts = queries.resolve_accounts(conn, account)
        if not accounts:
            click.echo(f"no account matches {account!r}", err=True)
            sys.exit(1)
        for key in accounts:
            lines = [
                (line, queries.entry_events(conn, line.entry_id, key) if show_events and line.kind == "usage" else [])
                for line in queries.trace(conn, key, limit)
            ]
            traced.append((key, queries.balance(conn, key), lines))

    def table() -> None:
        for key, balance, lines in traced:
            click.echo(f"# {key}: cached balance {_fmt(balance, decimals)}")
            click.echo("entry\tkind\tpool\tevents\tamount\trunning_balance\tcreated_at\tmemo")
            for line, events in lines:
                click.echo(
                    f"{line.entry_id}\t{line.kind}\t{line.pool or '-'}\t{line.event_count}\t{line.amount}\t"
                    f"{line.running_balance}\t{line.created_at.isoformat()}\t{line.memo}"
                )
                for ev in events:
                    click.echo(
                        f"  event {ev.event_id} stream {ev.stream_id} {ev.agent} {ev.model} "
                        f"cost {ev.cost} -> {ev.amount}"
                    )

    document = {"accounts": [_trace_document(key, balance, lines, show_events) for key, balance, lines in traced]}
    emit(output, document, table)


def _trace_document(key: str, balance: int, lines: list[Any], show_events: bool) -> dict[str, Any]:
    entries = []
    for line, events in lines:
        entry: dict[str, Any] = {
            "entry": line.entry_id,
            "kind": line.kind,
            "pool": line.pool,
            "events": line.event_count,
            "amount": base_units(line.amount),
            "running_balance": base_units(line.running_balance),
            "created_at": line.created_at,
            "memo": line.memo,
        }
        if show_events:
            entry["event_lines"] = [
                {"event_id": ev.event_id, "stream_id": ev.stream_id, "agent": ev.agent, "model": ev.model,
                 "cost": base_units(ev.cost), "amount": base_units(ev.amount)}
                for ev in events
            ]  # fmt: skip
        entries.append(entry)
    return {"account": key, "balance": base_units(balance), "entries": entries}


@ledger_group.command("spend")
@click.argument("agent")
@click.option("--period", type=click.Choice(["Hour", "Day", "Month"]), default="Day", show_default=True)
@output_option()
@_db_option
def ledger_spend(agent: str, period: str, output: str, database_url: str | None) -> None:
    """What AGENT (namespace/name) spent in the current period."""
    from openledger.settlement.ledger import db, queries

    with db.connect(_url(database_url)) as conn:
        spent = queries.spend_this_period(conn, agent, period)
    emit(output, {"agent": agent, "period": period, "spent": base_units(spent)}, lambda: click.echo(spent))


@ledger_group.command("reverse")
@click.argument("event_id")
@click.option("--memo", required=True, help="Why (kept on the reversing entry).")
@_db_option
def ledger_reverse(event_id: str, memo: str, database_url: str | None) -> None:
    """Correct a posted event with a reversing entry (the original stays)."""
    from openledger.settlement.ledger import db, queries
    from openledger.settlement.ledger.errors import LedgerError

    with db.connect(_url(database_url)) as conn:
        try:
            entry = queries.reverse_event(conn, event_id, memo)
        except LedgerError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
        conn.commit()
    click.echo(f"reversed by entry {entry}")


@ledger_group.command("verify")
@click.option("--quick", is_flag=True, help="SQL checks only (no split recomputation, no stream).")
@click.option("--no-stream", is_flag=True, help="Skip reconciling with the Redis stream.")
@click.option("--no-chain", is_flag=True, help="Skip checking each pool's distributor on the chain.")
@click.option("--rpc-url", default=None, help="The chain's JSON-RPC URL (default: ETH_RPC_URL).")
@output_option(amounts=False)
@_db_option
def ledger_verify(
    quick: bool, no_stream: bool, no_chain: bool, rpc_url: str | None, output: str, database_url: str | None
) -> None:
    """Check the ledger; exit 1 and say where on any drift."""
    from openledger.settings import get_settings
    from openledger.settlement.ledger import db
    from openledger.settlement.ledger.verify import verify

    s = get_settings()
    with db.connect(_url(database_url)) as conn:
        report = verify(
            conn,
            full=not quick,
            redis_url=None if (quick or no_stream) else s.redis_url,
            stream=s.usage_stream,
            group=s.usage_consumer_group,
            dead_letter_stream=s.usage_dead_letter_stream,
            rpc_url=None if (quick or no_chain) else (rpc_url or s.eth_rpc_url),
        )

    def table() -> None:
        for key, value in sorted(report.stats.items()):
            click.echo(f"{key}: {value}")
        for drift in report.drifts:
            click.echo(str(drift))
        click.echo("OK: no drift" if report.ok else f"FAILED: {len(report.drifts)} drift(s)")

    document = {
        "ok": report.ok,
        "stats": dict(sorted(report.stats.items())),
        "drifts": [{"check": d.check, "where": d.where, "detail": d.detail} for d in report.drifts],
    }
    emit(output, document, table)
    sys.exit(0 if report.ok else 1)


@ledger_group.command("replay-dead")
@click.option("--dry-run", is_flag=True, help="Write each entry in a transaction that is rolled back; remove nothing.")
@_db_option
def ledger_replay_dead(dry_run: bool, database_url: str | None) -> None:
    """Move dead-lettered usage entries back through ingest (idempotent: again changes nothing).

    Each entry is parsed and written like a fresh one, exactly once by its event
    id; one that is now ingested (or already in the ledger, or quarantined) is
    removed from the dead-letter stream, one that is still poison stays, with
    its reason. Prints one line per entry and the counts; exits 1 when some
    entries stay in the dead-letter stream, 2 when PostgreSQL or Redis is
    unavailable (what was replayed so far stays replayed: run it again).
    """
    import psycopg

    from openledger.settlement.ledger.redisraw import RedisReplyError
    from openledger.settlement.ledger.worker import REPLAY_OUTCOMES, WorkerConfig, replay_dead

    config = WorkerConfig.from_settings(database_url=database_url)
    try:
        outcomes = replay_dead(config, dry_run=dry_run)
    except (OSError, ConnectionError, psycopg.Error, RedisReplyError) as exc:
        click.echo(f"replay stopped, the rest stays in the dead-letter stream (run it again): {exc}", err=True)
        sys.exit(2)
    click.echo("dead_id\tstream_id\tevent_id\toutcome\treason")
    for o in outcomes:
        click.echo(f"{o.dead_id}\t{o.stream_id}\t{o.event_id}\t{o.outcome}\t{o.reason}")
    counts = {name: sum(o.outcome == name for o in outcomes) for name in REPLAY_OUTCOMES}
    summary = ", ".join(f"{name} {n}" for name, n in counts.items())
    click.echo(f"{'dry run, nothing changed: ' if dry_run else ''}{len(outcomes)} dead-letter entries: {summary}")
    sys.exit(1 if counts["still-dead"] or counts["other-stream"] else 0)


@click.command("ledger-worker")
@click.option("--batch-size", type=int, default=None)
@click.option("--consumer", default=None, help="Consumer name (default host-pid-random).")
@click.option("--metrics-port", type=int, default=None, help="0 disables the metrics server.")
@click.option("--no-upgrade", is_flag=True, help="Do not run `db upgrade` first.")
def ledger_worker(batch_size: int | None, consumer: str | None, metrics_port: int | None, no_upgrade: bool) -> None:
    """Consume the usage stream into the ledger (run several for more throughput)."""
    from openledger.metrics import start_metrics_server
    from openledger.settings import get_settings
    from openledger.settlement.ledger import db
    from openledger.settlement.ledger.worker import LedgerWorker, WorkerConfig

    # Each batch allocates ~40 objects per event (hiredis replies); with the default
    # thresholds the cyclic GC runs every few hundred events and walks them all.
    # Nothing on this path makes reference cycles, so collect rarely.
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)
    # The writer thread waits on PostgreSQL between short statements; a parsing reader
    # would keep the GIL for the default 5 ms after each of them.
    sys.setswitchinterval(float(os.environ.get("OPENLEDGER_LEDGER_SWITCH_INTERVAL_S", "0.0005")))
    settings = get_settings()
    if settings.ledger_upgrade_on_start and not no_upgrade:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        db.upgrade(settings.database_url)
    port = settings.ledger_metrics_port if metrics_port is None else metrics_port
    if port:
        start_metrics_server(port, settings.bind_host)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    LedgerWorker(WorkerConfig.from_settings(batch_size=batch_size, consumer=consumer)).run(stop)
