"""OpenAI's HTTP surface for the stand-in's ``LocalLLM``, added to kserve's ModelServer app.

kserve's own OpenAI layer imports vLLM, so these routes are added by hand, on both
KServe's paths (``/openai/v1/...``, where the gateway sends) and OpenAI's (``/v1/...``):

- ``POST chat/completions`` and ``POST completions``: non-streaming, or with
  ``stream: true`` Server-Sent Events exactly as OpenAI writes them: one chunk per
  generated token, a last chunk with ``finish_reason``, a usage chunk (``choices: []``)
  when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
- ``POST embeddings`` (``float`` or ``base64``, as the ``openai`` client asks by default);
- ``GET models`` and ``GET models/{id}`` on ``/openai/v1`` only (``/v1/models`` is KServe V1's).

``usage`` counts come from the model's tokenizer: the prompt as the chat template
renders it, and every generated token. A client that hangs up cancels its generation.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from openledger.local.llm import MODEL_ID, Event, Finish, LocalLLM, Piece, RequestError, parse_sampling

Handler = Callable[..., Awaitable[Any]]
# OpenAI's legacy completions endpoint generates 16 tokens when max_tokens is absent; chat runs to the context's end.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _usage(finish: Finish) -> dict[str, int]:
    total = finish.prompt_tokens + finish.completion_tokens
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens, "total_tokens": total}


def sse(data: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event as OpenAI writes it (pure)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat messages for the template: text content only, every message checked (pure)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise RequestError("this model reads text parts only", f"messages[{i}].content")
            content = "".join(str(p.get("text") or "") for p in content)
        elif content is not None and not isinstance(content, str):
            raise RequestError("content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": message["role"], "content": content or ""})
    return out


def _prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (one prompt per request)", "prompt")
    return prompt


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not body.get("stream"):
        raise RequestError("stream_options is an object, allowed only with stream: true", "stream_options")
    return bool(options.get("include_usage"))


class _Shapes:
    """The response and chunk objects of one request (chat or text completion)."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.id, self.created = prefix + secrets.token_hex(12), int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def response(self, text: str, finish: Finish) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": finish.reason, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(finish)}
        choice = {"index": 0, "text": text, "finish_reason": finish.reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(finish)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        out = {**self._head(obj), "choices": [choice]}
        return {**out, "usage": None} if self.include_usage else out

    def usage_chunk(self, finish: Finish) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(finish)}


async def stream_events(events: AsyncGenerator[Event, None], shapes: _Shapes) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream for one generation; closing it (the client hung up) cancels the generation."""
    async with contextlib.aclosing(events):
        if shapes.kind == "chat":
            yield sse(shapes.chunk(None, role=True))
        try:
            async for event in events:
                if isinstance(event, Piece):
                    if event.text:
                        yield sse(shapes.chunk(event.text))
                    continue
                yield sse(shapes.chunk(None if shapes.kind == "chat" else "", finish_reason=event.reason))
                if shapes.include_usage:
                    yield sse(shapes.usage_chunk(event))
                yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, as OpenAI does
            yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": None}})


def add_openai_routes(app: Any, name: str, llm: LocalLLM) -> None:
    """Add the OpenAI routes for model ``name`` to kserve's FastAPI ``app``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Response:
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        return JSONResponse(body, status_code=status)

    async def read(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise RequestError(f"the body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if body.get("model") != name:
            raise LookupError(f"The model `{body.get('model')}` does not exist (this server serves `{name}`)")
        return body

    async def generate(request: Request, kind: str) -> Response:
        body = await read(request)
        include_usage = _include_usage(body)
        if kind == "chat":
            sampling = parse_sampling(body, None)
            prompt = llm.chat_prompt(_messages(body), body.get("tools"))
        else:
            sampling = parse_sampling(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
            prompt = llm.text_prompt(_prompt_text(body))
        shapes = _Shapes(kind, name, include_usage)
        events = llm.generate(prompt, sampling)
        if body.get("stream"):
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream_events(events, shapes), media_type="text/event-stream", headers=headers)
        parts: list[str] = []
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Finish):
                    return JSONResponse(shapes.response("".join(parts), event))
                parts.append(event.text)
                if await request.is_disconnected():
                    break  # closing the events cancels the generation
        return error(499, "the client closed the request", kind="client_closed")

    async def embeddings(request: Request) -> Response:
        body = await read(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise RequestError("input must be a non-empty string or list of non-empty strings", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError("encoding_format must be float or base64", "encoding_format")
        if body.get("dimensions") not in (None, llm.embedding_size):
            raise RequestError(f"this model's embeddings have {llm.embedding_size} dimensions", "dimensions")
        vectors, tokens = await llm.embed(texts)

        def encode(vector: list[float]) -> list[float] | str:
            return vector if fmt == "float" else base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": usage})

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": f"openledger-standin ({MODEL_ID})"}

    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(model_id: str) -> Response:
        if model_id != name:
            return error(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return JSONResponse(model_card())

    def guarded(handler: Handler) -> Handler:
        async def route(request: Request) -> Response:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except RequestError as exc:
                return error(400, str(exc), exc.param)
            except LookupError as exc:
                return error(404, str(exc), "model", "model_not_found")

        # This module uses postponed annotations; FastAPI needs the real class to inject the request.
        route.__annotations__["request"] = Request
        return route

    chat = guarded(lambda request: generate(request, "chat"))
    completions = guarded(lambda request: generate(request, "completions"))
    for prefix in ("/openai/v1", "/v1"):
        app.add_api_route(f"{prefix}/chat/completions", chat, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/embeddings", guarded(embeddings), methods=["POST"])
    app.add_api_route("/openai/v1/models", models, methods=["GET"])
    model.__annotations__["model_id"] = str
    app.add_api_route("/openai/v1/models/{model_id}", model, methods=["GET"])
