"""The ASGI edge: what the gateway reads from a client's request and how it answers.

No Redis and no model here: headers (API key, ``Idempotency-Key``, ``x-request-id``), the
body within its size limit, error answers in the protocol's shape, and the ``Result`` a
served request ends with.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from openledger.gateway.errors import Reject
from openledger.gateway.protocols import error_body, openai_error
from openledger.gateway.records import AgentConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = (b"content-type", b"application/json")
IDEMPOTENCY_KEY_MAX = 255  # characters, as Stripe allows


@dataclass
class Edge:
    """The client's side of one request: ASGI send/receive, its x-request-id, whether a response began."""

    send: Send
    receive: Receive
    request_id: tuple[bytes, bytes]
    started: bool = False
    wants_usage: bool = False  # a stream whose client asked for the usage chunk itself

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": [*headers, self.request_id]})


@dataclass
class Result:
    """A served request: the answer (unless already streamed) and its metric labels."""

    status: int
    body: bytes
    content_type: bytes
    headers: list[tuple[bytes, bytes]]
    agent: str
    model: str
    upstream_s: float


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Reject(499, "client_closed", "client closed the connection")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Reject(413, "body_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_error(send: Send, protocol: str, rej: Reject, rid: tuple[bytes, bytes] | None = None) -> None:
    status, code = rej.status, rej.code
    headers = [JSON, *rej.headers]
    if rid is not None:
        headers.append(rid)
    if protocol == "openai":
        status, code, extra = openai_error(status, code)
        headers.extend(extra)
    if rej.retry_after_s is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(rej.retry_after_s))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(protocol, status, code, rej.message, rej.param)})


async def send_json(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [JSON, *headers]})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def api_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip() or None
            return None
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def idempotency_header(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            key: str = value.decode("latin-1").strip()
            if not key or len(key) > IDEMPOTENCY_KEY_MAX:
                msg = f"Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
                raise Reject(400, "invalid_idempotency_key", msg, param="Idempotency-Key")
            return key
    return None


def fingerprint(path: str, body: bytes) -> str:
    """What makes a retry the same request: its path and its exact body."""
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


def models_body(agent: AgentConfig, name: str | None) -> bytes:
    """``GET /v1/models`` (the Agent's models) or ``GET /v1/models/{name}``."""
    if name is None:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": agent.namespace} for n in agent.models]
        return orjson.dumps({"object": "list", "data": data})
    if name not in agent.models:
        raise Reject(404, "model_not_found", f"The model {name!r} does not exist or you do not have access to it.",
                     param="model")  # fmt: skip
    return orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": agent.namespace})
