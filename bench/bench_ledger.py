"""Ledger ingest benchmark: usage stream -> committed postings, beside a raw COPY of the same rows.

Each run: a fresh database (migrated), a fresh consumer group on one pre-filled
stream of ``N`` events (4 postings each: payer, pool fee, one contributor,
owner). The group is created at the stream's end, the workers start and block,
then ``XGROUP SETID … 0`` releases every entry at once; the clock stops when
the last event is committed and acknowledged. Workers are real
``openledger ledger-worker`` processes. Baseline, in the same run and the same
PostgreSQL: ``COPY usage_events FROM STDIN`` of exactly the rows the worker
writes (same table, same indexes, same batch size, one connection): the
physical limit of storing the events alone. Medians of 5 runs, and the median of the per-run ratios.

Run: ``.venv/bin/pytest bench/bench_ledger.py -m bench -s`` -> ``bench/results/ledger.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from openledger.gateway.ids import uuid7
from openledger.local.processes import spawn, tail
from openledger.settlement.ledger.ingest import COPY_COLUMNS, Parser, assemble, entry_kv
from openledger.wire import Contributor, Price, UsageEvent
from tests.databases import fresh_database

N_EVENTS = int(os.environ.get("LEDGER_BENCH_EVENTS", "200000"))
BATCH = int(os.environ.get("LEDGER_BENCH_BATCH", "5000"))
RUNS = int(os.environ.get("LEDGER_BENCH_RUNS", "5"))
RESULTS = Path(__file__).parent / "results" / "ledger.json"
PRICE = Price(per_request=10**12, per_input_token=3 * 10**9, per_output_token=11 * 10**9)


def make_events(n: int) -> list[dict[str, str]]:
    out = []
    now = int(time.time() * 1000)
    for i in range(n):
        tin, tout = 100 + i % 3000, 50 + i % 700
        e = UsageEvent(
            event_id=uuid7(now + i // 100),
            agent=f"team-{i % 7}/agent-{i % 100}",
            payer=f"0x{i % 100 + 1:040x}",
            model=f"team-{i % 7}/model-{i % 20}",
            owner=f"0x{i % 20 + 0x1000:040x}",
            price=PRICE,
            input_tokens=tin,
            output_tokens=tout,
            cost=PRICE.cost(tin, tout),
            outcome="ok",
            started_at_ms=now - 30,
            finished_at_ms=now,
            contributors=(Contributor(f"0x{i % 50 + 0x2000:040x}", 1500),),
            pool=f"team-{i % 3}/pool",
            fee_bps=500,
        )
        out.append(e.to_entry())
    return out


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        return int(row[0]) if row else 0


def _group_drained(r: redis.Redis, stream: str, group: str) -> bool:
    for info in r.xinfo_groups(stream):
        if info["name"].decode() == group:
            return bool(info["lag"] == 0 and info["pending"] == 0)
    raise AssertionError(f"group {group} vanished")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (PostgreSQL: postmaster + backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().split(") ", 1)[1].split()
            if int(entry.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _server_pid(port: int, name: str) -> int:
    """The pid of the server listening on ``port`` (for CPU accounting)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # redis-server rewrites its title to "redis-server 127.0.0.1:PORT".
            if cmd and name.encode() in cmd[0] and (str(port).encode() in cmd or f":{port}".encode() in cmd[0]):
                return int(entry.name)
    raise AssertionError(f"no {name} on port {port}")


CPU: dict[str, list[float]] = {}


def run_workers(database_url: str, redis_url: str, stream: str, workers: int, tmp: Path) -> float:
    with fresh_database(database_url, "bench_ledger") as url:
        return _run_workers_on(url, redis_url, stream, workers, tmp)


def _run_workers_on(url: str, redis_url: str, stream: str, workers: int, tmp: Path) -> float:
    r = redis.Redis.from_url(redis_url)
    group = f"bench-{uuid.uuid4().hex[:8]}"
    r.xgroup_create(stream, group, id="$")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "OPENLEDGER_USAGE_STREAM": stream,
        "OPENLEDGER_USAGE_CONSUMER_GROUP": group,
        "OPENLEDGER_LEDGER_BATCH_SIZE": str(BATCH),
        "OPENLEDGER_LEDGER_METRICS_PORT": "0",
        "OPENLEDGER_LEDGER_VERIFY_INTERVAL_S": "0",
        "OPENLEDGER_LEDGER_CLAIM_IDLE_MS": "60000",
        "OPENLEDGER_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "openledger.cli", "ledger-worker", "--no-upgrade"]
    procs = [
        spawn(f"bench-worker-{i}", argv, tmp / f"worker-{group}-{i}.log", detached=False, env=env)
        for i in range(workers)
    ]
    try:
        deadline = time.monotonic() + 60
        # Ready = blocked in XREADGROUP (Redis 7.0 registers a consumer only once it reads something).
        while sum(c.get("cmd") == "xreadgroup" for c in r.client_list()) < workers:
            assert time.monotonic() < deadline, "workers did not start:\n" + tail(procs[0].log_path)
            time.sleep(0.05)
        time.sleep(0.3)
        pg_pid = _server_pid(int(url.rsplit(":", 1)[1].split("/")[0]), "postgres")
        redis_pid = _server_pid(int(redis_url.rsplit(":", 1)[1].split("/")[0]), "redis-server")
        cpu0 = (sum(_cpu_s(p.pid) for p in procs), _tree_cpu_s(pg_pid), _cpu_s(redis_pid))
        started = time.monotonic()
        r.execute_command("XGROUP", "SETID", stream, group, "0")
        # Done when every entry was delivered and acknowledged (XACK comes only after COMMIT).
        # Polled on Redis: a count(*) on the growing table would eat the database's CPU.
        while not _group_drained(r, stream, group):
            for p in procs:
                assert p.alive(), tail(p.log_path)
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        cpu1 = (sum(_cpu_s(p.pid) for p in procs), _tree_cpu_s(pg_pid), _cpu_s(redis_pid))
        for name, a, b in zip(("workers", "postgres", "redis"), cpu0, cpu1, strict=True):
            CPU.setdefault(f"workers_{workers}_{name}_cpu_us_per_event", []).append((b - a) / N_EVENTS * 1e6)
        assert count(url) == N_EVENTS
        return N_EVENTS / elapsed
    finally:
        for p in procs:
            p.stop()
        r.xgroup_destroy(stream, group)
        r.close()


def raw_copy_rate(database_url: str, events: list[dict[str, str]]) -> tuple[float, float]:
    """(rows/s of COPY alone, events/s of parse+assemble alone) for the worker's exact rows."""
    parser = Parser()
    chunks = []
    t0 = time.perf_counter()
    for start in range(0, len(events), BATCH):
        records = []
        for i, fields in enumerate(events[start : start + BATCH]):
            records.append(parser.parse(b"%d-0" % (start + i), entry_kv(fields)))
        chunks.append(assemble(records).copy_data(1 + start // BATCH * 1024))
    parse_rate = len(events) / (time.perf_counter() - t0)  # includes the bytes encoding above
    with fresh_database(database_url, "bench_copy") as url, psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        for data in chunks:
            with conn.cursor().copy(f"COPY usage_events ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
                copy.write(data)
            conn.commit()
        return len(events) / (time.perf_counter() - t0), parse_rate


def _median_ratio(rates: list[float], baselines: list[float]) -> float:
    return round(statistics.median(r / b for r, b in zip(rates, baselines, strict=True)), 3)


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_ledger_ingest_throughput(database_url: str, redis_url: str, tmp_path: Path) -> None:
    load_before = os.getloadavg()[0]
    events = make_events(N_EVENTS)
    stream = f"bench:ledger:{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    for start in range(0, N_EVENTS, 5000):
        pipe = r.pipeline(transaction=False)
        for fields in events[start : start + 5000]:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()
    try:
        rows: dict[str, list[float]] = {"raw_copy": [], "workers_1": [], "workers_2": []}
        for _ in range(RUNS):
            rows["raw_copy"].append(raw_copy_rate(database_url, events)[0])
            rows["workers_1"].append(run_workers(database_url, redis_url, stream, 1, tmp_path))
            rows["workers_2"].append(run_workers(database_url, redis_url, stream, 2, tmp_path))
    finally:
        r.delete(stream)
        r.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "benchmark": "ledger ingest: usage stream -> committed postings (exactly once)",
        "events": N_EVENTS,
        "postings_per_event": 4,
        "batch_size": BATCH,
        "runs": RUNS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "baseline": {
            "name": "raw COPY of the same usage_events rows, same table and PostgreSQL",
            "rows_per_s": round(med["raw_copy"]),
        },
        "results": [
            {
                "workers": 1,
                "events_per_s": round(med["workers_1"]),
                "x_raw_copy": round(med["workers_1"] / med["raw_copy"], 3),
                # Each run's rate over the raw COPY measured just before it: robust to the machine's drift.
                "x_raw_copy_median_of_runs": _median_ratio(rows["workers_1"], rows["raw_copy"]),
            },
            {
                "workers": 2,
                "events_per_s": round(med["workers_2"]),
                "x_raw_copy": round(med["workers_2"] / med["raw_copy"], 3),
                # Each run's rate over the raw COPY measured just before it: robust to the machine's drift.
                "x_raw_copy_median_of_runs": _median_ratio(rows["workers_2"], rows["raw_copy"]),
            },
        ],
        "all_runs": {k: [round(x) for x in v] for k, v in rows.items()},
        "cpu_us_per_event_median": {k: round(statistics.median(v), 2) for k, v in CPU.items()},
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "targets": {"events_per_s": 50_000, "x_raw_copy": 0.5},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
