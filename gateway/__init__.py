"""The inference gateway (``openledger gateway``).

Public surface: ``Gateway`` (the ASGI app) and the pure decision modules
``gcra``, ``breaker``, ``retry``, ``metering``, ``protocols``, ``records``.
The Lua scripts in ``lua/`` are the production limiter; ``gcra`` is their reference.
"""

from __future__ import annotations

__all__ = ["Gateway"]


def __getattr__(name: str) -> object:
    if name == "Gateway":
        from openledger.gateway.app import Gateway

        return Gateway
    raise AttributeError(name)
