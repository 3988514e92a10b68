"""Streaming through the gateway from the local serving stand-in (its real LLM, issue 13)."""

from __future__ import annotations

import json
from typing import Any

import openai
import redis

from tests.integration.gateway.conftest import GatewayProcess, ModelServers, provision_agent, route_model, usage_events


def test_the_stand_ins_stream_is_relayed_and_metered_by_its_own_usage(
    shared_gateway: GatewayProcess, model_servers: ModelServers, rds: redis.Redis, namespace: str
) -> None:
    key = provision_agent(rds, namespace, models=("llm",))
    route_model(rds, namespace, "llm", model_servers.llm_url, "openai")
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    messages: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
    chunks = list(
        client.chat.completions.create(
            model="llm",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and 0 < usage.completion_tokens <= 12
    [event] = usage_events(rds, shared_gateway.stream, f"{namespace}/agent")
    assert (int(event["input_tokens"]), int(event["output_tokens"])) == (usage.prompt_tokens, usage.completion_tokens)
    assert json.loads(event["extra"]) == {"stream": "completed", "usage": "reported"}
