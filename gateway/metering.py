"""Token estimation, maximum cost and actual usage per protocol: pure functions.

Before the call the gateway knows an upper bound of what a request can cost:
- OpenAI: input tokens are at most the UTF-8 bytes of the text (+4 per message);
  output tokens at most ``max_completion_tokens``/``max_tokens`` (or the default).
- KServe V1: one token per instance in, at most one prediction per instance out.
- Open Inference Protocol V2: one token per row (``shape[0]``) of each input.
The budget reserves ``price.cost(max_input, max_output)``; the token limiter is
charged a realistic estimate (characters / 4 + max output) and corrected to the
actual count afterwards. The charged usage never exceeds the bound that was
reserved, so a Hard budget cannot be overrun by a model that over-reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from openledger.wire import Price

__all__ = ["RequestError", "RequestShape", "actual_usage", "estimate", "max_cost"]

PROTOCOLS = ("openai", "v1", "v2")


class RequestError(ValueError):
    """The client's request body is unusable; the message names the field."""


@dataclass(frozen=True)
class RequestShape:
    protocol: str  # openai | v1 | v2
    max_input_tokens: int
    max_output_tokens: int
    estimated_tokens: int  # what the tokens-per-minute limiter is charged up front


def _text_len(content: Any, field: str) -> tuple[int, int]:
    """(utf-8 bytes, characters) of a message content (string or list of parts)."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content.encode()), len(content)
    if isinstance(content, list):
        total_b = total_c = 0
        for i, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                b, c = _text_len(part["text"], f"{field}[{i}].text")
                total_b += b
                total_c += c
            elif isinstance(part, str):
                total_b += len(part.encode())
                total_c += len(part)
        return total_b, total_c
    raise RequestError(f"{field}: must be a string or a list of content parts")


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"{name}: must be a positive integer")
    return value


def estimate(protocol: str, kind: str, body: Any, default_max_tokens: int = 256) -> RequestShape:
    """Bound a request before the call. ``kind`` is ``chat``/``completions`` (OpenAI) or ``predict``/``infer``."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object")
    if protocol == "openai":
        n = _positive_int(body, "n") or 1
        max_out = (
            _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens") or default_max_tokens
        )
        max_out *= n
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("messages: must be a non-empty list")
            total_b = total_c = 0
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    raise RequestError(f"messages[{i}]: must be an object")
                b, c = _text_len(message.get("content"), f"messages[{i}].content")
                total_b += b + 4
                total_c += c + 16
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                total_b, total_c = len(prompt.encode()) + 1, len(prompt) + 4
            elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
                total_b = sum(len(p.encode()) + 1 for p in prompt)
                total_c = sum(len(p) + 4 for p in prompt)
            else:
                raise RequestError("prompt: must be a string or a list of strings")
        return RequestShape("openai", total_b, max_out, math.ceil(total_c / 4) + max_out)
    if protocol == "v1":
        rows = body.get("instances", body.get("inputs"))
        if not isinstance(rows, list) or not rows:
            raise RequestError("instances: must be a non-empty list")
        return RequestShape("v1", len(rows), len(rows), 2 * len(rows))
    if protocol == "v2":
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise RequestError("inputs: must be a non-empty list of tensors")
        rows = 0
        for i, tensor in enumerate(inputs):
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise RequestError(f"inputs[{i}].shape: must be a list of non-negative integers")
            rows = max(rows, shape[0])
        rows = max(rows, 1)
        return RequestShape("v2", rows, rows, 2 * rows)
    raise RequestError(f"protocol: must be one of {PROTOCOLS}, got {protocol!r}")


def max_cost(price: Price, shape: RequestShape) -> int:
    """The most this request can be charged, in base units."""
    return price.cost(shape.max_input_tokens, shape.max_output_tokens)


def actual_usage(shape: RequestShape, response: Any) -> tuple[int, int]:
    """(input, output) tokens to charge, from the model's response, capped at the reserved bound."""
    tokens_in, tokens_out = shape.max_input_tokens, 0
    if isinstance(response, dict):
        if shape.protocol == "openai":
            usage = response.get("usage")
            if isinstance(usage, dict):
                p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if isinstance(p, int) and p >= 0:
                    tokens_in = p
                if isinstance(c, int) and c >= 0:
                    tokens_out = c
        elif shape.protocol == "v1":
            predictions = response.get("predictions", response.get("outputs"))
            tokens_out = len(predictions) if isinstance(predictions, list) else 0
        elif shape.protocol == "v2":
            outputs = response.get("outputs")
            if isinstance(outputs, list):
                for tensor in outputs:
                    shape_ = tensor.get("shape") if isinstance(tensor, dict) else None
                    if isinstance(shape_, list) and shape_ and isinstance(shape_[0], int):
                        tokens_out = max(tokens_out, shape_[0])
    return min(tokens_in, shape.max_input_tokens), min(tokens_out, shape.max_output_tokens)
