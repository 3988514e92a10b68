"""A product process's /metrics carries the process and runtime collectors and the build's version."""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from openledger.local.processes import free_port, spawn
from tests.databases import fresh_database
from tests.waiting import wait_for


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def test_ledger_worker_exposes_process_gc_and_build_info(database_url: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    with fresh_database(database_url, "metrics") as url:
        name = url.rsplit("/", 1)[1]
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "OPENLEDGER_USAGE_STREAM": f"test:{name}:usage",
            "OPENLEDGER_USAGE_DEAD_LETTER_STREAM": f"test:{name}:dead",
            "OPENLEDGER_LEDGER_METRICS_PORT": str(port),
            "OPENLEDGER_LEDGER_VERIFY_INTERVAL_S": "0",
            "OPENLEDGER_BIND_HOST": "127.0.0.1",
        }
        argv = [sys.executable, "-m", "openledger.cli", "ledger-worker"]
        worker = spawn("metrics-worker", argv, tmp_path / "worker.log", detached=False, env=env)
        try:
            text = wait_for(lambda: _scrape(f"http://127.0.0.1:{port}/metrics"), 60, "the worker's /metrics")
        finally:
            worker.stop()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert 10 * 2**20 < rss < 4 * 2**30, rss
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert any(s.name == "python_gc_collections_total" for s in families["python_gc_collections"].samples)
    assert "python_info" in families
    build = families["openledger_build_info"].samples
    assert [(s.name, s.labels, s.value) for s in build] == [
        ("openledger_build_info", {"version": metadata.version("openledger")}, 1.0)
    ]
    # Each family is exposed once: nothing registered twice on the one registry.
    types = re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
    assert len(types) == len(set(types))
    assert "openledger_ledger_" in text  # the worker's own metrics share the registry
