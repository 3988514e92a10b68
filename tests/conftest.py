"""Fixtures shared by every test.

The local platform is started once per session with only the components the
collected tests ask for, all in parallel, with data in a throwaway folder; its
processes die with pytest (PR_SET_PDEATHSIG) even if pytest itself is killed.

Component fixtures: ``kubeconfig``/``kube_env``, ``database_url``, ``redis_url``,
``eth_rpc_url``; ``local_platform`` gives the whole LocalPlatform (restarts etc.).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from openledger.local.platform import COMPONENTS as ALL_COMPONENTS
from openledger.local.platform import Endpoints, LocalPlatform

# Which component each fixture needs.
FIXTURE_COMPONENTS: dict[str, set[str]] = {
    "kubeconfig": {"etcd", "kube-apiserver"},
    "kube_env": {"etcd", "kube-apiserver"},
    "database_url": {"postgres"},
    "redis_url": {"redis"},
    "eth_rpc_url": {"anvil"},
    # item.fixturenames is the transitive closure, so the fixtures every component
    # fixture depends on (local_platform, endpoints) must not pull in everything.
    "local_platform": set(),
    "platform_env": set(ALL_COMPONENTS),
}

_needed: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        for kind in ("unit", "integration", "e2e"):
            if (root / kind) in path.parents:
                item.add_marker(getattr(pytest.mark, kind))
        for name in getattr(item, "fixturenames", ()):
            _needed.update(FIXTURE_COMPONENTS.get(name, set()))


@pytest.fixture(scope="session")
def local_platform() -> Iterator[LocalPlatform]:
    base = Path(tempfile.mkdtemp(prefix="openledger-test-"))
    platform = LocalPlatform(base, detached=False, durable=False, components=_needed or ALL_COMPONENTS)
    platform.start()
    try:
        yield platform
    finally:
        platform.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def endpoints(local_platform: LocalPlatform) -> Endpoints:
    return local_platform.endpoints


@pytest.fixture(scope="session")
def kubeconfig(endpoints: Endpoints) -> Path:
    assert endpoints.kubeconfig is not None
    return endpoints.kubeconfig


@pytest.fixture(scope="session")
def kube_env(kubeconfig: Path) -> dict[str, str]:
    return {"KUBECONFIG": str(kubeconfig)}


@pytest.fixture(scope="session")
def database_url(endpoints: Endpoints) -> str:
    return endpoints.database_url


@pytest.fixture(scope="session")
def redis_url(endpoints: Endpoints) -> str:
    return endpoints.redis_url


@pytest.fixture(scope="session")
def eth_rpc_url(endpoints: Endpoints) -> str:
    return endpoints.eth_rpc_url


@pytest.fixture(scope="session")
def platform_env(endpoints: Endpoints) -> dict[str, str]:
    """Environment for a product process started by a test: all endpoints."""
    return {**os.environ, **endpoints.as_env()}
