"""The gateway's three protocols: request paths, upstream paths and error bodies. Pure.

| path | protocol | kind |
|---|---|---|
| ``POST /v1/models/{name}:predict`` | KServe V1 | predict |
| ``POST /v2/models/{name}/infer`` | Open Inference Protocol V2 | infer |
| ``POST /v1/chat/completions`` (or ``/openai/v1/…``) | OpenAI | chat |
| ``POST /v1/completions`` (or ``/openai/v1/…``) | OpenAI | completions |
| ``POST /v1/embeddings`` (or ``/openai/v1/…``) | OpenAI | embeddings |

Upstream, OpenAI paths get KServe's ``/openai`` prefix (``/openai/v1/embeddings``).
Errors use each protocol's own shape: OpenAI ``{"error": {"message", "type",
"code", "param"}}``; KServe V1 and V2 ``{"error": "<message>"}``.

Quota exhaustion: OpenAI answers 429 with ``type`` and ``code``
``insufficient_quota``, and its clients expect that: the ``openai`` Python client
raises ``RateLimitError`` for 429 but only a bare ``APIStatusError`` for 402, and
retries 429 unless told not to. So on OpenAI paths an exhausted budget is 429
``insufficient_quota`` with ``x-should-retry: false`` (the client honours it and
does not retry a request that cannot pass before the period ends); the KServe
protocols keep 402 ``budget_exhausted``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

__all__ = ["Route", "error_body", "match_path", "openai_error", "upstream_path"]


@dataclass(frozen=True)
class Route:
    protocol: str  # openai | v1 | v2
    kind: str  # chat | completions | predict | infer
    model: str | None  # from the path (V1/V2); OpenAI names it in the body


def match_path(path: str) -> Route | None:
    """Which inference endpoint a path is, or None."""
    if path.startswith("/openai/"):
        path = path[len("/openai") :]
    if path == "/v1/chat/completions":
        return Route("openai", "chat", None)
    if path == "/v1/completions":
        return Route("openai", "completions", None)
    if path == "/v1/embeddings":
        return Route("openai", "embeddings", None)
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        name = path[len("/v1/models/") : -len(":predict")]
        return Route("v1", "predict", name) if name and "/" not in name else None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        name = path[len("/v2/models/") : -len("/infer")]
        return Route("v2", "infer", name) if name and "/" not in name else None
    return None


def upstream_path(route: Route, model: str) -> str:
    """The path on the InferenceService (KServe serves OpenAI under ``/openai``)."""
    if route.protocol == "v1":
        return f"/v1/models/{model}:predict"
    if route.protocol == "v2":
        return f"/v2/models/{model}/infer"
    if route.kind == "chat":
        return "/openai/v1/chat/completions"
    return f"/openai/v1/{route.kind}"


def openai_error(status: int, code: str) -> tuple[int, str, tuple[tuple[bytes, bytes], ...]]:
    """(status, code, extra headers) of a refusal on an OpenAI path, as OpenAI itself sends it."""
    if code == "budget_exhausted":
        return 429, "insufficient_quota", ((b"x-should-retry", b"false"),)
    return status, code, ()


# OpenAI error "type" per HTTP status, as the OpenAI API and its client expect.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    405: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


def error_body(protocol: str, status: int, code: str, message: str, param: str | None = None) -> bytes:
    """The JSON error body in the protocol's own shape."""
    if protocol == "openai":
        return orjson.dumps(
            {
                "error": {
                    "message": message,
                    "type": code if code == "insufficient_quota" else _OPENAI_TYPES.get(status, "api_error"),
                    "code": code,
                    "param": param,
                }
            }
        )
    return orjson.dumps({"error": message})
