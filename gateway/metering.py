"""Token estimation, maximum cost and actual usage per protocol: pure functions.

Before the call the gateway knows an upper bound of what a request can cost:
- OpenAI: input tokens are at most the UTF-8 bytes of the text (+4 per message,
  +``CHAT_TEMPLATE_TOKENS`` per chat request for the template the model wraps it in),
  plus the JSON of ``tools``/``functions``/``tool_choice``/``response_format``
  (schemas are prompt text to the model) and ``IMAGE_MAX_TOKENS`` per image part
  (OpenAI's high-detail maximum, 85 + 170 per 512-px tile of a 2048x768 image);
  output tokens at most ``max_completion_tokens``/``max_tokens`` (``null`` or absent:
  the default, 16 for legacy completions, which the gateway then sends as ``max_tokens``),
  times ``n``. Embeddings: the input's bytes (or token ids) in, nothing out.
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

import orjson

from openledger.wire import Price

__all__ = [
    "CHAT_TEMPLATE_TOKENS",
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "IMAGE_MAX_TOKENS",
    "RequestError",
    "RequestShape",
    "actual_usage",
    "default_output_bound",
    "estimate",
    "max_cost",
    "with_output_bound",
]

PROTOCOLS = ("openai", "v1", "v2")
IMAGE_MAX_TOKENS = 1445  # an upper bound per image part
IMAGE_ESTIMATED_TOKENS = 765  # a 1024x1024 image at high detail
CHAT_TEMPLATE_TOKENS = 64  # per chat request: role markers and a default system prompt (SmolLM2's is ~30 tokens)
_PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class RequestError(ValueError):
    """The client's request body is unusable; the message names the field."""


@dataclass(frozen=True)
class RequestShape:
    protocol: str  # openai | v1 | v2
    max_input_tokens: int
    max_output_tokens: int
    estimated_tokens: int  # what the tokens-per-minute limiter is charged up front
    estimated_input_tokens: int = 0  # a realistic input count (characters / 4), for streams without usage


def _text_len(content: Any, field: str) -> tuple[int, int]:
    """(token bound, estimated characters) of a message content (string or list of parts).

    The bound counts UTF-8 bytes of text and ``IMAGE_MAX_TOKENS`` per image part; the
    characters count an image as ``IMAGE_ESTIMATED_TOKENS`` * 4.
    """
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
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                total_b += IMAGE_MAX_TOKENS
                total_c += IMAGE_ESTIMATED_TOKENS * 4
            elif isinstance(part, str):
                total_b += len(part.encode())
                total_c += len(part)
        return total_b, total_c
    raise RequestError(f"{field}: must be a string or a list of content parts")


def _schemas_len(body: dict[str, Any]) -> int:
    """Bytes of the tool and function schemas (and output format), which the model reads as prompt."""
    total = 0
    for name in _PROMPT_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            total += len(orjson.dumps(value))
        elif isinstance(value, str):
            total += len(value.encode())
    return total


def _message_len(message: dict[str, Any], field: str) -> tuple[int, int]:
    """A message's content plus its tool calls (a tool call's arguments are tokens too)."""
    b, c = _text_len(message.get("content"), f"{field}.content")
    calls = message.get("tool_calls") or message.get("function_call")
    if calls is not None:
        extra = len(orjson.dumps(calls))
        b, c = b + extra, c + extra
    return b, c


def _embedding_input(body: dict[str, Any]) -> tuple[int, int]:
    """(token bound, characters) of an embeddings ``input``: text, texts, token ids or lists of them."""
    value = body.get("input")
    if isinstance(value, str):
        return len(value.encode()) + 1, len(value) + 4
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return sum(len(v.encode()) + 1 for v in value), sum(len(v) + 4 for v in value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value), 4 * len(value)
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            ids = sum(len(v) for v in value)
            return ids, 4 * ids
    raise RequestError("input: must be a string, a list of strings, or token ids (a list of integers or lists)")


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"{name}: must be a positive integer")
    return value


def default_output_bound(kind: str, default_max_tokens: int) -> int:
    """The output bound of a request that sets none: ``default_max_tokens``, but at most
    ``COMPLETIONS_DEFAULT_MAX_TOKENS`` for legacy text completions (OpenAI's and vLLM's default)."""
    if kind == "completions":
        return min(COMPLETIONS_DEFAULT_MAX_TOKENS, default_max_tokens)
    return default_max_tokens


def with_output_bound(kind: str, body: dict[str, Any], default_max_tokens: int) -> dict[str, Any] | None:
    """The body to send upstream when the client set no output bound (else None: send it as it came).

    A ``null`` bound is no bound (the model would use its own default, which the
    reservation does not cover): null bound fields are dropped. The reservation covers
    ``default_output_bound``; the model must not generate more than that, or the tokens
    beyond it would be served and never charged.
    """
    if kind not in ("chat", "completions"):
        return None
    nulls = [name for name in _OUTPUT_FIELDS if name in body and body[name] is None]
    if any(body.get(name) is not None for name in _OUTPUT_FIELDS):
        return {k: v for k, v in body.items() if k not in nulls} if nulls else None
    bounded = {k: v for k, v in body.items() if k not in nulls}
    bounded["max_tokens"] = default_output_bound(kind, default_max_tokens)
    return bounded


def estimate(protocol: str, kind: str, body: Any, default_max_tokens: int = 256) -> RequestShape:
    """Bound a request before the call.

    ``kind`` is ``chat``/``completions``/``embeddings`` (OpenAI) or ``predict``/``infer``.
    """
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object")
    if protocol == "openai" and kind == "embeddings":
        total_b, total_c = _embedding_input(body)
        estimated = math.ceil(total_c / 4)
        return RequestShape("openai", total_b, 0, estimated, estimated)
    if protocol == "openai":
        n = _positive_int(body, "n") or 1
        max_out = (
            _positive_int(body, "max_completion_tokens")
            or _positive_int(body, "max_tokens")
            or default_output_bound(kind, default_max_tokens)
        )
        max_out *= n
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("messages: must be a non-empty list")
            # The chat template (role markers, a default system prompt) is input the model counts too.
            total_b, total_c = CHAT_TEMPLATE_TOKENS, CHAT_TEMPLATE_TOKENS * 2
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    raise RequestError(f"messages[{i}]: must be an object")
                b, c = _message_len(message, f"messages[{i}]")
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
        schemas = _schemas_len(body)
        estimated_in = math.ceil((total_c + schemas) / 4)
        return RequestShape("openai", total_b + schemas, max_out, estimated_in + max_out, estimated_in)
    if protocol == "v1":
        rows = body.get("instances", body.get("inputs"))
        if not isinstance(rows, list) or not rows:
            raise RequestError("instances: must be a non-empty list")
        return RequestShape("v1", len(rows), len(rows), 2 * len(rows), len(rows))
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
        return RequestShape("v2", rows, rows, 2 * rows, rows)
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
