"""OpenAIProvider against a local server that speaks the real streaming wire format."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import pytest

from capd.chat import INVALID_JSON_KEY, ChatMessage, ToolSpec
from capd.providers import http
from capd.providers.base import (
    CONTINUE_CUT_TEXT,
    CONTINUE_TEXT,
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
)
from capd.providers.http import NO_KEY_HINT
from capd.providers.openai import OpenAIProvider
from protocol.events import ToolCall, Usage
from protocol.manifest import ModelConfig
from tests.fakes.openai_flavors import LLAMA_CPP_PYTHON
from tests.fakes.openai_server import (
    DropReply,
    ErrorReply,
    FunctionCall,
    OpenAITestServer,
    OverflowReply,
    RawStreamReply,
    StreamErrorReply,
    TextReply,
    ToolCallsReply,
    validation_errors,
)

TIMEOUT_S = 5.0
HELLO = ModelRequest(system_prompt="", messages=[ChatMessage(role="user", text="hi")])

ProviderFactory = Callable[..., OpenAIProvider]


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as running:
        yield running


@pytest.fixture
async def make_provider(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProviderFactory]:
    """Providers aimed at `server` by default, closed after the test."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    providers: list[OpenAIProvider] = []

    def make(**fields: object) -> OpenAIProvider:
        config = {"provider": "openai", "name": "test-model", "base_url": server.base_url}
        provider = OpenAIProvider(ModelConfig.model_validate({**config, **fields}))
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


async def collect(provider: OpenAIProvider, request: ModelRequest = HELLO) -> list[StreamItem]:
    async with asyncio.timeout(TIMEOUT_S):
        return [item async for item in provider.stream(request)]


async def failure(provider: OpenAIProvider, request: ModelRequest = HELLO) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(provider, request)
    return caught.value


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- streaming ----------------------------------------------------------------------------


async def test_text_streams_in_order(server: OpenAITestServer, make_provider: ProviderFactory):
    server.enqueue(TextReply(["Hel", "lo", ", world"], prompt_tokens=12, completion_tokens=3))

    items = await collect(make_provider())

    assert items == [
        TextChunk("Hel"),
        TextChunk("lo"),
        TextChunk(", world"),
        ModelReply(text="Hello, world", usage=Usage(input_tokens=12, output_tokens=3)),
    ]


async def test_reasoning_streams_as_thinking(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["42"], reasoning=["Let me ", "think."]))

    items = await collect(make_provider())

    assert items[:3] == [ThinkingChunk("Let me "), ThinkingChunk("think."), TextChunk("42")]
    assert isinstance(items[-1], ModelReply)
    assert items[-1].text == "42"


@pytest.mark.parametrize("interleave", [False, True])
async def test_parallel_tool_calls_split_across_chunks(
    server: OpenAITestServer, make_provider: ProviderFactory, interleave: bool
):
    bash_args = {"command": "ls -la /tmp", "timeout_s": 30}
    read_args = {"path": "notes/todo.md", "limit": 20}
    server.enqueue(
        ToolCallsReply(
            [
                FunctionCall("bash", bash_args, id="call_bash"),
                FunctionCall("read_file", read_args, id="call_read"),
            ],
            text=["Checking."],
            fragment_chars=5,
            interleave=interleave,
            prompt_tokens=40,
            completion_tokens=25,
        )
    )

    items = await collect(make_provider())

    begins = [item for item in items if isinstance(item, ToolCallBegin)]
    assert begins == [ToolCallBegin("call_bash", "bash"), ToolCallBegin("call_read", "read_file")]
    for begin, expected in zip(begins, (bash_args, read_args), strict=True):
        fragments = [
            (position, item)
            for position, item in enumerate(items)
            if isinstance(item, ToolCallArgs) and item.call_id == begin.call_id
        ]
        assert len(fragments) > 1
        assert items.index(begin) < fragments[0][0]
        assert json.loads("".join(item.json for _, item in fragments)) == expected
    assert items[-1] == ModelReply(
        text="Checking.",
        tool_calls=[
            ToolCall(id="call_bash", name="bash", arguments=bash_args),
            ToolCall(id="call_read", name="read_file", arguments=read_args),
        ],
        usage=Usage(input_tokens=40, output_tokens=25),
    )


async def test_unparseable_and_empty_arguments(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(
        ToolCallsReply([FunctionCall("bash", '{"command": "ls'), FunctionCall("list_pods", "")])
    )

    reply = (await collect(make_provider()))[-1]

    assert isinstance(reply, ModelReply)
    assert [call.arguments for call in reply.tool_calls] == [
        {INVALID_JSON_KEY: '{"command": "ls'},
        {},
    ]


async def test_tolerates_sse_variants(server: OpenAITestServer, make_provider: ProviderFactory):
    """Comments, `data:` without a space, a call without id, and no [DONE] after finish_reason."""

    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return json.dumps({"object": "chat.completion.chunk", "choices": [choice]})

    call = {"index": 0, "function": {"name": "list_pods", "arguments": "{}"}}
    server.enqueue(
        RawStreamReply(
            [
                ": OPENROUTER PROCESSING\n\n",
                f"event: message\ndata:{chunk({'content': 'ok'})}\n\n",
                f"data: {chunk({'tool_calls': [call]})}\r\n\r\n",
                f"data: {chunk({}, 'tool_calls')}\n\n",
            ]
        )
    )

    items = await collect(make_provider())

    assert items[0] == TextChunk("ok")
    begin = items[1]
    assert isinstance(begin, ToolCallBegin)
    assert begin.name == "list_pods"
    assert begin.call_id.startswith("call_0_")
    assert items[2] == ToolCallArgs(begin.call_id, "{}")
    assert items[3] == ModelReply(
        text="ok", tool_calls=[ToolCall(id=begin.call_id, name="list_pods", arguments={})]
    )


async def test_finish_reason_length_marks_the_reply_truncated(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply("Roses are", finish_reason="length"), TextReply("red."))
    provider = make_provider()

    first, second = [(await collect(provider))[-1] for _ in range(2)]

    assert isinstance(first, ModelReply)
    assert isinstance(second, ModelReply)
    assert (first.truncated, second.truncated) == (True, False)


async def test_a_reply_cut_short_is_followed_by_a_note_to_continue(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    hello = ChatMessage(role="user", text="write a poem")
    cut = ChatMessage(role="assistant", text="Roses are", truncated=True)
    paused = ChatMessage(role="assistant", text=" red", interrupted=True)
    request = ModelRequest("", [hello, cut, paused, ChatMessage("assistant", ", violets")])

    await collect(make_provider(), request)

    assert server.requests[0]["messages"] == [
        {"role": "user", "content": "write a poem"},
        {"role": "assistant", "content": "Roses are"},
        {"role": "user", "content": CONTINUE_CUT_TEXT},
        {"role": "assistant", "content": " red"},
        {"role": "user", "content": CONTINUE_TEXT},
        {"role": "assistant", "content": ", violets"},
    ]


async def test_empty_queue_answers_with_placeholder(make_provider: ProviderFactory):
    reply = (await collect(make_provider()))[-1]

    assert isinstance(reply, ModelReply)
    assert reply.text == "(no scripted reply)"


# -- request ------------------------------------------------------------------------------


async def test_request_body_and_key(
    server: OpenAITestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CAPD_TEST_OPENAI_KEY", "sk-test-123")
    provider = make_provider(
        name="gpt-4.1-mini", api_key_env="CAPD_TEST_OPENAI_KEY", max_tokens=256, temperature=0.2
    )
    schema = {"type": "object", "properties": {"command": {"type": "string"}}}
    request = ModelRequest(
        system_prompt="You are careful.",
        messages=[
            ChatMessage(role="user", text="list files"),
            ChatMessage(
                role="assistant",
                tool_calls=(ToolCall(id="call_1", name="bash", arguments={"command": "ls"}),),
            ),
            ChatMessage(role="tool", call_id="call_1", name="bash", text="a.txt\nb.txt"),
            ChatMessage(role="assistant", text="Two files."),
            ChatMessage(role="user", text="thanks"),
        ],
        tools=[ToolSpec(name="bash", description="Run a command.", parameters=schema)],
    )

    await collect(provider, request)

    assert server.requests == [
        {
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": "You are careful."},
                {"role": "user", "content": "list files"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "bash", "arguments": '{"command":"ls"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt"},
                {"role": "assistant", "content": "Two files."},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "bash",
                        "description": "Run a command.",
                        "parameters": schema,
                    },
                }
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 256,
            "temperature": 0.2,
        }
    ]
    assert server.headers[0]["authorization"] == "Bearer sk-test-123"


async def test_minimal_request_without_key(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    await collect(make_provider())

    assert server.requests == [
        {
            "model": "test-model",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]
    assert "authorization" not in server.headers[0]


async def test_openai_api_key_goes_only_to_openai(
    server: OpenAITestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    """OPENAI_API_KEY is for api.openai.com; a server at another base_url gets a key only
    when the manifest names its variable (tests/test_api_keys.py)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")

    await collect(make_provider())

    assert "authorization" not in server.headers[0]


async def test_missing_key_variable_is_a_clear_error(
    server: OpenAITestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("CAPD_TEST_MISSING_KEY", raising=False)

    error = await failure(make_provider(api_key_env="CAPD_TEST_MISSING_KEY"))

    assert not error.retryable
    assert "CAPD_TEST_MISSING_KEY" in error.message
    assert "\n" not in error.message
    assert server.requests == []


# -- errors -------------------------------------------------------------------------------


async def test_rate_limit_is_retryable_with_retry_after(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(
        ErrorReply(429, "Rate limit reached for requests", type="requests", retry_after="7")
    )

    error = await failure(make_provider())

    assert error.retryable
    assert error.status == 429
    assert error.retry_after_s == 7.0
    assert "Rate limit reached for requests" in error.message


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (408, True), (400, False), (401, False)]
)
async def test_http_errors(
    server: OpenAITestServer, make_provider: ProviderFactory, status: int, retryable: bool
):
    server.enqueue(ErrorReply(status, "Something specific went wrong", type="server_error"))

    error = await failure(make_provider())

    assert error.retryable is retryable
    assert error.status == status
    assert error.retry_after_s is None
    # A refusal for want of a key, when capd sent none, says how to send one.
    hint = f"; {NO_KEY_HINT}" if status == 401 else ""
    assert error.message == (
        f"openai: HTTP {status} from {server.base_url}/chat/completions: "
        f"Something specific went wrong{hint}"
    )


async def test_a_500_that_calls_the_request_invalid_is_not_retryable(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    words = validation_errors(2, {"role": "assistant", "content": None})
    server.enqueue(ErrorReply(500, words, type="internal_server_error"))

    error = await failure(make_provider())

    assert not error.retryable
    assert not error.overflow
    assert error.message.endswith(" ".join(words.split()))
    assert "\n" not in error.message


async def test_a_long_reason_is_kept_whole_on_one_line(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    words = "The model `gpt-x` does not exist.\n" + "detail " * 300
    server.enqueue(ErrorReply(404, words, type="invalid_request_error"))

    error = await failure(make_provider())

    assert error.message.endswith(" ".join(words.split()))


async def test_connection_refused_is_retryable(make_provider: ProviderFactory):
    base_url = f"http://127.0.0.1:{closed_port()}/v1"

    error = await failure(make_provider(base_url=base_url))

    assert error.retryable
    assert f"{base_url}/chat/completions" in error.message


async def test_dropped_connection_is_retryable(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(DropReply(["partial ", "answer"]))
    seen: list[StreamItem] = []

    async def consume() -> None:
        async for item in make_provider().stream(HELLO):
            seen.append(item)

    with pytest.raises(ProviderError) as caught:
        await asyncio.wait_for(consume(), TIMEOUT_S)

    assert seen == [TextChunk("partial "), TextChunk("answer")]
    assert caught.value.retryable
    assert server.base_url in caught.value.message


async def test_stream_ending_early_is_retryable(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    delta = {"choices": [{"index": 0, "delta": {"content": "cut"}, "finish_reason": None}]}
    server.enqueue(RawStreamReply([f"data: {json.dumps(delta)}\n\n"]))

    error = await failure(make_provider())

    assert error.retryable
    assert "stream ended early" in error.message


async def test_done_without_a_finish_reason_is_an_incomplete_reply(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    """llama-cpp-python's server (interrupt_requests, on by default) stops a stream with a
    bare `data: [DONE]` when a newer request comes in."""
    delta = {"choices": [{"index": 0, "delta": {"content": "cut"}, "finish_reason": None}]}
    server.enqueue(RawStreamReply([f"data: {json.dumps(delta)}\n\n", "data: [DONE]\n\n"]))

    error = await failure(make_provider())

    assert error.retryable
    assert "ended with [DONE] but no finish_reason" in error.message
    assert "--interrupt_requests False" in error.message


async def test_a_stream_that_ends_before_any_reply_is_taken_as_an_overflow(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(RawStreamReply([]))

    error = await failure(make_provider())

    assert error.overflow
    assert not error.retryable
    assert "ended before any reply" in error.message
    assert "no longer fits the model's context window" in error.message


async def test_after_a_stream_that_broke_off_the_next_request_takes_a_new_connection(
    monkeypatch: pytest.MonkeyPatch,
):
    """llama-cpp-python closes the connection of a stream that failed, but late."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with OpenAITestServer(LLAMA_CPP_PYTHON) as server:
        server.enqueue(OverflowReply(), TextReply("fine"))
        config = {"provider": "openai", "name": "m", "base_url": server.base_url}
        provider = OpenAIProvider(ModelConfig.model_validate(config))
        try:
            await failure(provider)
            reply = (await collect(provider))[-1]
        finally:
            await provider.aclose()

    assert isinstance(reply, ModelReply)
    assert reply.text == "fine"
    assert server.connections == 2


async def test_an_error_field_in_the_stream_is_an_error(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    """llama.cpp's server before late 2025: an `error:` field, then `data: [DONE]`."""
    error = {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
    }
    server.enqueue(RawStreamReply([f"error: {json.dumps(error)}\n\n", "data: [DONE]\n\n"]))

    failed = await failure(make_provider())

    assert failed.overflow
    assert not failed.retryable
    assert failed.message.endswith(error["message"])


@pytest.mark.parametrize(
    "words",
    [
        # llama-cpp-python, the exception its Llama raises
        "Requested tokens (2300) exceed context window of 2048",
        # llama-cpp-python's server (errors.py), vLLM, OpenAI
        "This model's maximum context length is 2048 tokens. However, you requested 2499 "
        "tokens (2299 in the messages, 200 in the completion). Please reduce the length of "
        "the messages or completion.",
        # llama-server, recent and older builds
        "request (4476 tokens) exceeds the available context size (4096 tokens), try increasing it",
        "input (5000 tokens) is larger than the max context size (4096 tokens). skipping",
        # vLLM V1
        "The decoder prompt (length 8825) is longer than the maximum model length of 8192.",
        # Ollama
        "the input length exceeds the context length",
        # LM Studio
        "The number of tokens to keep from the initial prompt is greater than the context "
        "length (n_keep: 13055>= n_ctx: 4096). Try to load the model with a larger context "
        "length, or provide a shorter input.",
    ],
)
async def test_overflow_wordings(
    server: OpenAITestServer, make_provider: ProviderFactory, words: str
):
    server.enqueue(ErrorReply(400, words, type="server_error"))

    error = await failure(make_provider())

    assert error.overflow
    assert not error.retryable


async def test_context_length_exceeded_code_is_an_overflow(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(ErrorReply(400, "Input too large", code="context_length_exceeded"))

    assert (await failure(make_provider())).overflow


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        (StreamErrorReply("Overloaded", type="overloaded_error"), True),
        (StreamErrorReply("Rate limit exceeded", type="rate_limit_error", code=429), True),
        (StreamErrorReply("Prompt violates policy", type="invalid_request_error"), False),
    ],
)
async def test_error_inside_stream(
    server: OpenAITestServer,
    make_provider: ProviderFactory,
    reply: StreamErrorReply,
    retryable: bool,
):
    server.enqueue(reply)

    error = await failure(make_provider())

    assert error.retryable is retryable
    assert reply.message in error.message


async def test_read_timeout_is_retryable(server: OpenAITestServer, make_provider: ProviderFactory):
    server.enqueue(TextReply(["slow", "er"], delay_ms=2_000))

    error = await failure(make_provider(request_timeout_s=0.2))

    assert error.retryable
    assert "no data" in error.message
    await server.wait_disconnects(1, timeout=TIMEOUT_S)


# -- cancellation -------------------------------------------------------------------------


async def test_cancelling_the_consumer_aborts_the_request(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["tick"] * 1_000, delay_ms=20))
    provider = make_provider()
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for item in provider.stream(HELLO):
            if isinstance(item, TextChunk):
                first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), TIMEOUT_S)
    task.cancel()

    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert task in done
    assert task.cancelled()
    await server.wait_disconnects(1, timeout=TIMEOUT_S)


async def test_closing_the_stream_aborts_the_request(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["tick"] * 1_000, delay_ms=20))

    async with asyncio.timeout(TIMEOUT_S), aclosing(make_provider().stream(HELLO)) as stream:
        assert await anext(stream) == TextChunk("tick")

    await server.wait_disconnects(1, timeout=TIMEOUT_S)
    assert server.disconnects == 1


# -- connections --------------------------------------------------------------------------


async def test_consecutive_requests_share_a_connection(
    server: OpenAITestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply("one"), TextReply("two"))
    provider = make_provider()

    replies = [(await collect(provider))[-1], (await collect(provider))[-1]]

    assert [reply.text for reply in replies if isinstance(reply, ModelReply)] == ["one", "two"]
    assert len(server.requests) == 2
    assert server.connections == 1


async def test_body_left_open_after_done_does_not_hold_the_reply(
    server: OpenAITestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(http, "TAIL_TIMEOUT_S", 0.05)
    delta = {"choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": "stop"}]}
    server.enqueue(
        RawStreamReply(
            [f"data: {json.dumps(delta)}\n\ndata: [DONE]\n\n", ": much later\n\n"],
            delay_ms=60_000,
        )
    )

    items = await collect(make_provider())

    assert items[-1] == ModelReply(text="done")
