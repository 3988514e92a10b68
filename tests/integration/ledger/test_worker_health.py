"""What the chart's probes and init containers rely on, on real PostgreSQL and Redis.

The ledger worker answers ``/healthz`` and ``/readyz``; ``openledger db wait``
holds a process back until the schema is this version's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import psycopg

from openledger.local.processes import free_port
from tests.databases import fresh_database
from tests.waiting import wait_for

from .conftest import LedgerEnv, make_event


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_worker_process_answers_its_probes(ledger_env: LedgerEnv, platform_env: dict[str, str]) -> None:
    port = free_port()
    worker = ledger_env.spawn_worker(
        platform_env, "health-worker", OPENLEDGER_LEDGER_HEALTH_PORT=str(port), OPENLEDGER_BIND_HOST="127.0.0.1"
    )
    try:
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, timeout_s=60, what="worker /readyz")
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
        assert _status(f"http://127.0.0.1:{port}/nothing") == 404
        ledger_env.produce([make_event(i) for i in range(5)])
        ledger_env.wait_for(lambda: ledger_env.count() == 5, 30, "the worker to ingest while serving probes")
    finally:
        worker.stop()


def _db_wait(url: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "openledger.cli", "db", "wait", "--timeout", str(timeout_s), "--database-url", url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ))


def test_db_wait_holds_back_until_the_schema_is_this_versions(database_url: str) -> None:
    with fresh_database(database_url, "dbwait", migrate=False) as url:
        empty = _db_wait(url, 1)
        assert empty.returncode == 1 and "empty: no migration applied" in empty.stderr
        subprocess.run([sys.executable, "-m", "openledger.cli", "db", "upgrade", "--database-url", url], check=True)
        ready = _db_wait(url, 1)
        assert ready.returncode == 0 and "schema is current" in ready.stdout
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0001_ledger_base'")
        old = _db_wait(url, 1)
        assert old.returncode == 1 and "old: at 0001_ledger_base" in old.stderr
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '9999_from_a_later_release'")
        newer = _db_wait(url, 1)
        assert newer.returncode == 0 and "schema is newer" in newer.stdout
