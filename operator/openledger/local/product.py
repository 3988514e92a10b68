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
