"""Keys, authorization, protocols and error shapes through a real gateway to real kserve servers."""

from __future__ import annotations

import redis

from openledger.gateway.records import AgentKeys, apikey_key, hash_api_key
from tests.integration.gateway.conftest import (
    IRIS_ROW,
    GatewayProcess,
    ModelServers,
    post,
    provision_agent,
    route_model,
    usage_events,
)


def test_v1_v2_and_openai_requests_are_served_and_metered(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url, "v1")
    status, headers, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)
    assert (status, body) == (200, {"predictions": [0]})
    event_id = headers["x-openledger-event-id"]

    route_model(rds, namespace, "iris", model_servers.iris_url, "v2")
    v2 = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [*IRIS_ROW, 6.7, 3.0, 5.2, 2.3]}]}
    # The route cache lives 1 s; wait it out so the gateway sees the V2 route.
    import time

    time.sleep(1.1)
    status, _, body = post(f"{shared_gateway.url}/v2/models/iris/infer", v2, key)
    assert status == 200 and body["outputs"][0]["data"] == [0, 2]

    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    chat = {"model": "llm", "messages": [{"role": "user", "content": "the ledger"}], "max_tokens": 8}
    status, _, body = post(f"{shared_gateway.url}/v1/chat/completions", chat, key)
    assert status == 200 and body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 8

    events = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert [e["outcome"] for e in events] == ["ok", "ok", "ok"]
    assert events[0]["id"] == event_id and events[0]["model"] == f"{namespace}/iris"
    assert events[1]["input_tokens"] == "2" and events[1]["output_tokens"] == "2"
    assert events[2]["output_tokens"] == str(body["usage"]["completion_tokens"])


def test_missing_key_is_401_in_each_protocols_shape(shared_gateway: GatewayProcess) -> None:
    status, _, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]})
    assert status == 401 and isinstance(body["error"], str) and "API key" in body["error"]
    status, _, body = post(f"{shared_gateway.url}/v2/models/iris/infer", {"inputs": []})
    assert status == 401 and isinstance(body["error"], str)
    status, _, body = post(f"{shared_gateway.url}/v1/chat/completions", {"model": "llm", "messages": []})
    assert status == 401
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "missing_api_key"


def test_bad_key_is_401_and_emits_no_event(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    status, _, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, "olk_wrong")
    assert status == 401 and body == {"error": "invalid or revoked API key"}
    assert usage_events(rds, shared_gateway.stream, f"{namespace}/agent") == []


def test_revoked_key_is_refused_on_the_next_request(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    assert post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)[0] == 200
    rds.delete(apikey_key(hash_api_key(key)))  # what the Agent finalizer and key rotation do
    status, _, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, key)
    assert status == 401 and "revoked" in body["error"]
    assert len(usage_events(rds, shared_gateway.stream, f"{namespace}/agent")) == 1


def test_model_the_agent_may_not_call_is_403(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, models=("iris",))
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
    status, _, body = post(f"{shared_gateway.url}/v1/chat/completions", chat, key)
    assert status == 403 and body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    # A Model of the same name in another namespace is not the Agent's either.
    other = provision_agent(rds, namespace + "x", models=("other",))
    route_model(rds, namespace, "iris", model_servers.iris_url)
    assert post(f"{shared_gateway.url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, other)[0] == 403


def test_bad_bodies_and_protocol_mismatch_name_the_field(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace)
    route_model(rds, namespace, "iris", model_servers.iris_url)
    status, _, body = post(f"{shared_gateway.url}/v1/models/iris:predict", {"rows": []}, key)
    assert status == 400 and body["error"].startswith("instances:")
    status, _, body = post(
        f"{shared_gateway.url}/v1/chat/completions", {"model": "iris", "messages": [{"content": "x"}]}, key
    )
    assert status == 400 and body["error"]["code"] == "protocol_mismatch"
    status, _, body = post(f"{shared_gateway.url}/v1/models/nope:predict", {"instances": [IRIS_ROW]}, key)
    assert status == 403
    assert usage_events(rds, shared_gateway.stream, f"{namespace}/agent") == []
    assert rds.zcard(AgentKeys(f"{namespace}/agent").inflight) == 0
