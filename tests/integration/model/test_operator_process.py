"""The operator as a real process: health, metrics, kill -9 mid-reconcile, two replicas,
watched namespaces."""

from __future__ import annotations

import secrets
import time

import redis

from openledger.wire import model_route_key

from .conftest import Kube, OperatorFactory, model_manifest, wait_for


def test_liveness_readiness_and_metrics(kube: Kube, namespace: str, start_operator: OperatorFactory) -> None:
    op = start_operator()
    assert op.get("/healthz")[0] == 200
    assert op.readyz() == {"ready": True, "leader": True, "controllers": True}
    kube.create_model(model_manifest("metered", namespace))
    wait_for(lambda: kube.phase(namespace, "metered") == "Deploying")
    names = (
        'openledger_operator_reconciles_total{kind="Model",result="ok"}',
        'openledger_operator_reconcile_duration_seconds_bucket{kind="Model"',
        'openledger_operator_managed_objects{kind="Model"}',
        "openledger_operator_leader 1.0",
    )
    # A reconcile is counted when it returns, just after its last write.
    wait_for(lambda: all(name in op.metrics() for name in names), what="the operator metrics")


def test_kill_9_in_the_middle_of_a_reconcile_leaves_no_duplicates_or_orphans(
    kube: Kube, namespace: str, start_operator: OperatorFactory, redis_url: str
) -> None:
    # The first operator stops right after creating the InferenceService, before it
    # writes the Model's status or the route: the worst moment to die.
    first = start_operator(namespaces=[namespace], operator_test_pause_after_create_s=120)
    kube.create_model(model_manifest("crashy", namespace))
    wait_for(lambda: kube.isvc(namespace, "crashy"), what="the first InferenceService")
    first.kill9()
    isvc_uid = kube.isvc(namespace, "crashy")["metadata"]["uid"]  # type: ignore[index]
    assert kube.phase(namespace, "crashy") is None  # the status was never written

    start_operator(namespaces=[namespace])  # the lease of the dead one expires (4 s), then it acts
    wait_for(lambda: kube.phase(namespace, "crashy") == "Deploying", 30, "the restarted operator to converge")
    isvcs = kube.isvcs(namespace)
    assert [i["metadata"]["uid"] for i in isvcs] == [isvc_uid], "adopted, not duplicated"
    kube.kserve_ready(namespace, "crashy")
    wait_for(lambda: kube.phase(namespace, "crashy") == "Ready")
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.get(model_route_key(namespace, "crashy")))

    kube.delete_model(namespace, "crashy")
    wait_for(lambda: kube.model(namespace, "crashy") is None)
    assert kube.isvcs(namespace) == [], "no orphan InferenceService"
    assert client.get(model_route_key(namespace, "crashy")) is None


def test_a_model_deleted_while_the_operator_is_down_is_cleaned_up_on_restart(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator(namespaces=[namespace])
    kube.create_model(model_manifest("orphan", namespace))
    wait_for(lambda: kube.phase(namespace, "orphan") == "Deploying")
    op.kill9()
    kube.delete_model(namespace, "orphan")
    time.sleep(0.5)
    model = kube.model(namespace, "orphan")
    assert model is not None and model["metadata"].get("deletionTimestamp"), "the finalizer holds the Model"
    start_operator(namespaces=[namespace])
    wait_for(lambda: kube.model(namespace, "orphan") is None, 30, "the Model to be finalized")
    assert kube.isvc(namespace, "orphan") is None


def test_two_replicas_only_one_acts_and_the_standby_takes_over(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    leader = start_operator(namespaces=[namespace])
    standby = start_operator(namespaces=[namespace], wait_leader=False)
    assert standby.readyz() == {"ready": True, "leader": False, "controllers": False}
    assert "openledger_operator_leader 0.0" in standby.metrics()
    kube.create_model(model_manifest("solo", namespace))
    wait_for(lambda: kube.phase(namespace, "solo") == "Deploying")
    assert 'openledger_operator_managed_objects{kind="Model"}' not in standby.metrics()
    assert 'openledger_operator_managed_objects{kind="Model"} 1.0' in leader.metrics()

    leader.kill9()
    wait_for(lambda: standby.readyz()["controllers"], 30, "the standby to take over")
    kube.kserve_ready(namespace, "solo")
    wait_for(lambda: kube.phase(namespace, "solo") == "Ready", 20, "the new leader to mirror the status")


def test_a_clean_stop_hands_the_lease_over_at_once(kube: Kube, namespace: str, start_operator: OperatorFactory) -> None:
    leader = start_operator(namespaces=[namespace], leader_lease_duration_s=60)
    standby = start_operator(namespaces=[namespace], wait_leader=False, leader_lease_duration_s=60)
    leader.stop()
    started = time.monotonic()
    wait_for(lambda: standby.readyz()["controllers"], 20, "the standby to take over")
    assert time.monotonic() - started < 15, "the released Lease is taken without waiting it out"


def test_only_the_watched_namespaces_are_served(kube: Kube, start_operator: OperatorFactory) -> None:
    watched = f"ol-mdl-{secrets.token_hex(4)}"
    ignored = f"ol-other-{secrets.token_hex(4)}"
    for ns in (watched, ignored):
        kube.core.create_namespace({"metadata": {"name": ns}})
    start_operator(namespaces=[watched])
    kube.create_model(model_manifest("here", watched))
    kube.create_model(model_manifest("there", ignored))
    wait_for(lambda: kube.isvc(watched, "here"))
    time.sleep(1.0)
    assert kube.isvc(ignored, "there") is None
    assert kube.phase(ignored, "there") is None


def test_kill_9_while_many_models_converge_then_everything_is_consistent(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    names = [f"burst-{i:02d}" for i in range(20)]
    first = start_operator(namespaces=[namespace])
    for name in names:
        kube.create_model(model_manifest(name, namespace))
    wait_for(lambda: len(kube.isvcs(namespace)) >= 3, what="some InferenceServices")  # mid-flight
    first.kill9()

    start_operator(namespaces=[namespace])
    wait_for(lambda: len(kube.isvcs(namespace)) == len(names), 60, "one InferenceService per Model")
    for name in names:
        kube.kserve_ready(namespace, name)
    wait_for(lambda: all(kube.phase(namespace, n) == "Ready" for n in names), 60, "every Model Ready")
    isvcs = kube.isvcs(namespace)
    assert sorted(i["metadata"]["name"] for i in isvcs) == names, "exactly one each, no strays"
    for name in names:
        kube.delete_model(namespace, name)
    wait_for(lambda: all(kube.model(namespace, n) is None for n in names), 60, "the Models to go")
    assert kube.isvcs(namespace) == [], "no orphans"
