"""A small real OpenAI-style model server for the streaming tests, with fault injection.

It streams ``words`` chunks (one word each, ``delay_s`` apart) as server-sent
events over chunked HTTP/1.1, as vLLM and KServe do, then the usage chunk when
asked (``stream_options.include_usage``) and ``[DONE]``. Faults: ``break_after``
(close the socket after that many chunks, no terminating chunk), ``stall_after``
(stop sending after that many chunks, keep the connection), ``usage`` False (never
send usage), ``error_after`` (after that many chunks an error event, then a clean
end of the response: no ``[DONE]``, no usage, as llama.cpp ends a failed
generation), ``fields`` (SSE field and comment lines put before every event's
``data:``, as some servers send ``id:``/``event:``), ``pad`` (characters added to
every word: a fast, large answer), ``on_stream`` (a hook run as the next stream
begins, after the gateway admitted it). It records each request's body and whether the client (the gateway)
went away mid-stream (``cancelled``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_TOKENS = 9


class SseUpstream:
    def __init__(self) -> None:
        self.words = 5
        self.delay_s = 0.0
        self.break_after: int | None = None
        self.stall_after: int | None = None
        self.usage = True
        self.error_after: int | None = None
        self.fields = b""
        self.pad = 0
        self.on_stream: Callable[[], None] | None = None  # called once as the next stream begins
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                outer.bodies.append(body)
                outer.paths.append(self.path)
                if self.path.endswith("/embeddings"):
                    outer._embeddings(self, body)
                elif body.get("stream"):
                    try:
                        outer._stream(self, body)
                        outer.finished.set()
                    except (BrokenPipeError, ConnectionResetError):
                        outer.cancelled.set()
                        self.close_connection = True
                else:
                    outer._json(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _chunk(self, kind: str, i: int, text: str, finish: str | None = None) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {"content": text} if i else {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": "c1", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}

    def _stream(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        kind = "chat" if "messages" in body else "completions"
        hook, self.on_stream = self.on_stream, None
        if hook is not None:
            hook()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(data: bytes) -> None:
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        def event(obj: Any) -> None:
            send(self.fields + b"data: " + json.dumps(obj).encode() + b"\n\n")

        for i in range(self.words):
            if self.break_after is not None and i == self.break_after:
                handler.connection.shutdown(2)  # the model dies mid-stream: no terminating chunk
                handler.close_connection = True
                return
            if self.stall_after is not None and i == self.stall_after:
                time.sleep(60)
            if self.error_after is not None and i == self.error_after:
                event({"error": {"message": "generation failed", "type": "server_error", "code": 500}})
                send(b"")  # a clean end of the response, without [DONE] or usage
                return
            event(self._chunk(kind, i, f"w{i} " + "x" * self.pad))
            time.sleep(self.delay_s)
        event(self._chunk(kind, self.words, "", "stop"))
        options = body.get("stream_options") or {}
        if self.usage and options.get("include_usage"):
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": self.words,
                     "total_tokens": PROMPT_TOKENS + self.words}  # fmt: skip
            event({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                   "usage": usage})  # fmt: skip
        send(self.fields + b"data: [DONE]\n\n")
        send(b"")

    def _json(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        message = {"role": "assistant", "content": "w0 w1"}
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": PROMPT_TOKENS + 2}
        answer = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}  # fmt: skip
        self._send_json(handler, answer)

    def _embeddings(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(len(str(text).split()) for text in inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.125]} for i in range(len(inputs))]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": "m", "usage": usage}
        self._send_json(handler, answer)

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, answer: dict[str, Any]) -> None:
        raw = json.dumps(answer).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
