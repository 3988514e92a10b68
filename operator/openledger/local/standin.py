"""LOCAL STAND-IN for KServe — never part of the Helm chart or a real cluster.

Locally there is no kubelet and no KServe controller. This process plays their
part just enough for a Model to answer through the gateway:

- ``run_standin``: watches InferenceServices (kubernetes_asyncio) and, for each,
  starts one model server on a free loopback port, then writes the
  InferenceService status through the status subresource as KServe would
  (``url``, ``address``, conditions ``IngressReady``/``PredictorReady``/``Ready``
  with KServe's reasons, ``modelStatus``). Deleting the InferenceService stops it.
- ``serve_model``: one server, kserve's Python ``ModelServer`` stack (its FastAPI
  app, V1 and V2 endpoints) with a small real model trained at start:
  * V1/V2 (any non-LLM format): a scikit-learn logistic regression on iris;
  * ``openai`` Models (format ``huggingface``/``vllm``, or the owning Model says
    ``protocol: openai``): a word-bigram (Markov) text model trained at start on
    a built-in corpus, served on KServe's OpenAI paths ``/openai/v1/completions``
    and ``/openai/v1/chat/completions``. kserve's own OpenAI types import vLLM,
    which is not installed, so these two routes are added to the same
    ModelServer app by this module with OpenAI-shaped responses and ``usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openledger.local.processes import ManagedProcess, free_port, spawn
from openledger.settings import get_settings

log = logging.getLogger(__name__)

ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
LLM_FORMATS = frozenset({"huggingface", "vllm", "llm", "openai"})
STANDIN_LABEL = "LOCAL STAND-IN (not KServe)"

CORPUS = """
the ledger records every request the gateway serves and the model earns its share .
a model answers questions about data and the owner of the model is paid for each answer .
agents call models through the gateway and the gateway meters every token they use .
the budget of an agent is spent one request at a time and the ledger never forgets a token .
contributors of data earn a share of what the model earns and the pool settles it on chain .
the operator watches models and agents and writes what the gateway needs into redis .
"""


# ------------------------------------------------------------------ the models


class BigramModel:
    """A word-bigram Markov chain: real (trained at start), tiny and deterministic per prompt."""

    def __init__(self, corpus: str = CORPUS) -> None:
        words = corpus.split()
        self.table: dict[str, list[str]] = {}
        for a, b in itertools.pairwise(words):
            self.table.setdefault(a, []).append(b)
        self.vocabulary = sorted(self.table)

    def generate(self, prompt: str, max_tokens: int) -> tuple[str, str]:
        """(text, finish_reason): up to ``max_tokens`` words, stopping at the end of a sentence."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        words = prompt.lower().split()
        current = words[-1] if words and words[-1] in self.table else rng.choice(self.vocabulary)
        out: list[str] = []
        for _ in range(max_tokens):
            current = rng.choice(self.table.get(current) or self.vocabulary)
            out.append(current)
            if current == ".":
                return " ".join(out), "stop"
        return " ".join(out), "length"


def _count_tokens(text: str) -> int:
    return len(text.split())


def _build_kserve_model(name: str, kind: str) -> Any:
    import kserve
    import numpy as np
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class IrisModel(kserve.Model):  # type: ignore[misc]
        """Logistic regression on iris, trained at start (V1 and V2)."""

        def load(self) -> bool:
            from sklearn.datasets import load_iris
            from sklearn.linear_model import LogisticRegression

            x, y = load_iris(return_X_y=True)
            self.classifier = LogisticRegression(max_iter=500).fit(x, y)
            self.ready = True
            return True

        async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            if isinstance(payload, InferRequest):
                rows = payload.inputs[0].as_numpy().reshape(-1, 4)
                result = self.classifier.predict(rows).astype(np.int64)
                output = InferOutput(name="output-0", shape=list(result.shape), datatype="INT64", data=result.tolist())
                return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])
            if isinstance(payload, bytes | str):
                payload = json.loads(payload)
            instances = payload.get("instances", payload.get("inputs"))
            return {"predictions": self.classifier.predict(np.asarray(instances, dtype=float)).tolist()}

    class TextModel(kserve.Model):  # type: ignore[misc]
        """The bigram model; V1 predict returns generated text too."""

        def load(self) -> bool:
            self.bigram = BigramModel()
            self.ready = True
            return True

        async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            if isinstance(payload, bytes | str):
                payload = json.loads(payload)
            instances = payload.get("instances", []) if isinstance(payload, dict) else []
            return {"predictions": [self.bigram.generate(str(p), 16)[0] for p in instances]}

    model = TextModel(name) if kind == "openai" else IrisModel(name)
    model.load()
    return model


def _add_openai_routes(app: Any, model: Any) -> None:
    """``/openai/v1/completions`` and ``/openai/v1/chat/completions`` on the ModelServer app."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None, "param": param}}
        return JSONResponse(body, status_code=status)

    def answer(body: dict[str, Any], prompt: str) -> tuple[str, str, int]:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        text, finish = model.bigram.generate(prompt, int(max_tokens))
        return text, finish, _count_tokens(text)

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("model") != model.name:
            return error(404, f"model {body.get('model')!r} not found", "model")
        prompt = body.get("prompt")
        prompt_text = " ".join(prompt) if isinstance(prompt, list) else str(prompt or "")
        text, finish, used = answer(body, prompt_text)
        return JSONResponse(
            {
                "id": "cmpl-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:24],
                "object": "text_completion",
                "created": int(time.time()),
                "model": model.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": {
                    "prompt_tokens": _count_tokens(prompt_text),
                    "completion_tokens": used,
                    "total_tokens": _count_tokens(prompt_text) + used,
                },
            }
        )

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("model") != model.name:
            return error(404, f"model {body.get('model')!r} not found", "model")
        messages = body.get("messages") or []
        prompt_text = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        text, finish, used = answer(body, prompt_text)
        return JSONResponse(
            {
                "id": "chatcmpl-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:24],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": _count_tokens(prompt_text),
                    "completion_tokens": used,
                    "total_tokens": _count_tokens(prompt_text) + used,
                },
            }
        )

    # This module uses postponed annotations; FastAPI needs the real class to inject the request.
    completions.__annotations__["request"] = Request
    chat.__annotations__["request"] = Request
    app.add_api_route("/openai/v1/completions", completions, methods=["POST"])
    app.add_api_route("/openai/v1/chat/completions", chat, methods=["POST"])


def serve_model(name: str, kind: str, port: int, host: str = "127.0.0.1") -> None:
    """Run kserve's ModelServer with one model on ``host:port`` (blocks)."""
    # kserve parses sys.argv at import; give it nothing of ours.
    sys.argv = sys.argv[:1]
    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
    from kserve.protocol.rest.server import RESTServer

    model = _build_kserve_model(name, kind)
    if kind == "openai":
        _add_openai_routes(app, model)
    server = ModelServer(http_port=port, enable_grpc=False, workers=1)
    server.register_model(model)
    # ModelServer.start() binds 0.0.0.0; the local platform stays on loopback, so
    # run the same RESTServer it would, with the host set.
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port, grace_period=5
    )
    rest.config.host = host
    asyncio.run(rest.start())


# ---------------------------------------------------------------- the watcher


@dataclass
class _Served:
    process: ManagedProcess
    port: int
    kind: str
    generation: int
    ready: bool = False
    failed: str = ""
    written: str = ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def isvc_status(url: str, generation: int, ready: bool, failure: str = "") -> dict[str, Any]:
    """The status KServe writes for a RawDeployment InferenceService (pure)."""
    now = _now()
    if ready:
        conds = [
            {"type": "IngressReady", "status": "True", "lastTransitionTime": now},
            {"type": "PredictorReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ]
        model_status = {
            "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
            "transitionStatus": "UpToDate",
            "copies": {"totalCopies": 1, "failedCopies": 0},
        }
        return {
            "url": url,
            "address": {"url": url},
            "components": {"predictor": {"url": url}},
            "conditions": conds,
            "modelStatus": model_status,
            "observedGeneration": generation,
        }
    reason = "ModelLoadFailed" if failure else "PredictorNotReady"
    message = failure or f"{STANDIN_LABEL}: model server starting"
    return {
        "conditions": [
            {
                "type": "PredictorReady",
                "status": "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            },
            {"type": "Ready", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now},
        ],
        "modelStatus": {
            "states": {"activeModelState": "FailedToLoad" if failure else "Pending", "targetModelState": "Loaded"},
            "transitionStatus": "BlockedByFailedLoad" if failure else "InProgress",
            **({"lastFailureInfo": {"reason": "ModelLoadFailed", "message": failure}} if failure else {}),
        },
        "observedGeneration": generation,
    }


def model_kind(isvc: dict[str, Any], model_protocol: str | None) -> str:
    """``openai`` or ``v1``/``v2``: what to serve for this InferenceService (pure)."""
    if model_protocol in ("openai", "v1", "v2"):
        return model_protocol
    model = ((isvc.get("spec") or {}).get("predictor") or {}).get("model") or {}
    if str((model.get("modelFormat") or {}).get("name", "")).lower() in LLM_FORMATS:
        return "openai"
    return "v2" if model.get("protocolVersion") == "v2" else "v1"


def serve_argv(name: str, kind: str, port: int) -> list[str]:
    """The command line of one model server (``openledger standin serve``) on ``port``."""
    serve = ["standin", "serve", "--name", name, "--kind", kind, "--port", str(port)]
    return [sys.executable, "-m", "openledger.cli", *serve]


class StandIn:
    def __init__(self, log_dir: Path, namespaces: list[str]) -> None:
        self.log_dir = log_dir
        self.namespaces = namespaces
        self.served: dict[tuple[str, str], _Served] = {}

    async def run(self) -> None:
        from kubernetes_asyncio import client

        from openledger.controllers.kube import new_api_client

        api = await new_api_client()
        self.objects = client.CustomObjectsApi(api)
        self.api = api
        log.info("stand-in started", extra={"action": "start", "label": STANDIN_LABEL})
        try:
            while True:
                try:
                    await self._pass()
                except Exception as exc:  # noqa: BLE001 - keep serving; the next pass retries
                    log.warning("stand-in pass failed", extra={"action": "pass", "error": str(exc)[:300]})
                await asyncio.sleep(0.5)
        finally:
            for served in self.served.values():
                served.process.stop(5)
            await api.close()

    async def _list(self) -> list[dict[str, Any]]:
        group, version, plural = ISVC
        if not self.namespaces:
            result = await self.objects.list_cluster_custom_object(group, version, plural, _request_timeout=10)
            return list(result.get("items", []))
        items: list[dict[str, Any]] = []
        for ns in self.namespaces:
            result = await self.objects.list_namespaced_custom_object(group, version, ns, plural, _request_timeout=10)
            items += result.get("items", [])
        return items

    async def _model_protocol(self, isvc: dict[str, Any]) -> str | None:
        for owner in isvc["metadata"].get("ownerReferences") or []:
            if owner.get("kind") == "Model":
                with contextlib.suppress(Exception):
                    model = await self.objects.get_namespaced_custom_object(
                        "openledger.io", "v1alpha1", isvc["metadata"]["namespace"], "models", owner["name"]
                    )
                    return str((model.get("spec") or {}).get("protocol", "v1"))
        return None

    async def _pass(self) -> None:
        seen: set[tuple[str, str]] = set()
        for isvc in await self._list():
            meta = isvc["metadata"]
            key = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp"):
                continue
            seen.add(key)
            generation = int(meta.get("generation") or 1)
            served = self.served.get(key)
            if served is not None and (served.generation != generation or not served.process.alive()):
                if served.process.alive() or served.generation != generation:
                    served.process.stop(5)
                    served = None
                elif not served.failed:
                    served.failed = f"{STANDIN_LABEL}: model server exited; see {served.process.log_path}"
            if served is None:
                kind = model_kind(isvc, await self._model_protocol(isvc))
                served = self._start(meta["namespace"], meta["name"], kind, generation)
                self.served[key] = served
            if not served.ready and not served.failed:
                served.ready = await asyncio.to_thread(_probe, served.port, meta["name"])
            url = f"http://127.0.0.1:{served.port}"
            status = isvc_status(url, generation, served.ready, served.failed)
            fingerprint = json.dumps([served.ready, served.failed, generation, served.port])
            current = isvc.get("status") or {}
            if served.written != fingerprint or (served.ready and current.get("url") != url):
                await self._write_status(meta["namespace"], meta["name"], status)
                served.written = fingerprint
        for key in list(self.served):
            if key not in seen:
                self.served.pop(key).process.stop(5)
                log.info("stopped model server", extra={"action": "stop", "isvc": "/".join(key)})

    def _start(self, namespace: str, name: str, kind: str, generation: int) -> _Served:
        port = free_port()
        argv = serve_argv(name, kind, port)
        process = spawn(
            f"model-{namespace}-{name}", argv, self.log_dir / f"model-{namespace}-{name}.log", detached=False
        )
        log.info(
            "started model server", extra={"action": "start", "isvc": f"{namespace}/{name}", "kind": kind, "port": port}
        )
        return _Served(process, port, kind, generation)

    async def _write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        from openledger.controllers.kube import merge_patch

        group, version, plural = ISVC
        await merge_patch(self.api, group, version, plural, namespace, name, {"status": status}, status=True)


def _probe(port: int, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{name}", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("ready"))
    except (OSError, ValueError):
        return False


def run_standin() -> None:
    import uvloop

    settings = get_settings()
    uvloop.run(StandIn(settings.local_dir.resolve() / "logs", settings.namespaces).run())


# --------------------------------------------------------------------- CLI

import click  # noqa: E402


@click.group("standin")
def standin_command() -> None:
    """LOCAL STAND-IN for KServe (never in the chart): serve InferenceServices on loopback."""


@standin_command.command("run")
def standin_run() -> None:
    """Watch InferenceServices, serve each with kserve's ModelServer, write their status."""
    run_standin()


@standin_command.command("serve")
@click.option("--name", required=True, help="Model name (the InferenceService name).")
@click.option("--kind", type=click.Choice(["v1", "v2", "openai"]), default="v1")
@click.option("--port", type=int, required=True)
@click.option("--host", default="127.0.0.1")
def standin_serve(name: str, kind: str, port: int, host: str) -> None:
    """Serve one model (iris classifier, or the bigram text model for openai)."""
    serve_model(name, kind, port, host)
