"""The OpenAI surface agents use (issue 13): model lookup, embeddings, request ids,
rate-limit headers and quota errors as the stock ``openai`` client expects them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import openai
import pytest
import redis

from openledger.settings import Settings
from openledger.wire import Price
from tests.integration.gateway.conftest import GatewayProcess, post, provision_agent, route_model, usage_events
from tests.integration.gateway.sse_upstream import SseUpstream

PRICE = Price(per_request=10**12, per_input_token=10**13, per_output_token=10**15)


@pytest.fixture
def upstream() -> Iterator[SseUpstream]:
    server = SseUpstream()
    yield server
    server.close()


def _client(gw: GatewayProcess, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=retries, timeout=10)


def test_models_can_be_looked_up_by_id(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = provision_agent(rds, namespace, models=("llm", "iris"))
    client = _client(shared_gateway, key)
    model = client.models.retrieve("llm")
    assert (model.id, model.object, model.owned_by) == ("llm", "model", namespace)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("not-mine")
    assert missing.value.code == "model_not_found"


def test_embeddings_are_metered_per_input_token(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    result = _client(shared_gateway, key).embeddings.create(
        model="llm", input=["one two three", "four five"], encoding_format="float"
    )
    assert [len(d.embedding) for d in result.data] == [3, 3] and result.usage.prompt_tokens == 5
    assert upstream.paths == ["/openai/v1/embeddings"]
    [event] = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert (event["outcome"], int(event["input_tokens"]), int(event["output_tokens"])) == ("ok", 5, 0)
    assert int(event["cost"]) == PRICE.cost(5, 0)

    status, _, body = post(f"{shared_gateway.url}/v1/embeddings", {"model": "llm", "input": 7}, key)
    assert status == 400 and body["error"]["param"] == "input"


def test_request_ids_and_rate_limit_headers_as_openai_sends_them(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = provision_agent(rds, namespace, models=("llm",), rps=2, burst=5, tpm=6000)
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    body = {"model": "llm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    url = f"{shared_gateway.url}/v1/chat/completions"
    status, headers, _ = post(url, body, key, headers={"x-request-id": "agent-run-7"})
    assert status == 200 and headers["x-request-id"] == "agent-run-7"
    assert headers["x-ratelimit-limit-requests"] == "5" and headers["x-ratelimit-remaining-requests"] == "4"
    assert headers["x-ratelimit-limit-tokens"] == "6000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 6000
    assert re.fullmatch(r"\d+ms|\d+(\.\d+)?s", headers["x-ratelimit-reset-requests"])
    status, headers, _ = post(url, body, key)
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])  # minted when the client sent none
    status, headers, _ = post(url, body, "olk_wrong")
    assert status == 401 and headers["x-request-id"].startswith("req_")  # errors carry one too


def test_exhausted_budget_is_insufficient_quota_and_the_client_does_not_retry(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    key = provision_agent(rds, namespace, models=("llm",), budget="0.000001")
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    client = _client(shared_gateway, key, retries=2)
    before = shared_gateway.metric("openledger_gateway_limiter_rejections_total", agent=f"{namespace}/agent")
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
    assert refused.value.status_code == 429 and refused.value.response.headers["x-should-retry"] == "false"
    after = shared_gateway.metric("openledger_gateway_limiter_rejections_total", agent=f"{namespace}/agent")
    assert after - before == 1  # one request: the client obeyed x-should-retry
    assert upstream.bodies == []


def test_tool_schemas_and_images_are_reserved_for(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    # A budget that covers the words of the prompt but not its tool schema.
    tool = {"type": "function", "function": {"name": "lookup", "description": "x" * 2000, "parameters": {}}}
    plain = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    price = Price(per_input_token=10**15)
    key = provision_agent(rds, namespace, models=("llm",), budget="1")
    route_model(rds, namespace, "llm", upstream.url, "openai", price=price)
    url = f"{shared_gateway.url}/v1/chat/completions"
    assert post(url, plain, key)[0] == 200
    status, _, body = post(url, {**plain, "tools": [tool]}, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota", json.dumps(body)[:200]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    status, _, body = post(url, {**plain, "messages": [{"role": "user", "content": [image]}]}, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


def test_a_request_without_max_tokens_reaches_the_model_bounded_by_its_reservation(
    shared_gateway: GatewayProcess, rds: redis.Redis, namespace: str, upstream: SseUpstream
) -> None:
    """The budget reserved for the default output bound; the model is told that bound, so nothing
    it generates goes uncharged. A client's own bound is passed on as sent."""
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", upstream.url, "openai", price=PRICE)
    client = _client(shared_gateway, key)
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    first, second = upstream.bodies[-2:]
    assert first["max_tokens"] == Settings().gateway_default_max_tokens  # the gateway's default, 256
    assert second["max_tokens"] == 3 and "max_completion_tokens" not in second
