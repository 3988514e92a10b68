"""A real KEDA scales the installed ledger worker on the usage stream's lag, on the node.

KEDA (``openledger.local.keda``) runs on the host beside the platform; the release is upgraded
with the chart's ``ledgerWorker.autoscaling`` values (min 1, max 3, 1 s polling, 10 s cooldown =
scale-down stabilization) and a slow consumer (one entry per transaction), so a burst of usage
events keeps the lag high long enough for the HPA (kube-controller-manager, 15 s sync) to act.
While the lag is high the worker Deployment goes above one replica; once drained it comes back
to one; every event produced is in the ledger exactly once while replicas came and went.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from openledger.local import keda, node
from openledger.local.cluster import PRODUCT_NAMESPACE, RELEASE
from openledger.local.platform import LocalPlatform
from openledger.local.product_cluster import CHART, helm, wait_release_ready
from openledger.wire import USAGE_CONSUMER_GROUP, USAGE_STREAM
from tests.integration.ledger.conftest import make_event
from tests.waiting import wait_for

# Run alone, this module's first test also starts the node and installs the product.
pytestmark = pytest.mark.timeout(1500)

WORKER = f"{RELEASE}-ledger-worker"
LAG_COUNT = 100
COOLDOWN_S = 10


def autoscaling_values(platform: LocalPlatform) -> list[str]:
    # KEDA runs on the host: it reaches Redis on the bridge's host address, not the in-cluster name.
    address = f"{node.HOST_IP}:{platform.ports['redis']}"
    sets = {
        "ledgerWorker.autoscaling.enabled": "true",
        "ledgerWorker.autoscaling.minReplicas": "1",
        "ledgerWorker.autoscaling.maxReplicas": "3",
        "ledgerWorker.autoscaling.lagCount": str(LAG_COUNT),
        "ledgerWorker.autoscaling.pollingInterval": "1",
        "ledgerWorker.autoscaling.cooldownPeriod": str(COOLDOWN_S),
        "ledgerWorker.autoscaling.redis.address": address,
        "ledgerWorker.batchSize": "1",  # a slow consumer: the lag must outlive the HPA's reaction
        "ledgerWorker.resources.requests.cpu": "50m",  # three workers fit on the two-CPU node
        "ledgerWorker.resources.requests.memory": "128Mi",
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def autoscaled(product: LocalPlatform) -> Iterator[LocalPlatform]:
    keda.start_keda(product)
    values = node.node_dir(product.base_dir) / "values.json"
    release = ["upgrade", RELEASE, str(CHART), "-n", PRODUCT_NAMESPACE, "--values", str(values), "--timeout", "5m"]
    try:
        started = time.time() - 1
        helm(product, *release, *autoscaling_values(product))
        wait_release_ready(product, 300, started)
        yield product
    finally:
        # Back to the release as installed; KEDA stays until its ScaledObject (finalizer) is gone.
        started = time.time() - 1
        helm(product, *release, "--reset-values")
        wait_for(lambda: not scaled_objects(product), 60, "the ScaledObject to be deleted", 0.5)
        keda.stop_keda(product)
        wait_release_ready(product, 300, started)


def scaled_objects(platform: LocalPlatform) -> list[Any]:
    result = platform.kubectl("get", "scaledobjects", "-n", PRODUCT_NAMESPACE, "-o", "json", check=False)
    return list(json.loads(result.stdout)["items"]) if result.returncode == 0 else []


def replicas(platform: LocalPlatform) -> tuple[int, int]:
    """(spec.replicas, status.readyReplicas) of the worker Deployment."""
    deployment = json.loads(platform.kubectl("get", "deployment", WORKER, "-n", PRODUCT_NAMESPACE, "-o", "json").stdout)
    return int(deployment["spec"].get("replicas", 1)), int(deployment.get("status", {}).get("readyReplicas", 0))


def group_lag(client: redis.Redis) -> int:
    groups: list[dict[str, Any]] = client.xinfo_groups(USAGE_STREAM)
    [group] = [g for g in groups if g["name"] in (USAGE_CONSUMER_GROUP, USAGE_CONSUMER_GROUP.encode())]
    if group["lag"] is None:  # Redis cannot tell (entries deleted past the group's position): not drained
        return -1
    return int(group["lag"])


def drained(client: redis.Redis) -> bool:
    """Every entry delivered to the group and acknowledged."""
    pending: dict[str, Any] = client.xpending(USAGE_STREAM, USAGE_CONSUMER_GROUP)
    return group_lag(client) == 0 and int(pending["pending"]) == 0


class Producer(threading.Thread):
    """XADDs well-formed usage events so the group's lag stays near ``target`` whatever the workers'
    speed, until told to stop; remembers every event id."""

    def __init__(self, redis_url: str, target: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.target, self.interval_s = target, interval_s
        self.ids: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            missing = self.target - max(group_lag(self.client), 0)
            pipe = self.client.pipeline(transaction=False)
            for _ in range(max(missing, 0)):
                event = make_event(len(self.ids))
                pipe.xadd(USAGE_STREAM, event.to_entry())  # type: ignore[arg-type]
                self.ids.append(event.event_id)
            pipe.execute()
            self.done.wait(self.interval_s)


def ledger_counts(database_url: str, ids: list[str]) -> tuple[int, int]:
    """(rows, distinct event ids) in the ledger among ``ids``."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM usage_events WHERE event_id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_keda_scales_the_worker_up_on_lag_and_down_when_drained_without_losing_or_doubling_events(
    autoscaled: LocalPlatform,
) -> None:
    platform = autoscaled
    assert replicas(platform)[0] == 1
    client = redis.Redis.from_url(platform.endpoints.redis_url)
    producer = Producer(platform.endpoints.redis_url, target=20 * LAG_COUNT)
    started = time.monotonic()
    producer.start()
    try:
        # Above one replica, and the new workers Ready, while the lag is held high.
        scaled = wait_for(lambda: replicas(platform)[0] > 1 and replicas(platform), 180, "the worker above 1", 1)
        up_after_s = time.monotonic() - started
        ready = wait_for(lambda: replicas(platform)[1] > 1 and replicas(platform), 180, "a second Ready worker", 1)
        ready_after_s = time.monotonic() - started
    finally:
        producer.done.set()
        producer.join(30)
    produced = list(producer.ids)
    print(f"scaled up after {up_after_s:.0f} s ({scaled}), (spec, ready) {ready} after {ready_after_s:.0f} s")
    wait_for(lambda: drained(client), 600, "the workers to drain the stream", 1)
    drained_s = time.monotonic() - started
    wait_for(lambda: replicas(platform) == (1, 1), 240, "the worker Deployment back to 1 replica", 1)
    print(
        f"{len(produced)} events; drained after {drained_s:.0f} s; back to 1 after {time.monotonic() - started:.0f} s"
    )
    assert ledger_counts(platform.endpoints.database_url, produced) == (len(produced), len(produced))
