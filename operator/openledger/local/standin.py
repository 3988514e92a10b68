"""LOCAL STAND-IN for KServe — never part of the Helm chart or a real cluster.

Locally there is no kubelet and no KServe controller. This process plays their
part just enough for a Model to answer through the gateway:

- ``run_standin``: watches InferenceServices (kubernetes_asyncio) and, for each,
  starts one model server on a free loopback port, then writes the
  InferenceService status through the status subresource as KServe would
  (``url``, ``address``, conditions ``IngressReady``/``PredictorReady``/``Ready``
  with KServe's reasons, ``modelStatus``). Deleting the InferenceService stops it.
  It runs on plain ``make up`` only: ``make cluster`` runs real KServe (:mod:`openledger.local.kserve`).
- ``serve_model``: one server, kserve's Python ``ModelServer`` stack (its FastAPI
  app, V1 and V2 endpoints) with a real model, loaded once per process:
  * V1/V2 (any non-LLM format): a scikit-learn logistic regression on iris, trained at start;
  * ``openai`` Models (format ``huggingface``/``vllm``, or the owning Model says
    ``protocol: openai``), whatever their ``storageUri``: SmolLM2-135M-Instruct on
    llama.cpp, on the CPU (``openledger.local.llm``). kserve's own OpenAI layer
    imports vLLM, which is not installed, so OpenAI's routes (completions, chat,
    streaming, embeddings) are added to the same ModelServer app by
    ``openledger.local.openai_api``.
  With ``--model-dir`` (the ``openledger-serving`` image under real KServe) the model comes from
  that folder instead: ``model.joblib``, or the ``.gguf`` for ``openai``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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


def gguf_file(model_dir: Path) -> Path:
    """The GGUF of a model folder (KServe mounts ``pvc://<claim>/<path>`` at /mnt/models), or the file itself."""
    if model_dir.is_file():
        return model_dir
    found = sorted(model_dir.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {model_dir}")
    return found[0]


def _build_kserve_model(name: str, kind: str, model_dir: Path | None = None) -> Any:
    import kserve
    import numpy as np
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class IrisModel(kserve.Model):  # type: ignore[misc]
        """Logistic regression on iris, trained at start (V1 and V2)."""

        def load(self) -> bool:
            if model_dir is not None:  # as KServe's sklearn server: <model_dir>/model.joblib
                import joblib

                self.classifier = joblib.load(model_dir / "model.joblib")
                self.ready = True
                return True
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
        """The LLM (``LocalLLM``, loaded once per process); V1 predict completes each instance too."""

        def load(self) -> bool:
            from openledger.local.llm import LocalLLM

            self.llm = LocalLLM(gguf_file(model_dir) if model_dir is not None else None)
            log.info("LLM loaded", extra={"action": "load", "model": str(self.llm.path), "seconds": self.llm.load_s})
            self.ready = True
            return True

        async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            from openledger.local.llm import Piece, Sampling

            if isinstance(payload, bytes | str):
                payload = json.loads(payload)
            instances = payload.get("instances", []) if isinstance(payload, dict) else []
            greedy = Sampling(16, 0.0, 1.0, (), 0, 0.0, 0.0)
            out = []
            for instance in instances:
                events = self.llm.generate(self.llm.text_prompt(str(instance)), greedy)
                out.append("".join([e.text async for e in events if isinstance(e, Piece)]))
            return {"predictions": out}

    model = TextModel(name) if kind == "openai" else IrisModel(name)
    model.load()
    return model


def serve_model(name: str, kind: str, port: int, host: str = "127.0.0.1", model_dir: Path | None = None) -> None:
    """Run kserve's ModelServer with one model on ``host:port`` (blocks).

    ``model_dir``: load the model from there (``model.joblib``, or a GGUF for ``openai``), as the
    ``openledger-serving`` image does under real KServe; without it, the stand-in's built-in models.
    """
    # kserve parses sys.argv at import; give it nothing of ours.
    sys.argv = sys.argv[:1]
    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
    from kserve.protocol.rest.server import RESTServer

    model = _build_kserve_model(name, kind, model_dir)
    if kind == "openai":
        from openledger.local.openai_api import add_openai_routes

        add_openai_routes(app, name, model.llm)
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


def serve_argv(name: str, kind: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of one model server (``openledger standin serve``) on ``host:port``."""
    serve = ["standin", "serve", "--name", name, "--kind", kind, "--port", str(port), "--host", host]
    return [sys.executable, "-m", "openledger.cli", *serve]


class StandIn:
    def __init__(self, log_dir: Path, namespaces: list[str], host: str = "127.0.0.1") -> None:
        self.log_dir = log_dir
        self.namespaces = namespaces
        self.host = host  # where model servers bind, and the host of the URL written in status
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
                served.ready = await asyncio.to_thread(_probe, self.host, served.port, meta["name"])
            url = f"http://{self.host}:{served.port}"
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
        argv = serve_argv(name, kind, port, self.host)
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


def _probe(host: str, port: int, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models/{name}", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("ready"))
    except (OSError, ValueError):
        return False


def run_standin() -> None:
    import uvloop

    settings = get_settings()
    uvloop.run(StandIn(settings.local_dir.resolve() / "logs", settings.namespaces, settings.bind_host).run())


# --------------------------------------------------------------------- CLI

import click  # noqa: E402


@click.group("standin")
def standin_command() -> None:
    """LOCAL STAND-IN for KServe (plain `make up` only, never in the chart): serve InferenceServices."""


@standin_command.command("run")
def standin_run() -> None:
    """Watch InferenceServices, serve each with kserve's ModelServer, write their status."""
    run_standin()


@standin_command.command("serve")
@click.option("--name", required=True, help="Model name (the InferenceService name).")
@click.option("--kind", type=click.Choice(["v1", "v2", "openai"]), default="v1")
@click.option("--port", type=int, required=True)
@click.option("--host", default="127.0.0.1")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Load the model from here (model.joblib, or a .gguf for openai) instead of the built-in one.",
)
def standin_serve(name: str, kind: str, port: int, host: str, model_dir: Path | None) -> None:
    """Serve one model (iris classifier, or the LLM for openai)."""
    serve_model(name, kind, port, host, model_dir)
