"""The openai provider against each server flavor of tests/fakes/openai_flavors.py: streamed
text and reasoning, tool calls, usage, error bodies, errors inside the stream, overflow;
and a tool loop of two calls through a real capd."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capd.chat import ChatMessage
from capd.providers.base import (
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallBegin,
)
from capd.providers.openai import OpenAIProvider
from protocol.events import Usage
from protocol.manifest import ModelConfig
from tests.conftest import CapdProcess
from tests.fakes.openai_flavors import FLAVORS, LLAMA_CPP_PYTHON, Flavor
from tests.fakes.openai_server import (
    ErrorReply,
    FunctionCall,
    OpenAITestServer,
    OverflowReply,
    StreamErrorReply,
    TextReply,
    ToolCallsReply,
)
from tests.helpers import connect_pod, is_event, spawn, wait_for

TIMEOUT_S = 5.0
HELLO = ModelRequest(system_prompt="", messages=[ChatMessage(role="user", text="hi")])

pytestmark = pytest.mark.parametrize("flavor", FLAVORS, ids=str)


@pytest.fixture
async def server(flavor: Flavor) -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer(flavor) as running:
        yield running


@pytest.fixture
async def provider(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenAIProvider]:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = {"provider": "openai", "name": "test-model", "base_url": server.base_url}
    made = OpenAIProvider(ModelConfig.model_validate(config))
    yield made
    await made.aclose()


async def collect(provider: OpenAIProvider) -> list[StreamItem]:
    async with asyncio.timeout(TIMEOUT_S):
        return [item async for item in provider.stream(HELLO)]


async def failure(provider: OpenAIProvider) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(provider)
    return caught.value


def expected_usage(flavor: Flavor, prompt_tokens: int, completion_tokens: int) -> Usage:
    if flavor.usage == "never":
        return Usage()
    return Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens)


async def test_text_reasoning_and_usage(
    flavor: Flavor, server: OpenAITestServer, provider: OpenAIProvider
) -> None:
    server.enqueue(
        TextReply(["Hel", "lo"], reasoning=["hmm"], prompt_tokens=12, completion_tokens=3)
    )

    items = await collect(provider)

    assert items[:-1] == [ThinkingChunk("hmm"), TextChunk("Hel"), TextChunk("lo")]
    reply = items[-1]
    assert isinstance(reply, ModelReply)
    assert reply.text == "Hello"
    assert reply.usage == expected_usage(flavor, 12, 3)


async def test_two_tool_calls(server: OpenAITestServer, provider: OpenAIProvider) -> None:
    server.enqueue(
        ToolCallsReply(
            [
                FunctionCall("read_file", {"path": "a.txt"}),
                FunctionCall("bash", {"command": "echo one two three"}),
            ],
            fragment_chars=5,
        )
    )

    items = await collect(provider)

    begun = [item.name for item in items if isinstance(item, ToolCallBegin)]
    reply = items[-1]
    assert isinstance(reply, ModelReply)
    assert begun == ["read_file", "bash"]
    assert [(call.name, call.arguments) for call in reply.tool_calls] == [
        ("read_file", {"path": "a.txt"}),
        ("bash", {"command": "echo one two three"}),
    ]
    assert len({call.id for call in reply.tool_calls}) == 2
    assert all(call.id for call in reply.tool_calls)


async def test_an_error_body_gives_the_servers_words(
    server: OpenAITestServer, provider: OpenAIProvider
) -> None:
    server.enqueue(ErrorReply(404, "model 'test-model' not found", type="not_found_error"))

    error = await failure(provider)

    assert not error.retryable
    assert error.status == 404
    assert error.message.endswith("model 'test-model' not found")


async def test_an_error_inside_the_stream_fails_the_call(
    flavor: Flavor, server: OpenAITestServer, provider: OpenAIProvider
) -> None:
    server.enqueue(StreamErrorReply("upstream went away", code=502, text=["par", "tial"]))

    error = await failure(provider)

    if flavor is LLAMA_CPP_PYTHON:
        assert "stream ended early" in error.message
    else:
        assert "upstream went away" in error.message


async def test_overflow_is_recognised(
    flavor: Flavor, server: OpenAITestServer, provider: OpenAIProvider
) -> None:
    if flavor.overflow is None:
        pytest.skip(f"{flavor} cuts a long prompt itself")
    server.enqueue(OverflowReply(prompt_tokens=2299, n_ctx=2048))

    error = await failure(provider)

    assert error.overflow
    assert not error.retryable
    if flavor is LLAMA_CPP_PYTHON:
        # Its stream just ends, naming no window.
        assert "no longer fits the model's context window" in error.message
    else:
        assert "2048" in error.message


@pytest.mark.shared_capd
async def test_a_tool_loop_of_two_calls_through_capd(
    flavor: Flavor, server: OpenAITestServer, capd: CapdProcess, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    server.enqueue(
        ToolCallsReply([FunctionCall("read_file", {"path": "a.txt"})], prompt_tokens=20),
        ToolCallsReply([FunctionCall("read_file", {"path": "b.txt"})], prompt_tokens=30),
        TextReply(["alpha ", "and beta"], reasoning=["both read"], prompt_tokens=40),
    )
    model = {"provider": "openai", "name": "test-model", "base_url": server.base_url}
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["read_file"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "read a.txt, then b.txt"})
        end, seen = await wait_for(pod, is_event("turn_end"))
        status = await pod.request({"method": "status"})

    assert (end["result"], end["output"]) == ("finished", "alpha and beta")
    deltas = [e["text"] for e in seen if e["event"] == "text_delta"]
    thinking = [e["text"] for e in seen if e["event"] == "thinking_delta"]
    assert (deltas, thinking) == (["alpha ", "and beta"], ["both read"])
    results = [e for e in seen if e["event"] == "tool_result"]
    assert [(r["output"].strip(), r["is_error"]) for r in results] == [
        ("alpha", False),
        ("beta", False),
    ]
    steps = [e for e in seen if e["event"] == "assistant_message"]
    assert [Usage(**step["usage"]) for step in steps] == [
        expected_usage(flavor, tokens, 5) for tokens in (20, 30, 40)
    ]
    assert status["usage"]["input_tokens"] == sum(s["usage"]["input_tokens"] for s in steps)
    last = server.requests[2]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "tool"]
    calls = [m["tool_calls"][0]["id"] for m in last if m["role"] == "assistant"]
    assert [m["tool_call_id"] for m in last if m["role"] == "tool"] == calls
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["", ""]
