"""`openledger claims-server`: the chart's claims pods serve proofs from PostgreSQL, in every replica."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from openledger.local.processes import free_port, spawn
from tests.databases import fresh_database
from tests.waiting import wait_for


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
    except OSError:
        return 0, {}


def test_two_claims_servers_answer_from_the_same_database(database_url: str, tmp_path: Path) -> None:
    with fresh_database(database_url, "claims") as url:
        ports = [free_port(), free_port()]
        servers = [
            spawn(
                f"claims-{i}",
                [sys.executable, "-m", "openledger.cli", "claims-server"],
                tmp_path / f"claims-{i}.log",
                detached=False,
                env={"OPENLEDGER_DATABASE_URL": url, "OPENLEDGER_CLAIMS_PORT": str(port)},
            )
            for i, port in enumerate(ports)
        ]
        try:
            for port in ports:
                path = f"http://127.0.0.1:{port}/v1/pools/team/pool/claims/0x{'11' * 20}"
                status, body = wait_for(
                    lambda path=path: (r := _get(path))[0] and r, timeout_s=60, what="claims server"
                )
                assert status == 404, body  # no settled epoch yet: a clear answer, not a refused connection
                assert "error" in body
        finally:
            for server in servers:
                server.stop()
