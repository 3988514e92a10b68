"""The one metrics registry. Every metric of the product is ``openledger_*``.

Modules declare their metrics against ``REGISTRY`` and processes expose it with
``start_metrics_server``. A private registry (not prometheus-client's global
default) keeps tests and several components in one process independent.

Every process also exposes, on the same registry, prometheus-client's process
and runtime collectors (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``process_open_fds``, ``python_gc_*``,
``python_info``) and ``openledger_build_info{version="…"} 1``, the version
``openledger --version`` prints (the installed package's metadata).
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import (
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.registry import CollectorRegistry

__all__ = ["BUILD_INFO", "REGISTRY", "build_version", "start_metrics_server"]

REGISTRY = CollectorRegistry(auto_describe=True)


def build_version() -> str:
    """The installed package's version, as ``openledger --version`` reads it."""
    try:
        return metadata.version("openledger")
    except metadata.PackageNotFoundError:
        return "unknown"


# A module body runs once per process (``sys.modules``), so each collector is registered
# once; a second registration of the same names would raise ValueError, never double up.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
BUILD_INFO = Info("openledger_build", "The running build of OpenLedger (value 1)", registry=REGISTRY)
BUILD_INFO.info({"version": build_version()})


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
