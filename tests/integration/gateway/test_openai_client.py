"""The official ``openai`` Python client works against the gateway unchanged."""

from __future__ import annotations

import openai
import pytest
import redis

from tests.integration.gateway.conftest import GatewayProcess, ModelServers, provision_agent, route_model, usage_events


def test_openai_client_chat_and_completions_end_to_end(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)

    chat = client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "what does the ledger record"}], max_tokens=12
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 12

    completion = client.completions.create(model="llm", prompt="the gateway", max_tokens=6)
    assert completion.choices[0].text and completion.usage is not None

    models = client.models.list()
    assert [m.id for m in models.data] == ["llm"]

    events = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert [int(e["output_tokens"]) for e in events] == [
        chat.usage.completion_tokens,
        completion.usage.completion_tokens,
    ]


def test_openai_client_sees_its_own_error_types(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    # One request per 20 s: the second is refused however long the model takes to answer the first.
    key = provision_agent(rds, namespace, models=("llm",), rps=0.05, burst=1)
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    bad = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key="olk_nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}])
    assert auth.value.code == "invalid_api_key"

    good = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=10)
    with pytest.raises(openai.PermissionDeniedError):
        good.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    good.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.RateLimitError) as limited:
        good.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert limited.value.code == "rate_limited"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 20
    with pytest.raises(openai.BadRequestError) as stream:
        good.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], stream="yes")  # type: ignore[call-overload]
    assert stream.value.code == "invalid_request" and stream.value.param == "stream"
