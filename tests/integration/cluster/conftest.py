"""A real node for these tests: the platform in cluster mode, in a throwaway folder.

It is started once for the package and torn down at the end; the last test of
``test_node.py`` checks that the teardown leaves nothing on the machine, so every test that
uses the node sorts before it (``test_installed_product.py``, ``test_lifecycle.py``), and
``test_zz_killed_session.py``, which needs the machine free of nodes, after it.

One node per machine: a second session waits on ``NODE_LOCK`` instead of tearing down
the first one's node as leftovers.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from openledger.local.cluster import apply_platform_services, install_serving
from openledger.local.platform import LocalPlatform
from openledger.local.product_cluster import install_product

NODE_LOCK = Path(tempfile.gettempdir()) / "openledger-node.lock"


@pytest.fixture(scope="package")
def cluster() -> Iterator[LocalPlatform]:
    with NODE_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = Path(tempfile.mkdtemp(prefix="openledger-cluster-"))
        platform = LocalPlatform(base, detached=False, durable=False, cluster=True)
        platform.start()
        apply_platform_services(platform)
        try:
            yield platform
        finally:
            platform.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="package")
def product(cluster: LocalPlatform) -> LocalPlatform:
    """What ``make cluster`` installs on the node: real KServe (the models claim in ``default``), then
    the chart from this checkout's image.

    Installed once for the modules that use it; ``test_lifecycle.py`` ends by uninstalling the chart.
    """
    timings = install_serving(cluster)
    timings.update(install_product(cluster))
    print("install timings (s): " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()))
    return cluster
