"""Which handler modules the operator loads.

``openledger operator`` imports every module in ``HANDLER_MODULES``; importing a
module registers its Kopf handlers. To add a controller, append its module
here (only once the module exists), e.g.::

    HANDLER_MODULES.append("openledger.controllers.agent")

The Agent controller adds ``openledger.controllers.agent`` and the RewardPool
controller ``openledger.controllers.rewardpool``.
"""

from __future__ import annotations

import importlib

HANDLER_MODULES: list[str] = [
    "openledger.controllers.model",
    "openledger.controllers.agent",
    "openledger.controllers.rewardpool",
]


def load_handlers(modules: list[str] | None = None) -> list[str]:
    """Import the handler modules (registering their handlers); returns their names."""
    names = list(HANDLER_MODULES if modules is None else modules)
    for name in names:
        importlib.import_module(name)
    return names
