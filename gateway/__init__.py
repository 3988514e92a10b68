"""The inference gateway (``openledger gateway``).

Public surface: ``Gateway`` (the ASGI app, ``app``), which takes a request through
``edge`` (ASGI, headers, errors), ``admission`` (auth, routes, admit.lua), ``proxy``
(the model call), ``settle`` (settle.lua, durability, Idempotency-Key claims) and
``streamed`` (a streamed answer); the pure decision modules
``gcra``, ``breaker``, ``retry``, ``metering``, ``protocols``, ``records``,
``lifetimes``, ``sse`` (metering a stream as it passes) and ``headers``
(``x-request-id``, ``x-ratelimit-*``). Streaming I/O: ``streaming`` (the relay),
``upstream`` (the model connection pool), ``journal`` (streams of a dead gateway).
The Lua scripts in ``lua/`` (loaded by ``scripts``, which names
their reply codes) are the production limiter and meter; ``gcra`` is their
reference, ``lua/money.lua`` their exact decimal-string money arithmetic.
``durability`` makes the answer wait until its usage event is durable.
"""

from __future__ import annotations

__all__ = ["Gateway"]


def __getattr__(name: str) -> object:
    if name == "Gateway":
        from openledger.gateway.app import Gateway

        return Gateway
    raise AttributeError(name)
