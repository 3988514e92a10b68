"""Every manifest in examples/ is accepted by the real API server with the real CRDs installed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from openledger.local.platform import LocalPlatform

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The walkthrough's placeholders, filled as its README's `sed` lines fill them.
PLACEHOLDERS = {
    "__ETH_RPC_URL__": "http://127.0.0.1:8545",
    "__TOKEN_ADDRESS__": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    "__DISTRIBUTOR_ADDRESS__": "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
}
MANIFESTS = sorted(EXAMPLES.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, object]]:
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        doc["metadata"].pop("namespace", None)  # type: ignore[union-attr]
    return docs


def test_there_is_an_example_of_each_kind() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert {"Model", "Agent", "RewardPool", "Secret"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_applies_to_the_api_server(path: Path, local_platform: LocalPlatform, kubeconfig: Path) -> None:
    namespace = f"ex-{uuid.uuid4().hex[:8]}"
    local_platform.kubectl("create", "namespace", namespace)
    docs = documents(path)
    applied = local_platform.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs), check=False
    )
    assert applied.returncode == 0, applied.stderr
    for doc in docs:
        kind, name = str(doc["kind"]).lower(), doc["metadata"]["name"]  # type: ignore[index]
        got = local_platform.kubectl("get", "-n", namespace, kind, name, "-o", "name", check=False)
        assert got.returncode == 0, got.stderr
