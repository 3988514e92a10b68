"""A node whose owner was killed (kill -9 of a test session) is cleaned up by the next start.

Its containerd-shims, containers, mounts, cgroups, bridge and iptables chains outlive the
killed process; the next node on the machine must remove them before it starts. Runs after
test_node.py (the package's own node is stopped by then: one node per machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from openledger.local import node
from openledger.local.platform import LocalPlatform
from tests.integration.test_no_leftover_processes import processes_mentioning
from tests.waiting import wait_for

OWNER = """
import json, sys, time
from pathlib import Path
from openledger.local import images
from openledger.local.platform import LocalPlatform
platform = LocalPlatform(Path(sys.argv[1]), detached=False, durable=False, cluster=True)
platform.start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan", "namespace": "default"},
       "spec": {"containers": [{"name": "main", "image": images.BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                "command": ["sleep", "3600"]}]}}
platform.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
while "Running" not in platform.kubectl("get", "pod", "orphan", check=False).stdout:
    time.sleep(0.5)
print("RUNNING", flush=True)
time.sleep(3600)
"""


def test_the_next_start_removes_what_a_killed_owner_left() -> None:
    killed = Path(tempfile.mkdtemp(prefix="openledger-killed-"))
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(killed)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "RUNNING"
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    left = wait_for(lambda: node.leftovers(killed), 10, "the killed node's leftovers")
    assert any(item.startswith("process ") for item in left)  # its containerd-shims live on
    assert any(item.startswith("mount ") for item in left)

    base = Path(tempfile.mkdtemp(prefix="openledger-next-"))
    platform = LocalPlatform(base, detached=False, durable=False, cluster=True, components=["etcd", "kube-apiserver"])
    try:
        platform.start()
        # The bridge, chains, cgroups and CNI results have machine-wide names (the new node has its own);
        # what belonged to the killed node alone is gone already.
        assert [i for i in node.leftovers(killed) if i.startswith(("mount ", "process "))] == []
        assert processes_mentioning(str(killed)) == []
    finally:
        platform.stop()
    assert node.leftovers(base) == []
    assert node.leftovers(killed) == []
