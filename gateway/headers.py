"""Response headers an OpenAI client reads: ``x-request-id`` and ``x-ratelimit-*``. Pure.

``x-request-id`` echoes the client's (printable ASCII, at most
``REQUEST_ID_MAX`` characters) or is minted (``req_`` + 32 hex digits).

``x-ratelimit-*`` (as OpenAI sends them) come from what admission knows: the
GCRA limiters' backlog (how far each theoretical arrival time is ahead of now,
``admit.lua``'s reply). For requests: limit = the Agent's ``burst``, remaining =
the requests that could pass right now, reset = the time until the bucket is
full again; for tokens the same with ``tokensPerMinute`` (the token burst). An
unlimited dimension sends no headers.
"""

from __future__ import annotations

import math
import os

__all__ = ["REQUEST_ID_MAX", "duration", "ratelimit_headers", "request_id"]

REQUEST_ID_MAX = 128


def request_id(client_value: bytes | None) -> bytes:
    """The client's ``x-request-id`` when usable, else a new one."""
    usable = client_value is not None and 0 < len(client_value) <= REQUEST_ID_MAX
    if usable and client_value is not None and all(0x21 <= b <= 0x7E for b in client_value):
        return client_value
    return b"req_" + os.urandom(16).hex().encode()


def duration(us: float) -> str:
    """A wait in OpenAI's header format: ``0s``, ``120ms``, ``1.5s``, ``6m0s``."""
    if us <= 0:
        return "0s"
    if us < 1_000_000:
        return f"{math.ceil(us / 1000)}ms"
    seconds = math.ceil(us / 1000) / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _dimension(name: bytes, limit: int, per_s: float, backlog: bytes | str) -> list[tuple[bytes, bytes]]:
    if per_s <= 0 or limit <= 0 or backlog in (b"", ""):
        return []
    backlog_us = max(0, int(backlog))
    remaining = max(0, math.floor(limit - backlog_us * per_s / 1_000_000))
    return [
        (b"x-ratelimit-limit-" + name, str(limit).encode()),
        (b"x-ratelimit-remaining-" + name, str(remaining).encode()),
        (b"x-ratelimit-reset-" + name, duration(backlog_us).encode()),
    ]


def ratelimit_headers(
    requests_per_second: float, burst: int, tokens_per_minute: int, backlog_requests_us: bytes, backlog_tokens_us: bytes
) -> list[tuple[bytes, bytes]]:
    """The six ``x-ratelimit-*`` headers after an admission (fewer for unlimited dimensions)."""
    return _dimension(b"requests", burst, requests_per_second, backlog_requests_us) + _dimension(
        b"tokens", tokens_per_minute, tokens_per_minute / 60, backlog_tokens_us
    )
