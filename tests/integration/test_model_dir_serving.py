"""The model server of ``openledger-serving`` (KServe on the node) run on the host: models from a folder.

``openledger standin serve --model-dir`` is what the project's ClusterServingRuntimes run in the
pod, on the folder KServe mounts from ``pvc://models/<path>``; the folder here is the one
:func:`openledger.local.kserve.prepare_models` writes for the node's ``models`` volume.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from openledger.local import kserve
from openledger.local.processes import free_port, spawn, wait_ready
from openledger.local.standin import serve_argv
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _ready(url: str) -> bool:
    try:
        return bool(_get(url).get("ready"))
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize(("kind", "path"), [("v1", kserve.IRIS_PATH), ("openai", kserve.LLM_PATH)])
def test_the_model_server_serves_the_model_of_its_folder(tmp_path: Path, kind: str, path: str) -> None:
    folder = kserve.prepare_models(tmp_path / "models") / path
    port = free_port()
    argv = [*serve_argv("m", kind, port), "--model-dir", str(folder)]
    process = spawn("model-m", argv, tmp_path / "model.log", detached=False)
    try:
        wait_ready(process, lambda: _ready(f"http://127.0.0.1:{port}/v2/health/ready"), 90)
        if kind == "v1":
            rows = {"instances": [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]}
            assert _post(f"http://127.0.0.1:{port}/v1/models/m:predict", rows) == {"predictions": [1, 0]}
        else:
            question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
            body = {"model": "m", "messages": question, "max_tokens": 20, "temperature": 0}
            answer = _post(f"http://127.0.0.1:{port}/openai/v1/chat/completions", body)
            assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
    finally:
        process.stop(5)


def test_a_folder_without_the_model_fails_the_server_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    port = free_port()
    argv = [*serve_argv("m", "openai", port), "--model-dir", str(tmp_path / "empty")]
    process = spawn("model-m", argv, tmp_path / "model.log", detached=False)
    try:
        wait_for(lambda: not process.alive(), 60, "the model server to exit", 0.2)
    finally:
        process.stop(5)
    assert not _ready(f"http://127.0.0.1:{port}/v2/health/ready")
    assert f"no .gguf file in {tmp_path / 'empty'}" in (tmp_path / "model.log").read_text()
