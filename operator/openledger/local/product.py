"""The product's own processes that ``make up`` runs on the local platform.

Each capability adds its process here (operator, gateway, ledger worker,
settler, the serving stand-in). They run the installed ``openledger`` CLI with
the platform's endpoints in their environment, exactly as a user would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from openledger.local.platform import Endpoints


@dataclass(frozen=True)
class ProductProcess:
    name: str
    args: list[str]  # arguments to `openledger`
    env: dict[str, str] = field(default_factory=dict)
    ready_url: str | None = None  # GET must answer 200
    # Extra variables for .local/env once it is up (GATEWAY_URL, METRICS_URL…).
    exports: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "openledger.cli", *self.args]


# Builders take the platform's endpoints and a port allocator.
ProcessBuilder = Callable[[Endpoints, Callable[[str], int]], ProductProcess]
PRODUCT_PROCESSES: list[ProcessBuilder] = []


def _operator(endpoints: Endpoints, port: Callable[[str], int]) -> ProductProcess:
    from openledger.controllers.commands import operator_process

    return operator_process(endpoints, port)


PRODUCT_PROCESSES.append(_operator)


def _standin(endpoints: Endpoints, port: Callable[[str], int]) -> ProductProcess:
    # LOCAL STAND-IN for KServe: serves InferenceServices on loopback (never in the chart).
    return ProductProcess(name="serving-standin", args=["standin", "run"])


def _gateway(endpoints: Endpoints, port: Callable[[str], int]) -> ProductProcess:
    http, metrics = port("gateway"), port("gateway-metrics")
    return ProductProcess(
        name="gateway",
        args=["gateway", "--port", str(http), "--metrics-port", str(metrics)],
        ready_url=f"http://127.0.0.1:{http}/healthz",
        exports={
            "GATEWAY_URL": f"http://127.0.0.1:{http}",
            "GATEWAY_METRICS_URL": f"http://127.0.0.1:{metrics}/metrics",
            "METRICS_URL": f"http://127.0.0.1:{metrics}/metrics",
        },
    )


PRODUCT_PROCESSES.append(_standin)
PRODUCT_PROCESSES.append(_gateway)


def _ledger_worker(endpoints: Endpoints, port: Callable[[str], int]) -> ProductProcess:
    # Runs `db upgrade` itself before consuming; its metrics answer once the schema is in place.
    metrics = port("ledger-metrics")
    return ProductProcess(
        name="ledger-worker",
        args=["ledger-worker", "--metrics-port", str(metrics)],
        ready_url=f"http://127.0.0.1:{metrics}/metrics",
        exports={"LEDGER_METRICS_URL": f"http://127.0.0.1:{metrics}/metrics"},
    )


PRODUCT_PROCESSES.append(_ledger_worker)
