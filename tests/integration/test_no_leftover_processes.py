"""No process of the platform outlives its owner: not the test session, not `make down`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from openledger.local.platform import LocalPlatform
from openledger.local.processes import pid_alive
from tests.waiting import wait_for


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_stop_leaves_no_process_behind() -> None:
    base = Path(tempfile.mkdtemp(prefix="openledger-leak-"))
    platform = LocalPlatform(base, detached=False, durable=False, components=["etcd", "postgres", "redis"])
    platform.start()
    pids = list(platform.pids().values())
    assert pids and all(pid_alive(pid) for pid in pids)
    assert processes_mentioning(str(base))
    platform.stop()
    assert not any(pid_alive(pid) for pid in pids)
    wait_for(lambda: not processes_mentioning(str(base)), what="no process left")


def test_a_killed_owner_takes_its_components_with_it() -> None:
    """kill -9 of the process that started the platform (pytest, say) leaves nothing running."""
    base = Path(tempfile.mkdtemp(prefix="openledger-orphan-"))
    script = (
        "import sys, time; from pathlib import Path\n"
        "from openledger.local.platform import LocalPlatform\n"
        f"p = LocalPlatform(Path({str(base)!r}), detached=False, durable=False,"
        " components=['etcd', 'redis', 'postgres'])\n"
        "p.start(); print('up', flush=True); time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "up"
        assert len(processes_mentioning(str(base))) >= 3
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        wait_for(lambda: not processes_mentioning(str(base)), what="no process left")
    finally:
        owner.kill()
