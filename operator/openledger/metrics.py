"""The one metrics registry. Every metric of the product is ``openledger_*``.

Modules declare their metrics against ``REGISTRY`` and processes expose it with
``start_metrics_server``. A private registry (not prometheus-client's global
default) keeps tests and several components in one process independent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
