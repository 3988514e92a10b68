"""The LOCAL STAND-IN for KServe: it serves InferenceServices and writes their status as KServe would,
and its ``openai`` model server is a real LLM (SmolLM2-135M-Instruct on llama.cpp) behind OpenAI's API.

The LLM tests talk to the session's ``llm`` model server directly (no gateway): answers at
temperature 0, usage counts from the tokenizer, one SSE chunk per token in OpenAI's exact format
(the stock ``openai`` client, sync and async, and raw SSE), embeddings, the one-at-a-time queue,
and cancellation when the client hangs up.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from openledger.local.processes import spawn
from tests.integration.gateway.conftest import IRIS_ROW, ModelServers, post, wait_for

ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
QUESTION = "What is the capital of France? Answer in one sentence."
FRANCE: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
PARIS = "The capital of France is Paris."
# A raw completion that never reaches an end-of-sequence token at temperature 0: it counts on.
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def _isvc(name: str, fmt: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "predictor": {
                "model": {"modelFormat": {"name": fmt}, "storageUri": f"hf://org/{name}", "protocolVersion": "v1"}
            }
        },
    }


def test_standin_serves_inference_services_and_reports_ready(kubeconfig: Path, tmp_path: Path) -> None:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    core, objects = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    ns = f"ol-sti-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": ns}})
    objects.create_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], _isvc("iris", "sklearn"))
    objects.create_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], _isvc("llm", "huggingface"))
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "OPENLEDGER_NAMESPACES": json.dumps([ns]),
        "OPENLEDGER_LOCAL_DIR": str(tmp_path),
    }
    standin = spawn(
        "standin",
        [sys.executable, "-m", "openledger.cli", "standin", "run"],
        tmp_path / "standin.log",
        detached=False,
        env=env,
    )
    try:

        def ready(name: str) -> dict[str, Any] | None:
            isvc = objects.get_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], name)
            conds = {c["type"]: c for c in (isvc.get("status") or {}).get("conditions") or []}
            return isvc if conds.get("Ready", {}).get("status") == "True" else None

        iris = wait_for(lambda: ready("iris"), 90, "iris Ready")
        llm = wait_for(lambda: ready("llm"), 90, "llm Ready")
        status = iris["status"]
        assert status["url"].startswith("http://127.0.0.1:") and status["modelStatus"]["copies"]["totalCopies"] == 1
        assert {c["type"] for c in status["conditions"]} == {"IngressReady", "PredictorReady", "Ready"}
        assert status["observedGeneration"] == iris["metadata"]["generation"]
        code, _, body = post(f"{status['url']}/v1/models/iris:predict", {"instances": [IRIS_ROW]})
        assert (code, body) == (200, {"predictions": [0]})
        # The Model's storageUri (hf://org/llm) is not fetched: every openai Model is served by the local LLM.
        chat = {"model": "llm", "messages": FRANCE, "max_tokens": 20, "temperature": 0}
        code, _, body = post(f"{llm['status']['url']}/openai/v1/chat/completions", chat, timeout_s=60)
        assert code == 200 and body["choices"][0]["message"]["content"] == PARIS, body

        objects.delete_namespaced_custom_object(*ISVC[:2], ns, ISVC[2], "iris")
        url = status["url"]

        def gone() -> bool:
            try:
                post(f"{url}/v1/models/iris:predict", {"instances": [IRIS_ROW]}, timeout_s=1)
            except OSError:
                return True
            return False

        wait_for(gone, 20, "the iris server to stop")
    finally:
        standin.stop(10)


# ------------------------------------------------------------------ the LLM


def _client(model_servers: ModelServers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{model_servers.llm_url}/openai/v1", api_key="unused", max_retries=0, timeout=60)


def test_llm_answers_at_temperature_zero_with_the_tokenizers_counts(model_servers: ModelServers) -> None:
    client = _client(model_servers)
    chat = client.chat.completions.create(model="llm", messages=FRANCE, temperature=0, max_tokens=20)
    assert chat.choices[0].message.content == PARIS and chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None
    # The streamed answer has one chunk per token: its chunk count is the completion's token count.
    stream = client.chat.completions.create(
        model="llm",
        messages=FRANCE,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == PARIS
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage
    assert chat.usage.completion_tokens == len(pieces) and 1 < len(pieces) < len(PARIS)
    # The prompt is counted as the chat template renders it: more tokens than the bare question.
    assert chat.usage.prompt_tokens > len(QUESTION.split())
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    # The same server answers on OpenAI's own paths too.
    same = openai.OpenAI(base_url=f"{model_servers.llm_url}/v1", api_key="unused", max_retries=0, timeout=60)
    again = same.chat.completions.create(model="llm", messages=FRANCE, temperature=0, max_tokens=20)
    assert again.choices[0].message.content == PARIS and again.usage == chat.usage


def test_llm_text_completions_stop_at_max_tokens(model_servers: ModelServers) -> None:
    client = _client(model_servers)
    done = client.completions.create(model="llm", prompt=ENDLESS, max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage is not None
    assert done.usage.completion_tokens == 6 and done.choices[0].text.startswith(" 11,")
    streamed = list(client.completions.create(model="llm", prompt=ENDLESS, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"
    assert all(c.usage is None for c in streamed)  # no usage chunk unless asked for
    stopped = client.completions.create(model="llm", prompt=ENDLESS, max_tokens=20, temperature=0, stop=[" 13"])
    assert stopped.choices[0].text == " 11, 12," and stopped.choices[0].finish_reason == "stop"


def test_llm_streams_to_the_async_client(model_servers: ModelServers) -> None:
    async def run() -> tuple[str, int]:
        client = openai.AsyncOpenAI(
            base_url=f"{model_servers.llm_url}/openai/v1", api_key="unused", max_retries=0, timeout=60
        )
        stream = await client.chat.completions.create(
            model="llm",
            messages=FRANCE,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, used = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                used = chunk.usage.completion_tokens
        await client.close()
        return text, used

    text, used = asyncio.run(run())
    assert text == PARIS and used > 1


def test_llm_raw_sse_is_openais(model_servers: ModelServers) -> None:
    url = urlsplit(model_servers.llm_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    body = {
        "model": "llm",
        "messages": FRANCE,
        "temperature": 0,
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/openai/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
    raw = resp.read().decode()
    conn.close()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], raw[-200:]
    datas = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len({d["id"] for d in datas}) == 1 and datas[0]["id"].startswith("chatcmpl-")
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert datas[-2]["choices"][0]["finish_reason"] == "stop" and datas[-2]["choices"][0]["delta"] == {}
    assert datas[-1]["choices"] == [] and datas[-1]["usage"]["completion_tokens"] == len(datas) - 3
    assert all(d["usage"] is None for d in datas[:-1])
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in datas[:-1]) == PARIS


def test_llm_embeddings(model_servers: ModelServers) -> None:
    client = _client(model_servers)
    texts = ["The capital of France is Paris.", "Bananas are yellow."]
    result = client.embeddings.create(model="llm", input=texts)  # the client asks for base64
    assert [len(d.embedding) for d in result.data] == [576, 576]
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-3 for d in result.data)  # normalized
    as_floats = client.embeddings.create(model="llm", input=texts[0], encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    single = as_floats.usage.prompt_tokens
    assert 0 < single < result.usage.prompt_tokens == result.usage.total_tokens


def test_llm_rejects_bad_requests_naming_the_field(model_servers: ModelServers) -> None:
    url = f"{model_servers.llm_url}/openai/v1/chat/completions"
    for body, status, param in [
        ({"model": "llm", "messages": FRANCE, "max_tokens": 4000}, 400, "max_tokens"),
        ({"model": "llm", "messages": FRANCE, "n": 2}, 400, "n"),
        ({"model": "llm", "messages": []}, 400, "messages"),
        ({"model": "other", "messages": FRANCE}, 404, "model"),
        ({"model": "llm", "messages": FRANCE, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ]:
        code, _, err = post(url, body)
        assert (code, err["error"]["param"]) == (status, param), err


def _served_tokens_per_s(model_servers: ModelServers) -> float:
    client = _client(model_servers)
    started = time.monotonic()
    done = client.completions.create(model="llm", prompt=ENDLESS, max_tokens=40, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 40
    return 40 / (time.monotonic() - started)


def _hang_up_after(model_servers: ModelServers, body: dict[str, Any], stream_chunks: int) -> None:
    """Send ``body`` on a raw socket; read ``stream_chunks`` SSE events (or wait 1 s) and close the socket."""
    url = urlsplit(model_servers.llm_url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname or "", url.port or 80), timeout=60)
    head = "POST /openai/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    if stream_chunks:
        seen = b""
        while seen.count(b"data: ") < stream_chunks:
            seen += sock.recv(4096)
    else:
        time.sleep(1)
    sock.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_llm_hang_up_cancels_the_generation(model_servers: ModelServers, stream: bool) -> None:
    """The one Llama serves requests in turn: a cancelled 1500-token generation must not delay the next one."""
    rate = _served_tokens_per_s(model_servers)
    long = {"model": "llm", "prompt": ENDLESS, "max_tokens": 1500, "temperature": 0, "stream": stream}
    would_take = 1500 / rate
    assert would_take > 2, f"{rate:.0f} tokens/s: too fast for 1500 tokens to tell a cancelled generation apart"
    _hang_up_after(model_servers, long, 3 if stream else 0)
    started = time.monotonic()
    after = _client(model_servers).completions.create(model="llm", prompt="Hello", max_tokens=4, temperature=0)
    waited = time.monotonic() - started
    assert after.usage is not None and after.usage.completion_tokens <= 4
    assert waited < would_take / 3, (
        f"the next request waited {waited:.1f} s; the hung-up one would take {would_take:.0f} s"
    )


def test_llm_serves_concurrent_requests_in_turn(model_servers: ModelServers) -> None:
    answers: list[str] = []

    def ask() -> None:
        chat = _client(model_servers).chat.completions.create(
            model="llm",
            messages=FRANCE,
            temperature=0,
            max_tokens=20,
        )
        answers.append(chat.choices[0].message.content or "")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [PARIS] * 4
