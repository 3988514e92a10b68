"""Solidity contracts of the settlement path and their committed build artifacts.

- ``src/RewardDistributor.sol``: the cumulative Merkle distributor (settler publishes
  ``(epoch, root, cumulativeTotal)``; anyone claims ``cumulativeAmount - claimed``).
- ``src/OpenToken.sol``: a plain ERC-20 for the local platform.

``compile_contracts()`` runs the pinned npm ``solc`` (JS build, standard JSON) through
``compile.js``; ``write_artifacts()`` refreshes ``artifacts/*.json``, which are committed
so that nothing needs Node.js at run time. A unit test recompiles and compares.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
ARTIFACT_DIR = HERE / "artifacts"
CONTRACT_NAMES = ("OpenToken", "RewardDistributor")
COMPILE_TIMEOUT_S = 300


class CompileError(RuntimeError):
    """solc failed or Node.js is missing; the message carries solc's output."""


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x… creation code
    deployed_bytecode: str  # 0x… runtime code
    compiler: str


def compile_contracts() -> dict[str, Artifact]:
    """Compile ``src/*.sol`` with the cached solc + OpenZeppelin toolchain."""
    from openledger.local.toolchain import solidity_toolchain

    node = shutil.which("node")
    if node is None:
        raise CompileError("`node` is not on PATH: install Node.js 20 to compile the contracts")
    node_modules = solidity_toolchain() / "node_modules"
    proc = subprocess.run(
        [node, str(HERE / "compile.js"), str(node_modules), str(SRC_DIR)],
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise CompileError(f"solc failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    output = json.loads(proc.stdout)
    return {
        name: Artifact(
            name=name,
            abi=c["abi"],
            bytecode=c["bytecode"],
            deployed_bytecode=c["deployedBytecode"],
            compiler=output["compiler"],
        )
        for name, c in output["contracts"].items()
        if name in CONTRACT_NAMES
    }


def artifact_json(artifact: Artifact) -> str:
    data = {
        "contractName": artifact.name,
        "compiler": artifact.compiler,
        "abi": artifact.abi,
        "bytecode": artifact.bytecode,
        "deployedBytecode": artifact.deployed_bytecode,
    }
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def write_artifacts(artifacts: dict[str, Artifact] | None = None) -> list[Path]:
    """Recompile (unless given) and write ``artifacts/<Name>.json``; returns the paths."""
    artifacts = artifacts or compile_contracts()
    ARTIFACT_DIR.mkdir(exist_ok=True)
    paths = []
    for name in CONTRACT_NAMES:
        path = ARTIFACT_DIR / f"{name}.json"
        path.write_text(artifact_json(artifacts[name]))
        paths.append(path)
    load_artifact.cache_clear()
    return paths


@cache
def load_artifact(name: str) -> Artifact:
    """The committed artifact of ``name`` (``OpenToken`` or ``RewardDistributor``)."""
    if name not in CONTRACT_NAMES:
        raise KeyError(f"contract: unknown name {name!r}; known: {', '.join(CONTRACT_NAMES)}")
    data = json.loads((ARTIFACT_DIR / f"{name}.json").read_text())
    return Artifact(
        name=data["contractName"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
        compiler=data["compiler"],
    )


def main() -> None:
    """``python -m openledger.settlement.contracts``: recompile and rewrite the artifacts."""
    for path in write_artifacts():
        print(path)


if __name__ == "__main__":
    main()
